//! Load generator: a swarm of lightweight str0m viewers against a WHEP endpoint
//! (edgerelay or Janus), reporting join time, loss, delay and server CPU per packet.

/// Arguments of `edgerelay loadtest`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// WHEP endpoint, e.g. http://127.0.0.1:8080/whep/demo
    #[arg(long)]
    pub whep: Option<String>,
}

/// Runs the load test.
pub async fn run(_args: LoadtestArgs) -> anyhow::Result<()> {
    anyhow::bail!("loadtest not implemented yet")
}
