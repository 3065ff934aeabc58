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

/// The one UDP port all peers share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Address to bind the media socket; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Addresses put in ICE candidates (the public IP behind a 1:1 NAT).
    /// Empty: the bound address (which must then not be unspecified).
    pub public_ips: Vec<IpAddr>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            public_ips: Vec::new(),
        }
    }
}

/// Static bearer tokens (the gateway issue adds signed per-session tokens).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens accepted on `POST /whip/{room}`.
    pub publisher_tokens: Vec<String>,
    /// Tokens accepted on `POST /whep/{room}`.
    pub viewer_tokens: Vec<String>,
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
}

impl Default for SfuSection {
    fn default() -> Self {
        SfuSection {
            keyframe_throttle_ms: 300,
            max_viewers_per_room: 1000,
            bwe: true,
            bwe_initial_kbps: 5000,
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
        if self.sfu.keyframe_throttle_ms > 10_000 {
            bail!("sfu.keyframe_throttle_ms: at most 10000");
        }
        if self.sfu.max_viewers_per_room == 0 {
            bail!("sfu.max_viewers_per_room: must be at least 1");
        }
        if self.sfu.bwe_initial_kbps < 50 {
            bail!("sfu.bwe_initial_kbps: at least 50");
        }
        if self.auth.publisher_tokens.iter().any(|t| t.len() < 8)
            || self.auth.viewer_tokens.iter().any(|t| t.len() < 8)
        {
            bail!("auth: tokens must be at least 8 characters");
        }
        if self.auth.publisher_tokens.is_empty() {
            bail!("auth.publisher_tokens: at least one token is required (deny by default)");
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
        cfg.sfu.max_viewers_per_room = 0;
        let e = cfg.validate().expect_err("zero viewers");
        assert!(e.to_string().starts_with("sfu.max_viewers_per_room"), "{e}");
        let mut cfg = EdgeConfig::default();
        let e = cfg.validate().expect_err("no tokens");
        assert!(e.to_string().starts_with("auth.publisher_tokens"), "{e}");
        cfg.auth.publisher_tokens = vec!["long-enough-token".into()];
        cfg.media.listen = "0.0.0.0:5000".parse().expect("addr");
        let e = cfg.validate().expect_err("unspecified without public ip");
        assert!(e.to_string().starts_with("media.public_ips"), "{e}");
    }
}
