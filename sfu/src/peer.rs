//! A peer: one str0m `Rtc` (publisher or viewer) and what the SFU tracks about it.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::change::SdpPendingOffer;
use str0m::channel::ChannelId;
use str0m::media::{Mid, Pt};
use str0m::rtp::Ssrc;
use str0m::Rtc;

use crate::slab::Key;

/// What a peer is to its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The instance that publishes the stream.
    Publisher,
    /// The one viewer whose input reaches the instance.
    Controller,
    /// A viewer who only watches; its input is dropped.
    Spectator,
}

impl Role {
    /// Lower-case name for headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Controller => "controller",
            Role::Spectator => "spectator",
        }
    }

    /// True for controllers and spectators.
    pub fn is_viewer(self) -> bool {
        self != Role::Publisher
    }
}

/// Send-stream settings applied on the first packet (str0m creates the stream
/// during negotiation, so they cannot be set earlier).
#[derive(Debug, Clone, Copy)]
pub struct TxTuning {
    /// NACK cache size, packets.
    pub rtx_packets: usize,
    /// NACK cache age.
    pub rtx_age: std::time::Duration,
    /// Video goes through str0m's pacer.
    pub paced: bool,
}

/// A viewer's outgoing track: where the room's packets go and how they are renumbered.
#[derive(Debug)]
pub struct TrackOut {
    /// The viewer's mid for this track.
    pub mid: Mid,
    /// Layer of the room track this viewer receives.
    pub layer: usize,
    /// Layer the viewer should move to at the next keyframe of that layer.
    pub target_layer: usize,
    /// Waiting for a keyframe (or the cache) before forwarding.
    pub needs_start: bool,
    /// Added to room sequence numbers; re-based on every (re)start.
    pub seq_offset: u64,
    /// Next sequence number to send, for re-basing.
    pub next_seq: u64,
    /// Publisher payload type -> viewer payload type, valid for `pt_epoch`.
    pub pt_map: PtMap,
    /// Room epoch the map was built for.
    pub pt_epoch: u32,
    /// Settings still to apply to the send stream.
    pub tuning: Option<TxTuning>,
    /// Cached GOP still being fed to the viewer (video only).
    pub replay: Option<Replay>,
}

/// Publisher payload type -> viewer payload type (`None`: the viewer has no
/// match), held inline: it is read per packet per viewer, and a heap pointer to
/// chase there is a cache miss per viewer at hundreds of viewers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PtMap {
    len: u8,
    entries: [(u8, Option<u8>); PtMap::CAPACITY],
}

impl PtMap {
    /// Payload types remembered (a publisher uses one or two per track).
    pub const CAPACITY: usize = 8;

    /// The viewer payload type for `pt`: `None` if unknown, `Some(None)` if
    /// known to have no match.
    pub fn get(&self, pt: Pt) -> Option<Option<Pt>> {
        self.entries
            .get(..self.len as usize)?
            .iter()
            .find(|(p, _)| *p == *pt)
            .map(|(_, v)| v.map(Pt::from))
    }

    /// Remembers `pt -> vpt`; false (nothing kept) when full.
    pub fn insert(&mut self, pt: Pt, vpt: Option<Pt>) -> bool {
        let Some(slot) = self.entries.get_mut(self.len as usize) else {
            return false;
        };
        *slot = (*pt, vpt.map(|v| *v));
        self.len += 1;
        true
    }

    /// Forgets every mapping (the publisher's codecs changed).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// A viewer's cursor through the room's cached GOP.
///
/// The cache is fed to str0m a slice at a time, as the pacer drains it, rather
/// than all at once: the viewer's send queue (and the memory it keeps) stays
/// small however long the GOP is, and the packets leave at the same pace.
/// Packets that were cached when the replay began get timestamps squeezed
/// towards the live edge (one tick per frame); later ones keep theirs.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    /// [`crate::GopCache::generation`] the cursor belongs to.
    pub generation: u64,
    /// Next index into the cached packets.
    pub next: usize,
    /// Packets cached when the replay began (the squeezed part).
    pub squeeze_end: usize,
    /// Frames cached when the replay began.
    pub frames: u32,
    /// Timestamp of the last cached packet when the replay began.
    pub last_ts: u32,
    /// Frame index of the packet at `next - 1` within the squeezed part.
    pub frame: u32,
    /// Original timestamp of that frame.
    pub cur_ts: u32,
    /// When the replay last wrote a packet.
    pub progress_at: Instant,
}

impl TrackOut {
    /// A track that starts at a keyframe; `seq_start` keeps ROC at zero.
    pub fn new(mid: Mid, seq_start: u64, tuning: TxTuning) -> Self {
        TrackOut {
            mid,
            layer: 0,
            target_layer: 0,
            needs_start: true,
            seq_offset: 0,
            next_seq: seq_start,
            pt_map: PtMap::default(),
            pt_epoch: u32::MAX,
            tuning: Some(tuning),
            replay: None,
        }
    }

    /// Re-bases numbering so that room sequence `first_room_seq` follows the
    /// last packet sent, without a gap the viewer would NACK.
    pub fn rebase(&mut self, first_room_seq: u64) {
        self.seq_offset = self.next_seq.wrapping_sub(first_room_seq);
    }

    /// Viewer sequence number for a room sequence number; advances `next_seq`.
    pub fn out_seq(&mut self, room_seq: u64) -> u64 {
        let s = room_seq.wrapping_add(self.seq_offset);
        if s >= self.next_seq {
            self.next_seq = s + 1;
        }
        s
    }
}

/// Everything the SFU knows about one peer.
pub struct Peer {
    /// The WebRTC session.
    pub rtc: Rtc,
    /// The room the peer belongs to.
    pub room: Key,
    /// Publisher, controller or spectator.
    pub role: Role,
    /// Local ICE ufrag, for demultiplexing STUN.
    pub ufrag: String,
    /// (remote, local) address pairs routed to this peer.
    pub addrs: Vec<(SocketAddr, SocketAddr)>,
    /// The timeout str0m asked for last.
    pub next_timeout: Option<Instant>,
    /// ICE + DTLS done.
    pub connected: bool,
    /// Queued in the dirty list.
    pub dirty: bool,
    /// Needs an `Input::Timeout` before polling (media was written).
    pub needs_tick: bool,
    /// Open data channels and their labels.
    pub channels: Vec<(ChannelId, String)>,
    /// Waiting for the remote answer to our offer.
    pub pending_offer: Option<SdpPendingOffer>,
    /// Viewer tracks by room track index (video, audio).
    pub tracks: [Option<TrackOut>; 2],
    /// Viewer keyframe requests are answered by the cache until then.
    pub cache_grace_until: Option<Instant>,
    /// Video paused because the bandwidth estimate is below the stream bitrate.
    pub video_paused: bool,
    /// Latest egress bandwidth estimate (bits per second).
    pub bwe_bps: Option<u64>,
    /// Desired bitrate last given to the estimator (bits per second).
    pub bwe_desired: u64,
    /// Since when the estimate has been below the stream bitrate.
    pub bwe_low_since: Option<Instant>,
    /// Publisher: SSRC -> (track, layer) resolved so far.
    pub ssrc_map: Vec<(Ssrc, usize, usize)>,
    /// First sequence number of the viewer's tracks.
    pub seq_start: u64,
    /// RTP packets written to str0m, for the replay's in-flight estimate.
    pub rtp_written: u64,
    /// RTP datagrams str0m has emitted for this peer (never above `rtp_written`),
    /// for the same estimate.
    pub rtp_sent: u64,
    /// Where the session's SRTP keys land (direct send path, until connected).
    pub keys: Option<crate::key_capture::KeySlot>,
    /// The ICE pair str0m last sent DTLS on (direct send path, until connected).
    pub handshake_route: Option<(SocketAddr, SocketAddr)>,
    /// The direct send path, once the keys are known.
    pub direct: Option<Box<crate::direct::DirectTx>>,
}

impl Peer {
    /// Channel id for a label, if that channel is open.
    pub fn channel_by_label(&self, label: &str) -> Option<ChannelId> {
        self.channels
            .iter()
            .find(|(_, l)| l == label)
            .map(|(id, _)| *id)
    }

    /// Label of an open channel.
    pub fn channel_label(&self, id: ChannelId) -> Option<&str> {
        self.channels
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, l)| l.as_str())
    }
}

/// Hints the CPU to load the fields of `p` the fan-out reads per packet.
pub fn prefetch_hot(p: &Peer) {
    prefetch(&p.connected);
    prefetch(&p.tracks);
    prefetch(&p.direct);
}

/// Starts loading the cache line at `v` (no effect on results; never faults).
#[inline(always)]
pub fn prefetch<T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch hint reads nothing architecturally and cannot fault; the
    // pointer comes from a live reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch(v as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pt_map_remembers_matches_and_misses_up_to_capacity() {
        let mut m = PtMap::default();
        assert_eq!(m.get(Pt::from(96)), None);
        assert!(m.insert(Pt::from(96), Some(Pt::from(102))));
        assert!(m.insert(Pt::from(97), None));
        assert_eq!(m.get(Pt::from(96)), Some(Some(Pt::from(102))));
        assert_eq!(m.get(Pt::from(97)), Some(None));
        for pt in 0..PtMap::CAPACITY as u8 - 2 {
            assert!(m.insert(Pt::from(pt), None));
        }
        assert!(!m.insert(Pt::from(120), None), "full");
        assert_eq!(m.get(Pt::from(120)), None);
        m.clear();
        assert_eq!(m.get(Pt::from(96)), None);
    }
}
