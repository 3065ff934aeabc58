//! The edge service: HTTP signalling (tokio/axum), the media thread (SFU core),
//! metrics, and draining on SIGTERM.

pub mod auth;
pub mod batch_io;
pub mod http;
pub mod media;
pub mod metrics;
pub mod register;
pub mod relay_send;
pub mod span;
pub mod turn;
pub mod ws;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgerelay_sfu::SfuConfig;
use tracing::info;

use crate::config::EdgeConfig;

/// Arguments of `edgerelay edge`; flags override the config file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EdgeArgs {
    /// Path to edge.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// HTTP listen address (overrides http.listen).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// UDP media listen address (overrides media.listen).
    #[arg(long)]
    pub media_listen: Option<SocketAddr>,
    /// Public IP for ICE candidates (repeatable; overrides media.public_ips).
    #[arg(long)]
    pub public_ip: Vec<IpAddr>,
    /// Publisher bearer token (repeatable; overrides auth.publisher_tokens).
    #[arg(long)]
    pub publisher_token: Vec<String>,
    /// Viewer bearer token (repeatable; overrides auth.viewer_tokens).
    #[arg(long)]
    pub viewer_token: Vec<String>,
    /// Media threads, one UDP port each (overrides media.threads; 0 = one per CPU).
    #[arg(long)]
    pub media_threads: Option<usize>,
    /// Viewers on a room's own thread before it spans threads (overrides
    /// media.span_viewers; 0 = never).
    #[arg(long)]
    pub span_viewers: Option<usize>,
    /// Microseconds a room holds a video frame's packets waiting for its last one
    /// (overrides media.gather_us; 0 = never hold).
    #[arg(long)]
    pub gather_us: Option<u64>,
    /// Node id (overrides node.id).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Region (overrides node.region).
    #[arg(long)]
    pub region: Option<String>,
    /// Direct send path on or off (overrides sfu.direct_send).
    #[arg(long, env = "EDGERELAY_DIRECT_SEND")]
    pub direct_send: Option<bool>,
}

impl EdgeArgs {
    /// Loads the file (if any) and applies the flags.
    pub fn resolve(&self) -> anyhow::Result<EdgeConfig> {
        let mut cfg = match &self.config {
            Some(p) => EdgeConfig::load(p)?,
            None => EdgeConfig::default(),
        };
        if let Some(a) = self.http_listen {
            cfg.http.listen = a;
        }
        if let Some(a) = self.media_listen {
            cfg.media.listen = a;
        }
        if !self.public_ip.is_empty() {
            cfg.media.public_ips = self.public_ip.clone();
        }
        if !self.publisher_token.is_empty() {
            cfg.auth.publisher_tokens = self.publisher_token.clone();
        }
        if !self.viewer_token.is_empty() {
            cfg.auth.viewer_tokens = self.viewer_token.clone();
        }
        if let Some(n) = self.media_threads {
            cfg.media.threads = n;
        }
        if let Some(us) = self.gather_us {
            cfg.media.gather_us = us;
        }
        if let Some(n) = self.span_viewers {
            cfg.media.span_viewers = n;
        }
        if let Some(id) = &self.node_id {
            cfg.node.id = id.clone();
        }
        if let Some(r) = &self.region {
            cfg.node.region = r.clone();
        }
        if let Some(d) = self.direct_send {
            cfg.sfu.direct_send = d;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A running edge.
pub struct Edge {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound media address.
    pub media_addr: SocketAddr,
    /// Shared handler state.
    pub state: Arc<http::AppState>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Registration with the gateway (`[gateway] url`).
    registration: Option<register::Registration>,
}

impl Edge {
    /// Base URL of the HTTP API.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Stops taking new sessions; waits until viewers are gone or `timeout` passes.
    pub async fn drain(&self, timeout: Duration) {
        self.state.draining.store(true, Ordering::Relaxed);
        if let Some(r) = &self.registration {
            r.beat_now().await;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let peers = self.state.media.shared.peers.load(Ordering::Relaxed);
            if peers == 0 || tokio::time::Instant::now() >= deadline {
                info!(remaining = peers, "drain finished");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Tells the gateway (if any) that this node is leaving.
    pub async fn leave_gateway(&mut self) {
        if let Some(r) = self.registration.take() {
            r.deregister().await;
        }
    }

    /// Stops the HTTP server, the media thread and TURN.
    pub fn shutdown(self) {
        self.server.abort();
        self.state.media.stop();
        if let Some(t) = &self.state.turn {
            t.stop();
        }
    }

    /// The TURN URLs this edge advertises (empty without TURN).
    pub fn turn_urls(&self) -> Vec<String> {
        self.state
            .turn
            .as_ref()
            .map(|t| t.urls().to_vec())
            .unwrap_or_default()
    }
}

/// Starts the media thread and the HTTP server.
pub async fn start(cfg: &EdgeConfig) -> anyhow::Result<Edge> {
    let sfu_cfg = SfuConfig {
        keyframe_throttle: Duration::from_millis(cfg.sfu.keyframe_throttle_ms),
        max_viewers_per_room: cfg.sfu.max_viewers_per_room,
        bwe: cfg.sfu.bwe,
        direct_send: cfg.sfu.direct_send,
        bwe_initial_bps: cfg.sfu.bwe_initial_kbps * 1000,
        rtx_cache_age: Duration::from_millis(cfg.sfu.nack_history_ms),
        // Not with one system call per datagram (the benchmark baseline).
        gather: if cfg.media.batch_io {
            Duration::from_micros(cfg.media.gather_us)
        } else {
            Duration::ZERO
        },
        ..SfuConfig::default()
    };
    let sockets = media::bind_shards(cfg.media.listen, cfg.shard_count())?;
    let shard_candidates: Vec<Vec<std::net::SocketAddr>> = sockets
        .iter()
        .map(|ms| cfg.candidates(ms.local_addr))
        .collect();
    let all_candidates: Vec<std::net::SocketAddr> =
        shard_candidates.iter().flatten().copied().collect();
    let (turn, mut relayed): (_, Vec<_>) = if cfg.turn.enabled {
        let (router, rxs) = turn::ShardedHandoff::new(
            sockets
                .iter()
                .zip(&shard_candidates)
                .map(|(ms, c)| (c.clone(), ms.waker.clone()))
                .collect(),
        );
        let t = Arc::new(turn::EdgeTurn::start(&cfg.turn, &all_candidates, router)?);
        (Some(t), rxs.into_iter().map(Some).collect())
    } else {
        (None, sockets.iter().map(|_| None).collect())
    };
    let specs = sockets
        .into_iter()
        .zip(shard_candidates)
        .zip(relayed.iter_mut())
        .map(|((socket, candidates), rx)| media::ShardSpec {
            socket,
            cfg: SfuConfig {
                candidates,
                ..sfu_cfg.clone()
            },
            relayed: rx.take(),
        })
        .collect();
    let turn_link = turn.as_ref().map(|t| media::TurnSpec {
        handle: t.handle.clone(),
        media_sends: cfg.turn.media_sends,
    });
    let span = media::SpanPolicy {
        viewers: cfg.media.span_viewers,
        max_viewers_per_room: sfu_cfg.max_viewers_per_room,
    };
    let media = media::spawn(specs, turn_link, &cfg.media, span)?;
    let media_addr = media.local_addr;
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot bind {}", cfg.http.listen))?;
    let http_addr = listener.local_addr()?;
    let state = Arc::new(http::AppState {
        media,
        publisher_tokens: cfg.auth.publisher_tokens.clone(),
        viewer_tokens: cfg.auth.viewer_tokens.clone(),
        metrics: metrics::Metrics::install(cfg.http.max_body_bytes)?,
        turn: turn.clone(),
        draining: Default::default(),
        web_root: cfg.http.web_root.clone(),
        token_keys: cfg.auth.token_keys.clone(),
        sessions: Default::default(),
    });
    let app = http::router(state.clone(), cfg.http.max_body_bytes);
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await?;
        Ok(())
    });
    info!(http = %http_addr, media = %media_addr, node = %cfg.node.id, "edge started");
    let registration = register::start(cfg, http_addr, state.clone())?;
    Ok(Edge {
        http_addr,
        media_addr,
        state,
        server,
        registration,
    })
}

/// Runs an edge until SIGINT/SIGTERM, then drains.
pub async fn run(args: EdgeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let mut edge = start(&cfg).await?;
    {
        let mut out = std::io::stdout().lock();
        let turn: Vec<String> = edge
            .turn_urls()
            .iter()
            .map(|u| format!(" turn={u}"))
            .collect();
        let shards = edge.state.media.local_addrs();
        let shards = if shards.len() > 1 {
            let list: Vec<String> = shards.iter().map(|a| a.to_string()).collect();
            format!(" media_shards={}", list.join(","))
        } else {
            String::new()
        };
        writeln!(
            out,
            "EDGERELAY_READY http={} media={}{}{}",
            edge.base_url(),
            edge.media_addr,
            shards,
            turn.concat()
        )?;
        out.flush()?;
    }
    shutdown_signal().await;
    info!(
        timeout_secs = cfg.drain.timeout_secs,
        "signal received: draining"
    );
    edge.drain(cfg.drain_timeout()).await;
    edge.leave_gateway().await;
    edge.shutdown();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
