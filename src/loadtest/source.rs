//! The bench source: the built-in publisher's H.264 encoder (test pattern with a noise
//! band, so the bitrate is real) encodes a few seconds of video once; the source then
//! loops those frames at the frame rate, stamping each frame with its send time in an
//! SEI NAL unit (see [`super::h264`]), and sends the same packets
//!
//! * over WHIP to an edge, as a str0m peer in RTP mode (SRTP, NACK/RTX answered), and/or
//! * as plain RTP (payload type 96) to a UDP address, e.g. a Janus streaming mountpoint.
//!
//! Encoding once keeps the generator's CPU (which shares the machine with the server
//! under test) low and makes both servers receive byte-identical streams. A keyframe
//! request makes the source jump to the next keyframe of the loop.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, Input, Rtc, RtcConfig};

use super::h264;
use super::pacer::Pacer;
use crate::publisher::encoder::{EncoderSettings, VideoEncoder};
use crate::publisher::net::RtcSocket;
use crate::publisher::pattern::{PatternGenerator, Yuv};
use crate::publisher::signal;

/// RTP payload size limit of the source.
const MTU: usize = 1200;
/// Payload type of the plain RTP output (the Janus mountpoint's `videopt`).
pub const PLAIN_RTP_PT: u8 = 96;
/// Magic of the encoded-loop cache file.
const CACHE_MAGIC: &[u8; 8] = b"ERLOOP01";
/// Most keyframe request times kept.
pub const MAX_KEYFRAME_TIMES: usize = 100_000;

/// What the source sends and where.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// WHIP endpoint of the edge (optional).
    pub whip: Option<String>,
    /// Bearer token for `whip`.
    pub whip_token: Option<String>,
    /// Plain RTP destination (optional).
    pub rtp: Option<SocketAddr>,
    /// Picture size.
    pub width: u32,
    /// Picture height.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Target bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// Keyframe interval in frames.
    pub gop_frames: u32,
    /// Length of the encoded loop in frames (rounded up to whole GOPs).
    pub loop_frames: u32,
    /// Cache file for the encoded loop (loaded if present, written otherwise).
    pub cache: Option<PathBuf>,
    /// Send a frame's packets spread out at this rate, as a libwebrtc sender's
    /// pacer does (about 2.5x the bitrate); 0 = back to back, as they are
    /// packetized (the harder case for the edge: a frame arrives as one burst).
    pub pace_kbps: u32,
    /// How far the pacer may run ahead of `pace_kbps` (libwebrtc's burst interval).
    pub pace_burst: Duration,
}

/// One encoded frame of the loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopFrame {
    /// Whether it is an IDR frame.
    pub keyframe: bool,
    /// Annex B bytes.
    pub data: Vec<u8>,
}

/// Counters of a running source.
#[derive(Default, Debug)]
pub struct SourceStats {
    /// Frames sent.
    pub frames: AtomicU64,
    /// RTP packets sent (per sink).
    pub packets: AtomicU64,
    /// Payload bytes sent (per sink).
    pub bytes: AtomicU64,
    /// Keyframe requests received over WHIP.
    pub keyframe_requests: AtomicU64,
    /// When each keyframe request arrived (the first [`MAX_KEYFRAME_TIMES`]), so the
    /// report can check the edge's "one upstream request per 300 ms" promise.
    pub keyframe_request_times: std::sync::Mutex<Vec<Instant>>,
    /// Whether the WHIP session is connected (true when there is no WHIP sink).
    pub connected: AtomicBool,
}

/// A running source; dropping it stops the thread.
pub struct Source {
    stop: Arc<AtomicBool>,
    /// Live counters.
    pub stats: Arc<SourceStats>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    resource: Option<(reqwest::Client, String, Option<String>)>,
}

impl Source {
    /// Whether the media thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread and deletes the WHIP resource.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let r = match self.thread.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join())
                .await?
                .unwrap_or_else(|_| Err(anyhow::anyhow!("source thread panicked"))),
            None => Ok(()),
        };
        if let Some((client, url, token)) = self.resource.take() {
            let _ = signal::delete_resource(&client, &url, token.as_deref()).await;
        }
        r
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Encodes (or loads from the cache) the frame loop.
pub fn encoded_loop(cfg: &SourceConfig) -> anyhow::Result<Vec<LoopFrame>> {
    if let Some(p) = &cfg.cache {
        if p.exists() {
            match load_cache(p) {
                Ok(v) if !v.is_empty() => return Ok(v),
                Ok(_) => tracing::warn!(path = %p.display(), "empty loop cache; re-encoding"),
                Err(e) => {
                    tracing::warn!(path = %p.display(), "bad loop cache ({e:#}); re-encoding")
                }
            }
        }
    }
    anyhow::ensure!(cfg.fps > 0 && cfg.gop_frames > 0, "fps and GOP must be > 0");
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    // A band of random luma is incompressible: about 3.9 bits per pixel with this
    // encoder. Size it for ~85% of the budget, measure, correct once.
    let target_bits = f64::from(cfg.bitrate_kbps) * 1000.0 / f64::from(cfg.fps);
    let mut rows = ((target_bits * 0.85 / (3.9 * w as f64)) as usize).clamp(0, h);
    let mut frames = encode_frames(cfg, rows)?;
    let kbps = loop_kbps(&frames, cfg.fps);
    if kbps > 0.0 && rows > 0 {
        let err = kbps / f64::from(cfg.bitrate_kbps);
        if !(0.9..=1.1).contains(&err) {
            let nrows = ((rows as f64 / err).round() as usize).clamp(1, h);
            tracing::info!(
                kbps,
                rows,
                nrows,
                "re-encoding the loop with a corrected noise band"
            );
            rows = nrows;
            frames = encode_frames(cfg, rows)?;
        }
    }
    if let Some(p) = &cfg.cache {
        if let Err(e) = save_cache(p, &frames) {
            tracing::warn!(path = %p.display(), "cannot write loop cache: {e:#}");
        }
    }
    Ok(frames)
}

/// Average bitrate of a loop in kbit/s.
pub fn loop_kbps(frames: &[LoopFrame], fps: u32) -> f64 {
    let bytes: usize = frames.iter().map(|f| f.data.len()).sum();
    bytes as f64 * 8.0 * f64::from(fps) / frames.len().max(1) as f64 / 1000.0
}

/// Encodes the loop with a band of `noise_rows` rows of random luma at the bottom.
fn encode_frames(cfg: &SourceConfig, noise_rows: usize) -> anyhow::Result<Vec<LoopFrame>> {
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    let gops = cfg.loop_frames.div_ceil(cfg.gop_frames).max(1);
    let n = gops * cfg.gop_frames;
    let mut pattern = PatternGenerator::new(w, h)?;
    let mut enc = VideoEncoder::new(EncoderSettings {
        bitrate_bps: cfg.bitrate_kbps.saturating_mul(1000),
        fps: cfg.fps,
        keyframe_interval_frames: cfg.gop_frames,
    })?;
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut frames = Vec::with_capacity(n as usize);
    for i in 0..n {
        let ms = u64::from(i) * 1000 / u64::from(cfg.fps);
        let mut pic = pattern.render(u64::from(i), unix_micros() / 1000).clone();
        for y in h.saturating_sub(noise_rows)..h {
            for x in 0..w {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let luma = 16 + (rng % 220) as u8;
                pic.fill_rect(
                    x,
                    y,
                    1,
                    1,
                    Yuv {
                        y: luma,
                        u: 128,
                        v: 128,
                    },
                );
            }
        }
        let force = i % cfg.gop_frames == 0;
        if let Some(ef) = enc.encode(&pic, force, ms)? {
            frames.push(LoopFrame {
                keyframe: ef.keyframe,
                data: ef.data.to_vec(),
            });
        }
    }
    anyhow::ensure!(
        frames.first().is_some_and(|f| f.keyframe),
        "encoder did not start with a keyframe"
    );
    Ok(frames)
}

fn save_cache(p: &Path, frames: &[LoopFrame]) -> anyhow::Result<()> {
    let tmp = p.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(CACHE_MAGIC)?;
    for fr in frames {
        f.write_all(&[u8::from(fr.keyframe)])?;
        f.write_all(&(fr.data.len() as u32).to_be_bytes())?;
        f.write_all(&fr.data)?;
    }
    f.flush()?;
    drop(f);
    std::fs::rename(tmp, p)?;
    Ok(())
}

fn load_cache(p: &Path) -> anyhow::Result<Vec<LoopFrame>> {
    let mut buf = Vec::new();
    std::fs::File::open(p)?.read_to_end(&mut buf)?;
    anyhow::ensure!(buf.starts_with(CACHE_MAGIC), "bad magic");
    let mut i = CACHE_MAGIC.len();
    let mut out = Vec::new();
    while i < buf.len() {
        let hdr = buf
            .get(i..i + 5)
            .ok_or_else(|| anyhow::anyhow!("truncated"))?;
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let data = buf
            .get(i + 5..i + 5 + len)
            .ok_or_else(|| anyhow::anyhow!("truncated frame"))?;
        out.push(LoopFrame {
            keyframe: hdr[0] != 0,
            data: data.to_vec(),
        });
        i += 5 + len;
    }
    Ok(out)
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The WHIP sink: a str0m peer in RTP mode.
struct WhipSink {
    rtc: Rtc,
    socket: RtcSocket,
    mid: Mid,
    pt: Option<Pt>,
    seq: u64,
    connected: bool,
}

/// Starts the source: signals over WHIP if configured, then runs the send loop.
pub async fn start(cfg: SourceConfig) -> anyhow::Result<Source> {
    anyhow::ensure!(
        cfg.whip.is_some() || cfg.rtp.is_some(),
        "the source needs a WHIP URL or an RTP destination"
    );
    let frames = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || encoded_loop(&c)).await??
    };
    let bytes: usize = frames.iter().map(|f| f.data.len()).sum();
    tracing::info!(
        frames = frames.len(),
        kbps = bytes as u64 * 8 * u64::from(cfg.fps) / frames.len().max(1) as u64 / 1000,
        "source loop ready"
    );
    let stats = Arc::new(SourceStats::default());
    let mut resource = None;
    let whip = match &cfg.whip {
        Some(url) => {
            let ip = signal::local_ip_for(url)?;
            let mut rtc = RtcConfig::new().clear_codecs().set_rtp_mode(true);
            rtc.codec_config()
                .add_h264(Pt::from(102), Some(Pt::from(103)), true, 0x42e01f);
            let mut rtc = rtc.build(Instant::now());
            let socket = RtcSocket::bind(ip)?;
            let cand = Candidate::host(socket.local_addr(), "udp")
                .map_err(|e| anyhow::anyhow!("host candidate: {e}"))?;
            rtc.add_local_candidate(cand);
            let mut api = rtc.sdp_api();
            let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
            let (offer, pending) = api
                .apply()
                .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            let ex = signal::post_offer(
                &client,
                url,
                cfg.whip_token.as_deref(),
                &offer.to_sdp_string(),
            )
            .await?;
            let answer = SdpAnswer::from_sdp_string(&ex.answer)
                .map_err(|e| anyhow::anyhow!("bad SDP answer: {e}"))?;
            rtc.sdp_api()
                .accept_answer(pending, answer)
                .map_err(|e| anyhow::anyhow!("answer rejected: {e}"))?;
            if let Some(r) = ex.resource {
                resource = Some((client, r, cfg.whip_token.clone()));
            }
            Some(WhipSink {
                rtc,
                socket,
                mid,
                pt: None,
                seq: 1,
                connected: false,
            })
        }
        None => {
            stats.connected.store(true, Ordering::Relaxed);
            None
        }
    };
    let plain = match cfg.rtp {
        Some(dest) => {
            let bind: SocketAddr = if dest.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let s = UdpSocket::bind(bind)?;
            s.connect(dest)?;
            Some(s)
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (st, s2) = (stop.clone(), stats.clone());
    let fps = cfg.fps;
    let pacer = Pacer::new(
        u64::from(cfg.pace_kbps) * 1000,
        cfg.pace_burst,
        Instant::now(),
    );
    let thread = std::thread::Builder::new()
        .name("loadtest-source".into())
        .spawn(move || {
            let r = send_loop(frames, fps, pacer, whip, plain, &st, &s2);
            if let Err(e) = &r {
                tracing::warn!("source ended: {e:#}");
            }
            r
        })?;
    Ok(Source {
        stop,
        stats,
        thread: Some(thread),
        resource,
    })
}

fn h264_pt(rtc: &mut Rtc, mid: Mid) -> Option<Pt> {
    let remote = rtc.media(mid)?.remote_pts().to_vec();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::H264 && remote.contains(&p.pt()))
        .map(|p| p.pt())
}

fn send_loop(
    frames: Vec<LoopFrame>,
    fps: u32,
    mut pacer: Pacer,
    mut whip: Option<WhipSink>,
    plain: Option<UdpSocket>,
    stop: &AtomicBool,
    stats: &SourceStats,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs(1) / fps.max(1);
    let ssrc: u32 = rand::random();
    let mut plain_seq: u16 = rand::random();
    let mut events = Vec::new();
    let start = Instant::now();
    let mut next = start;
    let mut idx = 0usize;
    let mut frame_no: u64 = 0;
    let mut jump_to_key = false;
    let mut rtp_buf = Vec::with_capacity(MTU + 12);
    // Packets written by the encoder side, waiting for the pacer: (payload, marker, ts).
    let mut paced: VecDeque<(Vec<u8>, bool, u32)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let mut deadline = Instant::now() + Duration::from_millis(50);
        if let Some(w) = whip.as_mut() {
            let t = w.socket.drain(&mut w.rtc, &mut events)?;
            deadline = deadline.min(t);
            for ev in events.drain(..) {
                match ev {
                    Event::Connected => {
                        w.connected = true;
                        stats.connected.store(true, Ordering::Relaxed);
                        tracing::info!("source connected over WHIP");
                    }
                    Event::KeyframeRequest(_) => {
                        stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut t) = stats.keyframe_request_times.lock() {
                            if t.len() < MAX_KEYFRAME_TIMES {
                                t.push(Instant::now());
                            }
                        }
                        jump_to_key = true;
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        anyhow::bail!("WHIP session: ICE disconnected");
                    }
                    _ => {}
                }
            }
            if !w.rtc.is_alive() {
                anyhow::bail!("WHIP session closed");
            }
            if !w.connected && start.elapsed() > Duration::from_secs(20) {
                anyhow::bail!("WHIP session not connected after 20 s");
            }
        }
        let ready = whip.as_ref().is_none_or(|w| w.connected);
        let now = Instant::now();
        if ready && now >= next {
            next += interval;
            if next + interval < now {
                next = now + interval;
            }
            if jump_to_key {
                jump_to_key = false;
                if let Some(k) = (0..frames.len())
                    .map(|d| (idx + d) % frames.len())
                    .find(|&i| frames[i].keyframe)
                {
                    idx = k;
                }
            }
            let f = &frames[idx % frames.len()];
            idx = (idx + 1) % frames.len();
            let ts = (frame_no * 90_000 / u64::from(fps.max(1))) as u32;
            frame_no += 1;
            let nals = h264::split_annexb(&f.data);
            let sei = h264::stamp_sei(unix_micros());
            let nals = h264::with_sei(&nals, &sei);
            if paced.is_empty() {
                pacer.restart(Instant::now());
            }
            paced.extend(
                h264::packetize(&nals, MTU)
                    .into_iter()
                    .map(|(p, m)| (p, m, ts)),
            );
            stats.frames.fetch_add(1, Ordering::Relaxed);
        }
        // Send what the pacer allows now (everything, without pacing).
        while ready && paced.front().is_some() {
            let now = Instant::now();
            if !pacer.may_send(now) {
                if let Some(t) = pacer.next_send() {
                    deadline = deadline.min(t);
                }
                break;
            }
            let Some((payload, marker, ts)) = paced.pop_front() else {
                break;
            };
            pacer.sent(payload.len());
            {
                stats.packets.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                if let Some(s) = &plain {
                    rtp_buf.clear();
                    rtp_buf
                        .extend_from_slice(&[0x80, PLAIN_RTP_PT | if marker { 0x80 } else { 0 }]);
                    rtp_buf.extend_from_slice(&plain_seq.to_be_bytes());
                    rtp_buf.extend_from_slice(&ts.to_be_bytes());
                    rtp_buf.extend_from_slice(&ssrc.to_be_bytes());
                    rtp_buf.extend_from_slice(&payload);
                    plain_seq = plain_seq.wrapping_add(1);
                    if let Err(e) = s.send(&rtp_buf) {
                        tracing::debug!("plain RTP send: {e}");
                    }
                }
                if let Some(w) = whip.as_mut() {
                    if w.pt.is_none() {
                        w.pt = h264_pt(&mut w.rtc, w.mid);
                    }
                    let Some(pt) = w.pt else {
                        anyhow::bail!("the edge did not accept H.264");
                    };
                    let mut api = w.rtc.direct_api();
                    let Some(tx) = api.stream_tx_by_mid(w.mid, None) else {
                        anyhow::bail!("WHIP session has no video send stream");
                    };
                    tx.write_rtp(
                        RtpWrite::new(pt, w.seq.into(), ts, now, payload)
                            .marker(marker)
                            .nackable(true),
                    );
                    w.seq += 1;
                    // str0m queues new media until its next timeout: fire it now so each
                    // packet leaves as it is written (as from a live encoder).
                    w.rtc.handle_input(Input::Timeout(Instant::now()))?;
                    let t = w.socket.drain(&mut w.rtc, &mut events)?;
                    deadline = deadline.min(t);
                }
            }
        }
        if ready {
            deadline = deadline.min(next);
        }
        match whip.as_mut() {
            Some(w) => w.socket.wait(&mut w.rtc, deadline)?,
            None => {
                let d = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(d);
            }
        }
    }
    if let Some(w) = whip.as_mut() {
        w.rtc.disconnect();
        let _ = w.socket.drain(&mut w.rtc, &mut events);
    }
    Ok(())
}
