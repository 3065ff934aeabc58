//! Edge side of gateway registration: POST the node record at start and every heartbeat.
//!
//! The edge calls [`spawn`] with its static description ([`RegisterConfig`]) and a closure that
//! returns its current [`NodeLoad`] (load, the sessions it serves, whether it is draining).
//! Failures are logged (rate-limited) and retried on the next beat; the task runs until aborted.
//! The wire format is in docs/PROTOCOL.md ("Edge registration").

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinHandle;

pub use super::proto::{Capacity, Load, NodeRecord, RegisterReply, SessionReport};

/// Callback invoked with every successful registration reply (e.g. to close sessions the
/// gateway lists in `terminate_sessions`).
pub type ReplyHook = Arc<dyn Fn(&RegisterReply) + Send + Sync>;

/// Static description of the edge and where to register.
#[derive(Clone)]
pub struct RegisterConfig {
    /// Gateway base URL, e.g. `https://gateway.example.com:8444`.
    pub gateway_url: String,
    /// Shared node key (sent as `Authorization: Bearer`).
    pub node_key: String,
    /// Node id (1-64 characters of `[A-Za-z0-9._-]`).
    pub id: String,
    /// Region name.
    pub region: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Public HTTP(S) base URL of this edge.
    pub http_url: String,
    /// Public WebSocket base URL (None: derived from `http_url`).
    pub ws_url: Option<String>,
    /// Public STUN/TURN URLs of this edge.
    pub ice_urls: Vec<String>,
    /// Capacity.
    pub capacity: Capacity,
    /// Heartbeat interval (2 s by default).
    pub interval: Duration,
    /// Extra PEM CA certificate to trust for the gateway (self-signed deployments).
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Called with each successful reply.
    pub on_reply: Option<ReplyHook>,
}

impl std::fmt::Debug for RegisterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterConfig")
            .field("gateway_url", &self.gateway_url)
            .field("id", &self.id)
            .field("region", &self.region)
            .field("http_url", &self.http_url)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// Heartbeat interval edges use unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// The dynamic part of a heartbeat, produced by the edge on every beat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLoad {
    /// Rooms hosted.
    pub rooms: u32,
    /// Viewers connected.
    pub viewers: u32,
    /// Egress bitrate, kbit/s.
    pub egress_kbps: u64,
    /// CPU use 0.0..=1.0.
    pub cpu: f64,
    /// Sessions (rooms) served, with publisher state and viewer count.
    pub sessions: Vec<SessionReport>,
    /// True once the edge is draining (no new sessions).
    pub draining: bool,
}

impl RegisterConfig {
    /// The full node record for one heartbeat.
    pub fn record(&self, load: NodeLoad) -> NodeRecord {
        NodeRecord {
            id: self.id.clone(),
            region: self.region.clone(),
            lat: self.lat,
            lon: self.lon,
            http_url: self.http_url.clone(),
            ws_url: self.ws_url.clone(),
            ice_urls: self.ice_urls.clone(),
            capacity: self.capacity,
            load: Load {
                rooms: load.rooms,
                viewers: load.viewers,
                egress_kbps: load.egress_kbps,
                cpu: if load.cpu.is_finite() { load.cpu } else { 0.0 },
            },
            sessions: load.sessions,
            draining: load.draining,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.gateway_url.trim_end_matches('/'))
    }

    /// An HTTP client for talking to the gateway (5 s timeout, optional extra CA).
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3));
        if let Some(pem) = &self.ca_cert_pem {
            let cert = reqwest::Certificate::from_pem(pem).context("gateway CA certificate")?;
            b = b.add_root_certificate(cert);
        }
        b.build().context("cannot build HTTP client")
    }
}

/// Sends one registration/heartbeat and returns the gateway's reply.
pub async fn register_once(
    client: &reqwest::Client,
    cfg: &RegisterConfig,
    load: NodeLoad,
) -> anyhow::Result<RegisterReply> {
    let resp = client
        .post(cfg.endpoint("/1.0/nodes/register"))
        .bearer_auth(&cfg.node_key)
        .json(&cfg.record(load))
        .send()
        .await
        .context("gateway unreachable")?;
    let code = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .with_context(|| format!("gateway answered {code} with a non-JSON body"))?;
    if !code.is_success() {
        let msg = body.get("error").and_then(|e| e.as_str()).unwrap_or("");
        anyhow::bail!("gateway refused registration: {code} {msg}");
    }
    serde_json::from_value(body.get("metadata").cloned().unwrap_or_default())
        .context("gateway reply has no valid metadata")
}

/// Tells the gateway this node is leaving (its sessions go to `error` at once).
pub async fn deregister(cfg: &RegisterConfig) -> anyhow::Result<()> {
    let client = cfg.client()?;
    let resp = client
        .delete(cfg.endpoint(&format!("/1.0/nodes/{}", cfg.id)))
        .bearer_auth(&cfg.node_key)
        .send()
        .await
        .context("gateway unreachable")?;
    if !resp.status().is_success() {
        anyhow::bail!("gateway refused deregistration: {}", resp.status());
    }
    Ok(())
}

/// Starts the registration task: registers now, then every `cfg.interval`, until aborted.
pub fn spawn(cfg: RegisterConfig, load: impl Fn() -> NodeLoad + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = match cfg.client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "gateway registration disabled");
                return;
            }
        };
        let interval = if cfg.interval.is_zero() {
            DEFAULT_INTERVAL
        } else {
            cfg.interval
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since: Option<Instant> = None;
        let mut last_log: Option<Instant> = None;
        let mut failures: u64 = 0;
        loop {
            tick.tick().await;
            match register_once(&client, &cfg, load()).await {
                Ok(reply) => {
                    if failing_since.take().is_some() {
                        tracing::info!(gateway = %cfg.gateway_url, failures, "gateway registration recovered");
                    } else if failures == 0 && last_log.is_none() {
                        tracing::info!(gateway = %cfg.gateway_url, node = %cfg.id, "registered with gateway");
                        last_log = Some(Instant::now());
                    }
                    failures = 0;
                    if let Some(hook) = &cfg.on_reply {
                        hook(&reply);
                    }
                }
                Err(e) => {
                    failures += 1;
                    let now = Instant::now();
                    failing_since.get_or_insert(now);
                    let due = last_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
                        || failures == 1;
                    if due {
                        tracing::warn!(gateway = %cfg.gateway_url, failures, error = %format!("{e:#}"), "gateway registration failed; retrying");
                        last_log = Some(now);
                    }
                }
            }
        }
    })
}
