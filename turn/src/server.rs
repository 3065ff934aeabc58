//! The sans-IO TURN server core.
//!
//! The core owns allocations, permissions and channels. It never touches a socket
//! or reads a clock: drivers feed it datagrams/frames with the current time and
//! carry out the single [`Action`] each input produces.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{self, AuthFailure, Credentials, NonceKey};
use crate::config::TurnConfig;
use crate::metrics::Stats;
use crate::policy::PeerPolicy;
use crate::stun::{self, attr, method, Builder, Class, Message};

/// Transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP (STUN and ChannelData framed on the stream).
    Tcp,
    /// TLS over TCP (TURNS).
    Tls,
}

impl Transport {
    /// Stream transports pad ChannelData to 4 bytes.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The client-side 5-tuple identifying an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Transport.
    pub transport: Transport,
    /// Client address as seen by the server.
    pub client: SocketAddr,
    /// Server address the client talks to.
    pub local: SocketAddr,
}

/// Address family of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// A relay endpoint provided by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    /// Address advertised in XOR-RELAYED-ADDRESS (and used as key in [`Server::handle_peer`]).
    pub addr: SocketAddr,
    /// Driver-chosen identifier, returned in [`Action::ToPeer`] so the driver finds its socket.
    pub id: u64,
}

/// What an Allocate asks of the relay allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest {
    /// Address family.
    pub family: Family,
    /// EVEN-PORT: the port must be even.
    pub even_port: bool,
    /// EVEN-PORT with R bit: also reserve port + 1 and return a reservation token.
    pub reserve_next: bool,
    /// RESERVATION-TOKEN: use the port reserved earlier under this token.
    pub reservation: Option<u64>,
}

/// Relay port allocation, implemented by the driver (e.g. one UDP socket per allocation).
pub trait RelayAllocator {
    /// Reserve a relay endpoint for the allocation of `tuple`. Returns the relay
    /// and, when `req.reserve_next` was honoured, the reservation token for port + 1
    /// (tokens expire after 30 s, RFC 8656 §7.2).
    fn allocate(&mut self, req: &RelayRequest, tuple: &FiveTuple) -> Option<(Relay, Option<u64>)>;
    /// Release a relay endpoint (allocation expired or deleted).
    fn release(&mut self, relay: &Relay);
}

/// The co-located SFU, for the in-process hand-off.
///
/// `is_local` must be cheap (it is called on permission and channel creation).
/// `deliver` is called by drivers for [`Action::ToLocal`] on the TURN thread;
/// it must not block (push into a bounded channel and drop when full).
pub trait LocalPeer: Send + Sync {
    /// Whether `addr` is one of the SFU's own media addresses.
    fn is_local(&self, addr: SocketAddr) -> bool;
    /// Hand a relayed packet to the SFU: it arrives from `relay` (the remote
    /// candidate the SFU sees) to the SFU address `sfu`.
    fn deliver(&self, relay: SocketAddr, sfu: SocketAddr, data: &[u8]);
}

/// A UDP allocation's channel to the co-located SFU: all the SFU needs to frame
/// and send its own packets to the relayed client itself, without handing each
/// one to the TURN thread (see [`Server::take_local_routes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRoute {
    /// The relayed address (the SFU's remote candidate for this client).
    pub relay: SocketAddr,
    /// The SFU address the channel is bound to.
    pub sfu: SocketAddr,
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server's UDP listener address the client talks to.
    pub server: SocketAddr,
    /// The bound channel number (ChannelData header).
    pub channel: u16,
    /// When the channel, its permission or the allocation runs out, whichever is first.
    pub expires: Instant,
}

/// What the driver must do after an input.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Nothing (dropped, or consumed).
    None,
    /// Send `data` to the client on `tuple` (a STUN message or ChannelData frame).
    ToClient {
        /// Destination 5-tuple.
        tuple: FiveTuple,
        /// Bytes to send.
        data: &'a [u8],
    },
    /// Send `data` from the relay socket `relay_id` to `peer`.
    ToPeer {
        /// The relay id given by the [`RelayAllocator`].
        relay_id: u64,
        /// The relayed address.
        relay: SocketAddr,
        /// Destination peer.
        peer: SocketAddr,
        /// Payload.
        data: &'a [u8],
    },
    /// Hand `data` to the co-located SFU in-process ([`LocalPeer::deliver`]).
    ToLocal {
        /// Relayed address (source as seen by the SFU).
        relay: SocketAddr,
        /// SFU address.
        sfu: SocketAddr,
        /// Payload.
        data: &'a [u8],
    },
}

/// Small fast hasher for socket addresses (FxHash-like; keys are not attacker-chosen
/// beyond their own address, and tables are bounded by quotas).
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

struct Perm {
    ip: IpAddr,
    expires: Instant,
    /// Relaying to this IP through the kernel is allowed by policy.
    external_ok: bool,
}

struct Chan {
    num: u16,
    peer: SocketAddr,
    expires: Instant,
    local: bool,
}

struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self, now: Instant, n: f64) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The client -> peer leg shared by ChannelData and Send indications: permission,
/// peer policy and bandwidth checks, then where the payload goes.
fn relay_to_peer<'a>(
    stats: &mut Stats,
    a: &mut Allocation,
    now: Instant,
    peer: SocketAddr,
    local: bool,
    payload: &'a [u8],
) -> Action<'a> {
    let Some(p) = a.perm(peer.ip(), now) else {
        stats.drop_reason("no_permission");
        return Action::None;
    };
    if !local && !p.external_ok {
        stats.drop_reason("peer_policy");
        return Action::None;
    }
    if !a.bucket.take(now, payload.len() as f64) {
        stats.quota("bandwidth");
        return Action::None;
    }
    stats.relayed_to_peer(payload.len());
    if local {
        Action::ToLocal {
            relay: a.relay.addr,
            sfu: peer,
            data: payload,
        }
    } else {
        Action::ToPeer {
            relay_id: a.relay.id,
            relay: a.relay.addr,
            peer,
            data: payload,
        }
    }
}

struct Allocation {
    tuple: FiveTuple,
    relay: Relay,
    username: String,
    quota_user: String,
    expires: Instant,
    alloc_tid: [u8; 12],
    perms: Vec<Perm>,
    chans: Vec<Chan>,
    bucket: TokenBucket,
}

impl Allocation {
    fn perm(&self, ip: IpAddr, now: Instant) -> Option<&Perm> {
        self.perms.iter().find(|p| p.ip == ip && p.expires > now)
    }
}

/// Per-source token buckets in a fixed table (no per-source allocation).
struct RateLimiter {
    rate: f64,
    buckets: Vec<(f32, Option<Instant>)>,
}

impl RateLimiter {
    const SIZE: usize = 4096;
    fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            buckets: vec![(0.0, None); Self::SIZE],
        }
    }
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let mut h = FxHasher::default();
        match ip {
            IpAddr::V4(v) => h.write_u32(u32::from(v)),
            IpAddr::V6(v) => h.write(&v.octets()),
        }
        let i = (h.finish() >> 20) as usize % Self::SIZE;
        let cap = 2.0 * self.rate;
        let (tokens, last) = &mut self.buckets[i];
        let t = match last {
            None => cap,
            Some(l) => (f64::from(*tokens)
                + now.saturating_duration_since(*l).as_secs_f64() * self.rate)
                .min(cap),
        };
        *last = Some(now);
        if t >= 1.0 {
            *tokens = (t - 1.0) as f32;
            true
        } else {
            *tokens = t as f32;
            false
        }
    }
}

struct Authed {
    username: String,
    key: Vec<u8>,
    sha256: bool,
}

/// The TURN server core.
pub struct Server {
    creds: Credentials,
    nonces: NonceKey,
    policy: PeerPolicy,
    local: Option<Arc<dyn LocalPeer>>,
    cfg: TurnConfig,
    base: Instant,
    base_unix: u64,
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    by_tuple: FxMap<FiveTuple, usize>,
    by_relay: FxMap<SocketAddr, usize>,
    per_user: HashMap<String, usize>,
    limiter: RateLimiter,
    out: Vec<u8>,
    stats: Stats,
    next_sweep: Instant,
    /// An allocation, permission or channel was created, refreshed or removed
    /// since [`Server::take_local_routes`] last ran.
    routes_changed: bool,
}

const SWEEP: Duration = Duration::from_secs(1);

impl Server {
    /// A server for `cfg`; `now`/`now_unix` anchor the monotonic and wall clocks
    /// (wall time is needed for REST credential expiry and nonces).
    pub fn new(cfg: &TurnConfig, now: Instant, now_unix: u64) -> Server {
        let creds = Credentials::new(&cfg.realm, cfg.users.clone(), cfg.rest_secrets.clone());
        let policy = PeerPolicy::new(cfg.allowed_peer_cidrs.clone(), vec![])
            .allow_loopback_for_testing(cfg.allow_loopback_peers_for_testing);
        if cfg.allow_loopback_peers_for_testing {
            tracing::warn!(
                "!!! TURN allow_loopback_peers_for_testing is ON: loopback peers can be relayed to. \
                 NEVER use this in production !!!"
            );
        }
        Server {
            creds,
            nonces: NonceKey::new(rand::random(), u64::from(cfg.nonce_lifetime_secs.max(1))),
            policy,
            local: None,
            cfg: cfg.clone(),
            base: now,
            base_unix: now_unix,
            slots: Vec::new(),
            free: Vec::new(),
            by_tuple: FxMap::default(),
            by_relay: FxMap::default(),
            per_user: HashMap::new(),
            limiter: RateLimiter::new(cfg.unauth_responses_per_sec),
            out: Vec::with_capacity(1500),
            stats: Stats::default(),
            next_sweep: now + SWEEP,
            routes_changed: false,
        }
    }

    /// Register the co-located SFU for the in-process hand-off; `sfu_ips` are
    /// allowed as peers by policy (exact socket addresses are checked with
    /// [`LocalPeer::is_local`]).
    pub fn set_local_peer(&mut self, local: Arc<dyn LocalPeer>, sfu_ips: &[IpAddr]) {
        for ip in sfu_ips {
            self.policy.add_local_ip(*ip);
        }
        self.local = Some(local);
    }

    /// Counters (also exported through the `metrics` crate on every timeout).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_tuple.len()
    }

    /// Whether `addr` is the relayed address of a live allocation.
    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.by_relay.contains_key(&addr)
    }

    fn unix(&self, now: Instant) -> u64 {
        self.base_unix + now.saturating_duration_since(self.base).as_secs()
    }

    /// When [`Server::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.next_sweep
    }

    /// Expire allocations, permissions and channels; flush metrics.
    pub fn handle_timeout(&mut self, now: Instant, relays: &mut dyn RelayAllocator) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP;
        let mut expired = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(a) = slot {
                if a.expires <= now {
                    expired.push(i);
                    continue;
                }
                a.perms.retain(|p| p.expires > now);
                a.chans.retain(|c| c.expires > now);
            }
        }
        for i in expired {
            tracing::debug!("allocation expired");
            self.remove(i, relays);
        }
        let (mut perms, mut chans) = (0, 0);
        for a in self.slots.iter().flatten() {
            perms += a.perms.len();
            chans += a.chans.len();
        }
        self.stats
            .flush(self.by_tuple.len(), perms, chans, self.cfg.max_allocations);
    }

    /// The client on `tuple` went away (TCP/TLS connection closed): delete its allocation.
    pub fn close_client(&mut self, tuple: &FiveTuple, relays: &mut dyn RelayAllocator) {
        if let Some(&i) = self.by_tuple.get(tuple) {
            self.remove(i, relays);
        }
    }

    /// The UDP allocations' live channels to the co-located SFU, if anything that
    /// decides them changed since the last call (None: the last list still holds;
    /// entries past their `expires` must be ignored by the user).
    ///
    /// The SFU's own packets to a relayed client are the bulk of what a co-located
    /// TURN server relays; with these the SFU's media thread frames and sends them
    /// itself, from a clone of the listener socket, instead of handing each one to
    /// the TURN thread. Those packets skip the allocation's bandwidth bucket (it
    /// guards against clients relaying to arbitrary peers; the SFU's output is
    /// bounded by the stream it forwards).
    pub fn take_local_routes(&mut self, now: Instant) -> Option<Vec<LocalRoute>> {
        if !std::mem::take(&mut self.routes_changed) {
            return None;
        }
        let mut routes = Vec::new();
        for a in self.slots.iter().flatten() {
            if a.tuple.transport != Transport::Udp {
                continue;
            }
            for c in a.chans.iter().filter(|c| c.local && c.expires > now) {
                let Some(p) = a.perm(c.peer.ip(), now) else {
                    continue;
                };
                routes.push(LocalRoute {
                    relay: a.relay.addr,
                    sfu: c.peer,
                    client: a.tuple.client,
                    server: a.tuple.local,
                    channel: c.num,
                    expires: c.expires.min(p.expires).min(a.expires),
                });
            }
        }
        Some(routes)
    }

    fn remove(&mut self, i: usize, relays: &mut dyn RelayAllocator) {
        self.routes_changed = true;
        if let Some(a) = self.slots.get_mut(i).and_then(Option::take) {
            self.by_tuple.remove(&a.tuple);
            self.by_relay.remove(&a.relay.addr);
            if let Some(n) = self.per_user.get_mut(&a.quota_user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(&a.quota_user);
                }
            }
            relays.release(&a.relay);
            self.free.push(i);
        }
    }

    /// Handle one datagram (UDP) or frame (TCP/TLS) from a client.
    pub fn handle_client<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
        relays: &mut dyn RelayAllocator,
    ) -> Action<'a> {
        if stun::is_channel_data(data) {
            return self.channel_data(now, tuple, data);
        }
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                self.stats.drop_reason(match e {
                    stun::ParseError::Oversized => "oversized",
                    _ => "malformed",
                });
                tracing::trace!(client = %tuple.client, "dropped malformed STUN: {e}");
                return Action::None;
            }
        };
        match msg.class {
            Class::Indication => {
                if msg.method == method::SEND {
                    return self.send_indication(now, tuple, &msg);
                }
                Action::None
            }
            Class::Request => self.request(now, tuple, &msg, relays),
            _ => {
                self.stats.drop_reason("unexpected_class");
                Action::None
            }
        }
    }

    fn channel_data<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
    ) -> Action<'a> {
        let Some((num, payload)) = stun::parse_channel_data(data) else {
            self.stats.drop_reason("malformed");
            return Action::None;
        };
        if data.len() > 4 + payload.len() + 3 {
            self.stats.drop_reason("malformed");
            return Action::None;
        }
        let Some(&i) = self.by_tuple.get(&tuple) else {
            self.stats.drop_reason("no_allocation");
            return Action::None;
        };
        let Some(a) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return Action::None;
        };
        let Some(ch) = a.chans.iter().find(|c| c.num == num && c.expires > now) else {
            self.stats.drop_reason("no_channel");
            return Action::None;
        };
        let (peer, local) = (ch.peer, ch.local);
        relay_to_peer(&mut self.stats, a, now, peer, local, payload)
    }

    fn send_indication<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'a>,
    ) -> Action<'a> {
        let (Some(peer), Some(payload)) = (msg.peer(0), msg.data) else {
            self.stats.drop_reason("malformed");
            return Action::None;
        };
        let Some(&i) = self.by_tuple.get(&tuple) else {
            self.stats.drop_reason("no_allocation");
            return Action::None;
        };
        let local_peer = self.local.clone();
        let Some(a) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return Action::None;
        };
        let local = local_peer.is_some_and(|l| l.is_local(peer));
        relay_to_peer(&mut self.stats, a, now, peer, local, payload)
    }

    /// Handle a datagram that arrived on relay address `relay` from `peer`
    /// (or, for the hand-off, a packet the SFU at `peer` sends to `relay`).
    ///
    /// The payload is `buf[start..end]`. When `start >= 4` and `buf.len() >= end + 3`
    /// and a channel is bound, the ChannelData header and padding are written in
    /// place and the returned slice borrows `buf` (no copy); otherwise the
    /// message is built in an internal buffer.
    pub fn handle_peer<'a>(
        &'a mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        buf: &'a mut [u8],
        start: usize,
        end: usize,
    ) -> Action<'a> {
        if start > end || end > buf.len() || end - start > 65_535 {
            self.stats.drop_reason("oversized");
            return Action::None;
        }
        let Some(&i) = self.by_relay.get(&relay) else {
            self.stats.drop_reason("no_allocation");
            return Action::None;
        };
        let Some(a) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return Action::None;
        };
        if a.perm(peer.ip(), now).is_none() {
            self.stats.drop_reason("no_permission");
            return Action::None;
        }
        let len = end - start;
        if !a.bucket.take(now, len as f64) {
            self.stats.quota("bandwidth");
            return Action::None;
        }
        let tuple = a.tuple;
        let chan = a
            .chans
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.num);
        self.stats.relayed_to_client(len);
        if let Some(num) = chan {
            let pad = if tuple.transport.is_stream() {
                (4 - len % 4) % 4
            } else {
                0
            };
            if start >= 4 && buf.len() >= end + pad {
                buf[start - 4..start - 2].copy_from_slice(&num.to_be_bytes());
                buf[start - 2..start].copy_from_slice(&(len as u16).to_be_bytes());
                buf[end..end + pad].fill(0);
                return Action::ToClient {
                    tuple,
                    data: &buf[start - 4..end + pad],
                };
            }
            self.out.clear();
            self.out.extend_from_slice(&num.to_be_bytes());
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
            self.out.extend_from_slice(&buf[start..end]);
            self.out.extend_from_slice(&[0u8; 3][..pad]);
            return Action::ToClient {
                tuple,
                data: &self.out,
            };
        }
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&rand::random::<u64>().to_ne_bytes());
        Builder::new(&mut self.out, method::DATA, Class::Indication, tid)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, &buf[start..end]);
        Action::ToClient {
            tuple,
            data: &self.out,
        }
    }

    // ---- requests ----

    fn request<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        relays: &mut dyn RelayAllocator,
    ) -> Action<'a> {
        self.stats.request(msg.method);
        if msg.method == method::BINDING {
            let mut b = Builder::new(&mut self.out, method::BINDING, Class::Success, msg.tid);
            b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
            if let Some(s) = &self.cfg.software {
                b.attr(attr::SOFTWARE, s.as_bytes());
            }
            if msg.has_fingerprint {
                b.fingerprint();
            }
            return self.reply(tuple);
        }
        let known = matches!(
            msg.method,
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND
        );
        if !known {
            return self.unauth_error(now, tuple, msg, 400, "Bad Request", false);
        }
        if msg.unknown_count > 0 {
            if !self.limiter.allow(tuple.client.ip(), now) {
                self.stats.drop_reason("rate_limited");
                return Action::None;
            }
            let mut v = Vec::new();
            for t in &msg.unknown[..msg.unknown_count] {
                v.extend_from_slice(&t.to_be_bytes());
            }
            let mut b = Builder::new(&mut self.out, msg.method, Class::Error, msg.tid);
            b.error(420, "Unknown Attribute")
                .attr(attr::UNKNOWN_ATTRIBUTES, &v);
            if msg.has_fingerprint {
                b.fingerprint();
            }
            return self.reply(tuple);
        }
        let auth = match self.authenticate(now, tuple, msg) {
            Ok(a) => a,
            Err((code, reason, nonce)) => {
                return self.unauth_error(now, tuple, msg, code, reason, nonce);
            }
        };
        let res = match msg.method {
            method::ALLOCATE => self.allocate(now, tuple, msg, &auth, relays),
            method::REFRESH => self.refresh(now, tuple, msg, &auth, relays),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, msg, &auth),
            _ => self.channel_bind(now, tuple, msg, &auth),
        };
        // Success responses are fully built by the handlers; errors here.
        if res.is_ok() {
            self.routes_changed = true;
        }
        if let Err((code, reason)) = res {
            tracing::debug!(client = %tuple.client, method = msg.method, code, reason, "TURN request refused");
            let mut b = Builder::new(&mut self.out, msg.method, Class::Error, msg.tid);
            b.error(code, reason);
            if let Some(s) = &self.cfg.software {
                b.attr(attr::SOFTWARE, s.as_bytes());
            }
            b.integrity(&auth.key, auth.sha256);
            if msg.has_fingerprint {
                b.fingerprint();
            }
        }
        self.reply(tuple)
    }

    fn reply(&self, tuple: FiveTuple) -> Action<'_> {
        Action::ToClient {
            tuple,
            data: &self.out,
        }
    }

    /// An error response before authentication: rate limited per source IP.
    fn unauth_error(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        code: u16,
        reason: &str,
        with_nonce: bool,
    ) -> Action<'_> {
        if !self.limiter.allow(tuple.client.ip(), now) {
            self.stats.drop_reason("rate_limited");
            return Action::None;
        }
        let nonce = with_nonce.then(|| self.nonces.mint(self.unix(now), tuple.client.ip()));
        let mut b = Builder::new(&mut self.out, msg.method, Class::Error, msg.tid);
        b.error(code, reason);
        if let Some(n) = &nonce {
            b.attr(attr::REALM, self.creds.realm().as_bytes());
            b.attr(attr::NONCE, n.as_bytes());
        }
        if let Some(s) = &self.cfg.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if msg.has_fingerprint {
            b.fingerprint();
        }
        self.reply(tuple)
    }

    #[allow(clippy::type_complexity)]
    fn authenticate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authed, (u16, &'static str, bool)> {
        if msg.integrity.is_none() && msg.integrity_sha256.is_none() {
            self.stats.auth_failure("missing");
            return Err((401, "Unauthorized", true));
        }
        let (Some(user), Some(realm), Some(nonce)) = (msg.username, msg.realm, msg.nonce) else {
            self.stats.auth_failure("bad_request");
            return Err((400, "Bad Request", false));
        };
        let unix = self.unix(now);
        if let Err(stale) = self.nonces.check(nonce, unix, tuple.client.ip()) {
            self.stats
                .auth_failure(if stale { "stale_nonce" } else { "bad_nonce" });
            return Err((438, "Stale Nonce", true));
        }
        let (Ok(user), Ok(realm)) = (std::str::from_utf8(user), std::str::from_utf8(realm)) else {
            self.stats.auth_failure("bad_request");
            return Err((400, "Bad Request", false));
        };
        if realm != self.creds.realm() {
            self.stats.auth_failure("wrong_realm");
            return Err((401, "Unauthorized", true));
        }
        let alg = match msg.password_algorithm {
            None | Some(auth::ALG_MD5) => auth::ALG_MD5,
            Some(auth::ALG_SHA256) => auth::ALG_SHA256,
            Some(_) => {
                self.stats.auth_failure("bad_request");
                return Err((400, "Bad Request", false));
            }
        };
        let passwords = match self.creds.passwords(user, unix) {
            Ok(p) => p,
            Err(f) => {
                self.stats.auth_failure(f.label());
                return Err((401, "Unauthorized", true));
            }
        };
        for pw in passwords {
            let key = auth::long_term_key(user, realm, &pw, alg);
            if let Some(sha256) = msg.verify_integrity(&key) {
                return Ok(Authed {
                    username: user.to_string(),
                    key,
                    sha256,
                });
            }
        }
        self.stats.auth_failure(AuthFailure::BadIntegrity.label());
        Err((401, "Unauthorized", true))
    }

    fn clamp_lifetime(&self, req: Option<u32>) -> u32 {
        let def = self.cfg.default_lifetime_secs;
        let max = self.cfg.max_lifetime_secs.max(def);
        req.unwrap_or(def).clamp(def, max)
    }

    fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        relays: &mut dyn RelayAllocator,
    ) -> Result<(), (u16, &'static str)> {
        if let Some(&i) = self.by_tuple.get(&tuple) {
            let a = self
                .slots
                .get(i)
                .and_then(Option::as_ref)
                .ok_or((500, "Server Error"))?;
            if a.alloc_tid != msg.tid {
                return Err((437, "Allocation Mismatch"));
            }
            // Retransmission: answer again.
            let remaining = a.expires.saturating_duration_since(now).as_secs() as u32;
            let relay = a.relay.addr;
            self.alloc_success(tuple, msg, auth, relay, remaining, None);
            return Ok(());
        }
        match msg.requested_transport {
            None => return Err((400, "Bad Request")),
            Some(17) => {}
            Some(_) => return Err((442, "Unsupported Transport Protocol")),
        }
        if msg.reservation_token.is_some()
            && (msg.even_port.is_some() || msg.requested_family.is_some())
        {
            return Err((400, "Bad Request"));
        }
        let family = match msg.requested_family {
            None | Some(1) => Family::V4,
            Some(2) => Family::V6,
            Some(_) => return Err((440, "Address Family not Supported")),
        };
        let req = RelayRequest {
            family,
            even_port: msg.even_port.is_some(),
            reserve_next: msg.even_port == Some(true),
            reservation: msg.reservation_token,
        };
        let quota_user = Credentials::quota_user(&auth.username).to_string();
        if self.per_user.get(&quota_user).copied().unwrap_or(0) >= self.cfg.max_allocations_per_user
        {
            self.stats.quota("user");
            return Err((486, "Allocation Quota Reached"));
        }
        if self.by_tuple.len() >= self.cfg.max_allocations {
            self.stats.quota("total");
            return Err((508, "Insufficient Capacity"));
        }
        let Some((relay, token)) = relays.allocate(&req, &tuple) else {
            return Err(if family == Family::V6 {
                (440, "Address Family not Supported")
            } else {
                (508, "Insufficient Capacity")
            });
        };
        let lifetime = self.clamp_lifetime(msg.lifetime);
        let alloc = Allocation {
            tuple,
            relay,
            username: auth.username.clone(),
            quota_user: quota_user.clone(),
            expires: now + Duration::from_secs(u64::from(lifetime)),
            alloc_tid: msg.tid,
            perms: Vec::new(),
            chans: Vec::new(),
            bucket: TokenBucket {
                rate: self.cfg.max_bandwidth_bytes_per_sec as f64,
                tokens: self.cfg.max_bandwidth_bytes_per_sec as f64,
                last: now,
            },
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(alloc);
                i
            }
            None => {
                self.slots.push(Some(alloc));
                self.slots.len() - 1
            }
        };
        self.by_tuple.insert(tuple, i);
        self.by_relay.insert(relay.addr, i);
        *self.per_user.entry(quota_user).or_insert(0) += 1;
        self.stats.allocation_created();
        tracing::debug!(client = %tuple.client, relay = %relay.addr, user = %auth.username, "allocation created");
        self.alloc_success(tuple, msg, auth, relay.addr, lifetime, token);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn alloc_success(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        relay: SocketAddr,
        lifetime: u32,
        token: Option<u64>,
    ) {
        let mut b = Builder::new(&mut self.out, method::ALLOCATE, Class::Success, msg.tid);
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, relay)
            .u32_attr(attr::LIFETIME, lifetime)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
        if let Some(t) = token {
            b.attr(attr::RESERVATION_TOKEN, &t.to_be_bytes());
        }
        if let Some(s) = &self.cfg.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b.integrity(&auth.key, auth.sha256);
        if msg.has_fingerprint {
            b.fingerprint();
        }
    }

    fn owned_alloc(
        &mut self,
        tuple: &FiveTuple,
        auth: &Authed,
    ) -> Result<usize, (u16, &'static str)> {
        let &i = self
            .by_tuple
            .get(tuple)
            .ok_or((437, "Allocation Mismatch"))?;
        let a = self
            .slots
            .get(i)
            .and_then(Option::as_ref)
            .ok_or((437, "Allocation Mismatch"))?;
        if a.username != auth.username {
            return Err((441, "Wrong Credentials"));
        }
        Ok(i)
    }

    fn simple_success(&mut self, msg: &Message<'_>, auth: &Authed, lifetime: Option<u32>) {
        let mut b = Builder::new(&mut self.out, msg.method, Class::Success, msg.tid);
        if let Some(l) = lifetime {
            b.u32_attr(attr::LIFETIME, l);
        }
        if let Some(s) = &self.cfg.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b.integrity(&auth.key, auth.sha256);
        if msg.has_fingerprint {
            b.fingerprint();
        }
    }

    fn refresh(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
        relays: &mut dyn RelayAllocator,
    ) -> Result<(), (u16, &'static str)> {
        let i = self.owned_alloc(&tuple, auth)?;
        if let Some(fam) = msg.requested_family {
            let a = self.slots[i].as_ref().ok_or((437, "Allocation Mismatch"))?;
            let have = if a.relay.addr.is_ipv4() { 1 } else { 2 };
            if fam != have {
                return Err((443, "Peer Address Family Mismatch"));
            }
        }
        if msg.lifetime == Some(0) {
            self.remove(i, relays);
            self.simple_success(msg, auth, Some(0));
            return Ok(());
        }
        let lifetime = self.clamp_lifetime(msg.lifetime);
        if let Some(a) = self.slots[i].as_mut() {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        self.simple_success(msg, auth, Some(lifetime));
        Ok(())
    }

    /// Policy check for a peer: Ok(external_ok).
    fn peer_allowed(&mut self, peer: SocketAddr) -> Result<bool, (u16, &'static str)> {
        let local = self.local.as_ref().is_some_and(|l| l.is_local(peer));
        match self.policy.check_external(peer.ip()) {
            Ok(()) => Ok(true),
            Err(_) if local || self.policy.is_local_ip(peer.ip()) => Ok(false),
            Err(r) => {
                self.stats.peer_rejected(r.label());
                tracing::debug!(%peer, reason = r.label(), "peer refused by policy");
                Err((403, "Forbidden"))
            }
        }
    }

    fn install_perm(
        &mut self,
        i: usize,
        ip: IpAddr,
        external_ok: bool,
        now: Instant,
    ) -> Result<(), (u16, &'static str)> {
        let life = Duration::from_secs(u64::from(self.cfg.permission_lifetime_secs));
        let max = self.cfg.max_permissions_per_allocation;
        let a = self.slots[i].as_mut().ok_or((437, "Allocation Mismatch"))?;
        if let Some(p) = a.perms.iter_mut().find(|p| p.ip == ip) {
            p.expires = now + life;
            p.external_ok = external_ok;
            return Ok(());
        }
        a.perms.retain(|p| p.expires > now);
        if a.perms.len() >= max {
            self.stats.quota("permissions");
            return Err((508, "Insufficient Capacity"));
        }
        a.perms.push(Perm {
            ip,
            expires: now + life,
            external_ok,
        });
        Ok(())
    }

    fn check_family(&self, i: usize, peer: SocketAddr) -> Result<(), (u16, &'static str)> {
        let a = self.slots[i].as_ref().ok_or((437, "Allocation Mismatch"))?;
        if a.relay.addr.is_ipv4() != peer.is_ipv4() {
            return Err((443, "Peer Address Family Mismatch"));
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
    ) -> Result<(), (u16, &'static str)> {
        let i = self.owned_alloc(&tuple, auth)?;
        if msg.peer_count == 0 || msg.peer_count > stun::MAX_PEER_ADDRS {
            return Err((400, "Bad Request"));
        }
        let mut ok = [(IpAddr::from([0, 0, 0, 0]), false); stun::MAX_PEER_ADDRS];
        for (k, slot) in ok.iter_mut().enumerate().take(msg.peer_count) {
            let peer = msg.peer(k).ok_or((400, "Bad Request"))?;
            self.check_family(i, peer)?;
            *slot = (peer.ip(), self.peer_allowed(peer)?);
        }
        for &(ip, ext) in &ok[..msg.peer_count] {
            self.install_perm(i, ip, ext, now)?;
        }
        self.simple_success(msg, auth, None);
        Ok(())
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authed,
    ) -> Result<(), (u16, &'static str)> {
        let i = self.owned_alloc(&tuple, auth)?;
        let (Some(num), Some(peer)) = (msg.channel, msg.peer(0)) else {
            {
                tracing::debug!(channel = ?msg.channel, peer = ?msg.peer(0), "channel bind: missing attrs");
                return Err((400, "Bad Request"));
            }
        };
        // RFC 8656 narrows the range to 0x4FFF; RFC 5766 clients (coturn) use up to 0x7FFF.
        if !(0x4000..=0x7FFF).contains(&num) {
            {
                tracing::debug!(num, "channel bind: bad number");
                return Err((400, "Bad Request"));
            }
        }
        self.check_family(i, peer)?;
        let ext = self.peer_allowed(peer)?;
        let local = self.local.as_ref().is_some_and(|l| l.is_local(peer));
        let life = Duration::from_secs(u64::from(self.cfg.channel_lifetime_secs));
        let max = self.cfg.max_channels_per_allocation;
        {
            let a = self.slots[i].as_mut().ok_or((437, "Allocation Mismatch"))?;
            a.chans.retain(|c| c.expires > now);
            let by_num = a.chans.iter().position(|c| c.num == num);
            let by_peer = a.chans.iter().position(|c| c.peer == peer);
            match (by_num, by_peer) {
                (Some(x), Some(y)) if x == y => {
                    a.chans[x].expires = now + life;
                }
                (None, None) => {
                    if a.chans.len() >= max {
                        self.stats.quota("channels");
                        return Err((508, "Insufficient Capacity"));
                    }
                    a.chans.push(Chan {
                        num,
                        peer,
                        expires: now + life,
                        local,
                    });
                }
                _ => {
                    tracing::debug!(num, %peer, "channel bind: conflict");
                    return Err((400, "Bad Request"));
                }
            }
        }
        self.install_perm(i, peer.ip(), ext, now)?;
        self.simple_success(msg, auth, None);
        Ok(())
    }
}
