//! A fan-out bigger than one slice (more viewers x packets than the SFU queues at
//! once) goes out over several `poll_transmit` calls: every viewer still gets every
//! packet once and in order, also when the driver feeds the SFU or a viewer leaves
//! while a fan-out is paused.

mod common;

use std::time::Duration;

use common::{assert_in_order, World};
use edgerelay_sfu::SfuConfig;
use str0m::Input;

/// Viewers in the room: with ~7 packets a frame, a frame is more than one slice.
const VIEWERS: usize = 60;
/// Bytes of each frame's payload (about 7 RTP packets).
const FRAME_BYTES: usize = 8000;

fn world() -> (World, usize, Vec<usize>) {
    let mut w = World::new(SfuConfig {
        direct_send: true,
        ..SfuConfig::default()
    });
    let p = w.publish("r");
    let viewers = (0..VIEWERS).map(|_| w.view("r")).collect();
    w.connect_all();
    (w, p, viewers)
}

fn frames(w: &mut World, p: usize, range: std::ops::Range<u32>) {
    for f in range {
        w.write_frame(p, None, f, f % 30 == 0, FRAME_BYTES);
        w.advance(Duration::from_millis(33));
    }
}

#[test]
fn a_fan_out_bigger_than_a_slice_reaches_every_viewer_whole() {
    let (mut w, p, viewers) = world();
    let slices = w.sfu.stats().fanout_slices;
    frames(&mut w, p, 0..60);
    w.advance(Duration::from_millis(300));
    assert!(
        w.sfu.stats().fanout_slices - slices >= 60,
        "each frame's fan-out went out in slices ({} pauses)",
        w.sfu.stats().fanout_slices - slices
    );
    for &v in &viewers {
        let f = &w.clients[v].frames;
        assert_eq!(f.len(), 60, "viewer {v} got {} frames", f.len());
        assert!(f[0].key, "viewer {v} started on a keyframe");
        assert_in_order(f, v);
    }
}

#[test]
fn a_viewer_leaving_while_a_fan_out_is_paused_costs_the_others_nothing() {
    let (mut w, p, viewers) = world();
    frames(&mut w, p, 0..10);
    // One more frame reaches the SFU; the driver takes only the first slice's
    // datagrams before the signalling side removes viewers, one already served by
    // the paused fan-out and one not yet (a removal shifts the room's viewer list).
    w.write_frame(p, None, 10, false, FRAME_BYTES);
    // The publisher's pacer lets the frame out over a few milliseconds; only the
    // publisher runs meanwhile, so the whole frame waits in the SFU for one fan-out.
    for _ in 0..40 {
        w.now += Duration::from_millis(1);
        let now = w.now;
        w.clients[p]
            .rtc
            .handle_input(Input::Timeout(now))
            .expect("timeout");
        w.poll_client(p);
    }
    let slices = w.sfu.stats().fanout_slices;
    let mut first_slice = Vec::new();
    while w.sfu.stats().fanout_slices == slices {
        let Some(t) = w.sfu.poll_transmit() else {
            break;
        };
        first_slice.push(t);
    }
    assert_eq!(
        w.sfu.stats().fanout_slices,
        slices + 1,
        "the fan-out paused"
    );
    let (early, late) = (viewers[1], viewers[VIEWERS - 2]);
    for v in [early, late] {
        let peer = w.clients[v].peer.expect("peer");
        w.sfu.remove_peer(w.now, peer).expect("remove");
    }
    for t in &first_slice {
        w.deliver(t);
    }
    w.advance(Duration::from_millis(33));
    frames(&mut w, p, 11..20);
    w.advance(Duration::from_millis(300));
    for &v in &viewers {
        let f = &w.clients[v].frames;
        if v == early || v == late {
            assert!(f.len() <= 11, "viewer {v} left but got {} frames", f.len());
            continue;
        }
        assert_eq!(f.len(), 20, "viewer {v} got {} frames", f.len());
        assert_in_order(f, v);
    }
}
