//! `turn-load`: a closed-loop ChannelData load generator for TURN servers.
//!
//! Each client allocates a UDP relay (long-term credentials), binds a channel to
//! its own echo peer on loopback, then keeps up to `--window` packets in flight:
//! client -> relay -> peer (echoed) -> relay -> client. Every packet that makes
//! the round trip was relayed twice by the server. Bounded by `--packets` and
//! `--max-secs`. Prints one line:
//! `LOAD sent=.. peer_rx=.. client_rx=.. relayed=.. lost=.. secs=..`.
//!
//! The server must allow loopback peers (ours: `--allow-loopback-peers-for-testing`,
//! coturn: `--allow-loopback-peers`). Loopback only; for benchmarks.

use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::time::{Duration, Instant};

use clap::Parser;
use edgerelay_turn::auth::{long_term_key, ALG_MD5};
use edgerelay_turn::stun::{self, attr, method, Builder, Class, Message};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

/// Flags.
#[derive(Parser, Debug)]
#[command(
    name = "turn-load",
    about = "closed-loop TURN ChannelData load (loopback only)"
)]
struct Args {
    /// TURN server UDP address (loopback).
    #[arg(long)]
    server: SocketAddr,
    /// Username.
    #[arg(long)]
    user: String,
    /// Password.
    #[arg(long)]
    pass: String,
    /// Concurrent clients (allocations).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Packets sent in total (client -> peer direction).
    #[arg(long, default_value_t = 100_000)]
    packets: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Packets in flight per client.
    #[arg(long, default_value_t = 32)]
    window: u64,
    /// Open-loop mode: packets per second per client (paced, like media);
    /// 0 = closed loop with `--window` packets in flight.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Hard time limit in seconds.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
}

struct Client {
    sock: UdpSocket,
    peer: UdpSocket,
    sent: u64,
    back: u64,
    last_rx: Instant,
    inflight_base: u64,
    next_send: Instant,
}

fn transact(sock: &StdUdp, server: SocketAddr, req: &[u8]) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    for _ in 0..5 {
        sock.send_to(req, server)?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return Ok(buf[..n].to_vec()),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no response from TURN server",
    ))
}

fn error_code(raw: &[u8]) -> Option<u16> {
    let mut pos = stun::HEADER_LEN;
    while pos + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
        let l = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        if t == attr::ERROR_CODE && pos + 8 <= raw.len() {
            return Some(u16::from(raw[pos + 6]) * 100 + u16::from(raw[pos + 7]));
        }
        pos += 4 + ((l + 3) & !3);
    }
    None
}

fn relayed_addr(raw: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    let mut pos = stun::HEADER_LEN;
    while pos + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
        let l = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        if t == attr::XOR_RELAYED_ADDRESS {
            return stun::decode_xor_addr(raw.get(pos + 4..pos + 4 + l)?, tid);
        }
        pos += 4 + ((l + 3) & !3);
    }
    None
}

/// Allocate and bind channel 0x4000 to `peer`; returns the relayed address.
fn setup(sock: &StdUdp, a: &Args, peer: SocketAddr, seed: u8) -> io::Result<SocketAddr> {
    let bad = |m: &str| io::Error::other(m.to_string());
    let mut buf = Vec::new();
    let mut tid = [seed; 12];
    tid[0] = 1;
    Builder::new(&mut buf, method::ALLOCATE, Class::Request, tid)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let r = transact(sock, a.server, &buf)?;
    let m = Message::parse(&r).map_err(|e| bad(&format!("bad 401: {e}")))?;
    let realm = m.realm.ok_or_else(|| bad("no realm"))?.to_vec();
    let nonce = m.nonce.ok_or_else(|| bad("no nonce"))?.to_vec();
    let realm_s = String::from_utf8_lossy(&realm).to_string();
    let key = long_term_key(&a.user, &realm_s, &a.pass, ALG_MD5);
    let auth = |b: &mut Builder<'_>| {
        b.attr(attr::USERNAME, a.user.as_bytes())
            .attr(attr::REALM, &realm)
            .attr(attr::NONCE, &nonce)
            .integrity(&key, false)
            .fingerprint();
    };
    tid[0] = 2;
    let mut b = Builder::new(&mut buf, method::ALLOCATE, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .u32_attr(attr::LIFETIME, 600);
    auth(&mut b);
    let r = transact(sock, a.server, &buf)?;
    if let Some(c) = error_code(&r) {
        return Err(bad(&format!("allocate failed: {c}")));
    }
    let relay = relayed_addr(&r, &tid).ok_or_else(|| bad("no relayed address"))?;
    tid[0] = 3;
    let mut b = Builder::new(&mut buf, method::CHANNEL_BIND, Class::Request, tid);
    b.u32_attr(attr::CHANNEL_NUMBER, 0x4000 << 16)
        .xor_addr(attr::XOR_PEER_ADDRESS, peer);
    auth(&mut b);
    let r = transact(sock, a.server, &buf)?;
    if let Some(c) = error_code(&r) {
        return Err(bad(&format!("channel bind failed: {c}")));
    }
    Ok(relay)
}

fn main() -> io::Result<()> {
    let a = Args::parse();
    if !a.server.ip().is_loopback() {
        eprintln!("turn-load only targets loopback servers");
        std::process::exit(2);
    }
    let size = a.size.clamp(8, 1400);
    let mut poll = Poll::new()?;
    let mut clients = Vec::new();
    for i in 0..a.clients {
        let std = StdUdp::bind("127.0.0.1:0")?;
        std.set_read_timeout(Some(Duration::from_millis(500)))?;
        let peer = StdUdp::bind("127.0.0.1:0")?;
        setup(&std, &a, peer.local_addr()?, i as u8)?;
        for s in [&std, &peer] {
            let r = socket2::SockRef::from(s);
            let _ = r.set_recv_buffer_size(4 << 20);
            let _ = r.set_send_buffer_size(4 << 20);
        }
        std.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        std.connect(a.server)?;
        let mut sock = UdpSocket::from_std(std);
        let mut peer = UdpSocket::from_std(peer);
        poll.registry()
            .register(&mut sock, Token(2 * i), Interest::READABLE)?;
        poll.registry()
            .register(&mut peer, Token(2 * i + 1), Interest::READABLE)?;
        clients.push(Client {
            sock,
            peer,
            sent: 0,
            back: 0,
            last_rx: Instant::now(),
            inflight_base: 0,
            next_send: Instant::now(),
        });
    }
    let mut frame = vec![0u8; 4 + size];
    frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
    frame[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    let per_client = a.packets / a.clients.max(1) as u64;
    let mut buf = vec![0u8; 65_536];
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.max_secs);
    let mut peer_rx = 0u64;
    let interval = if a.rate > 0 {
        Duration::from_secs_f64(1.0 / a.rate as f64)
    } else {
        Duration::ZERO
    };
    let nclients = clients.len().max(1) as u32;
    for (i, c) in clients.iter_mut().enumerate() {
        // Stagger the paced clients over one interval.
        c.next_send = start + interval * i as u32 / nclients;
    }
    let mut last_send = start;
    loop {
        let now = Instant::now();
        if now > deadline {
            break;
        }
        if a.rate > 0 {
            let mut all_sent = true;
            for c in clients.iter_mut() {
                while c.sent < per_client && c.next_send <= now {
                    frame[4..12].copy_from_slice(&c.sent.to_be_bytes());
                    let _ = c.sock.send(&frame);
                    c.sent += 1;
                    c.next_send += interval;
                    last_send = now;
                }
                all_sent &= c.sent >= per_client;
            }
            let all_back = clients.iter().all(|c| c.back >= c.sent);
            if all_sent && (all_back || now.duration_since(last_send) > Duration::from_millis(500))
            {
                break;
            }
            let next = clients
                .iter()
                .filter(|c| c.sent < per_client)
                .map(|c| c.next_send)
                .min()
                .unwrap_or(now + Duration::from_millis(20));
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20));
            poll.poll(&mut events, Some(wait))?;
            for ev in events.iter() {
                let i = ev.token().0 / 2;
                let Some(c) = clients.get_mut(i) else {
                    continue;
                };
                if ev.token().0 % 2 == 1 {
                    while let Ok((n, from)) = c.peer.recv_from(&mut buf) {
                        peer_rx += 1;
                        let _ = c.peer.send_to(&buf[..n], from);
                    }
                } else {
                    while let Ok(n) = c.sock.recv(&mut buf) {
                        if n >= 4 && stun::is_channel_data(&buf[..n]) {
                            c.back += 1;
                        }
                    }
                }
            }
            continue;
        }
        let mut all_done = true;
        for c in clients.iter_mut() {
            // Window stalled (losses): give up on what is in flight after 200 ms.
            if c.sent > c.back + c.inflight_base
                && now.duration_since(c.last_rx) > Duration::from_millis(200)
            {
                c.inflight_base = c.sent - c.back;
                c.last_rx = now;
            }
            while c.sent < per_client && c.sent - c.back - c.inflight_base < a.window {
                frame[4..12].copy_from_slice(&c.sent.to_be_bytes());
                match c.sock.send(&frame) {
                    Ok(_) => c.sent += 1,
                    Err(_) => break,
                }
            }
            if c.sent < per_client || c.sent > c.back + c.inflight_base {
                all_done = false;
            }
        }
        if all_done {
            break;
        }
        poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        for ev in events.iter() {
            let i = ev.token().0 / 2;
            let Some(c) = clients.get_mut(i) else {
                continue;
            };
            if ev.token().0 % 2 == 1 {
                while let Ok((n, from)) = c.peer.recv_from(&mut buf) {
                    peer_rx += 1;
                    let _ = c.peer.send_to(&buf[..n], from);
                }
            } else {
                while let Ok(n) = c.sock.recv(&mut buf) {
                    if n >= 4 && stun::is_channel_data(&buf[..n]) {
                        c.back += 1;
                        c.last_rx = Instant::now();
                    }
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let sent: u64 = clients.iter().map(|c| c.sent).sum();
    let client_rx: u64 = clients.iter().map(|c| c.back).sum();
    println!(
        "LOAD sent={sent} peer_rx={peer_rx} client_rx={client_rx} relayed={} lost={} secs={secs:.3}",
        peer_rx + client_rx,
        sent.saturating_sub(client_rx)
    );
    Ok(())
}
