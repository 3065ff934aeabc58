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

use super::Cmd;
use crate::config::TurnConfig;
use crate::server::{
    Action, Family, FiveTuple, LocalPeer, Relay, RelayAllocator, RelayRequest, Server, Transport,
};

const WAKER: Token = Token(0);
const LISTENER_BASE: usize = 1;
const RELAY_BASE: usize = 1 << 20;
/// Headroom before the payload for an in-place ChannelData header.
const HEADROOM: usize = 4;
const BUF_LEN: usize = 65_536 + 16;
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
        self.socks[idx] = Some(RelaySock { sock, addr });
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

pub(crate) struct TurnThread {
    poll: Poll,
    waker: Arc<Waker>,
    pending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    listeners: Vec<(UdpSocket, SocketAddr)>,
    relays: Relays,
    core: Server,
    rx: Receiver<Cmd>,
    local: Option<Arc<dyn LocalPeer>>,
    streams: HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>,
    buf: Vec<u8>,
    send_errors: u64,
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

impl TurnThread {
    pub(crate) fn bind(
        cfg: &TurnConfig,
        core: Server,
        rx: Receiver<Cmd>,
        local: Option<Arc<dyn LocalPeer>>,
        shared: Arc<RwLock<std::collections::HashSet<SocketAddr>>>,
    ) -> io::Result<TurnThread> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = Vec::new();
        for (i, a) in cfg.listen_udp.iter().enumerate() {
            let std = StdUdp::bind(a)?;
            tune(&std);
            std.set_nonblocking(true)?;
            let addr = std.local_addr()?;
            let mut s = UdpSocket::from_std(std);
            poll.registry()
                .register(&mut s, Token(LISTENER_BASE + i), Interest::READABLE)?;
            listeners.push((s, addr));
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
            streams: HashMap::new(),
            buf: vec![0u8; BUF_LEN],
            send_errors: 0,
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
    pub(crate) fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.1).collect()
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
                    self.drain_relay(t - RELAY_BASE);
                } else if t >= LISTENER_BASE {
                    self.drain_listener(t - LISTENER_BASE);
                }
            }
            self.drain_commands();
            let now = Instant::now();
            if now >= self.core.poll_timeout() {
                self.core.handle_timeout(now, &mut self.relays);
                if self.send_errors > 0 {
                    metrics::counter!("edgerelay_turn_dropped_total", "reason" => "send_error")
                        .increment(std::mem::take(&mut self.send_errors));
                }
            }
        }
        tracing::debug!("TURN thread stopped");
    }

    fn drain_listener(&mut self, i: usize) {
        // Bounded per wake-up so relays are served fairly; mio is edge-triggered,
        // so re-arm by looping until WouldBlock.
        loop {
            let Some((sock, local)) = self.listeners.get(i) else {
                return;
            };
            let local = *local;
            let (n, from) = match sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => continue, // ICMP errors surfaced as ECONNREFUSED etc.
            };
            let tuple = FiveTuple {
                transport: Transport::Udp,
                client: from,
                local,
            };
            let now = Instant::now();
            let action = self
                .core
                .handle_client(now, tuple, &self.buf[..n], &mut self.relays);
            execute(
                action,
                &self.listeners,
                &self.relays,
                &self.streams,
                self.local.as_deref(),
                &mut self.send_errors,
            );
        }
    }

    fn drain_relay(&mut self, idx: usize) {
        loop {
            let Some(Some(r)) = self.relays.socks.get(idx) else {
                return;
            };
            let relay = r.addr;
            let (n, from) = match r.sock.recv_from(&mut self.buf[HEADROOM..]) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => continue,
            };
            let now = Instant::now();
            let action =
                self.core
                    .handle_peer(now, relay, from, &mut self.buf, HEADROOM, HEADROOM + n);
            execute(
                action,
                &self.listeners,
                &self.relays,
                &self.streams,
                self.local.as_deref(),
                &mut self.send_errors,
            );
        }
    }

    fn drain_commands(&mut self) {
        self.pending.store(false, Ordering::Release);
        // Bounded: at most the channel capacity per round.
        let mut exhausted = false;
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
                    execute(
                        action,
                        &self.listeners,
                        &self.relays,
                        &self.streams,
                        self.local.as_deref(),
                        &mut self.send_errors,
                    );
                }
                Cmd::FromLocal { sfu, relay, data } => {
                    let n = data.len().min(BUF_LEN - HEADROOM - 4);
                    self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
                    let action = self.core.handle_peer(
                        now,
                        relay,
                        sfu,
                        &mut self.buf,
                        HEADROOM,
                        HEADROOM + n,
                    );
                    execute(
                        action,
                        &self.listeners,
                        &self.relays,
                        &self.streams,
                        self.local.as_deref(),
                        &mut self.send_errors,
                    );
                }
            }
        }
        // Bounded round: if work remains, make sure the next poll returns at once.
        if !exhausted && !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}

fn execute(
    action: Action<'_>,
    listeners: &[(UdpSocket, SocketAddr)],
    relays: &Relays,
    streams: &HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>,
    local: Option<&dyn LocalPeer>,
    errors: &mut u64,
) {
    match action {
        Action::None => {}
        Action::ToClient { tuple, data } => match tuple.transport {
            Transport::Udp => {
                let sock = listeners
                    .iter()
                    .find(|l| l.1 == tuple.local)
                    .or(listeners.first());
                if let Some((s, _)) = sock {
                    if s.send_to(data, tuple.client).is_err() {
                        *errors += 1;
                    }
                }
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(tx) = streams.get(&tuple.client) {
                    if tx.try_send(data.to_vec()).is_err() {
                        *errors += 1;
                    }
                }
            }
        },
        Action::ToPeer {
            relay_id,
            peer,
            data,
            ..
        } => {
            if let Some(Some(r)) = relays.socks.get(relay_id as usize) {
                if r.sock.send_to(data, peer).is_err() {
                    *errors += 1;
                }
            }
        }
        Action::ToLocal { relay, sfu, data } => {
            if let Some(l) = local {
                l.deliver(relay, sfu, data);
            }
        }
    }
}
