//! Just enough STUN parsing to route a datagram to its peer by ICE username.

/// True if the datagram looks like STUN (RFC 5764 demultiplexing: first byte 0..=3).
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20 && data[0] < 4 && data[4..8] == [0x21, 0x12, 0xA4, 0x42]
}

/// True for an RTP (not RTCP) datagram: version 2 and a second byte outside RTCP's
/// packet types 192..=223 (RFC 5761 demultiplexing).
pub fn is_rtp(data: &[u8]) -> bool {
    data.len() >= 12 && data[0] >> 6 == 2 && !(192..=223).contains(&data[1])
}

/// Returns the local ufrag (the part of USERNAME before ':') of a STUN request.
/// Malformed messages give `None`; nothing here can panic on input.
pub fn local_ufrag(data: &[u8]) -> Option<&str> {
    let mut ufrag = None;
    walk(data, |_, typ, value| {
        if typ == USERNAME {
            ufrag = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.split(':').next());
            return true;
        }
        false
    });
    ufrag
}

/// STUN attribute types read here.
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;

/// Calls `f(offset, type, value)` for each attribute of a STUN message, the offset
/// being the attribute's from the start of the message; stops early when `f`
/// returns true. A malformed message ends the walk.
fn walk<'a>(data: &'a [u8], mut f: impl FnMut(usize, u16, &'a [u8]) -> bool) {
    if !is_stun(data) {
        return;
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let Some(body) = data.get(20..20 + len) else {
        return;
    };
    let mut i = 0;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let Some(value) = body.get(i + 4..i + 4 + alen) else {
            return;
        };
        if f(20 + i, typ, value) {
            return;
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
}

/// True if a STUN message carries a MESSAGE-INTEGRITY made with `password` (ICE's
/// short-term credential, RFC 8489 section 14.5: HMAC-SHA1 over the message up to
/// the attribute, the header's length counting through it). `hmac` computes
/// HMAC-SHA1 of the concatenated parts with a key.
pub fn integrity_ok(
    data: &[u8],
    password: &[u8],
    hmac: impl Fn(&[u8], &[&[u8]]) -> [u8; 20],
) -> bool {
    let mut found = None;
    walk(data, |at, typ, value| {
        if typ == MESSAGE_INTEGRITY {
            found = Some((at, value));
        }
        found.is_some()
    });
    let Some((at, value)) = found else {
        return false;
    };
    let (Some(header), Some(body), Ok(len)) = (
        data.get(..20),
        data.get(20..at),
        // The body through the attribute: (at - 20) + 4 + 20 bytes.
        u16::try_from(at + 4),
    ) else {
        return false;
    };
    let mut h = [0u8; 20];
    h.copy_from_slice(header);
    h[2..4].copy_from_slice(&len.to_be_bytes());
    let mac = hmac(password, &[&h, body]);
    // Constant time: the comparison does not tell how much of a forged tag was right.
    value.len() == 20 && mac.iter().zip(value).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in attrs {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&body);
        m
    }

    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
        str0m::crypto::from_feature_flags()
            .sha1_hmac_provider
            .sha1_hmac(key, parts)
    }

    /// RFC 5769 section 2.1: a sample ICE request with USERNAME "evtj:h6vY",
    /// MESSAGE-INTEGRITY made with "VOkJxbRl1RmTxUk/WvJxBt", then FINGERPRINT.
    fn rfc5769_request() -> Vec<u8> {
        let hex = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
        (0..hex.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect()
    }

    #[test]
    fn integrity_matches_the_rfc5769_sample_request() {
        let m = rfc5769_request();
        assert_eq!(m.len(), 108);
        assert_eq!(local_ufrag(&m), Some("evtj"));
        assert!(integrity_ok(&m, b"VOkJxbRl1RmTxUk/WvJxBt", hmac));
        assert!(!integrity_ok(&m, b"VOkJxbRl1RmTxUk/WvJxBu", hmac));
        // Any byte it covers changed (here one of USERNAME's): no longer valid.
        let mut bad = m.clone();
        bad[80] ^= 1;
        assert!(!integrity_ok(&bad, b"VOkJxbRl1RmTxUk/WvJxBt", hmac));
        // Without the attribute there is nothing to check.
        let plain = msg(&[(0x0006, b"evtj:h6vY")]);
        assert!(!integrity_ok(&plain, b"VOkJxbRl1RmTxUk/WvJxBt", hmac));
        for n in 0..m.len() {
            assert!(!integrity_ok(&m[..n], b"VOkJxbRl1RmTxUk/WvJxBt", hmac));
        }
    }

    #[test]
    fn finds_username_after_other_attributes() {
        let m = msg(&[(0x0024, &[1, 2, 3, 4]), (0x0006, b"abcd:efgh")]);
        assert_eq!(local_ufrag(&m), Some("abcd"));
    }

    #[test]
    fn rtp_is_told_from_rtcp_stun_and_short_datagrams() {
        let mut rtp = [0u8; 12];
        rtp[0] = 0x80;
        rtp[1] = 96 | 0x80; // marker bit set, pt 96
        assert!(is_rtp(&rtp));
        rtp[1] = 200; // RTCP sender report
        assert!(!is_rtp(&rtp));
        assert!(!is_rtp(&[0x80, 96]));
        assert!(!is_rtp(&[0u8; 20])); // STUN's first byte
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(local_ufrag(&[0u8; 3]), None);
        let mut m = msg(&[(0x0006, b"abcd:efgh")]);
        m[2] = 0xff; // length beyond the datagram
        assert_eq!(local_ufrag(&m), None);
        let m = msg(&[(0x0006, &[0xff, 0xfe])]);
        assert_eq!(local_ufrag(&m), None);
        for n in 0..40 {
            let m = msg(&[(0x0006, b"abcd:efgh")]);
            let _ = local_ufrag(&m[..n.min(m.len())]);
        }
    }
}
