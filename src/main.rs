//! edgerelay: edge media relay (WebRTC SFU + STUN/TURN + session gateway).
//!
//! `cargo run --release` with no arguments runs the demo.

use clap::{Parser, Subcommand};

mod config;
mod demo;
mod edge;
mod gateway;
mod loadtest;
mod logging;
mod publisher;
mod whep_client;

/// Command line of the `edgerelay` binary.
#[derive(Parser, Debug)]
#[command(
    name = "edgerelay",
    version,
    about = "Edge media relay: WebRTC SFU with built-in STUN/TURN"
)]
struct Cli {
    /// Log format: `human` (default) or `json`.
    #[arg(
        long,
        global = true,
        default_value = "human",
        env = "EDGERELAY_LOG_FORMAT"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One process: edge + TURN + embedded gateway + synthetic publisher + viewer page.
    Demo(demo::DemoArgs),
    /// Run an edge node (SFU, TURN, signalling).
    Edge(edge::EdgeArgs),
    /// Publish a synthetic H.264 test pattern to a WHIP endpoint.
    Publish(publisher::PublishArgs),
    /// Run the central gateway.
    Gateway(gateway::GatewayArgs),
    /// Load generator: many lightweight viewers against a WHEP endpoint or Janus.
    Loadtest(loadtest::LoadtestArgs),
}

/// mimalloc instead of glibc's malloc: the media threads allocate and free a
/// datagram buffer per packet per viewer, which glibc serves from its bins
/// (`_int_malloc`/`unlink_chunk` were ~7 % of the server's CPU at 500 viewers);
/// mimalloc's per-thread free lists make that a few instructions.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli
            .command
            .unwrap_or(Command::Demo(demo::DemoArgs::default()))
        {
            Command::Demo(a) => demo::run(a).await,
            Command::Edge(a) => edge::run(a).await,
            Command::Publish(a) => publisher::run(a).await,
            Command::Gateway(a) => gateway::run(a).await,
            Command::Loadtest(a) => loadtest::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
