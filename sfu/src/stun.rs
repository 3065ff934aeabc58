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
    if !is_stun(data) {
        return None;
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let body = data.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let value = body.get(i + 4..i + 4 + alen)?;
        if typ == 0x0006 {
            let s = std::str::from_utf8(value).ok()?;
            return s.split(':').next();
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    None
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
