//! Holding a room's video packets until their frame is whole, so that each viewer
//! gets the frame in one send (one GSO run, one trip through the kernel's send
//! path) instead of a run per piece the frame arrived in.
//!
//! A viewer cannot decode a frame before its last packet anyway, so the wait costs
//! a viewer little (the frame's fan-out starts at its last packet instead of
//! overlapping its arrival); what it saves is the edge's CPU. A
//! publisher that bursts its frames (today's libwebrtc, GStreamer, aiortc) arrives
//! in two or three receives; one that paces every packet (older libwebrtc) spreads
//! a frame over ten milliseconds or more, and without holding each viewer's copy of
//! each packet is a send of its own, about three times the cost.
//!
//! The rule, per layer of a room (its own state, so one room's frame never delays
//! another's on the same thread, and a simulcast publisher's interleaved layers
//! are held each on its own):
//! - a video packet without the RTP marker is held; the first one held sets a
//!   deadline `window` later;
//! - the packet that carries the marker releases the frame, itself included;
//! - the deadline releases what is held (the paced tail of a large keyframe goes
//!   out in chunks of at most `window`); the next packet starts a new hold;
//! - a packet of a later frame (timestamp) releases what is held, since the
//!   marker will not come (lost, or a sender that never sets it).
//!   Such a layer stops holding for [`CUT_BACKOFF`], so a stream without markers is
//!   not delayed by a frame each time. A late packet of an *earlier* frame (a
//!   resend) passes without touching the hold;
//! - at most [`MAX_HELD`] packets are held.
//!
//! Order is kept: held packets leave before the packet that released them.

use std::time::{Duration, Instant};

/// Most packets one layer holds: a large keyframe leaves in chunks of this many.
pub(crate) const MAX_HELD: usize = 96;

/// How long a layer stops holding after a frame ended without its marker.
pub(crate) const CUT_BACKOFF: Duration = Duration::from_secs(1);

/// What offering a packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Passed through at once: holding is off, or the frame came whole.
    Passed,
    /// Held; `Some` when it started a hold: its deadline.
    Held(Option<Instant>),
    /// It carried the marker and released its frame with it.
    Whole,
    /// It belongs to a later frame: the held packets were released without their
    /// marker, and holding is off for a while. The packet itself passed.
    Cut,
    /// The hold was full and was released, this packet with it.
    Full,
}

/// One layer's held video packets.
#[derive(Debug)]
pub(crate) struct FrameHold<T> {
    packets: Vec<T>,
    /// RTP timestamp of the held frame.
    frame: u32,
    /// When the held packets go out at the latest.
    until: Option<Instant>,
    /// No holding before this (a frame ended without its marker).
    off_until: Option<Instant>,
}

impl<T> Default for FrameHold<T> {
    fn default() -> Self {
        FrameHold {
            packets: Vec::new(),
            frame: 0,
            until: None,
            off_until: None,
        }
    }
}

impl<T> FrameHold<T> {
    /// Offers a video packet with RTP timestamp `ts`. Whatever leaves (the
    /// packet, held packets before it) is appended to `out`, in order.
    pub(crate) fn offer(
        &mut self,
        now: Instant,
        window: Duration,
        ts: u32,
        marker: bool,
        pkt: T,
        out: &mut Vec<T>,
    ) -> Offer {
        if !self.packets.is_empty() && self.frame != ts {
            if (ts.wrapping_sub(self.frame) as i32) < 0 {
                // A late packet of an earlier frame (a resend the publisher was
                // asked for): it goes on at once, and the hold stays.
                out.push(pkt);
                return Offer::Passed;
            }
            self.release(out);
            self.off_until = Some(now + CUT_BACKOFF);
            out.push(pkt);
            return Offer::Cut;
        }
        if window.is_zero() || self.off_until.is_some_and(|t| now < t) {
            out.push(pkt);
            return Offer::Passed;
        }
        if marker {
            if self.packets.is_empty() {
                out.push(pkt);
                return Offer::Passed;
            }
            self.release(out);
            out.push(pkt);
            return Offer::Whole;
        }
        self.packets.push(pkt);
        if self.packets.len() == 1 {
            self.frame = ts;
            let until = now + window;
            self.until = Some(until);
            return Offer::Held(Some(until));
        }
        if self.packets.len() >= MAX_HELD {
            self.release(out);
            return Offer::Full;
        }
        Offer::Held(None)
    }

    /// Releases what is held if its deadline is `deadline` and has come; true if
    /// anything left. (A deadline from an earlier hold, long released, does nothing.)
    pub(crate) fn expire(&mut self, now: Instant, deadline: Instant, out: &mut Vec<T>) -> bool {
        if self.until != Some(deadline) || now < deadline || self.packets.is_empty() {
            return false;
        }
        self.release(out);
        true
    }

    /// When the held packets go out at the latest, if any are held.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.until
    }

    /// Drops what is held (the stream it belonged to is gone).
    pub(crate) fn clear(&mut self) {
        self.packets.clear();
        self.until = None;
    }

    fn release(&mut self, out: &mut Vec<T>) {
        out.append(&mut self.packets);
        self.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(20);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    /// A start time, an empty hold and its output.
    fn fresh<T>() -> (Instant, FrameHold<T>, Vec<T>) {
        (Instant::now(), FrameHold::default(), Vec::new())
    }

    #[test]
    fn a_frame_leaves_whole_with_its_marker() {
        let (t0, mut h, mut out) = fresh();
        assert_eq!(
            h.offer(t0, W, 90, false, 1, &mut out),
            Offer::Held(Some(ms(t0, 20)))
        );
        assert_eq!(
            h.offer(ms(t0, 3), W, 90, false, 2, &mut out),
            Offer::Held(None)
        );
        assert!(out.is_empty());
        assert_eq!(h.offer(ms(t0, 6), W, 90, true, 3, &mut out), Offer::Whole);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(h.deadline(), None);
        // A one-packet frame passes at once.
        assert_eq!(
            h.offer(ms(t0, 30), W, 180, true, 4, &mut out),
            Offer::Passed
        );
        assert_eq!(out, [1, 2, 3, 4]);
    }

    #[test]
    fn the_deadline_releases_a_paced_tail_in_chunks() {
        let (t0, mut h, mut out) = fresh();
        let Offer::Held(Some(d)) = h.offer(t0, W, 90, false, 1, &mut out) else {
            panic!("not held");
        };
        h.offer(ms(t0, 10), W, 90, false, 2, &mut out);
        assert!(!h.expire(ms(t0, 19), d, &mut out), "before its time");
        assert!(h.expire(ms(t0, 20), d, &mut out));
        assert_eq!(out, [1, 2]);
        assert!(!h.expire(ms(t0, 21), d, &mut out), "twice");
        // The same frame goes on: a new hold, a new deadline.
        assert_eq!(
            h.offer(ms(t0, 25), W, 90, false, 3, &mut out),
            Offer::Held(Some(ms(t0, 45)))
        );
        assert!(
            !h.expire(ms(t0, 50), d, &mut out),
            "a stale deadline does nothing"
        );
        assert_eq!(h.offer(ms(t0, 30), W, 90, true, 4, &mut out), Offer::Whole);
        assert_eq!(out, [1, 2, 3, 4]);
    }

    #[test]
    fn a_frame_without_its_marker_is_cut_and_holding_stops_for_a_while() {
        let (t0, mut h, mut out) = fresh();
        h.offer(t0, W, 90, false, 1, &mut out);
        assert_eq!(h.offer(ms(t0, 5), W, 180, false, 2, &mut out), Offer::Cut);
        assert_eq!(out, [1, 2]);
        assert_eq!(
            h.offer(ms(t0, 6), W, 180, false, 3, &mut out),
            Offer::Passed
        );
        let later = t0 + CUT_BACKOFF + Duration::from_millis(10);
        assert!(matches!(
            h.offer(later, W, 270, false, 4, &mut out),
            Offer::Held(Some(_))
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn a_resend_of_an_earlier_frame_passes_and_the_hold_stays() {
        let (t0, mut h, mut out) = fresh();
        h.offer(t0, W, 3000, false, 1, &mut out);
        assert_eq!(h.offer(t0, W, 0, false, 2, &mut out), Offer::Passed);
        assert_eq!(out, [2]);
        assert_eq!(h.offer(t0, W, 3000, true, 3, &mut out), Offer::Whole);
        assert_eq!(out, [2, 1, 3]);
        // Across the timestamp's wrap.
        h.offer(t0, W, 100, false, 4, &mut out);
        assert_eq!(
            h.offer(t0, W, u32::MAX - 2900, false, 5, &mut out),
            Offer::Passed
        );
        assert_eq!(h.offer(t0, W, 3100, false, 6, &mut out), Offer::Cut);
        assert_eq!(out, [2, 1, 3, 5, 4, 6]);
    }

    #[test]
    fn a_full_hold_is_released() {
        let (t0, mut h, mut out) = fresh();
        for i in 0..MAX_HELD - 1 {
            assert!(matches!(
                h.offer(t0, W, 90, false, i, &mut out),
                Offer::Held(_)
            ));
        }
        assert_eq!(
            h.offer(t0, W, 90, false, MAX_HELD - 1, &mut out),
            Offer::Full
        );
        assert_eq!(out, (0..MAX_HELD).collect::<Vec<_>>());
    }

    /// Random offers, markers, resends, frame changes and deadlines: no packet is
    /// lost or sent twice, a frame's packets keep their order, a hold never
    /// outlives its deadline once expired, and never exceeds [`MAX_HELD`].
    #[test]
    fn random_streams_keep_every_packet_once_and_in_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (t0, mut h, mut out) = fresh::<(u32, usize)>();
        let (mut now, mut ts, mut id) = (t0, 0u32, 0usize);
        let mut offered = Vec::new();
        for _ in 0..20_000 {
            now += Duration::from_micros(rand(4_000));
            let frame_ts = match rand(40) {
                0 => ts.wrapping_sub(3000), // a resend of the frame before
                1..=6 => {
                    ts = ts.wrapping_add(3000); // the next frame (the last one may have lost its marker)
                    ts
                }
                _ => ts,
            };
            let marker = rand(6) == 0;
            offered.push((frame_ts, id));
            h.offer(now, W, frame_ts, marker, (frame_ts, id), &mut out);
            id += 1;
            assert!(h.packets.len() < MAX_HELD);
            if let Some(d) = h.deadline() {
                if rand(3) == 0 && now >= d {
                    assert!(h.expire(now, d, &mut out));
                    assert!(h.packets.is_empty() && h.deadline().is_none());
                }
                assert!(d <= now + W);
            }
            assert_eq!(out.len() + h.packets.len(), id, "lost or duplicated");
        }
        out.append(&mut h.packets);
        let mut seen = vec![false; id];
        for &(_, i) in &out {
            assert!(!std::mem::replace(&mut seen[i], true), "packet {i} twice");
        }
        // Per frame (timestamp), the order of arrival.
        let mut last: std::collections::HashMap<u32, usize> = Default::default();
        for &(t, i) in &out {
            if let Some(prev) = last.insert(t, i) {
                assert!(prev < i, "frame {t}: {i} after {prev}");
            }
        }
        assert_eq!(offered.len(), out.len());
    }

    #[test]
    fn a_zero_window_holds_nothing() {
        let (t0, mut h, mut out) = fresh();
        assert_eq!(
            h.offer(t0, Duration::ZERO, 90, false, 1, &mut out),
            Offer::Passed
        );
        assert_eq!(out, [1]);
        h.clear();
        assert_eq!(h.deadline(), None);
    }
}
