//! In-memory tests of the sans-IO core: protocol flows, auth, policy, quotas.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgerelay_turn::auth::{long_term_key, rest_credentials, ALG_MD5};
use edgerelay_turn::policy::Cidr;
use edgerelay_turn::server::{Family, LocalPeer, RelayRequest};
use edgerelay_turn::stun::{attr, method, Builder, Class, Message};
use edgerelay_turn::{Action, FiveTuple, Relay, RelayAllocator, Server, Transport, TurnConfig};

const REALM: &str = "test.realm";
const NOW_UNIX: u64 = 1_700_000_000;

#[derive(Default)]
struct FakeRelays {
    next: u16,
    released: Vec<SocketAddr>,
}

impl RelayAllocator for FakeRelays {
    fn allocate(&mut self, req: &RelayRequest, _t: &FiveTuple) -> Option<(Relay, Option<u64>)> {
        self.next += 1;
        let ip: IpAddr = match req.family {
            Family::V4 => "198.51.100.1".parse().unwrap(),
            Family::V6 => "2001:db8::1".parse().unwrap(),
        };
        Some((
            Relay {
                addr: SocketAddr::new(ip, 50000 + self.next),
                id: u64::from(self.next),
            },
            None,
        ))
    }
    fn release(&mut self, r: &Relay) {
        self.released.push(r.addr);
    }
}

struct Harness {
    srv: Server,
    relays: FakeRelays,
    now: Instant,
    tuple: FiveTuple,
    user: String,
    pass: String,
    nonce: Vec<u8>,
    tid: u8,
}

fn config() -> TurnConfig {
    let mut c = TurnConfig {
        realm: REALM.into(),
        ..Default::default()
    };
    c.users.insert("alice".into(), "wonderland".into());
    c.rest_secrets = vec!["s3cret".into()];
    c.allowed_peer_cidrs = vec![
        "0.0.0.0/0".parse::<Cidr>().unwrap(),
        "::/0".parse().unwrap(),
    ];
    c
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::from(([192, 0, 2, 10], port)),
        local: SocketAddr::from(([192, 0, 2, 1], 3478)),
    }
}

/// Owned copy of an action for easy assertions.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    None,
    Client(Vec<u8>),
    Peer(SocketAddr, SocketAddr, Vec<u8>),
    Local(SocketAddr, SocketAddr, Vec<u8>),
}

fn own(a: Action<'_>) -> Out {
    match a {
        Action::None => Out::None,
        Action::ToClient { data, .. } => Out::Client(data.to_vec()),
        Action::ToPeer {
            relay, peer, data, ..
        } => Out::Peer(relay, peer, data.to_vec()),
        Action::ToLocal { relay, sfu, data } => Out::Local(relay, sfu, data.to_vec()),
    }
}

fn error_code(raw: &[u8]) -> Option<u16> {
    // Walk attributes for ERROR-CODE.
    let mut pos = 20;
    while pos + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
        let l = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        if t == attr::ERROR_CODE {
            return Some(u16::from(raw[pos + 6]) * 100 + u16::from(raw[pos + 7]));
        }
        pos += 4 + ((l + 3) & !3);
    }
    None
}

fn find_attr(raw: &[u8], want: u16) -> Option<Vec<u8>> {
    let mut pos = 20;
    while pos + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
        let l = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        if t == want {
            return Some(raw[pos + 4..pos + 4 + l].to_vec());
        }
        pos += 4 + ((l + 3) & !3);
    }
    None
}

impl Harness {
    fn new(cfg: TurnConfig) -> Self {
        let now = Instant::now();
        Harness {
            srv: Server::new(&cfg, now, NOW_UNIX),
            relays: FakeRelays::default(),
            now,
            tuple: tuple(40000),
            user: "alice".into(),
            pass: "wonderland".into(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid = self.tid.wrapping_add(1);
        [self.tid; 12]
    }

    fn send(&mut self, data: &[u8]) -> Out {
        own(self
            .srv
            .handle_client(self.now, self.tuple, data, &mut self.relays))
    }

    /// Build and send an authenticated request; `f` adds method attributes.
    fn request(&mut self, m: u16, f: impl Fn(&mut Builder<'_>)) -> Vec<u8> {
        let tid = self.next_tid();
        let mut buf = Vec::new();
        {
            let mut b = Builder::new(&mut buf, m, Class::Request, tid);
            f(&mut b);
            if !self.nonce.is_empty() {
                let key = long_term_key(&self.user, REALM, &self.pass, ALG_MD5);
                b.attr(attr::USERNAME, self.user.as_bytes())
                    .attr(attr::REALM, REALM.as_bytes())
                    .attr(attr::NONCE, &self.nonce)
                    .integrity(&key, false);
            }
            b.fingerprint();
        }
        match self.send(&buf) {
            Out::Client(r) => {
                let m = Message::parse(&r).expect("valid response");
                assert_eq!(m.tid, tid);
                assert!(m.has_fingerprint);
                r
            }
            o => panic!("expected a response, got {o:?}"),
        }
    }

    fn authed(&mut self, m: u16, f: impl Fn(&mut Builder<'_>)) -> Vec<u8> {
        if self.nonce.is_empty() {
            let r = self.request(m, &f);
            assert_eq!(error_code(&r), Some(401));
            assert_eq!(find_attr(&r, attr::REALM).unwrap(), REALM.as_bytes());
            self.nonce = find_attr(&r, attr::NONCE).unwrap();
        }
        let r = self.request(m, f);
        if error_code(&r).is_none() {
            // Success responses carry a valid MESSAGE-INTEGRITY.
            let key = long_term_key(&self.user, REALM, &self.pass, ALG_MD5);
            assert_eq!(
                Message::parse(&r).unwrap().verify_integrity(&key),
                Some(false)
            );
        }
        r
    }

    fn allocate(&mut self) -> SocketAddr {
        let r = self.authed(method::ALLOCATE, |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        assert_eq!(error_code(&r), None, "allocate failed");
        let m = Message::parse(&r).unwrap();
        let v = find_attr(&r, attr::XOR_RELAYED_ADDRESS).unwrap();
        edgerelay_turn::stun::decode_xor_addr(&v, &m.tid).unwrap()
    }

    fn permit(&mut self, peer: SocketAddr) -> Option<u16> {
        let r = self.authed(method::CREATE_PERMISSION, |b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        error_code(&r)
    }

    fn bind(&mut self, ch: u16, peer: SocketAddr) -> Option<u16> {
        let r = self.authed(method::CHANNEL_BIND, |b| {
            b.u32_attr(attr::CHANNEL_NUMBER, u32::from(ch) << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        });
        error_code(&r)
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn binding_returns_xor_mapped_address() {
    let mut h = Harness::new(config());
    let r = h.request(method::BINDING, |_| {});
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Success);
    let v = find_attr(&r, attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(
        edgerelay_turn::stun::decode_xor_addr(&v, &m.tid),
        Some(h.tuple.client)
    );
    assert!(find_attr(&r, attr::SOFTWARE).is_none());
}

#[test]
fn full_relay_flow_channels_and_indications() {
    let mut h = Harness::new(config());
    let relay = h.allocate();
    let peer = sa("203.0.113.7:9000");
    // No permission yet: Send indication dropped.
    let mut ind = Vec::new();
    Builder::new(&mut ind, method::SEND, Class::Indication, [1; 12])
        .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, b"hello");
    assert_eq!(h.send(&ind), Out::None);
    assert_eq!(h.permit(peer), None);
    assert_eq!(h.send(&ind), Out::Peer(relay, peer, b"hello".to_vec()));

    // Peer -> client without channel: Data indication.
    let mut buf = vec![0u8; 64];
    buf[4..7].copy_from_slice(b"abc");
    let out = own(h.srv.handle_peer(h.now, relay, peer, &mut buf, 4, 7));
    let Out::Client(d) = out else { panic!() };
    let m = Message::parse(&d).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(m.data, Some(&b"abc"[..]));
    assert_eq!(m.peer(0), Some(peer));
    // Unknown peer: dropped.
    let out = own(h
        .srv
        .handle_peer(h.now, relay, sa("203.0.113.8:1"), &mut buf, 4, 7));
    assert_eq!(out, Out::None);

    // Channel bind, then ChannelData both ways.
    assert_eq!(h.bind(0x4001, peer), None);
    let cd = [0x40, 0x01, 0x00, 0x03, b'x', b'y', b'z', 0];
    assert_eq!(h.send(&cd), Out::Peer(relay, peer, b"xyz".to_vec()));
    let out = own(h.srv.handle_peer(h.now, relay, peer, &mut buf, 4, 7));
    assert_eq!(out, Out::Client(vec![0x40, 0x01, 0, 3, b'a', b'b', b'c']));
    // Wrong channel number: dropped.
    assert_eq!(h.send(&[0x40, 0x02, 0, 1, 1, 0, 0, 0]), Out::None);
    // Rebinding the same channel to another peer is refused.
    assert_eq!(h.bind(0x4001, sa("203.0.113.9:1")), Some(400));
    assert_eq!(h.bind(0x3000, peer), Some(400));
    assert_eq!(h.srv.stats().packets_to_peer, 2);
    assert_eq!(h.srv.stats().packets_to_client, 2);
}

#[test]
fn tcp_channel_data_is_padded() {
    let mut h = Harness::new(config());
    h.tuple.transport = Transport::Tcp;
    let relay = h.allocate();
    let peer = sa("203.0.113.7:9000");
    assert_eq!(h.bind(0x4000, peer), None);
    let mut buf = vec![0u8; 64];
    buf[4..9].copy_from_slice(b"12345");
    let out = own(h.srv.handle_peer(h.now, relay, peer, &mut buf, 4, 9));
    assert_eq!(
        out,
        Out::Client(vec![0x40, 0, 0, 5, b'1', b'2', b'3', b'4', b'5', 0, 0, 0])
    );
}

#[test]
fn forbidden_peers_get_403() {
    let mut h = Harness::new(config());
    h.allocate();
    for p in [
        "127.0.0.1:5000",
        "0.0.0.0:5000",
        "169.254.169.254:80",
        "10.0.0.1:5000",
        "224.0.0.1:5000",
    ] {
        assert_eq!(h.permit(sa(p)), Some(403), "{p}");
        assert_eq!(h.bind(0x4001, sa(p)), Some(403), "{p}");
    }
    // IPv6 forms on an IPv4 allocation: family mismatch first; use an IPv6 allocation.
    let mut h6 = Harness::new(config());
    h6.tuple = tuple(40001);
    let r = h6.authed(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(error_code(&r), None);
    for p in [
        "[::ffff:127.0.0.1]:5000",
        "[::]:5000",
        "[::1]:5000",
        "[fe80::1]:5000",
    ] {
        assert_eq!(h6.permit(sa(p)), Some(403), "{p}");
    }
    assert_eq!(h6.permit(sa("[2001:db8:1::5]:5000")), None);
    assert!(h6.srv.stats().peer_rejections["forbidden_range"] >= 4);
}

#[test]
fn deny_by_default_without_allowed_cidrs() {
    let mut cfg = config();
    cfg.allowed_peer_cidrs.clear();
    let mut h = Harness::new(cfg);
    h.allocate();
    assert_eq!(h.permit(sa("8.8.8.8:53")), Some(403));
}

#[test]
fn bad_password_gets_401() {
    let mut h = Harness::new(config());
    h.pass = "wrong".into();
    let r = h.authed(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(error_code(&r), Some(401));
    h.user = "nobody".into();
    let r = h.authed(method::ALLOCATE, |_| {});
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.srv.allocation_count(), 0);
}

#[test]
fn stale_nonce_gets_438_then_recovers() {
    let mut cfg = config();
    cfg.nonce_lifetime_secs = 60;
    let mut h = Harness::new(cfg);
    h.allocate();
    h.now += Duration::from_secs(61);
    let peer = sa("203.0.113.7:9000");
    let r = h.authed(method::CREATE_PERMISSION, |b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(error_code(&r), Some(438));
    h.nonce = find_attr(&r, attr::NONCE).unwrap();
    assert_eq!(h.permit(peer), None);
    // A forged nonce is also refused.
    h.nonce = b"00000000000000000000000000000000".to_vec();
    assert_eq!(h.permit(peer), Some(438));
}

#[test]
fn per_user_quota_gets_486() {
    let mut cfg = config();
    cfg.max_allocations_per_user = 2;
    let mut h = Harness::new(cfg);
    h.allocate();
    h.tuple = tuple(40001);
    h.allocate();
    h.tuple = tuple(40002);
    let r = h.authed(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(error_code(&r), Some(486));
    // Same 5-tuple, new transaction: 437.
    h.tuple = tuple(40001);
    let r = h.authed(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(error_code(&r), Some(437));
}

#[test]
fn rest_credentials_work_and_expire() {
    let mut h = Harness::new(config());
    let (u, p) = rest_credentials("s3cret", "viewer1", 600, NOW_UNIX);
    h.user = u;
    h.pass = p;
    h.allocate();
    let (u, p) = rest_credentials("s3cret", "viewer1", 10, NOW_UNIX - 100);
    h.user = u;
    h.pass = p;
    h.tuple = tuple(40003);
    let r = h.authed(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.srv.stats().auth_failures["expired"], 1);
}

#[test]
fn refresh_zero_deletes_and_expiry_releases() {
    let mut h = Harness::new(config());
    let relay = h.allocate();
    let r = h.authed(method::REFRESH, |b| {
        b.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(error_code(&r), None);
    assert_eq!(h.srv.allocation_count(), 0);
    assert_eq!(h.relays.released, vec![relay]);
    let relay2 = h.allocate();
    h.now += Duration::from_secs(601);
    let now = h.now;
    h.srv.handle_timeout(now, &mut h.relays);
    assert_eq!(h.srv.allocation_count(), 0);
    assert_eq!(h.relays.released, vec![relay, relay2]);
}

#[test]
fn permission_expires() {
    let mut h = Harness::new(config());
    let relay = h.allocate();
    let peer = sa("203.0.113.7:9000");
    assert_eq!(h.permit(peer), None);
    h.now += Duration::from_secs(301);
    let mut buf = vec![0u8; 16];
    let out = own(h.srv.handle_peer(h.now, relay, peer, &mut buf, 4, 8));
    assert_eq!(out, Out::None);
}

#[test]
fn unauthenticated_errors_are_rate_limited() {
    let mut cfg = config();
    cfg.unauth_responses_per_sec = 5;
    let mut h = Harness::new(cfg);
    let mut answered = 0;
    for i in 0..100u8 {
        let mut req = Vec::new();
        Builder::new(&mut req, method::ALLOCATE, Class::Request, [i; 12])
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        if let Out::Client(_) = h.send(&req) {
            answered += 1;
        }
    }
    assert_eq!(answered, 10, "burst of 2x rate, then silence");
}

#[test]
fn malformed_and_unknown_inputs() {
    let mut h = Harness::new(config());
    assert_eq!(h.send(&[]), Out::None);
    assert_eq!(h.send(&[0u8; 19]), Out::None);
    assert_eq!(h.send(&[0xFF; 100]), Out::None);
    assert_eq!(h.send(&vec![0u8; 70_000]), Out::None);
    // Unknown comprehension-required attribute: 420.
    let r = h.request(method::ALLOCATE, |b| {
        b.attr(0x7777, b"zz");
    });
    assert_eq!(error_code(&r), Some(420));
    assert_eq!(
        find_attr(&r, attr::UNKNOWN_ATTRIBUTES).unwrap(),
        vec![0x77, 0x77]
    );
    assert!(h.srv.stats().dropped["malformed"] >= 3);
}

#[derive(Default)]
struct FakeSfu {
    got: Mutex<Vec<(SocketAddr, SocketAddr, Vec<u8>)>>,
}

impl LocalPeer for FakeSfu {
    fn is_local(&self, addr: SocketAddr) -> bool {
        addr == sa("127.0.0.1:7000")
    }
    fn deliver(&self, relay: SocketAddr, sfu: SocketAddr, data: &[u8]) {
        self.got.lock().unwrap().push((relay, sfu, data.to_vec()));
    }
}

#[test]
fn local_sfu_handoff_even_on_loopback() {
    let mut cfg = config();
    cfg.allowed_peer_cidrs.clear();
    let mut h = Harness::new(cfg);
    let sfu = Arc::new(FakeSfu::default());
    h.srv
        .set_local_peer(sfu.clone(), &["127.0.0.1".parse().unwrap()]);
    let relay = h.allocate();
    let sfu_addr = sa("127.0.0.1:7000");
    assert_eq!(h.bind(0x4005, sfu_addr), None);
    assert_eq!(
        h.send(&[0x40, 0x05, 0, 2, 9, 9, 0, 0]),
        Out::Local(relay, sfu_addr, vec![9, 9])
    );
    // Another port on the SFU's IP is not the SFU: no kernel relay to loopback.
    let other = sa("127.0.0.1:22");
    assert_eq!(h.permit(other), None);
    let mut ind = Vec::new();
    Builder::new(&mut ind, method::SEND, Class::Indication, [1; 12])
        .xor_addr(attr::XOR_PEER_ADDRESS, other)
        .attr(attr::DATA, b"ssh?");
    assert_eq!(h.send(&ind), Out::None);
    // SFU -> client through the relay.
    let mut buf = vec![0u8; 32];
    buf[4..6].copy_from_slice(&[7, 7]);
    let out = own(h.srv.handle_peer(h.now, relay, sfu_addr, &mut buf, 4, 6));
    assert_eq!(out, Out::Client(vec![0x40, 0x05, 0, 2, 7, 7]));
}

/// A UDP allocation's channel to the SFU is published as a local route (what the
/// SFU needs to send to the client itself), only after a change, and no longer once
/// the allocation is deleted; channels to other peers and TCP allocations are not.
#[test]
fn channels_to_the_sfu_are_published_as_local_routes() {
    let mut cfg = config();
    cfg.allowed_peer_cidrs = vec!["203.0.113.0/24".parse().unwrap()];
    let mut h = Harness::new(cfg);
    let sfu = Arc::new(FakeSfu::default());
    h.srv
        .set_local_peer(sfu.clone(), &["127.0.0.1".parse().unwrap()]);
    let now = h.now;
    assert_eq!(h.srv.take_local_routes(now), None, "nothing changed yet");
    let relay = h.allocate();
    let sfu_addr = sa("127.0.0.1:7000");
    assert_eq!(h.bind(0x4005, sfu_addr), None);
    assert_eq!(h.bind(0x4006, sa("203.0.113.7:9000")), None);
    let routes = h.srv.take_local_routes(now).expect("changed");
    assert_eq!(routes.len(), 1, "only the channel to the SFU: {routes:?}");
    let r = routes[0];
    assert_eq!((r.relay, r.sfu, r.channel), (relay, sfu_addr, 0x4005));
    assert_eq!((r.client, r.server), (h.tuple.client, h.tuple.local));
    assert!(r.expires > now && r.expires <= now + Duration::from_secs(600));
    assert_eq!(h.srv.take_local_routes(now), None, "taken");
    let gone = h.authed(method::REFRESH, |b| {
        b.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(error_code(&gone), None);
    assert_eq!(h.srv.take_local_routes(now), Some(Vec::new()));
    // A TCP allocation's channel to the SFU is not a route (ChannelData is framed
    // on the stream there).
    h.tuple.transport = Transport::Tcp;
    h.allocate();
    assert_eq!(h.bind(0x4007, sfu_addr), None);
    assert_eq!(h.srv.take_local_routes(now), Some(Vec::new()));
}

#[test]
fn bandwidth_quota_drops_excess() {
    let mut cfg = config();
    cfg.max_bandwidth_bytes_per_sec = 1000;
    let mut h = Harness::new(cfg);
    let relay = h.allocate();
    let peer = sa("203.0.113.7:9000");
    assert_eq!(h.bind(0x4001, peer), None);
    let mut frame = vec![0x40, 0x01, 0x01, 0x00];
    frame.extend_from_slice(&[0u8; 256]);
    let sent = (0..10)
        .filter(|_| matches!(h.send(&frame), Out::Peer(..)))
        .count();
    assert_eq!(sent, 3);
    assert!(h.srv.stats().quota_rejections["bandwidth"] >= 7);
    let _ = relay;
}

#[test]
fn message_integrity_sha256_is_answered_in_kind() {
    let mut h = Harness::new(config());
    // Get a nonce.
    let r = h.request(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let nonce = find_attr(&r, attr::NONCE).unwrap();
    let key = long_term_key("alice", REALM, "wonderland", ALG_MD5);
    let mut buf = Vec::new();
    Builder::new(&mut buf, method::ALLOCATE, Class::Request, [42; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce)
        .integrity(&key, true)
        .fingerprint();
    let Out::Client(resp) = h.send(&buf) else {
        panic!("no response")
    };
    assert_eq!(error_code(&resp), None);
    let m = Message::parse(&resp).unwrap();
    assert!(m.integrity_sha256.is_some() && m.integrity.is_none());
    assert_eq!(m.verify_integrity(&key), Some(true));
    // Wrong key with SHA-256 integrity: 401.
    let bad = long_term_key("alice", REALM, "nope", ALG_MD5);
    Builder::new(&mut buf, method::REFRESH, Class::Request, [43; 12])
        .attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce)
        .integrity(&bad, true);
    let Out::Client(resp) = h.send(&buf) else {
        panic!("no response")
    };
    assert_eq!(error_code(&resp), Some(401));
}
