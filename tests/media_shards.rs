//! Two media threads (`--media-threads 2`): rooms hash to different shards, each
//! shard has its own UDP port, and video flows in rooms on both. Also checks that
//! the shard-tagged session ids route DELETE to the right shard.

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

/// The same hash the edge uses (FNV-1a), to pick rooms on different shards.
fn shard_of(room: &str, n: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in room.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h % n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_both_media_threads_get_video() {
    let edge = EdgeProcess::start(
        &[
            "--media-threads",
            "2",
            "--publisher-token",
            "publisher-token-shards",
            "--viewer-token",
            "viewer-token-shards",
        ],
        true,
    );
    let http = edge.http();
    let shards: Vec<&str> = edge
        .field("media_shards")
        .expect("media_shards= in the ready line")
        .split(',')
        .collect();
    assert_eq!(shards.len(), 2, "{}", edge.ready);
    assert_ne!(shards[0], shards[1], "each shard has its own port");

    let room0 = (0..)
        .map(|i| format!("room-{i}"))
        .find(|r| shard_of(r, 2) == 0)
        .expect("a room on shard 0");
    let room1 = (0..)
        .map(|i| format!("room-{i}"))
        .find(|r| shard_of(r, 2) == 1)
        .expect("a room on shard 1");

    let mut publishers = Vec::new();
    let mut viewers = Vec::new();
    for room in [&room0, &room1] {
        let mut args = PublishArgs::new(
            format!("{http}/whip/{room}"),
            Some("publisher-token-shards".into()),
        );
        args.width = 320;
        args.height = 240;
        args.fps = 15;
        args.bitrate_kbps = 300;
        args.control_tick_ms = 0;
        publishers.push(publisher::start(args).await.expect("publisher starts"));
    }
    for p in &publishers {
        wait_until("publisher media", Duration::from_secs(15), || {
            p.stats().frames_sent >= 5
        })
        .await;
    }
    for room in [&room0, &room1] {
        let o = ViewOptions::new(
            format!("{http}/whep/{room}"),
            Some("viewer-token-shards".into()),
        );
        let v = whep_client::spawn(o).await.expect("viewer");
        assert_eq!(v.role(), Some("controller"), "first viewer of its own room");
        viewers.push(v);
    }
    for v in &viewers {
        wait_until("viewer decoding", Duration::from_secs(15), || {
            v.stats().frames_decoded >= 10
        })
        .await;
    }
    // The rooms list covers both shards.
    let rooms: serde_json::Value = reqwest::get(format!("{http}/api/rooms"))
        .await
        .expect("rooms")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = rooms
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&room0.as_str()) && names.contains(&room1.as_str()),
        "{rooms}"
    );

    // Stopping sends DELETE on each session's Location: both shards must find their peer.
    for v in viewers {
        let s = v.stop().await;
        assert!(s.got_video(true), "{s:?}");
        assert_eq!(s.error, None, "{s:?}");
    }
    for p in publishers {
        p.stop().await.expect("publisher DELETE accepted");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let rooms: serde_json::Value = reqwest::get(format!("{http}/api/rooms"))
        .await
        .expect("rooms")
        .json()
        .await
        .expect("json");
    assert_eq!(
        rooms,
        serde_json::json!([]),
        "every session deleted on its shard"
    );
}
