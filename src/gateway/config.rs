//! Gateway configuration (`config/gateway.toml`): loading and validation.
//!
//! Every validation error names the offending key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// A service account: API clients authenticate with its token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// Account name (appears in logs and as the owner of its sessions).
    pub name: String,
    /// Secret API token (Bearer / macaroon root / `?api_token=`).
    pub token: String,
    /// Admin accounts see and manage every session; others only their own.
    #[serde(default)]
    pub admin: bool,
}

/// A region with its reference coordinates (used for routing when a client gives no location).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Region name, e.g. `eu-west`.
    pub name: String,
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
}

/// Optional TLS for the gateway's HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// API service accounts.
    #[serde(default)]
    pub accounts: Vec<Account>,
    /// Shared keys edges present (Bearer) on `/1.0/nodes/*`; any of them is accepted.
    #[serde(default)]
    pub node_keys: Vec<String>,
    /// Session-token signing keys; the first signs, all verify (rotation). Edges hold the same.
    #[serde(default)]
    pub token_keys: Vec<String>,
    /// Lifetime of issued session tokens, seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// TURN REST shared secrets; the first is used to issue credentials.
    #[serde(default)]
    pub turn_secrets: Vec<String>,
    /// Lifetime of issued TURN credentials, seconds.
    #[serde(default = "default_turn_ttl")]
    pub turn_ttl_secs: u64,
    /// Known regions and their coordinates.
    #[serde(default)]
    pub regions: Vec<Region>,
    /// Interval edges are told to heartbeat at, milliseconds.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_ms: u64,
    /// A node that has not heartbeated for this long is dropped, milliseconds (3 beats).
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// Default idle timeout: a session with no viewer for this long is terminated, seconds.
    #[serde(default = "default_idle")]
    pub session_idle_timeout_secs: u64,
    /// How long an active session survives without its instance before it is
    /// terminated, seconds: an instance that reconnects within it (network blip,
    /// encoder restart) keeps its viewers.
    #[serde(default = "default_instance_grace")]
    pub instance_grace_secs: u64,
    /// How long terminated/errored non-ephemeral sessions stay listed, seconds.
    #[serde(default = "default_retention")]
    pub session_retention_secs: u64,
    /// Maximum number of live (created/active) sessions.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Largest accepted request body, bytes (413 above).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Optional TLS for the listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8444))
}
fn default_token_ttl() -> u64 {
    3600
}
fn default_turn_ttl() -> u64 {
    3600
}
fn default_heartbeat_interval() -> u64 {
    2000
}
fn default_heartbeat_timeout() -> u64 {
    6000
}
fn default_instance_grace() -> u64 {
    15
}
fn default_idle() -> u64 {
    300
}
fn default_retention() -> u64 {
    3600
}
fn default_max_sessions() -> usize {
    10_000
}
fn default_max_body() -> usize {
    64 * 1024
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: default_listen(),
            accounts: Vec::new(),
            node_keys: Vec::new(),
            token_keys: Vec::new(),
            token_ttl_secs: default_token_ttl(),
            turn_secrets: Vec::new(),
            turn_ttl_secs: default_turn_ttl(),
            regions: Vec::new(),
            heartbeat_interval_ms: default_heartbeat_interval(),
            heartbeat_timeout_ms: default_heartbeat_timeout(),
            session_idle_timeout_secs: default_idle(),
            instance_grace_secs: default_instance_grace(),
            session_retention_secs: default_retention(),
            max_sessions: default_max_sessions(),
            max_body_bytes: default_max_body(),
            tls: None,
        }
    }
}

/// Minimum length of every secret (API tokens, node keys, signing keys, TURN secrets).
pub const MIN_SECRET_LEN: usize = 16;

fn check_secrets(key: &str, list: &[String], required: bool) -> anyhow::Result<()> {
    if required && list.is_empty() {
        bail!("{key}: at least one entry is required");
    }
    for (i, s) in list.iter().enumerate() {
        if s.len() < MIN_SECRET_LEN {
            bail!("{key}[{i}]: must be at least {MIN_SECRET_LEN} characters");
        }
    }
    Ok(())
}

fn check_coords(key: &str, lat: f64, lon: f64) -> anyhow::Result<()> {
    if !(-90.0..=90.0).contains(&lat) {
        bail!("{key}.lat: {lat} is outside -90..=90");
    }
    if !(-180.0..=180.0).contains(&lon) {
        bail!("{key}.lon: {lon} is outside -180..=180");
    }
    Ok(())
}

impl GatewayConfig {
    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: GatewayConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Checks every value; the error names the key and the reason.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.accounts.is_empty() {
            bail!("accounts: at least one service account is required");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            if a.name.trim().is_empty() {
                bail!("accounts[{i}].name: must not be empty");
            }
            if a.token.len() < MIN_SECRET_LEN {
                bail!("accounts[{i}].token: must be at least {MIN_SECRET_LEN} characters");
            }
            if !seen.insert(a.token.as_str()) {
                bail!("accounts[{i}].token: the same token is used by two accounts");
            }
        }
        check_secrets("node_keys", &self.node_keys, true)?;
        check_secrets("token_keys", &self.token_keys, true)?;
        check_secrets("turn_secrets", &self.turn_secrets, false)?;
        if !(10..=7 * 24 * 3600).contains(&self.token_ttl_secs) {
            bail!("token_ttl_secs: must be between 10 and 604800");
        }
        if !(10..=7 * 24 * 3600).contains(&self.turn_ttl_secs) {
            bail!("turn_ttl_secs: must be between 10 and 604800");
        }
        if !(100..=60_000).contains(&self.heartbeat_interval_ms) {
            bail!("heartbeat_interval_ms: must be between 100 and 60000");
        }
        if self.heartbeat_timeout_ms < self.heartbeat_interval_ms {
            bail!("heartbeat_timeout_ms: must be at least heartbeat_interval_ms");
        }
        if self.heartbeat_timeout_ms > 600_000 {
            bail!("heartbeat_timeout_ms: must be at most 600000");
        }
        if self.session_idle_timeout_secs == 0 {
            bail!("session_idle_timeout_secs: must be greater than 0");
        }
        if self.max_sessions == 0 {
            bail!("max_sessions: must be greater than 0");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            bail!("max_body_bytes: must be between 1024 and 16777216");
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            if !valid_name(&r.name) {
                bail!(
                    "regions[{i}].name: {:?} must be 1-64 characters of [A-Za-z0-9._-]",
                    r.name
                );
            }
            if !names.insert(r.name.as_str()) {
                bail!("regions[{i}].name: duplicate region {:?}", r.name);
            }
            check_coords(&format!("regions[{i}]"), r.lat, r.lon)?;
        }
        Ok(())
    }

    /// The configured coordinates of region `name`.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }
}

/// True for 1-64 characters of `[A-Za-z0-9._-]` (ids and region names).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
        listen = "127.0.0.1:0"
        node_keys = ["node-key-0123456789"]
        token_keys = ["token-key-0123456789"]
        [[accounts]]
        name = "ops"
        token = "api-token-0123456789"
        [[regions]]
        name = "eu-west"
        lat = 48.85
        lon = 2.35
    "#;

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../../config/gateway.toml");
        let cfg = GatewayConfig::from_toml(text).expect("config/gateway.toml is valid");
        assert_eq!(cfg.heartbeat_timeout_ms, 6000);
        assert!(!cfg.regions.is_empty());
    }

    #[test]
    fn minimal_ok() {
        let cfg = GatewayConfig::from_toml(OK).expect("valid");
        assert_eq!(cfg.max_body_bytes, 65536);
        assert_eq!(cfg.heartbeat_interval_ms, 2000);
    }

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            GatewayConfig::from_toml(text).expect_err("should fail")
        )
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&OK.replace("lat = 48.85", "lat = 148.85")).contains("regions[0].lat"));
        assert!(err(&OK.replace("api-token-0123456789", "short")).contains("accounts[0].token"));
        assert!(err(&OK.replace("[\"node-key-0123456789\"]", "[]")).contains("node_keys"));
        assert!(err(&format!("heartbeat_timeout_ms = 10\n{OK}")).contains("heartbeat_timeout_ms"));
        assert!(err(&format!("bogus = 1\n{OK}")).contains("bogus"));
        assert!(err(&OK.replace("127.0.0.1:0", "not-an-address")).contains("listen"));
    }
}
