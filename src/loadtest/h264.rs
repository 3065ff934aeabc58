//! H.264 over RTP (RFC 6184) for the load generator: a small packetizer (single NAL
//! unit and FU-A packets) for the bench source, payload inspection for the viewers
//! (keyframe starts, access-unit ends), and the send-time stamp the source puts in
//! each frame as an SEI NAL unit so viewers can measure one-way delay through any
//! server: an SFU forwards payloads untouched, whatever it does to RTP headers.

/// `user_data_unregistered` UUID marking our timestamp SEI (no zero bytes, so the
/// SEI never needs emulation-prevention bytes).
pub const STAMP_UUID: [u8; 16] = *b"edgerelay-stamp1";

/// NAL unit type of an SEI message.
const NAL_SEI: u8 = 6;
/// NAL unit type of an IDR slice.
const NAL_IDR: u8 = 5;
/// NAL unit type of a sequence parameter set.
const NAL_SPS: u8 = 7;
/// STAP-A aggregation packet.
const NAL_STAP_A: u8 = 24;
/// FU-A fragmentation unit.
const NAL_FU_A: u8 = 28;
/// Bytes of the encoded time stamp: 8 groups of 7 bits, high bit set.
const STAMP_LEN: usize = 8;

/// Splits an Annex B byte stream into NAL units (without start codes).
/// Malformed input yields fewer (or no) units, never a panic.
pub fn split_annexb(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
        // A 4-byte start code leaves one zero byte before the next 3-byte one.
        while end > s && data[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        if end > s {
            out.push(&data[s..end]);
        }
    }
    out
}

/// Builds the SEI NAL unit carrying `unix_micros` (the source's send time).
pub fn stamp_sei(unix_micros: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + 16 + STAMP_LEN + 1);
    v.push(NAL_SEI); // forbidden 0, nri 0, type 6
    v.push(5); // payloadType user_data_unregistered
    v.push((16 + STAMP_LEN) as u8); // payloadSize
    v.extend_from_slice(&STAMP_UUID);
    for k in (0..STAMP_LEN).rev() {
        v.push(0x80 | ((unix_micros >> (7 * k)) & 0x7f) as u8);
    }
    v.push(0x80); // rbsp trailing bits
    v
}

/// Reads the send time from an RTP payload that is our stamp SEI (single NAL unit packet).
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    if payload.len() < 3 + 16 + STAMP_LEN || payload[0] & 0x1f != NAL_SEI {
        return None;
    }
    if payload[1] != 5 || payload[3..19] != STAMP_UUID {
        return None;
    }
    let mut t = 0u64;
    for &b in &payload[19..19 + STAMP_LEN] {
        t = (t << 7) | u64::from(b & 0x7f);
    }
    Some(t)
}

/// True if this RTP payload starts a keyframe: an SPS or IDR NAL unit on its own, inside
/// a STAP-A, or the first fragment of an FU-A.
pub fn starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let is_key = |t: u8| t == NAL_IDR || t == NAL_SPS;
    match first & 0x1f {
        NAL_STAP_A => {
            let mut i = 1;
            while i + 2 < payload.len() {
                let len = usize::from(payload[i]) << 8 | usize::from(payload[i + 1]);
                if let Some(&h) = payload.get(i + 2) {
                    if is_key(h & 0x1f) {
                        return true;
                    }
                }
                i += 2 + len;
            }
            false
        }
        NAL_FU_A => payload
            .get(1)
            .is_some_and(|&fu| fu & 0x80 != 0 && is_key(fu & 0x1f)),
        t => is_key(t),
    }
}

/// Packetizes one access unit (list of NAL units) into RTP payloads of at most `mtu`
/// bytes; returns `(payload, marker)` pairs, the marker on the last one.
pub fn packetize(nals: &[&[u8]], mtu: usize) -> Vec<(Vec<u8>, bool)> {
    let mtu = mtu.max(16);
    let mut out: Vec<(Vec<u8>, bool)> = Vec::new();
    for nal in nals {
        let Some((&hdr, body)) = nal.split_first() else {
            continue;
        };
        if nal.len() <= mtu {
            out.push((nal.to_vec(), false));
            continue;
        }
        let indicator = (hdr & 0xe0) | NAL_FU_A;
        let ty = hdr & 0x1f;
        let chunk = mtu - 2;
        let n = body.len().div_ceil(chunk);
        for (k, part) in body.chunks(chunk).enumerate() {
            let mut p = Vec::with_capacity(part.len() + 2);
            p.push(indicator);
            let mut fu = ty;
            if k == 0 {
                fu |= 0x80;
            }
            if k + 1 == n {
                fu |= 0x40;
            }
            p.push(fu);
            p.extend_from_slice(part);
            out.push((p, false));
        }
    }
    if let Some(last) = out.last_mut() {
        last.1 = true;
    }
    out
}

/// Inserts `sei` before the first slice (VCL NAL unit) of an access unit.
pub fn with_sei<'a>(nals: &[&'a [u8]], sei: &'a [u8]) -> Vec<&'a [u8]> {
    let pos = nals
        .iter()
        .position(|n| n.first().is_some_and(|h| (1..=5).contains(&(h & 0x1f))))
        .unwrap_or(nals.len());
    let mut v = Vec::with_capacity(nals.len() + 1);
    v.extend_from_slice(&nals[..pos]);
    v.push(sei);
    v.extend_from_slice(&nals[pos..]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_has_no_zero_bytes() {
        let t = 1_795_000_000_123_456u64;
        let sei = stamp_sei(t);
        assert!(!sei.windows(2).any(|w| w == [0, 0]));
        assert_eq!(read_stamp(&sei), Some(t));
        assert_eq!(read_stamp(&sei[..10]), None);
        let mut other = sei.clone();
        other[5] ^= 1;
        assert_eq!(read_stamp(&other), None);
    }

    #[test]
    fn splits_and_packetizes_with_fu_a() {
        let mut au = vec![
            0, 0, 0, 1, 0x67, 1, 2, 3, 0, 0, 1, 0x68, 4, 5, 0, 0, 0, 1, 0x65,
        ];
        au.extend(std::iter::repeat_n(7u8, 3000));
        let nals = split_annexb(&au);
        assert_eq!(nals.len(), 3);
        assert_eq!(nals[0], &[0x67, 1, 2, 3]);
        assert_eq!(nals[1], &[0x68, 4, 5]);
        assert_eq!(nals[2].len(), 3001);
        let sei = stamp_sei(42);
        let nals = with_sei(&nals, &sei);
        assert_eq!(nals[2][0], 6);
        let pkts = packetize(&nals, 1200);
        assert!(starts_keyframe(&pkts[0].0)); // SPS
        assert_eq!(read_stamp(&pkts[2].0), Some(42));
        assert!(starts_keyframe(&pkts[3].0)); // FU-A start of the IDR
        assert!(!starts_keyframe(&pkts[4].0)); // FU-A continuation
        assert!(pkts.iter().all(|(p, _)| p.len() <= 1200));
        assert!(pkts.last().is_some_and(|p| p.1));
        assert_eq!(pkts.iter().filter(|p| p.1).count(), 1);
        let body: usize = pkts[3..].iter().map(|(p, _)| p.len() - 2).sum();
        assert_eq!(body, 3000);
    }

    #[test]
    fn stap_a_and_garbage() {
        let stap = [24u8, 0, 2, 0x67, 1, 0, 2, 0x68, 2];
        assert!(starts_keyframe(&stap));
        assert!(!starts_keyframe(&[24u8, 0, 9]));
        assert!(!starts_keyframe(&[]));
        assert!(!starts_keyframe(&[0x41, 1]));
        assert!(split_annexb(&[0, 0]).is_empty());
    }
}
