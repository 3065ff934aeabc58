//! STUN message codec (RFC 8489) with the TURN attributes of RFC 8656.
//!
//! Parsing never allocates: [`Message::parse`] validates the framing and records
//! the position of the attributes the server needs as slices of the input.
//! Building writes into a caller-provided, reused `Vec<u8>` ([`Builder`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// The fixed magic cookie of RFC 5389/8489.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of a STUN header.
pub const HEADER_LEN: usize = 20;
/// Largest STUN message or ChannelData frame accepted (bigger ones are dropped).
pub const MAX_MESSAGE_LEN: usize = 65_535 + HEADER_LEN;
/// Most XOR-PEER-ADDRESS attributes honoured in one CreatePermission.
pub const MAX_PEER_ADDRS: usize = 8;
/// Most unknown comprehension-required attributes reported back.
pub const MAX_UNKNOWN: usize = 8;

/// STUN/TURN methods used by the server.
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send (indication).
    pub const SEND: u16 = 0x006;
    /// Data (indication).
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Request.
    Request,
    /// Indication.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

/// Attribute types.
pub mod attr {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// ADDITIONAL-ADDRESS-FAMILY.
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Why a datagram could not be parsed as a STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a header or than the advertised length.
    #[error("truncated message")]
    Truncated,
    /// Not a STUN message (first bits, cookie or length alignment).
    #[error("not a STUN message")]
    NotStun,
    /// An attribute overruns the message.
    #[error("bad attribute framing")]
    BadAttribute,
    /// Message bigger than [`MAX_MESSAGE_LEN`].
    #[error("oversized message")]
    Oversized,
    /// FINGERPRINT present but wrong.
    #[error("bad fingerprint")]
    BadFingerprint,
}

/// A parsed STUN message borrowing its input.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The whole message bytes (header + attributes, exactly `20 + length`).
    pub raw: &'a [u8],
    /// Method (12 bits).
    pub method: u16,
    /// Class.
    pub class: Class,
    /// Transaction ID.
    pub tid: [u8; 12],
    /// USERNAME value.
    pub username: Option<&'a [u8]>,
    /// REALM value.
    pub realm: Option<&'a [u8]>,
    /// NONCE value.
    pub nonce: Option<&'a [u8]>,
    /// Offset of the MESSAGE-INTEGRITY attribute header within `raw`.
    pub integrity: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header within `raw`.
    pub integrity_sha256: Option<usize>,
    /// FINGERPRINT present (and verified).
    pub has_fingerprint: bool,
    /// LIFETIME value.
    pub lifetime: Option<u32>,
    /// REQUESTED-TRANSPORT protocol number.
    pub requested_transport: Option<u8>,
    /// REQUESTED-ADDRESS-FAMILY value (1 = IPv4, 2 = IPv6).
    pub requested_family: Option<u8>,
    /// CHANNEL-NUMBER value.
    pub channel: Option<u16>,
    /// DATA value.
    pub data: Option<&'a [u8]>,
    /// XOR-PEER-ADDRESS values (raw attribute values), at most [`MAX_PEER_ADDRS`].
    pub peers: [Option<&'a [u8]>; MAX_PEER_ADDRS],
    /// Number of XOR-PEER-ADDRESS attributes seen (may exceed the array).
    pub peer_count: usize,
    /// PASSWORD-ALGORITHM value (algorithm number).
    pub password_algorithm: Option<u16>,
    /// EVEN-PORT: `Some(reserve_next)` (the R bit) when present.
    pub even_port: Option<bool>,
    /// RESERVATION-TOKEN value.
    pub reservation_token: Option<u64>,
    /// Unknown comprehension-required attribute types.
    pub unknown: [u16; MAX_UNKNOWN],
    /// Number of entries used in `unknown`.
    pub unknown_count: usize,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decode a STUN message type into (method, class).
pub fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = match ((t >> 7) & 0x2) | ((t >> 4) & 0x1) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Encode (method, class) into a STUN message type.
pub fn join_type(method: u16, class: Class) -> u16 {
    let c = match class {
        Class::Request => 0u16,
        Class::Indication => 1,
        Class::Success => 2,
        Class::Error => 3,
    };
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0x1) << 4)
        | ((c & 0x2) << 7)
}

/// True if the first bytes look like a STUN message (top bits 00 and the magic cookie).
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0xC0 == 0 && be32(b, 4) == Some(MAGIC_COOKIE)
}

/// True if the first byte marks a ChannelData message (channel 0x4000..=0x7FFF).
pub fn is_channel_data(b: &[u8]) -> bool {
    b.first().is_some_and(|x| x & 0xC0 == 0x40)
}

/// Parse a ChannelData message: returns (channel number, payload).
///
/// Over UDP, trailing padding is allowed; the payload is exactly the advertised length.
pub fn parse_channel_data(b: &[u8]) -> Option<(u16, &[u8])> {
    let ch = be16(b, 0)?;
    if !(0x4000..=0x7FFF).contains(&ch) {
        return None;
    }
    let len = be16(b, 2)? as usize;
    let payload = b.get(4..4 + len)?;
    Some((ch, payload))
}

/// Length of the frame at the start of a TCP stream buffer, if it can be told yet.
///
/// Returns `Ok(None)` when more bytes are needed, `Err(())` for a stream that is
/// neither STUN nor ChannelData (the connection should be closed).
#[allow(clippy::result_unit_err)]
pub fn stream_frame_len(b: &[u8]) -> Result<Option<usize>, ()> {
    if b.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    match b[0] & 0xC0 {
        0x00 => Ok(Some(HEADER_LEN + len)),
        0x40 => Ok(Some(4 + ((len + 3) & !3))),
        _ => Err(()),
    }
}

impl<'a> Message<'a> {
    /// Parse and validate one STUN message (the datagram may not carry trailing bytes).
    #[allow(clippy::collapsible_match)]
    pub fn parse(b: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if b.len() > MAX_MESSAGE_LEN {
            return Err(ParseError::Oversized);
        }
        if b.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        if !is_stun(b) {
            return Err(ParseError::NotStun);
        }
        let len = be16(b, 2).ok_or(ParseError::Truncated)? as usize;
        if !len.is_multiple_of(4) {
            return Err(ParseError::NotStun);
        }
        if b.len() != HEADER_LEN + len {
            return Err(ParseError::Truncated);
        }
        let ty = be16(b, 0).ok_or(ParseError::Truncated)?;
        let (method, class) = split_type(ty);
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&b[8..20]);
        let mut m = Message {
            raw: b,
            method,
            class,
            tid,
            username: None,
            realm: None,
            nonce: None,
            integrity: None,
            integrity_sha256: None,
            has_fingerprint: false,
            lifetime: None,
            requested_transport: None,
            requested_family: None,
            channel: None,
            data: None,
            peers: [None; MAX_PEER_ADDRS],
            peer_count: 0,
            password_algorithm: None,
            even_port: None,
            reservation_token: None,
            unknown: [0; MAX_UNKNOWN],
            unknown_count: 0,
        };
        let mut pos = HEADER_LEN;
        while pos < b.len() {
            let at = be16(b, pos).ok_or(ParseError::BadAttribute)?;
            let alen = be16(b, pos + 2).ok_or(ParseError::BadAttribute)? as usize;
            let vstart = pos + 4;
            let vend = vstart + alen;
            let next = vstart + ((alen + 3) & !3);
            if vend > b.len() || next > b.len() {
                return Err(ParseError::BadAttribute);
            }
            let v = &b[vstart..vend];
            if m.has_fingerprint {
                // Nothing may follow FINGERPRINT.
                return Err(ParseError::BadAttribute);
            }
            let after_mi = m.integrity.is_some() || m.integrity_sha256.is_some();
            match at {
                attr::FINGERPRINT => {
                    if alen != 4 {
                        return Err(ParseError::BadAttribute);
                    }
                    let want = be32(v, 0).ok_or(ParseError::BadAttribute)?;
                    if fingerprint(b, pos) != want {
                        return Err(ParseError::BadFingerprint);
                    }
                    m.has_fingerprint = true;
                }
                attr::MESSAGE_INTEGRITY_SHA256 => {
                    if m.integrity_sha256.is_none()
                        && (16..=32).contains(&alen)
                        && alen.is_multiple_of(4)
                    {
                        m.integrity_sha256 = Some(pos);
                    }
                }
                _ if after_mi => {
                    // RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored
                    // (except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT).
                }
                attr::MESSAGE_INTEGRITY => {
                    if alen != 20 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.integrity = Some(pos);
                }
                attr::USERNAME => {
                    if alen > 513 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.username.get_or_insert(v);
                }
                attr::REALM => {
                    if alen > 763 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.realm.get_or_insert(v);
                }
                attr::NONCE => {
                    if alen > 763 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.nonce.get_or_insert(v);
                }
                attr::LIFETIME => {
                    m.lifetime = Some(be32(v, 0).ok_or(ParseError::BadAttribute)?);
                }
                attr::REQUESTED_TRANSPORT => {
                    m.requested_transport = Some(*v.first().ok_or(ParseError::BadAttribute)?);
                }
                attr::REQUESTED_ADDRESS_FAMILY => {
                    m.requested_family = Some(*v.first().ok_or(ParseError::BadAttribute)?);
                }
                attr::CHANNEL_NUMBER => {
                    m.channel = Some(be16(v, 0).ok_or(ParseError::BadAttribute)?);
                }
                attr::DATA => {
                    m.data.get_or_insert(v);
                }
                attr::XOR_PEER_ADDRESS => {
                    if m.peer_count < MAX_PEER_ADDRS {
                        m.peers[m.peer_count] = Some(v);
                    }
                    m.peer_count += 1;
                }
                attr::PASSWORD_ALGORITHM => {
                    m.password_algorithm = Some(be16(v, 0).ok_or(ParseError::BadAttribute)?);
                }
                attr::EVEN_PORT => {
                    m.even_port = Some(v.first().ok_or(ParseError::BadAttribute)? & 0x80 != 0);
                }
                attr::RESERVATION_TOKEN => {
                    let t = v.get(..8).ok_or(ParseError::BadAttribute)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(t);
                    m.reservation_token = Some(u64::from_be_bytes(a));
                }
                // Known and accepted (or deliberately ignored) attributes.
                attr::SOFTWARE
                | attr::DONT_FRAGMENT
                | attr::ADDITIONAL_ADDRESS_FAMILY
                | attr::XOR_MAPPED_ADDRESS
                | attr::MAPPED_ADDRESS
                | attr::ERROR_CODE
                | attr::UNKNOWN_ATTRIBUTES
                | attr::XOR_RELAYED_ADDRESS
                | attr::USERHASH => {}
                t if t < 0x8000 => {
                    if m.unknown_count < MAX_UNKNOWN {
                        m.unknown[m.unknown_count] = t;
                        m.unknown_count += 1;
                    }
                }
                _ => {}
            }
            pos = next;
        }
        Ok(m)
    }

    /// Decode the i-th XOR-PEER-ADDRESS.
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        decode_xor_addr(self.peers.get(i).copied().flatten()?, &self.tid)
    }

    /// Verify MESSAGE-INTEGRITY (or -SHA256 when present) with `key`.
    ///
    /// Returns `Some(true)` when SHA-256 integrity was verified, `Some(false)` for
    /// SHA-1, `None` when the check failed or no integrity attribute is present.
    pub fn verify_integrity(&self, key: &[u8]) -> Option<bool> {
        if let Some(pos) = self.integrity_sha256 {
            let alen = be16(self.raw, pos + 2)? as usize;
            let want = self.raw.get(pos + 4..pos + 4 + alen)?;
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
            hmac_prefix(&mut mac, self.raw, pos, alen);
            let got = mac.finalize().into_bytes();
            return ct_eq(&got[..alen], want).then_some(true);
        }
        let pos = self.integrity?;
        let want = self.raw.get(pos + 4..pos + 24)?;
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).ok()?;
        hmac_prefix(&mut mac, self.raw, pos, 20);
        let got = mac.finalize().into_bytes();
        ct_eq(&got, want).then_some(false)
    }
}

/// Feed `raw[..pos]` into `mac` with the header length patched to end after an
/// attribute of `alen` value bytes located at `pos`.
fn hmac_prefix<M: Mac>(mac: &mut M, raw: &[u8], pos: usize, alen: usize) {
    let patched = (pos + 4 + alen - HEADER_LEN) as u16;
    mac.update(&raw[0..2]);
    mac.update(&patched.to_be_bytes());
    mac.update(&raw[4..pos]);
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// FINGERPRINT value for a message whose FINGERPRINT attribute starts at `pos`.
fn fingerprint(raw: &[u8], pos: usize) -> u32 {
    let patched = (pos + 8 - HEADER_LEN) as u16;
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[0..2]);
    h.update(&patched.to_be_bytes());
    h.update(&raw[4..pos]);
    h.finalize() ^ 0x5354_554E
}

/// Decode an (XOR-)address attribute value.
pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let port = be16(v, 2)? ^ (MAGIC_COOKIE >> 16) as u16;
    match family {
        0x01 if v.len() == 8 => {
            let x = be32(v, 4)? ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        0x02 if v.len() == 20 => {
            let mut ip = [0u8; 16];
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(tid);
            for i in 0..16 {
                ip[i] = v[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Writes a STUN message into a reused buffer.
pub struct Builder<'b> {
    buf: &'b mut Vec<u8>,
    tid: [u8; 12],
}

impl<'b> Builder<'b> {
    /// Start a message (clears `buf`).
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: [u8; 12]) -> Self {
        buf.clear();
        buf.extend_from_slice(&join_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        Builder { buf, tid }
    }

    fn set_len(&mut self) {
        let l = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&l.to_be_bytes());
    }

    /// Append an attribute with padding.
    pub fn attr(&mut self, t: u16, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        let pad = (4 - v.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_len();
        self
    }

    /// Append a 32-bit attribute.
    pub fn u32_attr(&mut self, t: u16, v: u32) -> &mut Self {
        self.attr(t, &v.to_be_bytes())
    }

    /// Append an XOR-encoded address attribute.
    pub fn xor_addr(&mut self, t: u16, a: SocketAddr) -> &mut Self {
        let port = a.port() ^ (MAGIC_COOKIE >> 16) as u16;
        match a.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = 1;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                v[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
                self.attr(t, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = 2;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                key[4..].copy_from_slice(&self.tid);
                let o = ip.octets();
                for i in 0..16 {
                    v[4 + i] = o[i] ^ key[i];
                }
                self.attr(t, &v)
            }
        }
    }

    /// Append ERROR-CODE.
    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Append MESSAGE-INTEGRITY (SHA-1) or MESSAGE-INTEGRITY-SHA256 computed with `key`.
    pub fn integrity(&mut self, key: &[u8], sha256: bool) -> &mut Self {
        let pos = self.buf.len();
        if sha256 {
            let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
                Ok(m) => m,
                Err(_) => return self,
            };
            hmac_prefix(&mut mac, self.buf, pos, 32);
            let tag = mac.finalize().into_bytes();
            self.attr(attr::MESSAGE_INTEGRITY_SHA256, &tag)
        } else {
            let mut mac = match <Hmac<Sha1> as Mac>::new_from_slice(key) {
                Ok(m) => m,
                Err(_) => return self,
            };
            hmac_prefix(&mut mac, self.buf, pos, 20);
            let tag = mac.finalize().into_bytes();
            self.attr(attr::MESSAGE_INTEGRITY, &tag)
        }
    }

    /// Append FINGERPRINT (must be last).
    pub fn fingerprint(&mut self) -> &mut Self {
        let pos = self.buf.len();
        let fp = fingerprint(self.buf, pos);
        self.u32_attr(attr::FINGERPRINT, fp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_roundtrip() {
        for m in [1u16, 3, 4, 6, 7, 8, 9, 0xFFF] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(join_type(m, c)), (m, c));
            }
        }
        assert_eq!(join_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(join_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(join_type(method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn build_parse_integrity_fingerprint() {
        let mut buf = Vec::new();
        let tid = [7u8; 12];
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let v4: SocketAddr = "192.0.2.9:1234".parse().unwrap();
        Builder::new(&mut buf, method::CREATE_PERMISSION, Class::Request, tid)
            .xor_addr(attr::XOR_PEER_ADDRESS, v6)
            .xor_addr(attr::XOR_PEER_ADDRESS, v4)
            .attr(attr::USERNAME, b"bob")
            .integrity(b"key", false)
            .integrity(b"key", true)
            .fingerprint();
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.method, method::CREATE_PERMISSION);
        assert_eq!(m.class, Class::Request);
        assert_eq!(m.peer(0), Some(v6));
        assert_eq!(m.peer(1), Some(v4));
        assert_eq!(m.username, Some(&b"bob"[..]));
        assert!(m.has_fingerprint);
        assert_eq!(m.verify_integrity(b"key"), Some(true));
        assert_eq!(m.verify_integrity(b"nope"), None);
        // Corrupt one byte: fingerprint fails.
        let mut bad = buf.clone();
        bad[25] ^= 1;
        assert!(Message::parse(&bad).is_err());
    }

    #[test]
    fn rfc5769_sample_request() {
        // RFC 5769 §2.1 sample request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
        let hex = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let m = Message::parse(&raw).unwrap();
        assert_eq!(m.username, Some(&b"evtj:h6vY"[..]));
        assert!(m.has_fingerprint);
        assert_eq!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"), Some(false));
    }

    #[test]
    fn channel_data_and_stream_framing() {
        let b = [0x40, 0x01, 0x00, 0x03, 1, 2, 3, 0];
        assert_eq!(parse_channel_data(&b), Some((0x4001, &[1u8, 2, 3][..])));
        assert_eq!(stream_frame_len(&b), Ok(Some(8)));
        assert_eq!(parse_channel_data(&[0x40, 0x01, 0x00, 0x09, 1]), None);
        assert_eq!(stream_frame_len(&[0xC0, 0, 0, 0]), Err(()));
        assert_eq!(stream_frame_len(&[0, 1, 0]), Ok(None));
    }
}
