//! The one-command demo: an edge, the built-in synthetic publisher and the
//! viewer page in one process. `--check` adds headless viewers and exits 0
//! only if every one of them decoded video.

use std::time::Duration;

use anyhow::Context as _;
use rand::RngCore as _;
use tracing::info;

use crate::config::EdgeConfig;
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
    /// Room the built-in publisher publishes to.
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

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let pub_token = random_token("pub");
    let view_token = random_token("view");
    let mut cfg = EdgeConfig::default();
    cfg.http.listen = args.http_listen;
    cfg.media.listen = ([127, 0, 0, 1], 0).into();
    cfg.auth.publisher_tokens = vec![pub_token.clone()];
    cfg.auth.viewer_tokens = vec![view_token.clone()];
    cfg.node.id = "demo-edge".into();
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
    cfg.validate()?;
    let edge = match edge::start(&cfg).await {
        Ok(e) => e,
        Err(e) if args.http_listen.port() != 0 => {
            info!("{e:#}; using a free port instead");
            cfg.http.listen.set_port(0);
            edge::start(&cfg).await?
        }
        Err(e) => return Err(e),
    };
    let base = edge.base_url();
    let publisher = publisher::start(publisher::PublishArgs {
        whip: format!("{base}/whip/{}", args.room),
        token: Some(pub_token.clone()),
        seconds: None,
        fps: 30,
        bitrate_kbps: 2000,
        width: args.width,
        height: args.height,
        audio: true,
        keyframe_interval_ms: 2000,
        control_tick_ms: 1000,
    })
    .await
    .context("starting the built-in publisher")?;

    let page = format!("{base}/?room={}&token={view_token}", args.room);
    println!();
    println!("  edgerelay demo is running");
    println!("  viewer page:  {page}");
    println!("  WHEP:         POST {base}/whep/{}  (Authorization: Bearer {view_token})", args.room);
    println!("  WHIP:         POST {base}/whip/<room>  (Authorization: Bearer {pub_token})");
    println!("  metrics:      {base}/metrics");
    for u in edge.turn_urls() {
        println!("  TURN:         {u}");
    }
    println!();

    if !args.check {
        edge::shutdown_signal().await;
        let _ = publisher.stop().await;
        edge.drain(Duration::from_secs(2)).await;
        edge.shutdown();
        return Ok(());
    }

    // Headless check: N viewers watch for `seconds`, each must decode video.
    let url = format!("{base}/whep/{}", args.room);
    let mut handles = Vec::new();
    for _ in 0..args.viewers {
        let opts = whep_client::ViewOptions::new(url.clone(), Some(view_token.clone()));
        handles.push(whep_client::spawn(opts).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
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
    let _ = publisher.stop().await;
    edge.shutdown();
    if ok {
        println!("demo check passed: every viewer decoded video");
        Ok(())
    } else {
        anyhow::bail!("demo check failed: a viewer received no decodable video")
    }
}
