//! UDP GRO on the load generator's viewer sockets (`loadtest --receiver-gro`).
//!
//! On loopback the kernel delivers each datagram into the receiving socket inside
//! the sender's `sendmmsg`, so the edge's measured CPU includes the viewers' side:
//! a GSO batch is cut back into datagrams and queued one by one on the receiver,
//! work a NIC with segmentation offload would do in hardware and the network's
//! receivers on their own machines. With `UDP_GRO` on the receiving socket the
//! batch is queued whole and split here by the segment size the kernel reports,
//! so the edge's CPU is closer to its own work. Linux only; the default stays off
//! (the conservative figure).

use std::io;
use std::net::SocketAddr;

/// Linux `UDP_GRO` socket option (include/uapi/linux/udp.h).
#[cfg(target_os = "linux")]
const UDP_GRO: libc::c_int = 104;

/// Largest buffer a GRO receive can fill (a full 64 KB UDP payload).
pub const GRO_BUF: usize = 65_536;

/// Turns UDP GRO on for `sock`.
#[cfg(target_os = "linux")]
pub fn enable(sock: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn enable<T>(_sock: &T) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "UDP GRO is Linux-only",
    ))
}

/// Receives one (possibly coalesced) buffer: (bytes, source, segment size). The
/// buffer holds `bytes / segment` datagrams of `segment` bytes and a shorter tail;
/// the segment size is `bytes` when the kernel did not coalesce.
#[cfg(target_os = "linux")]
pub fn recv(
    sock: &impl std::os::fd::AsRawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, usize)> {
    use std::mem::{size_of, zeroed};
    // SAFETY: plain-old-data C structs, zero is a valid value.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<[u64; 8]>() as _;
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut segment = n;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within
    // msg_controllen; the data read is the int the kernel wrote for UDP_GRO.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let s = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if s > 0 {
                    segment = s as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let source = socket_addr(&name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP source"))?;
    Ok((n, source, segment.max(1)))
}

/// The IP socket address in `s`, if it is one.
#[cfg(target_os = "linux")]
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn recv<T>(_sock: &T, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "UDP GRO is Linux-only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A GSO batch sent to a GRO socket comes back as one buffer and its segment
    /// size, and splits into the datagrams sent.
    #[test]
    fn a_gso_batch_arrives_whole_and_splits_back() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        if enable(&rx).is_err() {
            eprintln!("skipped: no UDP_GRO here");
            return;
        }
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let items: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i; if i == 4 { 100 } else { 1000 }])
            .collect();
        let refs: Vec<(SocketAddr, &[u8])> = items.iter().map(|d| (to, d.as_slice())).collect();
        let mut sender = crate::edge::batch_io::Sender::new(&tx, true, false);
        assert_eq!(sender.send(&tx, &refs).failed, 0);
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = vec![0u8; GRO_BUF];
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut coalesced = false;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < items.len() && std::time::Instant::now() < deadline {
            match recv(&rx, &mut buf) {
                Ok((n, from, seg)) => {
                    assert_eq!(from, tx.local_addr().expect("addr"));
                    coalesced |= n > seg;
                    got.extend(buf[..n].chunks(seg).map(<[u8]>::to_vec));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(got, items);
        if sender.gso_active() {
            assert!(
                coalesced,
                "a GSO batch to a GRO socket arrives as one buffer"
            );
        }
    }
}
