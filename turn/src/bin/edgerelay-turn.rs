//! Standalone edgerelay TURN server (for tests and benchmarks).
//!
//! Prints `TURN_READY udp=ADDR tcp=ADDR tls=ADDR` on stdout once bound
//! (`-` for a transport that is not enabled), then serves until killed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use edgerelay_turn::policy::Cidr;
use edgerelay_turn::{TurnConfig, TurnServer};

/// Command-line flags (a subset of `TurnConfig`; see docs/TURN.md).
#[derive(Parser, Debug)]
#[command(name = "edgerelay-turn", about = "edgerelay STUN/TURN server")]
struct Args {
    /// UDP listen address (repeatable).
    #[arg(long)]
    listen_udp: Vec<SocketAddr>,
    /// TCP listen address (repeatable).
    #[arg(long)]
    listen_tcp: Vec<SocketAddr>,
    /// TLS listen address (repeatable); needs --tls-cert and --tls-key.
    #[arg(long)]
    listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Realm.
    #[arg(long, default_value = "edgerelay")]
    realm: String,
    /// Static user `name:password` (repeatable).
    #[arg(long)]
    user: Vec<String>,
    /// TURN REST shared secret (repeatable, all accepted).
    #[arg(long)]
    secret: Vec<String>,
    /// CIDR peers may be relayed to (repeatable).
    #[arg(long)]
    allow_cidr: Vec<Cidr>,
    /// IP relay sockets bind to.
    #[arg(long)]
    relay_ip: Option<IpAddr>,
    /// IPv6 relay IP.
    #[arg(long)]
    relay_ipv6: Option<IpAddr>,
    /// Public IP advertised in XOR-RELAYED-ADDRESS.
    #[arg(long)]
    external_ip: Option<IpAddr>,
    /// Lowest relay port (0 with --relay-port-max 0: ephemeral).
    #[arg(long, default_value_t = 0)]
    relay_port_min: u16,
    /// Highest relay port.
    #[arg(long, default_value_t = 0)]
    relay_port_max: u16,
    /// Allocations per user.
    #[arg(long, default_value_t = 16)]
    max_allocations_per_user: usize,
    /// Relayed bytes per second per allocation (0 = unlimited).
    #[arg(long, default_value_t = 5_000_000)]
    max_bandwidth: u64,
    /// TEST ONLY: allow relaying to loopback peers. Never use in production.
    #[arg(long)]
    allow_loopback_peers_for_testing: bool,
}

fn split_user(s: &str) -> Option<(String, String)> {
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let mut cfg = TurnConfig {
        realm: a.realm,
        listen_udp: a.listen_udp,
        listen_tcp: a.listen_tcp,
        listen_tls: a.listen_tls,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        relay_ip: a.relay_ip,
        relay_ipv6: a.relay_ipv6,
        external_ip: a.external_ip,
        relay_port_min: a.relay_port_min,
        relay_port_max: a.relay_port_max,
        rest_secrets: a.secret,
        allowed_peer_cidrs: a.allow_cidr,
        allow_loopback_peers_for_testing: a.allow_loopback_peers_for_testing,
        max_allocations_per_user: a.max_allocations_per_user,
        max_bandwidth_bytes_per_sec: a.max_bandwidth,
        ..TurnConfig::default()
    };
    for u in &a.user {
        match split_user(u) {
            Some((n, p)) => {
                cfg.users.insert(n, p);
            }
            None => {
                eprintln!("--user must be name:password");
                std::process::exit(2);
            }
        }
    }
    if cfg.allow_loopback_peers_for_testing {
        eprintln!("WARNING: --allow-loopback-peers-for-testing is set: loopback peers are relayed. TEST ONLY.");
    }
    let srv = match TurnServer::start(&cfg, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgerelay-turn: cannot start: {e}");
            std::process::exit(1);
        }
    };
    let first = |v: &[SocketAddr]| {
        v.first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "TURN_READY udp={} tcp={} tls={}",
        first(srv.udp_addrs()),
        first(srv.tcp_addrs()),
        first(srv.tls_addrs())
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
