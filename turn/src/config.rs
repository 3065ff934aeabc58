//! Configuration of the TURN server: the `[turn]` section of the edge's TOML.
//!
//! Every field has a default (`#[serde(default)]`), unknown keys are rejected.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::Cidr;

/// TURN server configuration (`[turn]` in edge.toml).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Realm sent in 401 responses and used in the long-term key. Default `"edgerelay"`.
    pub realm: String,
    /// UDP listen addresses (STUN and TURN over UDP). Default `["0.0.0.0:3478"]`.
    pub listen_udp: Vec<SocketAddr>,
    /// TCP listen addresses (STUN/TURN framed on the stream). Default `["0.0.0.0:3478"]`.
    pub listen_tcp: Vec<SocketAddr>,
    /// TLS (TURNS) listen addresses; need `tls_cert` and `tls_key`. Default empty.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for TURNS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TURNS.
    pub tls_key: Option<PathBuf>,
    /// Local IPv4 (or IPv6) address relay sockets bind to. Default: the IP of the
    /// first `listen_udp` address when it is not unspecified, else `0.0.0.0`
    /// (then `external_ip` should be set so the advertised relayed address is reachable).
    pub relay_ip: Option<IpAddr>,
    /// Local IPv6 address for IPv6 relays (REQUESTED-ADDRESS-FAMILY IPv6). Default:
    /// none, IPv6 allocations are refused with 440.
    pub relay_ipv6: Option<IpAddr>,
    /// Public IPv4 put in XOR-RELAYED-ADDRESS when the host sits behind a 1:1 NAT
    /// (like coturn's `external-ip`). Default: the relay socket's local address.
    pub external_ip: Option<IpAddr>,
    /// Public IPv6 advertised for IPv6 relays. Default: the relay socket's address.
    pub external_ipv6: Option<IpAddr>,
    /// Lowest relay port. `0` (with `relay_port_max` 0) means ephemeral ports. Default 49152.
    pub relay_port_min: u16,
    /// Highest relay port. Default 65535.
    pub relay_port_max: u16,
    /// Static long-term users: name -> password. Default empty.
    pub users: HashMap<String, String>,
    /// TURN REST shared secrets; all are accepted (rotation). Default empty.
    pub rest_secrets: Vec<String>,
    /// CIDRs peers may be in besides the co-located SFU. Private ranges need a CIDR
    /// inside the private range. Default empty (only the SFU).
    pub allowed_peer_cidrs: Vec<Cidr>,
    /// TEST ONLY: allow loopback peers (127.0.0.0/8, ::1). Logs a loud warning. Default false.
    pub allow_loopback_peers_for_testing: bool,
    /// Default allocation lifetime in seconds (RFC 8656: 600).
    pub default_lifetime_secs: u32,
    /// Largest allocation lifetime granted, seconds. Default 3600.
    pub max_lifetime_secs: u32,
    /// Permission lifetime, seconds (RFC 8656: 300).
    pub permission_lifetime_secs: u32,
    /// Channel binding lifetime, seconds (RFC 8656: 600).
    pub channel_lifetime_secs: u32,
    /// Nonce validity, seconds; older nonces get 438 Stale Nonce. Default 600.
    pub nonce_lifetime_secs: u32,
    /// Allocations per user (REST: the part after the colon); 486 beyond. Default 16.
    pub max_allocations_per_user: usize,
    /// Allocations in total; 508 beyond. Default 2000.
    pub max_allocations: usize,
    /// Permissions per allocation; 508 beyond. Default 64.
    pub max_permissions_per_allocation: usize,
    /// Channels per allocation; 508 beyond. Default 64.
    pub max_channels_per_allocation: usize,
    /// Relayed bytes per second per allocation (both directions together); excess is
    /// dropped. `0` = unlimited. Default 5_000_000 (40 Mbit/s).
    pub max_bandwidth_bytes_per_sec: u64,
    /// Unauthenticated error responses per second per source IP (token bucket, burst
    /// twice this). Default 20.
    pub unauth_responses_per_sec: u32,
    /// SOFTWARE attribute value; none by default.
    pub software: Option<String>,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            realm: "edgerelay".into(),
            listen_udp: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            listen_tcp: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            listen_tls: vec![],
            tls_cert: None,
            tls_key: None,
            relay_ip: None,
            relay_ipv6: None,
            external_ip: None,
            external_ipv6: None,
            relay_port_min: 49152,
            relay_port_max: 65535,
            users: HashMap::new(),
            rest_secrets: vec![],
            allowed_peer_cidrs: vec![],
            allow_loopback_peers_for_testing: false,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            nonce_lifetime_secs: 600,
            max_allocations_per_user: 16,
            max_allocations: 2000,
            max_permissions_per_allocation: 64,
            max_channels_per_allocation: 64,
            max_bandwidth_bytes_per_sec: 5_000_000,
            unauth_responses_per_sec: 20,
            software: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_like_section() {
        // serde through a tiny JSON stand-in (toml is not a dependency of this crate).
        let c: TurnConfig =
            serde::Deserialize::deserialize(serde::de::value::MapDeserializer::<
                _,
                serde::de::value::Error,
            >::new(vec![("realm", "x")].into_iter()))
            .unwrap();
        assert_eq!(c.realm, "x");
        assert_eq!(c.default_lifetime_secs, 600);
    }
}
