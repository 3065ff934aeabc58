//! The edge's built-in TURN server and its in-process hand-off to the media thread.
//!
//! Packets a TURN client relays to the SFU's own address never touch a socket:
//! the TURN thread queues them on a [`ChannelPeer`] for the media
//! thread (waking it only when it is not already awake); the media thread sends
//! its replies to relayed addresses back through [`TurnHandle::send_from_local`].

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use edgerelay_turn::{ChannelPeer, LocalPacket, LocalPeer, TurnConfig, TurnHandle, TurnServer};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Hand-off queue depth; a full queue drops, as a full socket buffer would.
pub const HANDOFF_CAPACITY: usize = 8192;

/// `[turn]` in edge.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnSection {
    /// Run the built-in TURN server.
    pub enabled: bool,
    /// Lifetime of the TURN REST credentials handed to clients, seconds.
    pub credential_ttl_secs: u64,
    /// Host name or IP put in `turn:`/`turns:` URLs; default: the first public media IP.
    pub url_host: Option<String>,
    /// The media threads frame and send their own packets to viewers relayed over
    /// UDP (ChannelData, from the TURN listener's address) instead of handing each
    /// one to the TURN thread; see `edge::relay_send`. Off: every relayed packet
    /// takes the hand-off.
    pub media_sends: bool,
    /// The TURN server itself (listeners, relay range, secrets, policy, quotas).
    pub server: TurnConfig,
}

impl Default for TurnSection {
    fn default() -> Self {
        TurnSection {
            enabled: false,
            credential_ttl_secs: 3600,
            url_host: None,
            media_sends: true,
            server: TurnConfig::default(),
        }
    }
}

/// One ICE server entry as browsers take it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IceServer {
    /// `turn:` / `turns:` URLs.
    pub urls: Vec<String>,
    /// REST username `<expiry>:<user>`.
    pub username: String,
    /// REST password.
    pub credential: String,
}

/// Wakes the media thread blocked in `recv_from` with a one-byte datagram.
pub struct Waker {
    socket: UdpSocket,
    target: SocketAddr,
    /// True while a wake-up is in flight; the media thread clears it before draining.
    pub pending: AtomicBool,
}

impl Waker {
    /// A waker aimed at the media socket `target`.
    pub fn new(target: SocketAddr) -> std::io::Result<Waker> {
        let bind: SocketAddr = if target.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        Ok(Waker {
            socket: UdpSocket::bind(bind)?,
            target,
            pending: AtomicBool::new(false),
        })
    }

    /// The waker's own address (the media thread ignores datagrams from it).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Wakes the media thread unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.socket.send_to(&[0], self.target);
        }
    }

    /// Wakes unconditionally (commands).
    pub fn wake_now(&self) {
        let _ = self.socket.send_to(&[0], self.target);
    }
}

/// The SFU side of the hand-off, given to the TURN server: the turn crate's
/// channel peer, waking the media thread when a packet is queued.
pub fn handoff(
    addrs: Vec<SocketAddr>,
    waker: Arc<Waker>,
) -> (Arc<ChannelPeer>, Receiver<LocalPacket>) {
    ChannelPeer::with_wake(addrs, HANDOFF_CAPACITY, Box::new(move || waker.wake()))
}

/// Routes relayed packets to the media thread (shard) that owns the SFU address.
pub struct ShardedHandoff {
    shards: Vec<Arc<ChannelPeer>>,
}

impl ShardedHandoff {
    /// One channel per shard: (the shard's SFU addresses, its waker). Returns the
    /// router for TURN and each shard's receiver, in order.
    pub fn new(
        shards: Vec<(Vec<SocketAddr>, Arc<Waker>)>,
    ) -> (Arc<ShardedHandoff>, Vec<Receiver<LocalPacket>>) {
        let (peers, rxs) = shards
            .into_iter()
            .map(|(addrs, waker)| handoff(addrs, waker))
            .unzip();
        (Arc::new(ShardedHandoff { shards: peers }), rxs)
    }
}

impl LocalPeer for ShardedHandoff {
    fn is_local(&self, addr: SocketAddr) -> bool {
        self.shards.iter().any(|p| p.is_local(addr))
    }

    fn deliver(&self, relay: SocketAddr, sfu: SocketAddr, data: &[u8]) {
        if let Some(p) = self.shards.iter().find(|p| p.is_local(sfu)) {
            p.deliver(relay, sfu, data);
        }
    }
}

/// The running TURN server plus what signalling needs to advertise it.
pub struct EdgeTurn {
    server: std::sync::Mutex<Option<TurnServer>>,
    /// Handle for the media thread.
    pub handle: TurnHandle,
    urls: Vec<String>,
    secret: String,
    ttl: u64,
}

impl EdgeTurn {
    /// Starts TURN with the in-process hand-off to the SFU at `sfu_addrs`.
    pub fn start(
        section: &TurnSection,
        sfu_addrs: &[SocketAddr],
        handoff: Arc<dyn LocalPeer>,
    ) -> anyhow::Result<EdgeTurn> {
        let mut cfg = section.server.clone();
        if cfg.rest_secrets.is_empty() {
            // No shared secret configured: mint a private one so this edge can
            // still hand out working credentials (only it can verify them).
            let mut b = [0u8; 24];
            rand::rng().fill_bytes(&mut b);
            cfg.rest_secrets = vec![b.iter().map(|x| format!("{x:02x}")).collect()];
            warn!("turn.server.rest_secrets is empty: using a random per-process secret");
        }
        let secret = cfg.rest_secrets[0].clone();
        let ips: Vec<IpAddr> = sfu_addrs.iter().map(|a| a.ip()).collect();
        let server = TurnServer::start(
            &cfg,
            Some(edgerelay_turn::LocalHandoff { peer: handoff, ips }),
        )
        .map_err(|e| anyhow::anyhow!("turn: cannot start: {e}"))?;
        let host = match &section.url_host {
            Some(h) => h.clone(),
            None => sfu_addrs
                .first()
                .map(|a| match a.ip() {
                    IpAddr::V6(v6) => format!("[{v6}]"),
                    IpAddr::V4(v4) => v4.to_string(),
                })
                .unwrap_or_else(|| "127.0.0.1".into()),
        };
        let mut urls = Vec::new();
        for a in server.udp_addrs() {
            urls.push(format!("turn:{host}:{}?transport=udp", a.port()));
        }
        for a in server.tcp_addrs() {
            urls.push(format!("turn:{host}:{}?transport=tcp", a.port()));
        }
        for a in server.tls_addrs() {
            urls.push(format!("turns:{host}:{}?transport=tcp", a.port()));
        }
        info!(urls = ?urls, "TURN server started");
        Ok(EdgeTurn {
            handle: server.handle(),
            server: std::sync::Mutex::new(Some(server)),
            urls,
            secret,
            ttl: section.credential_ttl_secs,
        })
    }

    /// The TURN URLs this edge advertises.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// A REST user name of its own for one session (`<kind>-<random>`): the TURN
    /// server counts allocations per user, so viewers must not share one name (a
    /// shared name would cap an edge at `max_allocations_per_user` relayed viewers).
    pub fn session_user(kind: &str) -> String {
        format!("{kind}-{:016x}", rand::rng().next_u64())
    }

    /// Fresh REST credentials for `user`.
    pub fn ice_server(&self, user: &str) -> IceServer {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (username, credential) =
            edgerelay_turn::rest_credentials(&self.secret, user, self.ttl, now);
        IceServer {
            urls: self.urls.clone(),
            username,
            credential,
        }
    }

    /// RFC 9725 `Link` header values, one per URL, with fresh credentials.
    pub fn link_headers(&self, user: &str) -> Vec<String> {
        let s = self.ice_server(user);
        s.urls
            .iter()
            .map(|u| {
                format!(
                    "<{u}>; rel=\"ice-server\"; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                    s.username, s.credential
                )
            })
            .collect()
    }

    /// Stops the TURN threads.
    pub fn stop(&self) {
        let server = self.server.lock().ok().and_then(|mut s| s.take());
        if let Some(s) = server {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EdgeTurn;
    use edgerelay_turn::auth::Credentials;

    #[test]
    fn every_session_gets_its_own_quota_user() {
        let a = EdgeTurn::session_user("whep");
        let b = EdgeTurn::session_user("whep");
        assert!(a.starts_with("whep-") && a.len() == 21, "{a}");
        assert_ne!(a, b);
        let (ua, _) = edgerelay_turn::rest_credentials("secret", &a, 600, 1_700_000_000);
        let (ub, _) = edgerelay_turn::rest_credentials("secret", &b, 600, 1_700_000_000);
        assert_ne!(Credentials::quota_user(&ua), Credentials::quota_user(&ub));
        assert_eq!(Credentials::quota_user(&ua), a);
    }
}
