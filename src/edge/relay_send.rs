//! The media thread's own sends to viewers relayed by the built-in TURN server.
//!
//! Without this, each datagram the SFU sends to a relayed viewer is copied into a
//! queue for the TURN thread, which wakes, frames it as ChannelData and sends it
//! with one `sendmsg` per run: a copy, an allocation, a thread hand-off (two
//! context switches per round) and small GSO runs per packet. Here the media thread
//! looks the viewer's relayed address up in the routes the TURN thread publishes
//! ([`edgerelay_turn::LocalRoutes`]: UDP allocations with a channel bound to the
//! SFU) and sends the 4-byte ChannelData header and the datagram (two iovecs, no
//! copy) with its own `sendmmsg`/GSO batching from a clone of the TURN listener
//! socket, so the client sees exactly what the TURN thread would have sent.
//!
//! Anything without a live route (no channel yet, a TCP/TLS allocation, an expired
//! channel or permission) takes the hand-off as before. The TURN allocation's
//! bandwidth bucket does not see these packets (it guards against clients relaying
//! to arbitrary peers; the SFU's output is bounded by the stream it forwards).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use edgerelay_sfu::Transmit;
use edgerelay_turn::{LocalRoutes, RouteTable, TurnHandle};

use super::batch_io::{self, Datagram, SendReport};

/// ChannelData header: channel number and length (RFC 8656 §12.4).
const CHANNEL_HEADER: usize = 4;

/// One TURN UDP listener as the media thread sends from it.
struct Listener {
    addr: SocketAddr,
    socket: UdpSocket,
    sender: batch_io::Sender,
    /// Framed datagrams waiting for the next send.
    queued: Vec<Framed>,
}

/// A datagram for a relayed client: its ChannelData header and the SFU's bytes,
/// sent back to back (two iovecs: the SFU's buffer is not moved to make room).
struct Framed {
    client: SocketAddr,
    header: [u8; CHANNEL_HEADER],
    body: Vec<u8>,
}

impl Datagram for Framed {
    fn dest(&self) -> SocketAddr {
        self.client
    }
    fn parts(&self) -> (&[u8], &[u8]) {
        (&self.header, &self.body)
    }
}

/// Routes, listener sockets and queues of one media thread.
pub struct RelaySend {
    routes: Arc<LocalRoutes>,
    version: u64,
    table: Arc<RouteTable>,
    listeners: Vec<Listener>,
}

impl RelaySend {
    /// The media thread's side of `turn`'s UDP listeners (GSO as for media).
    pub fn new(turn: &TurnHandle, gso: bool) -> std::io::Result<RelaySend> {
        let listeners = turn
            .udp_listener_sockets()?
            .into_iter()
            .map(|(addr, socket)| Listener {
                sender: batch_io::Sender::new(&socket, gso, false),
                addr,
                socket,
                queued: Vec::new(),
            })
            .collect();
        let routes = turn.local_routes();
        let (version, table) = routes.snapshot();
        Ok(RelaySend {
            routes,
            version,
            table,
            listeners,
        })
    }

    /// Takes the TURN thread's latest routes if it published new ones (one atomic
    /// load when it did not).
    pub fn refresh(&mut self) {
        if self.routes.version() != self.version {
            (self.version, self.table) = self.routes.snapshot();
        }
    }

    /// Frames `t` as ChannelData and queues it for its client, if `t` goes to a
    /// relayed address with a live channel to its source; otherwise hands `t` back.
    #[allow(clippy::result_large_err)]
    pub fn queue(&mut self, now: Instant, t: Transmit) -> Result<(), Transmit> {
        let Some(route) = self.table.get(&(t.destination, t.source)) else {
            return Err(t);
        };
        let Ok(len) = u16::try_from(t.contents.len()) else {
            return Err(t);
        };
        if route.expires <= now {
            return Err(t);
        }
        let Some(l) = listener_for(&mut self.listeners, route.server) else {
            return Err(t);
        };
        let [c0, c1] = route.channel.to_be_bytes();
        let [l0, l1] = len.to_be_bytes();
        l.queued.push(Framed {
            client: route.client,
            header: [c0, c1, l0, l1],
            body: t.contents.into(),
        });
        Ok(())
    }

    /// Datagrams queued since the last [`RelaySend::send`].
    pub fn queued(&self) -> usize {
        self.listeners.iter().map(|l| l.queued.len()).sum()
    }

    /// Sends everything queued and hands each datagram's buffer to `recycle`;
    /// returns (datagrams sent, what the sends did).
    pub fn send(&mut self, mut recycle: impl FnMut(Vec<u8>)) -> (usize, SendReport) {
        let mut total = SendReport::default();
        let mut sent = 0;
        for l in &mut self.listeners {
            if l.queued.is_empty() {
                continue;
            }
            let r = l.sender.send(&l.socket, &l.queued);
            sent += l.queued.len() - r.failed;
            total.failed += r.failed;
            total.gso_sends += r.gso_sends;
            total.gso_segments += r.gso_segments;
            for f in l.queued.drain(..) {
                recycle(f.body);
            }
        }
        (sent, total)
    }
}

/// The listener a client talks to: its exact address, else a wildcard listener
/// on the same port and family.
fn listener_for(listeners: &mut [Listener], server: SocketAddr) -> Option<&mut Listener> {
    let i = listeners
        .iter()
        .position(|l| l.addr == server)
        .or_else(|| {
            listeners.iter().position(|l| {
                l.addr.ip().is_unspecified()
                    && l.addr.port() == server.port()
                    && l.addr.is_ipv4() == server.is_ipv4()
            })
        })?;
    listeners.get_mut(i)
}
