//! Criterion micro-benches of the TURN crate's wire codec (public API only):
//! STUN message build (with MESSAGE-INTEGRITY and FINGERPRINT) and parse (+ integrity
//! check), a Send indication carrying 1200 bytes, and ChannelData parse/framing.
//!
//! `cargo bench --bench turn_codec`

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgerelay_turn::stun::{self, attr, method, Builder, Class, Message};

const KEY: &[u8] = b"0123456789abcdef";
const TID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

fn binding_request(buf: &mut Vec<u8>) {
    Builder::new(buf, method::BINDING, Class::Request, TID)
        .attr(attr::USERNAME, b"1795000000:viewer-42")
        .u32_attr(0x0024, 0x6e7f_00ff) // PRIORITY
        .integrity(KEY, false)
        .fingerprint();
}

fn send_indication(buf: &mut Vec<u8>, peer: SocketAddr, payload: &[u8]) {
    Builder::new(buf, method::SEND, Class::Indication, TID)
        .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, payload);
}

fn channel_data(buf: &mut Vec<u8>, ch: u16, payload: &[u8]) {
    buf.clear();
    buf.extend_from_slice(&ch.to_be_bytes());
    buf.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    buf.extend_from_slice(payload);
}

fn bench(c: &mut Criterion) {
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
    let payload = vec![0xA5u8; 1200];
    let mut g = c.benchmark_group("turn_codec");
    g.throughput(Throughput::Elements(1));

    let mut buf = Vec::with_capacity(2048);
    g.bench_function("stun_build_binding_integrity_fingerprint", |b| {
        b.iter(|| {
            binding_request(&mut buf);
            black_box(buf.len())
        })
    });

    let mut req = Vec::new();
    binding_request(&mut req);
    g.bench_function("stun_parse_binding", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).expect("valid");
            black_box(m.method)
        })
    });
    g.bench_function("stun_parse_and_verify_integrity", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).expect("valid");
            black_box(m.verify_integrity(KEY))
        })
    });

    g.bench_function("send_indication_build_1200B", |b| {
        b.iter(|| {
            send_indication(&mut buf, peer, black_box(&payload));
            black_box(buf.len())
        })
    });
    let mut ind = Vec::new();
    send_indication(&mut ind, peer, &payload);
    g.bench_function("send_indication_parse_1200B", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&ind)).expect("valid");
            black_box(m.peer(0))
        })
    });

    let mut cd = Vec::new();
    channel_data(&mut cd, 0x4001, &payload);
    g.bench_function("channel_data_parse_1200B", |b| {
        b.iter(|| {
            let d = black_box(&cd[..]);
            let ok = stun::is_channel_data(d);
            black_box((ok, stun::parse_channel_data(d)))
        })
    });
    g.bench_function("channel_data_stream_frame_len", |b| {
        b.iter(|| black_box(stun::stream_frame_len(black_box(&cd))))
    });
    g.bench_function("channel_data_build_1200B", |b| {
        b.iter(|| {
            channel_data(&mut buf, 0x4001, black_box(&payload));
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
