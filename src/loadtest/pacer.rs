//! The bench source's pacer: spreads a frame's packets at a set rate, as a libwebrtc
//! sender's pacer does, on a fixed schedule. A sleep on this machine can end several
//! milliseconds late (a socket's read timeout counts in scheduler ticks), so a wake-up
//! sends every packet that fell due while it slept, in one burst, instead of pushing
//! every later packet back by the lateness: the source holds the stream's rate whatever
//! the timer's granularity (libwebrtc's pacer catches up the same way).
//!
//! A burst allowance lets the sender run ahead of the rate by up to that much time,
//! as libwebrtc's pacer may build up a debt of one burst interval (40 ms by default
//! since 2023, `PacingController::kDefaultBurstInterval`): a 2 Mbit/s delta frame
//! then leaves whole, and only a large keyframe is spread out. A zero allowance
//! sends every packet at its own paced time, as older libwebrtc did.

use std::time::{Duration, Instant};

/// Bytes a packet adds on the wire beyond its RTP payload (IP, UDP, RTP headers).
pub const WIRE_OVERHEAD: usize = 40;

/// When the next packet may leave, at `bps` (0 = unpaced).
#[derive(Debug, Clone)]
pub struct Pacer {
    bps: u64,
    burst: Duration,
    /// When the next packet is due at the paced rate.
    next: Instant,
}

impl Pacer {
    /// A pacer at `bps` bits per second that may run up to `burst` ahead of that
    /// rate; `bps` 0 lets every packet go at once.
    pub fn new(bps: u64, burst: Duration, now: Instant) -> Self {
        Self {
            bps,
            burst,
            next: now,
        }
    }

    /// Packets were queued behind an empty queue: the schedule starts again at `now`
    /// (an idle sender saves up no credit for a later burst).
    pub fn restart(&mut self, now: Instant) {
        self.next = self.next.max(now);
    }

    /// Whether a packet may leave at `now`.
    pub fn may_send(&self, now: Instant) -> bool {
        self.bps == 0 || now + self.burst >= self.next
    }

    /// When the next packet may leave (`None` when unpaced).
    pub fn next_send(&self) -> Option<Instant> {
        (self.bps > 0).then(|| self.next.checked_sub(self.burst).unwrap_or(self.next))
    }

    /// Accounts for a packet with `payload` bytes that just left: the next may leave
    /// one wire time later than this one was due, not than it left.
    pub fn sent(&mut self, payload: usize) {
        let bits = (payload as u64 + WIRE_OVERHEAD as u64) * 8;
        if let Some(ns) = (bits * 1_000_000_000).checked_div(self.bps) {
            self.next += Duration::from_nanos(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 30 fps stream of 9 packets of 1,160 B per frame (~2.6 Mbit/s with headers)
    /// paced at 5 Mbit/s, sent by a loop that wakes `late` after each deadline: returns
    /// (packets sent in one second, the longest any packet waited in the queue).
    fn run(late: Duration) -> (usize, Duration) {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(5_000_000, Duration::ZERO, t0);
        let mut queue: std::collections::VecDeque<Instant> = Default::default();
        let (mut sent, mut worst) = (0, Duration::ZERO);
        let mut now = t0;
        let mut next_frame = t0;
        let end = t0 + Duration::from_secs(1);
        while now < end {
            if now >= next_frame {
                if queue.is_empty() {
                    pacer.restart(now);
                }
                queue.extend(std::iter::repeat_n(next_frame, 9));
                next_frame += Duration::from_secs(1) / 30;
            }
            while let Some(&queued) = queue.front() {
                if !pacer.may_send(now) {
                    break;
                }
                queue.pop_front();
                pacer.sent(1_160);
                sent += 1;
                worst = worst.max(now - queued);
            }
            let deadline = pacer.next_send().unwrap_or(end);
            let deadline = if queue.is_empty() {
                next_frame
            } else {
                deadline.min(next_frame)
            };
            now = deadline.max(now) + late;
        }
        (sent, worst)
    }

    #[test]
    fn holds_the_stream_rate_when_wake_ups_are_late() {
        for late_ms in [0, 1, 4, 8] {
            let (sent, worst) = run(Duration::from_millis(late_ms));
            // 30 frames x 9 packets are queued in the second; the last frame's may
            // still be in flight.
            assert!(
                sent >= 29 * 9,
                "late {late_ms} ms: only {sent} of 270 packets sent"
            );
            // A frame's 9 packets take ~17 ms at 5 Mbit/s; lateness adds to that but
            // does not accumulate from frame to frame.
            assert!(
                worst < Duration::from_millis(17 + 2 * late_ms + 2),
                "late {late_ms} ms: a packet waited {worst:?}"
            );
        }
    }

    #[test]
    fn spaces_packets_by_their_wire_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, Duration::ZERO, t0);
        assert!(p.may_send(t0));
        p.sent(1_210); // 1,250 B on the wire = 10 ms at 1 Mbit/s
        assert_eq!(p.next_send(), Some(t0 + Duration::from_millis(10)));
        assert!(!p.may_send(t0 + Duration::from_millis(9)));
        // Idle for a second: no credit saved, the schedule starts again at now.
        let later = t0 + Duration::from_secs(1);
        p.restart(later);
        p.sent(1_210);
        assert!(!p.may_send(later + Duration::from_millis(5)));
    }

    #[test]
    fn a_burst_allowance_lets_a_frame_go_whole_and_spreads_a_large_one() {
        let t0 = Instant::now();
        // 40 ms at 5 Mbit/s: 25,000 B may leave ahead of the rate.
        let mut p = Pacer::new(5_000_000, Duration::from_millis(40), t0);
        let mut n = 0;
        while p.may_send(t0) {
            p.sent(1_210);
            n += 1;
        }
        // 1,250 B each on the wire: 20 fit in 25,000 B, the 21st goes once the
        // first has drained (2 ms later).
        assert_eq!(n, 21);
        assert_eq!(p.next_send(), Some(t0 + Duration::from_millis(2)));
        assert!(p.may_send(t0 + Duration::from_millis(2)));
    }

    #[test]
    fn unpaced_sends_everything_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(0, Duration::from_millis(40), t0);
        for _ in 0..100 {
            assert!(p.may_send(t0));
            p.sent(1_200);
        }
        assert_eq!(p.next_send(), None);
    }
}
