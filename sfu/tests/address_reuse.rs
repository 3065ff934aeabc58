//! A viewer's address can outlive its session at the edge: a NAT hands the port to
//! a new connection, or a client restarts, while the old session waits for its ICE
//! timeout. The new session must connect and get video at once, and nothing but a
//! request signed with a session's ICE password may move an address to it.

mod common;

use std::net::SocketAddr;

use common::{assert_in_order, World};
use edgerelay_sfu::SfuConfig;

/// Takes viewer `a` off the network without a goodbye and starts viewer `b` from
/// `a`'s address; returns `b`.
fn replace_silently(w: &mut World, a: usize) -> usize {
    let addr = w.clients[a].addr;
    w.blackhole.push(a);
    // Datagrams to the address now reach the new client.
    w.clients[a].addr = "192.0.2.1:9".parse().expect("addr");
    w.next_addr = Some(addr);
    w.view("r")
}

#[test]
fn a_new_session_from_an_address_a_stale_one_holds_gets_video() {
    let mut w = World::new(SfuConfig::default());
    let p = w.publish("r");
    let a = w.view("r");
    let other = w.view("r");
    w.connect_all();
    w.stream(p, 0, 30, 30);
    assert!(w.clients[a].frames.len() >= 29);

    let b = replace_silently(&mut w, a);
    w.connect_all_except(&[a]);
    assert_eq!(w.sfu.stats().address_takeovers, 1);
    w.stream(p, 30, 60, 30);
    let got = w.clients[b].frames.len();
    assert!(got >= 55, "the new session got {got} frames");
    assert!(w.clients[b].frames[0].key);
    assert_in_order(&w.clients[b].frames, b);

    // The stale session goes (a late DELETE): the address stays with the new one.
    let stale = w.clients[a].peer.expect("peer");
    w.sfu.remove_peer(w.now, stale).expect("remove");
    let unknown = w.sfu.stats().dropped_unknown_source;
    w.stream(p, 90, 30, 30);
    // (The new session's RTCP still finds it: the address was not unmapped with the
    // stale session.)
    assert_eq!(w.sfu.stats().dropped_unknown_source, unknown);
    assert_eq!(w.clients[b].frames.len(), got + 30);
    assert_in_order(&w.clients[b].frames, b);
    assert_eq!(w.clients[other].frames.len(), 120);
}

/// CRC-32 (IEEE), for STUN's FINGERPRINT.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn put(m: &mut Vec<u8>, typ: u16, value: &[u8]) {
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(value);
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
}

/// An ICE binding request to the SFU session `sfu_ufrag` from the client whose
/// ufrag is `client_ufrag`, well-formed in every way (PRIORITY, ICE-CONTROLLING,
/// FINGERPRINT), its MESSAGE-INTEGRITY made with `password`.
fn request(sfu_ufrag: &str, client_ufrag: &str, password: &str) -> Vec<u8> {
    let hmac = str0m::crypto::from_feature_flags().sha1_hmac_provider;
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&[9; 12]);
    put(
        &mut m,
        0x0006,
        format!("{sfu_ufrag}:{client_ufrag}").as_bytes(),
    );
    put(&mut m, 0x0024, &0x6e00_01ffu32.to_be_bytes());
    put(&mut m, 0x802A, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let len = (m.len() - 20 + 24) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    let mac = hmac.sha1_hmac(password.as_bytes(), &[&m]);
    put(&mut m, 0x0008, &mac);
    let len = (m.len() - 20 + 8) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    let fp = crc32(&m) ^ 0x5354_554e;
    put(&mut m, 0x8028, &fp.to_be_bytes());
    m
}

#[test]
fn a_request_without_the_sessions_password_moves_no_address() {
    let mut w = World::new(SfuConfig::default());
    let p = w.publish("r");
    let victim = w.view("r");
    let other = w.view("r");
    w.connect_all();
    w.stream(p, 0, 10, 30);
    // From the victim's address (spoofed), requests naming the other session, right
    // in every way but the password.
    let from: SocketAddr = w.clients[victim].addr;
    let sfu_ufrag = w.clients[other].sfu_ufrag.clone().expect("ufrag");
    let client_ufrag = w.clients[other]
        .rtc
        .direct_api()
        .local_ice_credentials()
        .ufrag;
    let forged = request(&sfu_ufrag, &client_ufrag, "not-the-password-at-all");
    let sfu = w.sfu_addr;
    for _ in 0..5 {
        assert!(w.sfu.handle_datagram(w.now, from, sfu, &forged));
    }
    assert_eq!(w.sfu.stats().address_takeovers, 0);
    w.stream(p, 10, 30, 30);
    for v in [victim, other] {
        assert_eq!(w.clients[v].frames.len(), 40, "viewer {v}");
        assert_in_order(&w.clients[v].frames, v);
    }
    // The same request signed with the session's password does move the address
    // (so the one above failed for its signature alone).
    let pwd = w.clients[other].sfu_pwd.clone().expect("pwd");
    let signed = request(&sfu_ufrag, &client_ufrag, &pwd);
    assert!(w.sfu.handle_datagram(w.now, from, sfu, &signed));
    assert_eq!(w.sfu.stats().address_takeovers, 1);
}
