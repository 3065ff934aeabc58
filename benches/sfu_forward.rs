//! Criterion micro-bench of the SFU core's per-packet fan-out, in memory: one
//! publisher and 1, 10 or 100 viewers (real str0m peers, connected through ICE, DTLS
//! and SRTP as in sfu/tests/common), a simulated clock, no sockets.
//!
//! One iteration = one 30 fps video frame (5 RTP packets of ~1 KB) from the publisher:
//! the timed part is the SFU's work only, `Sfu::handle_datagram` for each SRTP packet
//! (unprotect, cache, rewrite and SRTP-protect once per viewer) plus draining
//! `Sfu::poll_transmit` and one `Sfu::handle_timeout`. The publisher's encryption and
//! the viewers' housekeeping (ICE consent, RTCP) run untimed between iterations;
//! viewers do not decrypt the forwarded RTP (no syscall, no receiver). Criterion's
//! throughput is in forwarded packets, so its "time per element" is the SFU's cost per
//! forwarded packet. Sent RTP buffers go back to the SFU (`Sfu::recycle`), as the
//! driver hands them back after each send.
//!
//! `cargo bench --bench sfu_forward`

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay_sfu::{is_rtp, RoleRequest, Sfu, SfuConfig};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// Payload bytes of a P-frame: 5 packets at str0m's default MTU.
const P_FRAME_BYTES: usize = 5 * 1000;
const FRAME: Duration = Duration::from_millis(33);

struct Client {
    rtc: Rtc,
    addr: SocketAddr,
    video: Option<Mid>,
    connected: bool,
    next_timeout: Instant,
}

struct World {
    sfu: Sfu,
    clients: Vec<Client>,
    now: Instant,
    frame_no: u32,
    /// Non-RTP datagrams from the SFU kept for the untimed housekeeping.
    pending: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

fn frame(n: u32, key: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(P_FRAME_BYTES + 32);
    if key {
        v.extend_from_slice(&[
            0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xf6, 0xc0,
        ]);
        v.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80]);
        v.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84]);
    } else {
        v.extend_from_slice(&[0, 0, 0, 1, 0x41, 0x9a, 0x02]);
    }
    v.extend(std::iter::repeat_n((n % 251) as u8 | 1, P_FRAME_BYTES));
    v
}

impl World {
    fn new(viewers: usize) -> World {
        let sfu_addr: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let cfg = SfuConfig {
            candidates: vec![sfu_addr],
            // No receiver sends TWCC feedback here: keep bandwidth estimation out.
            bwe: false,
            ..SfuConfig::default()
        };
        let now = Instant::now();
        let mut w = World {
            sfu: Sfu::new(cfg),
            clients: Vec::new(),
            now,
            frame_no: 0,
            pending: Vec::new(),
        };
        w.add(true);
        for _ in 0..viewers {
            w.add(false);
        }
        for _ in 0..500 {
            if w.clients.iter().all(|c| c.connected) {
                break;
            }
            w.advance(Duration::from_millis(10));
        }
        assert!(
            w.clients.iter().all(|c| c.connected),
            "peers did not connect"
        );
        // A keyframe and a second of video so every viewer is started and live.
        for i in 0..30 {
            w.publish_frame(i == 0);
            w.advance(FRAME);
        }
        w
    }

    fn add(&mut self, publisher: bool) {
        let i = self.clients.len();
        let addr: SocketAddr = format!("127.0.{}.{}:6000", 1 + i / 250, 1 + i % 250)
            .parse()
            .expect("addr");
        let mut rtc = Rtc::builder()
            .clear_codecs()
            .enable_h264(true)
            .build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        let dir = if publisher {
            Direction::SendOnly
        } else {
            Direction::RecvOnly
        };
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Video, dir, None, None, None);
        let (offer, pending) = api.apply().expect("offer");
        let j = if publisher {
            self.sfu.publish(self.now, "bench", &offer.to_sdp_string())
        } else {
            self.sfu
                .view(self.now, "bench", &offer.to_sdp_string(), RoleRequest::Auto)
        }
        .expect("joined");
        let answer = SdpAnswer::from_sdp_string(&j.sdp).expect("answer");
        rtc.sdp_api()
            .accept_answer(pending, answer)
            .expect("accept");
        self.clients.push(Client {
            rtc,
            addr,
            video: Some(mid),
            connected: false,
            next_timeout: self.now,
        });
    }

    /// Drains a client's output into the SFU (untimed housekeeping).
    fn poll_client(&mut self, i: usize) -> bool {
        let mut sent = false;
        loop {
            let Ok(out) = self.clients[i].rtc.poll_output() else {
                return sent;
            };
            match out {
                Output::Timeout(t) => {
                    self.clients[i].next_timeout = t;
                    return sent;
                }
                Output::Transmit(t) => {
                    sent = true;
                    self.sfu
                        .handle_datagram(self.now, t.source, t.destination, &t.contents);
                }
                Output::Event(Event::Connected) => self.clients[i].connected = true,
                Output::Event(_) => {}
            }
        }
    }

    fn deliver(&mut self, src: SocketAddr, dst: SocketAddr, data: &[u8]) {
        if let Some(i) = self.clients.iter().position(|c| c.addr == dst) {
            if let Ok(r) = Receive::new(Protocol::Udp, src, dst, data) {
                let _ = self.clients[i]
                    .rtc
                    .handle_input(Input::Receive(self.now, r));
            }
            self.poll_client(i);
        }
    }

    /// Moves every datagram until quiet (untimed); viewers get everything but RTP.
    fn settle(&mut self) {
        for (s, d, data) in std::mem::take(&mut self.pending) {
            self.deliver(s, d, &data);
        }
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(t) = self.sfu.poll_transmit() {
                moved = true;
                let to_publisher = t.destination == self.clients[0].addr;
                if to_publisher || !is_rtp(&t.contents) || self.frame_no < 30 {
                    let data = t.contents.to_vec();
                    self.deliver(t.source, t.destination, &data);
                }
            }
            for i in 0..self.clients.len() {
                moved |= self.poll_client(i);
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, dt: Duration) {
        let end = self.now + dt;
        while self.now < end {
            self.now += Duration::from_millis(5).min(end - self.now);
            let now = self.now;
            self.sfu.handle_timeout(now);
            for c in &mut self.clients {
                if c.next_timeout <= now {
                    let _ = c.rtc.handle_input(Input::Timeout(now));
                }
            }
            self.settle();
        }
    }

    /// The publisher writes one frame; returns its SRTP datagrams (to the SFU).
    fn publisher_datagrams(&mut self, key: bool) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let n = self.frame_no;
        self.frame_no += 1;
        let now = self.now;
        let c = &mut self.clients[0];
        let mid = c.video.expect("mid");
        if let Some(w) = c.rtc.writer(mid) {
            let pt = w
                .payload_params()
                .find(|p| p.spec().codec == Codec::H264)
                .map(|p| p.pt())
                .expect("h264");
            let t = MediaTime::from_90khz(u64::from(n) * 3000);
            w.write(pt, now, t, frame(n, key)).expect("write");
        }
        // str0m releases new media on its next timeout.
        let _ = c.rtc.handle_input(Input::Timeout(now));
        let mut out = Vec::new();
        while let Ok(o) = c.rtc.poll_output() {
            match o {
                Output::Timeout(t) => {
                    c.next_timeout = t;
                    break;
                }
                Output::Transmit(t) => out.push((t.source, t.destination, t.contents.to_vec())),
                Output::Event(_) => {}
            }
        }
        out
    }

    fn publish_frame(&mut self, key: bool) {
        for (s, d, data) in self.publisher_datagrams(key) {
            self.sfu.handle_datagram(self.now, s, d, &data);
        }
    }

    /// One timed frame: returns (SFU time, RTP packets forwarded).
    fn timed_frame(&mut self) -> (Duration, u64) {
        let dgrams = self.publisher_datagrams(false);
        let now = self.now;
        let mut forwarded = 0u64;
        let t0 = Instant::now();
        for (s, d, data) in &dgrams {
            self.sfu.handle_datagram(now, *s, *d, data);
        }
        self.sfu.handle_timeout(now);
        let publisher = self.clients[0].addr;
        while let Some(t) = self.sfu.poll_transmit() {
            if is_rtp(&t.contents) && t.destination != publisher {
                forwarded += 1;
                black_box(&t.contents);
                // As the driver does once the datagram is sent.
                self.sfu.recycle(t.contents.into());
            } else {
                self.pending
                    .push((t.source, t.destination, t.contents.to_vec()));
            }
        }
        let el = t0.elapsed();
        self.advance(FRAME);
        (el, forwarded)
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sfu_forward");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    for viewers in [1usize, 10, 100, 500] {
        let mut w = World::new(viewers);
        // Calibrate the packets per frame (str0m's packetizer decides).
        let (_, per_frame) = w.timed_frame();
        assert!(per_frame > 0, "nothing forwarded");
        g.throughput(Throughput::Elements(per_frame));
        g.bench_with_input(BenchmarkId::from_parameter(viewers), &viewers, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += w.timed_frame().0;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
