//! Blocking UDP driver for one str0m `Rtc` on a dedicated thread, shared by the
//! publisher and the WHEP client.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use str0m::net::{Protocol, Receive};
use str0m::{Event, Input, Output, Rtc};

/// Largest datagram we read; bigger ones are truncated and dropped by str0m.
const RECV_BUF: usize = 2048;

/// A UDP socket bound for one peer connection plus a reusable receive buffer.
pub struct RtcSocket {
    socket: UdpSocket,
    local: SocketAddr,
    buf: Box<[u8; RECV_BUF]>,
}

impl RtcSocket {
    /// Binds an ephemeral UDP port on `ip`.
    pub fn bind(ip: IpAddr) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let local = socket.local_addr()?;
        Ok(Self {
            socket,
            local,
            buf: Box::new([0u8; RECV_BUF]),
        })
    }

    /// The bound address (used as the host candidate).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Polls `rtc` until it asks to wait: sends every transmit, appends every event
    /// to `events`, and returns the instant of its next timeout.
    pub fn drain(&self, rtc: &mut Rtc, events: &mut Vec<Event>) -> anyhow::Result<Instant> {
        // Bounded: str0m always ends with a Timeout, but guard against a busy loop.
        for _ in 0..100_000 {
            match rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination) {
                        tracing::debug!(dest = %t.destination, "udp send failed: {e}");
                    }
                }
                Output::Event(e) => events.push(e),
            }
        }
        Ok(Instant::now())
    }

    /// Local shutdown (RTCP BYE, SCTP shutdown, DTLS close_notify), then keeps
    /// the session running for at most 200 ms so those packets leave.
    pub fn close(&mut self, rtc: &mut Rtc) -> anyhow::Result<()> {
        if rtc.close().is_ok() {
            let mut events = Vec::new();
            let end = Instant::now() + Duration::from_millis(200);
            while rtc.is_alive() && Instant::now() < end {
                let t = self.drain(rtc, &mut events)?;
                events.clear();
                self.wait(rtc, t.min(end))?;
            }
        }
        Ok(())
    }

    /// Waits for one datagram until `deadline` and hands it to `rtc`; on timeout
    /// hands `rtc` a timeout input instead. Malformed datagrams are dropped.
    ///
    /// The wait is a `ppoll` (high-resolution timer), not the socket's read timeout,
    /// which counts in scheduler ticks: a 1 ms read timeout returns after 8 ms on a
    /// 250 Hz kernel, which made a paced sender fall behind its rate. The read
    /// timeout stays as a guard for a datagram dropped between poll and read.
    pub fn wait(&mut self, rtc: &mut Rtc, deadline: Instant) -> anyhow::Result<()> {
        let now = Instant::now();
        if deadline > now {
            let wait = (deadline - now).max(Duration::from_micros(100));
            if !wait_readable(&self.socket, wait)? {
                rtc.handle_input(Input::Timeout(Instant::now()))?;
                return Ok(());
            }
            self.socket.set_read_timeout(Some(wait))?;
            match self.socket.recv_from(&mut self.buf[..]) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    let Ok(contents) = self.buf[..n].try_into() else {
                        tracing::trace!(%source, n, "dropping unrecognised datagram");
                        return Ok(());
                    };
                    let input = Input::Receive(
                        now,
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: self.local,
                            contents,
                        },
                    );
                    if rtc.accepts(&input) {
                        if let Err(e) = rtc.handle_input(input) {
                            tracing::debug!(%source, "dropping datagram: {e}");
                        }
                    }
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    tracing::debug!("udp recv: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        rtc.handle_input(Input::Timeout(Instant::now()))?;
        Ok(())
    }
}

/// Waits until `sock` is readable or `timeout` passes; true if readable. A `ppoll`,
/// whose timeout is a high-resolution timer (a socket's read timeout counts in
/// scheduler ticks). Shared with the edge's media threads (`batch_io`); it lives
/// here because the publisher's tests build this module on its own.
#[cfg(target_os = "linux")]
pub fn wait_readable(sock: &UdpSocket, timeout: Duration) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Waits until readable (portable fallback: a read timeout on the next recv).
#[cfg(not(target_os = "linux"))]
pub fn wait_readable(sock: &UdpSocket, timeout: Duration) -> std::io::Result<bool> {
    sock.set_read_timeout(Some(timeout.max(Duration::from_micros(100))))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::RtcConfig;

    /// A short wait ends about on time. With the socket's read timeout as the timer a
    /// 2 ms wait took 8 ms on a 250 Hz kernel, and a paced sender driven by these
    /// waits sent at half its rate.
    #[test]
    fn a_short_wait_ends_about_on_time() {
        let mut sock = RtcSocket::bind("127.0.0.1".parse().unwrap()).unwrap();
        let mut rtc = RtcConfig::new().build(Instant::now());
        let mut took: Vec<Duration> = (0..7)
            .map(|_| {
                let t = Instant::now();
                sock.wait(&mut rtc, t + Duration::from_millis(2)).unwrap();
                t.elapsed()
            })
            .collect();
        took.sort();
        assert!(took[0] >= Duration::from_millis(2), "{took:?}");
        // The median, so that one preempted wait on a busy machine does not count.
        assert!(took[3] < Duration::from_millis(5), "{took:?}");
    }
}
