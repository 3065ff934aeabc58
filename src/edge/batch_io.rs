//! Batched UDP I/O for the media thread: one `ppoll` to wait, one `recvmmsg`
//! for up to [`BATCH`] datagrams, one `sendmmsg` for up to [`BATCH`] messages
//! to any mix of destinations. The fan-out of one packet to N viewers costs
//! N/[`BATCH`] syscalls instead of N. With UDP GSO (Linux `UDP_SEGMENT`), a run
//! of consecutive datagrams to one destination of one size (the last may be
//! shorter) is one message of that `sendmmsg`: the kernel walks the IP stack
//! once for the run and cuts it into datagrams at the end. Other platforms fall
//! back to one call per datagram.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Messages per system call.
pub const BATCH: usize = 64;
/// Largest datagram accepted (bigger ones are truncated and dropped by the SFU).
pub const MAX_DATAGRAM: usize = 2048;
/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 before 6.11).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message: an IPv4 datagram's 65,535 bytes less
/// the IP and UDP headers (IPv6 allows 20 more; one bound keeps it simple).
pub const GSO_MAX_BYTES: usize = 65_535 - 20 - 8;

/// A run of consecutive datagrams (in send order) that go out as one message:
/// `count` datagrams from `start`, each `segment` bytes except possibly the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of the first datagram.
    pub start: usize,
    /// Datagrams in the run (1: a plain send).
    pub count: usize,
    /// The segment size: the first datagram's length.
    pub segment: usize,
}

/// Splits datagrams, given as (destination, length) in send order, into runs
/// for GSO: a run continues while the destination is the same, the length
/// equals the first one's (one shorter datagram may end it), there are at most
/// `max_segments` datagrams and at most [`GSO_MAX_BYTES`] bytes. `runs` is
/// cleared and refilled (a reused buffer: no allocation per packet).
pub fn gso_runs(
    items: impl IntoIterator<Item = (SocketAddr, usize)>,
    max_segments: usize,
    runs: &mut Vec<Run>,
) {
    runs.clear();
    // The run being built: its destination, bytes so far and whether a short datagram ended it.
    let mut cur: Option<(SocketAddr, Run, usize, bool)> = None;
    for (i, (dest, len)) in items.into_iter().enumerate() {
        if let Some((d, run, bytes, closed)) = &mut cur {
            if !*closed
                && *d == dest
                && run.count < max_segments
                && len > 0
                && len <= run.segment
                && *bytes + len <= GSO_MAX_BYTES
            {
                run.count += 1;
                *bytes += len;
                *closed = len < run.segment;
                continue;
            }
            runs.push(*run);
        }
        let run = Run {
            start: i,
            count: 1,
            segment: len,
        };
        cur = Some((dest, run, len, false));
    }
    if let Some((_, run, _, _)) = cur {
        runs.push(run);
    }
}

/// A datagram as [`Sender::send`] takes it: a destination and its bytes in up to
/// two parts sent back to back (a header kept apart from its body, e.g. TURN
/// ChannelData in front of an SRTP packet, costs no copy: one iovec each).
pub trait Datagram {
    /// Where it goes.
    fn dest(&self) -> SocketAddr;
    /// Its bytes: `head` then `body` (`head` may be empty).
    fn parts(&self) -> (&[u8], &[u8]);
    /// Its length.
    fn len(&self) -> usize {
        let (h, b) = self.parts();
        h.len() + b.len()
    }
}

impl Datagram for (SocketAddr, &[u8]) {
    fn dest(&self) -> SocketAddr {
        self.0
    }
    fn parts(&self) -> (&[u8], &[u8]) {
        (&[], self.1)
    }
}

/// What the SFU emits, sent as it is (no per-flush list of slices to build).
impl Datagram for edgerelay_sfu::Transmit {
    fn dest(&self) -> SocketAddr {
        self.destination
    }
    fn parts(&self) -> (&[u8], &[u8]) {
        (&[], &self.contents)
    }
}

/// One datagram with one plain `send_to` (the fallbacks; a two-part datagram is
/// joined first).
fn send_one<D: Datagram>(sock: &UdpSocket, d: &D) -> io::Result<usize> {
    match d.parts() {
        ([], body) => sock.send_to(body, d.dest()),
        (head, body) => sock.send_to(&[head, body].concat(), d.dest()),
    }
}

/// What one [`Sender::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// Datagrams that could not be sent.
    pub failed: usize,
    /// GSO messages sent (runs of two or more datagrams).
    pub gso_sends: usize,
    /// Datagrams sent inside those GSO messages.
    pub gso_segments: usize,
}

/// UDP GSO on a socket: off (not asked for, unsupported, or failed), not yet
/// tried, or known to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gso {
    Off,
    Untested,
    On,
}

/// The send side of a media socket: turns a flush's datagrams into as few
/// `sendmmsg` calls (and, with GSO, as few trips through the IP stack) as it
/// can. Keeps its buffers between calls.
pub struct Sender {
    gso: Gso,
    group: bool,
    runs: Vec<Run>,
    order: Vec<usize>,
    #[cfg(target_os = "linux")]
    scratch: imp::Scratch,
}

impl Sender {
    /// A sender for `sock`. With `gso`, UDP GSO is used when the kernel has it
    /// (probed now; a send failing with EIO/EINVAL before any GSO send worked
    /// turns it off). With `group`, each call first orders its datagrams by
    /// destination (stable: one destination's datagrams keep their order), so
    /// interleaved datagrams to one viewer still form runs.
    pub fn new(sock: &UdpSocket, gso: bool, group: bool) -> Sender {
        let gso = if !gso {
            Gso::Off
        } else if imp::gso_supported(sock) {
            Gso::Untested
        } else {
            tracing::warn!("UDP GSO (UDP_SEGMENT) not supported here: plain sendmmsg");
            Gso::Off
        };
        Sender {
            gso,
            group,
            runs: Vec::with_capacity(BATCH * 4),
            order: Vec::with_capacity(BATCH * 4),
            #[cfg(target_os = "linux")]
            scratch: imp::Scratch::default(),
        }
    }

    /// True while GSO is in use (asked for, supported and not failed).
    pub fn gso_active(&self) -> bool {
        self.gso != Gso::Off
    }

    /// Sends every datagram, in order per destination.
    pub fn send<D: Datagram>(&mut self, sock: &UdpSocket, items: &[D]) -> SendReport {
        let mut report = SendReport::default();
        if items.is_empty() {
            return report;
        }
        self.order.clear();
        self.order.extend(0..items.len());
        if self.group && self.gso != Gso::Off {
            // The index in the key makes the unstable sort stable (and allocation-free).
            self.order.sort_unstable_by_key(|&i| (items[i].dest(), i));
        }
        let max = if self.gso == Gso::Off {
            1
        } else {
            GSO_MAX_SEGMENTS
        };
        gso_runs(
            self.order
                .iter()
                .map(|&i| (items[i].dest(), items[i].len())),
            max,
            &mut self.runs,
        );
        #[cfg(target_os = "linux")]
        imp::send_runs(
            sock,
            items,
            &self.order,
            &self.runs,
            &mut self.scratch,
            &mut self.gso,
            &mut report,
        );
        #[cfg(not(target_os = "linux"))]
        imp::send_runs(sock, items, &self.order, &self.runs, &mut report);
        report
    }
}

/// Receive buffers for one batch.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    addrs: [Option<SocketAddr>; BATCH],
    count: usize,
    /// When the kernel took in each datagram (wall clock, since the Unix epoch),
    /// on a socket with [`enable_rx_timestamps`].
    stamps: [Option<Duration>; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            lens: [0; BATCH],
            addrs: [None; BATCH],
            count: 0,
            stamps: [None; BATCH],
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

    /// When the earliest datagram of the last receive not sent from `skip` (the
    /// thread's own waker) reached the host, as an `Instant` (`now` is the
    /// caller's clock reading after the receive): the time it waited in the
    /// socket while the thread was busy is then part of any delay measured from
    /// it. `None` without kernel timestamps. (The kernel's stamp is wall-clock
    /// time; an age outside 0..1 s, from a clock step, is not trusted.)
    pub fn first_arrival(&self, now: Instant, skip: SocketAddr) -> Option<Instant> {
        let stamp = (0..self.count)
            .filter(|&i| self.addrs[i].is_some_and(|a| a != skip))
            .filter_map(|i| self.stamps[i])
            .min()?;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        let age = wall.checked_sub(stamp)?;
        if age > Duration::from_secs(1) {
            return None;
        }
        now.checked_sub(age)
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

    /// Asks the kernel to stamp each received datagram with its arrival time
    /// (`SO_TIMESTAMPNS`); [`RecvBatch::first_arrival`] reads it. False if refused.
    pub fn enable_rx_timestamps(sock: &UdpSocket) -> bool {
        set_int_option(sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
    }

    /// Sets an integer socket option; false if the kernel refuses it.
    fn set_int_option(
        sock: &UdpSocket,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> bool {
        // SAFETY: a valid socket and a c_int option value of the right size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }

    /// The `SCM_TIMESTAMPNS` stamp in a received message's control data.
    fn rx_stamp(hdr: &libc::msghdr) -> Option<Duration> {
        // SAFETY: `hdr` was filled by recvmmsg; the CMSG_* macros stay within its
        // msg_control buffer, whose length the kernel set in msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    let secs = u64::try_from(ts.tv_sec).ok()?;
                    let nanos = u32::try_from(ts.tv_nsec).ok()?;
                    return Some(Duration::new(secs, nanos.min(999_999_999)));
                }
                c = libc::CMSG_NXTHDR(hdr, c);
            }
        }
        None
    }

    /// Control data room per received message: one `SCM_TIMESTAMPNS` (a
    /// `timespec`, 16 bytes plus its header), in 8-byte words for alignment.
    const RX_CONTROL_WORDS: usize = 8;

    /// Receives up to [`BATCH`] datagrams without blocking.
    pub fn recv_batch(sock: &UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
        b.count = 0;
        // SAFETY: zeroed plain-old-data C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut control = [[0u64; RX_CONTROL_WORDS]; BATCH];
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
            msgs[i].msg_hdr.msg_control = control[i].as_mut_ptr() as *mut libc::c_void;
            msgs[i].msg_hdr.msg_controllen = size_of::<[u64; RX_CONTROL_WORDS]>() as _;
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
            b.stamps[i] = rx_stamp(&msgs[i].msg_hdr);
        }
        b.count = n;
        Ok(n)
    }

    /// True if the kernel accepts `UDP_SEGMENT` on this socket (setting the
    /// socket-wide segment size to 0 leaves GSO off for plain sends).
    pub fn gso_supported(sock: &UdpSocket) -> bool {
        set_int_option(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 0)
    }

    /// Room for one `UDP_SEGMENT` control message (CMSG_SPACE(2) is 24 on 64-bit).
    type CmsgBuf = [u64; 4];

    /// The C structures of one `sendmmsg`, kept between calls.
    pub struct Scratch {
        names: Vec<libc::sockaddr_storage>,
        cmsgs: Vec<CmsgBuf>,
        msgs: Vec<libc::mmsghdr>,
        iovs: Vec<libc::iovec>,
        /// iovecs per message of the current chunk (one or two per datagram).
        iov_counts: Vec<usize>,
    }

    impl Default for Scratch {
        fn default() -> Self {
            Scratch {
                // SAFETY: zeroed plain-old-data C structs.
                names: vec![unsafe { zeroed() }; BATCH],
                cmsgs: vec![[0; 4]; BATCH],
                // SAFETY: as above.
                msgs: vec![unsafe { zeroed() }; BATCH],
                iovs: Vec::with_capacity(BATCH * GSO_MAX_SEGMENTS),
                iov_counts: Vec::with_capacity(BATCH),
            }
        }
    }

    /// Sends `runs` (over `items` in `order`), [`BATCH`] messages per call.
    pub(super) fn send_runs<D: Datagram>(
        sock: &UdpSocket,
        items: &[D],
        order: &[usize],
        runs: &[Run],
        sc: &mut Scratch,
        gso: &mut Gso,
        report: &mut SendReport,
    ) {
        for chunk in runs.chunks(BATCH) {
            // Every iovec first, so the pointers taken below stay valid.
            sc.iovs.clear();
            sc.iov_counts.clear();
            for run in chunk {
                let before = sc.iovs.len();
                for &i in &order[run.start..run.start + run.count] {
                    let (head, body) = items[i].parts();
                    for part in [head, body] {
                        if !part.is_empty() {
                            sc.iovs.push(libc::iovec {
                                iov_base: part.as_ptr() as *mut libc::c_void,
                                iov_len: part.len(),
                            });
                        }
                    }
                }
                sc.iov_counts.push(sc.iovs.len() - before);
            }
            let mut first_iov = 0;
            for (m, run) in chunk.iter().enumerate() {
                let iov_count = sc.iov_counts.get(m).copied().unwrap_or(0);
                // SAFETY: zeroed plain-old-data C structs.
                sc.names[m] = unsafe { zeroed() };
                // SAFETY: as above.
                sc.msgs[m] = unsafe { zeroed() };
                let len = to_sockaddr(&items[order[run.start]].dest(), &mut sc.names[m]);
                let hdr = &mut sc.msgs[m].msg_hdr;
                hdr.msg_name = &mut sc.names[m] as *mut _ as *mut libc::c_void;
                hdr.msg_namelen = len;
                // SAFETY: first_iov + iov_count <= iovs.len() (counted as pushed above).
                hdr.msg_iov = unsafe { sc.iovs.as_mut_ptr().add(first_iov) };
                hdr.msg_iovlen = iov_count as _;
                first_iov += iov_count;
                if run.count > 1 {
                    // The payload is the run's iovecs back to back; the kernel cuts it
                    // into `segment`-byte datagrams (no copy into one buffer needed).
                    let buf = &mut sc.cmsgs[m];
                    *buf = [0; 4];
                    // SAFETY: buf is 32 bytes, 8-aligned, more than CMSG_SPACE(2); the
                    // header and its u16 payload are written inside it.
                    unsafe {
                        let c = buf.as_mut_ptr() as *mut libc::cmsghdr;
                        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as _) as _;
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(c) as *mut u16,
                            run.segment as u16,
                        );
                        hdr.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
                        hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as _) as _;
                    }
                }
            }
            let mut off = 0;
            while off < chunk.len() {
                // SAFETY: msgs[off..chunk.len()] were filled above and point at live
                // names, control buffers, iovecs and payloads.
                let n = unsafe {
                    libc::sendmmsg(
                        sock.as_raw_fd(),
                        sc.msgs.as_mut_ptr().add(off),
                        (chunk.len() - off) as libc::c_uint,
                        0,
                    )
                };
                if n > 0 {
                    let n = n as usize;
                    for run in &chunk[off..off + n] {
                        if run.count > 1 {
                            report.gso_sends += 1;
                            report.gso_segments += run.count;
                            *gso = Gso::On;
                        }
                    }
                    off += n;
                    continue;
                }
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The message at `off` failed (unreachable, buffer full): skip it.
                let run = chunk[off];
                off += 1;
                let refused = matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL));
                if run.count == 1 || !refused {
                    report.failed += run.count;
                    continue;
                }
                // The kernel or the device refused the GSO message. EIO (no checksum
                // offload on the way out) always turns GSO off; EINVAL does if GSO never
                // worked (afterwards it is one odd run, e.g. a segment over the MTU).
                if *gso == Gso::Untested || e.raw_os_error() == Some(libc::EIO) {
                    if *gso != Gso::Off {
                        tracing::warn!("UDP GSO send refused ({e}): plain sendmmsg from now on");
                    }
                    *gso = Gso::Off;
                }
                for &i in &order[run.start..run.start + run.count] {
                    if send_one(sock, &items[i]).is_err() {
                        report.failed += 1;
                    }
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

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

    /// No GSO here.
    pub fn gso_supported(_sock: &UdpSocket) -> bool {
        false
    }

    /// No kernel receive timestamps here.
    pub fn enable_rx_timestamps(_sock: &UdpSocket) -> bool {
        false
    }

    /// Sends one datagram per call (every run is one datagram without GSO).
    pub(super) fn send_runs<D: Datagram>(
        sock: &UdpSocket,
        items: &[D],
        order: &[usize],
        runs: &[Run],
        report: &mut SendReport,
    ) {
        for run in runs {
            for &i in &order[run.start..run.start + run.count] {
                if send_one(sock, &items[i]).is_err() {
                    report.failed += 1;
                }
            }
        }
    }
}

pub use crate::publisher::net::wait_readable;
pub use imp::{enable_rx_timestamps, recv_batch};

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_datagram_that_waited_in_the_socket_is_dated_by_its_arrival() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let mut batch = RecvBatch::default();
        // Without the option: no stamp.
        tx.send_to(b"plain", to).expect("send");
        assert!(wait_readable(&rx, Duration::from_secs(2)).expect("poll"));
        recv_batch(&rx, &mut batch).expect("recv");
        let nobody: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert_eq!(batch.first_arrival(Instant::now(), nobody), None);
        assert!(enable_rx_timestamps(&rx));
        // The kernel turns arrival stamping on for the whole system a moment after
        // the first socket asks (a deferred static key); until then a datagram is
        // stamped when read. Wait until one waiting 5 ms is dated as such.
        let warm = (0..200).any(|_| {
            tx.send_to(b"warm-up", to).expect("send");
            std::thread::sleep(Duration::from_millis(5));
            recv_batch(&rx, &mut batch).expect("recv");
            batch
                .first_arrival(Instant::now(), nobody)
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(4))
        });
        assert!(warm, "kernel arrival stamps never came on");
        // Two datagrams arrive; the thread reads them 50 ms later.
        tx.send_to(b"one", to).expect("send");
        std::thread::sleep(Duration::from_millis(20));
        tx.send_to(b"two", to).expect("send");
        std::thread::sleep(Duration::from_millis(30));
        assert!(wait_readable(&rx, Duration::from_secs(2)).expect("poll"));
        assert_eq!(recv_batch(&rx, &mut batch).expect("recv"), 2);
        let now = Instant::now();
        let arrival = batch.first_arrival(now, nobody).expect("a kernel stamp");
        // The waker's datagrams do not count: from the sender only, nothing left.
        assert_eq!(
            batch.first_arrival(now, tx.local_addr().expect("addr")),
            None
        );
        let waited = now - arrival;
        assert!(
            waited >= Duration::from_millis(45) && waited < Duration::from_secs(1),
            "the first datagram waited ~50 ms in the socket, measured {waited:?}"
        );
    }

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
        assert_eq!(Sender::new(&src, false, false).send(&src, &items).failed, 0);
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
            assert_eq!(Sender::new(&src, false, false).send(&src, &bad).failed, 1);
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

    fn runs_of(items: &[(SocketAddr, usize)], max: usize) -> Vec<(usize, usize, usize)> {
        let mut runs = Vec::new();
        gso_runs(items.iter().copied(), max, &mut runs);
        // Every datagram is in exactly one run, in order.
        let mut next = 0;
        for r in &runs {
            assert_eq!(r.start, next);
            assert!(r.count >= 1);
            next += r.count;
        }
        assert_eq!(next, items.len());
        runs.iter().map(|r| (r.start, r.count, r.segment)).collect()
    }

    #[test]
    fn runs_group_one_destination_of_one_size() {
        let a: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
        let c: SocketAddr = "[2001:db8::1]:5000".parse().expect("addr");
        assert_eq!(runs_of(&[], 64), vec![]);
        // A frame's burst to a (last packet shorter), then b, then c.
        let items = [
            (a, 1200),
            (a, 1200),
            (a, 1200),
            (a, 700),
            (b, 1200),
            (b, 1200),
            (c, 300),
            (c, 300),
        ];
        assert_eq!(
            runs_of(&items, 64),
            vec![(0, 4, 1200), (4, 2, 1200), (6, 2, 300)]
        );
        // Without GSO every datagram is its own run.
        assert_eq!(runs_of(&items, 1).len(), items.len());
        // A shorter datagram ends the run (the next starts anew); a longer one
        // starts a new one.
        let items = [
            (a, 1000),
            (a, 500),
            (a, 500),
            (a, 1000),
            (a, 1200),
            (a, 1200),
        ];
        assert_eq!(
            runs_of(&items, 64),
            vec![(0, 2, 1000), (2, 1, 500), (3, 1, 1000), (4, 2, 1200)]
        );
        // Interleaved destinations (one packet per viewer) form no runs.
        let items = [(a, 1200), (b, 1200), (a, 1200), (b, 1200)];
        assert_eq!(runs_of(&items, 64).len(), 4);
        // Same address, different port: another destination.
        let a2: SocketAddr = "10.0.0.1:5001".parse().expect("addr");
        assert_eq!(runs_of(&[(a, 100), (a2, 100)], 64).len(), 2);
        // Empty datagrams never join a run.
        assert_eq!(runs_of(&[(a, 0), (a, 0)], 64).len(), 2);
        assert_eq!(runs_of(&[(a, 100), (a, 0)], 64).len(), 2);
    }

    #[test]
    fn runs_respect_segment_and_byte_limits() {
        let a: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        // 150 small datagrams: runs of 64, 64, 22.
        let items = vec![(a, 100); 150];
        assert_eq!(
            runs_of(&items, 64),
            vec![(0, 64, 100), (64, 64, 100), (128, 22, 100)]
        );
        // 1400-byte datagrams: at most 46 fit under the 64 KiB bound.
        let items = vec![(a, 1400); 100];
        let runs = runs_of(&items, 64);
        let per = GSO_MAX_BYTES / 1400;
        assert_eq!(runs[0], (0, per, 1400));
        for &(_, count, seg) in &runs {
            assert!(count * seg <= GSO_MAX_BYTES);
            assert!(count <= GSO_MAX_SEGMENTS);
        }
        // Small caps are honoured too.
        assert_eq!(
            runs_of(&[(a, 10); 5], 2),
            vec![(0, 2, 10), (2, 2, 10), (4, 1, 10)]
        );
    }

    /// Receives `n` datagrams from `sock` (bounded wait).
    fn recv_n(sock: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut batch = RecvBatch::default();
        while got.len() < n {
            assert!(
                wait_readable(sock, Duration::from_secs(2)).expect("poll"),
                "only {} of {n} datagrams arrived",
                got.len()
            );
            recv_batch(sock, &mut batch).expect("recv");
            got.extend(batch.iter().map(|(a, d)| (a, d.to_vec())));
        }
        got
    }

    #[test]
    fn two_part_datagrams_arrive_joined_with_and_without_gso() {
        /// A 4-byte header kept apart from its body, as TURN ChannelData is sent.
        struct Two(SocketAddr, [u8; 4], Vec<u8>);
        impl Datagram for Two {
            fn dest(&self) -> SocketAddr {
                self.0
            }
            fn parts(&self) -> (&[u8], &[u8]) {
                (&self.1, &self.2)
            }
        }
        for gso in [true, false] {
            let src = UdpSocket::bind("127.0.0.1:0").expect("bind src");
            let dst = UdpSocket::bind("127.0.0.1:0").expect("bind dst");
            let to = dst.local_addr().expect("addr");
            // 7 equal datagrams and a shorter tail: one GSO run of 8 where GSO works.
            let items: Vec<Two> = (0..8u8)
                .map(|i| {
                    Two(
                        to,
                        [0x40, 1, 0, i],
                        vec![i; if i == 7 { 300 } else { 1000 }],
                    )
                })
                .collect();
            let mut sender = Sender::new(&src, gso, false);
            let report = sender.send(&src, &items);
            assert_eq!(report.failed, 0);
            if sender.gso_active() {
                assert_eq!((report.gso_sends, report.gso_segments), (1, 8));
            }
            let got = recv_n(&dst, items.len());
            assert_eq!(got.len(), items.len());
            for ((_, d), it) in got.iter().zip(&items) {
                assert_eq!(d.len(), 4 + it.2.len());
                assert_eq!(&d[..4], &it.1[..]);
                assert_eq!(&d[4..], &it.2[..]);
            }
        }
    }

    #[test]
    fn gso_send_arrives_as_separate_datagrams() {
        for (any, dst_bind) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let (Ok(src), Ok(dst)) = (UdpSocket::bind(any), UdpSocket::bind(dst_bind)) else {
                eprintln!("skipped {any}: cannot bind (no IPv6 loopback?)");
                continue;
            };
            if !imp::gso_supported(&src) {
                eprintln!("skipped: this kernel lacks UDP_SEGMENT (UDP GSO)");
                return;
            }
            let other = UdpSocket::bind(dst_bind).expect("bind other");
            let to = dst.local_addr().expect("addr");
            let to_other = other.local_addr().expect("addr");
            // 10 segments of 1200 and a 333-byte tail, then 3 to another socket, then 64
            // equal ones (a full run) and one more: runs of 11, 3, 64, 1 datagrams.
            let mut payloads: Vec<(SocketAddr, Vec<u8>)> = (0..10u8)
                .map(|i| (to, vec![i; 1200]))
                .chain([(to, vec![10; 333])])
                .chain((0..3u8).map(|i| (to_other, vec![100 + i; 500])))
                .collect();
            payloads.extend((0..65u8).map(|i| (to, vec![i.wrapping_add(20); 200])));
            let items: Vec<(SocketAddr, &[u8])> =
                payloads.iter().map(|(a, p)| (*a, p.as_slice())).collect();
            let mut sender = Sender::new(&src, true, false);
            assert!(sender.gso_active());
            let report = sender.send(&src, &items);
            assert_eq!(report.failed, 0);
            assert_eq!(report.gso_sends, 3, "{report:?}");
            assert_eq!(report.gso_segments, 11 + 3 + 64);
            assert!(sender.gso_active(), "GSO still on after a successful send");
            let want: Vec<&Vec<u8>> = payloads
                .iter()
                .filter(|(a, _)| *a == to)
                .map(|(_, p)| p)
                .collect();
            let got = recv_n(&dst, want.len());
            assert_eq!(got.len(), want.len());
            let from = src.local_addr().expect("addr");
            for (k, ((a, d), w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*a, from);
                assert_eq!(&d, w, "datagram {k}: size {} want {}", d.len(), w.len());
            }
            let got = recv_n(&other, 3);
            for (i, (_, d)) in got.iter().enumerate() {
                assert_eq!(d, &vec![100 + i as u8; 500]);
            }
            let mut batch = RecvBatch::default();
            assert_eq!(
                recv_batch(&dst, &mut batch).expect("recv"),
                0,
                "nothing extra"
            );
        }
    }

    #[test]
    fn grouping_by_destination_finds_interleaved_runs_in_order() {
        let src = UdpSocket::bind("127.0.0.1:0").expect("bind src");
        if !imp::gso_supported(&src) {
            eprintln!("skipped: this kernel lacks UDP_SEGMENT (UDP GSO)");
            return;
        }
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
        let (pa, pb) = (a.local_addr().expect("addr"), b.local_addr().expect("addr"));
        // One packet per viewer per frame packet, as a fan-out without bursts gives.
        let payloads: Vec<(SocketAddr, Vec<u8>)> = (0..8u8)
            .flat_map(|i| [(pa, vec![i; 900]), (pb, vec![50 + i; 900])])
            .collect();
        let items: Vec<(SocketAddr, &[u8])> =
            payloads.iter().map(|(d, p)| (*d, p.as_slice())).collect();
        let plain = Sender::new(&src, true, false).send(&src, &items);
        assert_eq!(plain.gso_sends, 0, "interleaved: no runs without grouping");
        recv_n(&a, 8);
        recv_n(&b, 8);
        let grouped = Sender::new(&src, true, true).send(&src, &items);
        assert_eq!((grouped.gso_sends, grouped.gso_segments), (2, 16));
        for (sock, base) in [(&a, 0u8), (&b, 50)] {
            let got = recv_n(sock, 8);
            for (i, (_, d)) in got.iter().enumerate() {
                assert_eq!(d, &vec![base + i as u8; 900], "order kept per destination");
            }
        }
    }
}
