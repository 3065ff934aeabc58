//! The publisher against a minimal WHIP endpoint (one str0m answerer on loopback, no
//! SFU): real HTTP signalling, ICE, DTLS, SRTP and SCTP. The endpoint decodes the
//! H.264 it receives, sends a PLI, and sends messages on `control`.

#![allow(dead_code)]

#[path = "../src/publisher/mod.rs"]
mod publisher;
#[path = "../src/whep_client.rs"]
mod whep_client;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use str0m::change::SdpOffer;
use str0m::media::{KeyframeRequestKind, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

use publisher::{PublishArgs, PublisherStats};

#[derive(Default)]
struct Sink {
    frames: AtomicU64,
    keyframes: AtomicU64,
    decoded: AtomicU64,
    control_in: AtomicU64,
    deleted: AtomicBool,
    stop: AtomicBool,
    auth_ok: AtomicBool,
    first_payload: Mutex<Option<String>>,
}

async fn whip_post(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != "Bearer secret" {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    sink.auth_ok.store(true, Ordering::Relaxed);
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(ct, "application/sdp");
    let sdp = String::from_utf8_lossy(&body).into_owned();
    *sink.first_payload.lock().expect("lock") = Some(sdp.clone());
    let offer = SdpOffer::from_sdp_string(&sdp).expect("offer parses");
    let mut rtc = Rtc::new(Instant::now());
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
    let answer = rtc.sdp_api().accept_offer(offer).expect("offer accepted");
    let s = sink.clone();
    std::thread::spawn(move || sink_loop(rtc, socket, addr, &s));
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp"),
            (header::LOCATION, "/whip/resource/1"),
        ],
        answer.to_sdp_string(),
    )
        .into_response()
}

async fn whip_delete(State(sink): State<Arc<Sink>>) -> StatusCode {
    sink.deleted.store(true, Ordering::Relaxed);
    sink.stop.store(true, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

fn sink_loop(mut rtc: Rtc, socket: UdpSocket, local: SocketAddr, sink: &Sink) {
    let mut decoder = openh264::decoder::Decoder::new().expect("decoder");
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let mut pli_sent = false;
    let mut video_mid = None;
    while !sink.stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
        let timeout = loop {
            match rtc.poll_output().expect("poll") {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
                Output::Event(e) => match e {
                    Event::MediaAdded(m) if m.kind == MediaKind::Video => video_mid = Some(m.mid),
                    Event::MediaData(md) if Some(md.mid) == video_mid => {
                        sink.frames.fetch_add(1, Ordering::Relaxed);
                        if md.is_keyframe() {
                            sink.keyframes.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Ok(Some(_)) = decoder.decode(&md.data) {
                            sink.decoded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Event::ChannelOpen(id, label) => {
                        assert_eq!(label, "control");
                        if let Some(mut ch) = rtc.channel(id) {
                            for i in 0..3 {
                                let _ = ch.write(false, format!("{{\"key\":{i}}}").as_bytes());
                            }
                        }
                    }
                    Event::ChannelData(_) => {
                        sink.control_in.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
            }
        };
        // Ask for a keyframe once the stream runs.
        if !pli_sent && sink.frames.load(Ordering::Relaxed) >= 10 {
            if let Some(mid) = video_mid {
                if let Some(mut w) = rtc.writer(mid) {
                    pli_sent = w.request_keyframe(None, KeyframeRequestKind::Pli).is_ok();
                }
            }
        }
        let now = Instant::now();
        let wait = timeout
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        socket.set_read_timeout(Some(wait)).expect("timeout");
        let input = match socket.recv_from(&mut buf) {
            Ok((n, source)) => match buf[..n].try_into() {
                Ok(contents) => Input::Receive(
                    Instant::now(),
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: local,
                        contents,
                    },
                ),
                Err(_) => continue,
            },
            Err(_) => Input::Timeout(Instant::now()),
        };
        let _ = rtc.handle_input(input);
    }
}

async fn serve(sink: Arc<Sink>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/whip/{room}", post(whip_post))
        .route("/whip/resource/{id}", delete(whip_delete))
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind http");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn small_args(url: String, token: Option<&str>) -> PublishArgs {
    let mut a = PublishArgs::new(url, token.map(str::to_owned));
    a.width = 320;
    a.height = 240;
    a.fps = 15;
    a.bitrate_kbps = 300;
    a.audio = true;
    a.keyframe_interval_ms = 1000;
    a.control_tick_ms = 200;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_streams_decodable_h264_over_whip() {
    let sink = Arc::new(Sink::default());
    let addr = serve(sink.clone()).await;
    let url = format!("http://{addr}/whip/room1");

    let handle = publisher::start(small_args(url, Some("secret")))
        .await
        .expect("publisher starts");
    assert_eq!(
        handle.resource(),
        Some(format!("http://{addr}/whip/resource/1").as_str())
    );
    let offer = sink
        .first_payload
        .lock()
        .expect("lock")
        .clone()
        .expect("offer");
    assert!(
        offer.contains("profile-level-id=42e01f"),
        "offer has H.264 CB"
    );
    assert!(offer.contains("packetization-mode=1"));
    assert!(offer.contains("a=sendonly"));
    assert!(offer.contains("webrtc-datachannel"));
    assert!(offer.contains("typ host"));

    // Wait (bounded) for frames, the PLI-triggered keyframe, and control messages.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stats = PublisherStats::default();
    while Instant::now() < deadline {
        stats = handle.stats();
        if sink.decoded.load(Ordering::Relaxed) >= 30
            && stats.keyframe_requests >= 1
            && stats.input_messages >= 3
            && sink.control_in.load(Ordering::Relaxed) >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stats.connected, "publisher connected: {stats:?}");
    assert!(stats.frames_sent >= 30, "{stats:?}");
    // Every frame arrived and decoded (loopback, no loss), P frames included.
    let frames = sink.frames.load(Ordering::Relaxed);
    assert!(
        sink.decoded.load(Ordering::Relaxed) + 2 >= frames,
        "decoded {} of {frames}",
        sink.decoded.load(Ordering::Relaxed)
    );
    assert!(stats.audio_frames_sent > 0, "{stats:?}");
    assert!(
        sink.decoded.load(Ordering::Relaxed) >= 30,
        "endpoint decoded {} of {} frames",
        sink.decoded.load(Ordering::Relaxed),
        sink.frames.load(Ordering::Relaxed)
    );
    assert!(sink.keyframes.load(Ordering::Relaxed) >= 1);
    assert!(stats.keyframe_requests >= 1, "PLI reached the publisher");
    assert!(
        stats.keyframes_sent >= 2,
        "initial + requested keyframes: {stats:?}"
    );
    assert_eq!(stats.input_messages, 3, "control input counted: {stats:?}");
    assert!(
        sink.control_in.load(Ordering::Relaxed) >= 2,
        "publisher ticks reached the endpoint"
    );

    let end = handle.stop().await.expect("clean stop");
    assert!(end.frames_sent >= stats.frames_sent);
    assert!(sink.deleted.load(Ordering::Relaxed), "DELETE sent on stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reports_rejected_token() {
    let sink = Arc::new(Sink::default());
    let addr = serve(sink.clone()).await;
    let url = format!("http://{addr}/whip/room1");
    let err = publisher::start(small_args(url, Some("wrong")))
        .await
        .err()
        .expect("401 is an error");
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    assert!(!sink.auth_ok.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_client_reports_http_errors() {
    let sink = Arc::new(Sink::default());
    let addr = serve(sink).await;
    // No WHEP route on this server: 404 must come back as an error, not a hang.
    let r = whep_client::view(
        &format!("http://{addr}/whep/room1"),
        Some("v"),
        Duration::from_secs(1),
        None,
    )
    .await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_publisher_uses_its_bitrate() {
    let sink = Arc::new(Sink::default());
    let addr = serve(sink.clone()).await;
    let mut args = small_args(format!("http://{addr}/whip/room1"), Some("secret"));
    args.audio = false;
    args.bitrate_kbps = 400;
    let handle = publisher::start_with_noise(args, true)
        .await
        .expect("publisher starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    while handle.stats().frames_sent < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = handle.stop().await.expect("clean stop");
    assert!(s.frames_sent >= 30, "{s:?}");
    // 30 frames at 15 fps = 2 s; at 400 kbit/s that is about 100 kB.
    let expected = s.frames_sent * 400_000 / 8 / 15;
    assert!(
        s.video_bytes_sent > expected / 2,
        "{} bytes for {} frames (expected about {expected})",
        s.video_bytes_sent,
        s.frames_sent
    );
    assert!(sink.decoded.load(Ordering::Relaxed) >= 20);
}
