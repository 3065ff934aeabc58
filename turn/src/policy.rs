//! Peer address policy: which addresses a TURN client may relay to.
//!
//! Deny by default. Order of the checks in [`PeerPolicy::check`]:
//! 1. the address is normalised: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
//!    (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`), 6to4 (`2002::/16`) and
//!    Teredo (`2001::/32`, the client address) forms are reduced to the IPv4 they embed;
//! 2. always refused, whatever the config: loopback, `0.0.0.0/8`, `::`, link-local,
//!    multicast, broadcast, reserved `240.0.0.0/4`, and cloud metadata addresses
//!    (`169.254.169.254`, `169.254.170.2`, `100.100.100.200`, `fd00:ec2::254`, ...);
//! 3. allowed if it is one of the co-located SFU's addresses (handed off in-process);
//! 4. private and shared ranges (`10/8`, `172.16/12`, `192.168/16`, `100.64/10`,
//!    `fc00::/7`, `198.18/15`) are allowed only by an allowed CIDR that lies entirely
//!    inside such a range (so `0.0.0.0/0` never opens them);
//! 5. anything else is allowed only if inside an operator-allowed CIDR.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// An IP network in CIDR notation, e.g. `203.0.113.0/24` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network (families must match).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether this whole network is inside `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|e| format!("bad CIDR {s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .map_err(|e| format!("bad CIDR {s:?}: {e}"))?,
            None => max,
        };
        if prefix > max {
            return Err(format!("bad CIDR {s:?}: prefix > {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Reduce IPv6 forms that embed an IPv4 address to that IPv4 address.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let v6 = match ip {
        IpAddr::V4(_) => return ip,
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let seg = v6.segments();
    let v4 = |a: u8, b: u8, c: u8, d: u8| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    // IPv4-mapped ::ffff:a.b.c.d
    if seg[..5] == [0, 0, 0, 0, 0] && seg[5] == 0xffff {
        return v4(o[12], o[13], o[14], o[15]);
    }
    // IPv4-compatible ::a.b.c.d (deprecated), but not :: and ::1.
    if seg[..6] == [0; 6] && (seg[6] != 0 || seg[7] > 1) {
        return v4(o[12], o[13], o[14], o[15]);
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || seg[..2] == [0x64, 0xff9b] && seg[2] == 1 {
        return v4(o[12], o[13], o[14], o[15]);
    }
    // 6to4 2002:AABB:CCDD::/16.
    if seg[0] == 0x2002 {
        return v4(o[2], o[3], o[4], o[5]);
    }
    // Teredo 2001:0000::/32: the client IPv4 is the last 32 bits, inverted.
    if seg[0] == 0x2001 && seg[1] == 0 {
        return v4(!o[12], !o[13], !o[14], !o[15]);
    }
    ip
}

/// Reason a peer was refused (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// In an always-refused range (loopback, link-local, metadata, ...).
    Forbidden,
    /// Private range without an explicit allow.
    Private,
    /// Not the SFU and not in an allowed CIDR.
    NotAllowed,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Forbidden => "forbidden_range",
            Refusal::Private => "private",
            Refusal::NotAllowed => "not_allowed",
        }
    }
}

const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS/GCP/Azure/OpenStack
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud (legacy)
];

fn always_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || o[0] == 0
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast()
                || o[0] >= 240
                || METADATA_V4.contains(&v)
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || v == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) // AWS IMDS v6
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // discard-only 100::/64
        }
    }
}

fn private_ranges() -> [Cidr; 7] {
    let c = |a: IpAddr, p: u8| Cidr { addr: a, prefix: p };
    [
        c(Ipv4Addr::new(10, 0, 0, 0).into(), 8),
        c(Ipv4Addr::new(172, 16, 0, 0).into(), 12),
        c(Ipv4Addr::new(192, 168, 0, 0).into(), 16),
        c(Ipv4Addr::new(100, 64, 0, 0).into(), 10),
        c(Ipv4Addr::new(198, 18, 0, 0).into(), 15),
        c(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0).into(), 7),
        c(Ipv4Addr::new(192, 0, 0, 0).into(), 24),
    ]
}

/// The configured peer policy.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allowed: Vec<Cidr>,
    local_ips: Vec<IpAddr>,
    allow_loopback_for_testing: bool,
}

impl PeerPolicy {
    /// A policy allowing `allowed` CIDRs and the SFU's `local_ips`.
    pub fn new(allowed: Vec<Cidr>, local_ips: Vec<IpAddr>) -> Self {
        PeerPolicy {
            allowed,
            local_ips: local_ips.into_iter().map(normalize).collect(),
            allow_loopback_for_testing: false,
        }
    }

    /// TEST ONLY: also allow loopback peers (127.0.0.0/8, ::1). Never enable in production.
    pub fn allow_loopback_for_testing(mut self, on: bool) -> Self {
        self.allow_loopback_for_testing = on;
        self
    }

    /// Add an IP of the co-located SFU.
    pub fn add_local_ip(&mut self, ip: IpAddr) {
        let ip = normalize(ip);
        if !self.local_ips.contains(&ip) {
            self.local_ips.push(ip);
        }
    }

    /// Whether `ip` is one of the co-located SFU's IPs.
    pub fn is_local_ip(&self, ip: IpAddr) -> bool {
        self.local_ips.contains(&normalize(ip))
    }

    /// Decide whether `ip` may be a relayed peer (the SFU's IPs included).
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.is_local_ip(ip) {
            return Ok(());
        }
        self.check_external(ip)
    }

    /// Decide whether packets may be sent to `ip` through a kernel socket
    /// (the SFU's IPs are not special here: they are reached in-process).
    pub fn check_external(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = normalize(ip);
        if self.allow_loopback_for_testing && ip.is_loopback() {
            return Ok(());
        }
        if always_forbidden(ip) {
            return Err(Refusal::Forbidden);
        }
        let privs = private_ranges();
        if let Some(range) = privs.iter().find(|r| r.contains(ip)) {
            return if self
                .allowed
                .iter()
                .any(|c| c.contains(ip) && c.within(range))
            {
                Ok(())
            } else {
                Err(Refusal::Private)
            };
        }
        if self.allowed.iter().any(|c| c.contains(ip)) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(normalize(ip("64:ff9b::a9fe:a9fe")), ip("169.254.169.254"));
        assert_eq!(normalize(ip("2002:7f00:1::1")), ip("127.0.0.1"));
        assert_eq!(normalize(ip("::7f00:1")), ip("127.0.0.1"));
        assert_eq!(normalize(ip("::1")), ip("::1"));
        assert_eq!(normalize(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    #[test]
    fn defaults_refuse_everything_dangerous() {
        let p = PeerPolicy::new(
            vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            vec![],
        );
        for bad in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
            "::1",
            "169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "fd00:ec2::254",
            "100.100.100.200",
        ] {
            assert_eq!(p.check(ip(bad)), Err(Refusal::Forbidden), "{bad}");
        }
        for private in [
            "10.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "fd12::1",
            "100.64.0.1",
        ] {
            assert_eq!(p.check(ip(private)), Err(Refusal::Private), "{private}");
        }
        assert_eq!(p.check(ip("8.8.8.8")), Ok(()));
        assert_eq!(p.check(ip("2001:4860::8888")), Ok(()));
    }

    #[test]
    fn deny_by_default_and_explicit_allows() {
        let p = PeerPolicy::new(
            vec!["10.1.0.0/16".parse().unwrap()],
            vec![ip("203.0.113.5")],
        );
        assert_eq!(p.check(ip("8.8.8.8")), Err(Refusal::NotAllowed));
        assert_eq!(p.check(ip("203.0.113.5")), Ok(()));
        assert_eq!(p.check(ip("::ffff:203.0.113.5")), Ok(()));
        assert_eq!(p.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(p.check(ip("10.2.0.1")), Err(Refusal::Private));
        let t = PeerPolicy::new(vec![], vec![]).allow_loopback_for_testing(true);
        assert_eq!(t.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(t.check(ip("169.254.169.254")), Err(Refusal::Forbidden));
    }
}
