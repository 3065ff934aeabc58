//! Central gateway: sessions API, edge registry, routing, tokens.
//!
//! Layout: [`config`] (gateway.toml), [`proto`] (wire types shared with the edge),
//! [`core`] (registry, routing, sessions: plain structs, no I/O), [`api`] (the axum layer),
//! [`token`] (session tokens, also used by the edge) and [`edge_register`] (the edge's
//! registration client). The HTTP API is documented in docs/PROTOCOL.md.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context as _;

pub mod api;
pub mod config;
pub mod core;
pub mod proto;
mod tls;

// These two live at src/token.rs and src/edge_register.rs (shared with the edge) but are
// compiled here so that src/main.rs needs no change. Parts are used only by the edge.
#[allow(dead_code)]
#[path = "../edge_register.rs"]
pub mod edge_register;
#[allow(dead_code)]
#[path = "../token.rs"]
pub mod token;

pub use api::router;
#[allow(unused_imports)]
pub use api::routes;
pub use config::GatewayConfig;

/// Arguments of `edgerelay gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Path to gateway.toml.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the gateway until interrupted.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .unwrap_or_else(|| std::path::PathBuf::from("config/gateway.toml"));
    let cfg = GatewayConfig::load(&path)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", cfg.listen))?;
    serve(cfg, listener).await
}

/// Serves the gateway on `listener` until SIGINT/SIGTERM (for the demo and tests in-process).
///
/// Prints `GATEWAY_READY http=<base url>` on stdout once bound.
pub async fn serve(cfg: GatewayConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    cfg.validate()?;
    let addr = listener.local_addr()?;
    let cfg = Arc::new(cfg);
    let app = router(cfg.clone());
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "gateway listening");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "GATEWAY_READY http={scheme}://{addr}");
        let _ = out.flush();
    }
    match &cfg.tls {
        Some(t) => {
            let acceptor = tls::acceptor(&t.cert, &t.key)?;
            axum::serve(tls::TlsListener::new(listener, acceptor), app)
                .with_graceful_shutdown(shutdown_signal())
                .await?;
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    crate::edge::shutdown_signal().await;
    tracing::info!("gateway shutting down");
}
