//! End-to-end tests of `edgerelay gateway`: the real binary on 127.0.0.1:0, edges registered
//! over HTTP exactly as `edge_register` does, clients using the sessions API.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

const API: &str = "test-api-token-0123456789";
const API2: &str = "other-api-token-0123456789";
const NODE_KEY: &str = "test-node-key-0123456789";

struct Gateway {
    child: Child,
    base: String,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(extra: &str) -> Gateway {
    let dir = std::env::temp_dir().join(format!(
        "edgerelay-gw-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = format!(
        r#"
listen = "127.0.0.1:0"
node_keys = ["{NODE_KEY}"]
token_keys = ["test-token-key-0123456789"]
turn_secrets = ["test-turn-secret-0123456789"]
{extra}
[[accounts]]
name = "ops"
token = "{API}"
[[accounts]]
name = "other"
token = "{API2}"
[[regions]]
name = "eu-west"
lat = 48.85
lon = 2.35
[[regions]]
name = "us-east"
lat = 40.71
lon = -74.0
[[regions]]
name = "ap-southeast"
lat = 1.35
lon = 103.82
"#
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, cfg).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgerelay"))
        .args(["gateway", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn edgerelay gateway");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("GATEWAY_READY http=") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("GATEWAY_READY within 30 s");
    Gateway {
        child,
        base,
        dir,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client"),
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn node(id: &str, region: &str, lat: f64, lon: f64, viewers: u32, max: u32) -> Value {
    json!({
        "id": id,
        "region": region,
        "lat": lat,
        "lon": lon,
        "http_url": format!("http://127.0.0.1:1/{id}"),
        "ws_url": format!("ws://127.0.0.1:1/{id}"),
        "ice_urls": [format!("stun:127.0.0.1:3478"), format!("turn:127.0.0.1:3478?transport=udp")],
        "capacity": {"max_viewers": max, "max_egress_kbps": 0},
        "load": {"rooms": 0, "viewers": viewers, "egress_kbps": 0, "cpu": 0.1},
        "sessions": [],
        "draining": false,
        "version": "test"
    })
}

impl Gateway {
    async fn register(&self, rec: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/1.0/nodes/register", self.base))
            .bearer_auth(NODE_KEY)
            .json(rec)
            .send()
            .await
            .expect("register");
        envelope(r).await
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(API);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        envelope(rb.send().await.expect("request")).await
    }

    async fn create(&self, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, "/1.0/sessions", Some(body))
            .await
    }

    async fn status(&self) -> Value {
        let (code, v) = self.call(reqwest::Method::GET, "/1.0/status", None).await;
        assert_eq!(code, 200, "{v}");
        v["metadata"].clone()
    }
}

/// Reads a response, checks the envelope invariants and returns (HTTP code, envelope).
async fn envelope(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = r.text().await.expect("body");
    assert!(
        ctype.starts_with("application/json"),
        "{code} {ctype}: {text}"
    );
    let v: Value = serde_json::from_str(&text).expect("JSON envelope");
    assert_eq!(v["status_code"], code, "{v}");
    if code < 400 {
        assert_eq!(v["type"], "sync", "{v}");
        assert_eq!(v["status"], "success", "{v}");
        assert_eq!(v["error"], "", "{v}");
    } else {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["status"], "failed", "{v}");
        assert!(v["metadata"].is_null(), "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    (code, v)
}

fn token_claims(token: &str) -> Value {
    let payload = token.split('.').next().expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json")
}

async fn register_three(gw: &Gateway) {
    for rec in [
        node("paris", "eu-west", 48.85, 2.35, 0, 100),
        node("nyc", "us-east", 40.71, -74.0, 0, 100),
        node("singapore", "ap-southeast", 1.35, 103.82, 0, 100),
    ] {
        let (code, v) = gw.register(&rec).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["metadata"]["heartbeat_interval_ms"], 2000);
    }
}

#[tokio::test]
async fn routing_region_nearest_load_capacity() {
    let gw = start("instance_grace_secs = 0");
    register_three(&gw).await;
    let st = gw.status().await;
    assert_eq!(st["nodes"].as_array().expect("nodes").len(), 3);

    // Requested region.
    let (code, v) = gw.create(json!({"app": "game", "region": "us-east"})).await;
    assert_eq!(code, 201, "{v}");
    let m = &v["metadata"];
    assert_eq!(m["node"], "nyc");
    assert_eq!(m["region"], "us-east");
    assert_eq!(m["status"], "created");
    assert_eq!(m["joinable"], true);
    let id = m["id"].as_str().expect("id");
    let url = m["url"].as_str().expect("url");
    assert!(
        url.starts_with(&format!(
            "ws://127.0.0.1:1/nyc/1.0/session/{id}/sockets/slave?token="
        )),
        "{url}"
    );
    let tok = url.split("token=").nth(1).expect("token");
    let c = token_claims(tok);
    assert_eq!(c["s"], id);
    assert_eq!(c["r"], "controller");
    let stun = &m["stun_servers"][0];
    assert_eq!(stun["urls"][1], "turn:127.0.0.1:3478?transport=udp");
    let user = stun["username"].as_str().expect("username");
    assert!(user.ends_with(&format!(":{id}")), "{user}");
    assert!(stun["password"].as_str().is_some_and(|p| p.len() == 28));
    let p = &m["publisher"];
    assert_eq!(p["whip_url"], format!("http://127.0.0.1:1/nyc/whip/{id}"));
    assert_eq!(
        token_claims(p["token"].as_str().expect("pt"))["r"],
        "publisher"
    );
    assert!(p["master_url"]
        .as_str()
        .is_some_and(|u| u.contains("/sockets/master?token=")));

    // Nearest to a location (Tokyo -> Singapore, London -> Paris, Toronto -> New York).
    for (lat, lon, want) in [
        (35.68, 139.69, "singapore"),
        (51.5, -0.12, "paris"),
        (43.65, -79.38, "nyc"),
    ] {
        let (code, v) = gw
            .create(json!({"app": "game", "location": {"lat": lat, "lon": lon}}))
            .await;
        assert_eq!(code, 201, "{v}");
        assert_eq!(v["metadata"]["node"], want, "({lat},{lon})");
    }

    // Load breaks ties: a second eu-west edge at the same place, busier paris.
    gw.register(&node("paris", "eu-west", 48.85, 2.35, 60, 100))
        .await;
    gw.register(&node("paris2", "eu-west", 48.85, 2.35, 20, 100))
        .await;
    let (_, v) = gw.create(json!({"app": "g", "region": "eu-west"})).await;
    assert_eq!(v["metadata"]["node"], "paris2");
    let (_, v) = gw
        .create(json!({"app": "g", "location": {"lat": 48.8, "lon": 2.3}}))
        .await;
    assert_eq!(v["metadata"]["node"], "paris2");
    gw.register(&node("paris", "eu-west", 48.85, 2.35, 10, 100))
        .await;
    gw.register(&node("paris2", "eu-west", 48.85, 2.35, 20, 100))
        .await;
    let (_, v) = gw.create(json!({"app": "g", "region": "eu-west"})).await;
    assert_eq!(v["metadata"]["node"], "paris");

    // A full edge is skipped: both eu-west edges full -> nearest to the region's coordinates.
    gw.register(&node("paris", "eu-west", 48.85, 2.35, 100, 100))
        .await;
    gw.register(&node("paris2", "eu-west", 48.85, 2.35, 100, 100))
        .await;
    let (code, v) = gw.create(json!({"app": "g", "region": "eu-west"})).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["node"], "nyc");
    let (_, v) = gw
        .create(json!({"app": "g", "location": {"lat": 48.8, "lon": 2.3}}))
        .await;
    assert_eq!(v["metadata"]["node"], "nyc");

    // All full -> 503.
    gw.register(&node("nyc", "us-east", 40.71, -74.0, 100, 100))
        .await;
    gw.register(&node("singapore", "ap-southeast", 1.35, 103.82, 100, 100))
        .await;
    let (code, v) = gw.create(json!({"app": "g"})).await;
    assert_eq!(code, 503, "{v}");
    assert!(v["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("no edge available")));

    // Unknown region.
    let (code, _) = gw.create(json!({"app": "g", "region": "mars"})).await;
    assert_eq!(code, 400);

    // Regions list.
    let (code, v) = gw.call(reqwest::Method::GET, "/1.0/regions", None).await;
    assert_eq!(code, 200);
    let names: Vec<&str> = v["metadata"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["ap-southeast", "eu-west", "us-east"]);
    assert_eq!(v["metadata"][1]["nodes"], 2);
    assert_eq!(v["metadata"][1]["available"], false);
}

#[tokio::test]
async fn node_loss_marks_sessions_error_within_6s() {
    // Default timeout (6 s): 3 missed beats of 2 s.
    let gw = start("instance_grace_secs = 0");
    register_three(&gw).await;
    let (_, v) = gw.create(json!({"app": "g", "region": "us-east"})).await;
    let lost = v["metadata"]["id"].as_str().expect("id").to_owned();
    let (_, v) = gw.create(json!({"app": "g", "region": "eu-west"})).await;
    let kept = v["metadata"]["id"].as_str().expect("id").to_owned();

    // paris and singapore keep heart-beating every 2 s; nyc stops now.
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    let mut gone_after = None;
    let mut next_beat = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_beat {
            gw.register(&node("paris", "eu-west", 48.85, 2.35, 0, 100))
                .await;
            gw.register(&node("singapore", "ap-southeast", 1.35, 103.82, 0, 100))
                .await;
            next_beat += Duration::from_secs(2);
        }
        let st = gw.status().await;
        let ids: Vec<&str> = st["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["id"].as_str())
            .collect();
        if !ids.contains(&"nyc") {
            assert_eq!(ids, ["paris", "singapore"]);
            gone_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone_after = gone_after.expect("nyc dropped");
    assert!(
        gone_after <= Duration::from_millis(6800) && gone_after >= Duration::from_secs(5),
        "dropped after {gone_after:?}"
    );
    let (code, v) = gw
        .call(reqwest::Method::GET, &format!("/1.0/sessions/{lost}"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["metadata"]["status"], "error");
    let (_, v) = gw
        .call(reqwest::Method::GET, &format!("/1.0/sessions/{kept}"), None)
        .await;
    assert_eq!(v["metadata"]["status"], "created");
    // Joining an errored session: 409.
    let (code, _) = gw
        .call(
            reqwest::Method::POST,
            &format!("/1.0/sessions/{lost}/join"),
            None,
        )
        .await;
    assert_eq!(code, 409);
    let (_, v) = gw
        .call(reqwest::Method::GET, "/1.0/sessions?status=error", None)
        .await;
    assert_eq!(v["metadata"].as_array().expect("list").len(), 1);
}

#[tokio::test]
async fn lifecycle_join_delete_list() {
    let gw = start("instance_grace_secs = 0");
    let mut rec = node("paris", "eu-west", 48.85, 2.35, 0, 100);
    gw.register(&rec).await;
    let (_, v) = gw.create(json!({"app": "g", "joinable": false})).await;
    let closed = v["metadata"]["id"].as_str().expect("id").to_owned();
    let (_, v) = gw
        .create(json!({"app": "g", "screen": {"width": 1280, "height": 720, "fps": 30}}))
        .await;
    let id = v["metadata"]["id"].as_str().expect("id").to_owned();
    assert_eq!(v["metadata"]["screen"]["width"], 1280);

    // The edge reports the publisher: created -> active.
    rec["sessions"] = json!([{"id": id, "publisher": true, "viewers": 1}]);
    let (_, r) = gw.register(&rec).await;
    assert_eq!(r["metadata"]["terminate_sessions"], json!([]));
    let (_, v) = gw
        .call(reqwest::Method::GET, &format!("/1.0/sessions/{id}"), None)
        .await;
    assert_eq!(v["metadata"]["status"], "active");
    assert_eq!(v["metadata"]["publisher_connected"], true);

    // Join: spectator token on the same edge.
    let (code, v) = gw
        .call(
            reqwest::Method::POST,
            &format!("/1.0/sessions/{id}/join"),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let url = v["metadata"]["url"].as_str().expect("url");
    assert!(
        url.starts_with("ws://127.0.0.1:1/paris/1.0/session/"),
        "{url}"
    );
    let tok = url.split("token=").nth(1).expect("token");
    assert_eq!(token_claims(tok)["r"], "spectator");
    assert!(v["metadata"]["stun_servers"][0]["username"].is_string());
    // Not joinable -> 403; another account cannot see it -> 404.
    let (code, _) = gw
        .call(
            reqwest::Method::POST,
            &format!("/1.0/sessions/{closed}/join"),
            None,
        )
        .await;
    assert_eq!(code, 403);
    let r = gw
        .http
        .get(format!("{}/1.0/sessions/{id}", gw.base))
        .bearer_auth(API2)
        .send()
        .await
        .expect("get");
    assert_eq!(envelope(r).await.0, 404);

    // List with filters and pagination.
    let (_, v) = gw
        .call(reqwest::Method::GET, "/1.0/sessions?status=active", None)
        .await;
    assert_eq!(v["metadata"].as_array().expect("l").len(), 1);
    let (_, v) = gw
        .call(reqwest::Method::GET, "/1.0/sessions?limit=1&offset=1", None)
        .await;
    assert_eq!(v["metadata"][0]["id"], id.as_str());
    let (code, _) = gw
        .call(reqwest::Method::GET, "/1.0/sessions?status=bogus", None)
        .await;
    assert_eq!(code, 400);
    let (code, _) = gw
        .call(reqwest::Method::GET, "/1.0/sessions?limit=-1", None)
        .await;
    assert_eq!(code, 400);

    // DELETE -> terminated; the next heartbeat tells the edge to close it.
    let (code, v) = gw
        .call(
            reqwest::Method::DELETE,
            &format!("/1.0/sessions/{id}"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["metadata"]["status"], "terminated");
    let (_, r) = gw.register(&rec).await;
    assert_eq!(r["metadata"]["terminate_sessions"], json!([id]));

    // Ephemeral sessions disappear once terminated (instance gone).
    let (_, v) = gw.create(json!({"app": "g", "ephemeral": true})).await;
    let eph = v["metadata"]["id"].as_str().expect("id").to_owned();
    rec["sessions"] = json!([{"id": eph, "publisher": true, "viewers": 0}]);
    gw.register(&rec).await;
    rec["sessions"] = json!([]);
    gw.register(&rec).await;
    let (code, _) = gw
        .call(reqwest::Method::GET, &format!("/1.0/sessions/{eph}"), None)
        .await;
    assert_eq!(code, 404);

    // Clean deregistration: sessions go to error at once.
    let r = gw
        .http
        .delete(format!("{}/1.0/nodes/paris", gw.base))
        .bearer_auth(NODE_KEY)
        .send()
        .await
        .expect("deregister");
    assert_eq!(envelope(r).await.0, 200);
    let (_, v) = gw
        .call(
            reqwest::Method::GET,
            &format!("/1.0/sessions/{closed}"),
            None,
        )
        .await;
    assert_eq!(v["metadata"]["status"], "error");
    assert!(gw.status().await["nodes"].as_array().expect("n").is_empty());
}

#[tokio::test]
async fn bad_input_gets_error_envelopes() {
    let gw = start("instance_grace_secs = 0");
    register_three(&gw).await;
    let url = format!("{}/1.0/sessions", gw.base);
    let send =
        |rb: reqwest::RequestBuilder| async move { envelope(rb.send().await.expect("send")).await };

    // Malformed JSON, wrong shapes.
    for (body, want) in [
        ("{not json", "malformed JSON"),
        ("", "malformed JSON"),
        ("[1,2]", "JSON object"),
        ("{\"app\": 5}", "invalid request"),
        (
            "{\"app\": \"g\", \"location\": {\"lat\": 100, \"lon\": 0}}",
            "location.lat",
        ),
        ("{\"region\": \"eu-west\"}", "app"),
    ] {
        let (code, v) = send(
            gw.http
                .post(&url)
                .bearer_auth(API)
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(code, 400, "{body}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(want)),
            "{body}: {v}"
        );
    }

    // Oversized body.
    let big = format!(
        "{{\"app\":\"g\",\"extra_data\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let (code, v) = send(gw.http.post(&url).bearer_auth(API).body(big)).await;
    assert_eq!(code, 413, "{v}");

    // Unknown session, unknown route, wrong method.
    let (code, _) = gw
        .call(
            reqwest::Method::GET,
            "/1.0/sessions/0123456789abcdef0123",
            None,
        )
        .await;
    assert_eq!(code, 404);
    let (code, _) = gw
        .call(reqwest::Method::DELETE, "/1.0/sessions/nope", None)
        .await;
    assert_eq!(code, 404);
    let (code, _) = gw
        .call(reqwest::Method::POST, "/1.0/sessions/nope/join", None)
        .await;
    assert_eq!(code, 404);
    let (code, _) = gw.call(reqwest::Method::GET, "/nope", None).await;
    assert_eq!(code, 404);
    let (code, _) = gw.call(reqwest::Method::PUT, "/1.0/status", None).await;
    assert_eq!(code, 405);

    // Missing / wrong API token; the three accepted forms.
    let (code, v) = send(gw.http.get(format!("{}/1.0/status", gw.base))).await;
    assert_eq!(
        (code, v["error"].as_str()),
        (401, Some("missing API token"))
    );
    let (code, _) = send(
        gw.http
            .get(format!("{}/1.0/status", gw.base))
            .bearer_auth("wrong-token-0123456789"),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = send(
        gw.http
            .get(format!("{}/1.0/status", gw.base))
            .bearer_auth(NODE_KEY),
    )
    .await;
    assert_eq!(code, 401, "a node key is not an API token");
    let (code, _) = send(
        gw.http
            .get(format!("{}/1.0/status", gw.base))
            .header("authorization", format!("macaroon root={API}")),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = send(
        gw.http
            .get(format!("{}/1.0/status?api_token={API}", gw.base)),
    )
    .await;
    assert_eq!(code, 200);
    // Auth is checked before the body is parsed.
    let (code, _) = send(gw.http.post(&url).body("{not json")).await;
    assert_eq!(code, 401);

    // Node registration: wrong key, API token instead of node key, bad record.
    let rec = node("x", "eu-west", 0.0, 0.0, 0, 1);
    let reg = format!("{}/1.0/nodes/register", gw.base);
    let (code, _) = send(gw.http.post(&reg).json(&rec)).await;
    assert_eq!(code, 401);
    let (code, _) = send(gw.http.post(&reg).bearer_auth(API).json(&rec)).await;
    assert_eq!(code, 401);
    let mut bad = rec.clone();
    bad["http_url"] = json!("javascript:alert(1)");
    let (code, _) = send(gw.http.post(&reg).bearer_auth(NODE_KEY).json(&bad)).await;
    assert_eq!(code, 400);
    let mut bad = rec;
    bad["capacity"] = json!("lots");
    let (code, _) = send(gw.http.post(&reg).bearer_auth(NODE_KEY).json(&bad)).await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn tls_listener_serves_https() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let tmp = std::env::temp_dir().join(format!("edgerelay-gw-tls-{}", rand_suffix()));
    std::fs::create_dir_all(&tmp).expect("dir");
    let (cert, key) = (tmp.join("c.pem"), tmp.join("k.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let gw = start(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    assert!(gw.base.starts_with("https://127.0.0.1:"), "{}", gw.base);
    let base = gw.base.replace("127.0.0.1", "localhost");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).expect("ca"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let (code, v) = envelope(
        client
            .get(format!("{base}/1.0/status"))
            .bearer_auth(API)
            .send()
            .await
            .expect("https request"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // Plain HTTP on the TLS port does not get an answer.
    let plain = gw.base.replace("https://", "http://");
    assert!(gw
        .http
        .get(format!("{plain}/1.0/status"))
        .send()
        .await
        .is_err());
    let _ = std::fs::remove_dir_all(&tmp);
}
