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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::config::{Account, GatewayConfig};
    use std::sync::atomic::{AtomicU32, Ordering};

    const NODE_KEY: &str = "node-key-0123456789";
    const API: &str = "api-token-0123456789";

    /// The registration client against the real gateway router, in-process on 127.0.0.1:0.
    #[tokio::test]
    async fn registers_heartbeats_and_reports_terminations() {
        let cfg = GatewayConfig {
            accounts: vec![Account {
                name: "ops".into(),
                token: API.into(),
                admin: true,
            }],
            node_keys: vec![NODE_KEY.into()],
            token_keys: vec!["token-key-0123456789".into()],
            ..GatewayConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = crate::gateway::router(Arc::new(cfg));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let beats = Arc::new(AtomicU32::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let session = Arc::new(std::sync::Mutex::new(String::new()));
        let reg = RegisterConfig {
            gateway_url: base.clone(),
            node_key: NODE_KEY.into(),
            id: "edge-1".into(),
            region: "eu-west".into(),
            lat: 48.85,
            lon: 2.35,
            http_url: "https://edge-1.example:8443".into(),
            ws_url: None,
            ice_urls: vec!["turn:edge-1.example:3478?transport=udp".into()],
            capacity: Capacity {
                max_viewers: 10,
                max_egress_kbps: 0,
            },
            interval: Duration::from_millis(100),
            ca_cert_pem: None,
            on_reply: Some(Arc::new(move |r: &RegisterReply| {
                let _ = tx.send(r.terminate_sessions.clone());
            })),
        };
        let b = beats.clone();
        let s = session.clone();
        let task = spawn(reg.clone(), move || {
            b.fetch_add(1, Ordering::Relaxed);
            let id = s.lock().map(|g| g.clone()).unwrap_or_default();
            NodeLoad {
                rooms: 1,
                viewers: 0,
                sessions: if id.is_empty() {
                    vec![]
                } else {
                    vec![SessionReport {
                        id,
                        publisher: true,
                        viewers: 0,
                    }]
                },
                ..NodeLoad::default()
            }
        });
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("first reply"),
            Some(vec![])
        );

        // Create a session on this edge, terminate it, and expect the edge to be told.
        let http = reqwest::Client::new();
        let v: serde_json::Value = http
            .post(format!("{base}/1.0/sessions"))
            .bearer_auth(API)
            .json(&serde_json::json!({"app": "a"}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("json");
        let id = v["metadata"]["id"].as_str().expect("id").to_owned();
        assert_eq!(
            v["metadata"]["url"]
                .as_str()
                .map(|u| u.starts_with(&format!(
                    "wss://edge-1.example:8443/1.0/session/{id}/sockets/slave?token="
                ))),
            Some(true)
        );
        *session.lock().expect("lock") = id.clone();
        http.delete(format!("{base}/1.0/sessions/{id}"))
            .bearer_auth(API)
            .send()
            .await
            .expect("delete");
        let mut told = false;
        for _ in 0..50 {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(list)) if list.contains(&id) => {
                    told = true;
                    break;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        assert!(told, "edge told to terminate {id}");
        assert!(beats.load(Ordering::Relaxed) >= 2);

        // A wrong key is refused (logged, retried) without ending the task.
        let mut bad = reg;
        bad.node_key = "wrong-key-0123456789".into();
        let err = register_once(&reqwest::Client::new(), &bad, NodeLoad::default())
            .await
            .expect_err("refused");
        assert!(format!("{err:#}").contains("401"), "{err:#}");
        deregister(&RegisterConfig {
            node_key: NODE_KEY.into(),
            ..bad
        })
        .await
        .expect("deregistered");
        task.abort();
        server.abort();
    }
}
