//! A room spread over several SFU cores (media threads).
//!
//! One core, the room's *home*, holds the publisher. Once the room is large, the
//! driver seats further spectators on other cores, each in a *mirror* of the room:
//! a room without a publisher, fed the publisher's packets by the home core.
//! Each core then seals and sends only its own viewers' copies, so one room's
//! fan-out runs on several CPUs at once and the last viewer's copy leaves sooner.
//!
//! The core stays sans-IO: the home core hands out [`Feed`]s
//! ([`crate::Sfu::poll_feed`]), the driver carries them to the mirrors
//! ([`crate::Sfu::feed`]), and a mirror's keyframe requests come back as
//! [`Upstream`] ([`crate::Sfu::poll_upstream`], then
//! [`crate::Sfu::upstream_keyframe`] on the home core).

use std::time::Instant;

use str0m::format::CodecSpec;
use str0m::media::Rid;

use crate::gop::{CachedPacket, Pushed};
use crate::room::VIDEO;
use crate::slab::Key;
use crate::{is_keyframe, restart_viewers, PendingRtp, Sfu};

/// A home room's publisher packets for its mirrors on other cores: what the
/// home core received since the driver last asked. Shared read-only by every
/// mirror (the driver wraps it in an `Arc`); payloads are shared, not copied.
#[derive(Debug, Clone)]
pub struct Feed {
    pub(crate) room: String,
    /// When the first of these packets reached the home core.
    pub(crate) received_at: Instant,
    pub(crate) packets: Vec<FeedPacket>,
}

impl Feed {
    /// The room the packets belong to.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// When the first packet reached the home core (the mirrors' fan-out delay
    /// is measured from there).
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// Dates the feed from an earlier arrival the driver knows of (the kernel's
    /// receive stamp of the batch, before the SFU saw it).
    pub fn arrived_at(&mut self, t: Instant) {
        self.received_at = self.received_at.min(t);
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// True when it carries no packet.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

/// One publisher packet as a mirror needs it: already on the room's timeline,
/// with what the mirror cannot look up itself (the codec, the layer's RID, the
/// publisher epoch).
#[derive(Debug, Clone)]
pub(crate) struct FeedPacket {
    pub track: usize,
    pub rid: Option<Rid>,
    pub spec: CodecSpec,
    /// The home room's publisher epoch: a new one restarts the mirror's viewers.
    pub epoch: u32,
    pub simulcast: bool,
    pub cp: CachedPacket,
}

/// What a mirror room asks of its home core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A viewer of the mirror needs a keyframe the mirror has not cached.
    Keyframe {
        /// The room.
        room: String,
        /// The simulcast layer, `None` without simulcast.
        rid: Option<Rid>,
    },
}

/// Appends a packet to its room's waiting feed (one feed per exported room; a
/// core rarely exports more than one, so a scan).
pub(crate) fn push_feed(
    feeds: &mut Vec<(Key, Feed)>,
    rk: Key,
    room: &str,
    now: Instant,
    fp: FeedPacket,
) {
    match feeds.iter_mut().find(|(k, _)| *k == rk) {
        Some((_, f)) => f.packets.push(fp),
        None => feeds.push((
            rk,
            Feed {
                room: room.to_string(),
                received_at: now,
                packets: vec![fp],
            },
        )),
    }
}

impl Sfu {
    /// Opens `room` here as a mirror of a room homed on another core (or finds
    /// it). Viewers may then join it as spectators; its media comes from
    /// [`Sfu::feed`]. Returns false if a room of that name exists here and is not
    /// a mirror (it is homed here: join it directly).
    pub fn mirror_room(&mut self, now: Instant, room: &str) -> bool {
        self.enter(now);
        let rk = self.room_key_or_create(room);
        match self.rooms.get_mut(rk) {
            Some(r) if r.mirror => true,
            Some(r) if r.publisher.is_none() && r.viewers.is_empty() => {
                r.mirror = true;
                true
            }
            _ => false,
        }
    }

    /// Starts (or stops) copying `room`'s publisher packets out as [`Feed`]s for
    /// mirrors on other cores. Returns false if the room is not homed here. An
    /// exported room stays open with no publisher and no viewer of its own (the
    /// mirrors' viewers wait in it for the next publisher); once export stops,
    /// [`Sfu::close_if_empty`] closes it.
    pub fn export_feed(&mut self, room: &str, on: bool) -> bool {
        let Some(&rk) = self.room_by_name.get(room) else {
            return false;
        };
        match self.rooms.get_mut(rk) {
            Some(r) if !r.mirror => {
                r.exported = on;
                if !on {
                    self.feeds.retain(|(k, _)| *k != rk);
                }
                true
            }
            _ => false,
        }
    }

    /// The packets `room` has cached since its last keyframe, as one feed: a new
    /// mirror starts from these, so its first viewers start at once, as they
    /// would on the home core, without asking the publisher for a keyframe.
    pub fn gop_feed(&self, now: Instant, room: &str) -> Option<Feed> {
        let r = self.rooms.get(*self.room_by_name.get(room)?)?;
        if r.mirror {
            return None;
        }
        let mut packets = Vec::new();
        for l in r.tracks[VIDEO].layers.iter().filter(|l| l.gop.is_valid()) {
            for cp in l.gop.packets() {
                let Some(&(_, spec)) = r.pt_specs.iter().find(|(pt, _)| *pt == cp.pt) else {
                    continue;
                };
                packets.push(FeedPacket {
                    track: VIDEO,
                    rid: l.rid,
                    spec,
                    epoch: r.epoch,
                    simulcast: r.simulcast,
                    cp: cp.clone(),
                });
            }
        }
        (!packets.is_empty()).then(|| Feed {
            room: room.to_string(),
            received_at: now,
            packets,
        })
    }

    /// Publisher packets of exported rooms received since the last call, one
    /// feed per room, for the driver to hand to the rooms' mirrors.
    pub fn poll_feed(&mut self) -> Option<Feed> {
        self.feeds.pop().map(|(_, f)| f)
    }

    /// A mirror room's request for its home core.
    pub fn poll_upstream(&mut self) -> Option<Upstream> {
        self.upstream.pop_front()
    }

    /// A mirror of `room` asks for a keyframe of layer `rid`: asked of the
    /// publisher under the room's usual throttle.
    pub fn upstream_keyframe(&mut self, now: Instant, room: &str, rid: Option<Rid>) {
        self.enter(now);
        let Some(&rk) = self.room_by_name.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get(rk) else {
            return;
        };
        if r.mirror {
            return;
        }
        let layer = r.tracks[VIDEO]
            .layers
            .iter()
            .position(|l| l.rid == rid)
            .unwrap_or(0);
        self.request_keyframe(now, rk, layer);
    }

    /// Takes a home core's packets into this core's mirror of the room, to go to
    /// its viewers in the next fan-out, as the publisher's own packets would.
    /// Returns false (and counts them dropped) if there is no such mirror here.
    pub fn feed(&mut self, now: Instant, feed: &Feed) -> bool {
        self.enter(now);
        let rk = match self.room_by_name.get(&feed.room) {
            Some(&rk) if self.rooms.get(rk).is_some_and(|r| r.mirror) => rk,
            _ => {
                self.stats.feed_packets_dropped += feed.packets.len() as u64;
                return false;
            }
        };
        for fp in &feed.packets {
            let Some(r) = self.rooms.get_mut(rk) else {
                return false;
            };
            if r.epoch != fp.epoch {
                // A new publisher at home (or this mirror's first packet): what is
                // cached is another stream, and every viewer restarts at a keyframe.
                r.publisher_gone();
                r.epoch = fp.epoch;
                restart_viewers(&mut self.peers, &r.viewers);
            }
            r.simulcast = fp.simulcast;
            if r.pt_specs.len() < 16 && !r.pt_specs.iter().any(|(pt, _)| *pt == fp.cp.pt) {
                r.pt_specs.push((fp.cp.pt, fp.spec));
            }
            let Some(layer) = r.tracks[fp.track].layer_index(fp.rid) else {
                self.stats.feed_packets_dropped += 1;
                continue;
            };
            let l = &mut r.tracks[fp.track].layers[layer];
            l.rate.add(now, fp.cp.payload.len());
            let pushed = if fp.track == VIDEO {
                let key_frame = is_keyframe(fp.spec.codec, &fp.cp.payload);
                l.gop.push(fp.cp.clone(), key_frame)
            } else {
                Pushed::Packet
            };
            self.stats.feed_packets_in += 1;
            self.queue_fan_out(
                now,
                PendingRtp {
                    room: rk,
                    track: fp.track,
                    layer,
                    pushed,
                    cp: fp.cp.clone(),
                    arrived: feed.received_at.min(now),
                },
            );
        }
        true
    }
}
