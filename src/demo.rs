//! The one-command demo: a gateway, an edge registered with it, the built-in
//! synthetic publisher and the viewer page in one process. The publisher gets its
//! WHIP token from a session created through the gateway API; the viewer page
//! follows the gateway flow (join or create a session, then the edge WebSocket).
//! `--check` adds headless viewers and exits 0 only if every one of them decoded
//! video and the gateway saw the session go active.

use std::time::Duration;

use anyhow::Context as _;
use rand::RngCore as _;
use tracing::info;

use crate::config::EdgeConfig;
use crate::gateway::config::{Account, GatewayConfig};
use crate::gateway::token::{self, Claims, Role};
use crate::{edge, publisher, whep_client};

/// Arguments of `edgerelay demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Run headless in-process viewers and exit 0 only if each received video.
    #[arg(long)]
    pub check: bool,
    /// Number of in-process viewers with --check.
    #[arg(long, default_value_t = 3)]
    pub viewers: usize,
    /// Duration of the --check run, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// HTTP address of the viewer page and API (falls back to a free port if taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: std::net::SocketAddr,
    /// App name of the demo's gateway session (the room is the session id).
    #[arg(long, default_value = "demo")]
    pub room: String,
    /// Publisher picture width.
    #[arg(long, default_value_t = 1280)]
    pub width: u32,
    /// Publisher picture height.
    #[arg(long, default_value_t = 720)]
    pub height: u32,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            check: false,
            viewers: 3,
            seconds: 10,
            http_listen: ([127, 0, 0, 1], 8080).into(),
            room: "demo".into(),
            width: 1280,
            height: 720,
        }
    }
}

fn random_token(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Writes a fresh self-signed certificate and key (PEM) for localhost to a temp dir.
pub fn self_signed_pair() -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let dir = std::env::temp_dir().join(format!("edgerelay-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    Ok((cert, key))
}

/// The in-process gateway of the demo.
struct DemoGateway {
    base: String,
    api_token: String,
    token_key: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl DemoGateway {
    /// Serves the gateway API (with permissive CORS, for the viewer page) on 127.0.0.1:0.
    async fn start(node_key: &str, turn_secret: &str) -> anyhow::Result<DemoGateway> {
        let api_token = random_token("api");
        let token_key = random_token("tokenkey");
        let cfg = GatewayConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            accounts: vec![Account {
                name: "demo".into(),
                token: api_token.clone(),
                admin: true,
            }],
            node_keys: vec![node_key.to_owned()],
            token_keys: vec![token_key.clone()],
            turn_secrets: vec![turn_secret.to_owned()],
            heartbeat_interval_ms: 1000,
            // Demo sessions live until the demo stops (page sessions ask for less).
            session_idle_timeout_secs: 7 * 24 * 3600,
            ..GatewayConfig::default()
        };
        cfg.validate().context("demo gateway config")?;
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = crate::gateway::router(std::sync::Arc::new(cfg)).layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        );
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("demo gateway stopped: {e}");
            }
        });
        Ok(DemoGateway {
            base,
            api_token,
            token_key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            server,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.api_token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await?;
        let code = r.status().as_u16();
        Ok((code, r.json().await?))
    }

    /// Creates a session once the edge has registered (retries for up to 15 s).
    async fn create_session(&self, app: &str) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        // The edge registers in the background: wait until the gateway lists it.
        while tokio::time::Instant::now() < deadline {
            let (code, v) = self.call(reqwest::Method::GET, "/1.0/status", None).await?;
            let listed = v["metadata"]["nodes"]
                .as_array()
                .is_some_and(|n| !n.is_empty());
            if code == 200 && listed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let (code, v) = self
                .call(
                    reqwest::Method::POST,
                    "/1.0/sessions",
                    Some(serde_json::json!({"app": app, "joinable": true})),
                )
                .await?;
            if code == 201 {
                return Ok(v["metadata"].clone());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("demo gateway refused the session: {code} {}", v["error"]);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A publisher token for `session` (what an instance manager hands an instance).
    fn publisher_token(&self, session: &str) -> String {
        let claims = Claims::new(session, Role::Publisher, token::now_unix(), 24 * 3600);
        token::sign(self.token_key.as_bytes(), &claims)
    }
}

fn small_publisher(whip: String, token: String, args: &DemoArgs) -> publisher::PublishArgs {
    publisher::PublishArgs {
        whip,
        token: Some(token),
        seconds: None,
        fps: 30,
        bitrate_kbps: 2000,
        width: args.width,
        height: args.height,
        audio: true,
        keyframe_interval_ms: 2000,
        control_tick_ms: 1000,
    }
}

/// Percent-encodes a query parameter value.
fn qs(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Most sessions the viewer page may create, each with its own synthetic instance.
const MAX_PAGE_SESSIONS: usize = 3;

/// A tiny instance manager: starts a built-in publisher for every session the viewer page
/// creates through the gateway, and stops it once the session has ended.
fn spawn_instance_manager(
    gw: std::sync::Arc<DemoGateway>,
    edge_base: String,
    known: String,
    args: DemoArgs,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running: std::collections::HashMap<String, publisher::PublisherHandle> =
            Default::default();
        let mut seen: std::collections::HashSet<String> = [known].into_iter().collect();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok((200, v)) = gw
                .call(reqwest::Method::GET, "/1.0/sessions?limit=1000", None)
                .await
            else {
                continue;
            };
            let list = v["metadata"].as_array().cloned().unwrap_or_default();
            for s in &list {
                let (Some(id), Some(status)) = (s["id"].as_str(), s["status"].as_str()) else {
                    continue;
                };
                let ended = status == "terminated" || status == "error";
                if ended {
                    if let Some(p) = running.remove(id) {
                        info!(session = id, "session ended: stopping its instance");
                        let _ = p.stop().await;
                    }
                    continue;
                }
                if status != "created" || seen.contains(id) || running.len() >= MAX_PAGE_SESSIONS {
                    continue;
                }
                seen.insert(id.to_owned());
                let whip = format!("{edge_base}/whip/{id}");
                let mut pa = small_publisher(whip, gw.publisher_token(id), &args);
                pa.width = pa.width.min(640);
                pa.height = pa.height.min(360);
                pa.bitrate_kbps = 800;
                match publisher::start(pa).await {
                    Ok(p) => {
                        info!(session = id, "new session: started a synthetic instance");
                        running.insert(id.to_owned(), p);
                    }
                    Err(e) => tracing::warn!(session = id, "cannot start an instance: {e:#}"),
                }
            }
        }
    })
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let pub_token = random_token("pub");
    let view_token = random_token("view");
    let node_key = random_token("nodekey");
    let turn_secret = random_token("turnsecret");
    let gw = std::sync::Arc::new(DemoGateway::start(&node_key, &turn_secret).await?);
    let mut cfg = EdgeConfig::default();
    cfg.http.listen = args.http_listen;
    cfg.media.listen = ([127, 0, 0, 1], 0).into();
    cfg.media.threads = 0; // one media thread per CPU
    cfg.auth.publisher_tokens = vec![pub_token.clone()];
    cfg.auth.viewer_tokens = vec![view_token.clone()];
    cfg.auth.token_keys = vec![gw.token_key.clone()];
    cfg.node.id = "demo-edge".into();
    cfg.node.region = "local".into();
    cfg.gateway.url = Some(gw.base.clone());
    cfg.gateway.node_key = node_key;
    cfg.gateway.lat = 48.85;
    cfg.gateway.lon = 2.35;
    cfg.gateway.heartbeat_interval_ms = 1000;
    // Built-in TURN on ephemeral loopback ports: UDP, TCP and TLS (self-signed).
    let (cert, key) = self_signed_pair().context("generating the demo TLS certificate")?;
    cfg.turn.enabled = true;
    cfg.turn.server.listen_udp = vec![([127, 0, 0, 1], 0).into()];
    cfg.turn.server.listen_tcp = vec![([127, 0, 0, 1], 0).into()];
    cfg.turn.server.listen_tls = vec![([127, 0, 0, 1], 0).into()];
    cfg.turn.server.tls_cert = Some(cert);
    cfg.turn.server.tls_key = Some(key);
    cfg.turn.server.relay_ip = Some([127, 0, 0, 1].into());
    cfg.turn.server.relay_port_min = 0;
    cfg.turn.server.relay_port_max = 0;
    cfg.turn.server.rest_secrets = vec![turn_secret];
    cfg.validate()?;
    let mut edge = match edge::start(&cfg).await {
        Ok(e) => e,
        Err(e) if args.http_listen.port() != 0 => {
            info!("{e:#}; using a free port instead");
            cfg.http.listen.set_port(0);
            edge::start(&cfg).await?
        }
        Err(e) => return Err(e),
    };
    // TURN has loaded the certificate and key; the files are not needed any more.
    if let Some(dir) = cfg.turn.server.tls_cert.as_ref().and_then(|c| c.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
    let base = edge.base_url();

    // The demo's session, created like an operator would; the instance publishes with
    // the session's publisher token.
    let session = gw.create_session(&args.room).await?;
    let sid = session["id"].as_str().unwrap_or_default().to_owned();
    let whip_url = session["publisher"]["whip_url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let session_pub_token = session["publisher"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let controller_url = session["url"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(
        !sid.is_empty() && !whip_url.is_empty() && !session_pub_token.is_empty(),
        "demo gateway returned an incomplete session: {session}"
    );
    let publisher = publisher::start(small_publisher(whip_url, session_pub_token, &args))
        .await
        .context("starting the built-in publisher")?;
    let manager = spawn_instance_manager(gw.clone(), base.clone(), sid.clone(), args.clone());

    let gwq = format!("gateway={}&api_token={}", qs(&gw.base), qs(&gw.api_token));
    println!();
    println!(
        "  edgerelay demo is running (gateway {} , session {sid})",
        gw.base
    );
    println!("  controller:   {base}/?ws={}", qs(&controller_url));
    println!("  spectators:   {base}/?{gwq}&session={sid}");
    println!("  new session:  {base}/?{gwq}   (starts its own synthetic instance)");
    println!(
        "  WHEP:         {base}/?mode=whep&room={sid}&token={view_token}   (POST {base}/whep/{sid}, Bearer {view_token})"
    );
    println!("  WHIP:         POST {base}/whip/<room>  (Authorization: Bearer {pub_token})");
    println!(
        "  gateway API:  {}/1.0/sessions  (Authorization: Bearer {})",
        gw.base, gw.api_token
    );
    println!("  metrics:      {base}/metrics");
    for u in edge.turn_urls() {
        println!("  TURN:         {u}");
    }
    println!();

    if !args.check {
        edge::shutdown_signal().await;
        manager.abort();
        let _ = publisher.stop().await;
        edge.drain(Duration::from_secs(2)).await;
        edge.leave_gateway().await;
        edge.shutdown();
        gw.server.abort();
        return Ok(());
    }

    // Headless check: N viewers watch the session's room for `seconds` over WHEP,
    // each must decode video; the gateway must have seen the session go active.
    let url = format!("{base}/whep/{sid}");
    let mut handles = Vec::new();
    for _ in 0..args.viewers {
        let opts = whep_client::ViewOptions::new(url.clone(), Some(view_token.clone()));
        handles.push(whep_client::spawn(opts).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (_, gs) = gw
        .call(reqwest::Method::GET, &format!("/1.0/sessions/{sid}"), None)
        .await?;
    let gs = &gs["metadata"];
    let mut ok = true;
    for (i, h) in handles.into_iter().enumerate() {
        let s = h.stop().await;
        let good = s.got_video(true);
        ok &= good;
        println!(
            "viewer {i}: role={} frames={} keyframes={} decoded={} first_frame_ms={} {}",
            s.role.as_deref().unwrap_or("?"),
            s.video_frames,
            s.keyframes,
            s.frames_decoded,
            s.time_to_first_frame
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| "-".into()),
            if good { "OK" } else { "NO VIDEO" }
        );
    }
    let ps = publisher.stats();
    println!(
        "publisher: frames={} keyframes={} keyframe_requests={}",
        ps.frames_sent, ps.keyframes_sent, ps.keyframe_requests
    );
    let active = gs["status"] == "active";
    println!(
        "gateway session {sid}: status={} viewers={} node={}",
        gs["status"], gs["viewers"], gs["node"]
    );
    manager.abort();
    let _ = publisher.stop().await;
    edge.leave_gateway().await;
    edge.shutdown();
    gw.server.abort();
    if !active {
        anyhow::bail!("demo check failed: the gateway did not see the session active");
    }
    if ok {
        println!("demo check passed: every viewer decoded video");
        Ok(())
    } else {
        anyhow::bail!("demo check failed: a viewer received no decodable video")
    }
}
