//! Edge configuration: a TOML file (see `config/edge.toml`), CLI overrides,
//! and validation whose errors name the key and the reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The whole edge configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Node identity and placement.
    pub node: NodeConfig,
    /// HTTP signalling.
    pub http: HttpConfig,
    /// UDP media.
    pub media: MediaConfig,
    /// Who may publish and view.
    pub auth: AuthConfig,
    /// SFU tunables.
    pub sfu: SfuSection,
    /// Draining on SIGTERM.
    pub drain: DrainConfig,
    /// The built-in STUN/TURN server.
    pub turn: crate::edge::turn::TurnSection,
    /// Registration with the central gateway.
    pub gateway: GatewayLinkConfig,
}

/// Node identity, as registered with the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique node id.
    pub id: String,
    /// Region name, e.g. "eu-west".
    pub region: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "edge-1".into(),
            region: "local".into(),
        }
    }
}

/// HTTP(S) listener for WHIP/WHEP, WebSocket signalling, metrics and the viewer page.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Directory of the viewer page; defaults to the built-in copy.
    pub web_root: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            max_body_bytes: 64 * 1024,
            web_root: None,
        }
    }
}

/// The longest `media.gather_us` accepted: 100 ms. A hold ends at a frame's last
/// packet or the next frame's first, so the window only bounds a frame whose rest
/// is late; more than this would be a stall, not a frame.
pub const MAX_GATHER_US: u64 = 100_000;

/// The one UDP port all peers share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Address to bind the media socket; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Addresses put in ICE candidates (the public IP behind a 1:1 NAT).
    /// Empty: the bound address (which must then not be unspecified).
    pub public_ips: Vec<IpAddr>,
    /// Batched socket I/O (recvmmsg/sendmmsg). `false` is one system call per
    /// datagram, kept as the baseline for benchmarks.
    pub batch_io: bool,
    /// UDP GSO (Linux `UDP_SEGMENT`): a run of packets to one viewer goes
    /// through the kernel's IP stack once. Used when the kernel supports it;
    /// `false` sends every datagram on its own (inside the same `sendmmsg`).
    pub gso: bool,
    /// Media threads (shards): each owns a UDP port (`listen`'s port, then the
    /// next ones) and the rooms hashed to it. 0 = one per CPU.
    pub threads: usize,
    /// A room spans media threads once this many viewers sit on its home thread:
    /// further spectators are seated round-robin on every thread, each of which
    /// then fans out its own share (0 = a room never leaves its thread). Only with
    /// `threads` > 1; not for simulcast rooms.
    pub span_viewers: usize,
    /// Longest a room holds a video frame's packets waiting for the frame's last
    /// one (the RTP marker), so the whole frame goes to each viewer in one GSO run:
    /// a publisher whose frames arrive in pieces, or paced a packet at a time,
    /// costs the edge about what one that bursts them does. A viewer cannot decode
    /// a frame before its last packet, so the hold costs it little: the frame's
    /// fan-out starts at its last packet instead of overlapping its arrival (~3 ms
    /// on the median frame for 500 viewers of a pacing publisher, BENCHMARKS 13).
    /// It ends at the marker, at the next frame's first packet, or after this long
    /// (the paced tail of a large keyframe goes out in chunks). 0 = fan out each
    /// packet as it comes.
    pub gather_us: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            public_ips: Vec::new(),
            batch_io: true,
            gso: true,
            threads: 1,
            span_viewers: 256,
            gather_us: 20_000,
        }
    }
}

/// Static bearer tokens and the keys of the gateway's signed per-session tokens.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens accepted on `POST /whip/{room}`.
    pub publisher_tokens: Vec<String>,
    /// Tokens accepted on `POST /whep/{room}`.
    pub viewer_tokens: Vec<String>,
    /// Keys verifying the gateway's session tokens (same list as the gateway's
    /// `token_keys`; any of them is accepted, for rotation).
    pub token_keys: Vec<String>,
}

/// Where and how this edge registers with the central gateway (`[gateway]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayLinkConfig {
    /// Gateway base URL, e.g. `https://gateway.example.com:8444`; unset: no registration.
    pub url: Option<String>,
    /// Shared node key (one of the gateway's `node_keys`).
    pub node_key: String,
    /// Latitude of this node, degrees.
    pub lat: f64,
    /// Longitude of this node, degrees.
    pub lon: f64,
    /// Public HTTP(S) base URL of this edge; default `http://<bound http address>`.
    pub http_url: Option<String>,
    /// Public WebSocket base URL; default: `http_url` with `ws(s)://`.
    pub ws_url: Option<String>,
    /// Public STUN/TURN URLs handed to clients by the gateway.
    pub ice_urls: Vec<String>,
    /// Most viewers this edge takes (0: none).
    pub max_viewers: u32,
    /// Most egress bitrate, kbit/s (0: not limited).
    pub max_egress_kbps: u64,
    /// Heartbeat interval, milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Extra PEM CA certificate to trust for the gateway (self-signed deployments).
    pub ca_cert: Option<PathBuf>,
}

impl Default for GatewayLinkConfig {
    fn default() -> Self {
        GatewayLinkConfig {
            url: None,
            node_key: String::new(),
            lat: 0.0,
            lon: 0.0,
            http_url: None,
            ws_url: None,
            ice_urls: Vec::new(),
            max_viewers: 1000,
            max_egress_kbps: 0,
            heartbeat_interval_ms: 2000,
            ca_cert: None,
        }
    }
}

/// SFU tunables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SfuSection {
    /// At most one upstream keyframe request per room per this many ms.
    pub keyframe_throttle_ms: u64,
    /// Most viewers per room.
    pub max_viewers_per_room: usize,
    /// Per-viewer bandwidth estimation with pause/resume.
    pub bwe: bool,
    /// Initial viewer bandwidth estimate, kbit/s.
    pub bwe_initial_kbps: u64,
    /// How long each viewer keeps sent video for answering NACKs, ms. Longer windows
    /// recover from longer outages but cost memory per viewer (about 40 KB per 100 ms
    /// of a 2 Mbit/s stream).
    pub nack_history_ms: u64,
    /// Seal and send viewers' media in the SFU itself instead of through str0m's
    /// send queue and pacer: about half the CPU per forwarded packet and half the
    /// memory per viewer, but no bandwidth estimation (`bwe` then only applies to
    /// viewers of simulcast rooms, which stay on str0m's path) and GOP replays paced
    /// at a fixed 24 Mbit/s. See docs/OPERATIONS.md.
    pub direct_send: bool,
}

impl Default for SfuSection {
    fn default() -> Self {
        SfuSection {
            keyframe_throttle_ms: 300,
            max_viewers_per_room: 1000,
            bwe: true,
            bwe_initial_kbps: 5000,
            nack_history_ms: 600,
            direct_send: true,
        }
    }
}

/// Rolling-upgrade behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// How long to keep serving existing sessions after SIGTERM, seconds.
    pub timeout_secs: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig { timeout_secs: 30 }
    }
}

impl EdgeConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let cfg = Self::parse(&text).with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// Parses TOML text (errors carry the key path and line).
    pub fn parse(text: &str) -> anyhow::Result<EdgeConfig> {
        let cfg: EdgeConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node.id.trim().is_empty() {
            bail!("node.id: must not be empty");
        }
        if self.http.max_body_bytes < 1024 || self.http.max_body_bytes > 16 * 1024 * 1024 {
            bail!("http.max_body_bytes: must be between 1024 and 16777216");
        }
        if self.media.public_ips.is_empty() && self.media.listen.ip().is_unspecified() {
            bail!("media.public_ips: required when media.listen binds an unspecified address ({}); list the address(es) viewers reach", self.media.listen);
        }
        if self.media.public_ips.iter().any(|ip| ip.is_unspecified()) {
            bail!("media.public_ips: 0.0.0.0 and :: are not reachable addresses");
        }
        if self.media.threads > 64 {
            bail!("media.threads: at most 64 (0 = one per CPU)");
        }
        if self.media.gather_us > MAX_GATHER_US {
            bail!(
                "media.gather_us: at most {MAX_GATHER_US} (microseconds a room holds a \
                 frame's packets for its last one; 0 = never hold)"
            );
        }
        if self.sfu.keyframe_throttle_ms > 10_000 {
            bail!("sfu.keyframe_throttle_ms: at most 10000");
        }
        if self.sfu.max_viewers_per_room == 0 {
            bail!("sfu.max_viewers_per_room: must be at least 1");
        }
        if !(50..=10_000).contains(&self.sfu.nack_history_ms) {
            bail!("sfu.nack_history_ms: between 50 and 10000");
        }
        if self.sfu.bwe_initial_kbps < 50 {
            bail!("sfu.bwe_initial_kbps: at least 50");
        }
        if self.auth.publisher_tokens.iter().any(|t| t.len() < 8)
            || self.auth.viewer_tokens.iter().any(|t| t.len() < 8)
        {
            bail!("auth: tokens must be at least 8 characters");
        }
        if self.turn.enabled {
            let t = &self.turn.server;
            if t.listen_udp.is_empty() && t.listen_tcp.is_empty() && t.listen_tls.is_empty() {
                bail!("turn.server: enabled but no listen_udp, listen_tcp or listen_tls address");
            }
            if !t.listen_tls.is_empty() && (t.tls_cert.is_none() || t.tls_key.is_none()) {
                bail!("turn.server.tls_cert / tls_key: required when listen_tls is set");
            }
            if self.turn.credential_ttl_secs < 60 {
                bail!("turn.credential_ttl_secs: at least 60");
            }
        }
        if self.auth.publisher_tokens.is_empty() && self.auth.token_keys.is_empty() {
            bail!("auth.publisher_tokens: at least one token (or auth.token_keys) is required (deny by default)");
        }
        if self.auth.token_keys.iter().any(|k| k.len() < 16) {
            bail!("auth.token_keys: keys must be at least 16 characters");
        }
        self.validate_gateway()?;
        Ok(())
    }

    fn validate_gateway(&self) -> anyhow::Result<()> {
        let g = &self.gateway;
        let Some(url) = &g.url else {
            return Ok(());
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("gateway.url: must start with http:// or https://");
        }
        if g.node_key.len() < 16 {
            bail!("gateway.node_key: required with gateway.url, at least 16 characters");
        }
        if !(-90.0..=90.0).contains(&g.lat) || !(-180.0..=180.0).contains(&g.lon) {
            bail!("gateway.lat/gateway.lon: degrees, -90..90 and -180..180");
        }
        match &g.http_url {
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                bail!("gateway.http_url: must start with http:// or https://");
            }
            None if self.http.listen.ip().is_unspecified() => {
                bail!("gateway.http_url: required when http.listen binds an unspecified address ({}); give the public URL clients reach", self.http.listen);
            }
            _ => {}
        }
        if let Some(u) = &g.ws_url {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                bail!("gateway.ws_url: must start with ws:// or wss://");
            }
        }
        if g.ice_urls.len() > 16
            || g.ice_urls.iter().any(|u| {
                !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:"))
            })
        {
            bail!("gateway.ice_urls: at most 16 stun:/turn:/turns: URLs");
        }
        if !(100..=60_000).contains(&g.heartbeat_interval_ms) {
            bail!("gateway.heartbeat_interval_ms: between 100 and 60000");
        }
        let ok_id = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        if !ok_id(&self.node.id) {
            bail!("node.id: 1-64 characters of [A-Za-z0-9._-] when registering with a gateway");
        }
        if !ok_id(&self.node.region) {
            bail!("node.region: 1-64 characters of [A-Za-z0-9._-] when registering with a gateway");
        }
        if self.auth.token_keys.is_empty() {
            bail!("auth.token_keys: required with gateway.url (the gateway's token_keys)");
        }
        Ok(())
    }

    /// The ICE candidate addresses for a media socket bound at `bound`.
    pub fn candidates(&self, bound: SocketAddr) -> Vec<SocketAddr> {
        if self.media.public_ips.is_empty() {
            vec![bound]
        } else {
            self.media
                .public_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, bound.port()))
                .collect()
        }
    }

    /// Number of media threads to run.
    pub fn shard_count(&self) -> usize {
        match self.media.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }

    /// Drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain.timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_is_valid() {
        let text = include_str!("../config/edge.toml");
        let cfg = EdgeConfig::parse(text).expect("sample parses");
        cfg.validate().expect("sample validates");
    }

    #[test]
    fn errors_name_the_key() {
        let e = EdgeConfig::parse("[http]\nlisten = \"nope\"\n").expect_err("bad address");
        assert!(e.to_string().contains("listen"), "{e}");
        let e = EdgeConfig::parse("[sfu]\nbwe = 3\n").expect_err("bad type");
        assert!(e.to_string().contains("bwe"), "{e}");
        let e = EdgeConfig::parse("[media]\nlistne = \"1.2.3.4:5\"\n").expect_err("unknown key");
        assert!(e.to_string().contains("listne"), "{e}");
        let mut cfg = EdgeConfig::default();
        cfg.auth.publisher_tokens = vec!["long-enough-token".into()];
        cfg.sfu.nack_history_ms = 20;
        let e = cfg.validate().expect_err("short NACK history");
        assert!(e.to_string().contains("sfu.nack_history_ms"), "{e}");
        cfg.sfu.nack_history_ms = 600;
        cfg.sfu.max_viewers_per_room = 0;
        let e = cfg.validate().expect_err("zero viewers");
        assert!(e.to_string().starts_with("sfu.max_viewers_per_room"), "{e}");
        cfg.sfu.max_viewers_per_room = 10;
        cfg.media.gather_us = MAX_GATHER_US + 1;
        let e = cfg.validate().expect_err("a long frame wait");
        assert!(e.to_string().starts_with("media.gather_us"), "{e}");
        cfg.media.gather_us = MAX_GATHER_US;
        cfg.validate().expect("the longest frame wait accepted");
        let mut cfg = EdgeConfig::default();
        cfg.auth.publisher_tokens = vec!["long-enough-token".into()];
        cfg.gateway.url = Some("http://127.0.0.1:8444".into());
        let e = cfg.validate().expect_err("no node key");
        assert!(e.to_string().starts_with("gateway.node_key"), "{e}");
        cfg.gateway.node_key = "node-key-0123456789".into();
        let e = cfg.validate().expect_err("no token keys");
        assert!(e.to_string().starts_with("auth.token_keys"), "{e}");
        cfg.auth.token_keys = vec!["short".into()];
        let e = cfg.validate().expect_err("short token key");
        assert!(e.to_string().starts_with("auth.token_keys"), "{e}");
        cfg.auth.token_keys = vec!["token-key-0123456789".into()];
        cfg.validate().expect("gateway config valid");
        cfg.gateway.lat = 91.0;
        let e = cfg.validate().expect_err("bad lat");
        assert!(e.to_string().starts_with("gateway.lat"), "{e}");
        let mut cfg = EdgeConfig::default();
        let e = cfg.validate().expect_err("no tokens");
        assert!(e.to_string().starts_with("auth.publisher_tokens"), "{e}");
        cfg.auth.publisher_tokens = vec!["long-enough-token".into()];
        cfg.media.listen = "0.0.0.0:5000".parse().expect("addr");
        let e = cfg.validate().expect_err("unspecified without public ip");
        assert!(e.to_string().starts_with("media.public_ips"), "{e}");
    }
}
