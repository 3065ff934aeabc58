//! The viewer swarm: a few worker threads (one per core by default), each owning many
//! str0m peers in RTP mode, each peer with its own non-blocking UDP socket, all
//! multiplexed on one `mio` poll per thread. Peers do full ICE, DTLS, SRTP and RTCP
//! feedback (receiver reports, NACK), but nothing decodes: every received RTP packet
//! is counted, checked for a keyframe start and for the source's send-time stamp.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use str0m::media::Pt;
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use super::gro;
use super::h264;
use super::source::unix_micros;
use super::turn_client::{TurnClient, TurnEvent, TurnInput};

/// Marker for "not yet" in the atomic timestamps.
pub const NONE: u64 = u64::MAX;
/// Receive buffer size.
const RECV_BUF: usize = 2048;
/// Interval at which a worker fires expired str0m timeouts.
const TICK: Duration = Duration::from_millis(5);
/// Kernel receive buffer asked for each viewer socket.
const SO_RCVBUF: usize = 1 << 20;
/// Window for duplicate detection (in sequence numbers).
const DEDUP_WINDOW: u64 = 1024;

/// One DTLS certificate shared by every viewer of the process: generating one per
/// viewer costs the generator CPU during a join storm and measures nothing.
fn shared_dtls_cert() -> Option<str0m::config::DtlsCert> {
    static CERT: std::sync::OnceLock<Option<str0m::config::DtlsCert>> = std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    })
    .clone()
}

/// str0m configuration of a swarm viewer: RTP mode, H.264 (and VP8) only.
pub fn rtc_config() -> RtcConfig {
    let mut cfg = RtcConfig::new().clear_codecs().set_rtp_mode(true);
    if let Some(cert) = shared_dtls_cert() {
        cfg = cfg.set_dtls_cert(cert);
    }
    let cc = cfg.codec_config();
    cc.add_h264(Pt::from(102), Some(Pt::from(103)), true, 0x42e01f);
    cc.add_h264(Pt::from(127), Some(Pt::from(121)), true, 0x42001f);
    cfg.enable_vp8(true)
}

/// Counters of one viewer, shared between its worker thread and the controller.
#[derive(Debug)]
pub struct ViewerCounters {
    /// Unique RTP packets received.
    pub received: AtomicU64,
    /// Packets expected from the sequence range seen (highest - first + 1).
    pub expected: AtomicU64,
    /// Duplicate packets (retransmissions that arrived twice).
    pub duplicates: AtomicU64,
    /// Payload bytes received.
    pub bytes: AtomicU64,
    /// Microseconds from the join request to the first RTP packet, or [`NONE`].
    pub first_rtp_us: AtomicU64,
    /// Microseconds from the join request to the first packet of a keyframe, or [`NONE`].
    pub first_key_us: AtomicU64,
    /// Microseconds from the join request to the end of the first gap-free keyframe.
    pub key_complete_us: AtomicU64,
    /// Microseconds from the join request to the viewer entering its swarm thread
    /// with the answer applied (signalling done), or [`NONE`].
    pub answered_us: AtomicU64,
    /// Microseconds from the join request to ICE + DTLS up, or [`NONE`] (splits a
    /// slow join into connection setup and media).
    pub connected_us: AtomicU64,
    /// DTLS up.
    pub connected: AtomicBool,
    /// Signalling or media failed.
    pub failed: AtomicBool,
}

impl Default for ViewerCounters {
    fn default() -> Self {
        Self {
            received: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            first_rtp_us: AtomicU64::new(NONE),
            first_key_us: AtomicU64::new(NONE),
            key_complete_us: AtomicU64::new(NONE),
            connected_us: AtomicU64::new(NONE),
            answered_us: AtomicU64::new(NONE),
            connected: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }
    }
}

/// A signalled viewer ready for its worker thread.
pub struct NewViewer {
    /// The peer, with the remote description applied.
    pub rtc: Rtc,
    /// Its socket (already bound; its address is the host candidate).
    pub socket: std::net::UdpSocket,
    /// When signalling started.
    pub requested: Instant,
    /// Where to count.
    pub counters: Arc<ViewerCounters>,
    /// Relayed viewer: its TURN allocation (the socket talks only to the TURN server).
    pub turn: Option<TurnClient>,
    /// The server seated it as the room's controller (its delays are also reported
    /// on their own: the controller's latency is the session's).
    pub controller: bool,
}

/// State shared by the controller and all workers.
#[derive(Default)]
pub struct SwarmShared {
    /// Stop the workers.
    pub stop: AtomicBool,
    /// Collect delay samples (the steady phase).
    pub measuring: AtomicBool,
    /// TURN requests of relayed viewers that failed after the join (refreshes).
    pub turn_errors: AtomicU64,
    /// Viewer sockets take UDP GRO (`--receiver-gro`, see [`gro`]).
    pub gro: bool,
}

/// One-way delay samples (microseconds) from the source's stamp in a frame.
#[derive(Debug, Default)]
pub struct Delays {
    /// To the packet that carries the stamp (the frame's first).
    pub first: Vec<u32>,
    /// To the frame's last packet (RTP marker): when a viewer can decode it.
    pub complete: Vec<u32>,
    /// `complete`, of the controller only.
    pub controller_complete: Vec<u32>,
}

impl Delays {
    fn push(v: &mut Vec<u32>, sent_us: u64) {
        let d = unix_micros().saturating_sub(sent_us);
        v.push(d.min(u64::from(u32::MAX)) as u32);
    }

    /// Adds another worker's samples.
    pub fn extend(&mut self, o: Delays) {
        self.first.extend(o.first);
        self.complete.extend(o.complete);
        self.controller_complete.extend(o.controller_complete);
    }
}

/// A running worker thread; `join` returns its one-way delay samples.
pub struct Worker {
    /// Hands new viewers to the thread.
    pub tx: mpsc::Sender<NewViewer>,
    thread: JoinHandle<Delays>,
}

impl Worker {
    /// Starts a worker thread.
    pub fn spawn(idx: usize, shared: Arc<SwarmShared>) -> anyhow::Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("loadtest-{idx}"))
            .spawn(move || match worker_loop(rx, &shared) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("loadtest worker failed: {e:#}");
                    Delays::default()
                }
            })?;
        Ok(Worker { tx, thread })
    }

    /// Waits for the thread (after [`SwarmShared::stop`]) and returns its delay samples.
    pub fn join(self) -> Delays {
        drop(self.tx);
        self.thread.join().unwrap_or_default()
    }
}

/// Keyframe tracking of one viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyState {
    /// No keyframe start seen yet.
    Waiting,
    /// Inside the first keyframe; last sequence number seen.
    InKey(u64),
    /// First complete keyframe seen (or given up after a gap, then waiting again).
    Done,
}

struct Viewer {
    rtc: Rtc,
    socket: UdpSocket,
    /// The local candidate's address: the socket's, or the relayed address.
    local: SocketAddr,
    turn: Option<TurnClient>,
    /// Encoding buffer of a relayed viewer.
    scratch: Vec<u8>,
    timeout: Instant,
    requested: Instant,
    c: Arc<ViewerCounters>,
    first_seq: Option<u64>,
    max_seq: u64,
    /// Bit i set: sequence number `max_seq - i` received.
    window: [u64; (DEDUP_WINDOW / 64) as usize],
    key: KeyState,
    /// The RTP timestamp and source stamp of the frame being received.
    stamp: Option<(u32, u64)>,
    controller: bool,
    dead: bool,
}

impl Viewer {
    fn since_request(&self) -> u64 {
        self.requested.elapsed().as_micros() as u64
    }

    /// Records a sequence number; returns false for a duplicate.
    fn record_seq(&mut self, seq: u64) -> bool {
        let Some(first) = self.first_seq else {
            self.first_seq = Some(seq);
            self.max_seq = seq;
            self.window = [0; (DEDUP_WINDOW / 64) as usize];
            self.window[0] = 1;
            return true;
        };
        if seq < first {
            return false;
        }
        if seq > self.max_seq {
            let shift = seq - self.max_seq;
            self.shift_window(shift);
            self.max_seq = seq;
            self.window[0] |= 1;
            return true;
        }
        let back = self.max_seq - seq;
        if back >= DEDUP_WINDOW {
            return false; // too old to tell: count as duplicate, not as new
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.window[w] & (1 << b) != 0 {
            return false;
        }
        self.window[w] |= 1 << b;
        true
    }

    fn shift_window(&mut self, shift: u64) {
        let words = self.window.len();
        if shift >= DEDUP_WINDOW {
            self.window = [0; (DEDUP_WINDOW / 64) as usize];
            return;
        }
        let (ws, bs) = ((shift / 64) as usize, shift % 64);
        for i in (0..words).rev() {
            let src = i.checked_sub(ws);
            let mut v = src.map_or(0, |s| self.window[s] << bs);
            if bs > 0 {
                if let Some(s2) = i.checked_sub(ws + 1) {
                    v |= self.window[s2] >> (64 - bs);
                }
            }
            self.window[i] = v;
        }
    }

    /// One datagram from `source`: through the TURN client if relayed, then str0m.
    fn on_datagram(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        shared: &SwarmShared,
        measuring: bool,
        delays: &mut Delays,
    ) {
        let now = Instant::now();
        let (source, data): (SocketAddr, &[u8]) = match self.turn.as_mut() {
            None => (source, data),
            Some(tc) if source == tc.server() => match tc.handle_input(now, data) {
                TurnInput::Peer(peer, data) => (peer, data),
                TurnInput::Consumed => {
                    self.flush_turn(shared);
                    return;
                }
                TurnInput::Ignored => return,
            },
            Some(_) => return,
        };
        let Ok(r) = Receive::new(Protocol::Udp, source, self.local, data) else {
            return;
        };
        if let Err(e) = self.rtc.handle_input(Input::Receive(now, r)) {
            tracing::trace!("viewer dropped datagram: {e}");
        }
        self.drain(measuring, delays);
    }

    fn on_rtp(&mut self, pkt: &str0m::rtp::RtpPacket, measuring: bool, delays: &mut Delays) {
        let seq = *pkt.seq_no;
        if !self.record_seq(seq) {
            self.c.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let c = &self.c;
        if c.received.fetch_add(1, Ordering::Relaxed) == 0 {
            c.first_rtp_us
                .store(self.since_request(), Ordering::Relaxed);
        }
        if let Some(first) = self.first_seq {
            c.expected
                .store(self.max_seq - first + 1, Ordering::Relaxed);
        }
        c.bytes
            .fetch_add(pkt.payload.len() as u64, Ordering::Relaxed);
        let payload = &pkt.payload[..];
        match self.key {
            KeyState::Waiting | KeyState::InKey(_) if h264::starts_keyframe(payload) => {
                if c.first_key_us.load(Ordering::Relaxed) == NONE {
                    c.first_key_us
                        .store(self.since_request(), Ordering::Relaxed);
                }
                // SPS, PPS, IDR fragments all "start" in the sense of carrying key data;
                // only the first one opens the keyframe.
                if self.key == KeyState::Waiting {
                    self.key = KeyState::InKey(seq);
                } else if let KeyState::InKey(last) = self.key {
                    self.key = if seq == last + 1 {
                        KeyState::InKey(seq)
                    } else {
                        KeyState::Waiting
                    };
                }
            }
            KeyState::InKey(last) => {
                self.key = if seq == last + 1 {
                    KeyState::InKey(seq)
                } else {
                    KeyState::Waiting
                };
            }
            _ => {}
        }
        if let KeyState::InKey(_) = self.key {
            if pkt.header.marker {
                self.key = KeyState::Done;
                c.key_complete_us
                    .store(self.since_request(), Ordering::Relaxed);
            }
        }
        if let Some(sent) = h264::read_stamp(payload) {
            if measuring {
                Delays::push(&mut delays.first, sent);
            }
            self.stamp = Some((pkt.header.timestamp, sent));
        }
        if pkt.header.marker {
            if let Some((ts, sent)) = self.stamp.take() {
                if measuring && ts == pkt.header.timestamp {
                    Delays::push(&mut delays.complete, sent);
                    if self.controller {
                        Delays::push(&mut delays.controller_complete, sent);
                    }
                }
            }
        }
    }

    /// Polls str0m until it wants to wait; sends transmits, handles events.
    fn drain(&mut self, measuring: bool, delays: &mut Delays) {
        for _ in 0..10_000 {
            let out = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!("viewer poll_output: {e}");
                    self.fail();
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    self.timeout = t;
                    return;
                }
                Output::Transmit(t) => {
                    let r = match &self.turn {
                        Some(tc) => {
                            if !tc.encode_to_peer(t.destination, &t.contents, &mut self.scratch) {
                                continue;
                            }
                            self.socket.send_to(&self.scratch, tc.server())
                        }
                        None => self.socket.send_to(&t.contents, t.destination),
                    };
                    if let Err(e) = r {
                        tracing::trace!("viewer send: {e}");
                    }
                }
                Output::Event(e) => match e {
                    Event::Connected => {
                        self.c.connected.store(true, Ordering::Relaxed);
                        if self.c.connected_us.load(Ordering::Relaxed) == NONE {
                            self.c
                                .connected_us
                                .store(self.since_request(), Ordering::Relaxed);
                        }
                    }
                    Event::RtpPacket(p) => self.on_rtp(&p, measuring, delays),
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        self.fail();
                        return;
                    }
                    _ => {}
                },
            }
        }
        self.timeout = Instant::now() + TICK;
    }

    /// Sends what the TURN client queued and counts its failures.
    fn flush_turn(&mut self, shared: &SwarmShared) {
        let Some(tc) = self.turn.as_mut() else {
            return;
        };
        while let Some(d) = tc.poll_transmit() {
            if let Err(e) = self.socket.send_to(&d, tc.server()) {
                tracing::trace!("viewer TURN send: {e}");
            }
        }
        while let Some(ev) = tc.poll_event() {
            if let TurnEvent::Failed(why) = ev {
                shared.turn_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("viewer TURN: {why}");
            }
        }
    }

    fn fail(&mut self) {
        self.dead = true;
        self.c.failed.store(true, Ordering::Relaxed);
        self.c.connected.store(false, Ordering::Relaxed);
    }
}

fn worker_loop(rx: mpsc::Receiver<NewViewer>, shared: &SwarmShared) -> anyhow::Result<Delays> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut viewers: Vec<Viewer> = Vec::new();
    let mut delays = Delays::default();
    let mut buf = vec![0u8; if shared.gro { gro::GRO_BUF } else { RECV_BUF }];
    let mut next_tick = Instant::now();
    let mut rx_open = true;
    while !shared.stop.load(Ordering::Relaxed) {
        let measuring = shared.measuring.load(Ordering::Relaxed);
        // New viewers.
        while rx_open {
            match rx.try_recv() {
                Ok(nv) => {
                    if let Err(e) = add_viewer(&mut poll, &mut viewers, nv, &mut delays, shared.gro)
                    {
                        tracing::warn!("cannot add viewer: {e:#}");
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => rx_open = false,
            }
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        poll.poll(&mut events, Some(wait))?;
        for ev in events.iter() {
            let Some(v) = viewers.get_mut(ev.token().0) else {
                continue;
            };
            if v.dead {
                continue;
            }
            // Bounded per wake-up so one busy socket cannot starve the others.
            for _ in 0..256 {
                let got = if shared.gro {
                    gro::recv(&v.socket, &mut buf)
                } else {
                    v.socket.recv_from(&mut buf).map(|(n, a)| (n, a, n))
                };
                match got {
                    Ok((n, source, segment)) => {
                        for data in buf[..n].chunks(segment) {
                            v.on_datagram(source, data, shared, measuring, &mut delays);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("viewer recv: {e}");
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + TICK;
            for v in viewers.iter_mut().filter(|v| !v.dead) {
                if let Some(tc) = v.turn.as_mut() {
                    if tc.poll_timeout().is_some_and(|t| t <= now) {
                        tc.handle_timeout(now);
                        v.flush_turn(shared);
                    }
                }
                if v.timeout > now {
                    continue;
                }
                if let Err(e) = v.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!("viewer timeout: {e}");
                }
                v.drain(measuring, &mut delays);
                if !v.rtc.is_alive() {
                    v.fail();
                }
            }
        }
    }
    let now = Instant::now();
    for v in &mut viewers {
        v.rtc.disconnect();
        v.drain(false, &mut delays);
        if let Some(tc) = v.turn.as_mut() {
            tc.deallocate(now);
            v.flush_turn(shared);
        }
    }
    Ok(delays)
}

fn add_viewer(
    poll: &mut Poll,
    viewers: &mut Vec<Viewer>,
    nv: NewViewer,
    delays: &mut Delays,
    gro_on: bool,
) -> anyhow::Result<()> {
    let local = match nv.turn.as_ref().and_then(TurnClient::relayed) {
        Some(relayed) => relayed,
        None => nv.socket.local_addr()?,
    };
    nv.socket.set_nonblocking(true)?;
    let sock2 = socket2::SockRef::from(&nv.socket);
    let _ = sock2.set_recv_buffer_size(SO_RCVBUF);
    if gro_on {
        gro::enable(&nv.socket)?;
    }
    let mut socket = UdpSocket::from_std(nv.socket);
    let token = Token(viewers.len());
    poll.registry()
        .register(&mut socket, token, Interest::READABLE)?;
    nv.counters
        .answered_us
        .store(nv.requested.elapsed().as_micros() as u64, Ordering::Relaxed);
    let mut v = Viewer {
        rtc: nv.rtc,
        socket,
        local,
        turn: nv.turn,
        scratch: Vec::new(),
        timeout: Instant::now(),
        requested: nv.requested,
        c: nv.counters,
        first_seq: None,
        max_seq: 0,
        window: [0; (DEDUP_WINDOW / 64) as usize],
        key: KeyState::Waiting,
        stamp: None,
        controller: nv.controller,
        dead: false,
    };
    v.drain(false, delays);
    viewers.push(v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer() -> Viewer {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let local = s.local_addr().expect("addr");
        Viewer {
            rtc: rtc_config().build(Instant::now()),
            socket: UdpSocket::from_std(s),
            local,
            turn: None,
            scratch: Vec::new(),
            timeout: Instant::now(),
            requested: Instant::now(),
            c: Arc::new(ViewerCounters::default()),
            first_seq: None,
            max_seq: 0,
            window: [0; (DEDUP_WINDOW / 64) as usize],
            key: KeyState::Waiting,
            stamp: None,
            controller: false,
            dead: false,
        }
    }

    #[test]
    fn dedup_window_counts_each_sequence_once() {
        let mut v = viewer();
        assert!(v.record_seq(100));
        assert!(v.record_seq(101));
        assert!(!v.record_seq(101));
        assert!(v.record_seq(105)); // gap 102..104
        assert!(v.record_seq(103)); // late (retransmitted)
        assert!(!v.record_seq(103));
        assert!(v.record_seq(100 + 200));
        assert!(v.record_seq(104));
        assert!(!v.record_seq(105));
        assert!(v.record_seq(5000)); // big jump clears the window
        assert!(!v.record_seq(100)); // before the first: ignored
        assert!(!v.record_seq(3000)); // too old to tell
        assert!(v.record_seq(4999));
    }
}
