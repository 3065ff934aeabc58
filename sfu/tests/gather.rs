//! A room holds a video frame's packets until the frame is whole
//! (`SfuConfig::gather`), so each viewer gets the frame in one send: nothing of
//! the frame leaves before its last packet (the RTP marker) is in; the deadline
//! releases a frame whose rest is late; a packet of the next frame releases one
//! whose marker never came; a zero window holds nothing. The driver learns each
//! packet's fan-out delay from `take_departed`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::World;
use edgerelay_sfu::SfuConfig;

type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

const FRAME_BYTES: usize = 8000;

/// A publisher and a viewer in room "r", the first frames through, and the next
/// frame's RTP datagrams taken from the publisher without handing them over.
fn world(gather: Duration) -> (World, usize, Vec<Datagram>) {
    let mut w = World::new(SfuConfig {
        direct_send: true,
        gather,
        ..SfuConfig::default()
    });
    let p = w.publish("r");
    let v = w.view("r");
    w.connect_all();
    w.stream(p, 0, 10, 30);
    assert!(!w.clients[v].frames.is_empty(), "the first frames arrive");
    w.write_frame(p, None, 10, false, FRAME_BYTES);
    let rtp = w.take_rtp(p);
    assert!(
        rtp.len() >= 5,
        "a frame of 8 kB is several packets: {}",
        rtp.len()
    );
    (w, v, rtp)
}

fn hand_in(w: &mut World, rtp: &[Datagram]) {
    for (src, dst, d) in rtp {
        assert!(w.sfu.handle_datagram(w.now, *src, *dst, d));
    }
    w.settle();
}

#[test]
fn nothing_of_a_frame_leaves_before_its_last_packet() {
    let (mut w, v, rtp) = world(Duration::from_millis(20));
    let (sent, frames, gathered) = (
        w.sfu.stats().direct_out,
        w.clients[v].frames.len(),
        w.sfu.stats().frames_gathered,
    );
    let (last, rest) = rtp.split_last().expect("packets");
    hand_in(&mut w, rest);
    assert_eq!(w.sfu.stats().direct_out, sent, "held");
    assert!(w
        .sfu
        .poll_timeout()
        .is_some_and(|t| t <= w.now + Duration::from_millis(20)));
    hand_in(&mut w, std::slice::from_ref(last));
    assert_eq!(
        w.sfu.stats().direct_out,
        sent + rtp.len() as u64,
        "the whole frame, at once"
    );
    assert_eq!(w.sfu.stats().frames_gathered, gathered + 1);
    w.advance(Duration::from_millis(30));
    assert_eq!(w.clients[v].frames.len(), frames + 1, "and it decodes");
    assert_eq!(w.sfu.stats().gather_expired, 0);
}

#[test]
fn the_deadline_releases_a_frame_whose_rest_is_late() {
    let (mut w, v, rtp) = world(Duration::from_millis(20));
    let sent = w.sfu.stats().direct_out;
    let frames = w.clients[v].frames.len();
    let half = rtp.len() / 2;
    hand_in(&mut w, &rtp[..half]);
    let deadline = w.sfu.poll_timeout().expect("a deadline");
    assert!(deadline <= w.now + Duration::from_millis(20));
    w.advance(Duration::from_millis(10));
    assert_eq!(w.sfu.stats().direct_out, sent, "still held at 10 ms");
    w.advance(Duration::from_millis(11));
    assert_eq!(
        w.sfu.stats().direct_out,
        sent + half as u64,
        "released at the deadline"
    );
    assert_eq!(w.sfu.stats().gather_expired, 1);
    // The rest comes late: a new hold, released by the marker.
    hand_in(&mut w, &rtp[half..]);
    assert_eq!(w.sfu.stats().direct_out, sent + rtp.len() as u64);
    w.advance(Duration::from_millis(30));
    assert_eq!(w.clients[v].frames.len(), frames + 1, "the frame decodes");
}

#[test]
fn a_frame_without_its_marker_is_released_by_the_next_frame() {
    let (mut w, v, rtp) = world(Duration::from_millis(20));
    let p = 0;
    let sent = w.sfu.stats().direct_out;
    // The marked packet is late (str0m's receiver may recover it later).
    let (_, rest) = rtp.split_last().expect("packets");
    hand_in(&mut w, rest);
    assert_eq!(w.sfu.stats().direct_out, sent);
    w.write_frame(p, None, 11, false, FRAME_BYTES);
    let next = w.take_rtp(p);
    hand_in(&mut w, &next[..1]);
    assert_eq!(w.sfu.stats().gather_cut, 1);
    let out = w.sfu.stats().direct_out;
    assert!(
        out > sent + rest.len() as u64,
        "the broken frame and the next frame's first packet: {} of {}",
        out - sent,
        rest.len() + 1
    );
    // Holding is off for a while: the next frame's packets pass one by one.
    hand_in(&mut w, &next[1..2]);
    assert_eq!(w.sfu.stats().direct_out, out + 1);
    hand_in(&mut w, &next[2..]);
    w.advance(Duration::from_millis(30));
    // `write_frame` fills a frame with its number (mod 251) | 1.
    let tag = 11u8 | 1;
    assert!(
        w.clients[v].frames.iter().any(|f| f.payload_tag == tag),
        "the next frame decodes"
    );
}

#[test]
fn a_zero_window_holds_nothing() {
    let (mut w, _, rtp) = world(Duration::ZERO);
    let sent = w.sfu.stats().direct_out;
    hand_in(&mut w, &rtp[..1]);
    assert_eq!(w.sfu.stats().direct_out, sent + 1);
    assert_eq!(w.sfu.stats().frames_gathered, 0);
}

#[test]
fn departed_packets_count_their_delay_from_the_drivers_stamp() {
    let (mut w, _, rtp) = world(Duration::from_millis(20));
    let _ = w.sfu.take_departed().count();
    let stamp = w.now - Duration::from_millis(2);
    w.sfu.arrived_at(stamp);
    let (last, rest) = rtp.split_last().expect("packets");
    hand_in(&mut w, rest);
    assert_eq!(
        w.sfu.take_departed().count(),
        0,
        "held packets have not left"
    );
    w.now += Duration::from_millis(5);
    let later = w.now;
    w.sfu.arrived_at(later);
    hand_in(&mut w, std::slice::from_ref(last));
    let runs: Vec<_> = w.sfu.take_departed().collect();
    assert_eq!(
        runs,
        vec![(stamp, rest.len() as u32), (later, 1)],
        "each packet with its own arrival"
    );
}

/// Holds are per room: a frame one room holds does not keep another room's
/// frame, on the same core, from leaving.
#[test]
fn one_rooms_hold_does_not_delay_another_room() {
    let mut w = World::new(SfuConfig {
        direct_send: true,
        gather: Duration::from_millis(20),
        ..SfuConfig::default()
    });
    let pa = w.publish("a");
    let va = w.view("a");
    let pb = w.publish("b");
    let vb = w.view("b");
    w.connect_all();
    for f in 0..10 {
        w.write_frame(pa, None, f, f == 0, 0);
        w.write_frame(pb, None, f, f == 0, 0);
        w.advance(Duration::from_millis(33));
    }
    assert!(!w.clients[va].frames.is_empty() && !w.clients[vb].frames.is_empty());
    w.write_frame(pa, None, 10, false, FRAME_BYTES);
    let a = w.take_rtp(pa);
    w.write_frame(pb, None, 10, false, FRAME_BYTES);
    let b = w.take_rtp(pb);
    let sent = w.sfu.stats().direct_out;
    let (before_a, before_b) = (w.clients[va].frames.len(), w.clients[vb].frames.len());
    // Room a's frame without its last packet, then room b's whole frame.
    hand_in(&mut w, &a[..a.len() - 1]);
    hand_in(&mut w, &b);
    assert_eq!(
        w.sfu.stats().direct_out,
        sent + b.len() as u64,
        "b's frame left; a's is held"
    );
    hand_in(&mut w, &a[a.len() - 1..]);
    assert_eq!(w.sfu.stats().direct_out, sent + (a.len() + b.len()) as u64);
    w.advance(Duration::from_millis(30));
    assert_eq!(w.clients[va].frames.len(), before_a + 1);
    assert_eq!(w.clients[vb].frames.len(), before_b + 1);
}

/// A simulcast publisher interleaves its layers' packets: each layer's frame is
/// held on its own until its own last packet, and no layer's packet cuts another's
/// hold.
#[test]
fn a_simulcast_publishers_layers_are_held_each_on_its_own() {
    let mut w = World::new(SfuConfig {
        gather: Duration::from_millis(20),
        ..SfuConfig::default()
    });
    let p = w.publish_simulcast("r", &["h", "l"]);
    let v = w.view("r");
    w.connect_all();
    for f in 0..30 {
        w.write_frame(p, Some("h"), f, f == 0, 8_000);
        w.write_frame(p, Some("l"), f, f == 0, 3_000);
        w.advance(Duration::from_millis(33));
    }
    assert!(
        !w.clients[v].frames.is_empty(),
        "the viewer decodes a layer"
    );
    // Each layer's frame, taken from the publisher (its pacer may need a few ms).
    let take = |w: &mut World, rid: &str, bytes: usize| {
        w.write_frame(p, Some(rid), 30, false, bytes);
        let mut rtp = Vec::new();
        for _ in 0..50 {
            rtp.extend(w.take_rtp(p));
            if rtp.last().is_some_and(|d: &Datagram| d.2[1] & 0x80 != 0) {
                break;
            }
        }
        rtp
    };
    let h = take(&mut w, "h", 8_000);
    let l = take(&mut w, "l", 3_000);
    assert!(
        h.len() >= 3 && l.len() >= 2,
        "{} and {} packets",
        h.len(),
        l.len()
    );
    let (sent, gathered) = (w.sfu.stats().rtp_out, w.sfu.stats().frames_gathered);
    let mut interleaved = Vec::new();
    for i in 0..h.len().max(l.len()) - 1 {
        interleaved.extend(h.get(i).filter(|_| i + 1 < h.len()).cloned());
        interleaved.extend(l.get(i).filter(|_| i + 1 < l.len()).cloned());
    }
    hand_in(&mut w, &interleaved);
    assert_eq!(w.sfu.stats().gather_cut, 0, "no layer cut the other's hold");
    assert_eq!(w.sfu.stats().rtp_out, sent, "both frames held");
    hand_in(&mut w, &[h[h.len() - 1].clone(), l[l.len() - 1].clone()]);
    assert_eq!(w.sfu.stats().frames_gathered, gathered + 2);
    assert!(w.sfu.stats().rtp_out > sent, "the viewer's layer left");
    assert_eq!(w.sfu.stats().gather_cut, 0);
}
