//! Socket drivers for the TURN core.
//!
//! * One dedicated OS thread ("edgerelay-turn") owns the [`Server`] core, the UDP
//!   listeners and one UDP relay socket per allocation, multiplexed with mio
//!   (epoll). No lock is taken per packet.
//! * TCP and TLS (TURNS) listeners run on a small tokio runtime in a second thread;
//!   each connection forwards complete frames (STUN or ChannelData) to the TURN
//!   thread through a bounded channel and gets frames back through its own
//!   bounded channel.
//! * The co-located SFU reaches the TURN thread through [`TurnHandle::send_from_local`]
//!   (bounded channel + mio waker) and receives relayed packets through its
//!   [`LocalPeer`] implementation ([`ChannelPeer`] is a ready-made one).

mod local_routes;
mod stream;
mod udp;

pub use local_routes::{LocalRoutes, RouteTable};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crate::config::TurnConfig;
use crate::server::{FiveTuple, LocalPeer, Server};

/// Capacity of the command channel into the TURN thread (frames from TCP/TLS
/// connections and packets from the SFU). Full = packet dropped.
pub const COMMAND_CAPACITY: usize = 8192;

/// A packet crossing the in-process hand-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPacket {
    /// The TURN relayed address (the SFU's remote candidate).
    pub relay: SocketAddr,
    /// The SFU address.
    pub sfu: SocketAddr,
    /// Payload (the raw UDP payload, e.g. STUN/DTLS/SRTP).
    pub data: Vec<u8>,
}

/// A ready-made [`LocalPeer`]: a fixed set of SFU addresses and a bounded
/// channel of owned packets that the SFU media thread drains.
///
/// `deliver` never blocks: when the channel is full the packet is dropped
/// (counted in [`ChannelPeer::dropped`]), as a full socket buffer would.
pub struct ChannelPeer {
    addrs: Vec<SocketAddr>,
    tx: SyncSender<LocalPacket>,
    dropped: std::sync::atomic::AtomicU64,
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl ChannelPeer {
    /// A hand-off for the SFU listening on `addrs`; returns the peer (give it to
    /// [`TurnServer::start`]) and the receiver the SFU drains.
    pub fn new(
        addrs: Vec<SocketAddr>,
        capacity: usize,
    ) -> (Arc<ChannelPeer>, Receiver<LocalPacket>) {
        Self::build(addrs, capacity, None)
    }

    /// Like [`ChannelPeer::new`], calling `wake` after each queued packet so a
    /// receiver blocked elsewhere (the SFU's socket wait) notices it.
    pub fn with_wake(
        addrs: Vec<SocketAddr>,
        capacity: usize,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> (Arc<ChannelPeer>, Receiver<LocalPacket>) {
        Self::build(addrs, capacity, Some(wake))
    }

    fn build(
        addrs: Vec<SocketAddr>,
        capacity: usize,
        wake: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> (Arc<ChannelPeer>, Receiver<LocalPacket>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        (
            Arc::new(ChannelPeer {
                addrs,
                tx,
                dropped: Default::default(),
                wake,
            }),
            rx,
        )
    }

    /// Packets dropped because the SFU did not drain fast enough.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl LocalPeer for ChannelPeer {
    fn is_local(&self, addr: SocketAddr) -> bool {
        self.addrs.contains(&addr)
    }
    fn deliver(&self, relay: SocketAddr, sfu: SocketAddr, data: &[u8]) {
        let p = LocalPacket {
            relay,
            sfu,
            data: data.to_vec(),
        };
        if self.tx.try_send(p).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else if let Some(wake) = &self.wake {
            wake();
        }
    }
}

pub(crate) enum Cmd {
    StreamOpen {
        tuple: FiveTuple,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    },
    StreamFrame {
        tuple: FiveTuple,
        data: Vec<u8>,
    },
    StreamClosed {
        tuple: FiveTuple,
    },
    FromLocal {
        sfu: SocketAddr,
        relay: SocketAddr,
        data: Vec<u8>,
    },
}

/// Sender side into the TURN thread, with a wake-up that costs a syscall only
/// when the thread is not already awake.
#[derive(Clone)]
pub(crate) struct CmdTx {
    tx: SyncSender<Cmd>,
    waker: Arc<mio::Waker>,
    pending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl CmdTx {
    pub(crate) fn send(&self, c: Cmd) -> bool {
        match self.tx.try_send(c) {
            Ok(()) => {
                if !self.pending.swap(true, Ordering::AcqRel) {
                    let _ = self.waker.wake();
                }
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

/// A cloneable handle to a running TURN server (for the SFU and the edge).
#[derive(Clone)]
pub struct TurnHandle {
    cmd: CmdTx,
    relays: Arc<RwLock<std::collections::HashSet<SocketAddr>>>,
    routes: Arc<LocalRoutes>,
    udp_socks: Arc<Vec<(SocketAddr, std::net::UdpSocket)>>,
}

impl TurnHandle {
    /// Hand a packet from the SFU (sent from `sfu` to the relayed address `relay`)
    /// to the TURN thread, which relays it to the client as ChannelData or a Data
    /// indication. Returns false if it was dropped (queue full or server stopped).
    /// Copies `data` once into an owned buffer.
    pub fn send_from_local(&self, sfu: SocketAddr, relay: SocketAddr, data: &[u8]) -> bool {
        self.cmd.send(Cmd::FromLocal {
            sfu,
            relay,
            data: data.to_vec(),
        })
    }

    /// The UDP allocations' channels to the co-located SFU, kept current by the
    /// TURN thread, so the SFU can frame and send its own packets to relayed
    /// clients ([`TurnHandle::udp_listener_sockets`]).
    pub fn local_routes(&self) -> Arc<LocalRoutes> {
        self.routes.clone()
    }

    /// Clones of the UDP listener sockets (address, socket), for sending to
    /// relayed clients from the address they talk to.
    pub fn udp_listener_sockets(&self) -> io::Result<Vec<(SocketAddr, std::net::UdpSocket)>> {
        self.udp_socks
            .iter()
            .map(|(a, s)| Ok((*a, s.try_clone()?)))
            .collect()
    }

    /// Whether `addr` is the relayed address of a live allocation of this server
    /// (the SFU uses it to route its output to [`TurnHandle::send_from_local`]
    /// instead of its socket). Takes an uncontended read lock.
    pub fn is_relay_addr(&self, addr: SocketAddr) -> bool {
        self.relays
            .read()
            .map(|s| s.contains(&addr))
            .unwrap_or(false)
    }

    /// Ask the server to stop (asynchronous).
    pub fn shutdown(&self) {
        self.cmd.stop();
    }
}

/// A running TURN server: the TURN thread and the TCP/TLS thread.
pub struct TurnServer {
    handle: TurnHandle,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    stream_shutdown: Option<tokio::sync::watch::Sender<bool>>,
}

/// The co-located SFU for [`TurnServer::start`].
pub struct LocalHandoff {
    /// The SFU hand-off implementation.
    pub peer: Arc<dyn LocalPeer>,
    /// The SFU's IPs (allowed as peers by policy; exact addresses are checked with
    /// [`LocalPeer::is_local`]).
    pub ips: Vec<IpAddr>,
}

impl TurnServer {
    /// Bind all listeners of `cfg` and start the threads. Errors if a socket
    /// cannot be bound or the TLS certificate/key cannot be loaded.
    pub fn start(cfg: &TurnConfig, local: Option<LocalHandoff>) -> io::Result<TurnServer> {
        let now = std::time::Instant::now();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut core = Server::new(cfg, now, unix);
        let local_peer = local.as_ref().map(|l| l.peer.clone());
        if let Some(l) = local {
            core.set_local_peer(l.peer, &l.ips);
        }
        let relays = Arc::new(RwLock::new(std::collections::HashSet::new()));
        let (tx, rx) = std::sync::mpsc::sync_channel(COMMAND_CAPACITY);
        let routes = Arc::new(LocalRoutes::default());
        let turn =
            udp::TurnThread::bind(cfg, core, rx, local_peer, relays.clone(), routes.clone())?;
        let udp_socks = Arc::new(turn.listener_clones()?);
        let cmd = CmdTx {
            tx,
            waker: turn.waker(),
            pending: turn.pending(),
            stop: turn.stop_flag(),
        };
        let udp_addrs = turn.udp_addrs();
        let mut threads = Vec::new();
        let mut tcp = Vec::new();
        let mut tls = Vec::new();
        let mut stream_shutdown = None;
        // Streams first: if they fail, nothing has been spawned yet.
        if !cfg.listen_tcp.is_empty() || !cfg.listen_tls.is_empty() {
            let (addrs_tcp, addrs_tls, sd, th) = stream::start(cfg, cmd.clone())?;
            tcp = addrs_tcp;
            tls = addrs_tls;
            stream_shutdown = Some(sd);
            threads.push(th);
        }
        match std::thread::Builder::new()
            .name("edgerelay-turn".into())
            .spawn(move || turn.run())
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                if let Some(sd) = stream_shutdown.take() {
                    let _ = sd.send(true);
                }
                for t in threads.drain(..) {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
        Ok(TurnServer {
            handle: TurnHandle {
                cmd,
                relays,
                routes,
                udp_socks,
            },
            udp: udp_addrs,
            tcp,
            tls,
            threads,
            stream_shutdown,
        })
    }

    /// A handle for the SFU / edge.
    pub fn handle(&self) -> TurnHandle {
        self.handle.clone()
    }

    /// Bound UDP addresses (with the real port when 0 was configured).
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// Bound TCP addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// Bound TLS addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// Stop and join the threads.
    pub fn stop(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        self.handle.shutdown();
        if let Some(sd) = self.stream_shutdown.take() {
            let _ = sd.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}
