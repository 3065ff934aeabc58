//! End to end on loopback: `edgerelay edge` (the real binary) with our synthetic
//! publisher (WHIP) and two WHEP viewers in-process. Both viewers must decode video,
//! the controller's control message must reach the publisher and the spectator's
//! must not, and the publisher's own control messages must reach both viewers.

#![allow(dead_code)]

#[path = "../src/publisher/mod.rs"]
mod publisher;
#[path = "../src/whep_client.rs"]
mod whep_client;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use publisher::PublishArgs;
use whep_client::ViewOptions;

/// Kills the edge process when the test ends, pass or fail.
struct EdgeProcess {
    child: Child,
    http: String,
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_edge() -> EdgeProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgerelay"))
        .args([
            "edge",
            "--http-listen",
            "127.0.0.1:0",
            "--media-listen",
            "127.0.0.1:0",
            "--public-ip",
            "127.0.0.1",
            "--publisher-token",
            "publisher-token-e2e",
            "--viewer-token",
            "viewer-token-e2e",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("edge binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining stdout so the edge never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("EDGERELAY_READY ") {
                let http = rest
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("http="))
                    .map(str::to_owned);
                let _ = tx.send(http);
            }
        }
    });
    let mut edge = EdgeProcess {
        child,
        http: String::new(),
    };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(http)) => edge.http = http.trim_end_matches('/').to_owned(),
        other => panic!("edge did not print EDGERELAY_READY http=...: {other:?}"),
    }
    edge
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_edge_two_viewers_roles_and_control() {
    let edge = start_edge();
    let room = format!("{}/whip/e2e", edge.http);
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

    let whep = format!("{}/whep/e2e", edge.http);
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
