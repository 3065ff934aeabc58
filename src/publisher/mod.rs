//! Synthetic instance publisher: a moving H.264 test pattern sent over WHIP.
//!
//! [`start`] signals over HTTP (async) and then runs the media loop on its own
//! std thread: a blocking UDP socket whose read timeout is str0m's next timeout.
//! Video is OpenH264 constrained baseline (profile-level-id 42e01f,
//! packetization-mode 1); audio (optional) is Opus DTX silence every 20 ms. A
//! `control` data channel carries input from the controller viewer (counted and
//! logged) and a once-a-second `tick` message from the publisher to all viewers.

// A library-style API for the demo, the load generator and tests: the binary alone
// does not use every item.
#![allow(dead_code)]

pub mod encoder;
pub mod net;
pub mod pattern;
pub mod signal;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::{Candidate, Event, IceConnectionState, Rtc, RtcConfig};

use encoder::{EncoderSettings, VideoEncoder};
use net::RtcSocket;
use pattern::PatternGenerator;

/// Label of the input/control data channel.
pub const CONTROL_LABEL: &str = "control";

/// A valid Opus frame of silence (TOC 0xF8: CELT FB 20 ms, code 0; DTX payload).
const OPUS_SILENCE: [u8; 3] = [0xF8, 0xFF, 0xFE];

/// Arguments of `edgerelay publish`.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// WHIP endpoint, e.g. http://127.0.0.1:8080/whip/demo
    #[arg(long)]
    pub whip: String,
    /// Bearer token for the WHIP endpoint.
    #[arg(long)]
    pub token: Option<String>,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Frames per second (1..=120).
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// Target video bitrate in kbit/s.
    #[arg(long, default_value_t = 2000)]
    pub bitrate_kbps: u32,
    /// Picture width (even, 64..=3840).
    #[arg(long, default_value_t = 1280)]
    pub width: u32,
    /// Picture height (even, 64..=2160).
    #[arg(long, default_value_t = 720)]
    pub height: u32,
    /// Also send an Opus audio track (silence).
    #[arg(long)]
    pub audio: bool,
    /// Periodic keyframe interval in milliseconds (0: only on request).
    #[arg(long, default_value_t = 2000)]
    pub keyframe_interval_ms: u64,
    /// Interval of the publisher's `tick` message on the control channel (0: off).
    #[arg(long, default_value_t = 1000)]
    pub control_tick_ms: u64,
}

impl PublishArgs {
    /// Defaults as on the command line, for in-process use.
    pub fn new(whip: impl Into<String>, token: Option<String>) -> Self {
        Self {
            whip: whip.into(),
            token,
            seconds: None,
            fps: 30,
            bitrate_kbps: 2000,
            width: 1280,
            height: 720,
            audio: false,
            keyframe_interval_ms: 2000,
            control_tick_ms: 1000,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=120).contains(&self.fps), "--fps must be 1..=120");
        anyhow::ensure!(
            (50..=100_000).contains(&self.bitrate_kbps),
            "--bitrate-kbps must be 50..=100000"
        );
        anyhow::ensure!(
            (64..=3840).contains(&self.width) && self.width.is_multiple_of(2),
            "--width must be even, 64..=3840"
        );
        anyhow::ensure!(
            (64..=2160).contains(&self.height) && self.height.is_multiple_of(2),
            "--height must be even, 64..=2160"
        );
        Ok(())
    }
}

/// A snapshot of the publisher's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Whether DTLS is up (media can flow).
    pub connected: bool,
    /// Video frames handed to str0m.
    pub frames_sent: u64,
    /// Of which keyframes (IDR).
    pub keyframes_sent: u64,
    /// Encoded video bytes handed to str0m.
    pub video_bytes_sent: u64,
    /// Opus frames handed to str0m.
    pub audio_frames_sent: u64,
    /// PLI/FIR received from the edge.
    pub keyframe_requests: u64,
    /// Messages received on the `control` channel (controller input).
    pub input_messages: u64,
    /// Messages sent on the `control` channel.
    pub control_messages_sent: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    connected: AtomicBool,
    frames_sent: AtomicU64,
    keyframes_sent: AtomicU64,
    video_bytes_sent: AtomicU64,
    audio_frames_sent: AtomicU64,
    keyframe_requests: AtomicU64,
    input_messages: AtomicU64,
    control_messages_sent: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> PublisherStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PublisherStats {
            connected: self.connected.load(Ordering::Relaxed),
            frames_sent: r(&self.frames_sent),
            keyframes_sent: r(&self.keyframes_sent),
            video_bytes_sent: r(&self.video_bytes_sent),
            audio_frames_sent: r(&self.audio_frames_sent),
            keyframe_requests: r(&self.keyframe_requests),
            input_messages: r(&self.input_messages),
            control_messages_sent: r(&self.control_messages_sent),
        }
    }
}

/// A running publisher. Dropping it stops the media thread (without the WHIP DELETE;
/// call [`PublisherHandle::stop`] for a clean end).
pub struct PublisherHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    control_tx: mpsc::Sender<String>,
    client: reqwest::Client,
    resource: Option<String>,
    token: Option<String>,
}

impl PublisherHandle {
    /// Current counters.
    pub fn stats(&self) -> PublisherStats {
        self.shared.snapshot()
    }

    /// The WHIP resource URL (from `Location`), if the edge returned one.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    /// Whether the media thread has ended (error or remote close).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Queues a text message for the `control` channel (delivered once it is open).
    pub fn send_control(&self, msg: impl Into<String>) {
        let _ = self.control_tx.send(msg.into());
    }

    /// Stops the media thread, DELETEs the WHIP resource, and returns the final counters.
    /// Errors if the media thread failed or the DELETE failed.
    pub async fn stop(mut self) -> anyhow::Result<PublisherStats> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let thread_result = match self.thread.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| anyhow::anyhow!("join: {e}"))?
                .unwrap_or_else(|_| Err(anyhow::anyhow!("publisher media thread panicked"))),
            None => Ok(()),
        };
        let delete_result = match &self.resource {
            Some(r) => signal::delete_resource(&self.client, r, self.token.as_deref()).await,
            None => Ok(()),
        };
        let stats = self.shared.snapshot();
        thread_result?;
        delete_result?;
        Ok(stats)
    }
}

impl Drop for PublisherHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Settings of the media loop (derived from [`PublishArgs`]).
#[derive(Clone, Copy, Debug)]
struct LoopConfig {
    width: usize,
    height: usize,
    fps: u32,
    encoder: EncoderSettings,
    control_tick: Option<Duration>,
    noise: bool,
}

/// Negotiated session state handed to the media thread.
struct Session {
    rtc: Rtc,
    socket: RtcSocket,
    video_mid: Mid,
    audio_mid: Option<Mid>,
    control: ChannelId,
}

fn rtc_config(audio: bool) -> RtcConfig {
    let mut cfg = RtcConfig::new().clear_codecs();
    cfg.codec_config()
        .add_h264(Pt::from(102), Some(Pt::from(103)), true, 0x42e01f);
    if audio {
        cfg = cfg.enable_opus(true, false);
    }
    cfg
}

/// Builds the offer: sendonly video (+ audio) and the `control` channel, one host candidate.
fn make_offer(ip: IpAddr, audio: bool) -> anyhow::Result<(Session, String, SdpPendingOffer)> {
    let mut rtc = rtc_config(audio).build(Instant::now());
    let socket = RtcSocket::bind(ip)?;
    let cand = Candidate::host(socket.local_addr(), "udp")
        .map_err(|e| anyhow::anyhow!("host candidate: {e}"))?;
    rtc.add_local_candidate(cand);
    let mut api = rtc.sdp_api();
    let video_mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let audio_mid =
        audio.then(|| api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
    let control = api.add_channel(CONTROL_LABEL.to_owned());
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;
    let session = Session {
        rtc,
        socket,
        video_mid,
        audio_mid,
        control,
    };
    Ok((session, offer.to_sdp_string(), pending))
}

/// Signals over WHIP and starts the media thread. Returns once the answer is applied
/// (media connects in the background; watch [`PublisherStats::connected`]).
pub async fn start(args: PublishArgs) -> anyhow::Result<PublisherHandle> {
    start_with_noise(args, false).await
}

/// Like [`start`]; with `noise` the picture carries a band of fresh noise each frame so
/// the stream really uses `bitrate_kbps` (realistic packet rates for load tests).
pub async fn start_with_noise(args: PublishArgs, noise: bool) -> anyhow::Result<PublisherHandle> {
    args.validate()?;
    let ip = signal::local_ip_for(&args.whip)?;
    let (mut session, offer, pending) = make_offer(ip, args.audio)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let ex = signal::post_offer(&client, &args.whip, args.token.as_deref(), &offer).await?;
    let answer = SdpAnswer::from_sdp_string(&ex.answer)
        .map_err(|e| anyhow::anyhow!("bad SDP answer: {e}"))?;
    if let Err(e) = session.rtc.sdp_api().accept_answer(pending, answer) {
        if let Some(r) = &ex.resource {
            let _ = signal::delete_resource(&client, r, args.token.as_deref()).await;
        }
        anyhow::bail!("answer rejected: {e}");
    }
    tracing::info!(
        whip = %args.whip,
        local = %session.socket.local_addr(),
        resource = ex.resource.as_deref().unwrap_or("-"),
        "WHIP session created"
    );

    let fps = args.fps;
    let cfg = LoopConfig {
        width: args.width as usize,
        height: args.height as usize,
        fps,
        encoder: EncoderSettings {
            bitrate_bps: args.bitrate_kbps.saturating_mul(1000),
            fps,
            keyframe_interval_frames: (args.keyframe_interval_ms.saturating_mul(fps as u64) / 1000)
                .min(u32::MAX as u64) as u32,
        },
        control_tick: (args.control_tick_ms > 0)
            .then(|| Duration::from_millis(args.control_tick_ms)),
        noise,
    };
    let shared = Arc::new(Shared::default());
    let (control_tx, control_rx) = mpsc::channel();
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("publisher-media".into())
        .spawn(move || {
            let r = media_loop(session, cfg, &thread_shared, control_rx);
            if let Err(e) = &r {
                tracing::warn!("publisher media loop ended: {e:#}");
            }
            thread_shared.connected.store(false, Ordering::Relaxed);
            r
        })?;
    Ok(PublisherHandle {
        shared,
        thread: Some(thread),
        control_tx,
        client,
        resource: ex.resource,
        token: args.token,
    })
}

/// Runs the publisher until `seconds` elapse, Ctrl-C, or the media thread ends.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let seconds = args.seconds;
    let handle = start(args).await?;
    let deadline = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                break;
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break,
            _ = report.tick() => {
                let s = handle.stats();
                tracing::info!(
                    connected = s.connected,
                    frames = s.frames_sent,
                    keyframes = s.keyframes_sent,
                    kbytes = s.video_bytes_sent / 1000,
                    keyframe_requests = s.keyframe_requests,
                    input_messages = s.input_messages,
                    "publisher stats"
                );
                if handle.is_finished() {
                    break;
                }
            }
        }
    }
    let s = handle.stop().await?;
    tracing::info!(
        frames = s.frames_sent,
        keyframes = s.keyframes_sent,
        input_messages = s.input_messages,
        "publisher stopped"
    );
    Ok(())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Finds the payload type str0m negotiated for `codec` on `mid`.
fn negotiated_pt(rtc: &mut Rtc, mid: Mid, codec: Codec) -> Option<Pt> {
    let w = rtc.writer(mid)?;
    let pt = w
        .payload_params()
        .find(|p| p.spec().codec == codec)
        .map(|p| p.pt());
    pt
}

/// The media thread: drives str0m, renders/encodes frames on schedule, handles events.
fn media_loop(
    s: Session,
    cfg: LoopConfig,
    shared: &Shared,
    control_rx: mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let Session {
        mut rtc,
        mut socket,
        video_mid,
        audio_mid,
        control,
    } = s;
    let mut pattern = PatternGenerator::new(cfg.width, cfg.height)?;
    pattern.set_noise(cfg.noise);
    let mut encoder = VideoEncoder::new(cfg.encoder)?;
    let frame_interval = Duration::from_secs(1) / cfg.fps;
    let audio_interval = Duration::from_millis(20);
    let opus: Arc<[u8]> = Arc::from(&OPUS_SILENCE[..]);

    let start = Instant::now();
    let mut events: Vec<Event> = Vec::with_capacity(16);
    let mut connected = false;
    let mut control_open = false;
    let mut video_pt: Option<Pt> = None;
    let mut audio_pt: Option<Pt> = None;
    let mut force_keyframe = false;
    let mut frame_no: u64 = 0;
    let mut audio_samples: u64 = 0;
    let mut next_video = start;
    let mut next_audio = start;
    let mut next_tick = start;
    let mut warned_write = false;
    // Give up if the connection is not up in time.
    let connect_deadline = start + Duration::from_secs(20);

    while !shared.stop.load(Ordering::Relaxed) {
        let rtc_timeout = socket.drain(&mut rtc, &mut events)?;
        for ev in events.drain(..) {
            match ev {
                Event::IceConnectionStateChange(st) => {
                    tracing::debug!(?st, "publisher ICE state");
                    if st == IceConnectionState::Disconnected {
                        anyhow::bail!("ICE disconnected");
                    }
                }
                Event::Connected => {
                    tracing::info!(
                        elapsed_ms = start.elapsed().as_millis() as u64,
                        "publisher connected"
                    );
                    connected = true;
                    shared.connected.store(true, Ordering::Relaxed);
                    let now = Instant::now();
                    next_video = now;
                    next_audio = now;
                }
                Event::KeyframeRequest(req) if req.mid == video_mid => {
                    shared.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(kind = ?req.kind, "keyframe requested");
                    force_keyframe = true;
                }
                Event::ChannelOpen(id, label) => {
                    tracing::info!(%label, "data channel open");
                    if id == control || label == CONTROL_LABEL {
                        control_open = true;
                    }
                }
                Event::ChannelData(d) if d.id == control => {
                    let n = shared.input_messages.fetch_add(1, Ordering::Relaxed) + 1;
                    let preview = &d.data[..d.data.len().min(120)];
                    tracing::info!(
                        count = n,
                        len = d.data.len(),
                        binary = d.binary,
                        msg = %String::from_utf8_lossy(preview),
                        "input message received"
                    );
                }
                Event::ChannelClose(id) if id == control => control_open = false,
                Event::Closed => {
                    tracing::info!("edge closed the session");
                    return Ok(());
                }
                _ => {}
            }
        }
        if !rtc.is_alive() {
            anyhow::bail!("peer connection closed");
        }
        if !connected && Instant::now() > connect_deadline {
            anyhow::bail!("not connected after 20 s");
        }

        let now = Instant::now();
        if connected && now >= next_video {
            if video_pt.is_none() {
                video_pt = negotiated_pt(&mut rtc, video_mid, Codec::H264);
                if video_pt.is_none() {
                    anyhow::bail!("edge did not accept H.264");
                }
            }
            let scheduled = next_video;
            next_video += frame_interval;
            if next_video + frame_interval < now {
                // Running late (slow encoder): skip ahead instead of bursting.
                next_video = now + frame_interval;
            }
            let media_ms = (scheduled - start).as_millis() as u64;
            let pic = pattern.render(frame_no, unix_millis());
            frame_no += 1;
            if let (Some(pt), Some(ef)) = (
                video_pt,
                encoder.encode(pic, std::mem::take(&mut force_keyframe), media_ms)?,
            ) {
                let rtp_time = MediaTime::from_90khz(media_ms * 90);
                let len = ef.data.len() as u64;
                let keyframe = ef.keyframe;
                let data: Arc<[u8]> = Arc::from(ef.data);
                match rtc.writer(video_mid) {
                    Some(w) => match w.write(pt, scheduled, rtp_time, data) {
                        Ok(()) => {
                            shared.frames_sent.fetch_add(1, Ordering::Relaxed);
                            shared.video_bytes_sent.fetch_add(len, Ordering::Relaxed);
                            if keyframe {
                                shared.keyframes_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) if !warned_write => {
                            warned_write = true;
                            tracing::warn!("video write failed: {e}");
                        }
                        Err(_) => {}
                    },
                    None => anyhow::bail!("video media disappeared"),
                }
            }
        }

        if let (true, Some(mid)) = (connected, audio_mid) {
            if now >= next_audio {
                if audio_pt.is_none() {
                    audio_pt = negotiated_pt(&mut rtc, mid, Codec::Opus);
                }
                let scheduled = next_audio;
                next_audio += audio_interval;
                if next_audio + audio_interval < now {
                    next_audio = now + audio_interval;
                }
                if let (Some(pt), Some(w)) = (audio_pt, rtc.writer(mid)) {
                    let t = MediaTime::new(audio_samples, Frequency::FORTY_EIGHT_KHZ);
                    if w.write(pt, scheduled, t, opus.clone()).is_ok() {
                        shared.audio_frames_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                audio_samples += 960;
            }
        }

        if control_open {
            if let Some(tick) = cfg.control_tick {
                if now >= next_tick {
                    next_tick = now + tick;
                    let msg = format!(
                        "{{\"type\":\"tick\",\"frame\":{frame_no},\"unix_ms\":{}}}",
                        unix_millis()
                    );
                    send_control(&mut rtc, control, &msg, shared);
                }
            }
            while let Ok(msg) = control_rx.try_recv() {
                send_control(&mut rtc, control, &msg, shared);
            }
        }

        // Sleep in the socket until the earliest of: str0m timeout, next frame,
        // next audio packet, next tick, or a 50 ms stop-flag check.
        let mut deadline = rtc_timeout.min(Instant::now() + Duration::from_millis(50));
        if connected {
            deadline = deadline.min(next_video);
            if audio_mid.is_some() {
                deadline = deadline.min(next_audio);
            }
            if control_open && cfg.control_tick.is_some() {
                deadline = deadline.min(next_tick);
            }
        }
        socket.wait(&mut rtc, deadline)?;
    }

    socket.close(&mut rtc)
}

fn send_control(rtc: &mut Rtc, id: ChannelId, msg: &str, shared: &Shared) {
    if let Some(mut ch) = rtc.channel(id) {
        match ch.write(false, msg.as_bytes()) {
            Ok(true) => {
                shared.control_messages_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => tracing::debug!("control channel buffer full, message dropped"),
            Err(e) => tracing::debug!("control channel write failed: {e}"),
        }
    }
}
