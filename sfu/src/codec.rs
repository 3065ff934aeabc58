//! Codec knowledge the SFU needs without decoding: keyframe detection in RTP
//! payloads and payload-type matching between publisher and viewers.

use str0m::format::{Codec, CodecSpec, PayloadParams};
use str0m::media::Pt;

/// True if this RTP payload carries (the start of) a keyframe.
///
/// Only a few bytes of the payload are read; malformed payloads are "not key".
pub fn is_keyframe(codec: Codec, payload: &[u8]) -> bool {
    match codec {
        Codec::H264 => h264_is_key(payload),
        Codec::Vp8 => vp8_is_key(payload),
        Codec::Vp9 => vp9_is_key(payload),
        Codec::Av1 => payload.first().is_some_and(|b| b & 0x08 != 0),
        _ => false,
    }
}

fn h264_nal_is_key(nal_type: u8) -> bool {
    // 5 = IDR slice, 7 = SPS (a keyframe access unit starts with it).
    nal_type == 5 || nal_type == 7
}

fn h264_is_key(p: &[u8]) -> bool {
    let Some(&first) = p.first() else {
        return false;
    };
    match first & 0x1f {
        t @ 1..=23 => h264_nal_is_key(t),
        24 => {
            // STAP-A: 16-bit size then NAL unit, repeated.
            let mut i = 1;
            while i + 2 < p.len() {
                let size = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
                if h264_nal_is_key(p[i + 2] & 0x1f) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => p
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && h264_nal_is_key(fu & 0x1f)),
        _ => false,
    }
}

fn vp8_is_key(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let start = b0 & 0x10 != 0;
    let pid = b0 & 0x07;
    if !start || pid != 0 {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(1) else {
            return false;
        };
        i = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            match p.get(i) {
                Some(b) if b & 0x80 != 0 => i += 2,
                Some(_) => i += 1,
                None => return false,
            }
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    p.get(i).is_some_and(|h| h & 0x01 == 0)
}

fn vp9_is_key(p: &[u8]) -> bool {
    // Flexible/non-flexible descriptor: P (inter-picture predicted) clear and B (begin) set.
    p.first().is_some_and(|b| b & 0x40 == 0 && b & 0x08 != 0)
}

/// Finds the payload type among `candidates` that carries the same codec
/// configuration as `spec`; the best match wins.
pub fn match_pt<'a>(
    spec: &CodecSpec,
    candidates: impl Iterator<Item = &'a PayloadParams>,
) -> Option<Pt> {
    let mut best: Option<(u32, Pt)> = None;
    for c in candidates {
        let s = c.spec();
        if s.codec != spec.codec || s.clock_rate != spec.clock_rate {
            continue;
        }
        let score = match spec.codec {
            Codec::H264 => {
                if s.format.packetization_mode.unwrap_or(0)
                    != spec.format.packetization_mode.unwrap_or(0)
                {
                    continue;
                }
                let a = spec.format.profile_level_id.unwrap_or(0x42001f);
                let b = s.format.profile_level_id.unwrap_or(0x42001f);
                if a == b {
                    3
                } else if (a >> 16) == (b >> 16) {
                    2
                } else if is_baseline(a) && is_baseline(b) {
                    1
                } else {
                    continue;
                }
            }
            Codec::Vp9 => {
                if s.format.profile_id.unwrap_or(0) != spec.format.profile_id.unwrap_or(0) {
                    continue;
                }
                3
            }
            _ => {
                if s.channels != spec.channels && spec.codec != Codec::Opus {
                    continue;
                }
                3
            }
        };
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c.pt()));
        }
    }
    best.map(|(_, pt)| pt)
}

fn is_baseline(plid: u32) -> bool {
    let profile_idc = (plid >> 16) as u8;
    let constraints = (plid >> 8) as u8;
    // Baseline (0x42), or Main (0x4d) with constraint_set1 (constrained baseline).
    profile_idc == 0x42 || (profile_idc == 0x4d && constraints & 0x40 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_keyframes() {
        assert!(is_keyframe(Codec::H264, &[0x65, 1, 2]));
        assert!(is_keyframe(Codec::H264, &[0x67, 1, 2]));
        assert!(!is_keyframe(Codec::H264, &[0x41, 1, 2]));
        // STAP-A with SPS + PPS
        assert!(is_keyframe(
            Codec::H264,
            &[0x78, 0, 2, 0x67, 0, 0, 2, 0x68, 0]
        ));
        // STAP-A with a non-key NAL only
        assert!(!is_keyframe(Codec::H264, &[0x78, 0, 2, 0x41, 0]));
        // FU-A start of IDR / middle of IDR
        assert!(is_keyframe(Codec::H264, &[0x7c, 0x85, 0]));
        assert!(!is_keyframe(Codec::H264, &[0x7c, 0x05, 0]));
        // Truncated and empty payloads
        assert!(!is_keyframe(Codec::H264, &[]));
        assert!(!is_keyframe(Codec::H264, &[0x7c]));
        assert!(!is_keyframe(Codec::H264, &[0x78, 0xff, 0xff]));
    }

    #[test]
    fn vp8_vp9_av1_keyframes() {
        // VP8: S=1, PID=0, no extension, P bit clear.
        assert!(is_keyframe(Codec::Vp8, &[0x10, 0x00]));
        assert!(!is_keyframe(Codec::Vp8, &[0x10, 0x01]));
        // VP8 with X, I (15-bit picture id).
        assert!(is_keyframe(Codec::Vp8, &[0x90, 0x80, 0x81, 0x02, 0x00]));
        assert!(!is_keyframe(Codec::Vp8, &[0x90, 0x80]));
        assert!(is_keyframe(Codec::Vp9, &[0x08]));
        assert!(!is_keyframe(Codec::Vp9, &[0x48]));
        assert!(is_keyframe(Codec::Av1, &[0x08]));
        assert!(!is_keyframe(Codec::Av1, &[0x00]));
    }
}
