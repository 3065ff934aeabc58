//! Batched UDP I/O for the media thread: one `ppoll` to wait, one `recvmmsg`
//! for up to [`BATCH`] datagrams, one `sendmmsg` for up to [`BATCH`] datagrams
//! to any mix of destinations. The fan-out of one packet to N viewers costs
//! N/[`BATCH`] syscalls instead of N. Other platforms fall back to one call per
//! datagram.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Largest datagram accepted (bigger ones are truncated and dropped by the SFU).
pub const MAX_DATAGRAM: usize = 2048;

/// Receive buffers for one batch.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    addrs: [Option<SocketAddr>; BATCH],
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            lens: [0; BATCH],
            addrs: [None; BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// The datagrams of the last receive: (source, payload).
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        (0..self.count).filter_map(move |i| {
            let a = self.addrs[i]?;
            let start = i * MAX_DATAGRAM;
            Some((a, &self.bufs[start..start + self.lens[i].min(MAX_DATAGRAM)]))
        })
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    fn to_sockaddr(a: &SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
        match a {
            SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
                let sin = unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(v6) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_flowinfo = v6.flowinfo();
                sin6.sin6_addr = libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                };
                sin6.sin6_scope_id = v6.scope_id();
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Waits until the socket is readable or `timeout` passes; true if readable.
    pub fn wait_readable(sock: &UdpSocket, timeout: Duration) -> io::Result<bool> {
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
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0)
    }

    /// Receives up to [`BATCH`] datagrams without blocking.
    pub fn recv_batch(sock: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
        b.count = 0;
        // SAFETY: zeroed plain-old-data C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = b.bufs.as_mut_ptr();
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                // SAFETY: i * MAX_DATAGRAM + MAX_DATAGRAM <= bufs.len().
                iov_base: unsafe { base.add(i * MAX_DATAGRAM) } as *mut libc::c_void,
                iov_len: MAX_DATAGRAM,
            };
            msgs[i].msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: all pointers point into live local arrays or `bufs`, sized as declared.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for i in 0..n {
            b.lens[i] = msgs[i].msg_len as usize;
            // Truncated datagrams (MSG_TRUNC) are not ours to interpret.
            b.addrs[i] = if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                None
            } else {
                from_sockaddr(&names[i])
            };
        }
        b.count = n;
        Ok(n)
    }

    /// Sends every datagram, [`BATCH`] per call; returns how many failed.
    pub fn send_batch(sock: &UdpSocket, items: &[(SocketAddr, &[u8])]) -> usize {
        let mut failed = 0;
        // SAFETY: zeroed plain-old-data C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for chunk in items.chunks(BATCH) {
            for (i, (dest, data)) in chunk.iter().enumerate() {
                let len = to_sockaddr(dest, &mut names[i]);
                iovs[i] = libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                };
                msgs[i] = unsafe { zeroed() };
                msgs[i].msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
                msgs[i].msg_hdr.msg_namelen = len;
                msgs[i].msg_hdr.msg_iov = &mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            let mut off = 0;
            while off < chunk.len() {
                // SAFETY: msgs[off..chunk.len()] were filled above and point at live data.
                let n = unsafe {
                    libc::sendmmsg(
                        sock.as_raw_fd(),
                        msgs.as_mut_ptr().add(off),
                        (chunk.len() - off) as libc::c_uint,
                        0,
                    )
                };
                if n <= 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // The message at `off` failed (unreachable, buffer full): skip it.
                    failed += 1;
                    off += 1;
                } else {
                    off += n as usize;
                }
            }
        }
        failed
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    /// Waits until readable (portable fallback: a read timeout on the next recv).
    pub fn wait_readable(sock: &UdpSocket, timeout: Duration) -> io::Result<bool> {
        sock.set_read_timeout(Some(timeout.max(Duration::from_micros(100))))?;
        Ok(true)
    }

    /// Receives one datagram.
    pub fn recv_batch(sock: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
        b.count = 0;
        match sock.recv_from(&mut b.bufs[..MAX_DATAGRAM]) {
            Ok((n, a)) => {
                b.lens[0] = n;
                b.addrs[0] = Some(a);
                b.count = 1;
                Ok(1)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one datagram per call; returns how many failed.
    pub fn send_batch(sock: &UdpSocket, items: &[(SocketAddr, &[u8])]) -> usize {
        items
            .iter()
            .filter(|(d, p)| sock.send_to(p, d).is_err())
            .count()
    }
}

pub use imp::{recv_batch, send_batch, wait_readable};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cross_destinations_and_come_back_whole() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
        let c = UdpSocket::bind("[::1]:0").ok();
        let src = UdpSocket::bind("127.0.0.1:0").expect("bind src");
        let pa = a.local_addr().expect("addr");
        let pb = b.local_addr().expect("addr");
        let payloads: Vec<Vec<u8>> = (0..150u8).map(|i| vec![i; 10 + i as usize]).collect();
        let items: Vec<(SocketAddr, &[u8])> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (if i % 2 == 0 { pa } else { pb }, p.as_slice()))
            .collect();
        assert_eq!(send_batch(&src, &items), 0);
        for (sock, parity) in [(&a, 0usize), (&b, 1)] {
            let mut got = Vec::new();
            let mut batch = RecvBatch::default();
            while got.len() < 75 {
                assert!(wait_readable(sock, Duration::from_secs(2)).expect("poll"));
                recv_batch(sock, &mut batch).expect("recv");
                for (from, data) in batch.iter() {
                    assert_eq!(from, src.local_addr().expect("addr"));
                    got.push(data.to_vec());
                }
            }
            for (k, d) in got.iter().enumerate() {
                let i = 2 * k + parity;
                assert_eq!(d, &payloads[i], "datagram {i} intact and in order");
            }
        }
        // An IPv4 socket cannot send to an IPv6 destination: counted, not fatal.
        if let Some(c) = c {
            let dst = c.local_addr().expect("addr");
            let bad: Vec<(SocketAddr, &[u8])> = vec![(dst, b"x"), (pa, b"y")];
            assert_eq!(send_batch(&src, &bad), 1);
            let mut batch = RecvBatch::default();
            assert!(wait_readable(&a, Duration::from_secs(2)).expect("poll"));
            recv_batch(&a, &mut batch).expect("recv");
            assert_eq!(
                batch.iter().next().map(|(_, d)| d.to_vec()),
                Some(b"y".to_vec())
            );
        }
        // Nothing pending: a non-blocking receive returns zero.
        let mut batch = RecvBatch::default();
        assert_eq!(recv_batch(&a, &mut batch).expect("recv"), 0);
        assert!(!wait_readable(&a, Duration::from_millis(5)).expect("poll"));
    }
}
