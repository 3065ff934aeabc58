//! A minimal WHEP viewer on str0m, used by `demo --check` to prove video flows.
//!
//! [`spawn`] POSTs a recvonly offer (video, audio, and a `control` data channel) to a
//! WHEP URL, applies the answer, and runs the media loop on a std thread. It counts
//! complete video frames (str0m frame mode), keyframes, bytes, the time from the
//! request to the first frame, and control messages. With `decode` it also decodes
//! the H.264 with OpenH264 on a second thread and counts decoded pictures, so
//! "received video" can mean "decoded pictures", not just bytes.

// A library-style API for the demo, the load generator and tests: the binary alone
// does not use every item.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt};
use str0m::{Candidate, Event, IceConnectionState, Rtc, RtcConfig};

use crate::publisher::encoder::annexb_has_idr;
use crate::publisher::net::RtcSocket;
use crate::publisher::signal;

/// Label of the input/control data channel.
const CONTROL_LABEL: &str = "control";
/// Frames queued for the decoder thread before we start dropping (and resync on a keyframe).
const DECODE_QUEUE: usize = 32;
/// Give up if media is not connected within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// What to view and how.
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// WHEP endpoint, e.g. `http://127.0.0.1:8080/whep/demo`.
    pub url: String,
    /// Viewer bearer token.
    pub token: Option<String>,
    /// Sent once on the `control` channel as soon as it opens.
    pub send_control: Option<String>,
    /// Decode the received H.264 (one extra thread per viewer).
    pub decode: bool,
}

impl ViewOptions {
    /// Options with decoding on and no control message.
    pub fn new(url: impl Into<String>, token: Option<String>) -> Self {
        Self {
            url: url.into(),
            token,
            send_control: None,
            decode: true,
        }
    }
}

/// What one viewer saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Role from the `X-Edgerelay-Role` response header (`controller` / `spectator`).
    pub role: Option<String>,
    /// Whether DTLS came up.
    pub connected: bool,
    /// Complete video frames received.
    pub video_frames: u64,
    /// Of which keyframes.
    pub keyframes: u64,
    /// Video payload bytes received.
    pub video_bytes: u64,
    /// Frames that were not contiguous with the previous one (loss).
    pub discontinuities: u64,
    /// Audio frames received.
    pub audio_frames: u64,
    /// Pictures the H.264 decoder produced (0 unless `decode`).
    pub frames_decoded: u64,
    /// Frames the decoder rejected.
    pub decode_errors: u64,
    /// Frames not decoded (queue full, or waiting for a keyframe after a gap).
    pub decode_skipped: u64,
    /// Size of the last decoded picture.
    pub decoded_size: Option<(u32, u32)>,
    /// From sending the WHEP request to the first complete video frame.
    pub time_to_first_frame: Option<Duration>,
    /// Whether the first video frame was a keyframe (a clean start).
    pub first_frame_keyframe: bool,
    /// Messages received on `control` (from the publisher via the edge).
    pub control_messages_received: u64,
    /// Messages sent on `control`.
    pub control_messages_sent: u64,
    /// Why the media loop ended early, if it did.
    pub error: Option<String>,
}

impl ViewStats {
    /// True if video arrived (and was decoded, when decoding was requested).
    pub fn got_video(&self, decode: bool) -> bool {
        self.video_frames > 0 && (!decode || self.frames_decoded > 0)
    }
}

const NONE: u64 = u64::MAX;

struct Shared {
    stop: AtomicBool,
    connected: AtomicBool,
    video_frames: AtomicU64,
    keyframes: AtomicU64,
    video_bytes: AtomicU64,
    discontinuities: AtomicU64,
    audio_frames: AtomicU64,
    frames_decoded: AtomicU64,
    decode_errors: AtomicU64,
    decode_skipped: AtomicU64,
    /// `width << 32 | height`, or NONE.
    decoded_size: AtomicU64,
    /// Microseconds, or NONE.
    first_frame_us: AtomicU64,
    first_frame_keyframe: AtomicBool,
    control_rx: AtomicU64,
    control_tx: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            video_frames: AtomicU64::new(0),
            keyframes: AtomicU64::new(0),
            video_bytes: AtomicU64::new(0),
            discontinuities: AtomicU64::new(0),
            audio_frames: AtomicU64::new(0),
            frames_decoded: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            decode_skipped: AtomicU64::new(0),
            decoded_size: AtomicU64::new(NONE),
            first_frame_us: AtomicU64::new(NONE),
            first_frame_keyframe: AtomicBool::new(false),
            control_rx: AtomicU64::new(0),
            control_tx: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }
}

impl Shared {
    fn snapshot(&self, role: Option<String>) -> ViewStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let size = r(&self.decoded_size);
        let first = r(&self.first_frame_us);
        ViewStats {
            role,
            connected: self.connected.load(Ordering::Relaxed),
            video_frames: r(&self.video_frames),
            keyframes: r(&self.keyframes),
            video_bytes: r(&self.video_bytes),
            discontinuities: r(&self.discontinuities),
            audio_frames: r(&self.audio_frames),
            frames_decoded: r(&self.frames_decoded),
            decode_errors: r(&self.decode_errors),
            decode_skipped: r(&self.decode_skipped),
            decoded_size: (size != NONE).then_some(((size >> 32) as u32, size as u32)),
            time_to_first_frame: (first != NONE).then(|| Duration::from_micros(first)),
            first_frame_keyframe: self.first_frame_keyframe.load(Ordering::Relaxed),
            control_messages_received: r(&self.control_rx),
            control_messages_sent: r(&self.control_tx),
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// A running viewer.
pub struct ViewerHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    control_tx: mpsc::Sender<String>,
    client: reqwest::Client,
    resource: Option<String>,
    token: Option<String>,
    role: Option<String>,
}

impl ViewerHandle {
    /// The role the edge gave this viewer, if it said.
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref()
    }

    /// Current counters.
    pub fn stats(&self) -> ViewStats {
        self.shared.snapshot(self.role.clone())
    }

    /// Whether the media loop has ended (error or remote close).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Queues a text message for the `control` channel (sent once it is open).
    pub fn send_control(&self, msg: impl Into<String>) {
        let _ = self.control_tx.send(msg.into());
    }

    /// Stops the media loop, DELETEs the WHEP resource, and returns the final counters.
    /// A failure of the media loop is reported in [`ViewStats::error`].
    pub async fn stop(mut self) -> ViewStats {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Ok(Err(_)) = tokio::task::spawn_blocking(move || t.join()).await {
                set_error(&self.shared, "viewer media thread panicked".into());
            }
        }
        if let Some(r) = &self.resource {
            if let Err(e) = signal::delete_resource(&self.client, r, self.token.as_deref()).await {
                tracing::warn!("WHEP DELETE failed: {e:#}");
            }
        }
        self.shared.snapshot(self.role.clone())
    }
}

impl Drop for ViewerHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn set_error(shared: &Shared, e: String) {
    if let Ok(mut g) = shared.error.lock() {
        g.get_or_insert(e);
    }
}

fn rtc_config() -> RtcConfig {
    let mut cfg = RtcConfig::new().clear_codecs();
    let cc = cfg.codec_config();
    cc.add_h264(Pt::from(102), Some(Pt::from(103)), true, 0x42e01f);
    cc.add_h264(Pt::from(127), Some(Pt::from(121)), true, 0x42001f);
    cfg.enable_vp8(true).enable_opus(true, false)
}

/// Signals over WHEP and starts the media loop. Returns after the answer is applied.
pub async fn spawn(opts: ViewOptions) -> anyhow::Result<ViewerHandle> {
    let requested = Instant::now();
    let ip = signal::local_ip_for(&opts.url)?;
    let mut rtc = rtc_config().build(Instant::now());
    let socket = RtcSocket::bind(ip)?;
    let cand = Candidate::host(socket.local_addr(), "udp")
        .map_err(|e| anyhow::anyhow!("host candidate: {e}"))?;
    rtc.add_local_candidate(cand);
    let mut api = rtc.sdp_api();
    let video_mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let audio_mid = api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let control = api.add_channel(CONTROL_LABEL.to_owned());
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let token = opts.token.clone();
    let ex =
        signal::post_offer(&client, &opts.url, token.as_deref(), &offer.to_sdp_string()).await?;
    let answer = SdpAnswer::from_sdp_string(&ex.answer)
        .map_err(|e| anyhow::anyhow!("bad SDP answer: {e}"))?;
    if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
        if let Some(r) = &ex.resource {
            let _ = signal::delete_resource(&client, r, token.as_deref()).await;
        }
        anyhow::bail!("answer rejected: {e}");
    }
    tracing::debug!(url = %opts.url, role = ?ex.role, "WHEP session created");

    let shared = Arc::new(Shared::default());
    let (control_tx, control_rx) = mpsc::channel();
    if let Some(m) = opts.send_control.clone() {
        let _ = control_tx.send(m);
    }
    let ctx = LoopCtx {
        video_mid,
        audio_mid,
        control,
        requested,
        decode: opts.decode,
    };
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("whep-viewer".into())
        .spawn(move || {
            if let Err(e) = media_loop(rtc, socket, ctx, &thread_shared, control_rx) {
                tracing::debug!("viewer media loop ended: {e:#}");
                set_error(&thread_shared, format!("{e:#}"));
            }
            thread_shared.connected.store(false, Ordering::Relaxed);
        })?;
    Ok(ViewerHandle {
        shared,
        thread: Some(thread),
        control_tx,
        client,
        resource: ex.resource,
        token,
        role: ex.role,
    })
}

/// Views `url` for `duration` (counted from the request), optionally sending one
/// control message, and returns what arrived. Decodes the video.
pub async fn view(
    url: &str,
    token: Option<&str>,
    duration: Duration,
    send_control: Option<String>,
) -> anyhow::Result<ViewStats> {
    let mut opts = ViewOptions::new(url, token.map(str::to_owned));
    opts.send_control = send_control;
    let h = spawn(opts).await?;
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end && !h.is_finished() {
        tokio::time::sleep(Duration::from_millis(50).min(duration)).await;
    }
    Ok(h.stop().await)
}

struct LoopCtx {
    video_mid: Mid,
    audio_mid: Mid,
    control: ChannelId,
    requested: Instant,
    decode: bool,
}

/// One frame for the decoder thread.
struct DecodeJob {
    data: Arc<[u8]>,
    keyframe: bool,
    contiguous: bool,
}

fn media_loop(
    mut rtc: Rtc,
    mut socket: RtcSocket,
    ctx: LoopCtx,
    shared: &Arc<Shared>,
    control_rx: mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut events: Vec<Event> = Vec::with_capacity(16);
    let mut connected = false;
    let mut control_open = false;
    let mut last_pli: Option<Instant> = None;

    let (decode_tx, decoder) = if ctx.decode {
        let (tx, rx) = mpsc::sync_channel::<DecodeJob>(DECODE_QUEUE);
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("whep-decode".into())
            .spawn(move || decode_loop(rx, &s))?;
        (Some(tx), Some(t))
    } else {
        (None, None)
    };

    let result = (|| -> anyhow::Result<()> {
        while !shared.stop.load(Ordering::Relaxed) {
            let timeout = socket.drain(&mut rtc, &mut events)?;
            for ev in events.drain(..) {
                match ev {
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        anyhow::bail!("ICE disconnected");
                    }
                    Event::Connected => {
                        connected = true;
                        shared.connected.store(true, Ordering::Relaxed);
                    }
                    Event::MediaData(md) if md.mid == ctx.video_mid => {
                        let n = shared.video_frames.fetch_add(1, Ordering::Relaxed);
                        let is_h264 = md.params.spec().codec == Codec::H264;
                        let keyframe = md.is_keyframe() || (is_h264 && annexb_has_idr(&md.data));
                        if n == 0 {
                            let us = ctx.requested.elapsed().as_micros() as u64;
                            shared.first_frame_us.store(us, Ordering::Relaxed);
                            shared
                                .first_frame_keyframe
                                .store(keyframe, Ordering::Relaxed);
                        }
                        if keyframe {
                            shared.keyframes.fetch_add(1, Ordering::Relaxed);
                        }
                        if !md.contiguous {
                            shared.discontinuities.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            if !keyframe
                                && last_pli.is_none_or(|t| now - t > Duration::from_secs(1))
                            {
                                last_pli = Some(now);
                                if let Some(mut w) = rtc.writer(ctx.video_mid) {
                                    let _ = w.request_keyframe(md.rid, KeyframeRequestKind::Pli);
                                }
                            }
                        }
                        shared
                            .video_bytes
                            .fetch_add(md.data.len() as u64, Ordering::Relaxed);
                        if let (Some(tx), true) = (&decode_tx, is_h264) {
                            let job = DecodeJob {
                                data: md.data.clone(),
                                keyframe,
                                contiguous: md.contiguous,
                            };
                            if tx.try_send(job).is_err() {
                                shared.decode_skipped.fetch_add(1, Ordering::Relaxed);
                                // Tell the decoder a frame is missing: it resyncs on a keyframe.
                                let _ = tx.try_send(DecodeJob {
                                    data: Arc::from(&[][..]),
                                    keyframe: false,
                                    contiguous: false,
                                });
                            }
                        }
                    }
                    Event::MediaData(md) if md.mid == ctx.audio_mid => {
                        shared.audio_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::ChannelOpen(id, label)
                        if id == ctx.control || label == CONTROL_LABEL =>
                    {
                        control_open = true;
                    }
                    Event::ChannelData(d) if d.id == ctx.control => {
                        shared.control_rx.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::ChannelClose(id) if id == ctx.control => control_open = false,
                    Event::Closed => return Ok(()),
                    _ => {}
                }
            }
            if !rtc.is_alive() {
                anyhow::bail!("peer connection closed");
            }
            if !connected && start.elapsed() > CONNECT_TIMEOUT {
                anyhow::bail!("not connected after {} s", CONNECT_TIMEOUT.as_secs());
            }
            if control_open {
                while let Ok(msg) = control_rx.try_recv() {
                    if let Some(mut ch) = rtc.channel(ctx.control) {
                        if let Ok(true) = ch.write(false, msg.as_bytes()) {
                            shared.control_tx.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            let deadline = timeout.min(Instant::now() + Duration::from_millis(50));
            socket.wait(&mut rtc, deadline)?;
        }
        socket.close(&mut rtc)
    })();

    drop(decode_tx);
    if let Some(t) = decoder {
        if t.join().is_err() {
            set_error(shared, "decoder thread panicked".into());
        }
    }
    result
}

/// Decodes frames in order; after a gap it skips until the next keyframe.
fn decode_loop(rx: mpsc::Receiver<DecodeJob>, shared: &Shared) {
    use openh264::formats::YUVSource;
    let mut decoder = match openh264::decoder::Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            set_error(shared, format!("openh264 decoder: {e}"));
            return;
        }
    };
    let mut synced = false;
    while let Ok(job) = rx.recv() {
        if !job.contiguous && !job.keyframe {
            synced = false;
        }
        if job.keyframe {
            synced = true;
        }
        if !synced || job.data.is_empty() {
            if !job.data.is_empty() {
                shared.decode_skipped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        match decoder.decode(&job.data) {
            Ok(Some(pic)) => {
                shared.frames_decoded.fetch_add(1, Ordering::Relaxed);
                let (w, h) = pic.dimensions();
                shared.decoded_size.store(
                    ((w as u64) << 32) | (h as u64 & 0xFFFF_FFFF),
                    Ordering::Relaxed,
                );
            }
            Ok(None) => {}
            Err(e) => {
                shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("decode error: {e}");
                synced = false;
            }
        }
    }
}
