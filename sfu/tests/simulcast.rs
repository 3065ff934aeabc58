//! Simulcast: each viewer gets the best layer its bandwidth estimate fits,
//! switching at keyframes with continuous sequence numbers.

mod common;

use std::time::Duration;

use common::World;
use edgerelay_sfu::SfuConfig;

#[test]
fn each_viewer_gets_the_layer_that_fits() {
    let mut w = World::new(SfuConfig {
        bwe: true,
        bwe_initial_bps: 3_000_000,
        ..SfuConfig::default()
    });
    let p = w.publish_simulcast("r", &["h", "l"]);
    let good = w.view("r");
    let thin = w.view("r");
    w.connect_all();

    let mut frame = 0u32;
    let run = |w: &mut World, frame: &mut u32, secs: u32| {
        for _ in 0..secs * 30 {
            let key = (*frame).is_multiple_of(30);
            w.write_frame(p, Some("h"), *frame, key, 8_000);
            w.write_frame(p, Some("l"), *frame, key, 1_200);
            w.advance(Duration::from_millis(33));
            *frame += 1;
        }
    };
    run(&mut w, &mut frame, 2);
    let big = |f: &common::Frame| f.len >= 7_000;
    assert!(w.clients[good].frames.iter().filter(|f| big(f)).count() > 30);

    w.limit(thin, Some(900_000));
    run(&mut w, &mut frame, 8);
    let thin_frames = &w.clients[thin].frames;
    let tail = &thin_frames[thin_frames.len().saturating_sub(30)..];
    assert!(
        tail.len() == 30 && !tail.iter().any(big),
        "thin viewer moved to the low layer: {:?}",
        tail.iter().map(|f| f.len).collect::<Vec<_>>()
    );
    assert_eq!(
        w.sfu.stats().video_pauses,
        0,
        "a fitting layer means no pause"
    );
    // Sequence numbers stay continuous across the layer switch.
    let switch = thin_frames
        .iter()
        .position(|f| !big(f))
        .expect("a low-layer frame");
    assert!(thin_frames[switch].key, "the switch happens at a keyframe");
    assert_eq!(
        thin_frames[switch].first_seq,
        thin_frames[switch - 1].last_seq + 1
    );
    let good_tail = &w.clients[good].frames[w.clients[good].frames.len() - 30..];
    assert!(
        good_tail.iter().all(big),
        "the good viewer keeps the high layer"
    );

    // The link recovers: back to the high layer.
    w.limit(thin, None);
    run(&mut w, &mut frame, 15);
    let thin_frames = &w.clients[thin].frames;
    let tail = &thin_frames[thin_frames.len() - 30..];
    assert!(
        tail.iter().all(big),
        "thin viewer back on the high layer: {:?}",
        tail.iter().map(|f| f.len).collect::<Vec<_>>()
    );
}
