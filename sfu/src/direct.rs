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
//!
//! Both paths seal with the same key, and AES-GCM must never see one nonce (SSRC,
//! index) with two different packets: a sequence number goes out by one path only.
//! A packet already sent (a duplicate from the publisher) is not sent again, and
//! resends of str0m's packets are left to str0m (its small NACK cache).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::net::{DatagramSend, Protocol, Transmit};

use crate::buf_pool::BufPool;
use crate::room::VIDEO;
use crate::srtp_seal::SrtpSealer;

/// At least this often a track's packet goes through str0m, so its sender
/// reports carry a current RTP/NTP mapping.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Viewer sequence numbers remembered per track (video: for answering NACKs; both:
/// so that no sequence number is sent twice).
const SENT_RING: [usize; 2] = [512, 128];

/// The fixed RTP header this path writes (no CSRCs, no extensions).
const RTP_HEADER: usize = 12;
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

/// One RTP packet as the direct path writes it for a viewer.
#[derive(Debug, Clone, Copy)]
pub struct RtpOut<'a> {
    /// The viewer's payload type.
    pub pt: u8,
    /// Extended viewer sequence number (SRTP index).
    pub vseq: u64,
    /// RTP timestamp.
    pub ts: u32,
    /// RTP marker bit.
    pub marker: bool,
    /// The payload, shared by every viewer.
    pub payload: &'a [u8],
}

/// What a viewer sequence number was sent as.
#[derive(Debug, Clone, Copy)]
pub struct SentRecord {
    /// Extended viewer sequence number (SRTP index).
    pub vseq: u64,
    /// Room sequence number of the packet.
    pub room_seq: u64,
    /// RTP timestamp it was sent with (replays squeeze them).
    pub ts: u32,
    /// str0m sent it (a sync packet): only str0m may resend it.
    pub by_str0m: bool,
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
    sent: [Box<[Option<SentRecord>]>; 2],
    /// One past the highest sequence number recorded per track: a newer packet
    /// (nearly every one) is known unsent without reading its ring slot, which at
    /// hundreds of viewers is a cache miss per packet per viewer.
    unsent_from: [u64; 2],
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
            sent: SENT_RING.map(|n| vec![None; n].into_boxed_slice()),
            unsent_from: [0; 2],
            resend_credit: RESEND_CREDIT_MAX / 2,
            replay_tokens: REPLAY_BURST,
            replay_refill_at: None,
        }
    }

    /// Hints the CPU to load what [`DirectTx::send`] reads first (the fan-out loop
    /// calls this a few viewers ahead).
    pub fn prefetch(&self) {
        crate::peer::prefetch(&self.route);
        crate::peer::prefetch(&self.sealer);
        crate::peer::prefetch(&self.out);
        crate::peer::prefetch(&self.sent);
        crate::peer::prefetch(&self.unsent_from);
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

    /// Builds, seals and queues one new RTP packet (room packet `room_seq`; video
    /// ones are remembered for NACKs). False if there is no route yet or the seal
    /// failed (the caller counts it).
    pub fn send(&mut self, track: usize, p: RtpOut<'_>, room_seq: u64, pool: &mut BufPool) -> bool {
        if !self.queue(track, p, pool) {
            return false;
        }
        self.record(
            track,
            SentRecord {
                vseq: p.vseq,
                room_seq,
                ts: p.ts,
                by_str0m: false,
            },
        );
        if track == VIDEO {
            self.resend_credit =
                (self.resend_credit + RESEND_CREDIT_PER_PACKET).min(RESEND_CREDIT_MAX);
        }
        true
    }

    /// Builds, seals and queues one RTP packet: new, or a resend (same sequence
    /// number, same bytes on the wire), in a buffer from `pool`.
    pub fn queue(&mut self, track: usize, p: RtpOut<'_>, pool: &mut BufPool) -> bool {
        let RtpOut {
            pt,
            vseq,
            ts,
            marker,
            payload,
        } = p;
        let (Some((source, destination)), Some(Some(ssrc))) = (self.route, self.ssrc.get(track))
        else {
            return false;
        };
        let ssrc = *ssrc;
        let mut buf = pool.take(RTP_HEADER + payload.len() + self.sealer.overhead());
        let Some(h) = buf.get_mut(..RTP_HEADER) else {
            return false;
        };
        h[0] = 0x80;
        h[1] = (u8::from(marker) << 7) | (pt & 0x7f);
        h[2..4].copy_from_slice(&(vseq as u16).to_be_bytes());
        h[4..8].copy_from_slice(&ts.to_be_bytes());
        h[8..12].copy_from_slice(&ssrc.to_be_bytes());
        if !self
            .sealer
            .seal_into(&mut buf, RTP_HEADER, payload, ssrc, vseq)
        {
            pool.give(buf);
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

    /// Remembers a packet of `track` as sent (by either path).
    pub fn record(&mut self, track: usize, r: SentRecord) {
        if let Some(u) = self.unsent_from.get_mut(track) {
            *u = (*u).max(r.vseq.saturating_add(1));
        }
        if let Some(ring) = self.sent.get_mut(track) {
            let n = ring.len() as u64;
            if let Some(s) = ring.get_mut((r.vseq % n) as usize) {
                *s = Some(r);
            }
        }
    }

    /// What `track`'s packet with 16-bit sequence `seq16` was, if still known.
    pub fn lookup(&self, track: usize, seq16: u16) -> Option<SentRecord> {
        // The ring sizes divide 2^16, so the slot follows from the low 16 bits alone.
        let ring = self.sent.get(track)?;
        let r = (*ring.get(seq16 as usize % ring.len())?)?;
        (r.vseq as u16 == seq16).then_some(r)
    }

    /// True if `track`'s packet `vseq` has gone out already (by either path).
    pub fn was_sent(&self, track: usize, vseq: u64) -> bool {
        if self.unsent_from.get(track).is_some_and(|&u| vseq >= u) {
            return false;
        }
        self.lookup(track, vseq as u16)
            .is_some_and(|r| r.vseq == vseq)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::srtp_seal::Exported;
    use str0m::crypto::dtls::SrtpProfile;

    fn pkt(pt: u8, vseq: u64, ts: u32, payload: &[u8]) -> RtpOut<'_> {
        RtpOut {
            pt,
            vseq,
            ts,
            marker: false,
            payload,
        }
    }

    fn tx() -> DirectTx {
        let e = Exported {
            material: (0..56u8).collect(),
            profile: SrtpProfile::AEAD_AES_128_GCM,
            active: true,
        };
        let sealer = SrtpSealer::new(&str0m::crypto::from_feature_flags(), &e).expect("sealer");
        let a: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:2000".parse().expect("addr");
        let mut d = DirectTx::new(sealer, Some((a, b)));
        d.ssrc = [Some(7), Some(8)];
        d
    }

    #[test]
    fn a_sequence_number_is_known_as_sent_by_one_path() {
        let mut d = tx();
        let mut pool = BufPool::new(8);
        assert!(!d.was_sent(VIDEO, 70_000));
        assert!(d.send(VIDEO, pkt(96, 70_000, 1, b"abc"), 5, &mut pool));
        assert!(d.was_sent(VIDEO, 70_000));
        assert!(
            !d.was_sent(VIDEO, 70_000 + 65_536),
            "another ROC is another packet"
        );
        let r = d.lookup(VIDEO, 70_000u64 as u16).expect("recorded");
        assert_eq!((r.room_seq, r.by_str0m), (5, false));
        d.record(
            1,
            SentRecord {
                vseq: 9,
                room_seq: 9,
                ts: 0,
                by_str0m: true,
            },
        );
        assert!(d.was_sent(1, 9) && !d.was_sent(VIDEO, 9));
        // Below the newest recorded number the ring decides: an unrecorded gap is unsent.
        assert!(d.send(VIDEO, pkt(96, 70_010, 1, b"abc"), 15, &mut pool));
        assert!(!d.was_sent(VIDEO, 70_005) && d.was_sent(VIDEO, 70_000));
        assert!(d.send(VIDEO, pkt(96, 70_005, 1, b"abc"), 10, &mut pool));
        assert!(d.was_sent(VIDEO, 70_005) && !d.was_sent(VIDEO, 70_011));
        assert_eq!(d.out.len(), 3);
        assert_eq!(d.out[0].contents.len(), 12 + 3 + 16);
    }

    #[test]
    fn nothing_is_queued_without_a_route_or_ssrc() {
        let mut d = tx();
        let mut pool = BufPool::new(8);
        d.ssrc[1] = None;
        assert!(!d.send(1, pkt(111, 1, 0, b"x"), 1, &mut pool));
        d.route = None;
        assert!(!d.send(VIDEO, pkt(96, 1, 0, b"x"), 1, &mut pool));
        assert!(d.out.is_empty());
    }

    #[test]
    fn resends_are_budgeted() {
        let mut d = tx();
        let mut pool = BufPool::new(8);
        let mut granted = 0;
        while d.take_resend_credit() {
            granted += 1;
        }
        assert!(granted > 0 && granted <= 64);
        // ~15 % of the packets sent since.
        for i in 0..100 {
            assert!(d.send(VIDEO, pkt(96, 100 + i, 0, b"p"), i, &mut pool));
        }
        let mut again = 0;
        while d.take_resend_credit() {
            again += 1;
        }
        assert_eq!(again, 15);
    }

    #[test]
    fn a_reused_buffer_carries_exactly_the_bytes_of_a_fresh_one() {
        let (mut a, mut b, mut c) = (tx(), tx(), tx());
        let mut fresh = BufPool::new(8);
        // Left longer than the packet, full of another packet's bytes.
        let mut longer = BufPool::new(8);
        longer.give(vec![0xAA; crate::buf_pool::BUF_CAPACITY]);
        // Left shorter than the packet.
        let mut shorter = BufPool::new(8);
        let mut short = Vec::with_capacity(crate::buf_pool::BUF_CAPACITY);
        short.extend_from_slice(&[0x55; 7]);
        shorter.give(short);
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        assert!(a.queue(VIDEO, pkt(96, 42, 9, &payload), &mut fresh));
        assert!(b.queue(VIDEO, pkt(96, 42, 9, &payload), &mut longer));
        assert!(c.queue(VIDEO, pkt(96, 42, 9, &payload), &mut shorter));
        assert_eq!(
            longer.idle() + shorter.idle(),
            0,
            "both pooled buffers were taken"
        );
        let want: &[u8] = &a.out[0].contents;
        assert_eq!(want.len(), 12 + 300 + 16);
        assert_eq!(&b.out[0].contents[..], want);
        assert_eq!(&c.out[0].contents[..], want);
    }
}
