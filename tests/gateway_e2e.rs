//! Gateway + three real edges (`edgerelay gateway` and `edgerelay edge` binaries, all on
//! 127.0.0.1 with ephemeral ports): edges register with their regions and coordinates,
//! sessions land on the right edge, tokens are checked by the edges, the WebSocket
//! signalling hands out an offer, a killed edge disappears within 6 s and its sessions go
//! to `error`, and a session deleted at the gateway is closed on its edge.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;

const API: &str = "e2e-api-token-0123456789";
const NODE_KEY: &str = "e2e-node-key-0123456789";
const TOKEN_KEY: &str = "e2e-token-key-0123456789";
const PUB_STATIC: &str = "e2e-static-publisher";

/// A child process killed on drop, with its temp dir.
struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "edgerelay-e2e-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Spawns `edgerelay <args>` and waits (30 s) for a stdout line starting with `ready`,
/// returning the value of its `http=` field.
fn spawn_ready(args: &[&str], config: &PathBuf, ready: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgerelay"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn edgerelay");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&ready) {
                let http = line
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix("http="))
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(http);
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("READY line within 30 s");
    assert!(base.starts_with("http://"), "{base}");
    Proc { child, base }
}

fn start_gateway() -> Proc {
    let dir = temp_dir("gw");
    let cfg = format!(
        r#"
listen = "127.0.0.1:0"
node_keys = ["{NODE_KEY}"]
token_keys = ["{TOKEN_KEY}"]
turn_secrets = ["e2e-turn-secret-0123456789"]
heartbeat_interval_ms = 500
heartbeat_timeout_ms = 6000
[[accounts]]
name = "ops"
token = "{API}"
admin = true
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
    std::fs::write(&path, cfg).expect("write gateway.toml");
    spawn_ready(&["gateway"], &path, "GATEWAY_READY")
}

fn start_edge(gateway: &str, id: &str, region: &str, lat: f64, lon: f64, max_viewers: u32) -> Proc {
    let dir = temp_dir(id);
    let cfg = format!(
        r#"
[node]
id = "{id}"
region = "{region}"
[http]
listen = "127.0.0.1:0"
[media]
listen = "127.0.0.1:0"
[auth]
publisher_tokens = ["{PUB_STATIC}"]
token_keys = ["{TOKEN_KEY}"]
[gateway]
url = "{gateway}"
node_key = "{NODE_KEY}"
lat = {lat}
lon = {lon}
max_viewers = {max_viewers}
heartbeat_interval_ms = 500
ice_urls = ["stun:127.0.0.1:3478"]
"#
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, cfg).expect("write edge.toml");
    spawn_ready(&["edge"], &path, "EDGERELAY_READY")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn api(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut rb = client().request(method, url).bearer_auth(API);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("gateway request");
    let code = r.status().as_u16();
    let v: Value = r.json().await.expect("JSON envelope");
    (code, v)
}

async fn status(gw: &str) -> Value {
    let (code, v) = api(reqwest::Method::GET, format!("{gw}/1.0/status"), None).await;
    assert_eq!(code, 200, "{v}");
    v["metadata"].clone()
}

fn node_ids(status: &Value) -> Vec<String> {
    let mut ids: Vec<String> = status["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

async fn create(gw: &str, body: Value) -> Value {
    let (code, v) = api(
        reqwest::Method::POST,
        format!("{gw}/1.0/sessions"),
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{v}");
    v["metadata"].clone()
}

async fn session(gw: &str, id: &str) -> Value {
    let (code, v) = api(
        reqwest::Method::GET,
        format!("{gw}/1.0/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    v["metadata"].clone()
}

/// Signs a token in the documented format (docs/PROTOCOL.md section 2).
fn sign(key: &str, session: &str, role: &str, exp: u64) -> String {
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"s": session, "r": role, "e": exp, "j": "e2e"})
            .to_string()
            .as_bytes(),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac key");
    mac.update(payload.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{payload}.{tag}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// WHIP POST with a token; returns (status, body).
async fn whip(edge: &str, room: &str, token: &str) -> (u16, String) {
    let r = client()
        .post(format!("{edge}/whip/{room}"))
        .bearer_auth(token)
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .expect("whip");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket; Err(status) if the edge refused the upgrade.
async fn ws_open(url: &str) -> Result<Ws, u16> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket {url}: {e}"),
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("ws send");
}

/// Next JSON message within `secs`, or None if the socket closed.
async fn ws_recv(ws: &mut Ws, secs: u64) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("ws message in time");
        match m {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).expect("JSON")),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

fn ws_url_of(edge: &str, id: &str, side: &str, token: &str) -> String {
    format!(
        "{}/1.0/session/{id}/sockets/{side}?token={token}",
        edge.replacen("http://", "ws://", 1)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_to_real_edges_and_edges_check_tokens() {
    let gw = start_gateway();
    let g = gw.base.clone();
    let paris = start_edge(&g, "edge-paris", "eu-west", 48.85, 2.35, 100);
    // Full (takes no viewers), in the same region and place as Paris: never chosen.
    let _full = start_edge(&g, "edge-full", "eu-west", 48.85, 2.35, 0);
    let nyc = start_edge(&g, "edge-nyc", "us-east", 40.71, -74.0, 100);
    let sing = start_edge(&g, "edge-sing", "ap-southeast", 1.35, 103.82, 100);

    // All three register (first beat is immediate).
    let t0 = Instant::now();
    loop {
        let s = status(&g).await;
        if node_ids(&s) == ["edge-full", "edge-nyc", "edge-paris", "edge-sing"] {
            let n = s["nodes"].as_array().expect("nodes");
            let paris_rec = n.iter().find(|n| n["id"] == "edge-paris").expect("paris");
            assert_eq!(paris_rec["region"], "eu-west");
            assert_eq!(paris_rec["lat"], 48.85);
            assert_eq!(paris_rec["http_url"], paris.base.as_str());
            assert_eq!(paris_rec["capacity"]["max_viewers"], 100);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "edges not registered: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Routing: by region, by client location, by region coordinates.
    let s_eu = create(&g, json!({"app": "game", "region": "eu-west"})).await;
    assert_eq!(s_eu["node"], "edge-paris", "{s_eu}");
    assert_eq!(s_eu["edge_url"], paris.base.as_str());
    for _ in 0..3 {
        let s = create(&g, json!({"app": "game", "region": "eu-west"})).await;
        assert_eq!(s["node"], "edge-paris", "the full edge is skipped: {s}");
    }
    let s_us = create(&g, json!({"app": "game", "region": "us-east"})).await;
    assert_eq!(s_us["node"], "edge-nyc", "{s_us}");
    let s_tokyo = create(
        &g,
        json!({"app": "game", "location": {"lat": 35.68, "lon": 139.69}}),
    )
    .await;
    assert_eq!(s_tokyo["node"], "edge-sing", "nearest to Tokyo: {s_tokyo}");
    let s_london = create(
        &g,
        json!({"app": "game", "location": {"lat": 51.5, "lon": -0.12}}),
    )
    .await;
    assert_eq!(
        s_london["node"], "edge-paris",
        "nearest to London: {s_london}"
    );
    let s_boston = create(
        &g,
        json!({"app": "game", "location": {"lat": 42.36, "lon": -71.06}}),
    )
    .await;
    assert_eq!(
        s_boston["node"], "edge-nyc",
        "nearest to Boston: {s_boston}"
    );
    let url = s_eu["url"].as_str().expect("url");
    let ws_base = paris.base.replacen("http://", "ws://", 1);
    assert!(
        url.starts_with(&format!(
            "{ws_base}/1.0/session/{}/sockets/slave?token=",
            s_eu["id"].as_str().expect("id")
        )),
        "{url}"
    );

    // Tokens at the edge (WHIP).
    let id = s_eu["id"].as_str().expect("id").to_owned();
    let pub_tok = s_eu["publisher"]["token"]
        .as_str()
        .expect("publisher token");
    let ctrl_tok = s_eu["token"].as_str().expect("controller token").to_owned();
    let (code, v) = api(
        reqwest::Method::POST,
        format!("{g}/1.0/sessions/{id}/join"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let spect_tok = v["metadata"]["token"]
        .as_str()
        .expect("spectator")
        .to_owned();
    assert_eq!(v["metadata"]["role"], "spectator");
    let forged = sign("not-the-gateway-key-0000", &id, "publisher", now() + 600);
    let expired = sign(TOKEN_KEY, &id, "publisher", now() - 1);
    let other = s_london["publisher"]["token"].as_str().expect("other pub");
    let p = &paris.base;
    let (c, body) = whip(p, &id, &forged).await;
    assert_eq!((c, body.trim()), (401, "bad token signature"));
    let (c, body) = whip(p, &id, &expired).await;
    assert_eq!((c, body.trim()), (401, "token expired"));
    let (c, body) = whip(p, &id, "garbage").await;
    assert_eq!((c, body.trim()), (401, "malformed token"));
    let (c, body) = whip(p, &id, other).await;
    assert_eq!((c, body.trim()), (403, "token is for another session"));
    let (c, body) = whip(p, &id, &spect_tok).await;
    assert_eq!((c, body.trim()), (403, "token role not allowed"));
    let (c, body) = whip(p, &id, &ctrl_tok).await;
    assert_eq!((c, body.trim()), (403, "token role not allowed"));
    // A valid publisher token passes auth (the SDP itself is then refused as malformed).
    let (c, body) = whip(p, &id, pub_tok).await;
    assert_eq!(c, 400, "valid token, bad SDP: {body}");

    // Tokens at the edge (WebSocket, checked before the upgrade).
    let forged_ctrl = sign("not-the-gateway-key-0000", &id, "controller", now() + 600);
    let expired_ctrl = sign(TOKEN_KEY, &id, "controller", now() - 5);
    let (payload, _) = ctrl_tok.split_once('.').expect("token");
    let (_, spect_sig) = spect_tok.split_once('.').expect("token");
    let spect_as_ctrl = format!("{payload}.{spect_sig}");
    for (tok, want, what) in [
        (forged_ctrl.as_str(), 401, "forged"),
        (expired_ctrl.as_str(), 401, "expired"),
        (
            spect_as_ctrl.as_str(),
            401,
            "spectator signature on a controller payload",
        ),
        (pub_tok, 403, "publisher token on the viewer socket"),
        (
            s_london["token"].as_str().expect("tok"),
            403,
            "other session's controller token",
        ),
    ] {
        let r = ws_open(&ws_url_of(p, &id, "slave", tok)).await;
        assert_eq!(r.err(), Some(want), "{what}");
    }
    assert_eq!(
        ws_open(&ws_url_of(p, &id, "master", &spect_tok))
            .await
            .err(),
        Some(403),
        "spectator token on the instance socket"
    );
    // Plain GET with a valid token but no upgrade: 426.
    let r = client()
        .get(ws_url_of(p, &id, "slave", &ctrl_tok).replacen("ws://", "http://", 1))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 426);

    // The instance publishes with its session token (the real publisher binary).
    let publisher = Command::new(env!("CARGO_BIN_EXE_edgerelay"))
        .args([
            "publish",
            "--whip",
            s_eu["publisher"]["whip_url"].as_str().expect("whip_url"),
            "--token",
            pub_tok,
            "--width",
            "320",
            "--height",
            "240",
            "--fps",
            "15",
            "--bitrate-kbps",
            "300",
            "--seconds",
            "60",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn publisher");
    let _publisher = Proc {
        child: publisher,
        base: String::new(),
    };
    let t0 = Instant::now();
    loop {
        let s = session(&g, &id).await;
        if s["status"] == "active" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "session not active: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // WebSocket signalling with the controller token: discover, settings, offer.
    let mut ws = ws_open(url).await.expect("controller socket");
    ws_send(&mut ws, json!({"type": "discover"})).await;
    let d = ws_recv(&mut ws, 5).await.expect("resp:discover");
    assert_eq!(d["type"], "resp:discover", "{d}");
    assert_eq!(d["max_api_version"], 2);
    assert_eq!(d["role"], "controller");
    assert_eq!(d["session"], id.as_str());
    ws_send(
        &mut ws,
        json!({"type": "settings", "api_version": 2, "data_channels": ["control"], "enable_video": true, "enable_audio": true}),
    )
    .await;
    let o = ws_recv(&mut ws, 10).await.expect("offer");
    assert_eq!(o["type"], "offer", "{o}");
    let sdp = String::from_utf8(
        STANDARD
            .decode(o["sdp"].as_str().expect("sdp"))
            .expect("base64"),
    )
    .expect("utf8");
    assert!(sdp.contains("m=video"), "{sdp}");
    assert!(sdp.contains("m=application"), "{sdp}");
    assert!(
        sdp.contains("a=candidate:"),
        "host candidate in the offer: {sdp}"
    );
    // A bad candidate is an error (then close).
    ws_send(
        &mut ws,
        json!({"type": "candidate", "candidate": "!!!", "sdpMid": "0", "sdpMLineIndex": 0}),
    )
    .await;
    let e = ws_recv(&mut ws, 5).await.expect("error");
    assert_eq!(e["type"], "error", "{e}");
    assert!(ws_recv(&mut ws, 5).await.is_none(), "closed after an error");

    // A spectator socket says so; messages out of order are refused.
    let mut ws2 = ws_open(&ws_url_of(p, &id, "slave", &spect_tok))
        .await
        .expect("spectator socket");
    ws_send(&mut ws2, json!({"type": "discover"})).await;
    let d = ws_recv(&mut ws2, 5).await.expect("resp:discover");
    assert_eq!(d["role"], "spectator", "{d}");
    ws_send(&mut ws2, json!({"type": "answer", "sdp": ""})).await;
    let e = ws_recv(&mut ws2, 5).await.expect("error");
    assert_eq!(e["type"], "error", "{e}");
    assert!(
        e["message"].as_str().unwrap_or("").contains("settings"),
        "{e}"
    );

    // Malformed JSON -> error.
    let mut ws3 = ws_open(&ws_url_of(p, &id, "slave", &spect_tok))
        .await
        .expect("socket");
    ws3.send(Message::Text("{not json".into()))
        .await
        .expect("send");
    let e = ws_recv(&mut ws3, 5).await.expect("error");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("malformed JSON"),
        "{e}"
    );

    // A live spectator socket, then DELETE the session at the gateway: the edge is told in
    // its next heartbeat and closes the socket with an error.
    let mut live = ws_open(&ws_url_of(p, &id, "slave", &spect_tok))
        .await
        .expect("socket");
    ws_send(&mut live, json!({"type": "discover"})).await;
    ws_recv(&mut live, 5).await.expect("resp:discover");
    ws_send(&mut live, json!({"type": "settings", "api_version": 2})).await;
    let o = ws_recv(&mut live, 10).await.expect("offer");
    assert_eq!(o["type"], "offer");
    let (code, v) = api(
        reqwest::Method::DELETE,
        format!("{g}/1.0/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let e = ws_recv(&mut live, 10).await.expect("terminated");
    assert_eq!(e, json!({"type": "error", "message": "session terminated"}));

    // Kill an edge: gone from /1.0/status within 6 s, its sessions in `error`.
    let ny_id = s_us["id"].as_str().expect("id").to_owned();
    let boston_id = s_boston["id"].as_str().expect("id").to_owned();
    drop(nyc);
    let killed = Instant::now();
    loop {
        let s = status(&g).await;
        if !node_ids(&s).contains(&"edge-nyc".to_string()) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(6500),
            "edge-nyc still listed {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed.elapsed() <= Duration::from_secs(7),
        "{:?}",
        killed.elapsed()
    );
    for sid in [&ny_id, &boston_id] {
        let s = session(&g, sid).await;
        assert_eq!(s["status"], "error", "{s}");
        assert_eq!(s["status_message"], "edge node lost", "{s}");
    }
    assert_eq!(
        session(&g, s_tokyo["id"].as_str().expect("id")).await["status"],
        "created"
    );
    // New sessions avoid the lost node: us-east has no edge now, the nearest one wins.
    let s = create(
        &g,
        json!({"app": "game", "location": {"lat": 40.71, "lon": -74.0}}),
    )
    .await;
    assert_ne!(s["node"], "edge-nyc");

    // SIGTERM on an edge: draining heartbeat, then deregistration (sessions `error` at once).
    let sing_session = s_tokyo["id"].as_str().expect("id").to_owned();
    let mut sing = sing;
    let pid = sing.child.id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let t0 = Instant::now();
    loop {
        let s = session(&g, &sing_session).await;
        if s["status"] == "error" {
            assert_eq!(s["status_message"], "edge node shut down", "{s}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "SIGTERM did not deregister: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sing.child.wait();
    drop(paris);
}
