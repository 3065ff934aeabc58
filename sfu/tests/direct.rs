//! The direct send path (SFU-sealed SRTP) against real str0m viewers in memory:
//! every frame decodable, lost packets resent from the cache, replays whole.

mod common;

use std::time::Duration;

use common::{assert_in_order, World};
use edgerelay_sfu::SfuConfig;

fn direct() -> SfuConfig {
    SfuConfig {
        direct_send: true,
        ..SfuConfig::default()
    }
}

#[test]
fn direct_viewers_get_every_frame_sealed_by_the_sfu() {
    let mut w = World::new(direct());
    let p = w.publish("r");
    let viewers: Vec<usize> = (0..10).map(|_| w.view("r")).collect();
    w.connect_all();
    w.stream(p, 0, 90, 30);
    w.advance(Duration::from_millis(300));
    for &v in &viewers {
        let f = &w.clients[v].frames;
        assert_eq!(f.len(), 90, "viewer {v} got {} frames", f.len());
        assert!(f[0].key);
        assert_in_order(f, v);
    }
    let s = w.sfu.stats();
    // Nearly everything was sealed by the SFU; str0m carried the sync packets only.
    assert!(s.direct_out * 10 >= s.rtp_out * 9, "{s:?}");
    assert!(
        s.direct_sync >= 10,
        "every viewer's first packet goes through str0m: {s:?}"
    );
    assert_eq!(s.direct_unavailable, 0);
}

#[test]
fn lost_packets_are_resent_from_the_cache() {
    let mut w = World::new(direct());
    let p = w.publish("r");
    let lossy = w.view("r");
    let clean = w.view("r");
    w.connect_all();
    w.lossy = vec![(lossy, 9, 0)];
    for f in 0..60 {
        // ~3 packets a frame.
        w.write_frame(p, None, f, f % 30 == 0, 3000);
        w.advance(Duration::from_millis(33));
    }
    w.lossy.clear();
    w.advance(Duration::from_millis(500));
    assert!(w.lossy_drops >= 20, "loss was simulated: {}", w.lossy_drops);
    let s = w.sfu.stats().clone();
    assert!(s.nacked > 0 && s.direct_resends > 0, "{s:?}");
    for v in [lossy, clean] {
        let f = &w.clients[v].frames;
        // A frame is only emitted whole: every loss was repaired.
        assert!(f.len() >= 58, "viewer {v} got {} of 60 frames", f.len());
        assert!(f.windows(2).all(|p| p[1].time > p[0].time));
    }
}

#[test]
fn direct_replay_of_a_long_gop_is_whole_and_rate_limited() {
    let mut w = World::new(direct());
    let p = w.publish("r");
    w.view("r");
    w.connect_all();
    for f in 0..40 {
        w.write_frame(p, None, f, f == 0, 6000);
        w.advance(Duration::from_millis(33));
    }
    let slices_before = w.sfu.stats().replay_slices;
    let b = w.view("r");
    w.connect_all();
    w.advance(Duration::from_millis(30));
    // ~240 KB at the replay rate (3 MB/s, 64 KB burst) cannot be all there yet.
    let early = w.clients[b].frames.len();
    assert!(
        early < 40,
        "replay not rate-limited: {early} frames after 30 ms"
    );
    w.advance(Duration::from_millis(400));
    let got = &w.clients[b].frames;
    assert_eq!(
        got.len(),
        40,
        "late viewer got {} of 40 cached frames",
        got.len()
    );
    assert!(got[0].key);
    assert!(w.sfu.stats().replay_slices - slices_before >= 4);
}

#[test]
fn two_rooms_in_one_receive_batch_each_get_their_own_stream() {
    // Both publishers' datagrams reach the SFU before it is polled, so one fan-out
    // holds packets of two rooms: each room's viewers must get exactly their own.
    let mut w = World::new(direct());
    let a = w.publish("a");
    let b = w.publish("b");
    let va: Vec<usize> = (0..3).map(|_| w.view("a")).collect();
    let vb: Vec<usize> = (0..3).map(|_| w.view("b")).collect();
    w.connect_all();
    for f in 0..60 {
        w.write_frame(a, None, f, f % 30 == 0, 0);
        w.write_frame(b, None, f, f % 30 == 0, 8000);
        w.advance(Duration::from_millis(33));
    }
    w.advance(Duration::from_millis(300));
    for (viewers, big) in [(&va, false), (&vb, true)] {
        for &v in viewers {
            let f = &w.clients[v].frames;
            assert_eq!(f.len(), 60, "viewer {v} got {} frames", f.len());
            assert!(f[0].key);
            assert_in_order(f, v);
            assert!(
                f.iter().all(|x| (x.len > 6000) == big),
                "viewer {v} got another room's frames: {:?}",
                f.iter().map(|x| x.len).collect::<Vec<_>>()
            );
        }
    }
}
