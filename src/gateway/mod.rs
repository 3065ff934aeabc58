//! Central gateway: sessions API, edge registry, routing, tokens.

/// Arguments of `edgerelay gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Path to gateway.toml.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the gateway until interrupted.
pub async fn run(_args: GatewayArgs) -> anyhow::Result<()> {
    anyhow::bail!("gateway not implemented yet")
}
