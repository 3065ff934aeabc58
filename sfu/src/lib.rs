//! The SFU core of edgerelay, on str0m, sans-IO.
//!
//! The driver feeds datagrams and time in ([`Sfu::handle_datagram`],
//! [`Sfu::handle_timeout`]) and takes datagrams and events out
//! ([`Sfu::poll_transmit`], [`Sfu::poll_event`], [`Sfu::poll_timeout`]).
//! No socket, no clock, no thread lives here, so every rule is testable in memory.
//!
//! A [`Sfu`] holds rooms; a room holds one publisher (the instance) and any
//! number of viewers. Each incoming packet's payload is shared by every viewer;
//! per viewer there is only a renumbered header and an SRTP seal, done by the
//! SFU itself on the direct send path ([`SfuConfig::direct_send`], module
//! `direct`) or by str0m in its RTP mode (viewers of simulcast rooms, whose layer
//! follows str0m's bandwidth estimate).
//!
//! A room holds its video packets until their frame is whole (module `gather`:
//! until the RTP marker, the next frame, or `SfuConfig::gather`), so a frame that
//! arrives in pieces, or paced a packet at a time, still leaves to each viewer in
//! one send. The publisher packets of one receive batch are held and fanned out
//! viewer by viewer (each viewer's state is loaded once per batch), in slices of a few
//! hundred datagrams that [`Sfu::poll_transmit`] hands to the driver before
//! sealing the next: the sealed buffers are still in cache when the kernel copies
//! them, and memory in flight stays small whatever the room's size. The driver
//! hands each sent datagram's buffer back ([`Sfu::recycle`]) and the direct path
//! seals the next packets into it: no allocation, no zeroing, and warm memory.

#![deny(clippy::unwrap_used)]

mod buf_pool;
mod codec;
mod direct;
mod gather;
mod gop;
mod key_capture;
mod peer;
mod room;
mod slab;
mod span;
mod srtp_seal;
mod stats;
mod stun;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelData;
use str0m::config::DtlsCert;
use str0m::media::{Direction, KeyframeRequest, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::rtcp::{Nack, Rtcp};
use str0m::rtp::{
    Extension, ExtensionMap, ExtensionValues, RawPacket, RtpPacket, RtpWrite, StreamTx,
};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tracing::{debug, info, warn};

pub use codec::is_keyframe;
pub use gop::{CachedPacket, GopCache, Pushed, Timeline};
pub use peer::Role;
pub use slab::Key as PeerId;
pub use span::{Feed, Upstream};
pub use stats::SfuStats;
pub use str0m::net::Transmit;
pub use stun::is_rtp;

use buf_pool::BufPool;
use direct::{DirectTx, RtpOut, SentRecord};
use gather::Offer;
use key_capture::KeySlot;
use peer::{Peer, Replay, TrackOut, TxTuning};
use room::{Room, VIDEO};
use slab::{Key, Slab};

/// At most this many back-to-back str0m timeouts are served inline per peer poll
/// (one per packet of a paced burst); the rest go through the timer heap.
const IMMEDIATE_RETICKS: u32 = 128;
/// A str0m timeout due within this of the current time is served inline.
const IMMEDIATE_WINDOW: Duration = Duration::from_micros(50);
/// The DTLS certificate shared by the SFU's sessions is replaced this often.
const DTLS_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A replaying viewer gets more of the cached GOP while fewer than this many of
/// its RTP packets wait in str0m's send queue.
const REPLAY_IN_FLIGHT: u64 = 48;
/// Resends stop while they exceed this share of a viewer stream's bytes.
const RTX_RATIO_CAP: f32 = 0.15;
/// A replay that could not write for this long resynchronises its in-flight count.
const REPLAY_STALL: Duration = Duration::from_millis(250);
/// str0m's NACK cache for a direct-path viewer (its sync packets only).
const DIRECT_STR0M_RTX_PACKETS: usize = 8;
/// A direct-path replay waiting for its rate budget is resumed this often at most.
const REPLAY_TICK: Duration = Duration::from_millis(5);

/// Tunables of the SFU core; defaults suit a cloud-streaming edge.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Host candidates offered to every peer (the edge's public media addresses).
    pub candidates: Vec<SocketAddr>,
    /// At most one upstream keyframe request per room per this interval.
    pub keyframe_throttle: Duration,
    /// After a viewer is served the cached GOP, its keyframe requests are
    /// answered by that cache for this long instead of reaching the publisher.
    pub cache_grace: Duration,
    /// Most viewers in one room.
    pub max_viewers_per_room: usize,
    /// Per-viewer bandwidth estimation (TWCC) with pause/resume of video.
    pub bwe: bool,
    /// Initial bandwidth estimate for a viewer, bits per second.
    pub bwe_initial_bps: u64,
    /// How long the estimate must stay below the stream bitrate before video pauses.
    pub bwe_pause_after: Duration,
    /// Label of the data channel that carries viewer input to the publisher.
    pub control_label: String,
    /// Packets each viewer stream keeps for answering NACKs.
    pub rtx_cache_packets: usize,
    /// How old a packet may be and still be resent on NACK.
    pub rtx_cache_age: Duration,
    /// Pace video to viewers through str0m's pacer. Bandwidth estimation only
    /// reacts to paced media, so this stays on whenever `bwe` is on; with `bwe`
    /// off it has no effect.
    pub pacing: bool,
    /// Viewers' media is sealed and sent by the SFU itself ([`direct`]), not through
    /// str0m's send queue and pacer. Bandwidth estimation needs str0m's path, so
    /// `bwe` only applies to viewers that join a simulcast room (which stay on
    /// str0m's path to have their layer chosen).
    pub direct_send: bool,
    /// Longest a room holds a video frame's packets waiting for its last one
    /// (the RTP marker), so each viewer gets the frame in one send (module `gather`);
    /// zero holds nothing.
    pub gather: Duration,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig {
            candidates: Vec::new(),
            keyframe_throttle: Duration::from_millis(300),
            cache_grace: Duration::from_secs(2),
            max_viewers_per_room: 10_000,
            bwe: true,
            bwe_initial_bps: 5_000_000,
            bwe_pause_after: Duration::from_secs(1),
            control_label: "control".to_string(),
            rtx_cache_packets: 256,
            rtx_cache_age: Duration::from_millis(600),
            pacing: true,
            direct_send: true,
            gather: Duration::from_millis(20),
        }
    }
}

/// Why a signalling request was refused. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SfuError {
    /// The SDP could not be parsed or negotiated (400).
    #[error("invalid SDP: {0}")]
    BadSdp(String),
    /// No such room (404).
    #[error("room '{0}' not found")]
    RoomNotFound(String),
    /// The room already has a publisher (409).
    #[error("room '{0}' already has a publisher")]
    PublisherBusy(String),
    /// The room already has a controller (409).
    #[error("room '{0}' already has a controller")]
    ControllerTaken(String),
    /// The room is at its viewer limit (503).
    #[error("room '{0}' is full")]
    RoomFull(String),
    /// No such peer, or it has gone (404).
    #[error("unknown session")]
    UnknownPeer,
    /// The peer is not waiting for an answer (409).
    #[error("no offer pending for this session")]
    NoPendingOffer,
}

/// How a viewer wants to join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleRequest {
    /// Controller if the room has none, else spectator.
    Auto,
    /// Controller or fail.
    Controller,
    /// Spectator.
    Spectator,
}

/// Result of a successful publish or view.
#[derive(Debug)]
pub struct Joined {
    /// The new peer.
    pub peer: PeerId,
    /// Its role in the room.
    pub role: Role,
    /// SDP answer (or offer, for [`Sfu::view_offer`]).
    pub sdp: String,
}

/// What happened, for the driver's logs, metrics and signalling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuEvent {
    /// ICE and DTLS completed for a peer.
    Connected {
        /// The peer.
        peer: PeerId,
        /// Its room.
        room: String,
        /// Its role.
        role: Role,
    },
    /// A peer is gone (closed, timed out, or removed).
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// Its room.
        room: String,
        /// Its role.
        role: Role,
    },
    /// A room was created by its first publisher.
    RoomOpened {
        /// The room.
        room: String,
    },
    /// The last peer of a room left.
    RoomClosed {
        /// The room.
        room: String,
    },
}

/// One room as [`Sfu::rooms`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room's name.
    pub name: String,
    /// Its publisher is connected (here: a mirror reports false).
    pub publisher: bool,
    /// Viewers on this core.
    pub viewers: usize,
    /// A viewer holds the controller role.
    pub controller: bool,
    /// The video is simulcast (its viewers stay on str0m's path).
    pub simulcast: bool,
    /// A mirror of a room homed on another core ([`span`]).
    pub mirror: bool,
}

/// The SFU core: rooms, peers and the packet paths between them.
pub struct Sfu {
    cfg: SfuConfig,
    peers: Slab<Peer>,
    rooms: Slab<Room>,
    room_by_name: HashMap<String, Key>,
    by_ufrag: HashMap<String, Key>,
    by_addr: HashMap<(SocketAddr, SocketAddr), Key>,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    /// Peers with something to send; the last one is served first (a fan-out slice
    /// puts its room's controller last, see [`Sfu::fan_out`]).
    dirty: Vec<Key>,
    dead: Vec<Key>,
    /// Publisher packets waiting for the next [`Sfu::fan_out`].
    pending: Vec<PendingRtp>,
    /// Where a fan-out that [`Sfu::poll_transmit`] paused stands.
    fan_at: FanCursor,
    /// Deadlines of held frames ([`gather`]), with their room and layer; stale
    /// entries are skipped.
    hold_timers: BinaryHeap<Reverse<(Instant, (Key, usize))>>,
    /// Arrival stamps of fanned-out packets, in runs of equal stamps, until the
    /// driver takes them ([`Sfu::take_departed`]).
    departed: Vec<(Instant, u32)>,
    /// The driver's stamp for the datagrams it hands in next ([`Sfu::arrived_at`]).
    arrival_hint: Option<Instant>,
    last_now: Option<Instant>,
    stats: SfuStats,
    seq_seed: u64,
    /// The DTLS certificate every session presents, and when it was made.
    dtls_cert: Option<(DtlsCert, Instant)>,
    /// Sent datagram buffers, back from the driver for the next packets.
    pool: BufPool,
    /// Exported rooms' packets waiting for [`Sfu::poll_feed`], per room.
    feeds: Vec<(Key, Feed)>,
    /// Mirror rooms' requests for their home cores ([`Sfu::poll_upstream`]).
    upstream: VecDeque<Upstream>,
}

/// What forwarding a packet writes to besides the viewer: the counters, and the
/// buffer pool the direct path seals into.
struct Cx<'a> {
    stats: &'a mut SfuStats,
    pool: &'a mut BufPool,
}

impl Sfu {
    /// A new, empty SFU.
    pub fn new(cfg: SfuConfig) -> Self {
        // Idempotent: the first provider installed in the process wins.
        str0m::crypto::from_feature_flags().install_process_default();
        Sfu {
            cfg,
            peers: Slab::default(),
            rooms: Slab::default(),
            room_by_name: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            dead: Vec::new(),
            pending: Vec::new(),
            fan_at: FanCursor::default(),
            hold_timers: BinaryHeap::new(),
            departed: Vec::new(),
            arrival_hint: None,
            last_now: None,
            stats: SfuStats::default(),
            seq_seed: 0,
            dtls_cert: None,
            pool: BufPool::new(RECYCLED_BUFFERS),
            feeds: Vec::new(),
            upstream: VecDeque::new(),
        }
    }

    /// Takes back a sent datagram's buffer (the driver calls this with each
    /// [`Transmit`]'s contents once the kernel has copied them): the direct path
    /// seals later packets into it instead of allocating and zeroing a new one.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.pool.give(buf);
    }

    /// Counters since start.
    pub fn stats(&self) -> &SfuStats {
        &self.stats
    }

    /// Number of rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Number of peers (publishers and viewers).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of viewers across rooms.
    pub fn viewer_count(&self) -> usize {
        self.rooms.iter().map(|(_, r)| r.viewers.len()).sum()
    }

    /// True if the room exists and its publisher is connected.
    pub fn publisher_connected(&self, room: &str) -> bool {
        self.room_by_name
            .get(room)
            .and_then(|k| self.rooms.get(*k))
            .and_then(|r| r.publisher)
            .and_then(|p| self.peers.get(p))
            .is_some_and(|p| p.connected)
    }

    /// The rooms on this core, for the driver's status pages and its choice of
    /// where a new viewer sits.
    pub fn rooms(&self) -> Vec<RoomSummary> {
        self.rooms
            .iter()
            .map(|(_, r)| RoomSummary {
                name: r.name.clone(),
                publisher: r
                    .publisher
                    .and_then(|p| self.peers.get(p))
                    .is_some_and(|p| p.connected),
                viewers: r.viewers.len(),
                controller: r.controller.is_some(),
                simulcast: r.is_simulcast(),
                mirror: r.mirror,
            })
            .collect()
    }

    /// Role and room of a peer.
    pub fn peer_info(&self, peer: PeerId) -> Option<(String, Role)> {
        let p = self.peers.get(peer)?;
        let r = self.rooms.get(p.room)?;
        Some((r.name.clone(), p.role))
    }

    fn tuning(&self) -> TxTuning {
        TxTuning {
            rtx_packets: self.cfg.rtx_cache_packets,
            rtx_age: self.cfg.rtx_cache_age,
            paced: self.cfg.pacing,
        }
    }

    /// Whether a viewer joining room `rk` now goes on the direct send path: when it
    /// is configured, unless the room's video is simulcast (choosing a layer per
    /// viewer needs str0m's bandwidth estimate, which needs str0m's send path).
    fn direct_for(&self, rk: Key) -> bool {
        self.cfg.direct_send && self.rooms.get(rk).is_none_or(|r| !r.is_simulcast())
    }

    fn rtc_config(&self, viewer: bool, direct: bool) -> RtcConfig {
        let mut c = Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_h264(true)
            .enable_vp8(true)
            .enable_vp9(true)
            .enable_av1(true)
            .enable_opus(true, false)
            .set_stats_interval(None);
        if viewer && direct {
            // Incoming RTCP (NACKs) reaches the SFU as raw-packet events.
            c = c.enable_raw_packets(true);
            // No transport-wide sequence numbers: nothing estimates bandwidth on this
            // path, and str0m would keep a record of each sync packet's (1,000 records,
            // ~86 KB per viewer, filling over a quarter of an hour).
            let exts: Vec<(u8, Extension)> = c
                .extension_map()
                .iter()
                .filter(|(_, e)| **e != Extension::TransportSequenceNumber)
                .map(|(id, e)| (id, e.clone()))
                .collect();
            let mut map = ExtensionMap::empty();
            for (id, e) in exts {
                map.set(id, e);
            }
            c = c.set_extension_map(map);
        } else if viewer && self.cfg.bwe {
            c = c.enable_bwe(Some(Bitrate::bps(self.cfg.bwe_initial_bps)));
        }
        c
    }

    /// A new session, with the slot its SRTP keys will land in if it is a viewer
    /// on the direct send path.
    /// The certificate for a new session: one for all sessions (a key pair and a
    /// signature per join cost the media thread ~0.3 ms each in a join storm), made
    /// anew once a day. Sessions only ever check its fingerprint, from the SDP.
    fn dtls_cert(&mut self, now: Instant) -> Option<DtlsCert> {
        let fresh = self
            .dtls_cert
            .as_ref()
            .is_some_and(|(_, born)| now.saturating_duration_since(*born) < DTLS_CERT_LIFETIME);
        if !fresh {
            let cert = key_capture::provider().dtls_provider.generate_certificate();
            self.dtls_cert = cert.map(|c| (c, now));
        }
        self.dtls_cert.as_ref().map(|(c, _)| c.clone())
    }

    fn new_rtc(&mut self, now: Instant, viewer: bool, direct: bool) -> (Rtc, Option<KeySlot>) {
        let mut cfg = self.rtc_config(viewer, direct);
        if let Some(cert) = self.dtls_cert(now) {
            cfg = cfg.set_dtls_cert(cert);
        }
        let (mut rtc, keys) = if viewer && direct {
            let (rtc, slot) = key_capture::build_capturing(cfg, now);
            (rtc, Some(slot))
        } else {
            (cfg.build(now), None)
        };
        for addr in &self.cfg.candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!(%addr, "cannot use media address as ICE candidate: {e}"),
            }
        }
        (rtc, keys)
    }

    fn parse_offer(offer: &str) -> Result<SdpOffer, SfuError> {
        if offer.trim().is_empty() {
            return Err(SfuError::BadSdp("empty offer".into()));
        }
        let bundled = bundle_single_section(offer);
        SdpOffer::from_sdp_string(bundled.as_deref().unwrap_or(offer))
            .map_err(|e| SfuError::BadSdp(e.to_string()))
    }

    /// Accepts a publisher's SDP offer (WHIP) for `room`, creating the room.
    pub fn publish(&mut self, now: Instant, room: &str, offer: &str) -> Result<Joined, SfuError> {
        self.enter(now);
        if let Some(rk) = self.room_by_name.get(room) {
            if self.rooms.get(*rk).is_some_and(|r| r.publisher.is_some()) {
                return Err(SfuError::PublisherBusy(room.to_string()));
            }
        }
        let simulcast = offer.contains("a=simulcast");
        let offer = Self::parse_offer(offer)?;
        let (mut rtc, keys) = self.new_rtc(now, false, false);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        if !answer_has_direction(&answer, &[Direction::RecvOnly, Direction::SendRecv]) {
            return Err(SfuError::BadSdp(
                "the offer has no audio or video to publish (sendonly/sendrecv)".into(),
            ));
        }
        let rk = self.room_key_or_create(room);
        let key = self.insert_peer(now, rtc, keys, rk, Role::Publisher);
        if let Some(r) = self.rooms.get_mut(rk) {
            r.publisher = Some(key);
            r.simulcast = simulcast;
            r.epoch = r.epoch.wrapping_add(1);
            // Every viewer restarts from the new publisher's first keyframe.
            restart_viewers(&mut self.peers, &r.viewers);
        }
        info!(room, peer = key.as_u64(), "publisher joined");
        self.mark_dirty(key);
        self.run_dirty(now);
        Ok(Joined {
            peer: key,
            role: Role::Publisher,
            sdp: answer.to_sdp_string(),
        })
    }

    /// Accepts a viewer's SDP offer (WHEP) for an existing room.
    pub fn view(
        &mut self,
        now: Instant,
        room: &str,
        offer: &str,
        request: RoleRequest,
    ) -> Result<Joined, SfuError> {
        self.enter(now);
        let (rk, role) = self.admit_viewer(room, request)?;
        let offer = Self::parse_offer(offer)?;
        let (mut rtc, keys) = self.new_rtc(now, true, self.direct_for(rk));
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        if !answer_has_direction(&answer, &[Direction::SendOnly, Direction::SendRecv]) {
            return Err(SfuError::BadSdp(
                "the offer has no audio or video to receive (recvonly/sendrecv)".into(),
            ));
        }
        let joined = self.add_viewer(now, (rtc, keys), rk, role, answer.to_sdp_string(), None);
        self.mark_dirty(joined.peer);
        self.run_dirty(now);
        Ok(joined)
    }

    /// Creates a viewer for which the edge makes the offer (the WebSocket flow):
    /// video, audio if asked, and an SCTP section. Complete with [`Sfu::accept_answer`].
    pub fn view_offer(
        &mut self,
        now: Instant,
        room: &str,
        request: RoleRequest,
        audio: bool,
    ) -> Result<Joined, SfuError> {
        self.enter(now);
        let (rk, role) = self.admit_viewer(room, request)?;
        let (mut rtc, keys) = self.new_rtc(now, true, self.direct_for(rk));
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        if audio {
            change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        }
        change.add_channel(self.cfg.control_label.clone());
        let Some((offer, pending)) = change.apply() else {
            return Err(SfuError::BadSdp("nothing to offer".into()));
        };
        Ok(self.add_viewer(
            now,
            (rtc, keys),
            rk,
            role,
            offer.to_sdp_string(),
            Some(pending),
        ))
    }

    /// Registers a negotiated (or offered) viewer: its tracks from our own SDP, its room seat.
    fn add_viewer(
        &mut self,
        now: Instant,
        (rtc, keys): (Rtc, Option<KeySlot>),
        rk: Key,
        role: Role,
        sdp: String,
        pending: Option<SdpPendingOffer>,
    ) -> Joined {
        let tuning = self.tuning();
        let key = self.insert_peer(now, rtc, keys, rk, role);
        if let Some(p) = self.peers.get_mut(key) {
            p.pending_offer = pending;
            p.tracks = sending_tracks(&sdp, p.seq_start, tuning);
        }
        self.attach_viewer(rk, key, role);
        Joined {
            peer: key,
            role,
            sdp,
        }
    }

    /// Applies the remote answer to an offer from [`Sfu::view_offer`].
    pub fn accept_answer(
        &mut self,
        now: Instant,
        peer: PeerId,
        answer: &str,
    ) -> Result<(), SfuError> {
        self.enter(now);
        let p = self.peers.get_mut(peer).ok_or(SfuError::UnknownPeer)?;
        let pending = p.pending_offer.take().ok_or(SfuError::NoPendingOffer)?;
        let answer = match SdpAnswer::from_sdp_string(answer) {
            Ok(a) => a,
            Err(e) => {
                p.pending_offer = Some(pending);
                return Err(SfuError::BadSdp(e.to_string()));
            }
        };
        p.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        self.mark_dirty(peer);
        self.run_dirty(now);
        Ok(())
    }

    /// Adds a trickled remote ICE candidate (`candidate:...` SDP attribute value).
    pub fn add_remote_candidate(
        &mut self,
        now: Instant,
        peer: PeerId,
        candidate: &str,
    ) -> Result<(), SfuError> {
        self.enter(now);
        let p = self.peers.get_mut(peer).ok_or(SfuError::UnknownPeer)?;
        let line = candidate.trim().trim_start_matches("a=");
        let c = Candidate::from_sdp_string(line)
            .map_err(|e| SfuError::BadSdp(format!("bad candidate: {e}")))?;
        p.rtc.add_remote_candidate(c);
        self.mark_dirty(peer);
        self.run_dirty(now);
        Ok(())
    }

    /// Ends a peer's session (WHIP/WHEP DELETE, socket closed).
    pub fn remove_peer(&mut self, now: Instant, peer: PeerId) -> Result<(), SfuError> {
        self.enter(now);
        if self.peers.get(peer).is_none() {
            return Err(SfuError::UnknownPeer);
        }
        self.drop_peer(peer);
        Ok(())
    }

    fn admit_viewer(&mut self, room: &str, request: RoleRequest) -> Result<(Key, Role), SfuError> {
        let rk = *self
            .room_by_name
            .get(room)
            .ok_or_else(|| SfuError::RoomNotFound(room.to_string()))?;
        let r = self
            .rooms
            .get(rk)
            .ok_or_else(|| SfuError::RoomNotFound(room.to_string()))?;
        if r.viewers.len() >= self.cfg.max_viewers_per_room {
            return Err(SfuError::RoomFull(room.to_string()));
        }
        let role = match (request, r.controller) {
            // A mirror's input could not reach the publisher: its seats are spectators.
            (RoleRequest::Controller, _) if r.mirror => {
                return Err(SfuError::ControllerTaken(room.to_string()))
            }
            (RoleRequest::Auto, _) if r.mirror => Role::Spectator,
            (RoleRequest::Auto, None) | (RoleRequest::Controller, None) => Role::Controller,
            (RoleRequest::Controller, Some(_)) => {
                return Err(SfuError::ControllerTaken(room.to_string()))
            }
            _ => Role::Spectator,
        };
        Ok((rk, role))
    }

    fn attach_viewer(&mut self, rk: Key, key: Key, role: Role) {
        if let Some(r) = self.rooms.get_mut(rk) {
            if role == Role::Controller {
                // The controller is served first in every fan-out: its input-to-photon
                // latency is the session's, and at a thousand viewers the last place
                // waits a whole frame's fan-out (~10 ms). Joins are rare; the shift of
                // the list is paid here, never per packet. (No fan-out is half done:
                // every entry point completes it first, see `enter`.)
                r.viewers.insert(0, key);
                r.controller = Some(key);
            } else {
                r.viewers.push(key);
            }
            info!(room = %r.name, peer = key.as_u64(), role = role.as_str(), viewers = r.viewers.len(), "viewer joined");
        }
    }

    fn room_key_or_create(&mut self, room: &str) -> Key {
        if let Some(k) = self.room_by_name.get(room) {
            return *k;
        }
        let k = self.rooms.insert_with(|_| Room::new(room.to_string()));
        self.room_by_name.insert(room.to_string(), k);
        self.events.push_back(SfuEvent::RoomOpened {
            room: room.to_string(),
        });
        k
    }

    fn insert_peer(
        &mut self,
        _now: Instant,
        mut rtc: Rtc,
        keys: Option<KeySlot>,
        room: Key,
        role: Role,
    ) -> Key {
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        self.seq_seed = self
            .seq_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let seq_start = 1 + (self.seq_seed >> 50);
        let key = self.peers.insert_with(|_| Peer {
            rtc,
            room,
            role,
            ufrag: ufrag.clone(),
            addrs: Vec::new(),
            next_timeout: None,
            connected: false,
            dirty: false,
            needs_tick: false,
            channels: Vec::new(),
            pending_offer: None,
            tracks: [None, None],
            cache_grace_until: None,
            video_paused: false,
            bwe_bps: None,
            bwe_desired: 0,
            bwe_low_since: None,
            ssrc_map: Vec::new(),
            seq_start,
            rtp_written: 0,
            rtp_sent: 0,
            keys,
            handshake_route: None,
            direct: None,
        });
        self.by_ufrag.insert(ufrag, key);
        key
    }

    /// Every call from the driver but [`Sfu::poll_transmit`] starts here: the clock
    /// moves on, and a fan-out that `poll_transmit` left half done is completed
    /// before anything can change a room's viewer list or queue more packets (a
    /// viewer skipped or served twice by a resumed fan-out would lose or repeat a
    /// batch). Packets not yet fanned out at all stay pending: they go out together.
    fn enter(&mut self, now: Instant) {
        if self.last_now.is_none_or(|t| now > t) {
            self.last_now = Some(now);
        }
        if let (Some(now), true) = (self.last_now, self.fan_at.paused()) {
            self.fan_out(now, usize::MAX);
        }
    }

    /// Feeds one received UDP datagram. Returns false if no peer took it
    /// (unknown source, malformed), which the driver counts and drops.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> bool {
        self.enter(now);
        let is_stun = stun::is_stun(data);
        let bound = self.by_addr.get(&(source, destination)).copied();
        // A STUN request names its session (the ufrag in USERNAME), and the name wins
        // over the address: a new session may come from an address a stale one still
        // holds (a NAT reusing a port, a client restarting within the ICE timeout).
        let named = if is_stun {
            stun::local_ufrag(data).and_then(|u| self.by_ufrag.get(u).copied())
        } else {
            None
        };
        let Some(key) = named.or(bound) else {
            self.stats.dropped_unknown_source += 1;
            return false;
        };
        let Ok(recv) = Receive::new(Protocol::Udp, source, destination, data) else {
            self.stats.dropped_malformed += 1;
            return false;
        };
        let Some(p) = self.peers.get_mut(key) else {
            if bound == Some(key) {
                self.by_addr.remove(&(source, destination));
            }
            self.stats.dropped_unknown_source += 1;
            return false;
        };
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += data.len() as u64;
        if let Err(e) = p.rtc.handle_input(Input::Receive(now, recv)) {
            debug!(peer = key.as_u64(), "input rejected: {e}");
            self.stats.dropped_malformed += 1;
            return false;
        }
        if named == Some(key) && bound != Some(key) && p.addrs.len() < 8 {
            // The address is this session's once it sends a request the session's ICE
            // password signs: a forged USERNAME moves no one's traffic.
            let pass = p.rtc.direct_api().local_ice_credentials().pass;
            let hmac = str0m::crypto::from_feature_flags().sha1_hmac_provider;
            if stun::integrity_ok(data, pass.as_bytes(), |k, parts| hmac.sha1_hmac(k, parts)) {
                if !p.addrs.contains(&(source, destination)) {
                    p.addrs.push((source, destination));
                }
                self.by_addr.insert((source, destination), key);
                if let Some(old) = bound {
                    self.stats.address_takeovers += 1;
                    info!(
                        peer = key.as_u64(),
                        stale = old.as_u64(),
                        %source,
                        "address taken over from a stale session"
                    );
                }
            }
        }
        self.mark_dirty(key);
        self.poll_peer(now, key);
        true
    }

    /// Advances time: fires str0m timers and pending work.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.enter(now);
        self.expire_holds(now);
        while let Some(Reverse((t, k))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(k) else {
                continue;
            };
            if p.next_timeout != Some(t) {
                continue;
            }
            p.next_timeout = None;
            p.needs_tick = true;
            self.mark_dirty(k);
        }
        // The peers are ticked as the driver takes their datagrams (poll_transmit).
    }

    /// The driver's stamp (the kernel's receive time) for the datagrams it hands
    /// in next: their packets count their fan-out delay ([`Sfu::take_departed`])
    /// from it rather than from the `now` they are handed in with, so the time
    /// they waited in the socket counts too. Stays until the next call; a stamp
    /// later than a datagram's `now` is ignored.
    pub fn arrived_at(&mut self, at: Instant) {
        self.arrival_hint = Some(at);
    }

    /// The publisher packets fanned out to every viewer since the last call, as
    /// (arrival, count) runs: the driver measures each one's fan-out delay from
    /// its arrival to the end of the send round that took them.
    pub fn take_departed(&mut self) -> std::vec::Drain<'_, (Instant, u32)> {
        self.departed.drain(..)
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        // One dirty peer at a time: a keyframe fanned out to every viewer would
        // otherwise sit here whole (a thousand viewers' worth of datagrams at once)
        // instead of leaving in the driver's batches.
        if let Some(now) = self.last_now {
            if !self.fan_at.paused() {
                // A new batch goes out before the peers already waiting (as a whole,
                // for a room smaller than a slice).
                self.fan_out(now, FAN_OUT_CHUNK);
            }
            while self.transmits.is_empty() {
                if let Some(k) = self.dirty.pop() {
                    self.poll_peer(now, k);
                } else if !self.pending.is_empty() {
                    // The next few viewers: their datagrams leave in the driver's next
                    // send round while the buffers are still in cache.
                    self.fan_out(now, FAN_OUT_CHUNK);
                } else {
                    break;
                }
            }
            if self.pending.is_empty() {
                // (Not while a fan-out is paused: dropping a viewer moves the others.)
                while let Some(k) = self.dead.pop() {
                    self.drop_peer(k);
                }
            }
        }
        let t = self.transmits.pop_front()?;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += t.contents.len() as u64;
        Some(t)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        if self.events.is_empty() {
            if let Some(now) = self.last_now {
                self.run_dirty(now);
            }
        }
        self.events.pop_front()
    }

    /// When [`Sfu::handle_timeout`] must be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let peers = &self.peers;
        let peer = first_live(&mut self.timers, |t, k| {
            peers.get(k).is_some_and(|p| p.next_timeout == Some(t))
        });
        let rooms = &self.rooms;
        let hold = first_live(&mut self.hold_timers, |t, (rk, layer)| {
            rooms
                .get(rk)
                .and_then(|r| r.tracks[VIDEO].layers.get(layer))
                .is_some_and(|l| l.hold.deadline() == Some(t))
        });
        match (peer, hold) {
            (Some(p), Some(h)) => Some(p.min(h)),
            (p, h) => p.or(h),
        }
    }

    fn mark_dirty(&mut self, key: Key) {
        if let Some(p) = self.peers.get_mut(key) {
            if !p.dirty {
                p.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn run_dirty(&mut self, now: Instant) {
        self.fan_out(now, usize::MAX);
        while let Some(k) = self.dirty.pop() {
            self.poll_peer(now, k);
        }
        while let Some(k) = self.dead.pop() {
            self.drop_peer(k);
        }
    }

    fn poll_peer(&mut self, now: Instant, key: Key) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        p.dirty = false;
        drain_direct(p, &mut self.transmits);
        if p.needs_tick {
            p.needs_tick = false;
            if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                debug!(peer = key.as_u64(), "timeout failed: {e}");
            }
        }
        let mut immediate_budget = IMMEDIATE_RETICKS;
        loop {
            let Some(p) = self.peers.get_mut(key) else {
                return;
            };
            if !p.rtc.is_alive() {
                self.dead.push(key);
                return;
            }
            match p.rtc.poll_output() {
                // str0m's pacer asks for a timeout 1 µs after its last one between two
                // packets of a burst. Serving it here keeps one viewer's burst together
                // (one run for the driver's segmentation offload) and spares a trip
                // through the timer heap per packet.
                Ok(Output::Timeout(t)) if immediate_budget > 0 && t <= now + IMMEDIATE_WINDOW => {
                    immediate_budget -= 1;
                    self.stats.immediate_reticks += 1;
                    if let Err(e) = p.rtc.handle_input(Input::Timeout(t.max(now))) {
                        debug!(peer = key.as_u64(), "timeout failed: {e}");
                    }
                }
                Ok(Output::Timeout(t))
                    if immediate_budget > 0
                        && p.tracks[VIDEO].as_ref().is_some_and(|t| t.replay.is_some()) =>
                {
                    // Top the replaying viewer's queue up from the cached GOP.
                    immediate_budget -= 1;
                    let wrote = match self.rooms.get(p.room) {
                        Some(r) => pump_replay(
                            r,
                            p,
                            now,
                            &mut Cx {
                                stats: &mut self.stats,
                                pool: &mut self.pool,
                            },
                        ),
                        None => false,
                    };
                    if p.direct.is_some() {
                        drain_direct(p, &mut self.transmits);
                        if !wrote || immediate_budget == 0 {
                            // Come back when the replay's rate budget allows more.
                            let again =
                                if p.tracks[VIDEO].as_ref().is_some_and(|t| t.replay.is_some()) {
                                    t.min(now + REPLAY_TICK)
                                } else {
                                    t
                                };
                            arm_timer(&mut self.timers, p, key, again);
                            return;
                        }
                        continue;
                    }
                    if wrote {
                        p.needs_tick = false;
                        // `now`, never `t`: t may be far ahead (the next RTCP report),
                        // and str0m ignores timeouts earlier than the latest it saw.
                        if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                            debug!(peer = key.as_u64(), "timeout failed: {e}");
                        }
                    } else {
                        arm_timer(&mut self.timers, p, key, t);
                        return;
                    }
                }
                Ok(Output::Timeout(t)) => {
                    drain_direct(p, &mut self.transmits);
                    arm_timer(&mut self.timers, p, key, t);
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    if let Some(d) = p.direct.as_mut() {
                        d.observe(&t);
                    } else if p.keys.is_some() {
                        p.handshake_route = direct::route_of(&t).or(p.handshake_route);
                    }
                    if stun::is_rtp(&t.contents) {
                        // Clamped: retransmissions and padding are sent but never written.
                        p.rtp_sent = (p.rtp_sent + 1).min(p.rtp_written);
                    }
                    self.transmits.push_back(t)
                }
                Ok(Output::Event(e)) => self.on_event(now, key, e),
                Err(e) => {
                    warn!(peer = key.as_u64(), "session failed: {e}");
                    p.rtc.disconnect();
                }
            }
        }
    }

    fn on_event(&mut self, now: Instant, key: Key, event: Event) {
        match event {
            Event::Connected => self.on_connected(now, key),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                if let Some(p) = self.peers.get_mut(key) {
                    info!(peer = key.as_u64(), "ICE disconnected");
                    p.rtc.disconnect();
                }
            }
            Event::MediaAdded(m) => {
                let tuning = self.tuning();
                if let Some(p) = self.peers.get_mut(key) {
                    let sends = matches!(m.direction, Direction::SendOnly | Direction::SendRecv);
                    let slot = &mut p.tracks[Room::track_index(m.kind)];
                    if p.role.is_viewer() && sends && slot.is_none() {
                        *slot = Some(TrackOut::new(m.mid, p.seq_start, tuning));
                    }
                }
            }
            Event::RtpPacket(pkt) => self.on_publisher_rtp(now, key, pkt),
            Event::KeyframeRequest(req) => self.on_viewer_keyframe_request(now, key, req),
            Event::RawPacket(raw) => {
                if let RawPacket::RtcpRx(Rtcp::Nack(nack)) = *raw {
                    self.on_viewer_nack(key, &nack);
                }
            }
            Event::ChannelOpen(id, label) => {
                if let Some(p) = self.peers.get_mut(key) {
                    debug!(peer = key.as_u64(), %label, "data channel open");
                    if p.channels.len() < 16 {
                        p.channels.push((id, label));
                    }
                }
            }
            Event::ChannelClose(id) => {
                if let Some(p) = self.peers.get_mut(key) {
                    p.channels.retain(|(c, _)| *c != id);
                }
            }
            Event::ChannelData(d) => self.on_channel_data(key, d),
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                self.on_bwe(now, key, estimate.as_u64())
            }
            Event::Closed => {
                if let Some(p) = self.peers.get_mut(key) {
                    p.rtc.disconnect();
                }
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, now: Instant, key: Key) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        p.connected = true;
        if let Some(slot) = p.keys.take() {
            let exported = slot.lock().ok().and_then(|mut s| s.take());
            let sealer = exported
                .as_ref()
                .and_then(|e| srtp_seal::SrtpSealer::new(&key_capture::provider(), e));
            match sealer {
                Some(s) => {
                    p.direct = Some(Box::new(DirectTx::new(s, p.handshake_route)));
                    // str0m resends only its own (sync) packets for this viewer: a small
                    // cache, once. A large one grows towards its cap (~110 KB per viewer)
                    // on the sequence gaps between sync packets. No resend-ratio history.
                    let Peer { rtc, tracks, .. } = &mut *p;
                    for t in tracks.iter_mut().flatten() {
                        if let Some(tx) = rtc.direct_api().stream_tx_by_mid(t.mid, None) {
                            tx.set_rtx_cache(
                                DIRECT_STR0M_RTX_PACKETS,
                                Duration::from_secs(1),
                                None,
                            );
                            // Done; str0m's-path tuning would undo it.
                            t.tuning = None;
                        }
                    }
                }
                None => {
                    self.stats.direct_unavailable += 1;
                    warn!(
                        peer = key.as_u64(),
                        profile = ?exported.map(|e| e.profile),
                        "no SRTP keys for the direct send path; this viewer uses str0m's"
                    );
                }
            }
        }
        let role = p.role;
        let rk = p.room;
        let room = self
            .rooms
            .get(rk)
            .map(|r| r.name.clone())
            .unwrap_or_default();
        info!(%room, peer = key.as_u64(), role = role.as_str(), "connected");
        self.events.push_back(SfuEvent::Connected {
            peer: key,
            room,
            role,
        });
        if role.is_viewer() {
            self.start_video(now, rk, key);
        }
    }

    /// Starts (or restarts) a viewer's video: at once from the cached GOP if
    /// there is one, else at the next keyframe, asking the publisher for one.
    fn start_video(&mut self, now: Instant, rk: Key, vk: Key) {
        let Some(r) = self.rooms.get_mut(rk) else {
            return;
        };
        let Some(v) = self.peers.get_mut(vk) else {
            return;
        };
        let Some(t) = v.tracks[VIDEO].as_mut() else {
            return;
        };
        t.needs_start = true;
        let layer = t
            .target_layer
            .min(r.tracks[VIDEO].layers.len().saturating_sub(1));
        let cached = r.tracks[VIDEO]
            .layers
            .get(layer)
            .is_some_and(|l| l.gop.is_valid());
        if cached {
            t.layer = layer;
            let cx = &mut Cx {
                stats: &mut self.stats,
                pool: &mut self.pool,
            };
            replay_gop(r, v, layer, now, cx);
            v.cache_grace_until = Some(now + self.cfg.cache_grace);
            self.stats.viewer_starts_from_cache += 1;
            self.mark_dirty(vk);
        } else if r.publisher.is_some() || r.mirror {
            self.request_keyframe(now, rk, layer);
        }
    }

    fn request_keyframe(&mut self, now: Instant, rk: Key, layer: usize) {
        let Some(r) = self.rooms.get_mut(rk) else {
            return;
        };
        if r.last_keyframe_request
            .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.keyframe_throttle)
        {
            self.stats.keyframe_requests_merged += 1;
            return;
        }
        if r.mirror {
            // The publisher is on the home core: the driver passes this on.
            r.last_keyframe_request = Some(now);
            let rid = r.tracks[VIDEO].layers.get(layer).and_then(|l| l.rid);
            self.upstream.push_back(Upstream::Keyframe {
                room: r.name.clone(),
                rid,
            });
            self.stats.keyframe_requests_to_home += 1;
            return;
        }
        let (Some(pk), Some(mid)) = (r.publisher, r.tracks[VIDEO].mid) else {
            return;
        };
        let rid = r.tracks[VIDEO].layers.get(layer).and_then(|l| l.rid);
        let Some(p) = self.peers.get_mut(pk) else {
            return;
        };
        let mut api = p.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(mid, rid) else {
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        r.last_keyframe_request = Some(now);
        self.stats.keyframe_requests_upstream += 1;
        debug!(room = %r.name, "keyframe requested from publisher");
        p.needs_tick = true;
        self.mark_dirty(pk);
    }

    fn on_viewer_keyframe_request(&mut self, now: Instant, key: Key, _req: KeyframeRequest) {
        let Some(v) = self.peers.get(key) else {
            return;
        };
        if !v.role.is_viewer() {
            return;
        }
        self.stats.keyframe_requests_from_viewers += 1;
        if v.cache_grace_until.is_some_and(|t| now < t) {
            self.stats.keyframe_requests_answered_by_cache += 1;
            return;
        }
        let rk = v.room;
        let layer = v.tracks[VIDEO].as_ref().map(|t| t.layer).unwrap_or(0);
        self.request_keyframe(now, rk, layer);
    }

    fn on_publisher_rtp(&mut self, now: Instant, key: Key, pkt: RtpPacket) {
        let Sfu {
            peers,
            rooms,
            stats,
            ..
        } = self;
        let Some(p) = peers.get_mut(key) else {
            return;
        };
        if p.role != Role::Publisher {
            return;
        }
        let Some(r) = rooms.get_mut(p.room) else {
            return;
        };
        stats.rtp_in += 1;
        let ssrc = pkt.header.ssrc;
        let (track, layer) = match p.ssrc_map.iter().find(|(s, _, _)| *s == ssrc) {
            Some((_, t, l)) => (*t, *l),
            None => {
                let mut api = p.rtc.direct_api();
                let Some(rx) = api.stream_rx(&ssrc) else {
                    stats.dropped_unknown_stream += 1;
                    return;
                };
                let (mid, rid) = (rx.mid(), rx.rid());
                let Some(kind) = p.rtc.media(mid).map(|m| m.kind()) else {
                    stats.dropped_unknown_stream += 1;
                    return;
                };
                let t = Room::track_index(kind);
                match r.tracks[t].mid {
                    Some(m) if m != mid => {
                        // A second track of the same kind: not forwarded.
                        stats.dropped_unknown_stream += 1;
                        return;
                    }
                    _ => r.tracks[t].mid = Some(mid),
                }
                let Some(l) = r.tracks[t].layer_index(rid) else {
                    stats.dropped_unknown_stream += 1;
                    return;
                };
                if p.ssrc_map.len() < 8 {
                    p.ssrc_map.push((ssrc, t, l));
                }
                (t, l)
            }
        };
        let pt = pkt.header.payload_type;
        let spec = match r.pt_specs.iter().find(|(x, _)| *x == pt) {
            Some((_, s)) => *s,
            None => {
                let Some(params) = p.rtc.codec_config().params().iter().find(|x| x.pt() == pt)
                else {
                    stats.dropped_no_codec += 1;
                    return;
                };
                let s = params.spec();
                if r.pt_specs.len() < 16 {
                    r.pt_specs.push((pt, s));
                }
                s
            }
        };
        let l = &mut r.tracks[track].layers[layer];
        l.rate.add(now, pkt.payload.len());
        let (seq, ts) = l.timeline.map(
            ssrc,
            *pkt.seq_no,
            pkt.header.timestamp,
            pkt.timestamp,
            spec.clock_rate.get(),
        );
        let ext = forwardable_ext(&pkt.header.ext_vals);
        let cp = CachedPacket {
            seq,
            ts,
            pt,
            marker: pkt.header.marker,
            plain: ext == ExtensionValues::default(),
            ext,
            payload: pkt.payload,
            arrival: pkt.timestamp,
        };
        let pushed = if track == VIDEO {
            let key_frame = codec::is_keyframe(spec.codec, &cp.payload);
            let pushed = l.gop.push(cp.clone(), key_frame);
            if pushed == Pushed::KeyframeStart {
                stats.keyframes_in += 1;
            }
            pushed
        } else {
            Pushed::Packet
        };
        if r.exported {
            let rid = r.tracks[track].layers[layer].rid;
            let fp = span::FeedPacket {
                track,
                rid,
                spec,
                epoch: r.epoch,
                simulcast: r.simulcast,
                cp: cp.clone(),
            };
            span::push_feed(&mut self.feeds, p.room, &r.name, now, fp);
            stats.feed_packets_out += 1;
        }
        let room = p.room;
        self.queue_fan_out(
            now,
            PendingRtp {
                room,
                track,
                layer,
                pushed,
                cp,
                arrived: self.arrival_hint.filter(|t| *t <= now).unwrap_or(now),
            },
        );
    }

    /// Queues a room's packet for the next viewer-major [`Sfu::fan_out`], or holds
    /// it with its room until its video frame is whole ([`gather`]).
    fn queue_fan_out(&mut self, now: Instant, pk: PendingRtp) {
        if self.fan_at.paused() {
            // A packet joining a half-sent run would miss the viewers already served.
            self.fan_out(now, usize::MAX);
        }
        let (room, layer) = (pk.room, pk.layer);
        let hold = if pk.track == VIDEO {
            held_layer(&mut self.rooms, room, layer)
        } else {
            None
        };
        match hold {
            Some(l) => {
                let (ts, marker) = (pk.cp.ts, pk.cp.marker);
                let window = self.cfg.gather;
                match l.hold.offer(now, window, ts, marker, pk, &mut self.pending) {
                    Offer::Passed => {}
                    Offer::Held(deadline) => {
                        if let Some(t) = deadline {
                            self.hold_timers.push(Reverse((t, (room, layer))));
                        }
                    }
                    Offer::Whole => self.stats.frames_gathered += 1,
                    Offer::Cut => self.stats.gather_cut += 1,
                    Offer::Full => self.stats.gather_full += 1,
                }
            }
            _ => self.pending.push(pk),
        }
        self.fan_out_if_full(now);
    }

    /// Releases the held frames whose deadline has come. Called after `enter`:
    /// no fan-out is half done, so the released packets cannot join a half-sent run.
    fn expire_holds(&mut self, now: Instant) {
        debug_assert!(!self.fan_at.paused());
        while let Some(&Reverse((t, (rk, layer)))) = self.hold_timers.peek() {
            if t > now {
                break;
            }
            self.hold_timers.pop();
            if let Some(l) = held_layer(&mut self.rooms, rk, layer) {
                if l.hold.expire(now, t, &mut self.pending) {
                    self.stats.gather_expired += 1;
                }
            }
        }
        self.fan_out_if_full(now);
    }

    /// Fans out at once when [`MAX_PENDING`] packets wait (a driver that feeds
    /// many without polling).
    fn fan_out_if_full(&mut self, now: Instant) {
        if self.pending.len() >= MAX_PENDING {
            self.fan_out(now, usize::MAX);
        }
    }

    /// Sends the publishers' packets received since the last call to every viewer
    /// of their rooms, viewer by viewer: all of a receive batch's packets for one
    /// viewer while its state is in cache, instead of each packet to every viewer in
    /// turn (at hundreds of viewers, each visit to a viewer is a round of cache
    /// misses). Stops once about `budget` datagrams are queued, to go on where it
    /// stopped at the next call ([`Sfu::poll_transmit`] sends a room's fan-out in
    /// slices that the driver sends while their buffers are still in cache; every
    /// other entry point completes it first, see [`Sfu::enter`]).
    fn fan_out(&mut self, now: Instant, budget: usize) {
        if self.pending.is_empty() {
            return;
        }
        let tuning = self.tuning();
        let Sfu {
            peers,
            rooms,
            stats,
            dirty,
            pending,
            fan_at,
            pool,
            departed,
            ..
        } = self;
        let cx = &mut Cx { stats, pool };
        let mut spent = 0usize;
        // The room's controller, held back from `dirty` until its slice ends: pushed
        // last, it is served first (the others in the reverse of the visit, which
        // keeps the viewer visited last, still in cache, first after it).
        let mut controller = None;
        // Usually one room; a batch from several publishers goes room run by room run,
        // each in arrival order.
        while fan_at.run < pending.len() {
            let start = fan_at.run;
            let Some(first) = pending.get(start) else {
                break;
            };
            let room = first.room;
            let len = pending[start..]
                .iter()
                .position(|p| p.room != room)
                .unwrap_or(pending.len() - start);
            let run = &pending[start..start + len];
            if let Some(r) = rooms.get(room) {
                while let Some(&vk) = r.viewers.get(fan_at.viewer) {
                    if spent >= budget {
                        cx.stats.fanout_slices += 1;
                        dirty.extend(controller);
                        return;
                    }
                    let i = fan_at.viewer;
                    fan_at.viewer += 1;
                    // Start loading viewers a few places ahead: each is a separate, large
                    // entry, and at hundreds of viewers every one is a cache miss in turn.
                    if let Some(p) = r
                        .viewers
                        .get(i + 2 * PREFETCH_AHEAD)
                        .and_then(|&k| peers.get(k))
                    {
                        peer::prefetch_hot(p);
                    }
                    if let Some(d) = r
                        .viewers
                        .get(i + PREFETCH_AHEAD)
                        .and_then(|&k| peers.get(k))
                        .and_then(|p| p.direct.as_deref())
                    {
                        d.prefetch();
                    }
                    let Some(v) = peers.get_mut(vk) else {
                        continue;
                    };
                    if !v.connected {
                        continue;
                    }
                    let mut queued = false;
                    for pk in run {
                        queued |= deliver(r, v, pk, tuning, now, cx);
                    }
                    spent += run.len();
                    if queued && !v.dirty {
                        v.dirty = true;
                        if r.controller == Some(vk) {
                            controller = Some(vk);
                        } else {
                            dirty.push(vk);
                        }
                    }
                }
                dirty.extend(controller.take());
            }
            *fan_at = FanCursor {
                run: start + len,
                viewer: 0,
            };
        }
        // Every viewer has them: their fan-out delay ends with the driver's next send.
        for pk in pending.iter() {
            if let Some((_, n)) = departed.last_mut().filter(|(t, _)| *t == pk.arrived) {
                *n += 1;
            } else if departed.len() < MAX_DEPARTED_RUNS {
                departed.push((pk.arrived, 1));
            }
        }
        pending.clear();
        *fan_at = FanCursor::default();
    }

    /// A direct-path viewer lost packets: resend them from the room's cache, the
    /// same sequence number and bytes (SRTP replay protection lets a packet that
    /// never arrived through), within the viewer's resend budget.
    fn on_viewer_nack(&mut self, key: Key, nack: &Nack) {
        let Sfu {
            peers,
            rooms,
            stats,
            dirty,
            pool,
            ..
        } = self;
        let Some(v) = peers.get_mut(key) else {
            return;
        };
        let (Some(d), Some(t)) = (v.direct.as_mut(), v.tracks[VIDEO].as_ref()) else {
            return;
        };
        if d.ssrc[VIDEO] != Some(*nack.ssrc) {
            return;
        }
        let Some(l) = rooms
            .get(v.room)
            .and_then(|r| r.tracks[VIDEO].layers.get(t.layer))
        else {
            return;
        };
        let pkts = l.gop.packets();
        let mut queued = false;
        for e in nack.reports.iter() {
            let lost = std::iter::once(e.pid).chain(
                (0..16u16)
                    .filter(|b| e.blp & (1 << b) != 0)
                    .map(|b| e.pid.wrapping_add(b + 1)),
            );
            for seq16 in lost {
                stats.nacked += 1;
                let Some(rec) = d.lookup(VIDEO, seq16) else {
                    stats.nack_unanswered += 1;
                    continue;
                };
                if rec.by_str0m {
                    // str0m resends its own packets (same bytes under the same index).
                    continue;
                }
                let Ok(i) = pkts.binary_search_by_key(&rec.room_seq, |p| p.seq) else {
                    stats.nack_unanswered += 1;
                    continue;
                };
                let Some(cp) = pkts.get(i) else {
                    continue;
                };
                let Some(Some(vpt)) = t.pt_map.get(cp.pt) else {
                    stats.nack_unanswered += 1;
                    continue;
                };
                if !d.take_resend_credit() {
                    stats.resends_capped += 1;
                    continue;
                }
                let out = RtpOut {
                    pt: *vpt,
                    vseq: rec.vseq,
                    ts: rec.ts,
                    marker: cp.marker,
                    payload: &cp.payload,
                };
                if d.queue(VIDEO, out, pool) {
                    stats.direct_resends += 1;
                    queued = true;
                }
            }
        }
        if queued && !v.dirty {
            v.dirty = true;
            dirty.push(key);
        }
    }

    fn on_channel_data(&mut self, key: Key, d: ChannelData) {
        let Some(p) = self.peers.get(key) else {
            return;
        };
        let Some(label) = p.channel_label(d.id).map(str::to_string) else {
            return;
        };
        let role = p.role;
        let rk = p.room;
        let Some(r) = self.rooms.get(rk) else {
            return;
        };
        let targets: Vec<Key> = match role {
            Role::Publisher => r.viewers.clone(),
            Role::Controller => r.publisher.into_iter().collect(),
            Role::Spectator => {
                self.stats.input_dropped_spectator += 1;
                debug!(peer = key.as_u64(), "spectator input dropped");
                return;
            }
        };
        if role == Role::Controller {
            self.stats.input_forwarded += 1;
        } else {
            self.stats.data_to_viewers += 1;
        }
        for t in targets {
            let Some(tp) = self.peers.get_mut(t) else {
                continue;
            };
            let Some(cid) = tp.channel_by_label(&label) else {
                continue;
            };
            if let Some(mut ch) = tp.rtc.channel(cid) {
                match ch.write(d.binary, &d.data) {
                    Ok(true) => {}
                    _ => self.stats.data_dropped += 1,
                }
            }
            self.mark_dirty(t);
        }
    }

    fn on_bwe(&mut self, now: Instant, key: Key, estimate: u64) {
        let Some(v) = self.peers.get_mut(key) else {
            return;
        };
        if !v.role.is_viewer() {
            return;
        }
        v.bwe_bps = Some(estimate);
        let rk = v.room;
        let Some(r) = self.rooms.get(rk) else {
            return;
        };
        let layers = r.tracks[VIDEO].layers.len();
        if layers == 0 {
            return;
        }
        // Best layer whose bitrate fits the estimate; layers ordered by bitrate.
        let mut order: Vec<(u64, usize)> = (0..layers).map(|i| (r.video_layer_bps(i), i)).collect();
        order.sort_unstable();
        let fitting = order
            .iter()
            .rev()
            .find(|(bps, _)| (*bps as f64) <= estimate as f64 * 0.95)
            .map(|(_, i)| *i);
        let lowest_bps = order.first().map(|(b, _)| *b).unwrap_or(0);
        let Some(t) = v.tracks[VIDEO].as_mut() else {
            return;
        };
        let mut switch_to = None;
        let mut resume = false;
        // Pause only after the estimate stayed clearly below the stream for a while:
        // estimates dip briefly during normal operation.
        let too_low = lowest_bps > 0 && (estimate as f64) < lowest_bps as f64 * 0.85;
        if !too_low {
            v.bwe_low_since = None;
        } else if v.bwe_low_since.is_none() {
            v.bwe_low_since = Some(now);
        }
        let sustained = v
            .bwe_low_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.bwe_pause_after);
        match fitting {
            None if too_low && sustained && !v.video_paused => {
                info!(
                    peer = key.as_u64(),
                    estimate,
                    stream_bps = lowest_bps,
                    "video paused: bandwidth estimate below stream bitrate"
                );
                v.video_paused = true;
                self.stats.video_pauses += 1;
            }
            Some(i) => {
                if layers > 1 && i != t.target_layer {
                    t.target_layer = i;
                    switch_to = Some(i);
                }
                resume = v.video_paused && estimate as f64 >= lowest_bps as f64 * 1.05;
                if resume {
                    info!(peer = key.as_u64(), estimate, "video resumed");
                    v.video_paused = false;
                    self.stats.video_resumes += 1;
                }
            }
            None => {}
        }
        if let Some(i) = switch_to {
            self.request_keyframe(now, rk, i);
        }
        // Let the estimator probe toward what the stream needs: padding up to
        // the lowest layer while paused (so it can find room to resume), and
        // discovery up to the best layer otherwise.
        let highest_bps = order.last().map(|(b, _)| *b).unwrap_or(0);
        if let Some(v) = self.peers.get_mut(key) {
            let (min, desired) = if v.video_paused {
                (lowest_bps, lowest_bps * 2)
            } else {
                (0, highest_bps + highest_bps / 4)
            };
            if desired > 0 && v.bwe_desired.abs_diff(desired) > desired / 10 {
                v.bwe_desired = desired;
                v.rtc
                    .bwe()
                    .set_bitrate(Bitrate::bps(min), Bitrate::bps(desired));
                v.needs_tick = true;
                self.mark_dirty(key);
            }
        }
        if resume {
            self.start_video(now, rk, key);
        }
    }

    fn drop_peer(&mut self, key: Key) {
        let Some(mut p) = self.peers.remove(key) else {
            return;
        };
        p.rtc.disconnect();
        self.by_ufrag.remove(&p.ufrag);
        for a in &p.addrs {
            // (Unless a newer session has taken the address over.)
            if self.by_addr.get(a) == Some(&key) {
                self.by_addr.remove(a);
            }
        }
        let Some(r) = self.rooms.get_mut(p.room) else {
            return;
        };
        let room = r.name.clone();
        if r.publisher == Some(key) {
            r.publisher_gone();
            info!(%room, peer = key.as_u64(), "publisher left; viewers stay");
        } else {
            r.viewers.retain(|v| *v != key);
            if r.controller == Some(key) {
                r.controller = None;
            }
            info!(%room, peer = key.as_u64(), viewers = r.viewers.len(), "viewer left");
        }
        self.events.push_back(SfuEvent::Disconnected {
            peer: key,
            room: room.clone(),
            role: p.role,
        });
        self.close_if_empty(&room);
    }

    /// Closes `room` if nothing keeps it alive ([`room::Room::is_empty`]): after its
    /// last peer left, or a mirror opened for a viewer whose offer was refused.
    pub fn close_if_empty(&mut self, room: &str) {
        let Some(&rk) = self.room_by_name.get(room) else {
            return;
        };
        if self.rooms.get(rk).is_some_and(|r| r.is_empty()) {
            self.rooms.remove(rk);
            self.room_by_name.remove(room);
            self.feeds.retain(|(k, _)| *k != rk);
            self.events.push_back(SfuEvent::RoomClosed {
                room: room.to_string(),
            });
        }
    }
}

/// A new stream in a room (a new publisher, or a mirror's home saying so): each
/// viewer's tracks wait for its first keyframe.
fn restart_viewers(peers: &mut Slab<Peer>, viewers: &[Key]) {
    for &v in viewers {
        if let Some(p) = peers.get_mut(v) {
            for t in p.tracks.iter_mut().flatten() {
                t.needs_start = true;
            }
        }
    }
}

/// Media sections of our own SDP in which we send: (mid, kind), first of each kind.
fn sending_tracks(sdp: &str, seq_start: u64, tuning: TxTuning) -> [Option<TrackOut>; 2] {
    let mut out: [Option<TrackOut>; 2] = [None, None];
    let mut flush = |kind: Option<MediaKind>, mid: Option<&str>, sends: bool| {
        if let (Some(kind), Some(mid), true) = (kind, mid, sends) {
            let slot = &mut out[Room::track_index(kind)];
            if slot.is_none() {
                *slot = Some(TrackOut::new(Mid::from(mid), seq_start, tuning));
            }
        }
    };
    let (mut kind, mut mid, mut sends) = (None, None, false);
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            flush(kind, mid, sends);
            kind = if m.starts_with("video") {
                Some(MediaKind::Video)
            } else if m.starts_with("audio") {
                Some(MediaKind::Audio)
            } else {
                None
            };
            mid = None;
            sends = false;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m);
        } else if line == "a=sendonly" || line == "a=sendrecv" {
            sends = true;
        }
    }
    flush(kind, mid, sends);
    out
}

/// An offer with one media section and no BUNDLE group is legal (and what
/// GStreamer's WHIP client sends for video only); str0m wants a group, and a
/// group of one section changes nothing on the wire. Returns the patched offer.
fn bundle_single_section(offer: &str) -> Option<String> {
    if offer.contains("a=group:BUNDLE") {
        return None;
    }
    let sections = offer.lines().filter(|l| l.starts_with("m=")).count();
    if sections != 1 {
        return None;
    }
    let mid = offer
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=mid:"))?
        .trim()
        .to_string();
    let mut out = String::with_capacity(offer.len() + 32);
    let mut done = false;
    for line in offer.split_inclusive('\n') {
        if !done && line.starts_with("m=") {
            out.push_str(&format!("a=group:BUNDLE {mid}\r\n"));
            done = true;
        }
        out.push_str(line);
    }
    Some(out)
}

/// True if any media section of the answer has one of `dirs` (our side's direction).
fn answer_has_direction(answer: &SdpAnswer, dirs: &[Direction]) -> bool {
    let sdp = answer.to_sdp_string();
    sdp.lines().any(|l| {
        let l = l.trim();
        dirs.iter().any(|d| l == format!("a={d}"))
    })
}

/// Header extension values worth passing from publisher to viewers; the
/// transport-level ones (mid, rid, transport-cc) are the viewer session's own.
fn forwardable_ext(e: &ExtensionValues) -> ExtensionValues {
    ExtensionValues {
        audio_level: e.audio_level,
        voice_activity: e.voice_activity,
        video_orientation: e.video_orientation,
        video_content_type: e.video_content_type,
        abs_capture_time: e.abs_capture_time,
        play_delay_min: e.play_delay_min,
        play_delay_max: e.play_delay_max,
        ..Default::default()
    }
}

/// Applies the send-stream settings of str0m's path to a viewer track.
fn tune_tx(tx: &mut StreamTx, tuning: TxTuning, track: usize) {
    // The RTX ratio cap (resends stop above 15 % of the bytes sent) keeps a lossy
    // viewer from being buried in retransmissions. str0m 0.25 keeps a per-packet
    // byte history for it that is only trimmed when a NACK arrives, so on a clean
    // link it grows ~24 bytes per packet (5 KB/s per viewer at 2 Mbit/s); setting
    // the cache with no cap first drops that history. The SFU re-applies this at
    // every keyframe it forwards, where older packets stop mattering to the decoder.
    tx.set_rtx_cache(tuning.rtx_packets, tuning.rtx_age, None);
    tx.set_rtx_cache(tuning.rtx_packets, tuning.rtx_age, Some(RTX_RATIO_CAP));
    if track == VIDEO {
        tx.set_unpaced(!tuning.paced);
    }
}

/// The earliest entry of a lazily cleaned timer heap that `live` still owns
/// (an entry goes stale when its owner re-arms, leaves or is done), dropping the
/// stale ones on the way.
fn first_live<K: Copy + Ord>(
    heap: &mut BinaryHeap<Reverse<(Instant, K)>>,
    live: impl Fn(Instant, K) -> bool,
) -> Option<Instant> {
    while let Some(&Reverse((t, k))) = heap.peek() {
        if live(t, k) {
            return Some(t);
        }
        heap.pop();
    }
    None
}

/// A room's video layer, where its held packets are ([`gather`]).
fn held_layer(rooms: &mut Slab<Room>, room: Key, layer: usize) -> Option<&mut room::Layer> {
    rooms
        .get_mut(room)
        .and_then(|r| r.tracks[VIDEO].layers.get_mut(layer))
}

/// One publisher packet waiting for [`Sfu::fan_out`] (or held by its room until
/// its frame is whole, [`gather`]).
#[derive(Debug)]
pub(crate) struct PendingRtp {
    room: Key,
    track: usize,
    layer: usize,
    /// What the packet did to the room's GOP cache when it arrived.
    pushed: Pushed,
    cp: CachedPacket,
    /// When it reached this core (the kernel's stamp when the driver gave one,
    /// [`Sfu::arrived_at`]): its fan-out delay counts from here.
    arrived: Instant,
}

/// Where a paused fan-out goes on: the first pending packet of the room run being
/// sent, and that room's next viewer.
#[derive(Debug, Default, Clone, Copy)]
struct FanCursor {
    run: usize,
    viewer: usize,
}

impl FanCursor {
    /// A fan-out has begun and not finished.
    fn paused(&self) -> bool {
        self.run > 0 || self.viewer > 0
    }
}

/// Datagrams one slice of a fan-out queues when the driver asks for transmits:
/// about one send round of the driver's (sealed buffers still in cache when the
/// kernel copies them, and a few hundred in flight instead of a whole batch for
/// every viewer).
const FAN_OUT_CHUNK: usize = 256;

/// Sent buffers kept for reuse: two of the driver's send rounds (a fan-out slice
/// is one), so a slice finds the previous one's buffers waiting.
const RECYCLED_BUFFERS: usize = 2 * FAN_OUT_CHUNK;

/// Publisher packets held for one viewer-major fan-out at most (a receive batch
/// is smaller; the cap bounds a driver that feeds many without polling).
const MAX_PENDING: usize = 128;

/// Most (arrival, count) runs kept for the driver between two
/// [`Sfu::take_departed`] calls; a driver that never takes them loses the rest.
const MAX_DEPARTED_RUNS: usize = 1024;

/// Hands one publisher packet to one connected viewer: forwarded, fed through the
/// viewer's cached-GOP replay, or held back until a keyframe starts its video.
/// Returns true if something was queued for sending.
fn deliver(
    r: &Room,
    v: &mut Peer,
    pk: &PendingRtp,
    tuning: TxTuning,
    now: Instant,
    cx: &mut Cx<'_>,
) -> bool {
    let PendingRtp {
        track,
        layer,
        pushed,
        ref cp,
        ..
    } = *pk;
    let Some(t) = v.tracks[track].as_mut() else {
        return false;
    };
    if track == VIDEO && v.video_paused {
        cx.stats.dropped_paused += 1;
        false
    } else if track == VIDEO && t.replay.is_some() {
        // The packet is in the cache the viewer is still reading.
        pump_replay(r, v, now, cx)
    } else if track == VIDEO && (t.layer != layer || t.needs_start) {
        // Start (or switch layers) only where a keyframe begins.
        if t.target_layer == layer && pushed == Pushed::KeyframeStart {
            replay_gop(r, v, layer, now, cx)
        } else {
            false
        }
    } else {
        if pushed == Pushed::KeyframeStart && v.direct.is_none() {
            // Nothing before a keyframe is worth resending: start the NACK
            // cache (and str0m's resend-ratio history) afresh.
            t.tuning = Some(tuning);
        }
        forward(v, track, cp, cp.ts, cp.arrival, r, cx)
    }
}

/// How many viewers ahead the fan-out loop starts loading a viewer's state (twice
/// that for the viewer's entry itself, so its pointer to the direct-path state is
/// in cache when that is prefetched).
const PREFETCH_AHEAD: usize = 4;

/// Writes one packet to a viewer's track with timestamp `ts`.
/// Returns true if something was queued for sending.
fn forward(
    v: &mut Peer,
    track: usize,
    cp: &CachedPacket,
    ts: u32,
    wallclock: Instant,
    room: &Room,
    cx: &mut Cx<'_>,
) -> bool {
    let Peer {
        rtc,
        tracks,
        direct,
        ..
    } = v;
    let Some(t) = tracks[track].as_mut() else {
        return false;
    };
    if t.pt_epoch != room.epoch {
        t.pt_map.clear();
        t.pt_epoch = room.epoch;
    }
    let vpt = match t.pt_map.get(cp.pt) {
        Some(vpt) => vpt,
        None => {
            let spec = room
                .pt_specs
                .iter()
                .find(|(p, _)| *p == cp.pt)
                .map(|(_, s)| *s);
            let vpt = match (spec, rtc.media(t.mid)) {
                (Some(spec), Some(m)) => {
                    let pts = m.remote_pts();
                    codec::match_pt(
                        &spec,
                        rtc.codec_config()
                            .params()
                            .iter()
                            .filter(|p| pts.contains(&p.pt())),
                    )
                }
                _ => None,
            };
            if vpt.is_none() {
                warn!(
                    pt = *cp.pt,
                    "viewer did not negotiate the publisher's codec; not forwarding"
                );
            }
            t.pt_map.insert(cp.pt, vpt);
            vpt
        }
    };
    let Some(vpt) = vpt else {
        cx.stats.dropped_no_codec += 1;
        return false;
    };
    let seq = t.out_seq(cp.seq);
    if let Some(d) = direct.as_mut() {
        if d.was_sent(track, seq) {
            // A duplicate from the publisher: the viewer has it (or will NACK it).
            // Never a second packet under one SRTP index (see `direct`).
            cx.stats.dropped_duplicate += 1;
            return false;
        }
        if d.ssrc[track].is_none() {
            d.ssrc[track] = rtc
                .direct_api()
                .stream_tx_by_mid(t.mid, None)
                .map(|tx| *tx.ssrc());
        }
        if cp.plain && !d.sync_due(track, wallclock) {
            let out = RtpOut {
                pt: *vpt,
                vseq: seq,
                ts,
                marker: cp.marker,
                payload: &cp.payload,
            };
            if d.send(track, out, cp.seq, cx.pool) {
                cx.stats.rtp_out += 1;
                cx.stats.direct_out += 1;
                v.rtp_written += 1;
                return true;
            }
            // No route or no SSRC yet, or the seal failed: str0m sends this one.
            cx.stats.direct_fallbacks += 1;
        }
    }
    let mut api = rtc.direct_api();
    let Some(tx) = api.stream_tx_by_mid(t.mid, None) else {
        cx.stats.dropped_unknown_stream += 1;
        return false;
    };
    if let Some(tuning) = t.tuning.take() {
        tune_tx(tx, tuning, track);
    }
    if let Some(d) = direct.as_mut() {
        d.record(
            track,
            SentRecord {
                vseq: seq,
                room_seq: cp.seq,
                ts,
                by_str0m: true,
            },
        );
        cx.stats.direct_sync += 1;
    }
    tx.write_rtp(
        RtpWrite::new(vpt, seq.into(), ts, wallclock, cp.payload.clone())
            .marker(cp.marker)
            .ext_vals(cp.ext.clone())
            .nackable(track == VIDEO),
    );
    cx.stats.rtp_out += 1;
    v.rtp_written += 1;
    v.needs_tick = true;
    true
}

/// Starts feeding a viewer the cached GOP of `layer` (a slice now, the rest as its
/// queue drains: [`pump_replay`]). Timestamps of the cached frames are squeezed just
/// below the newest one, so the viewer decodes them straight away and is live at the
/// end instead of a GOP behind. Returns true if something was written.
fn replay_gop(r: &Room, v: &mut Peer, layer: usize, now: Instant, cx: &mut Cx<'_>) -> bool {
    let Some(l) = r.tracks[VIDEO].layers.get(layer) else {
        return false;
    };
    let pkts = l.gop.packets();
    let (Some(first), Some(last)) = (pkts.first(), pkts.last()) else {
        return false;
    };
    let Some(t) = v.tracks[VIDEO].as_mut() else {
        return false;
    };
    t.rebase(first.seq);
    t.needs_start = false;
    t.layer = layer;
    t.replay = Some(Replay {
        generation: l.gop.generation(),
        next: 0,
        squeeze_end: pkts.len(),
        frames: l.gop.frames().max(1),
        last_ts: last.ts,
        frame: 0,
        cur_ts: first.ts,
        progress_at: now,
    });
    pump_replay(r, v, now, cx)
}

/// Moves a direct-path viewer's sealed datagrams to the SFU's transmit queue.
fn drain_direct(p: &mut Peer, transmits: &mut VecDeque<Transmit>) {
    if let Some(d) = p.direct.as_mut() {
        let n = d.out.len() as u64;
        transmits.extend(d.out.drain(..));
        p.rtp_sent = (p.rtp_sent + n).min(p.rtp_written);
    }
}

/// Puts `key`'s next str0m timeout on the timer heap (once per distinct deadline).
fn arm_timer(timers: &mut BinaryHeap<Reverse<(Instant, Key)>>, p: &mut Peer, key: Key, t: Instant) {
    if p.next_timeout != Some(t) {
        p.next_timeout = Some(t);
        timers.push(Reverse((t, key)));
    }
}

/// Writes the next slice of a replaying viewer's cached GOP, as far as its send
/// queue has room. Returns true if something was written.
fn pump_replay(r: &Room, v: &mut Peer, now: Instant, cx: &mut Cx<'_>) -> bool {
    let Some(t) = v.tracks[VIDEO].as_mut() else {
        return false;
    };
    let Some(mut rp) = t.replay else {
        return false;
    };
    let layer = t.layer;
    let Some(l) = r.tracks[VIDEO].layers.get(layer) else {
        t.replay = None;
        return false;
    };
    if v.video_paused {
        t.replay = None;
        t.needs_start = true;
        return false;
    }
    if rp.generation != l.gop.generation() {
        // A new keyframe (or a reset) moved the cache under the cursor.
        if l.gop.is_valid() {
            return replay_gop(r, v, layer, now, cx);
        }
        t.replay = None;
        t.needs_start = true;
        return false;
    }
    let pkts = l.gop.packets();
    if now.saturating_duration_since(rp.progress_at) > REPLAY_STALL {
        // Nothing left the queue for a while by our count (str0m dropped
        // something, or the count drifted): trust the queue to be drained.
        v.rtp_sent = v.rtp_written;
    }
    let mut wrote = false;
    while let Some(p) = pkts.get(rp.next) {
        if v.rtp_written.saturating_sub(v.rtp_sent) >= REPLAY_IN_FLIGHT {
            break;
        }
        if let Some(d) = v.direct.as_mut() {
            // No pacer on this path: the replay keeps its own rate.
            if !d.take_replay(now, p.payload.len()) {
                break;
            }
        }
        let (ts, wallclock) = if rp.next < rp.squeeze_end {
            if p.ts != rp.cur_ts {
                rp.cur_ts = p.ts;
                rp.frame += 1;
            }
            let back = (rp.frames - 1).saturating_sub(rp.frame);
            (rp.last_ts.wrapping_sub(back), now)
        } else {
            (p.ts, p.arrival)
        };
        rp.next += 1;
        if forward(v, VIDEO, p, ts, wallclock, r, cx) {
            cx.stats.packets_replayed += 1;
            rp.progress_at = now;
            wrote = true;
        }
    }
    if let Some(t) = v.tracks[VIDEO].as_mut() {
        t.replay = (rp.next < pkts.len()).then_some(rp);
    }
    if wrote {
        cx.stats.replay_slices += 1;
    }
    wrote
}
