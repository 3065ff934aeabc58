//! A room: one publisher (the instance), its tracks and layers, and the viewers.

use std::time::{Duration, Instant};

use str0m::format::CodecSpec;
use str0m::media::{MediaKind, Mid, Pt, Rid};

use crate::gather::FrameHold;
use crate::gop::{GopCache, Timeline};
use crate::slab::Key;
use crate::PendingRtp;

/// Index of the video track in [`Room::tracks`].
pub const VIDEO: usize = 0;
/// Index of the audio track in [`Room::tracks`].
pub const AUDIO: usize = 1;
/// Most simulcast layers a track keeps.
pub const MAX_LAYERS: usize = 3;

/// Bytes per second over a sliding one-second window, in two buckets.
#[derive(Debug, Default)]
pub struct RateMeter {
    bucket_start: Option<Instant>,
    current: u64,
    previous: u64,
}

impl RateMeter {
    /// Counts `bytes` arriving at `now`.
    pub fn add(&mut self, now: Instant, bytes: usize) {
        self.roll(now);
        self.current += bytes as u64;
    }

    fn roll(&mut self, now: Instant) {
        match self.bucket_start {
            None => self.bucket_start = Some(now),
            Some(s) => {
                let age = now.saturating_duration_since(s);
                if age >= Duration::from_secs(2) {
                    self.previous = 0;
                    self.current = 0;
                    self.bucket_start = Some(now);
                } else if age >= Duration::from_secs(1) {
                    self.previous = self.current;
                    self.current = 0;
                    self.bucket_start = Some(s + Duration::from_secs(1));
                }
            }
        }
    }

    /// Bits per second, from the last complete second (or the current one if larger).
    pub fn bps(&self) -> u64 {
        self.previous.max(self.current) * 8
    }
}

/// One encoding of a track (a simulcast layer, or the only one).
#[derive(Debug, Default)]
pub struct Layer {
    /// RTP stream id; `None` without simulcast.
    pub rid: Option<Rid>,
    /// Packets since the last keyframe.
    pub gop: GopCache,
    /// Continuous numbering for viewers.
    pub timeline: Timeline,
    /// Incoming bitrate.
    pub rate: RateMeter,
    /// Video packets held until their frame is whole ([`crate::gather`]); one
    /// hold per layer, since a simulcast publisher interleaves its layers' frames.
    pub(crate) hold: FrameHold<PendingRtp>,
}

/// A track of the room (video or audio) as published.
#[derive(Debug, Default)]
pub struct TrackIn {
    /// The publisher's mid for this track, if one publishes it now.
    pub mid: Option<Mid>,
    /// Layers, ordered as first seen.
    pub layers: Vec<Layer>,
}

impl TrackIn {
    /// Finds or creates the layer for `rid`; `None` when there are too many layers.
    pub fn layer_index(&mut self, rid: Option<Rid>) -> Option<usize> {
        if let Some(i) = self.layers.iter().position(|l| l.rid == rid) {
            return Some(i);
        }
        if self.layers.len() >= MAX_LAYERS {
            return None;
        }
        self.layers.push(Layer {
            rid,
            ..Default::default()
        });
        Some(self.layers.len() - 1)
    }
}

/// A room and who is in it.
#[derive(Debug)]
pub struct Room {
    /// The room's name, as in `/whip/{room}`.
    pub name: String,
    /// The publishing peer, if connected or connecting.
    pub publisher: Option<Key>,
    /// Viewers in fan-out order: the controller first, then the others in join order.
    pub viewers: Vec<Key>,
    /// The viewer whose input reaches the publisher.
    pub controller: Option<Key>,
    /// Video and audio tracks.
    pub tracks: [TrackIn; 2],
    /// Bumped on every new publisher, so viewers recompute payload type maps.
    pub epoch: u32,
    /// The publisher's offer announced simulcast.
    pub simulcast: bool,
    /// When a keyframe was last requested from the publisher.
    pub last_keyframe_request: Option<Instant>,
    /// The current publisher's payload types and codecs.
    pub pt_specs: Vec<(Pt, CodecSpec)>,
    /// A mirror of a room whose publisher is on another core ([`crate::span`]):
    /// its packets come through [`crate::Sfu::feed`].
    pub mirror: bool,
    /// The publisher's packets are also copied out for mirrors on other cores.
    pub exported: bool,
}

impl Room {
    /// An empty room.
    pub fn new(name: String) -> Self {
        Room {
            name,
            publisher: None,
            viewers: Vec::new(),
            controller: None,
            tracks: Default::default(),
            epoch: 0,
            simulcast: false,
            last_keyframe_request: None,
            pt_specs: Vec::new(),
            mirror: false,
            exported: false,
        }
    }

    /// Track slot for a media kind.
    pub fn track_index(kind: MediaKind) -> usize {
        if kind == MediaKind::Video {
            VIDEO
        } else {
            AUDIO
        }
    }

    /// Called when the publisher goes: its caches are stale, its mids gone.
    pub fn publisher_gone(&mut self) {
        self.publisher = None;
        self.pt_specs.clear();
        for t in &mut self.tracks {
            t.mid = None;
            for l in &mut t.layers {
                l.gop.invalidate();
                // The rest of a frame of a stream that is gone.
                l.hold.clear();
            }
        }
    }

    /// True when nothing keeps the room alive (mirrors on other cores do: their
    /// viewers wait for the next publisher as the room's own would).
    pub fn is_empty(&self) -> bool {
        self.publisher.is_none() && self.viewers.is_empty() && !self.exported
    }

    /// The video comes in several layers (announced, or seen): its viewers'
    /// layer follows their bandwidth estimate.
    pub fn is_simulcast(&self) -> bool {
        self.simulcast || self.tracks[VIDEO].layers.len() > 1
    }

    /// Bitrate of a video layer, bits per second.
    pub fn video_layer_bps(&self, layer: usize) -> u64 {
        self.tracks[VIDEO]
            .layers
            .get(layer)
            .map(|l| l.rate.bps())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_meter_measures_a_second() {
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        for i in 0..100 {
            m.add(t0 + Duration::from_millis(i * 10), 1000);
        }
        m.add(t0 + Duration::from_millis(1001), 0);
        assert_eq!(m.bps(), 800_000);
        m.add(t0 + Duration::from_secs(5), 10);
        assert_eq!(m.bps(), 80);
    }
}
