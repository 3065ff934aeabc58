//! Smoke run of `edgerelay loadtest` on loopback: the real `edgerelay edge` binary, the
//! built-in publisher (`edgerelay publish`, a separate process) and a swarm of 10
//! RTP-mode viewers for 5 s. Asserts that every viewer joined and received packets in
//! the measured phase and that the report carries the server figures. No timing
//! assertion: this is a benchmark tool, the figures depend on the machine.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::EdgeProcess;

/// Kills a child process when the test ends, pass or fail.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An edge on loopback with the smoke tokens and the config file `cfg`.
fn start_edge_with_config(cfg: &std::path::Path) -> EdgeProcess {
    start_edge_with(&["--config", cfg.to_str().expect("utf-8 path")])
}

/// The sum of the samples of the metric lines starting with `name` in `metrics`.
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn start_edge() -> EdgeProcess {
    start_edge_with(&[])
}

/// An edge on loopback with the smoke tokens and `extra` flags.
fn start_edge_with(extra: &[&str]) -> EdgeProcess {
    let mut args = vec![
        "--public-ip",
        "127.0.0.1",
        "--publisher-token",
        "smoke-pub",
        "--viewer-token",
        "smoke-view",
    ];
    args.extend_from_slice(extra);
    EdgeProcess::start(&args, false)
}

#[test]
fn loadtest_ten_viewers_all_receive() {
    let edge = start_edge();
    let http = edge.http();
    let edge_pid = edge.pid();
    let publisher = Proc(
        Command::new(env!("CARGO_BIN_EXE_edgerelay"))
            .args([
                "publish",
                "--whip",
                &format!("{http}/whip/smoke"),
                "--token",
                "smoke-pub",
                "--width",
                "320",
                "--height",
                "180",
                "--bitrate-kbps",
                "500",
                "--keyframe-interval-ms",
                "1000",
                "--seconds",
                "120",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("publisher starts"),
    );
    // Let the publisher connect and the edge cache a first keyframe.
    std::thread::sleep(Duration::from_secs(3));

    let out = run_loadtest(&[
        "--whep",
        &format!("{http}/whep/smoke"),
        "--token",
        "smoke-view",
        "--viewers",
        "10",
        "--join-rate",
        "20",
        "--seconds",
        "5",
        "--settle-seconds",
        "1",
        "--server-pid",
        &edge_pid.to_string(),
    ]);
    drop(publisher);
    drop(edge);
    let r = json_report(&out);

    assert_eq!(r["viewers"], 10);
    assert_eq!(r["join_failures"], 0, "{r}");
    assert_eq!(r["viewers_received_any"], 10, "{r}");
    assert_eq!(r["viewers_receiving_steady"], 10, "{r}");
    let per_viewer = &r["packets_per_viewer"];
    assert_eq!(per_viewer["n"], 10);
    assert!(
        per_viewer["min"].as_f64().is_some_and(|m| m > 0.0),
        "a viewer received nothing in the steady phase: {r}"
    );
    assert_eq!(r["join_ms_first_rtp"]["n"], 10, "{r}");
    assert_eq!(r["join_ms_first_keyframe"]["n"], 10, "{r}");
    // The server figures are present (values are machine-dependent).
    assert!(r["server_cpu_seconds"].is_number(), "{r}");
    assert!(r["us_per_pkt"].is_number(), "{r}");
    assert!(
        r["server_packets_out"].as_f64().is_some_and(|p| p > 0.0),
        "{r}"
    );
    assert!(r["rss_kb_after"].as_u64().is_some_and(|k| k > 0), "{r}");
}

#[test]
fn loadtest_spawned_edge_with_bench_source_measures_delay() {
    let r = spawned_run("delay", "5", &[]);
    assert_eq!(r["viewers_receiving_steady"], 5, "{r}");
    assert!(
        r["packets_per_viewer"]["min"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "{r}"
    );
    // The source stamps every frame; every viewer reads the stamps, and dates the
    // frame's last packet too (no sooner than its first).
    assert!(
        r["delay_ms"]["n"].as_u64().is_some_and(|n| n >= 5),
        "no delay samples: {r}"
    );
    assert!(
        r["frame_delay_ms"]["n"].as_u64().is_some_and(|n| n >= 5),
        "no frame delay samples: {r}"
    );
    assert!(
        r["frame_delay_ms"]["p50"].as_f64() >= r["delay_ms"]["p50"].as_f64(),
        "{r}"
    );
    assert!(
        r["source_packets_sent"].as_u64().is_some_and(|p| p > 0),
        "{r}"
    );
}

/// `--controller-last`: a placeholder holds the controller seat through the ramp and
/// gives it up for the last viewer, whose frame delay is then reported on its own
/// (one viewer's samples, not every viewer's).
#[test]
fn loadtest_controller_last_reports_the_controllers_own_delay() {
    let r = spawned_run("ctl", "4", &["--controller-last"]);
    assert_eq!(r["viewers_receiving_steady"], 4, "{r}");
    assert_eq!(r["controller_last"], true, "{r}");
    let all = r["frame_delay_ms"]["n"].as_u64().unwrap_or(0);
    let ctl = r["controller_frame_delay_ms"]["n"].as_u64().unwrap_or(0);
    assert!(ctl >= 10, "the last viewer is the controller: {r}");
    assert!(
        ctl * 2 < all,
        "one viewer's frames of four ({ctl} of {all}): {r}"
    );
}

/// Plain HTTP GET of `url` (`http://host:port/path`) on loopback; returns the body.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[test]
fn loadtest_relayed_viewers_receive_through_the_builtin_turn() {
    let dir = std::env::temp_dir().join(format!("loadtest_relay_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = dir.join("edge.toml");
    std::fs::write(
        &cfg,
        "[turn]\nenabled = true\n[turn.server]\nlisten_udp = [\"127.0.0.1:0\"]\n\
         listen_tcp = []\nrelay_ip = \"127.0.0.1\"\nrelay_port_min = 0\nrelay_port_max = 0\n",
    )
    .expect("write config");
    let edge = start_edge_with_config(&cfg);
    let http = edge.http();
    let cache = dir.join("source.loop");
    let out = run_loadtest(
        &[
            &[
                "--whep",
                &format!("{http}/whep/relay"),
                "--token",
                "smoke-view",
                "--relay",
                "udp",
                "--viewers",
                "4",
                "--seconds",
                "3",
                "--settle-seconds",
                "1",
                "--server-pid",
                &edge.pid().to_string(),
                "--source-whip",
                &format!("{http}/whip/relay"),
                "--source-token",
                "smoke-pub",
            ][..],
            &small_source("500", &cache),
        ]
        .concat(),
    );
    // The viewers deleted their allocations on the way out (Refresh, lifetime 0);
    // the gauge follows within the TURN thread's one-second sweep.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let metrics = http_get(&format!("{http}/metrics"));
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
    let r = json_report(&out);
    assert_eq!(r["relay"], "udp", "{r}");
    assert_eq!(r["join_failures"], 0, "{r}");
    assert_eq!(r["viewers_receiving_steady"], 4, "{r}");
    assert_eq!(r["turn_errors"], 0, "{r}");
    assert_eq!(r["viewers_keyframe_complete"], 4, "{r}");
    // The media really went through the TURN server: 4 allocations, and it relayed
    // at least as many packets to the viewers as they received in the steady phase.
    let counter = |name: &str| metric_sum(&metrics, name);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edgerelay_turn_allocations ")),
        "{metrics}"
    );
    assert_eq!(counter("edgerelay_turn_allocations "), 0.0, "{metrics}");
    assert_eq!(
        counter("edgerelay_turn_allocations_created_total"),
        4.0,
        "{metrics}"
    );
    let received = r["packets_received"].as_f64().unwrap_or(0.0);
    assert!(received > 0.0, "{r}");
    assert!(
        counter("edgerelay_turn_relayed_packets_total{direction=\"to_client\"}") >= received,
        "{metrics}"
    );
    // Once a viewer's channel to the SFU is bound, its media leaves from the media
    // thread itself (ChannelData from the TURN listener), not through the hand-off.
    let media_sends = counter("edgerelay_turn_media_sends_total");
    let handoff = counter("edgerelay_turn_handoff_out_total");
    eprintln!("media_sends={media_sends} handoff={handoff} received={received}");
    assert!(media_sends >= 0.9 * received, "{metrics}");
    assert!(handoff < 0.1 * media_sends, "{metrics}");
}

/// Runs `edgerelay loadtest` with `args` and `--json`, its log on the test's stderr.
/// The bench source's flags for a small (320x180) stream of `kbps`, encoded once
/// into `cache`.
fn small_source<'a>(kbps: &'a str, cache: &'a std::path::Path) -> [&'a str; 8] {
    [
        "--source-width",
        "320",
        "--source-height",
        "180",
        "--source-bitrate-kbps",
        kbps,
        "--source-cache",
        cache.to_str().expect("utf-8 path"),
    ]
}

/// The report of a 3 s loadtest of `viewers` against an edge it spawns itself, with
/// the small bench source (its loop cached under `tag` for the run) and `extra` flags.
fn spawned_run(tag: &str, viewers: &str, extra: &[&str]) -> serde_json::Value {
    let cache = std::env::temp_dir().join(format!("loadtest_{tag}_{}.loop", std::process::id()));
    let out = run_loadtest(
        &[
            &[
                "--spawn-edge",
                "--viewers",
                viewers,
                "--seconds",
                "3",
                "--settle-seconds",
                "1",
            ][..],
            extra,
            &small_source("500", &cache),
        ]
        .concat(),
    );
    let _ = std::fs::remove_file(&cache);
    json_report(&out)
}

fn run_loadtest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgerelay"))
        .arg("loadtest")
        .args(args)
        .arg("--json")
        .stderr(Stdio::inherit())
        .output()
        .expect("loadtest runs")
}

/// The loadtest's `--json` report: the last JSON line of a successful run.
fn json_report(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadtest failed: {stdout}");
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in: {stdout}"));
    serde_json::from_str(line).expect("one JSON object")
}

/// `media.gather_us`: a frame whose packets arrive spread out (a paced source, one
/// packet every ~2 ms) leaves to each viewer in one GSO run when its room holds
/// the frame until its last packet, and datagram by datagram when it does not. A
/// window shorter than the packets' spacing runs out at every packet: nothing is
/// gathered, and no packet waits longer than the window.
#[test]
fn an_edge_that_gathers_a_paced_frame_sends_it_in_gso_runs() {
    let dir = std::env::temp_dir().join(format!("loadtest_gather_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cache = dir.join("source.loop");
    // (gather_us, share of datagrams in GSO runs, frames gathered, holds run out)
    let mut seen = Vec::new();
    for gather_us in [0u64, 20_000, 1_000] {
        let cfg = dir.join(format!("edge-{gather_us}.toml"));
        std::fs::write(&cfg, format!("[media]\ngather_us = {gather_us}\n")).expect("config");
        let edge = start_edge_with_config(&cfg);
        let http = edge.http();
        // ~6 packets a frame, paced at 5 Mbit/s with no burst allowance: a frame's
        // packets arrive ~2 ms apart, over ~10 ms, inside a 20 ms gather (a
        // keyframe's do not: its wait runs out).
        let out = run_loadtest(
            &[
                &[
                    "--whep",
                    &format!("{http}/whep/gather"),
                    "--token",
                    "smoke-view",
                    "--viewers",
                    "3",
                    "--seconds",
                    "3",
                    "--settle-seconds",
                    "1",
                    "--source-whip",
                    &format!("{http}/whip/gather"),
                    "--source-token",
                    "smoke-pub",
                    "--source-pace-kbps",
                    "5000",
                    "--source-pace-burst-ms",
                    "0",
                ][..],
                &small_source("1500", &cache),
            ]
            .concat(),
        );
        let metrics = http_get(&format!("{http}/metrics"));
        drop(edge);
        let r = json_report(&out);
        assert_eq!(
            r["viewers_receiving_steady"], 3,
            "gather_us={gather_us}: {r}"
        );
        assert!(r["loss_pct"].as_f64().is_some_and(|l| l < 1.0), "{r}");
        let counter = |name: &str| metric_sum(&metrics, name);
        if counter("edgerelay_media_gso_threads ") < 1.0 {
            eprintln!("skipped: this kernel refuses UDP GSO on loopback");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let out_dgrams = counter("edgerelay_datagrams_out_total");
        assert!(out_dgrams > 0.0, "{metrics}");
        seen.push((
            gather_us,
            counter("edgerelay_media_gso_segments_total") / out_dgrams,
            counter("edgerelay_gather_frames_total"),
            counter("edgerelay_gather_expired_total"),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "(gather_us, share of datagrams in GSO runs, frames gathered, holds run out): {seen:?}"
    );
    let (plain, gathered, short) = (seen[0], seen[1], seen[2]);
    assert_eq!(
        plain.2 + plain.3,
        0.0,
        "no holding when it is off: {seen:?}"
    );
    // ~30 frames a second for ~4 s, nearly all of them gathered (a keyframe's
    // paced packets outlast the window: those holds run out).
    assert!(gathered.2 > 60.0, "{seen:?}");
    assert!(gathered.3 < gathered.2, "{seen:?}");
    // Here ~0.2 -> ~0.8 (a late source sends a few packets together, so the plain
    // share is not zero).
    assert!(
        gathered.1 > 0.6,
        "a gathered frame leaves in GSO runs: {seen:?}"
    );
    assert!(
        gathered.1 > plain.1 + 0.3,
        "gathering changes little: {seen:?}"
    );
    // 1 ms against ~2 ms between packets: the holds run out, a frame is rarely
    // whole in time, and the GSO share stays near the plain one.
    assert!(short.3 > 60.0, "{seen:?}");
    assert!(short.2 < short.3, "{seen:?}");
    assert!(short.1 < gathered.1 - 0.2, "{seen:?}");
}
