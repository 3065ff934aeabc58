//! The SFU core with real str0m peers in memory: fan-out, GOP cache,
//! keyframe merging, roles, publisher reconnect and bad input.

mod common;

use std::time::Duration;

use common::{assert_in_order, World};
use edgerelay_sfu::{Role, RoleRequest, SfuConfig, SfuError};
use str0m::media::KeyframeRequestKind;

fn world() -> World {
    World::new(SfuConfig {
        bwe: false,
        ..SfuConfig::default()
    })
}

#[test]
fn one_publisher_twenty_viewers_every_frame() {
    let mut w = world();
    let p = w.publish("r");
    let viewers: Vec<usize> = (0..20).map(|_| w.view("r")).collect();
    w.connect_all();
    w.stream(p, 0, 90, 30);
    w.advance(Duration::from_millis(300));
    for &v in &viewers {
        let f = &w.clients[v].frames;
        assert_eq!(f.len(), 90, "viewer {v} got {} frames", f.len());
        assert!(f[0].key, "first frame is a keyframe");
        assert_eq!(f.iter().filter(|x| x.key).count(), 3);
        // Every frame arrived whole and in order.
        assert_in_order(f, v);
    }
    assert_eq!(w.clients[viewers[0]].role, Some(Role::Controller));
    assert!(viewers[1..]
        .iter()
        .all(|v| w.clients[*v].role == Some(Role::Spectator)));
    assert_eq!(w.sfu.viewer_count(), 20);
}

#[test]
fn mid_gop_join_is_served_from_cache_without_upstream_request() {
    let mut w = world();
    let p = w.publish("r");
    let a = w.view("r");
    w.connect_all();
    // One keyframe at frame 0, then P-frames only: a long GOP.
    w.stream(p, 0, 45, 10_000);
    let upstream_before = w.sfu.stats().keyframe_requests_upstream;
    let pub_requests_before = w.clients[p].keyframe_requests;

    let b = w.view("r");
    w.connect_all();
    w.advance(Duration::from_millis(200));
    let got = &w.clients[b].frames;
    assert!(
        got.len() >= 45,
        "late viewer got {} cached frames",
        got.len()
    );
    assert!(got[0].key, "late viewer starts at the cached keyframe");
    // Cached frames are squeezed to the live edge: the decodable picture comes at once.
    let span = got[44].time.as_seconds() - got[0].time.as_seconds();
    assert!(span < 0.01, "cached frames squeezed, span {span}s");

    w.stream(p, 45, 30, 10_000);
    w.advance(Duration::from_millis(200));
    assert_eq!(w.clients[b].frames.len(), 75);
    assert_eq!(w.clients[a].frames.len(), 75);
    assert_eq!(w.sfu.stats().keyframe_requests_upstream, upstream_before);
    assert_eq!(w.clients[p].keyframe_requests, pub_requests_before);
    assert!(w.sfu.stats().viewer_starts_from_cache >= 1);
}

#[test]
fn twenty_plis_within_100ms_make_one_upstream_request() {
    let mut w = world();
    let p = w.publish("r");
    let viewers: Vec<usize> = (0..20).map(|_| w.view("r")).collect();
    w.connect_all();
    w.stream(p, 0, 100, 10_000); // > cache grace, so requests are not answered by the cache
    let before = w.clients[p].keyframe_requests;
    let upstream_before = w.sfu.stats().keyframe_requests_upstream;
    for (i, &v) in viewers.iter().enumerate() {
        let mid = w.clients[v].video_mid.expect("mid");
        let mut api = w.clients[v].rtc.direct_api();
        let rx = api.stream_rx_by_mid(mid, None).expect("rx stream");
        rx.request_keyframe(KeyframeRequestKind::Pli);
        if i % 4 == 0 {
            w.advance(Duration::from_millis(20));
        }
    }
    w.advance(Duration::from_millis(30));
    assert_eq!(
        w.sfu.stats().keyframe_requests_upstream - upstream_before,
        1
    );
    assert_eq!(w.clients[p].keyframe_requests - before, 1);
    assert!(w.sfu.stats().keyframe_requests_from_viewers >= 20);
    // After the throttle window a new request goes through again.
    w.advance(Duration::from_millis(400));
    let mid = w.clients[viewers[0]].video_mid.expect("mid");
    w.clients[viewers[0]]
        .rtc
        .direct_api()
        .stream_rx_by_mid(mid, None)
        .expect("rx")
        .request_keyframe(KeyframeRequestKind::Pli);
    w.advance(Duration::from_millis(50));
    assert_eq!(w.clients[p].keyframe_requests - before, 2);
}

#[test]
fn controller_input_reaches_publisher_spectator_input_does_not() {
    let mut w = world();
    let p = w.publish("r");
    let ctl = w.view("r");
    let spec = w.view("r");
    w.connect_all();
    assert!(w.send_message(ctl, "tap 10 20"));
    assert!(w.send_message(spec, "tap 99 99"));
    w.advance(Duration::from_millis(100));
    assert_eq!(w.clients[p].messages, vec!["tap 10 20".to_string()]);
    assert_eq!(w.sfu.stats().input_dropped_spectator, 1);
    assert!(w.send_message(p, "vibrate"));
    w.advance(Duration::from_millis(100));
    assert_eq!(w.clients[ctl].messages, vec!["vibrate".to_string()]);
    assert_eq!(w.clients[spec].messages, vec!["vibrate".to_string()]);
}

#[test]
fn viewers_survive_publisher_reconnect_with_continuous_numbering() {
    let mut w = world();
    let p1 = w.publish("r");
    let v = w.view("r");
    w.connect_all();
    w.stream(p1, 0, 30, 30);
    w.advance(Duration::from_millis(100));
    assert_eq!(w.clients[v].frames.len(), 30);

    let peer = w.clients[p1].peer.expect("peer");
    w.sfu.remove_peer(w.now, peer).expect("removed");
    w.blackhole.push(p1);
    w.advance(Duration::from_millis(500));
    assert_eq!(
        w.sfu.viewer_count(),
        1,
        "viewer stays while the publisher is away"
    );

    let p2 = w.publish("r");
    w.connect_all_except(&[p1]);
    w.stream(p2, 0, 30, 30);
    w.advance(Duration::from_millis(200));
    let f = &w.clients[v].frames;
    assert_eq!(f.len(), 60, "viewer resumed with the new publisher");
    assert!(f[30].key);
    assert_eq!(f[30].first_seq, f[29].last_seq + 1, "sequence continues");
    assert!(
        f[30].time.as_seconds() > f[29].time.as_seconds(),
        "time moves forward"
    );
}

#[test]
fn signalling_errors_are_specific_and_harmless() {
    let mut w = world();
    let p = w.publish("r");
    let v = w.view("r");
    w.connect_all();
    let now = w.now;
    assert!(matches!(
        w.sfu.publish(now, "r2", "this is not sdp"),
        Err(SfuError::BadSdp(_))
    ));
    assert!(matches!(
        w.sfu.publish(now, "r2", ""),
        Err(SfuError::BadSdp(_))
    ));
    assert_eq!(
        w.sfu.view(now, "nope", "v=0", RoleRequest::Auto).err(),
        Some(SfuError::RoomNotFound("nope".into()))
    );
    // A second publisher for a busy room.
    let offer = {
        let mut rtc = str0m::Rtc::new(now);
        let mut api = rtc.sdp_api();
        api.add_media(
            str0m::media::MediaKind::Video,
            str0m::media::Direction::SendOnly,
            None,
            None,
            None,
        );
        api.apply().expect("offer").0.to_sdp_string()
    };
    assert_eq!(
        w.sfu.publish(now, "r", &offer).err(),
        Some(SfuError::PublisherBusy("r".into()))
    );
    assert_eq!(
        w.sfu.view(now, "r", &offer, RoleRequest::Controller).err(),
        Some(SfuError::ControllerTaken("r".into())),
    );
    // Garbage datagrams from a known and an unknown address.
    let src = w.clients[v].addr;
    let dst = w.sfu_addr;
    for n in 0..64usize {
        let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
        w.sfu.handle_datagram(now, src, dst, &junk);
        w.sfu
            .handle_datagram(now, "127.9.9.9:1".parse().expect("addr"), dst, &junk);
    }
    // A STUN-looking datagram with a truncated attribute.
    let mut stun = vec![0u8, 1, 0, 8, 0x21, 0x12, 0xA4, 0x42];
    stun.extend_from_slice(&[1; 12]);
    stun.extend_from_slice(&[0, 6, 0, 200, b'a', b'b', b'c', b'd']);
    w.sfu.handle_datagram(now, src, dst, &stun);
    assert!(w.sfu.stats().dropped_unknown_source > 0);
    w.stream(p, 0, 30, 30);
    w.advance(Duration::from_millis(100));
    assert_eq!(
        w.clients[v].frames.len(),
        30,
        "the running room is unharmed"
    );
}

#[test]
fn single_section_offer_without_bundle_is_accepted() {
    let mut w = world();
    let now = w.now;
    let mut rtc = str0m::Rtc::new(now);
    let mut api = rtc.sdp_api();
    api.add_media(
        str0m::media::MediaKind::Video,
        str0m::media::Direction::SendOnly,
        None,
        None,
        None,
    );
    let sdp = api.apply().expect("offer").0.to_sdp_string();
    let unbundled: String = sdp
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("a=group:BUNDLE"))
        .collect();
    assert!(!unbundled.contains("a=group"));
    let j = w.sfu.publish(now, "solo", &unbundled).expect("accepted");
    assert!(j.sdp.contains("a=group:BUNDLE"));
}

#[test]
fn long_gop_of_big_frames_is_replayed_whole_and_in_order() {
    // str0m's send path with bandwidth estimation: the pacer drains the replay, which
    // the SFU feeds to str0m a slice at a time.
    long_gop_replay(SfuConfig {
        direct_send: false,
        ..SfuConfig::default()
    });
}

#[test]
fn long_gop_replay_without_bwe_is_whole_and_in_order() {
    // Unpaced: str0m's next timeout is the next RTCP report, far ahead; the replay must
    // not tick str0m's clock forward to it (timeouts before it would then be ignored).
    long_gop_replay(SfuConfig {
        bwe: false,
        direct_send: false,
        ..SfuConfig::default()
    });
}

fn long_gop_replay(cfg: SfuConfig) {
    let mut w = World::new(cfg);
    let p = w.publish("r");
    let a = w.view("r");
    w.connect_all();
    // 40 frames of ~6 KB (several packets each), one keyframe: ~200 cached packets,
    // several times the SFU's replay slice.
    for f in 0..40 {
        w.write_frame(p, None, f, f == 0, 6000);
        w.advance(Duration::from_millis(33));
    }
    let replayed_before = w.sfu.stats().packets_replayed;
    let slices_before = w.sfu.stats().replay_slices;
    let b = w.view("r");
    w.connect_all();
    w.advance(Duration::from_millis(600));
    let replayed = w.sfu.stats().packets_replayed - replayed_before;
    assert!(replayed >= 160, "replayed {replayed} packets");
    // Fed as the queue drained, not all at once.
    let slices = w.sfu.stats().replay_slices - slices_before;
    assert!(slices >= 4, "replay written in {slices} slices");
    {
        let got = &w.clients[b].frames;
        assert_eq!(
            got.len(),
            40,
            "late viewer got {} of 40 cached frames",
            got.len()
        );
        assert!(got[0].key);
        let span = got[39].time.as_seconds() - got[0].time.as_seconds();
        assert!(span < 0.01, "cached frames squeezed, span {span}s");
    }
    for f in 40..60 {
        w.write_frame(p, None, f, false, 6000);
        w.advance(Duration::from_millis(33));
    }
    w.advance(Duration::from_millis(300));
    for v in [a, b] {
        let got = &w.clients[v].frames;
        assert_eq!(got.len(), 60, "viewer {v} got {} frames", got.len());
        assert_in_order(got, v);
    }
}

#[test]
fn sessions_share_one_dtls_certificate() {
    // A key pair and a signature per join would cost the media thread in a join storm;
    // every session presents the same certificate (its fingerprint is in each SDP).
    let mut w = world();
    w.publish("r");
    let fingerprint = |sdp: &str| {
        sdp.lines()
            .find(|l| l.starts_with("a=fingerprint:"))
            .map(str::to_string)
            .expect("fingerprint in SDP")
    };
    let now = w.now;
    let a = w
        .sfu
        .view_offer(now, "r", RoleRequest::Auto, false)
        .expect("offer a");
    let b = w
        .sfu
        .view_offer(now, "r", RoleRequest::Auto, false)
        .expect("offer b");
    assert_eq!(fingerprint(&a.sdp), fingerprint(&b.sdp));
}

#[test]
fn a_controller_that_joins_last_gets_each_frame_first() {
    // The controller's input-to-photon latency is the session's: it is served before
    // the spectators in every fan-out, wherever it joined. Here the first controller
    // leaves and a viewer joining after every spectator takes the seat.
    let mut w = world();
    let p = w.publish("r");
    let first = w.view("r");
    let spectators: Vec<usize> = (0..5).map(|_| w.view("r")).collect();
    w.connect_all();
    let peer = w.clients[first].peer.expect("peer");
    w.sfu.remove_peer(w.now, peer).expect("removed");
    let ctl = w.view("r");
    assert_eq!(w.clients[ctl].role, Some(Role::Controller));
    w.blackhole.push(first);
    w.connect_all_except(&[first]);
    w.stream(p, 0, 30, 30);
    w.write_frame(p, None, 30, false, 6000);
    let rtp = w.take_rtp(p);
    assert!(rtp.len() >= 4, "a frame of several packets: {}", rtp.len());
    for (src, dst, d) in &rtp {
        assert!(w.sfu.handle_datagram(w.now, *src, *dst, d));
    }
    // The frame's datagrams in the order the SFU emits them (RTP only: not RTCP,
    // whose second byte is its packet type, 192-223; nor STUN or DTLS).
    let mut order = Vec::new();
    while let Some(t) = w.sfu.poll_transmit() {
        let c = &t.contents;
        if c.len() > 12 && (128..=191).contains(&c[0]) && !(192..=223).contains(&c[1]) {
            order.push(t.destination);
        }
        w.deliver(&t);
    }
    let n = rtp.len();
    assert_eq!(
        order.len(),
        n * 6,
        "the frame to the controller and 5 spectators"
    );
    let ctl_addr = w.clients[ctl].addr;
    assert!(
        order[..n].iter().all(|a| *a == ctl_addr),
        "the controller's copies go first: {:?}",
        order.iter().position(|a| *a == ctl_addr)
    );
    for &s in &spectators {
        let got = &w.clients[s].frames;
        assert!(!got.is_empty(), "spectator {s} is served too");
        assert_in_order(got, s);
    }
    w.advance(Duration::from_millis(100));
    assert_eq!(
        w.clients[ctl].frames.last().map(|f| f.time),
        w.clients[spectators[0]].frames.last().map(|f| f.time),
        "the controller has the frame the spectators have"
    );
}
