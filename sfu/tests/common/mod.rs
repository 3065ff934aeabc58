//! An in-memory network: real str0m peers (frame mode, like a browser) talk
//! to the SFU core through function calls, with a simulated clock.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgerelay_sfu::{PeerId, RoleRequest, Sfu, SfuConfig, Transmit};
use str0m::change::SdpAnswer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// One remote peer (publisher or viewer) in the simulation.
pub struct Client {
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub peer: Option<PeerId>,
    pub role: Option<edgerelay_sfu::Role>,
    pub video_mid: Option<Mid>,
    pub audio_mid: Option<Mid>,
    pub control: Option<ChannelId>,
    pub control_open: bool,
    pub connected: bool,
    pub frames: Vec<Frame>,
    pub audio_frames: usize,
    pub messages: Vec<String>,
    pub keyframe_requests: usize,
    pub next_timeout: Option<Instant>,
    /// The SFU's ICE ufrag for this client's session (from the answer).
    pub sfu_ufrag: Option<String>,
    /// The SFU's ICE password for this client's session (from the answer).
    pub sfu_pwd: Option<String>,
}

/// A frame a viewer received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub key: bool,
    pub time: MediaTime,
    pub len: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub payload_tag: u8,
}

/// Asserts viewer `v`'s frames came whole and in order: each frame's first sequence
/// number follows the previous frame's last (no gap) and media time moves forward.
pub fn assert_in_order(frames: &[Frame], v: usize) {
    for pair in frames.windows(2) {
        assert_eq!(pair[1].first_seq, pair[0].last_seq + 1, "viewer {v}: a gap");
        assert!(pair[1].time > pair[0].time, "viewer {v}: time went back");
    }
}

pub struct World {
    pub sfu: Sfu,
    pub sfu_addr: SocketAddr,
    pub clients: Vec<Client>,
    pub now: Instant,
    pub start: Instant,
    next_ip: u8,
    /// The address the next client gets instead of a fresh one.
    pub next_addr: Option<SocketAddr>,
    /// Drop every datagram to these client indices (simulated loss) when set.
    pub blackhole: Vec<usize>,
    /// Bandwidth limits on the SFU -> client direction: (client, bits/s, tokens, last refill).
    pub limits: Vec<(usize, u64, f64, Instant)>,
    /// Datagrams dropped by the limits.
    pub limited_drops: u64,
    /// Every n-th RTP datagram to a client is lost: (client, n, count).
    pub lossy: Vec<(usize, u32, u32)>,
    /// Datagrams dropped by `lossy`.
    pub lossy_drops: u64,
}

pub fn sps_pps_idr(n: u32) -> Vec<u8> {
    let mut v = vec![
        0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xf6, 0xc0,
    ];
    v.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80]);
    v.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84]);
    v.extend(std::iter::repeat_n((n % 251) as u8 | 1, 3000));
    v
}

pub fn p_frame(n: u32) -> Vec<u8> {
    let mut v = vec![0, 0, 0, 1, 0x41, 0x9a, 0x02];
    v.extend(std::iter::repeat_n((n % 251) as u8 | 1, 900));
    v
}

impl World {
    pub fn new(cfg: SfuConfig) -> World {
        let sfu_addr: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let mut cfg = cfg;
        cfg.candidates = vec![sfu_addr];
        let now = Instant::now();
        World {
            sfu: Sfu::new(cfg),
            sfu_addr,
            clients: Vec::new(),
            now,
            start: now,
            next_ip: 10,
            next_addr: None,
            blackhole: Vec::new(),
            limits: Vec::new(),
            limited_drops: 0,
            lossy: Vec::new(),
            lossy_drops: 0,
        }
    }

    fn new_client(&mut self) -> Client {
        self.next_ip = self.next_ip.wrapping_add(1);
        let addr: SocketAddr = match self.next_addr.take() {
            Some(a) => a,
            None => format!("127.0.1.{}:6000", self.next_ip)
                .parse()
                .expect("addr"),
        };
        let mut rtc = Rtc::builder()
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        Client {
            rtc,
            addr,
            peer: None,
            role: None,
            video_mid: None,
            audio_mid: None,
            control: None,
            control_open: false,
            connected: false,
            frames: Vec::new(),
            audio_frames: 0,
            messages: Vec::new(),
            keyframe_requests: 0,
            next_timeout: None,
            sfu_ufrag: None,
            sfu_pwd: None,
        }
    }

    /// Offers `dir` video (with `sim` layers), audio unless simulcast, and a
    /// `control` channel; publishers go through WHIP-style `publish`, viewers
    /// through WHEP-style `view`. Returns the client index.
    fn join(&mut self, room: &str, dir: Direction, sim: Option<Simulcast>) -> usize {
        let mut c = self.new_client();
        let simulcast = sim.is_some();
        let mut api = c.rtc.sdp_api();
        let v = api.add_media(MediaKind::Video, dir, None, None, sim);
        let a = (!simulcast).then(|| api.add_media(MediaKind::Audio, dir, None, None, None));
        let ch = api.add_channel("control".into());
        let (offer, pending) = api.apply().expect("offer");
        let sdp = offer.to_sdp_string();
        let j = if dir == Direction::SendOnly {
            self.sfu
                .publish(self.now, room, &sdp)
                .expect("publish accepted")
        } else {
            self.sfu
                .view(self.now, room, &sdp, RoleRequest::Auto)
                .expect("view accepted")
        };
        let answer = SdpAnswer::from_sdp_string(&j.sdp).expect("answer parses");
        c.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("answer");
        c.video_mid = Some(v);
        c.audio_mid = a;
        c.control = Some(ch);
        c.peer = Some(j.peer);
        let attr = |name: &str| {
            j.sdp
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|u| u.trim().to_string())
        };
        c.sfu_ufrag = attr("a=ice-ufrag:");
        c.sfu_pwd = attr("a=ice-pwd:");
        c.role = Some(j.role);
        self.clients.push(c);
        self.clients.len() - 1
    }

    /// Adds a publisher (WHIP-style offer); returns its client index.
    pub fn publish(&mut self, room: &str) -> usize {
        self.join(room, Direction::SendOnly, None)
    }

    /// Adds a publisher sending simulcast video with the given rids.
    pub fn publish_simulcast(&mut self, room: &str, rids: &[&str]) -> usize {
        let mut sim = Simulcast::new();
        for r in rids {
            sim.add_send_layer(SimulcastLayer::new(r));
        }
        self.join(room, Direction::SendOnly, Some(sim))
    }

    /// Adds a viewer (WHEP-style offer); returns its client index.
    pub fn view(&mut self, room: &str) -> usize {
        self.join(room, Direction::RecvOnly, None)
    }

    /// Writes one H.264 frame (at least `size` bytes) on a publisher, on a
    /// simulcast layer if `rid` is given.
    pub fn write_frame(
        &mut self,
        idx: usize,
        rid: Option<&str>,
        frame_no: u32,
        key: bool,
        size: usize,
    ) {
        let c = &mut self.clients[idx];
        let mid = c.video_mid.expect("video mid");
        let now = self.now;
        let Some(w) = c.rtc.writer(mid) else { return };
        let Some(pt) = w
            .payload_params()
            .find(|p| p.spec().codec == Codec::H264)
            .map(|p| p.pt())
        else {
            return;
        };
        let mut data = if key {
            sps_pps_idr(frame_no)
        } else {
            p_frame(frame_no)
        };
        data.resize(size.max(data.len()), (frame_no % 251) as u8 | 1);
        let t = MediaTime::from_90khz(frame_no as u64 * 3000);
        let w = match rid {
            Some(r) => w.rid(r.into()),
            None => w,
        };
        w.write(pt, now, t, data).expect("write");
    }

    pub fn send_message(&mut self, idx: usize, text: &str) -> bool {
        let c = &mut self.clients[idx];
        let Some(id) = c.control else { return false };
        match c.rtc.channel(id) {
            Some(mut ch) => ch.write(false, text.as_bytes()).unwrap_or(false),
            None => false,
        }
    }

    /// Moves datagrams until nobody has anything to send at `now`. Like a real
    /// driver, a client is polled after every datagram it receives.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(t) = self.sfu.poll_transmit() {
                moved = true;
                self.deliver(&t);
            }
            for i in 0..self.clients.len() {
                moved |= self.poll_client(i);
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// Hands one datagram from the SFU to its client (through the simulated link's
    /// blackholes, limits and losses), then polls that client.
    pub fn deliver(&mut self, t: &Transmit) {
        let Some(i) = self.clients.iter().position(|c| c.addr == t.destination) else {
            return;
        };
        if self.blackhole.contains(&i) || !self.admit(i, t.contents.len()) {
            return;
        }
        let rtp = t.contents.len() > 12
            && t.contents[0] & 0xc0 == 0x80
            && !(192..=223).contains(&t.contents[1]);
        if rtp {
            if let Some(l) = self.lossy.iter_mut().find(|l| l.0 == i) {
                l.2 += 1;
                if l.2 % l.1 == 0 {
                    self.lossy_drops += 1;
                    return;
                }
            }
        }
        let r =
            Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).expect("datagram");
        let _ = self.clients[i]
            .rtc
            .handle_input(Input::Receive(self.now, r));
        self.poll_client(i);
    }

    /// Token bucket of a limited link (50 ms of burst).
    fn admit(&mut self, client: usize, len: usize) -> bool {
        let now = self.now;
        let Some(l) = self.limits.iter_mut().find(|l| l.0 == client) else {
            return true;
        };
        let rate = l.1 as f64 / 8.0;
        l.2 = (l.2 + now.duration_since(l.3).as_secs_f64() * rate).min(rate * 0.05);
        l.3 = now;
        if l.2 >= len as f64 {
            l.2 -= len as f64;
            true
        } else {
            self.limited_drops += 1;
            false
        }
    }

    /// Limits the SFU -> client link to `bps` (None removes the limit).
    pub fn limit(&mut self, client: usize, bps: Option<u64>) {
        self.limits.retain(|l| l.0 != client);
        if let Some(bps) = bps {
            self.limits.push((client, bps, 0.0, self.now));
        }
    }

    /// Drains a client's output into the SFU; true if it sent anything.
    pub fn poll_client(&mut self, i: usize) -> bool {
        let mut sent = false;
        loop {
            let out = match self.clients[i].rtc.poll_output() {
                Ok(o) => o,
                Err(_) => return sent,
            };
            match out {
                Output::Timeout(t) => {
                    self.clients[i].next_timeout = Some(t);
                    return sent;
                }
                Output::Transmit(t) => {
                    sent = true;
                    if self.blackhole.contains(&i) {
                        continue;
                    }
                    self.sfu
                        .handle_datagram(self.now, t.source, t.destination, &t.contents);
                }
                Output::Event(e) => self.on_client_event(i, e),
            }
        }
    }

    fn on_client_event(&mut self, i: usize, e: Event) {
        let c = &mut self.clients[i];
        match e {
            Event::Connected => c.connected = true,
            Event::MediaData(d) => {
                if Some(d.mid) == c.video_mid {
                    c.frames.push(Frame {
                        key: d.is_keyframe(),
                        time: d.time,
                        len: d.data.len(),
                        first_seq: **d.seq_range.start(),
                        last_seq: **d.seq_range.end(),
                        payload_tag: d.data.last().copied().unwrap_or(0),
                    });
                } else {
                    c.audio_frames += 1;
                }
            }
            Event::ChannelOpen(id, _) if Some(id) == c.control => c.control_open = true,
            Event::ChannelData(d) => {
                c.messages
                    .push(String::from_utf8_lossy(&d.data).to_string());
            }
            Event::KeyframeRequest(_) => c.keyframe_requests += 1,
            _ => {}
        }
    }

    /// Advances the clock by `dt`, firing every timer on the way (in 1 ms steps at most).
    pub fn advance(&mut self, dt: Duration) {
        let end = self.now + dt;
        while self.now < end {
            let step = Duration::from_millis(1).min(end - self.now);
            self.now += step;
            let now = self.now;
            self.sfu.handle_timeout(now);
            for c in &mut self.clients {
                if c.next_timeout.is_none_or(|t| t <= now) {
                    let _ = c.rtc.handle_input(Input::Timeout(now));
                }
            }
            self.settle();
        }
    }

    /// Runs until every client is connected (or panics after 5 simulated seconds).
    pub fn connect_all(&mut self) {
        for _ in 0..500 {
            if self.clients.iter().all(|c| c.connected && c.control_open) {
                return;
            }
            self.advance(Duration::from_millis(10));
        }
        let states: Vec<_> = self
            .clients
            .iter()
            .map(|c| (c.connected, c.control_open))
            .collect();
        panic!("not all connected: {states:?}");
    }

    /// Like [`World::connect_all`] but ignoring some (gone) clients.
    pub fn connect_all_except(&mut self, skip: &[usize]) {
        for _ in 0..500 {
            let ok = self
                .clients
                .iter()
                .enumerate()
                .all(|(i, c)| skip.contains(&i) || (c.connected && c.control_open));
            if ok {
                return;
            }
            self.advance(Duration::from_millis(10));
        }
        panic!("not all connected");
    }

    /// Fires `idx`'s timers at `now` + 1 ms and takes the RTP datagrams it then sends,
    /// without handing them to the SFU (a test hands them over one by one).
    pub fn take_rtp(&mut self, idx: usize) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        self.now += Duration::from_millis(1);
        let c = &mut self.clients[idx];
        let _ = c.rtc.handle_input(Input::Timeout(self.now));
        let mut out = Vec::new();
        for _ in 0..1000 {
            match c.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    // SRTP: RTCP's second byte is 192-223 (its packet type).
                    if t.contents.len() > 12 && !(192..=223).contains(&t.contents[1]) {
                        out.push((t.source, t.destination, t.contents.to_vec()));
                    }
                }
                Ok(Output::Event(_)) => {}
                Ok(Output::Timeout(_)) | Err(_) => break,
            }
        }
        out
    }

    /// Sends `n` frames of 30 fps video from `publisher`, keyframe every `gop`.
    pub fn stream(&mut self, publisher: usize, first: u32, n: u32, gop: u32) {
        for f in first..first + n {
            self.write_frame(publisher, None, f, f % gop == 0, 0);
            self.advance(Duration::from_millis(33));
        }
    }
}
