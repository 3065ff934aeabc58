//! A minimal sans-IO TURN client (RFC 8656 over UDP) for relayed swarm viewers.
//!
//! It exists so that `edgerelay loadtest --relay udp` can make every viewer reach the
//! edge only through the edge's built-in TURN server, like a browser behind a
//! UDP-blocking NAT would. It covers what a viewer needs and nothing more: Allocate
//! with long-term (REST) credentials (401 then authenticated retry, 438 stale nonce),
//! CreatePermission, ChannelBind, Refresh of the allocation and of the channels before
//! they expire, ChannelData both ways and Data/Send indications as a fallback.
//!
//! The caller owns the socket and the clock: [`TurnClient::handle_input`] takes a
//! received datagram, [`TurnClient::poll_transmit`] yields datagrams for the server,
//! [`TurnClient::handle_timeout`] drives retransmissions (bounded) and refreshes.
//! Received data is never trusted: every parse is checked, nothing unwraps.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgerelay_turn::auth::{long_term_key, ALG_MD5};
use edgerelay_turn::stun::{
    self, attr, decode_xor_addr, is_channel_data, is_stun, method, parse_channel_data, Builder,
    Class, Message,
};

/// First retransmission timeout of a request (RFC 8489 suggests 500 ms).
const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request before it fails (bounded retry).
const MAX_ATTEMPTS: u32 = 5;
/// Authenticated re-sends of one request after 401/438 before it fails.
const MAX_AUTH_RETRIES: u32 = 2;
/// Allocation lifetime asked for, seconds.
const REQUESTED_LIFETIME: u32 = 600;
/// Channel bindings (and with them the permission) are refreshed this often
/// (permissions expire after 300 s, channels after 600 s).
const CHANNEL_REFRESH: Duration = Duration::from_secs(240);
/// First channel number.
const FIRST_CHANNEL: u16 = 0x4000;
/// REQUESTED-TRANSPORT value for UDP.
const PROTO_UDP: u8 = 17;

/// What a request was for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Allocate,
    Refresh,
    /// Refresh with LIFETIME 0: the allocation is deleted (RFC 8656 §7.2).
    Deallocate,
    Permission(Vec<SocketAddr>),
    ChannelBind(u16, SocketAddr),
}

/// One request in flight.
#[derive(Debug)]
struct Transaction {
    tid: [u8; 12],
    kind: Kind,
    bytes: Vec<u8>,
    attempts: u32,
    auth_retries: u32,
    next_send: Instant,
    rto: Duration,
}

/// Something the client wants its owner to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnEvent {
    /// The allocation exists; the relayed transport address.
    Allocated(SocketAddr),
    /// Permissions for these peers are installed.
    PermissionCreated(Vec<SocketAddr>),
    /// A channel to this peer is bound (and usable for ChannelData).
    ChannelBound(SocketAddr),
    /// A request failed for good (error response or no answer after the retries).
    Failed(String),
}

/// What a received datagram was.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnInput<'a> {
    /// Data relayed from a peer (ChannelData or a Data indication).
    Peer(SocketAddr, &'a [u8]),
    /// A STUN message for the client itself (handled; see [`TurnClient::poll_event`]).
    Consumed,
    /// Not understood or not for us (dropped).
    Ignored,
}

/// The client state of one allocation on one TURN server.
#[derive(Debug)]
pub struct TurnClient {
    server: SocketAddr,
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    relayed: Option<SocketAddr>,
    lifetime: Duration,
    refresh_at: Option<Instant>,
    /// Bound (or binding) channels: number, peer, confirmed, next refresh.
    channels: Vec<(u16, SocketAddr, bool, Instant)>,
    pending: Vec<Transaction>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<TurnEvent>,
    buf: Vec<u8>,
}

fn new_tid() -> [u8; 12] {
    rand::random()
}

/// Value of the first attribute of type `t` in a parsed-and-valid STUN message.
fn find_attr(raw: &[u8], t: u16) -> Option<&[u8]> {
    let mut pos = stun::HEADER_LEN;
    while pos + 4 <= raw.len() {
        let at = u16::from_be_bytes([*raw.get(pos)?, *raw.get(pos + 1)?]);
        let len = u16::from_be_bytes([*raw.get(pos + 2)?, *raw.get(pos + 3)?]) as usize;
        let v = raw.get(pos + 4..pos + 4 + len)?;
        if at == t {
            return Some(v);
        }
        pos += 4 + ((len + 3) & !3);
    }
    None
}

/// The ERROR-CODE number of a response, if any.
fn error_code(raw: &[u8]) -> Option<u16> {
    let v = find_attr(raw, attr::ERROR_CODE)?;
    let class = u16::from(*v.get(2)? & 0x07);
    let number = u16::from(*v.get(3)?);
    Some(class * 100 + number)
}

impl TurnClient {
    /// A client for `server` with long-term credentials; queues the first Allocate.
    pub fn new(server: SocketAddr, username: &str, password: &str, now: Instant) -> Self {
        let mut c = TurnClient {
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            relayed: None,
            lifetime: Duration::from_secs(u64::from(REQUESTED_LIFETIME)),
            refresh_at: None,
            channels: Vec::new(),
            pending: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            buf: Vec::with_capacity(256),
        };
        c.start(now, Kind::Allocate);
        c
    }

    /// The TURN server's address (where every datagram of this client goes).
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The relayed transport address once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Asks for permissions to `peers` (one CreatePermission request).
    pub fn create_permission(&mut self, now: Instant, peers: &[SocketAddr]) {
        self.start(now, Kind::Permission(peers.to_vec()));
    }

    /// Binds a channel to `peer` (no-op if one exists); returns its number.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Option<u16> {
        if let Some(c) = self.channels.iter().find(|c| c.1 == peer) {
            return Some(c.0);
        }
        let n = FIRST_CHANNEL.checked_add(u16::try_from(self.channels.len()).ok()?)?;
        if n > 0x4FFF {
            return None;
        }
        self.channels.push((n, peer, false, now + CHANNEL_REFRESH));
        self.start(now, Kind::ChannelBind(n, peer));
        Some(n)
    }

    /// Next datagram to send to [`Self::server`].
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retx = self.pending.iter().map(|t| t.next_send).min();
        let ch = self.channels.iter().filter(|c| c.2).map(|c| c.3).min();
        [retx, ch, self.refresh_at].into_iter().flatten().min()
    }

    /// Retransmits, fails requests out of attempts, refreshes the allocation and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut failed = Vec::new();
        for t in &mut self.pending {
            if t.next_send > now {
                continue;
            }
            if t.attempts >= MAX_ATTEMPTS {
                failed.push(t.tid);
                continue;
            }
            t.attempts += 1;
            self.out.push_back(t.bytes.clone());
            t.next_send = now + t.rto;
            t.rto = t.rto.saturating_mul(2);
        }
        for tid in failed {
            if let Some(i) = self.pending.iter().position(|t| t.tid == tid) {
                let t = self.pending.remove(i);
                self.events
                    .push_back(TurnEvent::Failed(format!("{:?}: no answer", t.kind)));
            }
        }
        if self.refresh_at.is_some_and(|r| r <= now) {
            self.refresh_at = None;
            self.start(now, Kind::Refresh);
        }
        let due: Vec<(u16, SocketAddr)> = self
            .channels
            .iter_mut()
            .filter(|c| c.2 && c.3 <= now)
            .map(|c| {
                c.3 = now + CHANNEL_REFRESH;
                (c.0, c.1)
            })
            .collect();
        for (n, peer) in due {
            self.start(now, Kind::ChannelBind(n, peer));
        }
    }

    /// Deletes the allocation (a Refresh with LIFETIME 0), as a browser does when it
    /// closes: the server frees it now instead of at its expiry, and a later client
    /// on the same local port is not refused with 437 (allocation mismatch).
    pub fn deallocate(&mut self, now: Instant) {
        if self.relayed.is_some() {
            self.start(now, Kind::Deallocate);
        }
    }

    /// Encodes `payload` for `peer`: ChannelData when a channel is bound, else a Send
    /// indication. Returns false when there is no allocation yet.
    pub fn encode_to_peer(&self, peer: SocketAddr, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if self.relayed.is_none() {
            return false;
        }
        out.clear();
        if let Some(&(n, _, true, _)) = self.channels.iter().find(|c| c.1 == peer) {
            let Ok(len) = u16::try_from(payload.len()) else {
                return false;
            };
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(payload);
            // UDP needs no padding.
            return true;
        }
        Builder::new(out, method::SEND, Class::Indication, new_tid())
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload);
        true
    }

    /// Handles one datagram received from the server.
    pub fn handle_input<'a>(&mut self, now: Instant, data: &'a [u8]) -> TurnInput<'a> {
        if is_channel_data(data) {
            let Some((n, payload)) = parse_channel_data(data) else {
                return TurnInput::Ignored;
            };
            return match self.channels.iter().find(|c| c.0 == n) {
                Some(c) => TurnInput::Peer(c.1, payload),
                None => TurnInput::Ignored,
            };
        }
        if !is_stun(data) {
            return TurnInput::Ignored;
        }
        let Ok(m) = Message::parse(data) else {
            return TurnInput::Ignored;
        };
        if m.method == method::DATA && m.class == Class::Indication {
            return match (m.peer(0), m.data) {
                (Some(p), Some(d)) => TurnInput::Peer(p, d),
                _ => TurnInput::Ignored,
            };
        }
        let Some(i) = self.pending.iter().position(|t| t.tid == m.tid) else {
            return TurnInput::Ignored;
        };
        match m.class {
            Class::Success => {
                // Answers to authenticated requests must carry our integrity.
                if let Some(k) = &self.key {
                    if m.verify_integrity(k).is_none() {
                        return TurnInput::Ignored;
                    }
                }
                let t = self.pending.remove(i);
                self.on_success(now, t.kind, &m);
            }
            Class::Error => {
                let code = error_code(m.raw).unwrap_or(0);
                let t = self.pending.remove(i);
                if (code == 401 || code == 438) && t.auth_retries < MAX_AUTH_RETRIES {
                    let realm = m.realm.and_then(|r| std::str::from_utf8(r).ok());
                    if let (Some(realm), Some(nonce)) = (realm, m.nonce) {
                        self.realm = Some(realm.to_owned());
                        self.nonce = Some(nonce.to_vec());
                        self.key = Some(long_term_key(
                            &self.username,
                            realm,
                            &self.password,
                            ALG_MD5,
                        ));
                        self.restart(now, t.kind, t.auth_retries + 1);
                        return TurnInput::Consumed;
                    }
                }
                self.events
                    .push_back(TurnEvent::Failed(format!("{:?}: error {code}", t.kind)));
            }
            _ => return TurnInput::Ignored,
        }
        TurnInput::Consumed
    }

    fn on_success(&mut self, now: Instant, kind: Kind, m: &Message<'_>) {
        match kind {
            Kind::Allocate => {
                let relayed = find_attr(m.raw, attr::XOR_RELAYED_ADDRESS)
                    .and_then(|v| decode_xor_addr(v, &m.tid));
                let Some(relayed) = relayed else {
                    self.events
                        .push_back(TurnEvent::Failed("Allocate: no XOR-RELAYED-ADDRESS".into()));
                    return;
                };
                self.relayed = Some(relayed);
                self.set_lifetime(now, m.lifetime);
                self.events.push_back(TurnEvent::Allocated(relayed));
            }
            Kind::Refresh => self.set_lifetime(now, m.lifetime),
            Kind::Deallocate => {
                self.relayed = None;
                self.refresh_at = None;
            }
            Kind::Permission(peers) => self.events.push_back(TurnEvent::PermissionCreated(peers)),
            Kind::ChannelBind(n, peer) => {
                let mut first = false;
                if let Some(c) = self.channels.iter_mut().find(|c| c.0 == n) {
                    first = !c.2;
                    c.2 = true;
                }
                if first {
                    self.events.push_back(TurnEvent::ChannelBound(peer));
                }
            }
        }
    }

    fn set_lifetime(&mut self, now: Instant, secs: Option<u32>) {
        let secs = secs.unwrap_or(REQUESTED_LIFETIME).max(2);
        self.lifetime = Duration::from_secs(u64::from(secs));
        // Refresh at half-life (at least 1 s before expiry).
        self.refresh_at = Some(now + self.lifetime / 2);
    }

    fn start(&mut self, now: Instant, kind: Kind) {
        self.restart(now, kind, 0);
    }

    fn restart(&mut self, now: Instant, kind: Kind, auth_retries: u32) {
        let tid = new_tid();
        let bytes = self.encode(&kind, tid);
        self.out.push_back(bytes.clone());
        self.pending.push(Transaction {
            tid,
            kind,
            bytes,
            attempts: 1,
            auth_retries,
            next_send: now + RTO,
            rto: RTO.saturating_mul(2),
        });
    }

    fn encode(&mut self, kind: &Kind, tid: [u8; 12]) -> Vec<u8> {
        let m = match kind {
            Kind::Allocate => method::ALLOCATE,
            Kind::Refresh | Kind::Deallocate => method::REFRESH,
            Kind::Permission(_) => method::CREATE_PERMISSION,
            Kind::ChannelBind(..) => method::CHANNEL_BIND,
        };
        let mut buf = std::mem::take(&mut self.buf);
        {
            let mut b = Builder::new(&mut buf, m, Class::Request, tid);
            match kind {
                Kind::Allocate => {
                    b.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
                    b.u32_attr(attr::LIFETIME, REQUESTED_LIFETIME);
                }
                Kind::Refresh => {
                    b.u32_attr(attr::LIFETIME, REQUESTED_LIFETIME);
                }
                Kind::Deallocate => {
                    b.u32_attr(attr::LIFETIME, 0);
                }
                Kind::Permission(peers) => {
                    for p in peers {
                        b.xor_addr(attr::XOR_PEER_ADDRESS, *p);
                    }
                }
                Kind::ChannelBind(n, peer) => {
                    b.attr(attr::CHANNEL_NUMBER, &[(n >> 8) as u8, *n as u8, 0, 0]);
                    b.xor_addr(attr::XOR_PEER_ADDRESS, *peer);
                }
            }
            if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
                b.attr(attr::USERNAME, self.username.as_bytes());
                b.attr(attr::REALM, realm.as_bytes());
                b.attr(attr::NONCE, nonce);
                b.integrity(key, false);
            }
            b.fingerprint();
        }
        let out = buf.clone();
        self.buf = buf;
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use edgerelay_turn::policy::Cidr;
    use edgerelay_turn::server::RelayRequest;
    use edgerelay_turn::{Action, FiveTuple, Relay, RelayAllocator, Server, Transport, TurnConfig};

    use super::*;

    struct OneRelay;

    impl RelayAllocator for OneRelay {
        fn allocate(&mut self, _r: &RelayRequest, _t: &FiveTuple) -> Option<(Relay, Option<u64>)> {
            Some((
                Relay {
                    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 50001),
                    id: 1,
                },
                None,
            ))
        }
        fn release(&mut self, _r: &Relay) {}
    }

    /// Feeds every queued request of the client to the real sans-IO server core and
    /// the answers back; returns the client's events.
    fn exchange(
        srv: &mut Server,
        c: &mut TurnClient,
        tuple: FiveTuple,
        now: Instant,
    ) -> Vec<TurnEvent> {
        let mut events = Vec::new();
        for _ in 0..20 {
            let Some(req) = c.poll_transmit() else { break };
            if let Action::ToClient { data, .. } =
                srv.handle_client(now, tuple, &req, &mut OneRelay)
            {
                let resp = data.to_vec();
                assert_eq!(c.handle_input(now, &resp), TurnInput::Consumed);
            }
            while let Some(e) = c.poll_event() {
                events.push(e);
            }
        }
        events
    }

    #[test]
    fn error_code_and_attr_lookup() {
        let mut buf = Vec::new();
        Builder::new(&mut buf, method::ALLOCATE, Class::Error, [1; 12])
            .error(438, "Stale Nonce")
            .attr(attr::NONCE, b"abc");
        assert_eq!(error_code(&buf), Some(438));
        assert_eq!(find_attr(&buf, attr::NONCE), Some(&b"abc"[..]));
        assert_eq!(find_attr(&buf, attr::REALM), None);
        // Truncated input never panics.
        for n in 0..buf.len() {
            let _ = find_attr(&buf[..n], attr::NONCE);
            let _ = error_code(&buf[..n]);
        }
    }

    #[test]
    fn garbage_is_ignored_and_retries_are_bounded() {
        let now = Instant::now();
        let server: SocketAddr = "192.0.2.1:3478".parse().expect("addr");
        let mut c = TurnClient::new(server, "u", "p", now);
        assert!(c.poll_transmit().is_some());
        for junk in [
            &[][..],
            &[0x40, 0x00, 0xff, 0xff][..],
            &[0u8; 20][..],
            &[0xff; 64][..],
        ] {
            assert_eq!(c.handle_input(now, junk), TurnInput::Ignored);
        }
        let mut t = now;
        let mut sent = 0;
        for _ in 0..100 {
            let Some(next) = c.poll_timeout() else { break };
            t = next.max(t);
            c.handle_timeout(t);
            while c.poll_transmit().is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, (MAX_ATTEMPTS - 1) as usize);
        assert!(matches!(c.poll_event(), Some(TurnEvent::Failed(_))));
        assert!(c.poll_timeout().is_none());
    }

    #[test]
    fn allocates_binds_refreshes_and_relays_against_the_server_core() {
        let mut cfg = TurnConfig::default();
        cfg.users.insert("alice".into(), "secret".into());
        cfg.allowed_peer_cidrs = vec!["203.0.113.0/24".parse::<Cidr>().expect("cidr")];
        let now = Instant::now();
        let mut srv = Server::new(&cfg, now, 1_700_000_000);
        let server: SocketAddr = "198.51.100.1:3478".parse().expect("addr");
        let tuple = FiveTuple {
            transport: Transport::Udp,
            client: "192.0.2.7:40000".parse().expect("addr"),
            local: server,
        };
        let peer: SocketAddr = "203.0.113.5:5000".parse().expect("addr");
        let mut c = TurnClient::new(server, "alice", "secret", now);
        let ev = exchange(&mut srv, &mut c, tuple, now);
        let relayed = c.relayed().expect("allocated");
        assert_eq!(ev, vec![TurnEvent::Allocated(relayed)]);
        c.create_permission(now, &[peer]);
        assert_eq!(c.bind_channel(now, peer), Some(FIRST_CHANNEL));
        let ev = exchange(&mut srv, &mut c, tuple, now);
        assert_eq!(
            ev,
            vec![
                TurnEvent::PermissionCreated(vec![peer]),
                TurnEvent::ChannelBound(peer)
            ]
        );
        let mut out = Vec::new();
        assert!(c.encode_to_peer(peer, b"hello", &mut out));
        assert_eq!(&out[..4], &[0x40, 0x00, 0x00, 0x05]);
        let cd = [0x40, 0x00, 0x00, 0x02, 9, 8, 0, 0];
        assert_eq!(c.handle_input(now, &cd), TurnInput::Peer(peer, &[9, 8][..]));
        // Refresh and channel refresh are answered and re-arm the timers.
        let later = now + Duration::from_secs(300);
        c.handle_timeout(later);
        let ev = exchange(&mut srv, &mut c, tuple, later);
        assert!(ev.is_empty(), "{ev:?}");
        assert!(c.pending.is_empty());
        assert!(c.poll_timeout().is_some_and(|t| t > later));
    }
}
