//! The edge service: HTTP signalling, media thread, TURN, registration.

/// Arguments of `edgerelay edge`.
#[derive(clap::Args, Debug, Clone)]
pub struct EdgeArgs {
    /// Path to edge.toml.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the edge until interrupted.
pub async fn run(_args: EdgeArgs) -> anyhow::Result<()> {
    anyhow::bail!("edge not implemented yet")
}
