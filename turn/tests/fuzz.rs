//! Bounded random ("fuzz") corpus for the parser and the core: no input may panic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgerelay_turn::auth::{long_term_key, ALG_MD5};
use edgerelay_turn::server::{Family, RelayRequest};
use edgerelay_turn::stun::{self, attr, method, Builder, Class, Message};
use edgerelay_turn::{FiveTuple, Relay, RelayAllocator, Server, Transport, TurnConfig};
use proptest::prelude::*;

struct Relays(u16);
impl RelayAllocator for Relays {
    fn allocate(&mut self, r: &RelayRequest, _: &FiveTuple) -> Option<(Relay, Option<u64>)> {
        self.0 = self.0.wrapping_add(1);
        let ip = if r.family == Family::V4 {
            "198.51.100.1"
        } else {
            "2001:db8::1"
        };
        Some((
            Relay {
                addr: SocketAddr::new(ip.parse().unwrap(), self.0),
                id: u64::from(self.0),
            },
            r.reserve_next.then_some(7),
        ))
    }
    fn release(&mut self, _: &Relay) {}
}

/// Valid, authenticated seed messages to mutate.
fn seeds(nonce: &[u8]) -> Vec<Vec<u8>> {
    let key = long_term_key("u", "r", "p", ALG_MD5);
    let peer: SocketAddr = "203.0.113.1:5000".parse().unwrap();
    let mut out = Vec::new();
    for (m, i) in [
        (method::ALLOCATE, 0u8),
        (method::CREATE_PERMISSION, 1),
        (method::CHANNEL_BIND, 2),
        (method::REFRESH, 3),
        (method::BINDING, 4),
    ] {
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, m, Class::Request, [i; 12]);
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .u32_attr(attr::CHANNEL_NUMBER, 0x4001 << 16)
            .u32_attr(attr::LIFETIME, 600)
            .attr(attr::EVEN_PORT, &[0x80])
            .attr(attr::USERNAME, b"u")
            .attr(attr::REALM, b"r")
            .attr(attr::NONCE, nonce)
            .integrity(&key, false)
            .fingerprint();
        out.push(buf);
    }
    let mut ind = Vec::new();
    Builder::new(&mut ind, method::SEND, Class::Indication, [9; 12])
        .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, b"payload");
    out.push(ind);
    out.push(vec![0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4]);
    out
}

fn server() -> Server {
    let mut cfg = TurnConfig {
        realm: "r".into(),
        ..TurnConfig::default()
    };
    cfg.users.insert("u".into(), "p".into());
    cfg.allowed_peer_cidrs = vec!["0.0.0.0/0".parse().unwrap()];
    cfg.unauth_responses_per_sec = 1_000_000;
    Server::new(&cfg, Instant::now(), 1_700_000_000)
}

fn feed(srv: &mut Server, relays: &mut Relays, now: Instant, data: &[u8]) {
    let _ = srv.handle_client(now, tuple(), data, relays);
    let mut buf = data.to_vec();
    buf.resize(data.len() + 8, 0);
    let n = data.len();
    let _ = srv.handle_peer(
        now,
        "198.51.100.1:1".parse().unwrap(),
        "203.0.113.1:5000".parse().unwrap(),
        &mut buf,
        4.min(n),
        n,
    );
    let _ = stun::stream_frame_len(data);
    let _ = stun::parse_channel_data(data);
    if let Ok(m) = Message::parse(data) {
        let _ = m.verify_integrity(b"k");
        for i in 0..m.peer_count {
            let _ = m.peer(i);
        }
    }
}

fn tuple() -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: "192.0.2.1:1000".parse().unwrap(),
        local: "192.0.2.2:3478".parse().unwrap(),
    }
}

fn fetch_nonce(srv: &mut Server, relays: &mut Relays, now: Instant) -> Vec<u8> {
    let mut req = Vec::new();
    Builder::new(&mut req, method::ALLOCATE, Class::Request, [0; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    match srv.handle_client(now, tuple(), &req, relays) {
        edgerelay_turn::Action::ToClient { data, .. } => {
            Message::parse(data).unwrap().nonce.unwrap().to_vec()
        }
        a => panic!("expected 401, got {a:?}"),
    }
}

#[test]
fn seeds_reach_the_allocated_state() {
    let mut srv = server();
    let mut relays = Relays(0);
    let now = Instant::now();
    let nonce = fetch_nonce(&mut srv, &mut relays, now);
    for s in seeds(&nonce) {
        feed(&mut srv, &mut relays, now, &s);
    }
    assert_eq!(srv.allocation_count(), 1);
    assert!(srv.stats().packets_to_peer >= 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut srv = server();
        let mut relays = Relays(0);
        feed(&mut srv, &mut relays, Instant::now(), &data);
    }

    #[test]
    fn stun_looking_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300), ty in any::<u16>(), fix_len in any::<bool>()) {
        let mut data = Vec::new();
        data.extend_from_slice(&(ty & 0x3FFF).to_be_bytes());
        let len = if fix_len { body.len() as u16 } else { (body.len() as u16) & !3 };
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        data.extend_from_slice(&[3u8; 12]);
        data.extend_from_slice(&body);
        let mut srv = server();
        let mut relays = Relays(0);
        feed(&mut srv, &mut relays, Instant::now(), &data);
    }

    #[test]
    fn mutated_valid_messages_never_panic(seed in 0usize..7, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut srv = server();
        let mut relays = Relays(0);
        let now = Instant::now();
        let nonce = fetch_nonce(&mut srv, &mut relays, now);
        let seeds = seeds(&nonce);
        let mut data = seeds[seed % seeds.len()].clone();
        for (pos, x) in flips {
            let n = data.len();
            data[pos % n] ^= x;
        }
        if cut % 4 == 0 {
            data.truncate(cut % (data.len() + 1));
        }
        // Run the whole seed sequence first so allocations exist, then the mutant.
        for s in &seeds {
            feed(&mut srv, &mut relays, now, s);
        }
        feed(&mut srv, &mut relays, now, &data);
        srv.handle_timeout(now + Duration::from_secs(5000), &mut relays);
    }
}
