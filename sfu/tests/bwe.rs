//! Per-viewer bandwidth estimation: a viewer behind a thin link gets its video
//! paused (others untouched) and resumed from a keyframe when the link recovers.

mod common;

use std::time::Duration;

use common::World;
use edgerelay_sfu::SfuConfig;

#[test]
fn thin_viewer_is_paused_and_resumed_without_touching_others() {
    let mut w = World::new(SfuConfig {
        bwe: true,
        bwe_initial_bps: 3_000_000,
        // Bandwidth estimation lives on str0m's send path.
        direct_send: false,
        ..SfuConfig::default()
    });
    let p = w.publish("r");
    let good = w.view("r");
    let thin = w.view("r");
    w.connect_all();

    // About 2 Mbit/s: 8 KB frames at 30 fps, a keyframe every second.
    let mut frame = 0u32;
    let run = |w: &mut World, frame: &mut u32, secs: u32| {
        for _ in 0..secs * 30 {
            w.write_frame(p, None, *frame, (*frame).is_multiple_of(30), 8_000);
            w.advance(Duration::from_millis(33));
            *frame += 1;
        }
    };
    run(&mut w, &mut frame, 2);
    let thin_before = w.clients[thin].frames.len();
    assert!(
        thin_before > 30,
        "thin viewer got video while its link was fine"
    );

    // The thin viewer's link drops to 600 kbit/s.
    w.limit(thin, Some(600_000));
    run(&mut w, &mut frame, 8);
    assert!(
        w.sfu.stats().video_pauses >= 1,
        "video paused for the thin viewer: {:?}",
        w.sfu.stats()
    );
    let good_frames = w.clients[good].frames.len();
    assert_eq!(good_frames as u32, frame, "the good viewer got every frame");
    let thin_paused = w.clients[thin].frames.len();

    // The link recovers; probing finds the room and video resumes.
    w.limit(thin, None);
    run(&mut w, &mut frame, 15);
    assert!(
        w.sfu.stats().video_resumes >= 1,
        "video resumed: {:?}",
        w.sfu.stats()
    );
    let after = &w.clients[thin].frames[thin_paused..];
    assert!(
        after.len() > 30,
        "thin viewer gets video again ({} frames)",
        after.len()
    );
    assert!(after.iter().any(|f| f.key), "resumed on a keyframe");
    assert_eq!(w.clients[good].frames.len() as u32, frame);
}
