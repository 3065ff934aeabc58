//! Load generator: a swarm of lightweight str0m viewers against a WHEP endpoint
//! (edgerelay) or a Janus streaming mountpoint, reporting join time, loss, one-way
//! delay, and the server's CPU per forwarded packet and memory per viewer.
//!
//! Phases: (optional) start the bench source and let it connect; ramp viewers up at
//! `--join-rate`; wait until they receive and settle; the *steady phase* of
//! `--seconds`, over which packets, loss, delay and server CPU are measured; teardown.
//! See docs/BENCHMARKS.md for the method.

mod gro;
mod h264;
mod pacer;
mod procstat;
mod signal;
mod source;
mod swarm;
mod turn_client;

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};

use signal::{Janus, Teardown};
use swarm::{SwarmShared, ViewerCounters, Worker, NONE};

/// Arguments of `edgerelay loadtest`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// WHEP endpoint, e.g. http://127.0.0.1:8080/whep/demo
    #[arg(long)]
    pub whep: Option<String>,
    /// Bearer token for the WHEP endpoint.
    #[arg(long)]
    pub token: Option<String>,
    /// Janus HTTP API base URL (e.g. http://10.0.0.2:8088/janus): view a streaming
    /// mountpoint instead of a WHEP endpoint.
    #[arg(long, conflicts_with = "whep")]
    pub janus: Option<String>,
    /// Janus streaming mountpoint id.
    #[arg(long, default_value_t = 1)]
    pub janus_mountpoint: u64,
    /// Number of viewers (0: only run the source for --seconds).
    #[arg(long, default_value_t = 10)]
    pub viewers: usize,
    /// Viewers joining per second.
    #[arg(long, default_value_t = 20.0)]
    pub join_rate: f64,
    /// Length of the steady (measured) phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Pause between the end of the ramp and the steady phase, in seconds.
    #[arg(long, default_value_t = 2)]
    pub settle_seconds: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// PID of the server process (CPU and RSS from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Kernel threads doing the server's own packet work outside its process (the
    /// NAPI threads of its network device in the NIC-model bench): their CPU time
    /// over the steady phase counts as the server's. Repeatable.
    #[arg(long)]
    pub server_kernel_tid: Vec<u32>,
    /// Prometheus endpoint of an edgerelay server (default: /metrics next to --whep).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Worker threads of the swarm (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Local address for the viewers' sockets (default: the route to the server).
    #[arg(long)]
    pub local_ip: Option<IpAddr>,
    /// Name of the server in the report (default: edgerelay or janus).
    #[arg(long)]
    pub label: Option<String>,
    /// Start the bench source: publish over WHIP to this URL.
    #[arg(long)]
    pub source_whip: Option<String>,
    /// Bearer token for --source-whip.
    #[arg(long)]
    pub source_token: Option<String>,
    /// Start the bench source: send plain RTP (pt 96) to this address (e.g. a Janus mountpoint).
    #[arg(long)]
    pub source_rtp: Option<SocketAddr>,
    /// Source bitrate in kbit/s.
    #[arg(long, default_value_t = 2000)]
    pub source_bitrate_kbps: u32,
    /// Source frame rate.
    #[arg(long, default_value_t = 30)]
    pub source_fps: u32,
    /// Source picture width.
    #[arg(long, default_value_t = 1280)]
    pub source_width: u32,
    /// Source picture height.
    #[arg(long, default_value_t = 720)]
    pub source_height: u32,
    /// Cache file for the source's encoded loop (reused if present).
    #[arg(long)]
    pub source_cache: Option<PathBuf>,
    /// Pace the source's packets at this rate (kbit/s), as a libwebrtc sender's
    /// pacer does (about 2.5x the bitrate); 0 = each frame's packets back to back.
    #[arg(long, default_value_t = 0)]
    pub source_pace_kbps: u32,
    /// How far (ms) the paced source may run ahead of its rate, as libwebrtc's pacer
    /// may (its burst interval, 40 ms since 2023: a delta frame then leaves whole);
    /// 0 = every packet at its own paced time (the pacer of older libwebrtc).
    #[arg(long, default_value_t = 40)]
    pub source_pace_burst_ms: u32,
    /// Relayed viewers: every viewer reaches the edge only through the edge's built-in
    /// TURN server (credentials from /api/ice-servers or the WHEP Link headers).
    #[arg(long, value_enum, conflicts_with = "janus")]
    pub relay: Option<RelayMode>,
    /// Viewer sockets take UDP GRO: a GSO batch from the server is queued on the
    /// loopback viewer whole and split here, so the server's CPU no longer includes
    /// the per-datagram delivery into its viewers' sockets (which a NIC and remote
    /// receivers would do). Off: the conservative figure. Linux only.
    #[arg(long)]
    pub receiver_gro: bool,
    /// The last viewer to join takes the controller seat, behind every spectator in
    /// join order (as a controller that reconnects mid-session). Under a static
    /// token's first-come rule a placeholder viewer holds the seat through the ramp
    /// and leaves just before the last join. The controller's frame delay is
    /// reported on its own either way. Needs --whep or --spawn-edge.
    #[arg(long, conflicts_with = "janus")]
    pub controller_last: bool,
    /// Seconds between samples of the server's RSS in the steady phase.
    #[arg(long, default_value_t = 1)]
    pub rss_interval: u64,
    /// Convenience: start `edgerelay edge` on loopback as a child process and publish
    /// the bench source into it (the benches measure a separately started server).
    #[arg(long, conflicts_with_all = ["whep", "janus"])]
    pub spawn_edge: bool,
}

/// How relayed viewers reach the TURN server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    /// TURN over UDP (Allocate, ChannelBind, ChannelData).
    Udp,
}

/// Edge counters read before the ramp and after the steady phase: (report key, metric).
/// The first four are the keyframe requests the join storm checks.
const EDGE_COUNTERS: [(&str, &str); 9] = [
    ("upstream", "edgerelay_keyframe_requests_upstream_total"),
    (
        "answered_by_cache",
        "edgerelay_keyframe_requests_answered_by_cache_total",
    ),
    (
        "from_viewers",
        "edgerelay_keyframe_requests_from_viewers_total",
    ),
    ("merged", "edgerelay_keyframe_requests_merged_total"),
    (
        "viewer_starts_from_cache",
        "edgerelay_viewer_starts_from_cache_total",
    ),
    ("video_pauses", "edgerelay_video_pauses_total"),
    ("video_resumes", "edgerelay_video_resumes_total"),
    ("packets_replayed", "edgerelay_packets_replayed_total"),
    ("dropped_packets", "edgerelay_dropped_packets_total"),
];

/// One scrape of [`EDGE_COUNTERS`] (a missing metric reads as absent).
async fn scrape_edge_counters(
    client: &reqwest::Client,
    url: Option<&str>,
) -> Option<Vec<Option<f64>>> {
    let text = client
        .get(url?)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        EDGE_COUNTERS
            .iter()
            .map(|(_, m)| procstat::parse_counter(&text, m))
            .collect(),
    )
}

/// Least-squares slope of `(x, y)` points (y per unit of x); `None` under two points.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Most events in any window of `window` (times sorted ascending).
pub fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].saturating_duration_since(times[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi + 1 - lo);
    }
    best
}

/// Most concurrent signalling exchanges.
const MAX_CONCURRENT_JOINS: usize = 64;
/// Longest wait for every viewer to receive media after the ramp.
const RECEIVE_WAIT: Duration = Duration::from_secs(15);

/// Percentiles of a sample set.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pct {
    /// Number of samples.
    pub n: usize,
    /// Minimum.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Pct {
    /// Nearest-rank percentiles of `v` (sorted in place).
    pub fn of(v: &mut [f64]) -> Pct {
        if v.is_empty() {
            return Pct::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Pct {
            n: v.len(),
            min: v[0],
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "min": round3(self.min), "p50": round3(self.p50), "p99": round3(self.p99), "max": round3(self.max)})
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A spawned edge (for --spawn-edge).
struct SpawnedEdge {
    child: std::process::Child,
    http: String,
}

impl Drop for SpawnedEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_edge() -> anyhow::Result<SpawnedEdge> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args([
            "edge",
            "--http-listen",
            "127.0.0.1:0",
            "--media-listen",
            "127.0.0.1:0",
            "--public-ip",
            "127.0.0.1",
            "--publisher-token",
            "loadtest-pub",
            "--viewer-token",
            "loadtest-view",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout from the edge"))?;
    let mut edge = SpawnedEdge {
        child,
        http: String::new(),
    };
    let mut lines = std::io::BufReader::new(stdout).lines();
    for _ in 0..1000 {
        let Some(line) = lines.next() else { break };
        let line = line?;
        if let Some(rest) = line.strip_prefix("EDGERELAY_READY ") {
            if let Some(h) = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
            {
                edge.http = h.trim_end_matches('/').to_owned();
                // Keep draining stdout so the edge never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines.by_ref() {});
                return Ok(edge);
            }
        }
    }
    anyhow::bail!("the edge did not print EDGERELAY_READY")
}

/// Counters of all viewers at one instant.
fn snapshot(viewers: &[Arc<ViewerCounters>]) -> Vec<(u64, u64)> {
    viewers
        .iter()
        .map(|c| {
            (
                c.received.load(Ordering::Relaxed),
                c.expected.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn progress(
    json: bool,
    phase: &str,
    started: usize,
    total: usize,
    viewers: &[Arc<ViewerCounters>],
    failed: usize,
) {
    let connected = viewers
        .iter()
        .filter(|c| c.connected.load(Ordering::Relaxed))
        .count();
    let receiving = viewers
        .iter()
        .filter(|c| c.received.load(Ordering::Relaxed) > 0)
        .count();
    let line = format!(
        "[{phase}] joined {started}/{total}  connected {connected}  receiving {receiving}  failed {failed}"
    );
    // Progress goes to stderr so that --json stdout stays one object.
    let mut e = std::io::stderr().lock();
    if json {
        let _ = writeln!(e, "{line}");
    } else {
        let _ = write!(e, "\r{line}   ");
        let _ = e.flush();
    }
}

fn origin_of(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    Some(
        format!("{}://{}", u.scheme(), u.host_str()?)
            + &u.port().map(|p| format!(":{p}")).unwrap_or_default(),
    )
}

/// Runs the load test.
pub async fn run(mut args: LoadtestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.join_rate > 0.0, "--join-rate must be > 0");
    anyhow::ensure!(args.seconds > 0, "--seconds must be > 0");
    let _edge = if args.spawn_edge {
        let e = tokio::task::spawn_blocking(spawn_edge).await??;
        args.whep = Some(format!("{}/whep/loadtest", e.http));
        args.token = Some("loadtest-view".into());
        args.source_whip
            .get_or_insert(format!("{}/whip/loadtest", e.http));
        args.source_token.get_or_insert("loadtest-pub".into());
        args.server_pid.get_or_insert(e.child.id());
        Some(e)
    } else {
        None
    };
    let janus = args.janus.as_deref().map(Janus::new).transpose()?;
    anyhow::ensure!(
        args.viewers == 0 || args.whep.is_some() || janus.is_some(),
        "give --whep URL, --janus URL, or --spawn-edge"
    );
    let label = args.label.clone().unwrap_or_else(|| {
        if janus.is_some() {
            "janus"
        } else {
            "edgerelay"
        }
        .to_owned()
    });

    // The source, if asked for.
    let src = if args.source_whip.is_some() || args.source_rtp.is_some() {
        let cfg = source::SourceConfig {
            whip: args.source_whip.clone(),
            whip_token: args.source_token.clone(),
            rtp: args.source_rtp,
            width: args.source_width,
            height: args.source_height,
            fps: args.source_fps,
            bitrate_kbps: args.source_bitrate_kbps,
            gop_frames: args.source_fps.saturating_mul(2),
            loop_frames: args.source_fps.saturating_mul(4),
            cache: args.source_cache.clone(),
            pace_kbps: args.source_pace_kbps,
            pace_burst: Duration::from_millis(u64::from(args.source_pace_burst_ms)),
        };
        let s = source::start(cfg).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.stats.connected.load(Ordering::Relaxed) {
            anyhow::ensure!(!s.is_finished(), "the source stopped before connecting");
            anyhow::ensure!(Instant::now() < deadline, "the source did not connect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the server see a first keyframe before viewers arrive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Some(s)
    } else {
        None
    };
    if args.viewers == 0 {
        let end = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
        tokio::select! {
            _ = tokio::time::sleep_until(end) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if let Some(s) = src {
            let st = &s.stats;
            eprintln!(
                "source: frames {} packets {} keyframe requests {}",
                st.frames.load(Ordering::Relaxed),
                st.packets.load(Ordering::Relaxed),
                st.keyframe_requests.load(Ordering::Relaxed)
            );
            s.stop().await?;
        }
        return Ok(());
    }

    let target = args
        .whep
        .clone()
        .or_else(|| args.janus.clone())
        .unwrap_or_default();
    let local_ip = match args.local_ip {
        Some(ip) => ip,
        None => crate::publisher::signal::local_ip_for(&target)?,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let metrics_url = args.metrics.clone().or_else(|| {
        args.whep
            .as_deref()
            .and_then(origin_of)
            .map(|o| o + "/metrics")
    });
    let ticks = procstat::clock_ticks();
    let server_sample = |pid: Option<u32>| pid.and_then(|p| procstat::sample(p, ticks).ok());
    let rss_before = server_sample(args.server_pid);

    // Workers.
    let shared = Arc::new(SwarmShared {
        gro: args.receiver_gro,
        ..SwarmShared::default()
    });
    let nthreads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let mut workers = Vec::with_capacity(nthreads);
    for i in 0..nthreads {
        workers.push(Worker::spawn(i, shared.clone())?);
    }

    // Janus keepalives.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let janus_sessions = Arc::new(Mutex::new(Vec::<u64>::new()));
    if let Some(j) = janus.clone() {
        tokio::spawn(j.keepalive_loop(janus_sessions.clone(), stop_rx));
    }

    // Relayed viewers: the TURN server and credentials, once for all.
    let relay = match (args.relay, &args.whep) {
        (Some(RelayMode::Udp), Some(whep)) => {
            let r = signal::relay_config(&client, whep, args.token.as_deref(), local_ip).await?;
            eprintln!("relay: TURN server {} (user {})", r.server, r.username);
            Some(Arc::new(r))
        }
        (Some(_), None) => anyhow::bail!("--relay needs --whep"),
        (None, _) => None,
    };
    let kf_before = scrape_edge_counters(&client, metrics_url.as_deref()).await;
    let source_kf_before = src
        .as_ref()
        .map(|s| s.stats.keyframe_requests.load(Ordering::Relaxed));
    let kf_window_start = Instant::now();

    // Ramp.
    let counters: Vec<Arc<ViewerCounters>> = (0..args.viewers)
        .map(|_| Arc::new(ViewerCounters::default()))
        .collect();
    let teardowns = Arc::new(Mutex::new(Vec::<Teardown>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_JOINS));
    let mut joins = tokio::task::JoinSet::new();
    // The placeholder holding the controller seat (--controller-last): a real viewer
    // of its own counters, so that the server keeps its session through the ramp.
    let mut placeholder = None;
    anyhow::ensure!(
        !args.controller_last || args.whep.is_some(),
        "--controller-last needs --whep or --spawn-edge"
    );
    if let (true, Some(url)) = (args.controller_last, &args.whep) {
        let spare = Arc::new(ViewerCounters::default());
        let (mut nv, td) =
            signal::join_whep(&client, url, args.token.as_deref(), local_ip, None, spare)
                .await
                .context("--controller-last: the placeholder viewer")?;
        anyhow::ensure!(
            nv.controller,
            "--controller-last: the room's controller seat is already taken"
        );
        nv.controller = false; // (its frames are nobody's figures)
        workers[0]
            .tx
            .send(nv)
            .map_err(|_| anyhow::anyhow!("loadtest worker gone"))?;
        placeholder = Some(td);
    }
    let ramp_start = tokio::time::Instant::now();
    let mut last_progress = Instant::now();
    for (i, c) in counters.iter().enumerate() {
        let at = ramp_start + Duration::from_secs_f64(i as f64 / args.join_rate);
        tokio::time::sleep_until(at).await;
        if i + 1 == args.viewers {
            if let Some(td) = placeholder.take() {
                // Every spectator seated first; then the seat is given up for the last.
                while joins.join_next().await.is_some() {}
                signal::teardown(&client, None, args.token.as_deref(), td).await;
            }
        }
        let permit = sem.clone().acquire_owned().await?;
        let tx = workers[i % nthreads].tx.clone();
        let (client, janus, whep, token, relay) = (
            client.clone(),
            janus.clone(),
            args.whep.clone(),
            args.token.clone(),
            relay.clone(),
        );
        let (c, teardowns, fails, sessions) = (
            c.clone(),
            teardowns.clone(),
            failures.clone(),
            janus_sessions.clone(),
        );
        let mp = args.janus_mountpoint;
        joins.spawn(async move {
            let _permit = permit;
            let r = match (&janus, &whep) {
                (Some(j), _) => j.join(mp, local_ip, c.clone()).await,
                (None, Some(url)) => {
                    signal::join_whep(
                        &client,
                        url,
                        token.as_deref(),
                        local_ip,
                        relay.as_deref(),
                        c.clone(),
                    )
                    .await
                }
                (None, None) => Err(anyhow::anyhow!("no target")),
            };
            match r {
                Ok((nv, td)) => {
                    if let Teardown::Janus { session } = &td {
                        if let Ok(mut s) = sessions.lock() {
                            s.push(*session);
                        }
                    }
                    if let Ok(mut t) = teardowns.lock() {
                        t.push(td);
                    }
                    if tx.send(nv).is_err() {
                        c.failed.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    c.failed.store(true, Ordering::Relaxed);
                    tracing::debug!("viewer join failed: {e:#}");
                    if let Ok(mut f) = fails.lock() {
                        f.push(format!("{e:#}"));
                    }
                }
            }
        });
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let failed = failures.lock().map(|f| f.len()).unwrap_or(0);
            progress(args.json, "ramp", i + 1, args.viewers, &counters, failed);
        }
    }
    while joins.join_next().await.is_some() {}
    let ramp_secs = ramp_start.elapsed().as_secs_f64();
    let wait_end = Instant::now() + RECEIVE_WAIT;
    while Instant::now() < wait_end {
        let pending = counters
            .iter()
            .any(|c| !c.failed.load(Ordering::Relaxed) && c.received.load(Ordering::Relaxed) == 0);
        if !pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_joins = failures.lock().map(|f| f.len()).unwrap_or(0);
    progress(
        args.json,
        "ramp",
        args.viewers,
        args.viewers,
        &counters,
        failed_joins,
    );
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;

    // Steady phase.
    let snap_a = snapshot(&counters);
    let cpu_a = server_sample(args.server_pid);
    let kernel_cpu = || -> Option<f64> {
        args.server_kernel_tid
            .iter()
            .map(|&t| procstat::sample(t, ticks).ok().map(|s| s.cpu_seconds))
            .sum()
    };
    let kernel_a = kernel_cpu();
    let out_a = match &metrics_url {
        Some(u) => procstat::scrape_counter(&client, u, "edgerelay_rtp_packets_out_total")
            .await
            .ok(),
        None => None,
    };
    let me = std::process::id();
    let client_a = procstat::sample(me, ticks).ok();
    let udp_client_a = procstat::udp_counters(me);
    let udp_server_a = args.server_pid.and_then(procstat::udp_counters);
    shared.measuring.store(true, Ordering::Relaxed);
    let steady_start = Instant::now();
    let steady_end = steady_start + Duration::from_secs(args.seconds);
    // (minutes since the steady phase began, RSS KiB)
    let mut rss_samples: Vec<(f64, f64)> = Vec::new();
    if let Some(s) = cpu_a {
        rss_samples.push((0.0, s.rss_kb as f64));
    }
    let rss_every = Duration::from_secs(args.rss_interval.max(1));
    let mut next_rss = steady_start + rss_every;
    while Instant::now() < steady_end {
        let left = steady_end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if Instant::now() >= next_rss || Instant::now() >= steady_end {
            next_rss += rss_every;
            if let Some(s) = server_sample(args.server_pid) {
                rss_samples.push((steady_start.elapsed().as_secs_f64() / 60.0, s.rss_kb as f64));
            }
        }
        progress(
            args.json,
            "steady",
            args.viewers,
            args.viewers,
            &counters,
            failed_joins,
        );
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let steady_secs = steady_start.elapsed().as_secs_f64();
    let snap_b = snapshot(&counters);
    let cpu_b = server_sample(args.server_pid);
    let kernel_b = kernel_cpu();
    let client_b = procstat::sample(me, ticks).ok();
    let udp_client_b = procstat::udp_counters(me);
    let udp_server_b = args.server_pid.and_then(procstat::udp_counters);
    let out_b = match &metrics_url {
        Some(u) => procstat::scrape_counter(&client, u, "edgerelay_rtp_packets_out_total")
            .await
            .ok(),
        None => None,
    };
    // Keyframe requests over ramp + steady (the edge publishes its counters a few
    // times a second: wait for the last ones).
    let kf_window = kf_window_start.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let kf_after = scrape_edge_counters(&client, metrics_url.as_deref()).await;
    let source_kf_after = src
        .as_ref()
        .map(|s| s.stats.keyframe_requests.load(Ordering::Relaxed));
    let source_kf_times: Vec<Instant> = src
        .as_ref()
        .and_then(|s| {
            s.stats
                .keyframe_request_times
                .lock()
                .ok()
                .map(|t| t.clone())
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|t| *t >= kf_window_start && *t <= kf_window_start + kf_window)
        .collect();
    if !args.json {
        eprintln!();
    }

    // Teardown.
    shared.stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut delays = swarm::Delays::default();
    for w in workers {
        let d = tokio::task::spawn_blocking(move || w.join()).await?;
        delays.extend(d);
    }
    let tds: Vec<Teardown> = teardowns.lock().map(|t| t.clone()).unwrap_or_default();
    let mut set = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_JOINS));
    for td in tds {
        let (client, janus, token, sem) = (
            client.clone(),
            janus.clone(),
            args.token.clone(),
            sem.clone(),
        );
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            signal::teardown(&client, janus.as_ref(), token.as_deref(), td).await;
        });
    }
    while set.join_next().await.is_some() {}
    let source_stats = src.as_ref().map(|s| {
        (
            s.stats.packets.load(Ordering::Relaxed),
            s.stats.keyframe_requests.load(Ordering::Relaxed),
        )
    });
    if let Some(s) = src {
        if let Err(e) = s.stop().await {
            tracing::warn!("source: {e:#}");
        }
    }

    // Figures.
    let n = args.viewers;
    let mut per_rx = Vec::with_capacity(n);
    let mut per_lost = Vec::with_capacity(n);
    let mut per_loss_pct = Vec::with_capacity(n);
    let (mut sum_rx, mut sum_exp, mut sum_lost) = (0u64, 0u64, 0u64);
    let mut receiving = 0usize;
    for ((ra, ea), (rb, eb)) in snap_a.iter().zip(&snap_b) {
        let rx = rb.saturating_sub(*ra);
        let exp = eb.saturating_sub(*ea).max(rx);
        let lost = exp - rx;
        if rx > 0 {
            receiving += 1;
        }
        sum_rx += rx;
        sum_exp += exp;
        sum_lost += lost;
        per_rx.push(rx as f64);
        per_lost.push(lost as f64);
        per_loss_pct.push(if exp > 0 {
            100.0 * lost as f64 / exp as f64
        } else {
            100.0
        });
    }
    let join_ms = |f: fn(&ViewerCounters) -> u64| {
        let mut v: Vec<f64> = counters
            .iter()
            .map(|c| f(c))
            .filter(|&us| us != NONE)
            .map(|us| us as f64 / 1000.0)
            .collect();
        Pct::of(&mut v)
    };
    let j_ans = join_ms(|c| c.answered_us.load(Ordering::Relaxed));
    let j_conn = join_ms(|c| c.connected_us.load(Ordering::Relaxed));
    let j_rtp = join_ms(|c| c.first_rtp_us.load(Ordering::Relaxed));
    let j_key = join_ms(|c| c.first_key_us.load(Ordering::Relaxed));
    let j_kc = join_ms(|c| c.key_complete_us.load(Ordering::Relaxed));
    let ms = |v: &[u32]| -> Vec<f64> { v.iter().map(|&d| f64::from(d) / 1000.0).collect() };
    let delay = Pct::of(&mut ms(&delays.first));
    let frame_delay = Pct::of(&mut ms(&delays.complete));
    let controller_frame_delay = Pct::of(&mut ms(&delays.controller_complete));
    if args.controller_last && controller_frame_delay.n == 0 {
        eprintln!("warning: --controller-last: no frame reached a controller in the steady phase");
    }
    // A kernel thread that went away (or never existed) voids the figure.
    let kernel_cpu_secs = match (kernel_a, kernel_b) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let cpu = match (cpu_a, cpu_b, kernel_cpu_secs) {
        (Some(a), Some(b), Some(k)) => Some(b.cpu_seconds - a.cpu_seconds + k),
        _ => None,
    };
    let server_pkts = match (out_a, out_b) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => None,
    };
    let us_per_pkt = cpu.filter(|_| sum_rx > 0).map(|c| c * 1e6 / sum_rx as f64);
    let us_per_pkt_server = match (cpu, server_pkts) {
        (Some(c), Some(p)) if p > 0.0 => Some(c * 1e6 / p),
        _ => None,
    };
    let rss_per_viewer = match (rss_before, cpu_b) {
        (Some(a), Some(b)) if receiving > 0 => {
            Some((b.rss_kb as f64 - a.rss_kb as f64) / receiving as f64)
        }
        _ => None,
    };
    let rss_steady = |kb: Option<f64>| match (rss_before, kb) {
        (Some(a), Some(b)) if receiving > 0 => Some((b - a.rss_kb as f64) / receiving as f64),
        _ => None,
    };
    let rss_start = rss_samples.first().map(|p| p.1);
    let rss_end = rss_samples.last().map(|p| p.1);
    let rss_slope = slope(&rss_samples);
    // The second half alone tells a one-off warm-up from a steady leak.
    let rss_slope_2nd = slope(&rss_samples[rss_samples.len() / 2..]);
    // At most ~60 points of the series, for plotting.
    let step = rss_samples.len().div_ceil(60).max(1);
    let rss_series: Vec<Value> = rss_samples
        .iter()
        .step_by(step)
        .chain(
            rss_samples
                .last()
                .filter(|_| rss_samples.len() % step != 1 && step > 1),
        )
        .map(|(m, kb)| json!([round3(*m), kb]))
        .collect();
    let (kf_delta, edge_delta) = match (kf_before, kf_after) {
        (Some(a), Some(b)) => {
            let mut m = serde_json::Map::new();
            for (((key, _), x), y) in EDGE_COUNTERS.iter().zip(&a).zip(&b) {
                let d = match (x, y) {
                    (Some(x), Some(y)) => json!((y - x).max(0.0)),
                    _ => Value::Null,
                };
                m.insert((*key).to_owned(), d);
            }
            let kf: serde_json::Map<String, Value> = EDGE_COUNTERS[..4]
                .iter()
                .filter_map(|(k, _)| Some(((*k).to_owned(), m.get(*k)?.clone())))
                .collect();
            (Value::Object(kf), Value::Object(m))
        }
        _ => (Value::Null, Value::Null),
    };
    let kf_window_s = kf_window.as_secs_f64();
    let keyframe_budget = (kf_window_s / 0.3).floor() + 1.0;
    let source_gaps: Vec<f64> = source_kf_times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]).as_secs_f64() * 1000.0)
        .collect();
    let min_gap_ms = source_gaps.iter().copied().reduce(f64::min);
    let viewers_key_complete = j_kc.n;
    let loss_pct = if sum_exp > 0 {
        100.0 * sum_lost as f64 / sum_exp as f64
    } else {
        100.0
    };
    let failures: Vec<String> = failures.lock().map(|f| f.clone()).unwrap_or_default();
    let viewers_connected = counters
        .iter()
        .filter(|c| c.first_rtp_us.load(Ordering::Relaxed) != NONE)
        .count();
    let client_cpu_pct = match (client_a, client_b) {
        (Some(a), Some(b)) => Some(100.0 * (b.cpu_seconds - a.cpu_seconds) / steady_secs.max(1e-9)),
        _ => None,
    };
    let udp_delta =
        |a: Option<procstat::UdpCounters>, b: Option<procstat::UdpCounters>| match (a, b) {
            (Some(a), Some(b)) => json!({
                "in_datagrams": b.in_datagrams.saturating_sub(a.in_datagrams),
                "rcvbuf_errors": b.rcvbuf_errors.saturating_sub(a.rcvbuf_errors),
                "sndbuf_errors": b.sndbuf_errors.saturating_sub(a.sndbuf_errors),
            }),
            _ => Value::Null,
        };
    let opt = |v: Option<f64>| v.map_or(Value::Null, |x| json!(round3(x)));
    let mut report = json!({
        "server": label,
        "target": target,
        "viewers": n,
        "viewers_received_any": viewers_connected,
        "viewers_receiving_steady": receiving,
        "join_failures": failures.len(),
        "join_failure_sample": failures.first(),
        "join_rate": args.join_rate,
        "ramp_seconds": round3(ramp_secs),
        "steady_seconds": round3(steady_secs),
        "worker_threads": nthreads,
        "join_ms_answered": j_ans.json(),
        "join_ms_connected": j_conn.json(),
        "join_ms_first_rtp": j_rtp.json(),
        "join_ms_first_keyframe": j_key.json(),
        "join_ms_keyframe_complete": j_kc.json(),
        "packets_per_viewer": Pct::of(&mut per_rx).json(),
        "lost_per_viewer": Pct::of(&mut per_lost).json(),
        "loss_pct_per_viewer": Pct::of(&mut per_loss_pct).json(),
        "packets_received": sum_rx,
        "packets_expected": sum_exp,
        "packets_lost": sum_lost,
        "loss_pct": round3(loss_pct),
        "packets_per_second": round3(sum_rx as f64 / steady_secs.max(1e-9)),
        "delay_ms": delay.json(),
        "frame_delay_ms": frame_delay.json(),
        "server_pid": args.server_pid,
        "server_cpu_seconds": opt(cpu),
        "server_kernel_threads_cpu_seconds": opt(kernel_cpu_secs.filter(|_| !args.server_kernel_tid.is_empty())),
        "server_cpu_pct": opt(cpu.map(|c| 100.0 * c / steady_secs.max(1e-9))),
        "server_packets_out": opt(server_pkts),
        "us_per_pkt": opt(us_per_pkt),
        "us_per_pkt_server_count": opt(us_per_pkt_server),
        "rss_kb_before": rss_before.map(|s| s.rss_kb),
        "rss_kb_after": cpu_b.map(|s| s.rss_kb),
        "rss_kb_per_viewer": opt(rss_per_viewer),
        "client_cpu_pct": client_cpu_pct.map(round3),
        "client_netns_udp": udp_delta(udp_client_a, udp_client_b),
        "server_netns_udp": udp_delta(udp_server_a, udp_server_b),
        "source_packets_sent": source_stats.map(|s| s.0),
        "source_keyframe_requests": source_stats.map(|s| s.1),
    });
    let extra = json!({
        "relay": args.relay.map(|_| "udp"),
        "turn_errors": shared.turn_errors.load(Ordering::Relaxed),
        "viewers_keyframe_complete": viewers_key_complete,
        "keyframe_window_seconds": round3(kf_window_s),
        "keyframe_requests_upstream_budget_300ms": keyframe_budget,
        "keyframe_requests_edge": kf_delta,
        "edge_counters_delta": edge_delta,
        "keyframe_requests_at_source": match (source_kf_before, source_kf_after) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a)),
            _ => Value::Null,
        },
        "keyframe_requests_at_source_max_per_300ms": max_in_window(&source_kf_times, Duration::from_millis(300)),
        "keyframe_requests_at_source_min_gap_ms": opt(min_gap_ms),
        "rss_samples": rss_samples.len(),
        "rss_kb_steady_start": rss_start,
        "rss_kb_steady_end": rss_end,
        "rss_kb_per_viewer_steady_start": opt(rss_steady(rss_start)),
        "rss_kb_per_viewer_steady_end": opt(rss_steady(rss_end)),
        "rss_slope_kib_per_min": opt(rss_slope),
        "rss_slope_kib_per_min_second_half": opt(rss_slope_2nd),
        "rss_series_min_kb": rss_series,
        "rss_slope_kib_per_min_per_viewer": opt(rss_slope.filter(|_| receiving > 0).map(|s| s / receiving as f64)),
    });
    if let (Some(r), Value::Object(e)) = (report.as_object_mut(), extra) {
        r.extend(e);
    }
    report["controller_frame_delay_ms"] = controller_frame_delay.json();
    report["controller_last"] = json!(args.controller_last);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn fmt_pct(v: &Value) -> String {
    format!(
        "{:>10} {:>10} {:>10} {:>7}",
        v["p50"], v["p99"], v["max"], v["n"]
    )
}

fn print_table(r: &Value) {
    let mut o = String::new();
    let line = |o: &mut String, k: &str, v: String| o.push_str(&format!("{k:<34} {v}\n"));
    line(
        &mut o,
        "server",
        format!(
            "{} ({})",
            r["server"].as_str().unwrap_or("?"),
            r["target"].as_str().unwrap_or("")
        ),
    );
    line(
        &mut o,
        "viewers (received any / steady)",
        format!(
            "{} ({} / {}), {} join failures",
            r["viewers"],
            r["viewers_received_any"],
            r["viewers_receiving_steady"],
            r["join_failures"]
        ),
    );
    line(
        &mut o,
        "ramp / steady seconds",
        format!("{} / {}", r["ramp_seconds"], r["steady_seconds"]),
    );
    o.push_str(&format!(
        "{:<34} {:>10} {:>10} {:>10} {:>7}\n",
        "", "p50", "p99", "max", "n"
    ));
    for (k, name) in [
        ("join_ms_answered", "join -> answer (signalling, ms)"),
        ("join_ms_connected", "join -> ICE + DTLS up (ms)"),
        ("join_ms_first_rtp", "join -> first RTP (ms)"),
        ("join_ms_first_keyframe", "join -> keyframe start (ms)"),
        (
            "join_ms_keyframe_complete",
            "join -> keyframe complete (ms)",
        ),
        ("packets_per_viewer", "packets per viewer"),
        ("lost_per_viewer", "lost per viewer"),
        ("loss_pct_per_viewer", "loss % per viewer"),
        ("delay_ms", "one-way delay, frame's first packet (ms)"),
        ("frame_delay_ms", "one-way delay, frame complete (ms)"),
        (
            "controller_frame_delay_ms",
            "  the controller's, frame complete (ms)",
        ),
    ] {
        line(&mut o, name, fmt_pct(&r[k]));
    }
    line(
        &mut o,
        "packets received / lost",
        format!(
            "{} / {} ({} %)",
            r["packets_received"], r["packets_lost"], r["loss_pct"]
        ),
    );
    line(
        &mut o,
        "server CPU (s, %)",
        format!("{} s, {} %", r["server_cpu_seconds"], r["server_cpu_pct"]),
    );
    line(
        &mut o,
        "server CPU per forwarded packet",
        format!(
            "{} us (viewer count), {} us (server count)",
            r["us_per_pkt"], r["us_per_pkt_server_count"]
        ),
    );
    line(
        &mut o,
        "server RSS growth per viewer",
        format!(
            "{} KiB ({} -> {} KiB)",
            r["rss_kb_per_viewer"], r["rss_kb_before"], r["rss_kb_after"]
        ),
    );
    line(
        &mut o,
        "server RSS per viewer steady start/end",
        format!(
            "{} / {} KiB, slope {} KiB/min ({} samples)",
            r["rss_kb_per_viewer_steady_start"],
            r["rss_kb_per_viewer_steady_end"],
            r["rss_slope_kib_per_min"],
            r["rss_samples"]
        ),
    );
    line(
        &mut o,
        "viewers with a complete keyframe",
        format!("{} of {}", r["viewers_keyframe_complete"], r["viewers"]),
    );
    line(
        &mut o,
        "keyframe requests (ramp+steady)",
        format!(
            "edge upstream {} (budget {} for {} s at 1/300 ms), answered by cache {}; \
             at source {} (max {} per 300 ms, min gap {} ms)",
            r["keyframe_requests_edge"]["upstream"],
            r["keyframe_requests_upstream_budget_300ms"],
            r["keyframe_window_seconds"],
            r["keyframe_requests_edge"]["answered_by_cache"],
            r["keyframe_requests_at_source"],
            r["keyframe_requests_at_source_max_per_300ms"],
            r["keyframe_requests_at_source_min_gap_ms"]
        ),
    );
    let ec = &r["edge_counters_delta"];
    line(
        &mut o,
        "edge: starts from cache / pauses",
        format!(
            "{} viewer starts from the cached GOP, {} video pauses / {} resumes (BWE), {} replayed",
            ec["viewer_starts_from_cache"],
            ec["video_pauses"],
            ec["video_resumes"],
            ec["packets_replayed"]
        ),
    );
    if !r["relay"].is_null() {
        line(
            &mut o,
            "relay (TURN)",
            format!(
                "{}, {} TURN errors after join",
                r["relay"], r["turn_errors"]
            ),
        );
    }
    line(
        &mut o,
        "load generator CPU %",
        format!("{}", r["client_cpu_pct"]),
    );
    line(
        &mut o,
        "UDP drops (rcvbuf) client / server ns",
        format!(
            "{} / {}",
            r["client_netns_udp"]["rcvbuf_errors"], r["server_netns_udp"]["rcvbuf_errors"]
        ),
    );
    print!("{o}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Pct::of(&mut v);
        assert_eq!((p.n, p.p50, p.p99, p.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(Pct::of(&mut []), Pct::default());
        let mut one = [7.0];
        assert_eq!(Pct::of(&mut one).p99, 7.0);
    }

    #[test]
    fn slope_and_window_counts() {
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        let s = slope(&[(0.0, 10.0), (1.0, 12.0), (2.0, 14.0)]).expect("slope");
        assert!((s - 2.0).abs() < 1e-9);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let w = Duration::from_millis(300);
        assert_eq!(max_in_window(&[], w), 0);
        assert_eq!(max_in_window(&[at(0), at(300), at(600)], w), 1);
        assert_eq!(max_in_window(&[at(0), at(100), at(250), at(900)], w), 3);
    }

    #[test]
    fn origin_keeps_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:8080/whep/x").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin_of("https://a.example/whep/x").as_deref(),
            Some("https://a.example")
        );
    }
}
