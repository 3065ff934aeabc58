//! TCP and TLS (TURNS) listeners on a small tokio runtime.
//!
//! Framing (RFC 8656 §12.5, without RFC 6062): the stream carries STUN messages
//! and ChannelData messages back to back; ChannelData is padded to 4 bytes.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcp};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use super::{Cmd, CmdTx};
use crate::config::TurnConfig;
use crate::server::{FiveTuple, Transport};
use crate::stun;

/// Most concurrent TCP+TLS connections.
const MAX_CONNECTIONS: usize = 4096;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// TLS handshake deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one client before dropping.
const PER_CONN_QUEUE: usize = 1024;

fn load_tls(cfg: &TurnConfig) -> io::Result<tokio_rustls::TlsAcceptor> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "listen_tls needs tls_cert and tls_key",
        ));
    };
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no private key in tls_key"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(sc)))
}

type Started = (
    Vec<SocketAddr>,
    Vec<SocketAddr>,
    watch::Sender<bool>,
    JoinHandle<()>,
);

pub(crate) fn start(cfg: &TurnConfig, cmd: CmdTx) -> io::Result<Started> {
    let mut tcp = Vec::new();
    for a in &cfg.listen_tcp {
        let l = StdTcp::bind(a)?;
        l.set_nonblocking(true)?;
        tcp.push(l);
    }
    let acceptor = if cfg.listen_tls.is_empty() {
        None
    } else {
        Some(load_tls(cfg)?)
    };
    let mut tls = Vec::new();
    for a in &cfg.listen_tls {
        let l = StdTcp::bind(a)?;
        l.set_nonblocking(true)?;
        tls.push(l);
    }
    let tcp_addrs = tcp
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let tls_addrs = tls
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let (sd_tx, sd_rx) = watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let th = std::thread::Builder::new()
        .name("edgerelay-turn-tcp".into())
        .spawn(move || {
            rt.block_on(async move {
                let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                let mut tasks = Vec::new();
                for l in tcp {
                    if let Ok(l) = TcpListener::from_std(l) {
                        tasks.push(tokio::spawn(accept_loop(
                            l,
                            None,
                            cmd.clone(),
                            limit.clone(),
                            sd_rx.clone(),
                        )));
                    }
                }
                for l in tls {
                    if let Ok(l) = TcpListener::from_std(l) {
                        tasks.push(tokio::spawn(accept_loop(
                            l,
                            acceptor.clone(),
                            cmd.clone(),
                            limit.clone(),
                            sd_rx.clone(),
                        )));
                    }
                }
                let mut sd = sd_rx.clone();
                stopped(&mut sd).await;
                for t in tasks {
                    t.abort();
                }
            });
        })?;
    Ok((tcp_addrs, tls_addrs, sd_tx, th))
}

async fn accept_loop(
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cmd: CmdTx,
    limit: Arc<Semaphore>,
    mut sd: watch::Receiver<bool>,
) {
    let Ok(local) = l.local_addr() else { return };
    loop {
        let (sock, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("TURN accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut sd) => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "TURN connection limit reached");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let cmd = cmd.clone();
        let tls = tls.clone();
        let sd = sd.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let t = FiveTuple {
                        transport: Transport::Tcp,
                        client: peer,
                        local,
                    };
                    serve(sock, t, cmd, sd).await;
                }
                Some(acc) => {
                    let s = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(sock)).await {
                        Ok(Ok(s)) => s,
                        _ => {
                            tracing::debug!(%peer, "TURNS handshake failed");
                            return;
                        }
                    };
                    let t = FiveTuple {
                        transport: Transport::Tls,
                        client: peer,
                        local,
                    };
                    serve(s, t, cmd, sd).await;
                }
            }
        });
    }
}

async fn serve<S>(stream: S, tuple: FiveTuple, cmd: CmdTx, mut sd: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PER_CONN_QUEUE);
    if !cmd.send(Cmd::StreamOpen { tuple, tx }) {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    'outer: loop {
        let n = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, rd.read(&mut chunk)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => n,
            },
            _ = stopped(&mut sd) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        loop {
            match stun::stream_frame_len(&buf[off..]) {
                Err(()) => {
                    tracing::debug!(client = %tuple.client, "TURN stream: bad framing, closing");
                    break 'outer;
                }
                Ok(None) => break,
                Ok(Some(len)) if len > stun::MAX_MESSAGE_LEN => break 'outer,
                Ok(Some(len)) => {
                    if buf.len() - off < len {
                        break;
                    }
                    let frame = buf[off..off + len].to_vec();
                    off += len;
                    // Queue full: the frame is dropped (like a lost datagram).
                    let _ = cmd.send(Cmd::StreamFrame { tuple, data: frame });
                }
            }
        }
        buf.drain(..off);
    }
    // Deliver the close even if the queue is momentarily full.
    for _ in 0..100 {
        if cmd.send(Cmd::StreamClosed { tuple }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = writer.await;
}

async fn stopped(sd: &mut watch::Receiver<bool>) {
    let _ = sd.wait_for(|v| *v).await;
}
