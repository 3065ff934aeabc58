//! End to end on loopback: `edgerelay edge` (the real binary) with our synthetic
//! publisher (WHIP) and two WHEP viewers in-process. Both viewers must decode video,
//! the controller's control message must reach the publisher and the spectator's
//! must not, and the publisher's own control messages must reach both viewers.

#![allow(dead_code)]

#[path = "../src/publisher/mod.rs"]
mod publisher;
#[path = "../src/whep_client.rs"]
mod whep_client;

mod support;

use std::time::Duration;

use publisher::PublishArgs;
use support::{wait_until, EdgeProcess};
use whep_client::ViewOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_edge_two_viewers_roles_and_control() {
    let edge = EdgeProcess::start(
        &[
            "--public-ip",
            "127.0.0.1",
            "--publisher-token",
            "publisher-token-e2e",
            "--viewer-token",
            "viewer-token-e2e",
        ],
        true,
    );
    let http = edge.http();
    let room = format!("{http}/whip/e2e");
    let mut args = PublishArgs::new(room, Some("publisher-token-e2e".into()));
    args.width = 320;
    args.height = 240;
    args.fps = 15;
    args.bitrate_kbps = 400;
    args.audio = true;
    args.keyframe_interval_ms = 2000;
    args.control_tick_ms = 300;
    let publisher = publisher::start(args).await.expect("publisher starts");
    wait_until("publisher media", Duration::from_secs(15), || {
        publisher.stats().frames_sent >= 5
    })
    .await;

    let whep = format!("{http}/whep/e2e");
    let mut o1 = ViewOptions::new(&whep, Some("viewer-token-e2e".into()));
    o1.send_control = Some("{\"from\":\"controller\",\"n\":1}".into());
    let controller = whep_client::spawn(o1).await.expect("viewer 1");
    assert_eq!(controller.role(), Some("controller"));

    let mut o2 = ViewOptions::new(&whep, Some("viewer-token-e2e".into()));
    o2.send_control = Some("{\"from\":\"spectator\"}".into());
    let spectator = whep_client::spawn(o2).await.expect("viewer 2");
    assert_eq!(spectator.role(), Some("spectator"));

    wait_until("both viewers decoding", Duration::from_secs(15), || {
        controller.stats().frames_decoded >= 10 && spectator.stats().frames_decoded >= 10
    })
    .await;
    wait_until(
        "controller input at publisher",
        Duration::from_secs(10),
        || publisher.stats().input_messages >= 1,
    )
    .await;
    wait_until(
        "spectator sent its message",
        Duration::from_secs(10),
        || spectator.stats().control_messages_sent >= 1,
    )
    .await;
    // A second controller message after the spectator's: once it has arrived, the
    // spectator's (sent earlier) would have arrived too if the edge forwarded it.
    controller.send_control("{\"from\":\"controller\",\"n\":2}");
    wait_until("second controller message", Duration::from_secs(10), || {
        publisher.stats().input_messages >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        publisher.stats().input_messages,
        2,
        "only the controller's two messages reach the publisher"
    );

    wait_until(
        "publisher ticks at both viewers",
        Duration::from_secs(10),
        || {
            controller.stats().control_messages_received >= 1
                && spectator.stats().control_messages_received >= 1
        },
    )
    .await;

    let s1 = controller.stop().await;
    let s2 = spectator.stop().await;
    for s in [&s1, &s2] {
        assert_eq!(s.error, None, "{s:?}");
        assert!(s.got_video(true), "{s:?}");
        assert!(s.keyframes >= 1, "{s:?}");
        assert!(s.first_frame_keyframe, "viewer starts on a keyframe: {s:?}");
        assert_eq!(s.decoded_size, Some((320, 240)), "{s:?}");
        assert!(s.audio_frames > 0, "audio forwarded: {s:?}");
    }
    let p = publisher.stop().await.expect("publisher stops cleanly");
    assert_eq!(p.input_messages, 2, "{p:?}");
    for s in [&s1, &s2] {
        // Nothing invented, nothing duplicated: at most what the publisher sent
        // (new viewers may start from the edge's cached GOP, so up to all of it).
        assert!(s.video_frames <= p.frames_sent, "{s:?} vs {p:?}");
        assert!(s.video_bytes <= p.video_bytes_sent, "{s:?} vs {p:?}");
    }
    drop(edge);
}
