//! coturn's own test tools (Debian package `coturn`) against our `edgerelay-turn`
//! binary on ephemeral loopback ports. Each test prints `SKIP` and passes when
//! the tools are not installed.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    match Command::new(tool)
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

fn skip(tools: &[&str]) -> bool {
    for t in tools {
        if !have(t) {
            println!("SKIP: {t} not installed (apt-get install coturn)");
            return true;
        }
    }
    false
}

struct Turn {
    _p: Proc,
    udp: SocketAddr,
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
}

fn start_turn(extra: &[&str]) -> Turn {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgerelay-turn"));
    c.args([
        "--listen-udp",
        "127.0.0.1:0",
        "--listen-tcp",
        "127.0.0.1:0",
        "--realm",
        "interop.test",
        "--user",
        "ninefingers:youhavetoberealistic",
        "--relay-ip",
        "127.0.0.1",
        "--allow-loopback-peers-for-testing",
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn edgerelay-turn");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read TURN_READY");
    assert!(line.starts_with("TURN_READY "), "unexpected: {line}");
    let field = |k: &str| -> Option<SocketAddr> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
    };
    Turn {
        udp: field("udp").expect("udp addr"),
        tcp: field("tcp"),
        tls: field("tls"),
        _p: Proc(child),
    }
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn start_peer() -> (Proc, u16) {
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(["-p", &port.to_string(), "-L", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn turnutils_peer");
    std::thread::sleep(Duration::from_millis(300));
    (Proc(child), port)
}

#[derive(Debug)]
struct UclientResult {
    sent: u64,
    received: u64,
    lost: u64,
}

fn parse_uclient(out: &str) -> Option<UclientResult> {
    let mut sent = None;
    let mut received = None;
    let mut lost = None;
    for line in out.lines() {
        if let Some(i) = line.find("start_mclient: tot_send_msgs=") {
            let rest = &line[i + "start_mclient: tot_send_msgs=".len()..];
            let mut it = rest.split(", tot_recv_msgs=");
            sent = it.next().and_then(|s| s.trim().parse().ok());
            received = it.next().and_then(|s| s.trim().parse().ok());
        }
        if let Some(i) = line.find("Total lost packets ") {
            lost = line[i + "Total lost packets ".len()..]
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
        }
    }
    Some(UclientResult {
        sent: sent?,
        received: received?,
        lost: lost?,
    })
}

fn uclient(server: SocketAddr, peer_port: u16, flags: &[&str]) -> UclientResult {
    let out = Command::new("timeout")
        .arg("60")
        .arg("turnutils_uclient")
        .args(flags)
        .args([
            "-p",
            &server.port().to_string(),
            "-u",
            "ninefingers",
            "-w",
            "youhavetoberealistic",
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "40",
            "-m",
            "4",
            "-l",
            "160",
            "127.0.0.1",
        ])
        .output()
        .expect("run turnutils_uclient");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_uclient(&text).unwrap_or_else(|| panic!("cannot parse uclient output {flags:?}:\n{text}"))
}

fn assert_zero_loss(r: &UclientResult, what: &str) {
    println!("{what}: {r:?}");
    assert_eq!(r.sent, 160, "{what}: sent (40 messages x 4 clients)");
    assert_eq!(r.received, r.sent, "{what}: received");
    assert_eq!(r.lost, 0, "{what}: lost");
}

#[test]
fn stunclient_gets_mapped_address() {
    if skip(&["turnutils_stunclient"]) {
        return;
    }
    let t = start_turn(&[]);
    let out = Command::new("timeout")
        .args([
            "20",
            "turnutils_stunclient",
            "-p",
            &t.udp.port().to_string(),
            "127.0.0.1",
        ])
        .output()
        .expect("run turnutils_stunclient");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "no mapped address in:\n{text}"
    );
}

#[test]
fn uclient_udp_channels_and_send_indications() {
    if skip(&["turnutils_uclient", "turnutils_peer"]) {
        return;
    }
    let t = start_turn(&[]);
    let (_peer, port) = start_peer();
    assert_zero_loss(&uclient(t.udp, port, &[]), "udp channels (rtp+rtcp)");
    assert_zero_loss(&uclient(t.udp, port, &["-c"]), "udp channels, no rtcp");
    assert_zero_loss(&uclient(t.udp, port, &["-s"]), "udp send indications");
}

#[test]
fn uclient_tcp_channels_and_send_indications() {
    if skip(&["turnutils_uclient", "turnutils_peer"]) {
        return;
    }
    let t = start_turn(&[]);
    let (_peer, port) = start_peer();
    let tcp = t.tcp.expect("tcp listener");
    assert_zero_loss(&uclient(tcp, port, &["-t"]), "tcp channels");
    assert_zero_loss(&uclient(tcp, port, &["-t", "-s"]), "tcp send indications");
}

#[test]
fn uclient_tls() {
    if skip(&["turnutils_uclient", "turnutils_peer"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("edgerelay-turn-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let t = start_turn(&[
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let (_peer, port) = start_peer();
    let tls = t.tls.expect("tls listener");
    assert_zero_loss(&uclient(tls, port, &["-t", "-S"]), "tls channels");
    let _ = std::fs::remove_dir_all(&dir);
}
