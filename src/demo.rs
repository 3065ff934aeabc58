//! The one-command demo: edge + publisher + viewer page in one process.

/// Arguments of `edgerelay demo`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DemoArgs {
    /// Run headless in-process viewers and exit 0 only if each received video.
    #[arg(long)]
    pub check: bool,
    /// Number of in-process viewers with --check.
    #[arg(long, default_value_t = 3)]
    pub viewers: usize,
    /// Duration of the --check run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo not implemented yet")
}
