//! The direct send path: forwarded RTP sealed and queued by the SFU itself.
//!
//! Through str0m, each forwarded packet per viewer goes into a send queue, waits
//! for the pacer's per-packet timeout, gets a transport-wide sequence number and a
//! copy in the resend history, and is sealed into a fresh buffer. Here it is a
//! 12-byte header (the viewer's SSRC, payload type, sequence number and timestamp)
//! and one seal with the session's own keys ([`crate::srtp_seal`]), queued at once.
//!
//! str0m keeps the session: ICE, DTLS, SCTP, the RTCP it receives (keyframe
//! requests) and the sender reports it sends. So that those reports map RTP time to
//! wall-clock time correctly, one packet per track per [`SYNC_INTERVAL`] (and the
//! first) still goes through str0m, as do packets that carry header extension
//! values. Resends come from the room's GOP cache by way of a small ring that
//! remembers which room packet each viewer sequence number was.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::net::{DatagramSend, Protocol, Transmit};

use crate::srtp_seal::SrtpSealer;

/// At least this often a track's packet goes through str0m, so its sender
/// reports carry a current RTP/NTP mapping.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Viewer sequence numbers remembered for answering NACKs (video).
const SENT_RING: usize = 512;
/// Replay (cached GOP) rate towards one viewer, bytes per second.
const REPLAY_BYTES_PER_SEC: u64 = 3_000_000;
/// Replay burst allowance, bytes.
const REPLAY_BURST: u64 = 64 * 1024;
/// Resend credit earned per packet sent (tenths of a packet: 15 % of packets).
const RESEND_CREDIT_PER_PACKET: u32 = 15;
/// Resend credit spent per packet resent.
const RESEND_COST: u32 = 100;
/// Resend credit cap (a burst of this many / 100 packets).
const RESEND_CREDIT_MAX: u32 = 64 * RESEND_COST;

/// What a viewer sequence number was sent as.
#[derive(Debug, Clone, Copy)]
pub struct SentRecord {
    /// Extended viewer sequence number (SRTP index).
    pub vseq: u64,
    /// Room sequence number of the packet.
    pub room_seq: u64,
    /// RTP timestamp it was sent with (replays squeeze them).
    pub ts: u32,
}

/// Per-viewer state of the direct send path.
#[derive(Debug)]
pub struct DirectTx {
    sealer: SrtpSealer,
    /// (source, destination) of str0m's latest non-STUN datagram: the ICE pair in use.
    route: Option<(SocketAddr, SocketAddr)>,
    /// Sealed datagrams waiting for the driver.
    pub out: VecDeque<Transmit>,
    /// SSRC of each track (video, audio), resolved on first use.
    pub ssrc: [Option<u32>; 2],
    /// When each track next sends one packet through str0m.
    sync_at: [Option<Instant>; 2],
    sent: Box<[Option<SentRecord>]>,
    resend_credit: u32,
    replay_tokens: u64,
    replay_refill_at: Option<Instant>,
}

impl DirectTx {
    /// Direct sending for a session whose keys are `sealer`, on the ICE pair of
    /// str0m's latest non-STUN datagram (`route`, the DTLS handshake's).
    pub fn new(sealer: SrtpSealer, route: Option<(SocketAddr, SocketAddr)>) -> Self {
        DirectTx {
            sealer,
            route,
            out: VecDeque::new(),
            ssrc: [None, None],
            sync_at: [None, None],
            sent: vec![None; SENT_RING].into_boxed_slice(),
            resend_credit: RESEND_CREDIT_MAX / 2,
            replay_tokens: REPLAY_BURST,
            replay_refill_at: None,
        }
    }

    /// Follows str0m's choice of ICE pair (called with each datagram str0m emits).
    pub fn observe(&mut self, t: &Transmit) {
        if let Some(r) = route_of(t) {
            self.route = Some(r);
        }
    }

    /// True when this track's next packet should go through str0m instead.
    pub fn sync_due(&mut self, track: usize, now: Instant) -> bool {
        let Some(slot) = self.sync_at.get_mut(track) else {
            return true;
        };
        if slot.is_none_or(|t| now >= t) {
            *slot = Some(now + SYNC_INTERVAL);
            return true;
        }
        self.route.is_none()
    }

    /// Builds, seals and queues one new RTP packet (and remembers video ones for
    /// NACKs). False if there is no route yet or the seal failed (the caller counts it).
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        track: usize,
        pt: u8,
        vseq: u64,
        ts: u32,
        marker: bool,
        payload: &[u8],
        room_seq: u64,
    ) -> bool {
        if !self.queue(track, pt, vseq, ts, marker, payload) {
            return false;
        }
        if track == 0 {
            self.record(SentRecord { vseq, room_seq, ts });
            self.resend_credit =
                (self.resend_credit + RESEND_CREDIT_PER_PACKET).min(RESEND_CREDIT_MAX);
        }
        true
    }

    /// Builds, seals and queues one RTP packet: new, or a resend (same sequence
    /// number, same bytes on the wire).
    pub fn queue(
        &mut self,
        track: usize,
        pt: u8,
        vseq: u64,
        ts: u32,
        marker: bool,
        payload: &[u8],
    ) -> bool {
        let (Some((source, destination)), Some(Some(ssrc))) = (self.route, self.ssrc.get(track))
        else {
            return false;
        };
        let ssrc = *ssrc;
        let mut buf = Vec::with_capacity(12 + payload.len() + self.sealer.overhead());
        buf.extend_from_slice(&[0x80, (u8::from(marker) << 7) | (pt & 0x7f)]);
        buf.extend_from_slice(&(vseq as u16).to_be_bytes());
        buf.extend_from_slice(&ts.to_be_bytes());
        buf.extend_from_slice(&ssrc.to_be_bytes());
        if !self.sealer.seal(&mut buf, payload, ssrc, vseq) {
            return false;
        }
        self.out.push_back(Transmit {
            proto: Protocol::Udp,
            source,
            destination,
            contents: DatagramSend::from(buf),
        });
        true
    }

    /// Remembers a video packet sent through str0m too, so a NACK for it finds it.
    pub fn record(&mut self, r: SentRecord) {
        let i = (r.vseq % SENT_RING as u64) as usize;
        if let Some(s) = self.sent.get_mut(i) {
            *s = Some(r);
        }
    }

    /// What the viewer's video packet with 16-bit sequence `seq16` was, if still known.
    pub fn lookup(&self, seq16: u16) -> Option<SentRecord> {
        // SENT_RING divides 2^16, so the slot follows from the low 16 bits alone.
        let r = (*self.sent.get(seq16 as usize % SENT_RING)?)?;
        (r.vseq as u16 == seq16).then_some(r)
    }

    /// Takes one resend from the budget (resends stay under ~15 % of packets).
    pub fn take_resend_credit(&mut self) -> bool {
        if self.resend_credit >= RESEND_COST {
            self.resend_credit -= RESEND_COST;
            true
        } else {
            false
        }
    }

    /// Takes `bytes` of replay allowance; false (and nothing taken) when the
    /// replay has to wait for the bucket to refill.
    pub fn take_replay(&mut self, now: Instant, bytes: usize) -> bool {
        let last = self.replay_refill_at.unwrap_or(now);
        let earned = now.saturating_duration_since(last).as_micros() as u64 * REPLAY_BYTES_PER_SEC
            / 1_000_000;
        if earned > 0 || self.replay_refill_at.is_none() {
            self.replay_tokens = (self.replay_tokens + earned).min(REPLAY_BURST);
            self.replay_refill_at = Some(now);
        }
        let bytes = bytes as u64;
        if self.replay_tokens >= bytes {
            self.replay_tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// The (source, destination) pair a non-STUN datagram of str0m's went on: after ICE,
/// DTLS, SRTP and SCTP only leave on the selected pair (STUN checks try others).
pub fn route_of(t: &Transmit) -> Option<(SocketAddr, SocketAddr)> {
    (!crate::stun::is_stun(&t.contents)).then_some((t.source, t.destination))
}
