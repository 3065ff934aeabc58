//! Counters of the TURN core.
//!
//! The hot path only bumps plain integers; [`Stats::flush`] (called once a second
//! from `Server::handle_timeout`) exports the deltas through the `metrics` crate:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `edgerelay_turn_allocations` | gauge | |
//! | `edgerelay_turn_allocations_max` | gauge | |
//! | `edgerelay_turn_permissions` | gauge | |
//! | `edgerelay_turn_channels` | gauge | |
//! | `edgerelay_turn_allocations_created_total` | counter | |
//! | `edgerelay_turn_requests_total` | counter | `method` |
//! | `edgerelay_turn_relayed_packets_total` | counter | `direction` = `to_peer` / `to_client` |
//! | `edgerelay_turn_relayed_bytes_total` | counter | `direction` |
//! | `edgerelay_turn_auth_failures_total` | counter | `reason` |
//! | `edgerelay_turn_quota_rejections_total` | counter | `kind` = `user` / `total` / `bandwidth` / `permissions` / `channels` |
//! | `edgerelay_turn_peer_rejections_total` | counter | `reason` = `forbidden_range` / `private` / `not_allowed` |
//! | `edgerelay_turn_dropped_total` | counter | `reason` |

use std::collections::HashMap;

type Labelled<'a> = (
    &'static str,
    &'static str,
    &'a HashMap<&'static str, u64>,
    &'a HashMap<&'static str, u64>,
);

/// Counters kept by the core (cumulative since start).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Packets relayed client -> peer (including the SFU hand-off).
    pub packets_to_peer: u64,
    /// Bytes relayed client -> peer.
    pub bytes_to_peer: u64,
    /// Packets relayed peer -> client.
    pub packets_to_client: u64,
    /// Bytes relayed peer -> client.
    pub bytes_to_client: u64,
    /// Allocations created.
    pub allocations_created: u64,
    /// Requests by method name.
    pub requests: HashMap<&'static str, u64>,
    /// Authentication failures by reason.
    pub auth_failures: HashMap<&'static str, u64>,
    /// Quota rejections by kind.
    pub quota_rejections: HashMap<&'static str, u64>,
    /// Peer policy rejections by reason.
    pub peer_rejections: HashMap<&'static str, u64>,
    /// Dropped inputs by reason.
    pub dropped: HashMap<&'static str, u64>,
    flushed: Option<Box<Stats>>,
}

fn method_name(m: u16) -> &'static str {
    match m {
        0x001 => "binding",
        0x003 => "allocate",
        0x004 => "refresh",
        0x008 => "create_permission",
        0x009 => "channel_bind",
        _ => "other",
    }
}

impl Stats {
    #[inline]
    pub(crate) fn relayed_to_peer(&mut self, len: usize) {
        self.packets_to_peer += 1;
        self.bytes_to_peer += len as u64;
    }
    #[inline]
    pub(crate) fn relayed_to_client(&mut self, len: usize) {
        self.packets_to_client += 1;
        self.bytes_to_client += len as u64;
    }
    pub(crate) fn request(&mut self, m: u16) {
        *self.requests.entry(method_name(m)).or_insert(0) += 1;
    }
    pub(crate) fn auth_failure(&mut self, reason: &'static str) {
        *self.auth_failures.entry(reason).or_insert(0) += 1;
    }
    pub(crate) fn quota(&mut self, kind: &'static str) {
        *self.quota_rejections.entry(kind).or_insert(0) += 1;
    }
    pub(crate) fn peer_rejected(&mut self, reason: &'static str) {
        *self.peer_rejections.entry(reason).or_insert(0) += 1;
    }
    pub(crate) fn drop_reason(&mut self, reason: &'static str) {
        *self.dropped.entry(reason).or_insert(0) += 1;
    }
    pub(crate) fn allocation_created(&mut self) {
        self.allocations_created += 1;
    }

    /// Export gauges and counter deltas to the `metrics` recorder.
    pub(crate) fn flush(&mut self, allocations: usize, perms: usize, chans: usize, max: usize) {
        metrics::gauge!("edgerelay_turn_allocations").set(allocations as f64);
        metrics::gauge!("edgerelay_turn_allocations_max").set(max as f64);
        metrics::gauge!("edgerelay_turn_permissions").set(perms as f64);
        metrics::gauge!("edgerelay_turn_channels").set(chans as f64);
        let prev = self.flushed.take().map(|b| *b).unwrap_or_default();
        let d = |a: u64, b: u64| a.saturating_sub(b);
        metrics::counter!("edgerelay_turn_allocations_created_total")
            .increment(d(self.allocations_created, prev.allocations_created));
        metrics::counter!("edgerelay_turn_relayed_packets_total", "direction" => "to_peer")
            .increment(d(self.packets_to_peer, prev.packets_to_peer));
        metrics::counter!("edgerelay_turn_relayed_packets_total", "direction" => "to_client")
            .increment(d(self.packets_to_client, prev.packets_to_client));
        metrics::counter!("edgerelay_turn_relayed_bytes_total", "direction" => "to_peer")
            .increment(d(self.bytes_to_peer, prev.bytes_to_peer));
        metrics::counter!("edgerelay_turn_relayed_bytes_total", "direction" => "to_client")
            .increment(d(self.bytes_to_client, prev.bytes_to_client));
        let maps: [Labelled<'_>; 5] = [
            (
                "edgerelay_turn_requests_total",
                "method",
                &self.requests,
                &prev.requests,
            ),
            (
                "edgerelay_turn_auth_failures_total",
                "reason",
                &self.auth_failures,
                &prev.auth_failures,
            ),
            (
                "edgerelay_turn_quota_rejections_total",
                "kind",
                &self.quota_rejections,
                &prev.quota_rejections,
            ),
            (
                "edgerelay_turn_peer_rejections_total",
                "reason",
                &self.peer_rejections,
                &prev.peer_rejections,
            ),
            (
                "edgerelay_turn_dropped_total",
                "reason",
                &self.dropped,
                &prev.dropped,
            ),
        ];
        for (name, label, cur, old) in maps {
            for (k, v) in cur {
                let delta = d(*v, old.get(k).copied().unwrap_or(0));
                if delta > 0 {
                    metrics::counter!(name, label => *k).increment(delta);
                }
            }
        }
        let mut snap = self.clone();
        snap.flushed = None;
        self.flushed = Some(Box::new(snap));
    }
}
