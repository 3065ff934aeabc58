//! The webrtc-rs `turn` crate's client (independent implementation) against our server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgerelay_turn::{rest_credentials, TurnConfig, TurnServer};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

fn server(loopback_peers: bool) -> TurnServer {
    let mut cfg = TurnConfig {
        realm: "webrtc.test".into(),
        listen_udp: vec!["127.0.0.1:0".parse().unwrap()],
        listen_tcp: vec![],
        relay_ip: Some("127.0.0.1".parse().unwrap()),
        relay_port_min: 0,
        relay_port_max: 0,
        rest_secrets: vec!["shared-secret".into()],
        allow_loopback_peers_for_testing: loopback_peers,
        ..TurnConfig::default()
    };
    cfg.users.insert("alice".into(), "wonderland".into());
    TurnServer::start(&cfg, None).expect("start TURN server")
}

async fn client(srv: SocketAddr, user: &str, pass: &str) -> Client {
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c = Client::new(ClientConfig {
        stun_serv_addr: srv.to_string(),
        turn_serv_addr: srv.to_string(),
        username: user.into(),
        password: pass.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    c
}

#[tokio::test]
async fn webrtc_rs_client_relays_both_ways() {
    let srv = server(true);
    let addr = srv.udp_addrs()[0];
    let c = client(addr, "alice", "wonderland").await;
    let mapped = c.send_binding_request().await.unwrap();
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");

    let relay = c.allocate().await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    assert_eq!(relay_addr.ip().to_string(), "127.0.0.1");

    // A peer on loopback (allowed only by the test switch).
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // Client -> peer: the client creates the permission (and later a channel).
    let mut got = 0;
    let mut buf = vec![0u8; 1500];
    for i in 0..20u8 {
        relay.send_to(&[i; 100], peer_addr).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf)).await
        {
            assert_eq!(from, relay_addr);
            assert_eq!(&buf[..n], &[i; 100][..]);
            got += 1;
        }
    }
    assert!(got >= 19, "peer got {got}/20");

    // Peer -> client through the relay.
    let mut back = 0;
    for i in 0..20u8 {
        peer.send_to(&[i ^ 0xAA; 200], relay_addr).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf)).await
        {
            assert_eq!(from, peer_addr);
            assert_eq!(&buf[..n], &[i ^ 0xAA; 200][..]);
            back += 1;
        }
    }
    assert!(back >= 19, "client got {back}/20");
    relay.close().await.unwrap();
    c.close().await.unwrap();
    srv.stop();
}

#[tokio::test]
async fn webrtc_rs_client_with_rest_credentials_and_bad_password() {
    let srv = server(false);
    let addr = srv.udp_addrs()[0];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (u, p) = rest_credentials("shared-secret", "viewer", 600, now);
    let c = client(addr, &u, &p).await;
    let relay = c.allocate().await.expect("REST credentials accepted");
    assert!(relay.local_addr().is_ok());
    c.close().await.unwrap();

    let bad = client(addr, "alice", "not-the-password").await;
    assert!(bad.allocate().await.is_err(), "bad password must fail");
    bad.close().await.unwrap();
    srv.stop();
}
