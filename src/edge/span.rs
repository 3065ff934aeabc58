//! A large room across media threads (the driver's half of `edgerelay_sfu`'s
//! `span` module): where a new viewer sits, and what the threads tell each other.
//!
//! A room lives on one *home* thread. Once `span_viewers` viewers sit there, each
//! further spectator goes to the next thread in turn; a thread other than the home
//! opens a *mirror* of the room and subscribes to it. The home thread hands every
//! publisher packet to its subscribers in memory (one `Arc` per receive batch, not
//! per packet), wakes them, and then fans out to its own viewers while they fan
//! out to theirs. Mirrors send keyframe requests back; they unsubscribe when their
//! last viewer leaves.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay_sfu::{Feed, RoleRequest};
use str0m::media::Rid;
use tracing::warn;

use super::turn::Waker;

/// When a room spans threads, and how many viewers it may have in all.
#[derive(Debug, Clone, Copy)]
pub struct SpanPolicy {
    /// Viewers on the home thread before further spectators go elsewhere (0 = never).
    pub viewers: usize,
    /// The room's viewer cap, over all threads together.
    pub max_viewers_per_room: usize,
}

/// What a thread knows of a room on the home thread (from its last published state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeRoom {
    /// Viewers on the home thread.
    pub viewers: usize,
    /// The publisher is connected.
    pub publisher: bool,
    /// A controller is seated.
    pub controller: bool,
    /// Simulcast rooms stay on one thread (their viewers' layers follow str0m's
    /// bandwidth estimate, on the home thread's state).
    pub simulcast: bool,
}

/// Where a new viewer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seat {
    /// The room's home thread.
    Home,
    /// A mirror of the room on this thread.
    Mirror(usize),
    /// The room is at its cap over all threads.
    Full,
}

/// Seats a viewer of a room homed on `home` among `threads` threads. `total` is
/// the room's viewers over all threads; `turn` hands out mirror seats in turn.
pub fn seat(
    policy: SpanPolicy,
    threads: usize,
    home: usize,
    room: Option<HomeRoom>,
    total: usize,
    role: RoleRequest,
    turn: &AtomicUsize,
) -> Seat {
    let Some(r) = room else {
        return Seat::Home;
    };
    let spans = threads > 1
        && policy.viewers > 0
        && r.publisher
        && !r.simulcast
        && r.viewers >= policy.viewers
        && match role {
            RoleRequest::Spectator => true,
            // Would be a spectator anyway: the controller is taken.
            RoleRequest::Auto => r.controller,
            RoleRequest::Controller => false,
        };
    if !spans {
        // The home thread enforces the cap on what it holds.
        return Seat::Home;
    }
    if total >= policy.max_viewers_per_room {
        return Seat::Full;
    }
    match turn.fetch_add(1, Ordering::Relaxed) % threads {
        k if k == home => Seat::Home,
        k => Seat::Mirror(k),
    }
}

/// What media threads send each other.
pub enum ShardMsg {
    /// A mirror of `room` opened on `shard`: send it the room's packets.
    Subscribe {
        /// The room.
        room: String,
        /// The mirror's thread.
        shard: usize,
    },
    /// The mirror on `shard` closed (its last viewer left).
    Unsubscribe {
        /// The room.
        room: String,
        /// The mirror's thread.
        shard: usize,
    },
    /// A mirror's viewer needs a keyframe (also re-subscribes a mirror the home
    /// forgot: a room that closed at home and opened again).
    Keyframe {
        /// The room.
        room: String,
        /// The layer.
        rid: Option<Rid>,
        /// The mirror's thread.
        shard: usize,
    },
    /// The home thread's packets for a mirror.
    Feed(Arc<Feed>),
}

/// Messages a thread may queue for another before further ones are dropped
/// (a stalled thread must not grow the others' memory without bound).
pub const BUS_DEPTH: usize = 4096;

/// One thread's ends of the bus: a sender and waker per thread, its own inbox.
pub struct ShardBus {
    links: Vec<(SyncSender<ShardMsg>, Arc<Waker>)>,
    /// This thread's inbox.
    pub inbox: Receiver<ShardMsg>,
    /// When a full inbox was last logged, and the drops since (one warning per
    /// [`DROP_LOG_EVERY`], not one per message).
    drops: Cell<(Option<Instant>, u64)>,
}

/// A thread whose inbox stays full is reported this often at most.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

impl ShardBus {
    /// A bus end from every thread's sender and waker and this thread's inbox.
    pub fn new(links: Vec<(SyncSender<ShardMsg>, Arc<Waker>)>, inbox: Receiver<ShardMsg>) -> Self {
        ShardBus {
            links,
            inbox,
            drops: Cell::new((None, 0)),
        }
    }

    /// Queues `msg` for thread `to` and wakes it. False if it could not be queued
    /// (the thread's inbox is full or the thread is gone).
    pub fn send(&self, to: usize, msg: ShardMsg) -> bool {
        let Some((tx, waker)) = self.links.get(to) else {
            return false;
        };
        match tx.try_send(msg) {
            Ok(()) => {
                waker.wake();
                true
            }
            Err(TrySendError::Full(_)) => {
                let (last, n) = self.drops.get();
                let now = Instant::now();
                if last.is_none_or(|t| now.saturating_duration_since(t) >= DROP_LOG_EVERY) {
                    warn!(
                        to,
                        dropped = n + 1,
                        "a media thread's inbox is full (the thread is stalled): messages to it dropped"
                    );
                    self.drops.set((Some(now), 0));
                } else {
                    self.drops.set((last, n + 1));
                }
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The home side: which threads mirror each exported room (a bit per thread;
/// at most 64 threads, as `media.threads` allows).
#[derive(Default)]
pub struct Exports {
    subscribers: HashMap<String, u64>,
}

impl Exports {
    /// Adds a subscriber; true if it is new.
    pub fn subscribe(&mut self, room: &str, shard: usize) -> bool {
        let bit = 1u64 << (shard % 64);
        let m = self.subscribers.entry(room.to_string()).or_default();
        let new = *m & bit == 0;
        *m |= bit;
        new
    }

    /// Removes a subscriber; true if none is left.
    pub fn unsubscribe(&mut self, room: &str, shard: usize) -> bool {
        let Some(m) = self.subscribers.get_mut(room) else {
            return true;
        };
        *m &= !(1u64 << (shard % 64));
        if *m == 0 {
            self.subscribers.remove(room);
            return true;
        }
        false
    }

    /// Forgets a room (it closed).
    pub fn close(&mut self, room: &str) {
        self.subscribers.remove(room);
    }

    /// The threads mirroring `room`.
    pub fn subscribers(&self, room: &str) -> impl Iterator<Item = usize> {
        let m = self.subscribers.get(room).copied().unwrap_or(0);
        (0..64).filter(move |k| m & (1u64 << k) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SpanPolicy = SpanPolicy {
        viewers: 10,
        max_viewers_per_room: 100,
    };

    fn room(viewers: usize) -> Option<HomeRoom> {
        Some(HomeRoom {
            viewers,
            publisher: true,
            controller: true,
            simulcast: false,
        })
    }

    #[test]
    fn a_small_room_stays_home() {
        let t = AtomicUsize::new(1);
        let off = SpanPolicy {
            viewers: 0,
            ..POLICY
        };
        let with = |f: fn(&mut HomeRoom)| {
            room(50).map(|mut r| {
                f(&mut r);
                r
            })
        };
        let cases = [
            (
                "below the threshold",
                POLICY,
                4,
                room(9),
                RoleRequest::Spectator,
            ),
            ("no such room here", POLICY, 4, None, RoleRequest::Spectator),
            ("one thread", POLICY, 1, room(50), RoleRequest::Spectator),
            ("spanning off", off, 4, room(50), RoleRequest::Spectator),
            (
                "a controller request",
                POLICY,
                4,
                room(50),
                RoleRequest::Controller,
            ),
            (
                "simulcast",
                POLICY,
                4,
                with(|r| r.simulcast = true),
                RoleRequest::Spectator,
            ),
            (
                "no publisher yet",
                POLICY,
                4,
                with(|r| r.publisher = false),
                RoleRequest::Spectator,
            ),
            // Auto without a controller becomes the controller: home.
            (
                "auto, controller free",
                POLICY,
                4,
                with(|r| r.controller = false),
                RoleRequest::Auto,
            ),
        ];
        for (what, policy, threads, r, role) in cases {
            assert_eq!(
                seat(policy, threads, 0, r, 50, role, &t),
                Seat::Home,
                "{what}"
            );
        }
        assert_eq!(t.load(Ordering::Relaxed), 1, "no seat handed out");
    }

    #[test]
    fn a_large_room_deals_seats_round_the_threads() {
        let t = AtomicUsize::new(0);
        let seats: Vec<Seat> = (0..6)
            .map(|_| seat(POLICY, 3, 1, room(10), 20, RoleRequest::Auto, &t))
            .collect();
        assert_eq!(
            seats,
            [
                Seat::Mirror(0),
                Seat::Home,
                Seat::Mirror(2),
                Seat::Mirror(0),
                Seat::Home,
                Seat::Mirror(2)
            ]
        );
        assert_eq!(
            seat(POLICY, 3, 1, room(40), 100, RoleRequest::Spectator, &t),
            Seat::Full
        );
    }

    #[test]
    fn exports_track_subscribers_per_room() {
        let mut e = Exports::default();
        assert!(e.subscribe("a", 2));
        assert!(!e.subscribe("a", 2));
        assert!(e.subscribe("a", 5));
        assert_eq!(e.subscribers("a").collect::<Vec<_>>(), [2, 5]);
        assert_eq!(e.subscribers("b").count(), 0);
        assert!(!e.unsubscribe("a", 2));
        assert!(e.unsubscribe("a", 5));
        assert_eq!(e.subscribers("a").count(), 0);
        e.subscribe("a", 1);
        e.close("a");
        assert_eq!(e.subscribers("a").count(), 0);
    }
}
