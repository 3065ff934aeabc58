//! The media thread: owns the UDP socket and the SFU core, outside tokio.
//!
//! Signalling talks to it through a channel ([`MediaHandle`]); a one-byte
//! datagram from a private loopback socket wakes it when a command is queued,
//! so the thread can block in `recv_from` until a packet or a timer is due.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use edgerelay_sfu::{
    Joined, PeerId, RoleRequest, Sfu, SfuConfig, SfuError, SfuEvent, SfuStats, Upstream,
};
use edgerelay_turn::{FxHasher, LocalPacket, TurnHandle};

use super::batch_io;
use super::relay_send::RelaySend;
pub use super::span::SpanPolicy;
use super::span::{seat, Exports, HomeRoom, Seat, ShardBus, ShardMsg, BUS_DEPTH};
use super::turn::Waker;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// Requests from signalling to the media thread; each carries its reply channel.
pub enum MediaCmd {
    /// WHIP: a publisher's offer.
    Publish {
        /// Room name.
        room: String,
        /// SDP offer.
        offer: String,
        /// Answer or error.
        reply: oneshot::Sender<Result<Joined, SfuError>>,
    },
    /// WHEP: a viewer's offer.
    View {
        /// Room name.
        room: String,
        /// SDP offer.
        offer: String,
        /// Requested role.
        role: RoleRequest,
        /// Answer or error.
        reply: oneshot::Sender<Result<Joined, SfuError>>,
    },
    /// WebSocket flow: the edge makes the offer.
    ViewOffer {
        /// Room name.
        room: String,
        /// Requested role.
        role: RoleRequest,
        /// Include an audio section.
        audio: bool,
        /// Offer or error.
        reply: oneshot::Sender<Result<Joined, SfuError>>,
    },
    /// WebSocket flow: the viewer's answer.
    Answer {
        /// The viewer.
        peer: PeerId,
        /// SDP answer.
        sdp: String,
        /// Result.
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    /// A trickled remote candidate.
    Candidate {
        /// The peer.
        peer: PeerId,
        /// `candidate:...` line.
        candidate: String,
        /// Result.
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    /// End a session.
    Remove {
        /// The peer.
        peer: PeerId,
        /// Result.
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    /// A `View` or `ViewOffer` seated on a mirror of a room homed on another
    /// thread (set by [`MediaHandle`]'s routing; signalling never builds it).
    Spanned {
        /// The room's home thread.
        home: usize,
        /// The viewer's command.
        cmd: Box<MediaCmd>,
    },
}

impl MediaCmd {
    /// Answers a viewer's command with `err` without running it. (Only viewers'
    /// commands are refused so; any other is dropped, which its caller sees as
    /// [`MediaGone`].)
    fn refuse(self, err: SfuError) {
        match self {
            MediaCmd::View { reply, .. } | MediaCmd::ViewOffer { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            MediaCmd::Spanned { cmd, .. } => cmd.refuse(err),
            _ => {}
        }
    }
}

/// A room as the HTTP side sees it (refreshed a few times per second).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomInfo {
    /// Room name.
    pub name: String,
    /// Publisher connected.
    pub publisher: bool,
    /// Viewers in the room (over all threads it spans).
    pub viewers: usize,
    /// A controller is seated (on the home thread).
    #[serde(skip)]
    pub controller: bool,
    /// Simulcast video.
    #[serde(skip)]
    pub simulcast: bool,
    /// This entry is a thread's mirror of a room homed on another.
    #[serde(skip)]
    pub mirror: bool,
}

/// What one media thread last published.
#[derive(Default)]
pub struct ShardState {
    stats: SfuStats,
    rooms: Vec<RoomInfo>,
    peers: u64,
}

/// State the media threads publish for metrics, health and registration:
/// the aggregate over all shards (counters are added, rooms listed together).
#[derive(Default)]
pub struct Shared {
    /// Each shard's last published state.
    shards: Vec<Mutex<ShardState>>,
    /// Latest SFU counters.
    pub stats: Mutex<SfuStats>,
    /// Latest rooms.
    pub rooms: Mutex<Vec<RoomInfo>>,
    /// Peers (publishers + viewers).
    pub peers: AtomicU64,
    /// Viewers.
    pub viewers: AtomicU64,
    /// Datagrams the socket failed to send.
    pub send_errors: AtomicU64,
    /// Iterations of the media loop (wake-ups), for tuning timer slack and batching.
    pub loop_iterations: AtomicU64,
    /// Datagrams received per `recvmmsg` call, summed (divide by receive calls).
    pub datagrams_received: AtomicU64,
    /// `recvmmsg` calls that returned data.
    pub receive_calls: AtomicU64,
    /// Datagrams received from TURN clients through the in-process hand-off.
    pub relayed_in: AtomicU64,
    /// Datagrams sent to TURN clients through the in-process hand-off.
    pub relayed_out: AtomicU64,
    /// Datagrams the media threads framed and sent to UDP-relayed viewers themselves.
    pub relay_sends: AtomicU64,
    /// UDP GSO messages sent (each a run of datagrams to one viewer).
    pub gso_sends: AtomicU64,
    /// Datagrams sent inside GSO messages (divide by `gso_sends`: segments per send).
    pub gso_segments: AtomicU64,
    /// Media threads currently sending with UDP GSO.
    pub gso_threads: AtomicU64,
    /// From a receive batch's arrival (the kernel's stamp of its first datagram,
    /// else the receive call's return) to the end of the sends it caused (on a
    /// mirror thread: from the home thread's), once per media loop pass.
    pub fanout_delay: DelayHistogram,
    /// The same delay once per publisher packet the pass fanned out (passes that
    /// brought only RTCP or STUN do not count): the issue's "from a packet's
    /// arrival to its departure to the last viewer" (of that thread).
    pub packet_delay: DelayHistogram,
    /// Viewers seated on a mirror of a room homed on another thread.
    pub span_seated: AtomicU64,
    /// Feeds (a receive batch of one room's packets) handed to mirror threads.
    pub span_feeds: AtomicU64,
    /// Messages between media threads dropped (an inbox full, a thread gone).
    pub span_dropped: AtomicU64,
    /// Packets a mirror thread dropped for arriving too late ([`MAX_FEED_LAG`]).
    pub span_late: AtomicU64,
    /// The thread is running.
    pub alive: AtomicBool,
    /// Set to stop the thread.
    pub stop: AtomicBool,
}

/// Upper bounds (seconds) of the fan-out delay histogram's buckets: fine
/// between 0.1 and 5 ms, where the target (p99 < 2 ms) is decided.
pub const FANOUT_DELAY_BUCKETS: [f64; 22] = [
    0.00005, 0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175,
    0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// A latency histogram the media threads fill with a few relaxed atomic adds
/// per loop iteration; `/metrics` renders it as a Prometheus histogram.
#[derive(Default)]
pub struct DelayHistogram {
    /// Per-bucket counts (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; FANOUT_DELAY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl DelayHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of the same value (`n` packets that left together).
    pub fn observe_n(&self, d: Duration, n: u64) {
        let s = d.as_secs_f64();
        let k = FANOUT_DELAY_BUCKETS.partition_point(|&b| b < s);
        self.buckets[k].fetch_add(n, Ordering::Relaxed);
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Cumulative counts per bound of [`FANOUT_DELAY_BUCKETS`] (then +Inf),
    /// the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.count.load(Ordering::Relaxed),
        )
    }
}

/// How a media thread does socket I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaIo {
    /// recvmmsg/sendmmsg (else one call per datagram: the benchmark baseline).
    pub batch: bool,
    /// UDP GSO for runs of datagrams to one destination, when the kernel has it
    /// (only with `batch`).
    pub gso: bool,
}

impl From<&crate::config::MediaConfig> for MediaIo {
    fn from(c: &crate::config::MediaConfig) -> Self {
        MediaIo {
            batch: c.batch_io,
            gso: c.batch_io && c.gso,
        }
    }
}

/// Order each flush's datagrams by destination before looking for GSO runs.
const GSO_GROUP_BY_DESTINATION: bool = false;

/// One media thread as signalling sees it.
#[derive(Clone)]
struct ShardLink {
    tx: mpsc::Sender<MediaCmd>,
    waker: Arc<Waker>,
    local_addr: SocketAddr,
}

/// The signalling side's handle on the media threads. A room lives on one
/// shard (by a hash of its name); peer ids carry their shard, so commands
/// about a peer find it without a lookup.
#[derive(Clone)]
pub struct MediaHandle {
    shards: Vec<ShardLink>,
    /// Published state.
    pub shared: Arc<Shared>,
    /// The first shard's media address (the only one with one thread).
    pub local_addr: SocketAddr,
    span: SpanPolicy,
    /// Hands out mirror seats in turn.
    span_turn: Arc<AtomicUsize>,
}

/// Which of `n` shards hosts `room` (FNV-1a: stable across runs and builds).
pub fn shard_of(room: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in room.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % n.max(1) as u64) as usize
}

/// A shard-local peer id made unique across `n` shards (the slot index is
/// multiplied out; the generation is untouched).
fn global_peer(shard: usize, n: usize, peer: PeerId) -> PeerId {
    let v = peer.as_u64();
    let index = v & 0xffff_ffff;
    let global = index.wrapping_mul(n as u64).wrapping_add(shard as u64) & 0xffff_ffff;
    PeerId::from_u64((v & !0xffff_ffff) | global)
}

/// Inverse of [`global_peer`]: the shard and the shard-local id.
fn local_peer(n: usize, peer: PeerId) -> (usize, PeerId) {
    let n = n.max(1) as u64;
    let v = peer.as_u64();
    let index = v & 0xffff_ffff;
    (
        (index % n) as usize,
        PeerId::from_u64((v & !0xffff_ffff) | (index / n)),
    )
}

/// The media thread is gone (it crashed or was stopped).
#[derive(Debug, thiserror::Error)]
#[error("media engine unavailable")]
pub struct MediaGone;

impl MediaHandle {
    /// Sends a command built around a fresh reply channel to the shard it
    /// belongs to and waits for the reply.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> MediaCmd,
    ) -> Result<T, MediaGone> {
        let (tx, rx) = oneshot::channel();
        let (k, cmd) = self.route(make(tx));
        let Some((k, cmd)) = self.span_seat(k, cmd) else {
            // Refused here; the reply is already in the channel.
            return rx.await.map_err(|_| MediaGone);
        };
        let shard = self.shards.get(k).ok_or(MediaGone)?;
        shard.tx.send(cmd).map_err(|_| MediaGone)?;
        shard.waker.wake_now();
        rx.await.map_err(|_| MediaGone)
    }

    /// Seats a viewer of a large room on a mirror thread when the span policy
    /// says so. Returns the thread to send the command to and the command (for a
    /// mirror, wrapped in [`MediaCmd::Spanned`]); `None` when it was refused (its
    /// reply sent: the room is full over all its threads).
    fn span_seat(&self, home: usize, cmd: MediaCmd) -> Option<(usize, MediaCmd)> {
        let (room, role) = match &cmd {
            MediaCmd::View { room, role, .. } | MediaCmd::ViewOffer { room, role, .. } => {
                (room.as_str(), *role)
            }
            _ => return Some((home, cmd)),
        };
        let n = self.shards.len();
        if n < 2 || self.span.viewers == 0 {
            return Some((home, cmd));
        }
        let mut home_room = None;
        let mut total = 0;
        for (k, slot) in self.shared.shards.iter().enumerate() {
            let Ok(state) = slot.lock() else {
                continue;
            };
            for r in state.rooms.iter().filter(|r| r.name == room) {
                total += r.viewers;
                if k == home && !r.mirror {
                    home_room = Some(HomeRoom {
                        viewers: r.viewers,
                        publisher: r.publisher,
                        controller: r.controller,
                        simulcast: r.simulcast,
                    });
                }
            }
        }
        match seat(self.span, n, home, home_room, total, role, &self.span_turn) {
            Seat::Home => Some((home, cmd)),
            Seat::Mirror(k) => {
                self.shared.span_seated.fetch_add(1, Ordering::Relaxed);
                Some((
                    k,
                    MediaCmd::Spanned {
                        home,
                        cmd: Box::new(cmd),
                    },
                ))
            }
            Seat::Full => {
                let room = room.to_string();
                cmd.refuse(SfuError::RoomFull(room));
                None
            }
        }
    }

    fn route(&self, cmd: MediaCmd) -> (usize, MediaCmd) {
        let n = self.shards.len();
        match cmd {
            MediaCmd::Publish { ref room, .. }
            | MediaCmd::View { ref room, .. }
            | MediaCmd::ViewOffer { ref room, .. } => (shard_of(room, n), cmd),
            MediaCmd::Answer { peer, sdp, reply } => {
                let (k, peer) = local_peer(n, peer);
                (k, MediaCmd::Answer { peer, sdp, reply })
            }
            MediaCmd::Candidate {
                peer,
                candidate,
                reply,
            } => {
                let (k, peer) = local_peer(n, peer);
                (
                    k,
                    MediaCmd::Candidate {
                        peer,
                        candidate,
                        reply,
                    },
                )
            }
            MediaCmd::Remove { peer, reply } => {
                let (k, peer) = local_peer(n, peer);
                (k, MediaCmd::Remove { peer, reply })
            }
            MediaCmd::Spanned { home, cmd } => (home, MediaCmd::Spanned { home, cmd }),
        }
    }

    /// Every shard's media address.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shards.iter().map(|s| s.local_addr).collect()
    }

    /// Asks the threads to stop.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for s in &self.shards {
            s.waker.wake_now();
        }
    }
}

/// The bound media socket and its waker, before the thread starts (TURN needs
/// the waker for its hand-off first).
pub struct MediaSocket {
    socket: UdpSocket,
    /// Wakes the media thread.
    pub waker: Arc<Waker>,
    /// The bound address.
    pub local_addr: SocketAddr,
}

/// Least time the media thread sleeps when only timers are due (see `run`).
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Socket buffer size asked for: a 500-viewer fan-out burst must not overflow.
const SOCKET_BUFFER: usize = 8 << 20;

/// Binds a UDP socket with large buffers and the DF bit set without path-MTU
/// discovery (WebRTC packets stay under the MTU; DF also spares the kernel an
/// IP id per datagram).
fn bind_tuned(listen: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Dual-stack when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = sock.as_raw_fd();
        let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
            // SAFETY: a valid socket and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    &value as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        // FORCE variants exceed net.core.[rw]mem_max when privileged; else the plain ones.
        if set(
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            SOCKET_BUFFER as libc::c_int,
        ) != 0
        {
            let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        }
        if set(
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            SOCKET_BUFFER as libc::c_int,
        ) != 0
        {
            let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        }
        if listen.is_ipv4() {
            set(
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            );
        } else {
            set(
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    }
    sock.bind(&listen.into())?;
    let udp: UdpSocket = sock.into();
    info!(
        recv_buffer = socket2::SockRef::from(&udp).recv_buffer_size().unwrap_or(0),
        send_buffer = socket2::SockRef::from(&udp).send_buffer_size().unwrap_or(0),
        "media socket buffers"
    );
    Ok(udp)
}

/// Binds the sockets of `n` shards: `listen`'s port and the next ones (or
/// ephemeral ports when it is 0).
pub fn bind_shards(listen: SocketAddr, n: usize) -> anyhow::Result<Vec<MediaSocket>> {
    (0..n)
        .map(|k| {
            let mut a = listen;
            if a.port() != 0 {
                let port = a.port() as usize + k;
                anyhow::ensure!(
                    port <= u16::MAX as usize,
                    "media.listen: port range overflows"
                );
                a.set_port(port as u16);
            }
            bind(a)
        })
        .collect()
}

/// Binds one UDP media socket.
pub fn bind(listen: SocketAddr) -> anyhow::Result<MediaSocket> {
    let socket = bind_tuned(listen)
        .map_err(|e| anyhow::anyhow!("media.listen: cannot bind UDP {listen}: {e}"))?;
    let local_addr = socket.local_addr()?;
    let wake_to = if local_addr.ip().is_unspecified() {
        if local_addr.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], local_addr.port()))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, local_addr.port()))
        }
    } else {
        local_addr
    };
    Ok(MediaSocket {
        socket,
        waker: Arc::new(Waker::new(wake_to)?),
        local_addr,
    })
}

/// One shard to start: its socket, its SFU configuration (candidates with its
/// own port), and the relayed packets the built-in TURN hands to it.
pub struct ShardSpec {
    /// The bound socket.
    pub socket: MediaSocket,
    /// The SFU core's configuration.
    pub cfg: SfuConfig,
    /// Relayed packets for this shard's SFU, when TURN runs.
    pub relayed: Option<mpsc::Receiver<LocalPacket>>,
}

/// The built-in TURN server as the media threads use it.
pub struct TurnSpec {
    /// Hand-off to the TURN thread.
    pub handle: TurnHandle,
    /// Send to UDP-relayed viewers from the media thread itself ([`RelaySend`]).
    pub media_sends: bool,
}

/// Starts one media thread per shard.
pub fn spawn(
    specs: Vec<ShardSpec>,
    turn: Option<TurnSpec>,
    io: impl Into<MediaIo>,
    span: SpanPolicy,
) -> anyhow::Result<MediaHandle> {
    let io = io.into();
    let n = specs.len();
    anyhow::ensure!(n > 0, "media: at least one shard");
    // The threads' bus: every thread may queue for every other.
    let (bus_tx, mut inboxes): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| {
            let (tx, rx) = mpsc::sync_channel(BUS_DEPTH);
            (tx, Some(rx))
        })
        .unzip();
    let bus_links: Vec<_> = bus_tx
        .into_iter()
        .zip(&specs)
        .map(|(tx, spec)| (tx, spec.socket.waker.clone()))
        .collect();
    let shared = Arc::new(Shared {
        shards: (0..n).map(|_| Mutex::new(ShardState::default())).collect(),
        ..Default::default()
    });
    shared.alive.store(true, Ordering::Relaxed);
    let mut links = Vec::with_capacity(n);
    for (shard, spec) in specs.into_iter().enumerate() {
        let ShardSpec {
            socket:
                MediaSocket {
                    socket,
                    waker,
                    local_addr,
                },
            cfg,
            relayed,
        } = spec;
        let waker_addr = waker.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let candidates = cfg.candidates.clone();
        let thread_waker = waker.clone();
        let turn = match (&turn, relayed) {
            (Some(t), Some(rx)) => Some((t.handle.clone(), rx, t.media_sends)),
            _ => None,
        };
        let inbox = inboxes[shard]
            .take()
            .ok_or_else(|| anyhow::anyhow!("media: shard {shard} started twice"))?;
        let bus = ShardBus::new(bus_links.clone(), inbox);
        std::thread::Builder::new()
            .name(format!("media-{shard}"))
            .spawn(move || {
                let sender = batch_io::Sender::new(&socket, io.gso, GSO_GROUP_BY_DESTINATION);
                if io.batch && !batch_io::enable_rx_timestamps(&socket) {
                    debug!("no kernel receive timestamps: fan-out delay from the receive call");
                }
                // Built here: the senders' scratch buffers stay on their thread.
                let turn = turn.map(|(handle, rx, media_sends)| TurnLink {
                    sends: media_sends
                        .then(|| RelaySend::new(&handle, io.gso))
                        .and_then(|r| {
                            r.map_err(|e| warn!("relayed viewers go through the TURN thread: {e}"))
                                .ok()
                        }),
                    handle,
                    rx,
                });
                if sender.gso_active() {
                    thread_shared.gso_threads.fetch_add(1, Ordering::Relaxed);
                }
                let mut engine = Engine {
                    sfu: Sfu::new(cfg),
                    shard,
                    shards: n,
                    socket,
                    local_addr,
                    candidates,
                    waker_addr,
                    waker: thread_waker,
                    rx,
                    turn,
                    relayed: HashMap::default(),
                    shared: thread_shared.clone(),
                    last_publish: Instant::now(),
                    last_prune: Instant::now(),
                    batch_io: io.batch,
                    out: Vec::with_capacity(OUT_QUEUE),
                    sender,
                    received_at: None,
                    bus,
                    exports: Exports::default(),
                    mirrors: HashMap::default(),
                };
                engine.run();
                if engine.sender.gso_active() {
                    thread_shared.gso_threads.fetch_sub(1, Ordering::Relaxed);
                }
                thread_shared.alive.store(false, Ordering::Relaxed);
            })?;
        info!(shard, %local_addr, "media thread started");
        links.push(ShardLink {
            tx,
            waker,
            local_addr,
        });
    }
    Ok(MediaHandle {
        local_addr: links[0].local_addr,
        shards: links,
        shared,
        span,
        span_turn: Arc::new(AtomicUsize::new(0)),
    })
}

/// The TURN side of a media thread: where relayed packets come from and go to.
struct TurnLink {
    handle: TurnHandle,
    rx: mpsc::Receiver<LocalPacket>,
    /// The media thread's own sends to UDP-relayed viewers (None: all hand-off).
    sends: Option<RelaySend>,
}

struct Engine {
    sfu: Sfu,
    shard: usize,
    shards: usize,
    socket: UdpSocket,
    local_addr: SocketAddr,
    candidates: Vec<SocketAddr>,
    waker_addr: SocketAddr,
    waker: Arc<Waker>,
    rx: mpsc::Receiver<MediaCmd>,
    turn: Option<TurnLink>,
    /// Relayed addresses heard from through the hand-off, with when last heard.
    /// (Looked up per packet sent: the fast hasher; the keys are this edge's own
    /// TURN relay addresses.)
    relayed: HashMap<SocketAddr, Instant, BuildHasherDefault<FxHasher>>,
    shared: Arc<Shared>,
    last_publish: Instant,
    last_prune: Instant,
    /// Use recvmmsg/sendmmsg (the default) instead of one call per datagram.
    batch_io: bool,
    /// Transmits waiting for the next `sendmmsg`.
    out: Vec<edgerelay_sfu::Transmit>,
    /// Sends the batches (sendmmsg, UDP GSO).
    sender: batch_io::Sender,
    /// When the first datagram of the last receive that handed datagrams to the
    /// SFU arrived (kernel stamp), for the mirrors' feeds of what it brought.
    received_at: Option<Instant>,
    /// The other media threads (rooms spanning threads).
    bus: ShardBus,
    /// Rooms homed here that other threads mirror.
    exports: Exports,
    /// Rooms mirrored here, and their home threads.
    mirrors: HashMap<String, usize>,
}

impl Shared {
    /// Adds one send round's failures and GSO use to the counters.
    fn count_sends(&self, r: &batch_io::SendReport) {
        if r.failed > 0 {
            self.send_errors
                .fetch_add(r.failed as u64, Ordering::Relaxed);
        }
        if r.gso_sends > 0 {
            self.gso_sends
                .fetch_add(r.gso_sends as u64, Ordering::Relaxed);
            self.gso_segments
                .fetch_add(r.gso_segments as u64, Ordering::Relaxed);
        }
    }
}

/// A mirror thread drops the home's packets older than this instead of sending
/// them late (the home thread's own socket drops when it falls behind: this is
/// the mirrors' equivalent, bounding their delay and letting them catch up).
const MAX_FEED_LAG: Duration = Duration::from_millis(300);

/// Transmits queued before a `sendmmsg` round (several calls of [`batch_io::BATCH`]
/// messages); a larger queue splits fewer GSO runs at its boundary.
const OUT_QUEUE: usize = batch_io::BATCH * 4;

impl Engine {
    fn run(&mut self) {
        let mut buf = vec![0u8; batch_io::MAX_DATAGRAM];
        let mut batch = batch_io::RecvBatch::default();
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                info!("media thread stopping");
                return;
            }
            self.shared.loop_iterations.fetch_add(1, Ordering::Relaxed);
            self.commands();
            self.bus_in();
            self.handoff_in();
            self.flush();
            let now = Instant::now();
            self.received_at = None;
            self.observe_departed(now);
            let next = self
                .sfu
                .poll_timeout()
                .unwrap_or(now + Duration::from_millis(100))
                .min(now + Duration::from_millis(250));
            if next <= now {
                self.sfu.handle_timeout(now);
                continue;
            }
            // Timer slack: waking for every pacer deadline of every viewer costs more in
            // context switches than the work itself; due timers are handled together.
            let wait = (next - now).max(TIMER_SLACK);
            if self.batch_io {
                self.receive_batch(wait, &mut batch);
            } else {
                self.receive_one(wait, &mut buf);
            }
            let now = Instant::now();
            if self.sfu.poll_timeout().is_some_and(|t| t <= now) {
                self.sfu.handle_timeout(now);
            }
            if now.saturating_duration_since(self.last_publish) >= Duration::from_millis(250) {
                self.publish_state(now);
            }
            if now.saturating_duration_since(self.last_prune) >= Duration::from_secs(30) {
                self.last_prune = now;
                // TURN allocations live at most an hour; forget relays silent for longer.
                self.relayed
                    .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(3600));
            }
        }
    }

    /// Counts the fan-out delay of the publisher packets the last flush completed:
    /// each from its arrival (the kernel's stamp) to now, and once for the pass,
    /// from the oldest of them. A packet its room held until its frame was whole
    /// counts the hold too.
    fn observe_departed(&mut self, now: Instant) {
        let mut oldest: Option<Instant> = None;
        for (arrived, n) in self.sfu.take_departed() {
            self.shared
                .packet_delay
                .observe_n(now.saturating_duration_since(arrived), u64::from(n));
            oldest = Some(oldest.map_or(arrived, |o| o.min(arrived)));
        }
        if let Some(t) = oldest {
            self.shared
                .fanout_delay
                .observe(now.saturating_duration_since(t));
        }
    }

    /// Waits up to `wait`, then takes up to a batch of datagrams in one call.
    fn receive_batch(&mut self, wait: Duration, batch: &mut batch_io::RecvBatch) {
        match batch_io::wait_readable(&self.socket, wait) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("media poll failed: {e}");
                return;
            }
        }
        match batch_io::recv_batch(&self.socket, batch) {
            Ok(n) => {
                if n > 0 {
                    self.shared.receive_calls.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .datagrams_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                let now = Instant::now();
                // From the kernel's arrival stamp: the wait in the socket while this
                // thread was busy counts in the fan-out delay.
                let arrival = batch.first_arrival(now, self.waker_addr).unwrap_or(now);
                self.sfu.arrived_at(arrival);
                for (source, data) in batch.iter() {
                    if source == self.waker_addr {
                        continue;
                    }
                    if self.received_at.is_none() {
                        self.received_at = Some(arrival);
                    }
                    self.heard_direct(source);
                    let dest = self.destination_for(source);
                    self.sfu.handle_datagram(now, source, dest, data);
                }
            }
            // ICMP errors from earlier sends surface here on Linux; not fatal.
            Err(e) => debug!("media recv error: {e}"),
        }
    }

    /// One datagram per system call (`media.batch_io = false`, the baseline).
    fn receive_one(&mut self, wait: Duration, buf: &mut [u8]) {
        if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
            warn!("set_read_timeout: {e}");
        }
        match self.socket.recv_from(buf) {
            Ok((n, source)) => {
                if source == self.waker_addr {
                    return;
                }
                let dest = self.destination_for(source);
                let now = Instant::now();
                if self.received_at.is_none() {
                    self.received_at = Some(now);
                }
                self.heard_direct(source);
                self.sfu.arrived_at(now);
                self.sfu.handle_datagram(now, source, dest, &buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => debug!("media recv error: {e}"),
        }
    }

    /// An address that reaches the media socket itself is no (longer a) relayed
    /// one: a TURN allocation that ended freed its port, and a direct client may
    /// now hold it (on the relay's own IP: the same host, or a test on loopback).
    /// Left marked, everything the SFU sends there (its ICE answers first) would
    /// go to the TURN hand-off and die with the allocation.
    fn heard_direct(&mut self, source: SocketAddr) {
        if !self.relayed.is_empty() && self.relayed.remove(&source).is_some() {
            debug!(%source, "a relayed address now sends directly");
        }
    }

    /// The local address str0m should see: the advertised candidate of the
    /// source's family (the socket may be bound to a private or wildcard address).
    fn destination_for(&self, source: SocketAddr) -> SocketAddr {
        self.candidates
            .iter()
            .find(|c| c.is_ipv4() == source.is_ipv4())
            .copied()
            .unwrap_or(self.local_addr)
    }

    /// Sends the queued transmits with as few system calls as possible.
    fn send_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let was_gso = self.sender.gso_active();
        let report = self.sender.send(&self.socket, &self.out);
        self.shared.count_sends(&report);
        if was_gso && !self.sender.gso_active() {
            self.shared.gso_threads.fetch_sub(1, Ordering::Relaxed);
        }
        // The kernel has its copies: the buffers serve the next packets.
        for t in self.out.drain(..) {
            self.sfu.recycle(t.contents.into());
        }
    }

    /// Sends what the media thread framed for UDP-relayed viewers itself.
    fn send_relayed(s: &mut RelaySend, shared: &Shared, sfu: &mut Sfu) {
        if s.queued() == 0 {
            return;
        }
        let (sent, r) = s.send(|buf| sfu.recycle(buf));
        shared.relay_sends.fetch_add(sent as u64, Ordering::Relaxed);
        // Counted as the TURN server's relayed traffic, which it is on the wire.
        metrics::counter!("edgerelay_turn_relayed_packets_total", "direction" => "to_client")
            .increment(sent as u64);
        shared.count_sends(&r);
    }

    /// Feeds packets relayed by the built-in TURN server to the SFU.
    fn handoff_in(&mut self) {
        let Some(turn) = &self.turn else {
            return;
        };
        self.waker.pending.store(false, Ordering::Release);
        let now = Instant::now();
        // (The TURN thread's hand-off carries no kernel stamp.)
        self.sfu.arrived_at(now);
        for _ in 0..4096 {
            let Ok(p) = turn.rx.try_recv() else {
                break;
            };
            if self.relayed.len() < 100_000 || self.relayed.contains_key(&p.relay) {
                self.relayed.insert(p.relay, now);
            }
            self.shared.relayed_in.fetch_add(1, Ordering::Relaxed);
            self.sfu.handle_datagram(now, p.relay, p.sfu, &p.data);
        }
    }

    fn flush(&mut self) {
        // Mirrors first: they fan out their share while this thread does its own.
        self.bus_out();
        // The clock only matters to relayed sends (route expiry).
        let mut now = None;
        if let Some(s) = self.turn.as_mut().and_then(|t| t.sends.as_mut()) {
            s.refresh();
            now = Some(Instant::now());
        }
        while let Some(t) = self.sfu.poll_transmit() {
            if let Some(turn) = &mut self.turn {
                if self.relayed.contains_key(&t.destination) {
                    let t = match (turn.sends.as_mut(), now) {
                        (Some(s), Some(now)) => match s.queue(now, t) {
                            Ok(()) => {
                                if s.queued() >= OUT_QUEUE {
                                    Self::send_relayed(s, &self.shared, &mut self.sfu);
                                }
                                continue;
                            }
                            Err(t) => t,
                        },
                        _ => t,
                    };
                    self.shared.relayed_out.fetch_add(1, Ordering::Relaxed);
                    if !turn
                        .handle
                        .send_from_local(t.source, t.destination, &t.contents)
                    {
                        self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            }
            if self.batch_io {
                self.out.push(t);
                if self.out.len() >= OUT_QUEUE {
                    self.send_out();
                }
            } else {
                if let Err(e) = self.socket.send_to(&t.contents, t.destination) {
                    self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(dest = %t.destination, "media send failed: {e}");
                }
                self.sfu.recycle(t.contents.into());
            }
        }
        self.send_out();
        if let Some(s) = self.turn.as_mut().and_then(|t| t.sends.as_mut()) {
            Self::send_relayed(s, &self.shared, &mut self.sfu);
        }
        while let Some(ev) = self.sfu.poll_event() {
            match &ev {
                SfuEvent::Connected { peer, room, role } => {
                    info!(%room, peer = peer.as_u64(), role = role.as_str(), "peer connected")
                }
                SfuEvent::Disconnected { peer, room, role } => {
                    info!(%room, peer = peer.as_u64(), role = role.as_str(), "peer gone")
                }
                SfuEvent::RoomOpened { room } => info!(%room, "room opened"),
                SfuEvent::RoomClosed { room } => {
                    info!(%room, "room closed");
                    self.exports.close(room);
                    if let Some(home) = self.mirrors.remove(room) {
                        let msg = ShardMsg::Unsubscribe {
                            room: room.clone(),
                            shard: self.shard,
                        };
                        self.bus_send(home, msg);
                    }
                }
            }
        }
        // Keyframe requests of viewers that connected in this flush.
        self.bus_out();
    }

    /// Queues a message for another media thread, counting what is dropped.
    fn bus_send(&self, to: usize, msg: ShardMsg) {
        if !self.bus.send(to, msg) {
            self.shared.span_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands exported rooms' packets to their mirrors and mirror rooms' keyframe
    /// requests to their homes.
    fn bus_out(&mut self) {
        while let Some(feed) = self.sfu.poll_feed() {
            let mut to = self.exports.subscribers(feed.room()).peekable();
            if to.peek().is_none() {
                continue;
            }
            let mut feed = feed;
            if let Some(t) = self.received_at {
                // The kernel's arrival stamp of the batch, for the mirrors' delay.
                feed.arrived_at(t);
            }
            let feed = Arc::new(feed);
            for k in to {
                self.shared.span_feeds.fetch_add(1, Ordering::Relaxed);
                self.bus_send(k, ShardMsg::Feed(feed.clone()));
            }
        }
        while let Some(Upstream::Keyframe { room, rid }) = self.sfu.poll_upstream() {
            if let Some(&home) = self.mirrors.get(&room) {
                let shard = self.shard;
                self.bus_send(home, ShardMsg::Keyframe { room, rid, shard });
            }
        }
    }

    /// Takes what the other media threads sent.
    fn bus_in(&mut self) {
        // Cleared before draining: a message queued after this wakes the thread again.
        self.waker.pending.store(false, Ordering::Release);
        for _ in 0..BUS_DEPTH {
            let Ok(msg) = self.bus.inbox.try_recv() else {
                break;
            };
            let now = Instant::now();
            match msg {
                ShardMsg::Feed(feed) => {
                    if now.saturating_duration_since(feed.received_at()) > MAX_FEED_LAG {
                        // This thread is behind (starved of CPU): video that old is
                        // worth less to its viewers than catching up; they recover
                        // from the gap by NACK or keyframe request, as from loss.
                        self.shared
                            .span_late
                            .fetch_add(feed.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    // (The feed's packets keep the home's arrival stamp for their
                    // fan-out delay: `Sfu::take_departed`.)
                    self.sfu.feed(now, &feed);
                }
                ShardMsg::Subscribe { room, shard } => self.add_subscriber(now, &room, shard),
                ShardMsg::Unsubscribe { room, shard } => {
                    if self.exports.unsubscribe(&room, shard) {
                        self.sfu.export_feed(&room, false);
                        // Kept open for the mirror only (no publisher, no viewer here)?
                        self.sfu.close_if_empty(&room);
                    }
                    debug!(%room, shard, "mirror unsubscribed");
                }
                ShardMsg::Keyframe { room, rid, shard } => {
                    self.add_subscriber(now, &room, shard);
                    self.sfu.upstream_keyframe(now, &room, rid);
                }
            }
        }
    }

    /// A mirror thread wants `room`'s packets: from now on, starting with what
    /// the room has cached since its last keyframe.
    fn add_subscriber(&mut self, now: Instant, room: &str, shard: usize) {
        if shard == self.shard || !self.sfu.export_feed(room, true) {
            return;
        }
        if self.exports.subscribe(room, shard) {
            info!(%room, shard, "room spans to another media thread");
            if let Some(gop) = self.sfu.gop_feed(now, room) {
                self.bus_send(shard, ShardMsg::Feed(Arc::new(gop)));
            }
        }
    }

    /// Runs a viewer's command on a mirror of a room homed on thread `home`,
    /// opening the mirror (and subscribing to the home) for its first viewer.
    fn view_mirrored(&mut self, now: Instant, home: usize, cmd: MediaCmd) {
        let room = match &cmd {
            MediaCmd::View { room, .. } | MediaCmd::ViewOffer { room, .. } => room.clone(),
            // (Routing wraps only viewers' commands.)
            _ => return self.command(now, cmd),
        };
        if !self.mirrors.contains_key(&room) {
            if !self.sfu.mirror_room(now, &room) {
                // Homed here after all (cannot happen with a fixed thread count).
                return self.command(now, cmd);
            }
            self.mirrors.insert(room.clone(), home);
            let shard = self.shard;
            self.bus_send(
                home,
                ShardMsg::Subscribe {
                    room: room.clone(),
                    shard,
                },
            );
        }
        self.command(now, cmd);
        // A refused offer leaves the new mirror empty: close it (and unsubscribe).
        self.sfu.close_if_empty(&room);
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            let now = Instant::now();
            self.command(now, cmd);
            self.publish_state(now);
        }
    }

    /// Runs one signalling command on this thread's SFU and sends its reply.
    fn command(&mut self, now: Instant, cmd: MediaCmd) {
        match cmd {
            MediaCmd::Spanned { home, cmd } => self.view_mirrored(now, home, *cmd),
            MediaCmd::Publish { room, offer, reply } => {
                let _ = {
                    let r = self.sfu.publish(now, &room, &offer);
                    reply.send(self.globalize(r))
                };
            }
            MediaCmd::View {
                room,
                offer,
                role,
                reply,
            } => {
                let _ = {
                    let r = self.sfu.view(now, &room, &offer, role);
                    reply.send(self.globalize(r))
                };
            }
            MediaCmd::ViewOffer {
                room,
                role,
                audio,
                reply,
            } => {
                let _ = {
                    let r = self.sfu.view_offer(now, &room, role, audio);
                    reply.send(self.globalize(r))
                };
            }
            MediaCmd::Answer { peer, sdp, reply } => {
                let _ = reply.send(self.sfu.accept_answer(now, peer, &sdp));
            }
            MediaCmd::Candidate {
                peer,
                candidate,
                reply,
            } => {
                let _ = reply.send(self.sfu.add_remote_candidate(now, peer, &candidate));
            }
            MediaCmd::Remove { peer, reply } => {
                let _ = reply.send(self.sfu.remove_peer(now, peer));
            }
        }
    }

    /// Makes a joined peer's id unique across shards.
    fn globalize(&self, r: Result<Joined, SfuError>) -> Result<Joined, SfuError> {
        r.map(|mut j| {
            j.peer = global_peer(self.shard, self.shards, j.peer);
            j
        })
    }

    fn publish_state(&mut self, now: Instant) {
        self.last_publish = now;
        let rooms: Vec<RoomInfo> = self
            .sfu
            .rooms()
            .into_iter()
            .map(|r| RoomInfo {
                name: r.name,
                publisher: r.publisher,
                viewers: r.viewers,
                controller: r.controller,
                simulcast: r.simulcast,
                mirror: r.mirror,
            })
            .collect();
        if let Some(Ok(mut slot)) = self.shared.shards.get(self.shard).map(|m| m.lock()) {
            slot.stats = self.sfu.stats().clone();
            slot.rooms = rooms;
            slot.peers = self.sfu.peer_count() as u64;
        }
        // The aggregate the HTTP side reads (a few shards, a few times a second).
        let mut stats = SfuStats::default();
        let mut rooms = Vec::new();
        let mut peers = 0;
        for slot in &self.shared.shards {
            if let Ok(slot) = slot.lock() {
                stats.add(&slot.stats);
                rooms.extend(slot.rooms.iter().cloned());
                peers += slot.peers;
            }
        }
        let rooms = merge_rooms(rooms);
        let viewers: usize = rooms.iter().map(|r| r.viewers).sum();
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = stats;
        }
        if let Ok(mut r) = self.shared.rooms.lock() {
            *r = rooms;
        }
        self.shared.peers.store(peers, Ordering::Relaxed);
        self.shared.viewers.store(viewers as u64, Ordering::Relaxed);
    }
}

/// One entry per room: a room spanning threads is listed by each (its home and
/// its mirrors), and is shown once, with its viewers added up.
fn merge_rooms(rooms: Vec<RoomInfo>) -> Vec<RoomInfo> {
    let mut out: Vec<RoomInfo> = Vec::with_capacity(rooms.len());
    let mut at: HashMap<String, usize> = HashMap::with_capacity(rooms.len());
    for r in rooms {
        match at.get(&r.name) {
            Some(&i) => {
                let m = &mut out[i];
                m.viewers += r.viewers;
                m.publisher |= r.publisher;
                m.controller |= r.controller;
                m.simulcast |= r.simulcast;
                m.mirror &= r.mirror;
            }
            None => {
                at.insert(r.name.clone(), out.len());
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spanning_room_is_listed_once() {
        let info = |name: &str, publisher: bool, viewers: usize, mirror: bool| RoomInfo {
            name: name.into(),
            publisher,
            viewers,
            controller: !mirror,
            simulcast: false,
            mirror,
        };
        let merged = merge_rooms(vec![
            info("big", false, 300, true),
            info("small", true, 2, false),
            info("big", true, 256, false),
            info("big", false, 299, true),
        ]);
        assert_eq!(merged.len(), 2);
        let big = &merged[0];
        assert_eq!(
            (big.viewers, big.publisher, big.controller, big.mirror),
            (855, true, true, false)
        );
        assert_eq!(merged[1].viewers, 2);
    }

    #[test]
    fn peer_ids_round_trip_through_their_shard() {
        for n in 1..=8 {
            for shard in 0..n {
                for (index, generation) in [(0u64, 1u64), (5, 7), (1_000_000, u32::MAX as u64)] {
                    let local = PeerId::from_u64((generation << 32) | index);
                    let g = global_peer(shard, n, local);
                    assert_eq!(local_peer(n, g), (shard, local), "n={n} shard={shard}");
                }
            }
        }
        // Distinct shards never produce the same global id for the same local id.
        let local = PeerId::from_u64((1 << 32) | 3);
        assert_ne!(global_peer(0, 2, local), global_peer(1, 2, local));
        // A bogus id from a URL decodes to some shard without panicking.
        let (k, _) = local_peer(3, PeerId::from_u64(u64::MAX));
        assert!(k < 3);
    }

    #[test]
    fn rooms_spread_over_shards_stably() {
        assert_eq!(shard_of("demo", 1), 0);
        let a = shard_of("room-a", 4);
        assert_eq!(a, shard_of("room-a", 4));
        let used: std::collections::HashSet<usize> =
            (0..64).map(|i| shard_of(&format!("room-{i}"), 4)).collect();
        assert_eq!(used.len(), 4, "64 rooms use all 4 shards");
    }
}
