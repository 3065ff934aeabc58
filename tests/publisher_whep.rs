//! The WHEP client against a minimal WHEP endpoint (one str0m answerer on loopback
//! that sends our encoded test pattern; no SFU): counting, keyframes, decoding,
//! role header, and the control channel in both directions.

#![allow(dead_code)]

#[path = "../src/publisher/mod.rs"]
mod publisher;
#[path = "../src/whep_client.rs"]
mod whep_client;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

use publisher::encoder::{EncoderSettings, VideoEncoder};
use publisher::pattern::PatternGenerator;

#[derive(Default)]
struct Source {
    control_in: AtomicU64,
    deleted: AtomicBool,
    stop: AtomicBool,
}

async fn whep_post(State(src): State<Arc<Source>>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != "Bearer viewer" {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let offer = match SdpOffer::from_sdp_string(&String::from_utf8_lossy(&body)) {
        Ok(o) => o,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let mut rtc = Rtc::new(Instant::now());
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
    let answer = rtc.sdp_api().accept_offer(offer).expect("offer accepted");
    let s = src.clone();
    std::thread::spawn(move || source_loop(rtc, socket, addr, &s));
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp"),
            (header::LOCATION, "/whep/resource/7"),
            (
                header::HeaderName::from_static("x-edgerelay-role"),
                "controller",
            ),
        ],
        answer.to_sdp_string(),
    )
        .into_response()
}

async fn whep_delete(State(src): State<Arc<Source>>) -> StatusCode {
    src.deleted.store(true, Ordering::Relaxed);
    src.stop.store(true, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

/// Sends the test pattern at 15 fps (IDR every 10 frames) once connected.
fn source_loop(mut rtc: Rtc, socket: UdpSocket, local: SocketAddr, src: &Source) {
    let mut pattern = PatternGenerator::new(320, 240).expect("pattern");
    let mut enc = VideoEncoder::new(EncoderSettings {
        bitrate_bps: 400_000,
        fps: 15,
        keyframe_interval_frames: 10,
    })
    .expect("encoder");
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let mut video = None;
    let mut connected = false;
    let mut frame_no = 0u64;
    let mut next = start;
    while !src.stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
        let timeout = loop {
            match rtc.poll_output().expect("poll") {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
                Output::Event(e) => match e {
                    Event::Connected => connected = true,
                    Event::MediaAdded(m) if m.kind == MediaKind::Video => video = Some(m.mid),
                    Event::ChannelOpen(id, label) => {
                        assert_eq!(label, "control");
                        if let Some(mut ch) = rtc.channel(id) {
                            let _ = ch.write(false, b"{\"type\":\"tick\"}");
                            let _ = ch.write(false, b"{\"type\":\"tick\"}");
                        }
                    }
                    Event::ChannelData(_) => {
                        src.control_in.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
            }
        };
        let now = Instant::now();
        if let (true, Some(mid), true) = (connected, video, now >= next) {
            next += Duration::from_millis(66);
            let ms = frame_no * 66;
            let pic = pattern.render(frame_no, ms);
            frame_no += 1;
            if let Some(ef) = enc.encode(pic, false, ms).expect("encode") {
                let data: Arc<[u8]> = Arc::from(ef.data);
                if let Some(w) = rtc.writer(mid) {
                    let pt = w
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::H264)
                        .map(|p| p.pt())
                        .expect("H.264 negotiated");
                    let _ = w.write(pt, now, MediaTime::from_90khz(ms * 90), data);
                }
            }
        }
        let wait = timeout
            .min(next)
            .saturating_duration_since(Instant::now())
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

async fn serve(src: Arc<Source>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/whep/{room}", post(whep_post))
        .route("/whep/resource/{id}", delete(whep_delete))
        .with_state(src);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind http");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_client_counts_and_decodes_video() {
    let src = Arc::new(Source::default());
    let addr = serve(src.clone()).await;
    let stats = whep_client::view(
        &format!("http://{addr}/whep/room1"),
        Some("viewer"),
        Duration::from_secs(3),
        Some("{\"type\":\"key\",\"code\":30}".into()),
    )
    .await
    .expect("view");
    assert_eq!(stats.error, None);
    assert_eq!(stats.role.as_deref(), Some("controller"));
    assert!(stats.video_frames >= 20, "{stats:?}");
    assert!(stats.keyframes >= 2, "IDR every 10 frames: {stats:?}");
    assert!(stats.frames_decoded >= 20, "{stats:?}");
    assert!(stats.frames_decoded + 2 >= stats.video_frames, "{stats:?}");
    assert_eq!(stats.decode_errors, 0, "{stats:?}");
    assert_eq!(stats.decoded_size, Some((320, 240)));
    assert!(stats.got_video(true));
    let ttff = stats.time_to_first_frame.expect("first frame time");
    assert!(ttff < Duration::from_secs(3));
    assert!(stats.video_bytes > 1000);
    assert_eq!(stats.control_messages_received, 2, "{stats:?}");
    assert_eq!(stats.control_messages_sent, 1, "{stats:?}");
    assert_eq!(src.control_in.load(Ordering::Relaxed), 1);
    assert!(src.deleted.load(Ordering::Relaxed), "DELETE sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_client_rejects_bad_token_and_bad_url() {
    let src = Arc::new(Source::default());
    let addr = serve(src).await;
    let err = whep_client::view(
        &format!("http://{addr}/whep/room1"),
        Some("nope"),
        Duration::from_secs(1),
        None,
    )
    .await
    .expect_err("401 is an error");
    assert!(format!("{err:#}").contains("401"));
    assert!(
        whep_client::view("not a url", None, Duration::from_secs(1), None)
            .await
            .is_err()
    );
}
