//! H.264 encoding with OpenH264 (constrained baseline, Annex B output) and small
//! H.264 bitstream helpers shared with the WHEP client.

use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Level, Profile,
    RateControlMode, UsageType,
};
use openh264::{OpenH264API, Timestamp};

use super::pattern::I420Frame;

/// Encoder settings.
#[derive(Clone, Copy, Debug)]
pub struct EncoderSettings {
    /// Target bitrate in bits per second.
    pub bitrate_bps: u32,
    /// Frames per second.
    pub fps: u32,
    /// A periodic IDR every this many frames (0: only the first and requested ones).
    pub keyframe_interval_frames: u32,
}

/// One encoded access unit.
#[derive(Debug)]
pub struct EncodedFrame<'a> {
    /// Annex B bytes (start codes included), SPS/PPS before every IDR.
    pub data: &'a [u8],
    /// Whether this access unit is an IDR picture.
    pub keyframe: bool,
}

/// OpenH264 wrapper with a reused output buffer.
pub struct VideoEncoder {
    enc: Encoder,
    out: Vec<u8>,
}

impl VideoEncoder {
    /// Builds the encoder (the built-in OpenH264 source).
    pub fn new(s: EncoderSettings) -> anyhow::Result<Self> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(s.bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(s.fps as f32))
            .rate_control_mode(RateControlMode::Bitrate)
            .usage_type(UsageType::ScreenContentRealTime)
            .skip_frames(false)
            .adaptive_quantization(false)
            .background_detection(false)
            .profile(Profile::Baseline)
            .level(Level::Level_3_1)
            .intra_frame_period(IntraFramePeriod::from_num_frames(
                s.keyframe_interval_frames,
            ))
            .num_threads(1);
        let enc = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| anyhow::anyhow!("openh264 encoder: {e}"))?;
        Ok(Self {
            enc,
            out: Vec::with_capacity(256 * 1024),
        })
    }

    /// Encodes one picture. Returns `None` when the encoder skipped it.
    pub fn encode(
        &mut self,
        frame: &I420Frame,
        force_keyframe: bool,
        timestamp_ms: u64,
    ) -> anyhow::Result<Option<EncodedFrame<'_>>> {
        if force_keyframe {
            self.enc.force_intra_frame();
        }
        let bs = self
            .enc
            .encode_at(frame, Timestamp::from_millis(timestamp_ms))
            .map_err(|e| anyhow::anyhow!("openh264 encode: {e}"))?;
        let ft = bs.frame_type();
        if matches!(ft, FrameType::Skip | FrameType::Invalid) {
            return Ok(None);
        }
        self.out.clear();
        bs.write_vec(&mut self.out);
        if self.out.is_empty() {
            return Ok(None);
        }
        let keyframe = ft == FrameType::IDR || annexb_has_idr(&self.out);
        Ok(Some(EncodedFrame {
            data: &self.out,
            keyframe,
        }))
    }
}

/// Iterates over the NAL unit types (low 5 bits of the NAL header) in an Annex B buffer.
/// Malformed input yields fewer items, never a panic.
pub fn annexb_nal_types(data: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0usize;
    std::iter::from_fn(move || {
        // Find the next 00 00 01 start code; the header follows it.
        while i + 3 < data.len() {
            if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
                let t = data[i + 3] & 0x1F;
                i += 4;
                return Some(t);
            }
            i += 1;
        }
        None
    })
}

/// Whether an Annex B access unit contains an IDR slice (NAL type 5).
pub fn annexb_has_idr(data: &[u8]) -> bool {
    annexb_nal_types(data).any(|t| t == 5)
}

#[cfg(test)]
mod tests {
    use super::super::pattern::{counter_region, PatternGenerator};
    use super::*;
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;

    fn settings() -> EncoderSettings {
        EncoderSettings {
            bitrate_bps: 500_000,
            fps: 30,
            keyframe_interval_frames: 10,
        }
    }

    #[test]
    fn nal_scanner_handles_garbage() {
        assert_eq!(annexb_nal_types(&[]).count(), 0);
        assert_eq!(annexb_nal_types(&[0, 0, 1]).count(), 0);
        let v: Vec<u8> = annexb_nal_types(&[0, 0, 0, 1, 0x67, 9, 0, 0, 1, 0x65, 1]).collect();
        assert_eq!(v, vec![7, 5]);
        assert!(!annexb_has_idr(&[0xff; 64]));
    }

    #[test]
    fn encoder_emits_idr_then_p_frames_and_periodic_idr() {
        let mut g = PatternGenerator::new(320, 240).expect("generator");
        let mut enc = VideoEncoder::new(settings()).expect("encoder");
        let mut kinds = Vec::new();
        for n in 0..21u64 {
            let f = g.render(n, n * 33).clone();
            let out = enc
                .encode(&f, false, n * 33)
                .expect("encode")
                .expect("frame");
            let types: Vec<u8> = annexb_nal_types(out.data).collect();
            if n == 0 {
                assert!(
                    types.contains(&7) && types.contains(&8),
                    "SPS+PPS first: {types:?}"
                );
            }
            kinds.push(out.keyframe);
        }
        assert!(kinds[0], "first frame is IDR");
        assert!(!kinds[1] && !kinds[2], "then P frames");
        assert!(
            kinds[10] && kinds[20],
            "periodic IDR every 10 frames: {kinds:?}"
        );
        // A forced keyframe is honoured on the next frame.
        let f = g.render(21, 700).clone();
        let out = enc.encode(&f, true, 700).expect("encode").expect("frame");
        assert!(out.keyframe);
    }

    #[test]
    fn decoder_reads_our_stream_and_counter_changes() {
        let (w, h) = (320usize, 240usize);
        let mut g = PatternGenerator::new(w, h).expect("generator");
        let mut enc = VideoEncoder::new(EncoderSettings {
            bitrate_bps: 1_500_000,
            ..settings()
        })
        .expect("encoder");
        let mut dec = Decoder::new().expect("decoder");
        let (rx, ry, rw, rh) = counter_region(w, h);
        let mut regions: Vec<Vec<u8>> = Vec::new();
        for n in 0..6u64 {
            let f = g.render(n * 7, n * 33).clone();
            let out = enc
                .encode(&f, false, n * 33)
                .expect("encode")
                .expect("frame");
            let pic = dec.decode(out.data).expect("decode").expect("picture");
            assert_eq!(pic.dimensions(), (w, h));
            let stride = pic.strides().0;
            let mut region = Vec::with_capacity(rw * rh);
            for row in ry..ry + rh {
                region.extend_from_slice(&pic.y()[row * stride + rx..row * stride + rx + rw]);
            }
            // Text is drawn white on black: the region must have both.
            assert!(region.iter().any(|&p| p > 180) && region.iter().any(|&p| p < 60));
            regions.push(region);
        }
        for pair in regions.windows(2) {
            let diff = pair[0]
                .iter()
                .zip(&pair[1])
                .filter(|(a, b)| a.abs_diff(**b) > 64)
                .count();
            assert!(
                diff > 10,
                "counter region changes between frames ({diff} px)"
            );
        }
    }

    #[test]
    fn noise_band_fills_the_bitrate() {
        let encoded_bytes = |noise: bool| {
            let mut g = PatternGenerator::new(320, 240).expect("generator");
            g.set_noise(noise);
            let mut enc = VideoEncoder::new(EncoderSettings {
                bitrate_bps: 600_000,
                fps: 15,
                keyframe_interval_frames: 0,
            })
            .expect("encoder");
            (0..30u64)
                .map(|n| {
                    let f = g.render(n, n * 66).clone();
                    enc.encode(&f, false, n * 66)
                        .expect("encode")
                        .map_or(0, |e| e.data.len())
                })
                .sum::<usize>()
        };
        let quiet = encoded_bytes(false);
        let noisy = encoded_bytes(true);
        // 2 s at 600 kbit/s is 150 kB; the static pattern needs a small fraction.
        assert!(noisy > 3 * quiet, "noisy {noisy} vs quiet {quiet}");
        assert!(noisy > 60_000, "noisy stream uses the budget: {noisy}");
    }

    /// Encoder speed at 720p (run with `--ignored --nocapture`; debug builds compile
    /// OpenH264 without optimisation unless the profile overrides it).
    #[test]
    #[ignore]
    fn encode_720p_speed() {
        let mut g = PatternGenerator::new(1280, 720).expect("generator");
        let mut enc = VideoEncoder::new(EncoderSettings {
            bitrate_bps: 2_000_000,
            fps: 30,
            keyframe_interval_frames: 60,
        })
        .expect("encoder");
        let t = std::time::Instant::now();
        for n in 0..60u64 {
            let f = g.render(n, n * 33).clone();
            enc.encode(&f, false, n * 33).expect("encode");
        }
        eprintln!("720p: {:?} per frame", t.elapsed() / 60);
    }
}
