//! Glue between the edge and the central gateway: registration/heartbeat with the
//! edge's live load, `terminate_sessions` handling, draining and deregistration.
//!
//! The wire format lives in `crate::gateway::edge_register` (docs/PROTOCOL.md section 5);
//! this module only feeds it the edge's state and acts on the replies.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgerelay_sfu::PeerId;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::http::AppState;
use super::media::MediaCmd;
use crate::config::EdgeConfig;
use crate::gateway::edge_register::{
    self, Capacity, NodeLoad, RegisterConfig, RegisterReply, SessionReport,
};

/// Entries younger than this survive pruning even if their room is not listed yet
/// (the media thread publishes its room list a few times per second).
const PRUNE_GRACE: Duration = Duration::from_secs(5);

struct PeerEntry {
    added: Instant,
    /// Woken when the session is terminated (WebSocket sessions wait on it).
    notify: Option<Arc<Notify>>,
}

/// Which peers serve which room, so a room the gateway terminates can be closed:
/// every WHIP/WHEP/WebSocket peer is recorded here while it lives.
#[derive(Default)]
pub struct PeerIndex {
    inner: Mutex<HashMap<String, HashMap<u64, PeerEntry>>>,
}

impl PeerIndex {
    /// Records `peer` in `room`; `notify` is woken if the room is terminated.
    pub fn add(&self, room: &str, peer: PeerId, notify: Option<Arc<Notify>>) {
        if let Ok(mut m) = self.inner.lock() {
            m.entry(room.to_owned()).or_default().insert(
                peer.as_u64(),
                PeerEntry {
                    added: Instant::now(),
                    notify,
                },
            );
        }
    }

    /// Forgets `peer` (it left on its own).
    pub fn remove(&self, room: &str, peer: PeerId) {
        if let Ok(mut m) = self.inner.lock() {
            if let Some(r) = m.get_mut(room) {
                r.remove(&peer.as_u64());
                if r.is_empty() {
                    m.remove(room);
                }
            }
        }
    }

    /// Removes and returns every peer of `room`, waking the WebSocket sessions.
    pub fn terminate_room(&self, room: &str) -> Vec<PeerId> {
        let entries = match self.inner.lock() {
            Ok(mut m) => m.remove(room).unwrap_or_default(),
            Err(_) => HashMap::new(),
        };
        entries
            .into_iter()
            .map(|(id, e)| {
                if let Some(n) = e.notify {
                    n.notify_one();
                }
                PeerId::from_u64(id)
            })
            .collect()
    }

    /// Drops entries of rooms the media thread no longer has (peers that timed out
    /// without a DELETE), keeping recent entries and WebSocket sessions.
    pub fn prune(&self, live_rooms: &HashSet<&str>, now: Instant) {
        if let Ok(mut m) = self.inner.lock() {
            m.retain(|room, peers| {
                if live_rooms.contains(room.as_str()) {
                    return true;
                }
                peers.retain(|_, e| {
                    e.notify.is_some() || now.saturating_duration_since(e.added) < PRUNE_GRACE
                });
                !peers.is_empty()
            });
        }
    }

    /// Number of peers recorded.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|m| m.values().map(|r| r.len()).sum())
            .unwrap_or(0)
    }
}

/// A running registration: the heartbeat task and what is needed to leave cleanly.
pub struct Registration {
    cfg: RegisterConfig,
    task: JoinHandle<()>,
    state: Arc<AppState>,
    sampler: Arc<Mutex<LoadSampler>>,
}

impl Registration {
    /// Sends one heartbeat right away (used on SIGTERM so the gateway stops routing here
    /// without waiting for the next beat).
    pub async fn beat_now(&self) {
        let load = sample(&self.state, &self.sampler);
        match self.cfg.client() {
            Ok(c) => {
                if let Err(e) = edge_register::register_once(&c, &self.cfg, load).await {
                    warn!(error = %format!("{e:#}"), "draining heartbeat failed");
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "draining heartbeat failed"),
        }
    }

    /// Stops heartbeating and tells the gateway this node is leaving.
    pub async fn deregister(self) {
        self.task.abort();
        match edge_register::deregister(&self.cfg).await {
            Ok(()) => info!(gateway = %self.cfg.gateway_url, "deregistered from gateway"),
            Err(e) => warn!(error = %format!("{e:#}"), "deregistration failed"),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Byte and CPU counters of the previous heartbeat, for rates.
struct LoadSampler {
    at: Instant,
    bytes_out: u64,
    cpu_ticks: Option<u64>,
}

/// CPU ticks (utime + stime) of this process from /proc/self/stat (Linux), if readable.
fn cpu_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.get(s.rfind(')')? + 1..)?;
    let mut it = rest.split_whitespace().skip(11);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The edge's current load, sessions and draining flag.
fn sample(state: &AppState, sampler: &Mutex<LoadSampler>) -> NodeLoad {
    let shared = &state.media.shared;
    let rooms = shared.rooms.lock().map(|r| r.clone()).unwrap_or_default();
    let bytes_out = shared.stats.lock().map(|s| s.bytes_out).unwrap_or(0);
    let now = Instant::now();
    let ticks = cpu_ticks();
    let (egress_kbps, cpu) = match sampler.lock() {
        Ok(mut prev) => {
            let dt = now.saturating_duration_since(prev.at).as_secs_f64();
            let kbps = if dt > 0.05 {
                (bytes_out.saturating_sub(prev.bytes_out) as f64 * 8.0 / 1000.0 / dt) as u64
            } else {
                0
            };
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64;
            // USER_HZ is 100 on every Linux architecture edgerelay targets.
            let cpu = match (ticks, prev.cpu_ticks) {
                (Some(t), Some(p)) if dt > 0.05 => {
                    ((t.saturating_sub(p) as f64 / 100.0) / dt / cpus).clamp(0.0, 1.0)
                }
                _ => 0.0,
            };
            *prev = LoadSampler {
                at: now,
                bytes_out,
                cpu_ticks: ticks,
            };
            (kbps, cpu)
        }
        Err(_) => (0, 0.0),
    };
    let live: HashSet<&str> = rooms.iter().map(|r| r.name.as_str()).collect();
    state.sessions.prune(&live, now);
    let viewers: usize = rooms.iter().map(|r| r.viewers).sum();
    NodeLoad {
        rooms: u32::try_from(rooms.len()).unwrap_or(u32::MAX),
        viewers: u32::try_from(viewers).unwrap_or(u32::MAX),
        egress_kbps,
        cpu,
        sessions: rooms
            .iter()
            .map(|r| SessionReport {
                id: r.name.clone(),
                publisher: r.publisher,
                viewers: u32::try_from(r.viewers).unwrap_or(u32::MAX),
            })
            .collect(),
        draining: state.draining.load(Ordering::Relaxed),
    }
}

/// Closes every peer of the sessions the gateway says have ended.
fn on_reply(state: &Arc<AppState>, reply: &RegisterReply) {
    for room in &reply.terminate_sessions {
        let peers = state.sessions.terminate_room(room);
        if peers.is_empty() {
            continue;
        }
        info!(%room, peers = peers.len(), "gateway terminated the session: closing it");
        metrics::counter!("edgerelay_sessions_terminated_by_gateway_total").increment(1);
        let st = state.clone();
        tokio::spawn(async move {
            for peer in peers {
                let _ = st
                    .media
                    .call(|reply| MediaCmd::Remove { peer, reply })
                    .await;
            }
        });
    }
}

/// The registration settings for this edge, or `None` without `[gateway] url`.
pub fn register_config(
    cfg: &EdgeConfig,
    http_addr: SocketAddr,
) -> anyhow::Result<Option<RegisterConfig>> {
    let g = &cfg.gateway;
    let Some(url) = &g.url else {
        return Ok(None);
    };
    let ca_cert_pem =
        match &g.ca_cert {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                anyhow::anyhow!("gateway.ca_cert: cannot read {}: {e}", p.display())
            })?),
            None => None,
        };
    Ok(Some(RegisterConfig {
        gateway_url: url.clone(),
        node_key: g.node_key.clone(),
        id: cfg.node.id.clone(),
        region: cfg.node.region.clone(),
        lat: g.lat,
        lon: g.lon,
        http_url: g
            .http_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}")),
        ws_url: g.ws_url.clone(),
        ice_urls: g.ice_urls.clone(),
        capacity: Capacity {
            max_viewers: g.max_viewers,
            max_egress_kbps: g.max_egress_kbps,
        },
        interval: Duration::from_millis(g.heartbeat_interval_ms),
        ca_cert_pem,
        on_reply: None,
    }))
}

/// Starts registering with the gateway if `[gateway] url` is set.
pub fn start(
    cfg: &EdgeConfig,
    http_addr: SocketAddr,
    state: Arc<AppState>,
) -> anyhow::Result<Option<Registration>> {
    let Some(mut reg) = register_config(cfg, http_addr)? else {
        return Ok(None);
    };
    if reg.ice_urls.is_empty() {
        // Default: the built-in TURN server's URLs (the gateway adds REST credentials).
        if let Some(t) = &state.turn {
            reg.ice_urls = t.urls().iter().take(16).cloned().collect();
        }
    }
    let st = state.clone();
    reg.on_reply = Some(Arc::new(move |r: &RegisterReply| on_reply(&st, r)));
    let sampler = Arc::new(Mutex::new(LoadSampler {
        at: Instant::now(),
        bytes_out: 0,
        cpu_ticks: cpu_ticks(),
    }));
    let (st, sm) = (state.clone(), sampler.clone());
    let task = edge_register::spawn(reg.clone(), move || sample(&st, &sm));
    info!(gateway = %reg.gateway_url, node = %reg.id, region = %reg.region, http_url = %reg.http_url, "registering with gateway");
    Ok(Some(Registration {
        cfg: reg,
        task,
        state,
        sampler,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_index_terminates_and_prunes() {
        let idx = PeerIndex::default();
        let n = Arc::new(Notify::new());
        idx.add("a", PeerId::from_u64(1), None);
        idx.add("a", PeerId::from_u64(2), Some(n.clone()));
        idx.add("b", PeerId::from_u64(3), None);
        assert_eq!(idx.len(), 3);
        let mut got = idx.terminate_room("a");
        got.sort_by_key(|p| p.as_u64());
        assert_eq!(got, vec![PeerId::from_u64(1), PeerId::from_u64(2)]);
        assert_eq!(idx.len(), 1);
        assert!(idx.terminate_room("a").is_empty());
        // Room b vanished from the media thread: kept during the grace period, then pruned.
        let live = HashSet::new();
        idx.prune(&live, Instant::now());
        assert_eq!(idx.len(), 1);
        idx.prune(&live, Instant::now() + PRUNE_GRACE + Duration::from_secs(1));
        assert_eq!(idx.len(), 0);
        idx.add("c", PeerId::from_u64(4), None);
        idx.remove("c", PeerId::from_u64(4));
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn cpu_ticks_readable_on_linux() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(cpu_ticks().is_some());
        }
    }
}
