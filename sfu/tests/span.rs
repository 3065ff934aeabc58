//! One room over two SFU cores: the publisher on its home core, spectators on a
//! mirror fed by the home core's packets (what the edge does across media
//! threads). Real str0m peers on both sides; the test plays the driver, carrying
//! feeds home -> mirror and keyframe requests mirror -> home.

mod common;

use std::time::Duration;

use common::{assert_in_order, World};
use edgerelay_sfu::{RoleRequest, SfuConfig, SfuError, SfuEvent, Upstream};

const FRAME_BYTES: usize = 8000;

fn cfg() -> SfuConfig {
    SfuConfig {
        direct_send: true,
        ..SfuConfig::default()
    }
}

/// The home world (publisher "r" and one viewer) and a mirror world on the same clock.
fn worlds() -> (World, World, usize) {
    let mut home = World::new(cfg());
    let mut mirror = World::new(cfg());
    mirror.now = home.now;
    mirror.start = home.start;
    let p = home.publish("r");
    home.view("r");
    home.connect_all();
    mirror.now = home.now;
    (home, mirror, p)
}

/// Carries what the cores hand each other; returns the feed packets carried.
fn carry(home: &mut World, mirror: &mut World) -> usize {
    let mut n = 0;
    while let Some(f) = home.sfu.poll_feed() {
        n += f.len();
        mirror.sfu.feed(mirror.now, &f);
    }
    while let Some(Upstream::Keyframe { room, rid }) = mirror.sfu.poll_upstream() {
        home.sfu.upstream_keyframe(home.now, &room, rid);
    }
    n
}

/// Both worlds forward in 1 ms steps, the driver carrying after each.
fn step(home: &mut World, mirror: &mut World, dt: Duration) {
    let end = home.now + dt;
    while home.now < end {
        home.advance(Duration::from_millis(1));
        carry(home, mirror);
        mirror.advance(Duration::from_millis(1));
        carry(home, mirror);
    }
}

fn frames(home: &mut World, mirror: &mut World, p: usize, range: std::ops::Range<u32>) {
    for f in range {
        home.write_frame(p, None, f, f % 30 == 0, FRAME_BYTES);
        step(home, mirror, Duration::from_millis(33));
    }
}

fn connect(home: &mut World, mirror: &mut World) {
    for _ in 0..500 {
        if mirror.clients.iter().all(|c| c.connected) {
            return;
        }
        step(home, mirror, Duration::from_millis(10));
    }
    panic!("mirror viewers did not connect");
}

#[test]
fn a_mirrors_spectators_get_the_home_rooms_stream_whole() {
    let (mut home, mut mirror, p) = worlds();
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    let viewers: Vec<usize> = (0..3).map(|_| mirror.view("r")).collect();
    assert!(home.sfu.export_feed("r", true));
    connect(&mut home, &mut mirror);
    for &v in &viewers {
        assert_eq!(
            mirror.clients[v].role,
            Some(edgerelay_sfu::Role::Spectator),
            "an auto request on a mirror seats a spectator"
        );
    }
    frames(&mut home, &mut mirror, p, 0..60);
    step(&mut home, &mut mirror, Duration::from_millis(300));
    let home_frames = home.clients[1].frames.len();
    for &v in &viewers {
        let f = &mirror.clients[v].frames;
        assert!(f.len() >= 59, "mirror viewer {v} got {} frames", f.len());
        assert!(f[0].key, "mirror viewer {v} started on a keyframe");
        assert_in_order(f, v);
        assert_eq!(
            f.last().map(|x| x.time),
            home.clients[1].frames.last().map(|x| x.time),
            "the mirror's viewers are as far as the home's ({home_frames} frames)"
        );
    }
    let (out, inn) = (
        home.sfu.stats().feed_packets_out,
        mirror.sfu.stats().feed_packets_in,
    );
    assert!(out > 0, "the home core copied packets out");
    assert_eq!(out, inn, "every packet copied out reached the mirror");
    assert_eq!(mirror.sfu.stats().rtp_in, 0, "no publisher on the mirror");
    // The publisher counts as one room's: the mirror's own state says "no publisher".
    let rooms = mirror.sfu.rooms();
    assert!(rooms[0].mirror && !rooms[0].publisher && rooms[0].viewers == 3);
}

#[test]
fn a_new_mirror_starts_from_the_homes_cached_gop_without_a_keyframe_request() {
    let (mut home, mut mirror, p) = worlds();
    // Frames flow (keyframe at 0) before any mirror exists.
    frames(&mut home, &mut mirror, p, 0..10);
    let asked = home.sfu.stats().keyframe_requests_upstream;
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    assert!(home.sfu.export_feed("r", true));
    let gop = home.sfu.gop_feed(home.now, "r").expect("a cached GOP");
    assert!(gop.len() >= 10 * 6, "the whole GOP: {} packets", gop.len());
    assert!(mirror.sfu.feed(mirror.now, &gop));
    let v = mirror.view("r");
    connect(&mut home, &mut mirror);
    frames(&mut home, &mut mirror, p, 10..20);
    step(&mut home, &mut mirror, Duration::from_millis(300));
    let f = &mirror.clients[v].frames;
    assert!(f[0].key, "started on the cached keyframe");
    assert_in_order(f, v);
    assert!(f.len() >= 19, "cached and live frames: {}", f.len());
    assert_eq!(mirror.sfu.stats().viewer_starts_from_cache, 1);
    assert_eq!(mirror.sfu.stats().keyframe_requests_to_home, 0);
    assert_eq!(home.sfu.stats().keyframe_requests_upstream, asked);
    assert_eq!(home.clients[p].keyframe_requests, 0);
}

#[test]
fn a_mirror_without_a_cache_asks_the_home_which_asks_the_publisher() {
    let (mut home, mut mirror, p) = worlds();
    frames(&mut home, &mut mirror, p, 1..5); // P-frames only: nothing cached.
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    assert!(home.sfu.export_feed("r", true));
    assert!(home.sfu.gop_feed(home.now, "r").is_none());
    let v = mirror.view("r");
    connect(&mut home, &mut mirror);
    step(&mut home, &mut mirror, Duration::from_millis(50));
    assert_eq!(mirror.sfu.stats().keyframe_requests_to_home, 1);
    assert!(
        home.clients[p].keyframe_requests >= 1,
        "the publisher was asked for a keyframe"
    );
    // The publisher answers with one; the mirror's viewer starts there.
    frames(&mut home, &mut mirror, p, 30..40);
    step(&mut home, &mut mirror, Duration::from_millis(300));
    let f = &mirror.clients[v].frames;
    assert!(!f.is_empty() && f[0].key, "started on the new keyframe");
    assert_in_order(f, v);
}

#[test]
fn a_mirror_seats_no_controller_and_closes_when_empty() {
    let (mut home, mut mirror, _p) = worlds();
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    let offer = "v=0\r\n"; // Refused before it is parsed: the role comes first.
    assert_eq!(
        mirror
            .sfu
            .view(mirror.now, "r", offer, RoleRequest::Controller)
            .map(|j| j.role),
        Err(SfuError::ControllerTaken("r".into()))
    );
    // A room homed here cannot be turned into a mirror.
    assert!(!home.sfu.mirror_room(home.now, "r"));
    // Neither can a mirror export; the home cannot take a feed.
    assert!(!mirror.sfu.export_feed("r", true));
    assert!(home.sfu.gop_feed(home.now, "nowhere").is_none());
    while mirror.sfu.poll_event().is_some() {}
    mirror.sfu.close_if_empty("r");
    assert_eq!(
        mirror.sfu.poll_event(),
        Some(SfuEvent::RoomClosed { room: "r".into() })
    );
    assert_eq!(mirror.sfu.room_count(), 0);
}

#[test]
fn a_feed_for_a_room_not_mirrored_here_is_dropped_and_counted() {
    let (mut home, mut mirror, p) = worlds();
    assert!(home.sfu.export_feed("r", true));
    home.write_frame(p, None, 0, true, FRAME_BYTES);
    home.advance(Duration::from_millis(40));
    let feed = home.sfu.poll_feed().expect("a feed");
    let n = feed.len() as u64;
    assert!(n > 0);
    assert!(!mirror.sfu.feed(mirror.now, &feed), "no mirror of r here");
    assert!(
        !home.sfu.feed(home.now, &feed),
        "r is homed there, not mirrored"
    );
    assert_eq!(mirror.sfu.stats().feed_packets_dropped, n);
    assert_eq!(home.sfu.stats().feed_packets_dropped, n);
    // Export off: nothing more is copied out.
    assert!(home.sfu.export_feed("r", false));
    home.write_frame(p, None, 1, false, FRAME_BYTES);
    home.advance(Duration::from_millis(40));
    assert!(home.sfu.poll_feed().is_none());
}

#[test]
fn a_new_publisher_at_home_restarts_the_mirrors_viewers_at_its_keyframe() {
    let (mut home, mut mirror, p) = worlds();
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    let v = mirror.view("r");
    assert!(home.sfu.export_feed("r", true));
    connect(&mut home, &mut mirror);
    frames(&mut home, &mut mirror, p, 0..10);
    let before = mirror.clients[v].frames.len();
    assert!(before >= 9);
    // The publisher goes; a new one publishes into the same (still exported) room.
    let peer = home.clients[p].peer.expect("peer");
    home.sfu.remove_peer(home.now, peer).expect("removed");
    home.blackhole.push(p);
    let p2 = home.publish("r");
    connect(&mut home, &mut mirror);
    home.connect_all_except(&[p]);
    // Its stream opens with P-frames (a decoder cannot start there), then a keyframe.
    frames(&mut home, &mut mirror, p2, 1..5);
    frames(&mut home, &mut mirror, p2, 30..40);
    step(&mut home, &mut mirror, Duration::from_millis(300));
    let f = &mirror.clients[v].frames;
    assert!(f.len() >= before + 9, "the new stream reached the mirror");
    assert!(f[before].key, "restarted on the new publisher's keyframe");
    assert_in_order(&f[before..], v);
}

#[test]
fn a_home_room_kept_open_for_its_mirror_takes_the_next_publisher() {
    let (mut home, mut mirror, p) = worlds();
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    let v = mirror.view("r");
    assert!(home.sfu.export_feed("r", true));
    connect(&mut home, &mut mirror);
    frames(&mut home, &mut mirror, p, 0..5);
    // Everyone at home leaves: the room stays, for the mirror's viewer.
    for i in [1, p] {
        let peer = home.clients[i].peer.expect("peer");
        home.sfu.remove_peer(home.now, peer).expect("removed");
        home.blackhole.push(i);
    }
    assert_eq!(home.sfu.room_count(), 1, "kept open while exported");
    let before = mirror.clients[v].frames.len();
    let p2 = home.publish("r");
    home.connect_all_except(&[1, p]);
    frames(&mut home, &mut mirror, p2, 0..10);
    step(&mut home, &mut mirror, Duration::from_millis(300));
    let f = &mirror.clients[v].frames;
    assert!(
        f.len() >= before + 9,
        "the next publisher reached the mirror"
    );
    assert!(f[before].key);
    // The publisher leaves too; export off (the mirror unsubscribed): the room closes.
    let peer = home.clients[p2].peer.expect("peer");
    home.sfu.remove_peer(home.now, peer).expect("removed");
    assert_eq!(home.sfu.room_count(), 1);
    assert!(home.sfu.export_feed("r", false));
    home.sfu.close_if_empty("r");
    assert_eq!(home.sfu.room_count(), 0);
}

/// A mirror holds a frame that its home's feeds bring in pieces, as a home does
/// with its publisher's: its viewers get nothing of it before the last packet
/// comes in the next feed, then the whole frame at once.
#[test]
fn a_mirror_holds_a_frame_until_its_last_packet() {
    let (mut home, mut mirror, p) = worlds();
    assert!(mirror.sfu.mirror_room(mirror.now, "r"));
    mirror.view("r");
    assert!(home.sfu.export_feed("r", true));
    connect(&mut home, &mut mirror);
    frames(&mut home, &mut mirror, p, 0..3);
    home.write_frame(p, None, 3, false, FRAME_BYTES);
    let rtp = home.take_rtp(p);
    assert!(rtp.len() >= 3, "{} packets", rtp.len());
    let sent = mirror.sfu.stats().direct_out;
    let home_sent = home.sfu.stats().direct_out;
    mirror.now = home.now;
    for part in [&rtp[..2], &rtp[2..]] {
        for (src, dst, d) in part {
            home.sfu.handle_datagram(home.now, *src, *dst, d);
        }
        let feed = home.sfu.poll_feed().expect("the frame's packets");
        assert!(mirror.sfu.feed(mirror.now, &feed));
        mirror.settle();
        if part.len() == 2 {
            assert_eq!(mirror.sfu.stats().direct_out, sent, "the mirror holds");
            assert_eq!(home.sfu.stats().direct_out, home_sent, "so does the home");
        }
    }
    home.settle();
    assert_eq!(mirror.sfu.stats().direct_out, sent + rtp.len() as u64);
    assert_eq!(home.sfu.stats().direct_out, home_sent + rtp.len() as u64);
    assert_eq!(
        mirror.sfu.stats().frames_gathered,
        home.sfu.stats().frames_gathered
    );
}
