//! The per-layer cache of packets since the last keyframe, and the room
//! timeline that keeps sequence numbers and timestamps continuous for viewers
//! when the publisher's stream restarts.

use std::sync::Arc;
use std::time::Instant;

use str0m::media::Pt;
use str0m::rtp::{ExtensionValues, Ssrc};

/// One forwarded packet as the room keeps it: the payload is shared by every viewer.
#[derive(Debug, Clone)]
pub struct CachedPacket {
    /// Sequence number on the room timeline.
    pub seq: u64,
    /// RTP timestamp on the room timeline.
    pub ts: u32,
    /// Payload type as the publisher sent it.
    pub pt: Pt,
    /// RTP marker bit.
    pub marker: bool,
    /// Header extension values to pass on.
    pub ext: ExtensionValues,
    /// `ext` carries nothing (decided once here, not per viewer): the direct send
    /// path writes no extensions, so only such packets may take it.
    pub plain: bool,
    /// The RTP payload, shared.
    pub payload: Arc<[u8]>,
    /// When the packet arrived.
    pub arrival: Instant,
}

/// Packets from the start of the last keyframe to now.
///
/// A viewer that joins mid-GOP is served these at once, so it decodes a picture
/// without any keyframe request reaching the publisher.
#[derive(Debug, Default)]
pub struct GopCache {
    packets: Vec<CachedPacket>,
    /// True while `packets` starts at a keyframe.
    valid: bool,
    cur_ts: Option<u32>,
    cur_start: usize,
    cur_is_key: bool,
    frames: u32,
    bytes: usize,
    /// Bumped whenever the cache's first packet changes (new keyframe, reset), so a
    /// reader's index into [`GopCache::packets`] can tell it is stale.
    generation: u64,
}

/// What pushing a packet did to the cache.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Pushed {
    /// An ordinary packet.
    Packet,
    /// This packet made the current frame a keyframe: the cache now starts here.
    KeyframeStart,
}

impl GopCache {
    /// Upper bounds so one long GOP cannot exhaust memory.
    pub const MAX_PACKETS: usize = 4096;
    /// Upper bound in payload bytes.
    pub const MAX_BYTES: usize = 8 * 1024 * 1024;

    /// Adds a packet; `is_key` says whether its payload starts or contains a keyframe.
    pub fn push(&mut self, pkt: CachedPacket, is_key: bool) -> Pushed {
        if self.cur_ts != Some(pkt.ts) {
            self.cur_ts = Some(pkt.ts);
            self.cur_is_key = false;
            if !self.valid {
                self.clear_packets();
            }
            self.cur_start = self.packets.len();
            self.frames += 1;
        }
        self.bytes += pkt.payload.len();
        self.packets.push(pkt);
        let mut result = Pushed::Packet;
        if is_key && !self.cur_is_key {
            self.cur_is_key = true;
            let removed: usize = self.packets[..self.cur_start]
                .iter()
                .map(|p| p.payload.len())
                .sum();
            self.bytes -= removed;
            self.packets.drain(..self.cur_start);
            self.generation += 1;
            self.cur_start = 0;
            self.frames = 1;
            self.valid = true;
            result = Pushed::KeyframeStart;
        }
        if self.packets.len() > Self::MAX_PACKETS || self.bytes > Self::MAX_BYTES {
            self.invalidate();
        }
        result
    }

    fn clear_packets(&mut self) {
        if !self.packets.is_empty() {
            self.generation += 1;
        }
        self.packets.clear();
        self.bytes = 0;
        self.frames = 0;
        self.cur_start = 0;
    }

    /// Forgets everything (publisher gone, cache overflow).
    pub fn invalidate(&mut self) {
        self.clear_packets();
        self.valid = false;
        self.cur_ts = None;
        self.cur_is_key = false;
    }

    /// True when the cache starts with a keyframe.
    pub fn is_valid(&self) -> bool {
        self.valid && !self.packets.is_empty()
    }

    /// Changes whenever indices into [`GopCache::packets`] stop meaning what they did.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The cached packets, oldest first.
    pub fn packets(&self) -> &[CachedPacket] {
        &self.packets
    }

    /// Number of distinct frames (timestamps) cached.
    pub fn frames(&self) -> u32 {
        self.frames
    }
}

/// Maps a publisher stream's sequence numbers and timestamps onto the room's
/// continuous timeline, across publisher reconnects and SSRC changes.
#[derive(Debug, Default)]
pub struct Timeline {
    source: Option<Ssrc>,
    seq_off: u64,
    ts_off: u32,
    last_seq: Option<u64>,
    last_ts: u32,
    last_arrival: Option<Instant>,
}

impl Timeline {
    /// Maps one packet; `clock_rate` is used to advance time across a source change.
    pub fn map(
        &mut self,
        ssrc: Ssrc,
        seq: u64,
        ts: u32,
        arrival: Instant,
        clock_rate: u32,
    ) -> (u64, u32) {
        if self.source != Some(ssrc) {
            self.source = Some(ssrc);
            match self.last_seq {
                None => {
                    self.seq_off = 0;
                    self.ts_off = 0;
                }
                Some(last) => {
                    self.seq_off = last.wrapping_add(1).wrapping_sub(seq);
                    let elapsed = self
                        .last_arrival
                        .map(|t| arrival.saturating_duration_since(t).as_secs_f64())
                        .unwrap_or(0.0);
                    let ticks = ((elapsed * clock_rate as f64) as u32).max(1);
                    self.ts_off = self.last_ts.wrapping_add(ticks).wrapping_sub(ts);
                }
            }
        }
        let out_seq = seq.wrapping_add(self.seq_off);
        let out_ts = ts.wrapping_add(self.ts_off);
        if self.last_seq.is_none_or(|l| out_seq > l) {
            self.last_seq = Some(out_seq);
            self.last_ts = out_ts;
            self.last_arrival = Some(arrival);
        }
        (out_seq, out_ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u64, ts: u32) -> CachedPacket {
        CachedPacket {
            seq,
            ts,
            pt: 96.into(),
            marker: false,
            ext: ExtensionValues::default(),
            plain: true,
            payload: Arc::from(vec![0u8; 100]),
            arrival: Instant::now(),
        }
    }

    #[test]
    fn cache_starts_at_the_keyframe_frame() {
        let mut g = GopCache::default();
        assert_eq!(g.push(pkt(1, 100), false), Pushed::Packet);
        assert!(!g.is_valid());
        // SPS in its own packet, then the IDR packets of the same frame.
        assert_eq!(g.push(pkt(2, 200), false), Pushed::Packet);
        assert_eq!(g.push(pkt(3, 200), true), Pushed::KeyframeStart);
        assert_eq!(g.push(pkt(4, 200), true), Pushed::Packet);
        g.push(pkt(5, 300), false);
        assert!(g.is_valid());
        let seqs: Vec<u64> = g.packets().iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        assert_eq!(g.frames(), 2);
        // The next keyframe drops the old GOP.
        g.push(pkt(6, 400), true);
        assert_eq!(g.packets().len(), 1);
        assert_eq!(g.frames(), 1);
    }

    #[test]
    fn cache_is_bounded() {
        let mut g = GopCache::default();
        g.push(pkt(0, 0), true);
        for i in 1..=GopCache::MAX_PACKETS as u64 {
            g.push(pkt(i, i as u32), false);
        }
        assert!(!g.is_valid());
        assert!(g.packets().len() <= GopCache::MAX_PACKETS);
    }

    #[test]
    fn timeline_is_continuous_across_sources() {
        let mut t = Timeline::default();
        let now = Instant::now();
        assert_eq!(t.map(1.into(), 500, 1000, now, 90_000), (500, 1000));
        assert_eq!(t.map(1.into(), 501, 4000, now, 90_000), (501, 4000));
        // New publisher: new SSRC, random seq/ts.
        let later = now + std::time::Duration::from_millis(100);
        let (s, ts) = t.map(2.into(), 30_000, 7, later, 90_000);
        assert_eq!(s, 502);
        assert_eq!(ts, 4000 + 9000);
        let (s, _) = t.map(2.into(), 30_001, 3007, later, 90_000);
        assert_eq!(s, 503);
    }
}
