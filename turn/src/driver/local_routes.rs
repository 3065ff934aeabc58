//! The TURN thread's channels to the co-located SFU, published for the SFU's
//! media threads (see [`crate::Server::take_local_routes`]).
//!
//! The TURN thread replaces the whole table when the core reports a change (an
//! allocation, permission or channel created, refreshed or removed: a few times per
//! client per ten minutes). Readers check one atomic version per send round and take
//! the read lock only when it moved, so the packet path holds no lock.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::server::{FxHasher, LocalRoute};

/// Routes keyed by (relayed address, SFU address): the destination and source of
/// the SFU's datagram. Looked up per packet, so with the fast hasher (the keys are
/// this server's own relay addresses and the SFU's).
pub type RouteTable = HashMap<(SocketAddr, SocketAddr), LocalRoute, BuildHasherDefault<FxHasher>>;

/// The published table and its version.
#[derive(Default)]
pub struct LocalRoutes {
    version: AtomicU64,
    table: RwLock<Arc<RouteTable>>,
}

impl LocalRoutes {
    /// Bumped on every publication; compare with the version of a snapshot.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current table and its version (the version may be older than the
    /// table, never newer: a reader re-reads at the next bump).
    pub fn snapshot(&self) -> (u64, Arc<RouteTable>) {
        let v = self.version();
        let t = self.table.read().map(|t| t.clone()).unwrap_or_default();
        (v, t)
    }

    /// Replaces the table (TURN thread).
    pub(crate) fn publish(&self, routes: Vec<LocalRoute>) {
        let table: RouteTable = routes.into_iter().map(|r| ((r.relay, r.sfu), r)).collect();
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
        self.version.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_publication_bumps_the_version_and_replaces_the_table() {
        let r = LocalRoutes::default();
        let (v0, t0) = r.snapshot();
        assert!(t0.is_empty());
        let route = LocalRoute {
            relay: "127.0.0.1:40000".parse().expect("addr"),
            sfu: "127.0.0.1:5000".parse().expect("addr"),
            client: "127.0.0.1:6000".parse().expect("addr"),
            server: "127.0.0.1:3478".parse().expect("addr"),
            channel: 0x4001,
            expires: Instant::now(),
        };
        r.publish(vec![route]);
        let (v1, t1) = r.snapshot();
        assert!(v1 > v0);
        assert_eq!(t1.get(&(route.relay, route.sfu)), Some(&route));
        r.publish(Vec::new());
        assert!(r.version() > v1);
        assert!(r.snapshot().1.is_empty());
    }
}
