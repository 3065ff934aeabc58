//! In-process hand-off between the TURN driver and a co-located SFU.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgerelay_turn::{ChannelPeer, LocalHandoff, TurnConfig, TurnServer};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

#[tokio::test]
async fn relayed_packets_reach_the_sfu_in_process_and_back() {
    // The "SFU" address: nothing listens there; packets must never touch the kernel.
    let sfu: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (peer, rx) = ChannelPeer::new(vec![sfu], 1024);
    let cfg = TurnConfig {
        listen_udp: vec!["127.0.0.1:0".parse().unwrap()],
        listen_tcp: vec![],
        relay_ip: Some("127.0.0.1".parse().unwrap()),
        relay_port_min: 0,
        relay_port_max: 0,
        users: [("u".to_string(), "p".to_string())].into_iter().collect(),
        ..TurnConfig::default()
    };
    let srv = TurnServer::start(
        &cfg,
        Some(LocalHandoff {
            peer: peer.clone(),
            ips: vec![sfu.ip()],
        }),
    )
    .unwrap();
    let handle = srv.handle();

    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c = Client::new(ClientConfig {
        stun_serv_addr: srv.udp_addrs()[0].to_string(),
        turn_serv_addr: srv.udp_addrs()[0].to_string(),
        username: "u".into(),
        password: "p".into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    let relay = c.allocate().await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    assert!(handle.is_relay_addr(relay_addr));

    // Client -> SFU (in-process).
    relay.send_to(b"to-sfu", sfu).await.unwrap();
    let pkt = tokio::task::spawn_blocking(move || {
        let p = rx
            .recv_timeout(Duration::from_secs(3))
            .expect("SFU got the packet");
        (p, rx)
    })
    .await
    .unwrap();
    let (p, rx) = pkt;
    assert_eq!(p.relay, relay_addr);
    assert_eq!(p.sfu, sfu);
    assert_eq!(p.data, b"to-sfu");

    // SFU -> client through the handle.
    assert!(handle.send_from_local(sfu, relay_addr, b"from-sfu"));
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), relay.recv_from(&mut buf))
        .await
        .expect("client got SFU packet")
        .unwrap();
    assert_eq!(&buf[..n], b"from-sfu");
    assert_eq!(from, sfu);

    // Another port on the SFU's (loopback) IP is not the SFU: nothing is delivered or sent.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay
        .send_to(b"nope", other.local_addr().unwrap())
        .await
        .unwrap();
    let mut b2 = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other.recv_from(&mut b2))
            .await
            .is_err(),
        "loopback peer that is not the SFU must not get relayed packets"
    );
    assert!(rx.try_recv().is_err());
    assert_eq!(peer.dropped(), 0);
    c.close().await.unwrap();
    srv.stop();
}
