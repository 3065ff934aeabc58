//! `Sfu::frame_open` tells the driver that the publisher packets waiting for the
//! fan-out stop inside a video frame, so that it may take in the rest of the frame
//! first (the edge's `media.gather_us`): true after each packet of a frame but the
//! last, false once the packet with the RTP marker bit is in, and false again once
//! the fan-out has taken the packets.

mod common;

use std::time::Duration;

use common::World;
use edgerelay_sfu::SfuConfig;

#[test]
fn open_until_the_frames_last_packet_is_in() {
    let mut w = World::new(SfuConfig {
        direct_send: true,
        ..SfuConfig::default()
    });
    let p = w.publish("r");
    let v = w.view("r");
    w.connect_all();
    w.stream(p, 0, 3, 30);
    let before = w.clients[v].frames.len();
    assert!(before > 0, "the viewer gets the first frames");
    assert!(!w.sfu.frame_open(), "nothing waits between frames");

    // One frame of ~8 kB: several RTP packets. Take the publisher's datagrams
    // without handing them over yet.
    w.write_frame(p, None, 3, false, 8000);
    let rtp = w.take_rtp(p);
    let now = w.now;
    assert!(
        rtp.len() >= 5,
        "a frame of ~8 kB is several packets: {}",
        rtp.len()
    );
    let (last, rest) = rtp.split_last().expect("packets");
    for (i, (src, dst, d)) in rest.iter().enumerate() {
        w.sfu.handle_datagram(now, *src, *dst, d);
        assert!(w.sfu.frame_open(), "open after packet {i} of {}", rtp.len());
    }
    let (src, dst, d) = last;
    w.sfu.handle_datagram(now, *src, *dst, d);
    assert!(!w.sfu.frame_open(), "closed once the marked packet is in");

    // The fan-out takes them: nothing waits, and the viewer gets the frame.
    w.settle();
    assert!(!w.sfu.frame_open());
    w.advance(Duration::from_millis(50));
    assert_eq!(
        w.clients[v].frames.len(),
        before + 1,
        "the viewer gets the frame"
    );
}
