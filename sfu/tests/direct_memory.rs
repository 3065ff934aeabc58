//! A viewer's memory is flat over a long (simulated) run, on either send path. Live
//! heap bytes are counted by this test binary's allocator (SFU and the in-memory
//! viewers together; the viewers' frame logs are emptied as the run goes).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::World;
use edgerelay_sfu::SfuConfig;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Streams `frames` frames; returns the frames the first viewer got (the clients'
/// frame logs are emptied as it goes, so they do not count as growth).
fn run(w: &mut World, p: usize, v: usize, from: u32, frames: u32) -> usize {
    let mut got = 0;
    for f in from..from + frames {
        w.write_frame(p, None, f, f % 60 == 0, 3000);
        w.advance(Duration::from_millis(33));
        if f % 30 == 0 {
            got += w.clients[v].frames.len();
            for c in &mut w.clients {
                c.frames.clear();
            }
        }
    }
    got + w.clients[v].frames.len()
}

#[test]
fn viewer_memory_is_flat_over_minutes() {
    for direct in [true, false] {
        let mut w = World::new(SfuConfig {
            direct_send: direct,
            bwe: false,
            ..SfuConfig::default()
        });
        let p = w.publish("r");
        let viewers: Vec<usize> = (0..4).map(|_| w.view("r")).collect();
        w.connect_all();
        let mut frames = run(&mut w, p, viewers[0], 0, 30 * 60);
        let at_1min = LIVE.load(Ordering::Relaxed);
        frames += run(&mut w, p, viewers[0], 30 * 60, 30 * 240);
        let at_5min = LIVE.load(Ordering::Relaxed);
        let per_viewer_kb = (at_5min - at_1min) as f64 / 1024.0 / viewers.len() as f64;
        eprintln!("direct={direct} frames={frames} growth 1->5 min: {per_viewer_kb:.1} KB/viewer");
        assert!(frames >= 30 * 300 - 5, "viewer got {frames} frames");
        // Caught on the direct path: str0m's transport-wide register filling with one
        // record per sync packet (~40 KB per viewer over these 4 minutes).
        assert!(
            per_viewer_kb < 4.0,
            "direct={direct}: {per_viewer_kb:.1} KB/viewer more after 5 minutes than after 1"
        );
    }
}
