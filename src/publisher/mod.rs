//! Synthetic instance publisher: a moving H.264 test pattern sent over WHIP.

/// Arguments of `edgerelay publish`.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// WHIP endpoint, e.g. http://127.0.0.1:8080/whip/demo
    #[arg(long)]
    pub whip: String,
    /// Bearer token for the WHIP endpoint.
    #[arg(long)]
    pub token: Option<String>,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<u64>,
}

/// Runs the publisher until `seconds` elapse or the process is interrupted.
pub async fn run(_args: PublishArgs) -> anyhow::Result<()> {
    anyhow::bail!("publisher not implemented yet")
}
