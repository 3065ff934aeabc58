//! The TURN thread: UDP listeners, relay sockets and the core, on mio.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::io::IoSliceMut;

use super::{Cmd, LocalRoutes};
use crate::config::TurnConfig;
use crate::server::{
    Action, Family, FiveTuple, LocalPeer, Relay, RelayAllocator, RelayRequest, Server, Transport,
};

const WAKER: Token = Token(0);
const LISTENER_BASE: usize = 1;
const RELAY_BASE: usize = 1 << 20;
/// Headroom before the payload for an in-place ChannelData header.
const HEADROOM: usize = 4;
/// Receive slot size (room for a GRO-coalesced batch of datagrams).
const SLOT_LEN: usize = HEADROOM + 65_536;
/// Receive slots (one recvmmsg batch).
const SLOTS: usize = quinn_udp::BATCH_SIZE;
/// Most bytes in one GSO send.
const GSO_MAX_BYTES: usize = 60_000;
/// Socket buffer size requested for listeners and relays.
const SOCK_BUF: usize = 4 << 20;

fn tune(sock: &StdUdp) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(SOCK_BUF);
    let _ = s.set_send_buffer_size(SOCK_BUF);
}

struct RelaySock {
    sock: UdpSocket,
    addr: SocketAddr,
    state: UdpSocketState,
}

/// The driver's relay allocator: one UDP socket per allocation.
pub(crate) struct Relays {
    registry: mio::Registry,
    socks: Vec<Option<RelaySock>>,
    free: Vec<usize>,
    ip4: Option<IpAddr>,
    ip6: Option<IpAddr>,
    ext4: Option<IpAddr>,
    ext6: Option<IpAddr>,
    port_min: u16,
    port_max: u16,
    next_port: u32,
    reserved: HashMap<u64, (StdUdp, Option<IpAddr>, Instant)>,
    shared: Arc<RwLock<std::collections::HashSet<SocketAddr>>>,
}

impl Relays {
    fn candidate(&mut self) -> u16 {
        if self.port_min == 0 && self.port_max == 0 {
            return 0;
        }
        let span = u32::from(self.port_max - self.port_min) + 1;
        let port = u32::from(self.port_min) + self.next_port % span;
        self.next_port = self.next_port.wrapping_add(1);
        port as u16
    }

    /// Bind a relay socket (even port / reserve the next one when asked).
    fn bind(&mut self, ip: IpAddr, even: bool, reserve: bool) -> Option<(StdUdp, Option<StdUdp>)> {
        for _ in 0..128 {
            let Ok(s) = StdUdp::bind(SocketAddr::new(ip, self.candidate())) else {
                continue;
            };
            let port = s.local_addr().ok()?.port();
            if !even {
                return Some((s, None));
            }
            if port % 2 != 0 || port == u16::MAX {
                continue;
            }
            if !reserve {
                return Some((s, None));
            }
            if let Ok(next) = StdUdp::bind(SocketAddr::new(ip, port + 1)) {
                return Some((s, Some(next)));
            }
        }
        None
    }

    fn register(&mut self, std: StdUdp, ext: Option<IpAddr>) -> Option<Relay> {
        tune(&std);
        std.set_nonblocking(true).ok()?;
        let local = std.local_addr().ok()?;
        let addr = SocketAddr::new(ext.unwrap_or(local.ip()), local.port());
        let state = UdpSocketState::new(UdpSockRef::from(&std)).ok()?;
        let mut sock = UdpSocket::from_std(std);
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.socks.push(None);
                self.socks.len() - 1
            }
        };
        if let Err(e) =
            self.registry
                .register(&mut sock, Token(RELAY_BASE + idx), Interest::READABLE)
        {
            tracing::warn!("cannot register relay socket: {e}");
            self.free.push(idx);
            return None;
        }
        self.socks[idx] = Some(RelaySock { sock, addr, state });
        if let Ok(mut s) = self.shared.write() {
            s.insert(addr);
        }
        Some(Relay {
            addr,
            id: idx as u64,
        })
    }
}

impl RelayAllocator for Relays {
    fn allocate(&mut self, req: &RelayRequest, _tuple: &FiveTuple) -> Option<(Relay, Option<u64>)> {
        let now = Instant::now();
        self.reserved.retain(|_, (_, _, t)| *t > now);
        if let Some(tok) = req.reservation {
            let (std, ext, _) = self.reserved.remove(&tok)?;
            return Some((self.register(std, ext)?, None));
        }
        let (ip, ext) = match req.family {
            Family::V4 => (self.ip4?, self.ext4),
            Family::V6 => (self.ip6?, self.ext6),
        };
        let (std, next) = self.bind(ip, req.even_port, req.reserve_next)?;
        let relay = self.register(std, ext)?;
        let token = match next {
            Some(n) if self.reserved.len() < 1024 => {
                let tok: u64 = rand::random();
                self.reserved
                    .insert(tok, (n, ext, now + Duration::from_secs(30)));
                Some(tok)
            }
            _ => None,
        };
        Some((relay, token))
    }

    fn release(&mut self, relay: &Relay) {
        let idx = relay.id as usize;
        if let Some(mut r) = self.socks.get_mut(idx).and_then(Option::take) {
            let _ = self.registry.deregister(&mut r.sock);
            self.free.push(idx);
            if let Ok(mut s) = self.shared.write() {
                s.remove(&r.addr);
            }
        }
    }
}

struct Listener {
    sock: UdpSocket,
    addr: SocketAddr,
    state: UdpSocketState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    Listener(usize),
    Relay(usize),
}

/// A run of equal-size datagrams for one socket and destination, sent with one
/// GSO `sendmsg` (or one plain send for a single datagram).
struct Run {
    out: Out,
    dest: SocketAddr,
    seg: usize,
    count: usize,
    closed: bool,
    buf: Vec<u8>,
}

/// Collects the outputs of one receive batch and sends them in GSO runs.
struct Batcher {
    runs: Vec<Run>,
    pool: Vec<Vec<u8>>,
    max_segments: usize,
    errors: u64,
}

impl Batcher {
    fn push(&mut self, out: Out, dest: SocketAddr, data: &[u8]) {
        let len = data.len();
        if let Some(r) = self
            .runs
            .iter_mut()
            .rev()
            .find(|r| r.out == out && r.dest == dest)
        {
            if !r.closed
                && len <= r.seg
                && len > 0
                && r.count < self.max_segments
                && r.buf.len() + len <= GSO_MAX_BYTES
            {
                r.buf.extend_from_slice(data);
                r.count += 1;
                r.closed = len < r.seg;
                return;
            }
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        self.runs.push(Run {
            out,
            dest,
            seg: len,
            count: 1,
            closed: false,
            buf,
        });
    }

    fn flush(&mut self, listeners: &[Listener], relays: &Relays) {
        for r in self.runs.drain(..) {
            let t = Transmit {
                destination: r.dest,
                ecn: None,
                contents: &r.buf,
                segment_size: (r.count > 1).then_some(r.seg),
                src_ip: None,
            };
            let res = match r.out {
                Out::Listener(i) => listeners
                    .get(i)
                    .map(|l| l.state.send(UdpSockRef::from(&l.sock), &t)),
                Out::Relay(i) => relays
                    .socks
                    .get(i)
                    .and_then(Option::as_ref)
                    .map(|s| s.state.send(UdpSockRef::from(&s.sock), &t)),
            };
            if !matches!(res, Some(Ok(()))) {
                self.errors += r.count as u64;
            }
            self.pool.push(r.buf);
        }
    }
}

pub(crate) struct TurnThread {
    poll: Poll,
    waker: Arc<Waker>,
    pending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    listeners: Vec<Listener>,
    relays: Relays,
    core: Server,
    rx: Receiver<Cmd>,
    local: Option<Arc<dyn LocalPeer>>,
    /// Where the core's channels to the SFU are published.
    routes: Arc<LocalRoutes>,
    /// Duplicates of the listener sockets (same bound socket) for the SFU.
    listener_socks: Vec<(SocketAddr, StdUdp)>,
    streams: HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>,
    slots: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    batch: Batcher,
}

/// A default relay IP: the listen IP if specific, else the address the kernel
/// would use to reach the Internet (no packet is sent), else loopback.
fn default_relay_ip(cfg: &TurnConfig) -> IpAddr {
    if let Some(ip) = cfg
        .listen_udp
        .iter()
        .map(|a| a.ip())
        .find(|ip| !ip.is_unspecified())
    {
        return ip;
    }
    let probe = || -> io::Result<IpAddr> {
        let s = StdUdp::bind("0.0.0.0:0")?;
        s.connect("192.0.2.1:9")?; // TEST-NET-1: route lookup only, nothing is sent
        Ok(s.local_addr()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Route one core action: UDP sends are batched, stream frames queued, SFU
/// packets delivered in-process.
fn route(
    action: Action<'_>,
    listeners: &[Listener],
    streams: &HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>,
    local: Option<&dyn LocalPeer>,
    batch: &mut Batcher,
) {
    match action {
        Action::None => {}
        Action::ToClient { tuple, data } => match tuple.transport {
            Transport::Udp => {
                let i = listeners
                    .iter()
                    .position(|l| l.addr == tuple.local)
                    .unwrap_or(0);
                batch.push(Out::Listener(i), tuple.client, data);
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(tx) = streams.get(&tuple.client) {
                    if tx.try_send(data.to_vec()).is_err() {
                        batch.errors += 1;
                    }
                }
            }
        },
        Action::ToPeer {
            relay_id,
            peer,
            data,
            ..
        } => batch.push(Out::Relay(relay_id as usize), peer, data),
        Action::ToLocal { relay, sfu, data } => {
            if let Some(l) = local {
                l.deliver(relay, sfu, data);
            }
        }
    }
}

impl TurnThread {
    pub(crate) fn bind(
        cfg: &TurnConfig,
        core: Server,
        rx: Receiver<Cmd>,
        local: Option<Arc<dyn LocalPeer>>,
        shared: Arc<RwLock<std::collections::HashSet<SocketAddr>>>,
        routes: Arc<LocalRoutes>,
    ) -> io::Result<TurnThread> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = Vec::new();
        let mut listener_socks = Vec::new();
        let mut max_segments = 64;
        for (i, a) in cfg.listen_udp.iter().enumerate() {
            let std = StdUdp::bind(a)?;
            tune(&std);
            std.set_nonblocking(true)?;
            let addr = std.local_addr()?;
            let state = UdpSocketState::new(UdpSockRef::from(&std))?;
            max_segments = max_segments.min(state.max_gso_segments().max(1));
            listener_socks.push((addr, std.try_clone()?));
            let mut sock = UdpSocket::from_std(std);
            poll.registry()
                .register(&mut sock, Token(LISTENER_BASE + i), Interest::READABLE)?;
            listeners.push(Listener { sock, addr, state });
        }
        let ip4 = match cfg.relay_ip {
            Some(ip) => Some(ip),
            None => Some(default_relay_ip(cfg)),
        };
        let relays = Relays {
            registry: poll.registry().try_clone()?,
            socks: Vec::new(),
            free: Vec::new(),
            ip4,
            ip6: cfg.relay_ipv6,
            ext4: cfg.external_ip,
            ext6: cfg.external_ipv6,
            port_min: cfg.relay_port_min,
            port_max: cfg.relay_port_max.max(cfg.relay_port_min),
            next_port: rand::random::<u16>() as u32,
            reserved: HashMap::new(),
            shared,
        };
        Ok(TurnThread {
            poll,
            waker,
            pending: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            listeners,
            relays,
            core,
            rx,
            local,
            routes,
            listener_socks,
            streams: HashMap::new(),
            slots: (0..SLOTS).map(|_| vec![0u8; SLOT_LEN]).collect(),
            metas: vec![RecvMeta::default(); SLOTS],
            batch: Batcher {
                runs: Vec::new(),
                pool: Vec::new(),
                max_segments,
                errors: 0,
            },
        })
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }
    pub(crate) fn pending(&self) -> Arc<AtomicBool> {
        self.pending.clone()
    }
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
    /// Clones of the UDP listener sockets, for the SFU's own sends to relayed clients.
    pub(crate) fn listener_clones(&self) -> io::Result<Vec<(SocketAddr, StdUdp)>> {
        self.listener_socks
            .iter()
            .map(|(a, s)| Ok((*a, s.try_clone()?)))
            .collect()
    }

    pub(crate) fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            let timeout = self
                .core
                .poll_timeout()
                .saturating_duration_since(now)
                .min(Duration::from_secs(1));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("TURN poll failed: {e}");
                    break;
                }
            }
            for ev in events.iter() {
                let t = ev.token().0;
                if t == WAKER.0 {
                    continue;
                } else if t >= RELAY_BASE {
                    self.drain(Out::Relay(t - RELAY_BASE));
                } else if t >= LISTENER_BASE {
                    self.drain(Out::Listener(t - LISTENER_BASE));
                }
            }
            self.drain_commands();
            let now = Instant::now();
            if let Some(r) = self.core.take_local_routes(now) {
                self.routes.publish(r);
            }
            if now >= self.core.poll_timeout() {
                self.core.handle_timeout(now, &mut self.relays);
                if self.batch.errors > 0 {
                    metrics::counter!("edgerelay_turn_dropped_total", "reason" => "send_error")
                        .increment(std::mem::take(&mut self.batch.errors));
                }
            }
        }
        tracing::debug!("TURN thread stopped");
    }

    /// Receive one recvmmsg batch at a time until the socket is drained; the
    /// outputs of each batch go out in GSO runs.
    fn drain(&mut self, src: Out) {
        loop {
            let n = {
                let (sock, state) = match src {
                    Out::Listener(i) => match self.listeners.get(i) {
                        Some(l) => (&l.sock, &l.state),
                        None => return,
                    },
                    Out::Relay(i) => match self.relays.socks.get(i) {
                        Some(Some(r)) => (&r.sock, &r.state),
                        _ => return,
                    },
                };
                let mut iovs: Vec<IoSliceMut<'_>> = self
                    .slots
                    .iter_mut()
                    .map(|s| IoSliceMut::new(&mut s[HEADROOM..]))
                    .collect();
                match state.recv(UdpSockRef::from(sock), &mut iovs, &mut self.metas) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => continue, // ICMP errors surfaced as ECONNREFUSED etc.
                }
            };
            let now = Instant::now();
            for j in 0..n.min(SLOTS) {
                let meta = self.metas[j];
                let stride = meta.stride.max(1);
                let total = meta.len.min(SLOT_LEN - HEADROOM);
                let mut off = 0;
                while off < total {
                    let seg = stride.min(total - off);
                    let start = HEADROOM + off;
                    let end = start + seg;
                    off += seg;
                    let action = match src {
                        Out::Listener(i) => {
                            let tuple = FiveTuple {
                                transport: Transport::Udp,
                                client: meta.addr,
                                local: self.listeners.get(i).map(|l| l.addr).unwrap_or(meta.addr),
                            };
                            self.core.handle_client(
                                now,
                                tuple,
                                &self.slots[j][start..end],
                                &mut self.relays,
                            )
                        }
                        Out::Relay(i) => {
                            let Some(Some(r)) = self.relays.socks.get(i) else {
                                break;
                            };
                            let relay = r.addr;
                            // Slice ends at this datagram so in-place padding never
                            // touches the next GRO segment.
                            self.core.handle_peer(
                                now,
                                relay,
                                meta.addr,
                                &mut self.slots[j][..end],
                                start,
                                end,
                            )
                        }
                    };
                    route(
                        action,
                        &self.listeners,
                        &self.streams,
                        self.local.as_deref(),
                        &mut self.batch,
                    );
                }
            }
            self.batch.flush(&self.listeners, &self.relays);
            // A short batch means the queue was empty: stop without the extra
            // recvmmsg that would only return EAGAIN. Safe with edge-triggered
            // epoll: a datagram queued after that recvmmsg raises a new event.
            if n < SLOTS {
                return;
            }
        }
    }

    fn drain_commands(&mut self) {
        self.pending.store(false, Ordering::Release);
        let mut exhausted = false;
        // Bounded: at most the channel capacity per round.
        for _ in 0..super::COMMAND_CAPACITY {
            let Ok(cmd) = self.rx.try_recv() else {
                exhausted = true;
                break;
            };
            let now = Instant::now();
            match cmd {
                Cmd::StreamOpen { tuple, tx } => {
                    self.streams.insert(tuple.client, tx);
                }
                Cmd::StreamClosed { tuple } => {
                    self.streams.remove(&tuple.client);
                    self.core.close_client(&tuple, &mut self.relays);
                }
                Cmd::StreamFrame { tuple, data } => {
                    let action = self.core.handle_client(now, tuple, &data, &mut self.relays);
                    route(
                        action,
                        &self.listeners,
                        &self.streams,
                        self.local.as_deref(),
                        &mut self.batch,
                    );
                }
                Cmd::FromLocal { sfu, relay, data } => {
                    let n = data.len().min(SLOT_LEN - HEADROOM);
                    let slot = &mut self.slots[0];
                    slot[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
                    let action =
                        self.core
                            .handle_peer(now, relay, sfu, slot, HEADROOM, HEADROOM + n);
                    route(
                        action,
                        &self.listeners,
                        &self.streams,
                        self.local.as_deref(),
                        &mut self.batch,
                    );
                }
            }
            if self.batch.runs.len() >= 64 {
                self.batch.flush(&self.listeners, &self.relays);
            }
        }
        self.batch.flush(&self.listeners, &self.relays);
        // Bounded round: if work remains, make sure the next poll returns at once.
        if !exhausted && !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}
