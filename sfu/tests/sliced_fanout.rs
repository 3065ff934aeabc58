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

#[test]
fn a_frame_that_comes_in_during_a_paused_fan_out_reaches_the_controller_first() {
    let (mut w, p, viewers) = world();
    let (ctl, last) = (viewers[0], viewers[VIEWERS - 1]);
    assert_eq!(w.clients[ctl].role, Some(edgerelay_sfu::Role::Controller));
    frames(&mut w, p, 0..10);
    // Frame 10 reaches the SFU whole; its fan-out to the 60 viewers pauses after the
    // first slice.
    w.write_frame(p, None, 10, false, FRAME_BYTES);
    for (src, dst, d) in w.take_rtp(p) {
        assert!(w.sfu.handle_datagram(w.now, src, dst, &d));
    }
    let mut sent = Vec::new();
    let slices = w.sfu.stats().fanout_slices;
    while w.sfu.stats().fanout_slices == slices {
        let Some(t) = w.sfu.poll_transmit() else {
            break;
        };
        sent.push(t);
    }
    assert!(w.sfu.fan_out_paused(), "the fan-out paused");
    // Frame 11 comes in now, before the driver takes the rest of frame 10.
    w.write_frame(p, None, 11, false, FRAME_BYTES);
    let rtp = w.take_rtp(p);
    for (src, dst, d) in &rtp {
        assert!(w.sfu.is_publisher_media(*src, *dst, d));
        assert!(w.sfu.handle_datagram(w.now, *src, *dst, d));
    }
    assert_eq!(
        w.sfu.stats().controller_early,
        rtp.len() as u64,
        "every packet of frame 11 went to the controller at once"
    );
    let from = sent.len();
    while let Some(t) = w.sfu.poll_transmit() {
        sent.push(t);
    }
    let is_rtp = |c: &[u8]| c.len() > 12 && c[0] >> 6 == 2 && !(192..=223).contains(&c[1]);
    let to = |addr| {
        sent[from..]
            .iter()
            .enumerate()
            .filter(move |(_, t)| t.destination == addr && is_rtp(&t.contents))
            .map(|(i, _)| i)
    };
    let ctl_last = to(w.clients[ctl].addr)
        .max()
        .expect("the controller got frame 11");
    let last_first = to(w.clients[last].addr)
        .min()
        .expect("the last viewer got frame 10");
    assert!(
        ctl_last < last_first,
        "the controller had frame 11 ({ctl_last}) before the last viewer had frame 10 ({last_first})"
    );
    for t in &sent {
        w.deliver(t);
    }
    w.advance(Duration::from_millis(33));
    frames(&mut w, p, 12..20);
    w.advance(Duration::from_millis(300));
    for &v in &viewers {
        let f = &w.clients[v].frames;
        assert_eq!(f.len(), 20, "viewer {v} got {} frames", f.len());
        assert_in_order(f, v);
    }
}
