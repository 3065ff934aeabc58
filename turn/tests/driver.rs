//! Driver-level checks: config parsing as a TOML `[turn]` section, TCP framing
//! and allocation cleanup when a TCP connection closes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgerelay_turn::auth::{long_term_key, ALG_MD5};
use edgerelay_turn::stun::{self, attr, method, Builder, Class, Message};
use edgerelay_turn::{TurnConfig, TurnServer};

#[test]
fn turn_section_parses_from_toml() {
    #[derive(serde::Deserialize)]
    struct Edge {
        turn: TurnConfig,
    }
    let e: Edge = toml::from_str(
        r#"
        [turn]
        realm = "edge-fra1.example.net"
        listen_udp = ["0.0.0.0:3478"]
        listen_tls = ["0.0.0.0:5349"]
        tls_cert = "/etc/edgerelay/tls/cert.pem"
        tls_key = "/etc/edgerelay/tls/key.pem"
        relay_ip = "10.0.0.5"
        external_ip = "203.0.113.10"
        rest_secrets = ["current", "previous"]
        allowed_peer_cidrs = ["198.51.100.0/24", "2001:db8::/32"]
        max_bandwidth_bytes_per_sec = 0
        [turn.users]
        alice = "wonderland"
        "#,
    )
    .unwrap();
    assert_eq!(e.turn.realm, "edge-fra1.example.net");
    assert_eq!(e.turn.allowed_peer_cidrs.len(), 2);
    assert_eq!(e.turn.users["alice"], "wonderland");
    assert_eq!(
        e.turn.listen_tcp,
        vec!["0.0.0.0:3478".parse::<SocketAddr>().unwrap()]
    );
    assert!(toml::from_str::<Edge>("[turn]\nno_such_key = 1\n").is_err());
    assert!(toml::from_str::<Edge>("[turn]\nallowed_peer_cidrs = [\"10.0.0.0/99\"]\n").is_err());
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).unwrap();
    let len = stun::stream_frame_len(&hdr).unwrap().unwrap();
    let mut f = hdr.to_vec();
    f.resize(len, 0);
    s.read_exact(&mut f[4..]).unwrap();
    f
}

fn attr_of(raw: &[u8], want: u16) -> Option<Vec<u8>> {
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

#[test]
fn tcp_allocation_is_released_when_the_connection_closes() {
    let mut cfg = TurnConfig {
        realm: "r".into(),
        listen_udp: vec!["127.0.0.1:0".parse().unwrap()],
        listen_tcp: vec!["127.0.0.1:0".parse().unwrap()],
        relay_ip: Some("127.0.0.1".parse().unwrap()),
        relay_port_min: 0,
        relay_port_max: 0,
        ..TurnConfig::default()
    };
    cfg.users.insert("u".into(), "p".into());
    let srv = TurnServer::start(&cfg, None).unwrap();
    let handle = srv.handle();
    let mut s = TcpStream::connect(srv.tcp_addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Two messages in one write: a Binding request and an unauthenticated Allocate.
    let mut out = Vec::new();
    let mut buf = Vec::new();
    Builder::new(&mut buf, method::BINDING, Class::Request, [1; 12]);
    out.extend_from_slice(&buf);
    Builder::new(&mut buf, method::ALLOCATE, Class::Request, [2; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    out.extend_from_slice(&buf);
    s.write_all(&out).unwrap();
    let b = read_frame(&mut s);
    assert_eq!(Message::parse(&b).unwrap().class, Class::Success);
    let r = read_frame(&mut s);
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Error);
    let nonce = m.nonce.unwrap().to_vec();

    let key = long_term_key("u", "r", "p", ALG_MD5);
    Builder::new(&mut buf, method::ALLOCATE, Class::Request, [3; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, b"u")
        .attr(attr::REALM, b"r")
        .attr(attr::NONCE, &nonce)
        .integrity(&key, false)
        .fingerprint();
    // Split the write to exercise stream reassembly.
    s.write_all(&buf[..7]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&buf[7..]).unwrap();
    let r = read_frame(&mut s);
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Success, "allocate over TCP");
    let relay =
        stun::decode_xor_addr(&attr_of(&r, attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert!(handle.is_relay_addr(relay));

    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.is_relay_addr(relay) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!handle.is_relay_addr(relay), "allocation released on close");

    // A stream that is neither STUN nor ChannelData is closed by the server.
    let mut bad = TcpStream::connect(srv.tcp_addrs()[0]).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(&[0xFF; 32]).unwrap();
    let mut sink = [0u8; 8];
    assert_eq!(bad.read(&mut sink).unwrap_or(0), 0);
    srv.stop();
}
