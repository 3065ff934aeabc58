//! A moving test pattern rendered straight into I420 (YUV 4:2:0) planes.
//!
//! The picture has static colour bars, a box that moves every frame, and two text lines drawn
//! with a tiny built-in 5x7 bitmap font: the frame counter and the wall-clock time (UTC).
//! Rendering reuses two preallocated frames: no allocation per frame.

use openh264::formats::YUVSource;

/// One I420 picture: a full-resolution Y plane followed by quarter-size U and V planes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct I420Frame {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl I420Frame {
    /// A black picture. `width` and `height` must be even and non-zero.
    pub fn new(width: usize, height: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            width >= 2 && height >= 2 && width.is_multiple_of(2) && height.is_multiple_of(2),
            "picture size {width}x{height} must be even and non-zero"
        );
        let luma = width * height;
        let mut data = vec![16u8; luma + luma / 2];
        data[luma..].fill(128);
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The luma plane (`width * height` bytes, stride `width`).
    pub fn y_plane(&self) -> &[u8] {
        &self.data[..self.width * self.height]
    }

    fn planes_mut(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        let luma = self.width * self.height;
        let chroma = luma / 4;
        let (y, rest) = self.data.split_at_mut(luma);
        let (u, v) = rest.split_at_mut(chroma);
        (y, u, v)
    }

    /// Fills the rectangle (clipped to the picture) with one colour.
    pub fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: Yuv) {
        let (width, height) = (self.width, self.height);
        let x1 = (x + w).min(width);
        let y1 = (y + h).min(height);
        if x >= x1 || y >= y1 {
            return;
        }
        let (yp, up, vp) = self.planes_mut();
        for row in y..y1 {
            yp[row * width + x..row * width + x1].fill(c.y);
        }
        let cw = width / 2;
        let (cx0, cx1) = (x / 2, x1.div_ceil(2).min(cw));
        for row in (y / 2)..(y1.div_ceil(2)).min(height / 2) {
            up[row * cw + cx0..row * cw + cx1].fill(c.u);
            vp[row * cw + cx0..row * cw + cx1].fill(c.v);
        }
    }

    /// Draws `text` with the built-in font at (x, y); each font pixel becomes a
    /// `scale` x `scale` block. Unknown characters render as blanks. Only luma is
    /// touched, so draw on a neutral (grey-chroma) background.
    pub fn draw_text(&mut self, x: usize, y: usize, scale: usize, text: &str, luma: u8) {
        let scale = scale.max(1);
        let (width, height) = (self.width, self.height);
        let (yp, _, _) = self.planes_mut();
        for (i, ch) in text.chars().enumerate() {
            let gx = x + i * GLYPH_ADVANCE * scale;
            let rows = glyph(ch);
            for (ry, bits) in rows.iter().enumerate() {
                for rx in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - rx)) == 0 {
                        continue;
                    }
                    let px = gx + rx * scale;
                    let py = y + ry * scale;
                    for yy in py..(py + scale).min(height) {
                        let start = yy * width + px.min(width);
                        let end = yy * width + (px + scale).min(width);
                        yp[start..end].fill(luma);
                    }
                }
            }
        }
    }
}

impl YUVSource for I420Frame {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.width / 2, self.width / 2)
    }

    fn y(&self) -> &[u8] {
        &self.data[..self.width * self.height]
    }

    fn u(&self) -> &[u8] {
        let luma = self.width * self.height;
        &self.data[luma..luma + luma / 4]
    }

    fn v(&self) -> &[u8] {
        let luma = self.width * self.height;
        &self.data[luma + luma / 4..]
    }
}

/// A colour in limited-range BT.601 YUV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Yuv {
    /// Luma.
    pub y: u8,
    /// Blue-difference chroma.
    pub u: u8,
    /// Red-difference chroma.
    pub v: u8,
}

const fn yuv(y: u8, u: u8, v: u8) -> Yuv {
    Yuv { y, u, v }
}

/// The classic 75% colour bars: white, yellow, cyan, green, magenta, red, blue.
const BARS: [Yuv; 7] = [
    yuv(180, 128, 128),
    yuv(162, 44, 142),
    yuv(131, 156, 44),
    yuv(112, 72, 58),
    yuv(84, 184, 198),
    yuv(65, 100, 212),
    yuv(35, 212, 114),
];
const BLACK: Yuv = yuv(16, 128, 128);
const WHITE: Yuv = yuv(235, 128, 128);
const ORANGE: Yuv = yuv(151, 44, 201);

const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;
/// Horizontal advance per character in font pixels (glyph + one pixel gap).
const GLYPH_ADVANCE: usize = GLYPH_W + 1;

/// 5x7 glyphs, one byte per row, bit 4 is the leftmost pixel.
fn glyph(c: char) -> [u8; GLYPH_H] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        _ => [0; GLYPH_H],
    }
}

/// Where the frame counter digits are drawn: `(x, y, w, h)` in luma pixels.
/// Tests decode a picture and compare this region across frames.
pub fn counter_region(width: usize, height: usize) -> (usize, usize, usize, usize) {
    let l = Layout::new(width, height);
    (
        l.counter_x,
        l.line1_y,
        COUNTER_DIGITS * GLYPH_ADVANCE * l.scale,
        GLYPH_H * l.scale,
    )
}

const COUNTER_DIGITS: usize = 8;

/// Positions derived from the picture size.
#[derive(Clone, Copy, Debug)]
struct Layout {
    scale: usize,
    margin: usize,
    line1_y: usize,
    line2_y: usize,
    counter_x: usize,
    panel_h: usize,
}

impl Layout {
    fn new(width: usize, height: usize) -> Self {
        // About 26 characters must fit across; text height about 1/18 of the picture.
        let scale = (height / 120).min(width / 160).max(1);
        let margin = 2 * scale;
        let line1_y = margin;
        let line2_y = line1_y + (GLYPH_H + 3) * scale;
        // "FRAME " is 6 characters.
        let counter_x = margin + 6 * GLYPH_ADVANCE * scale;
        let panel_h = line2_y + GLYPH_H * scale + margin;
        Self {
            scale,
            margin,
            line1_y,
            line2_y,
            counter_x,
            panel_h,
        }
    }
}

/// Renders the moving test pattern, reusing its buffers.
pub struct PatternGenerator {
    base: I420Frame,
    frame: I420Frame,
    layout: Layout,
    text: String,
    /// Noise band (first row, rows) when enabled, and the PRNG state.
    noise: Option<(usize, usize)>,
    rng: u64,
}

impl PatternGenerator {
    /// A generator for `width` x `height` pictures (even, at least 64x64).
    pub fn new(width: usize, height: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            width >= 64 && height >= 64,
            "picture size {width}x{height} too small (min 64x64)"
        );
        let mut base = I420Frame::new(width, height)?;
        let layout = Layout::new(width, height);
        // Colour bars on the top two thirds, a luma ramp at the bottom.
        let bar_w = width.div_ceil(BARS.len());
        let bars_h = height * 2 / 3;
        for (i, c) in BARS.iter().enumerate() {
            base.fill_rect(i * bar_w, 0, bar_w, bars_h, *c);
        }
        let steps = 16;
        let step_w = width.div_ceil(steps);
        for i in 0..steps {
            let l = 16 + (219 * i / (steps - 1)) as u8;
            base.fill_rect(
                i * step_w,
                bars_h,
                step_w,
                height - bars_h,
                yuv(l, 128, 128),
            );
        }
        // Text panel (black) at the top-left.
        let panel_w = (26 * GLYPH_ADVANCE * layout.scale + 2 * layout.margin).min(width);
        base.fill_rect(0, 0, panel_w, layout.panel_h.min(height), BLACK);
        base.draw_text(layout.margin, layout.line1_y, layout.scale, "FRAME", 235);
        base.draw_text(layout.margin, layout.line2_y, layout.scale, "TIME", 235);
        let frame = base.clone();
        Ok(Self {
            base,
            frame,
            layout,
            text: String::with_capacity(32),
            noise: None,
            rng: 0x9E37_79B9_7F4A_7C15,
        })
    }

    /// Turns on a band of fresh luma noise every frame (the bottom sixth of the
    /// picture), so the encoder spends its whole bitrate budget: realistic packet
    /// rates for load tests instead of a near-static, tiny stream.
    pub fn set_noise(&mut self, on: bool) {
        let h = self.base.height;
        let rows = (h / 6).max(2) & !1;
        self.noise = on.then_some((h - rows, rows));
    }

    /// Renders frame number `frame_no` stamped with `unix_millis` (wall clock, UTC).
    pub fn render(&mut self, frame_no: u64, unix_millis: u64) -> &I420Frame {
        use std::fmt::Write as _;
        let (w, h) = (self.base.width, self.base.height);
        self.frame.data.copy_from_slice(&self.base.data);
        let l = self.layout;

        // A box bouncing left-right below the text panel, moving every frame.
        let box_size = (h / 6).max(8) & !1;
        let travel = w.saturating_sub(box_size).max(1) as u64;
        let pos = (frame_no * 8) % (2 * travel);
        let bx = if pos < travel { pos } else { 2 * travel - pos } as usize;
        let by = (l.panel_h + (h / 2).saturating_sub(l.panel_h) / 2).min(h - box_size);
        self.frame.fill_rect(bx, by, box_size, box_size, WHITE);
        self.frame.fill_rect(
            bx + box_size / 4,
            by + box_size / 4,
            box_size / 2,
            box_size / 2,
            ORANGE,
        );

        if let Some((y0, rows)) = self.noise {
            let (yp, _, _) = self.frame.planes_mut();
            let band = &mut yp[y0 * w..(y0 + rows) * w];
            let mut x = self.rng;
            for chunk in band.chunks_mut(8) {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                for (d, b) in chunk.iter_mut().zip(x.to_le_bytes()) {
                    *d = 16 + (b % 220);
                }
            }
            self.rng = x;
        }

        self.text.clear();
        let _ = write!(
            self.text,
            "{:0width$}",
            frame_no % 100_000_000,
            width = COUNTER_DIGITS
        );
        self.frame
            .draw_text(l.counter_x, l.line1_y, l.scale, &self.text, 235);

        let ms_of_day = unix_millis % 86_400_000;
        self.text.clear();
        let _ = write!(
            self.text,
            "{:02}:{:02}:{:02}.{:03} UTC",
            ms_of_day / 3_600_000,
            ms_of_day / 60_000 % 60,
            ms_of_day / 1000 % 60,
            ms_of_day % 1000
        );
        let time_x = l.margin + 5 * GLYPH_ADVANCE * l.scale;
        self.frame
            .draw_text(time_x, l.line2_y, l.scale, &self.text, 235);
        &self.frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region_bytes(f: &I420Frame, r: (usize, usize, usize, usize)) -> Vec<u8> {
        let (x, y, w, h) = r;
        let mut out = Vec::new();
        for row in y..y + h {
            out.extend_from_slice(&f.y_plane()[row * f.width() + x..row * f.width() + x + w]);
        }
        out
    }

    #[test]
    fn rejects_odd_or_tiny_sizes() {
        assert!(I420Frame::new(3, 2).is_err());
        assert!(I420Frame::new(0, 0).is_err());
        assert!(PatternGenerator::new(32, 32).is_err());
        assert!(PatternGenerator::new(1280, 720).is_ok());
    }

    #[test]
    fn draws_digit_bitmap() {
        let mut f = I420Frame::new(64, 64).expect("frame");
        f.draw_text(0, 0, 2, "1", 235);
        // '1' row 0 is 0b00100: only column 2 lit, scaled by 2 -> pixels x 4..6.
        let row0 = &f.y_plane()[..12];
        assert_eq!(row0, &[16, 16, 16, 16, 235, 235, 16, 16, 16, 16, 16, 16]);
        // Row 6 of '1' is 0b01110: columns 1..4 -> pixels x 2..8 at y 12.
        let row12 = &f.y_plane()[12 * 64..12 * 64 + 12];
        assert_eq!(
            row12,
            &[16, 16, 235, 235, 235, 235, 235, 235, 16, 16, 16, 16]
        );
        // Clipped drawing near the edge must not panic.
        f.draw_text(60, 60, 3, "88:88", 235);
    }

    #[test]
    fn distinct_digits_have_distinct_glyphs() {
        let glyphs: Vec<_> = "0123456789".chars().map(glyph).collect();
        for i in 0..glyphs.len() {
            for j in i + 1..glyphs.len() {
                assert_ne!(glyphs[i], glyphs[j], "digits {i} and {j}");
            }
        }
    }

    #[test]
    fn pattern_moves_and_counter_changes() {
        let mut g = PatternGenerator::new(320, 240).expect("generator");
        let a = g.render(1, 0).clone();
        let b = g.render(2, 0).clone();
        let b2 = g.render(2, 0).clone();
        assert_ne!(a, b, "consecutive frames differ");
        assert_eq!(b, b2, "rendering is deterministic");
        let r = counter_region(320, 240);
        assert_ne!(region_bytes(&a, r), region_bytes(&b, r));
        // The clock line changes with the time.
        let c = g.render(2, 1234).clone();
        assert_ne!(b, c);
        // Chroma is untouched by text: the panel stays neutral grey.
        assert_eq!(a.u()[0], 128);
    }
}
