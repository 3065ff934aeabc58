//! Prometheus metrics of the edge. The media thread keeps plain counters; they
//! are copied into the `metrics` registry when `/metrics` is scraped, so the
//! packet path never touches the registry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use edgerelay_sfu::SfuError;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::media::{DelayHistogram, Shared, FANOUT_DELAY_BUCKETS};

/// The exporter handle plus settings the handlers need.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    /// Body limit, for error messages.
    pub max_body: usize,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

impl Metrics {
    /// Installs the process-wide recorder (once) and returns a handle.
    pub fn install(max_body: usize) -> anyhow::Result<Metrics> {
        let handle = match HANDLE.get() {
            Some(h) => h.clone(),
            None => {
                let recorder = PrometheusBuilder::new().build_recorder();
                let h = recorder.handle();
                // Another component may have installed one first; then ours stays private.
                let _ = metrics::set_global_recorder(recorder);
                let _ = HANDLE.set(h.clone());
                HANDLE.get().cloned().unwrap_or(h)
            }
        };
        Ok(Metrics { handle, max_body })
    }

    /// Counts a refused signalling request by endpoint and reason.
    pub fn signalling_error(&self, endpoint: &'static str, e: &SfuError) {
        let reason = match e {
            SfuError::BadSdp(_) => "bad_sdp",
            SfuError::RoomNotFound(_) => "room_not_found",
            SfuError::PublisherBusy(_) => "publisher_busy",
            SfuError::ControllerTaken(_) => "controller_taken",
            SfuError::RoomFull(_) => "room_full",
            SfuError::UnknownPeer => "unknown_session",
            SfuError::NoPendingOffer => "no_pending_offer",
        };
        counter!("edgerelay_signalling_errors_total", "endpoint" => endpoint, "reason" => reason)
            .increment(1);
    }

    /// Copies the media thread's counters and renders the exposition text.
    pub fn render(&self, shared: &Shared) -> String {
        if let Ok(s) = shared.stats.lock() {
            let c = |name: &'static str, v: u64| counter!(name).absolute(v);
            // The SFU cores' counters (added over the media threads).
            let core: [(&'static str, u64); 38] = [
                ("edgerelay_datagrams_in_total", s.datagrams_in),
                ("edgerelay_bytes_in_total", s.bytes_in),
                ("edgerelay_datagrams_out_total", s.datagrams_out),
                ("edgerelay_bytes_out_total", s.bytes_out),
                ("edgerelay_rtp_packets_in_total", s.rtp_in),
                ("edgerelay_rtp_packets_out_total", s.rtp_out),
                ("edgerelay_keyframes_in_total", s.keyframes_in),
                (
                    "edgerelay_keyframe_requests_from_viewers_total",
                    s.keyframe_requests_from_viewers,
                ),
                (
                    "edgerelay_keyframe_requests_upstream_total",
                    s.keyframe_requests_upstream,
                ),
                (
                    "edgerelay_keyframe_requests_merged_total",
                    s.keyframe_requests_merged,
                ),
                (
                    "edgerelay_keyframe_requests_answered_by_cache_total",
                    s.keyframe_requests_answered_by_cache,
                ),
                (
                    "edgerelay_viewer_starts_from_cache_total",
                    s.viewer_starts_from_cache,
                ),
                ("edgerelay_packets_replayed_total", s.packets_replayed),
                ("edgerelay_replay_slices_total", s.replay_slices),
                ("edgerelay_fanout_slices_total", s.fanout_slices),
                ("edgerelay_gather_frames_total", s.frames_gathered),
                ("edgerelay_gather_expired_total", s.gather_expired),
                ("edgerelay_gather_cut_total", s.gather_cut),
                ("edgerelay_gather_full_total", s.gather_full),
                ("edgerelay_address_takeovers_total", s.address_takeovers),
                ("edgerelay_span_feed_packets_out_total", s.feed_packets_out),
                ("edgerelay_span_feed_packets_in_total", s.feed_packets_in),
                (
                    "edgerelay_span_feed_packets_dropped_total",
                    s.feed_packets_dropped,
                ),
                (
                    "edgerelay_span_keyframe_requests_to_home_total",
                    s.keyframe_requests_to_home,
                ),
                ("edgerelay_pacer_immediate_ticks_total", s.immediate_reticks),
                ("edgerelay_direct_packets_total", s.direct_out),
                ("edgerelay_direct_sync_packets_total", s.direct_sync),
                ("edgerelay_direct_fallbacks_total", s.direct_fallbacks),
                (
                    "edgerelay_direct_unavailable_viewers_total",
                    s.direct_unavailable,
                ),
                ("edgerelay_nacked_packets_total", s.nacked),
                ("edgerelay_direct_resends_total", s.direct_resends),
                ("edgerelay_nack_unanswered_total", s.nack_unanswered),
                ("edgerelay_resends_capped_total", s.resends_capped),
                ("edgerelay_input_forwarded_total", s.input_forwarded),
                (
                    "edgerelay_input_dropped_spectator_total",
                    s.input_dropped_spectator,
                ),
                ("edgerelay_data_to_viewers_total", s.data_to_viewers),
                ("edgerelay_video_pauses_total", s.video_pauses),
                ("edgerelay_video_resumes_total", s.video_resumes),
            ];
            for (name, v) in core {
                c(name, v);
            }
            let d = |reason: &'static str, v: u64| {
                counter!("edgerelay_dropped_packets_total", "reason" => reason).absolute(v)
            };
            d("unknown_source", s.dropped_unknown_source);
            d("malformed", s.dropped_malformed);
            d("unknown_stream", s.dropped_unknown_stream);
            d("no_codec", s.dropped_no_codec);
            d("paused", s.dropped_paused);
            d("duplicate", s.dropped_duplicate);
            d("data_channel_full", s.data_dropped);
            d("send_error", shared.send_errors.load(Ordering::Relaxed));
            // Counters the media threads keep themselves (relaxed atomics).
            let atomics: [(&str, &AtomicU64); 12] = [
                ("edgerelay_span_viewers_seated_total", &shared.span_seated),
                ("edgerelay_span_feeds_total", &shared.span_feeds),
                (
                    "edgerelay_span_messages_dropped_total",
                    &shared.span_dropped,
                ),
                ("edgerelay_span_feed_packets_late_total", &shared.span_late),
                (
                    "edgerelay_media_loop_iterations_total",
                    &shared.loop_iterations,
                ),
                ("edgerelay_media_receive_calls_total", &shared.receive_calls),
                (
                    "edgerelay_media_datagrams_received_total",
                    &shared.datagrams_received,
                ),
                ("edgerelay_turn_handoff_in_total", &shared.relayed_in),
                ("edgerelay_turn_handoff_out_total", &shared.relayed_out),
                ("edgerelay_turn_media_sends_total", &shared.relay_sends),
                ("edgerelay_media_gso_sends_total", &shared.gso_sends),
                ("edgerelay_media_gso_segments_total", &shared.gso_segments),
            ];
            for (name, v) in atomics {
                c(name, v.load(Ordering::Relaxed));
            }
        }
        let rooms = shared.rooms.lock().map(|r| r.len()).unwrap_or(0);
        gauge!("edgerelay_rooms").set(rooms as f64);
        gauge!("edgerelay_viewers").set(shared.viewers.load(Ordering::Relaxed) as f64);
        gauge!("edgerelay_peers").set(shared.peers.load(Ordering::Relaxed) as f64);
        gauge!("edgerelay_media_gso_threads")
            .set(shared.gso_threads.load(Ordering::Relaxed) as f64);
        let mut text = self.handle.render();
        render_histogram(
            &mut text,
            "edgerelay_media_fanout_delay_seconds",
            "From the arrival (kernel stamp) of the oldest publisher packet a media loop pass fanned out to the end of its sends (per pass that fanned out any).",
            &shared.fanout_delay,
        );
        render_histogram(
            &mut text,
            "edgerelay_media_packet_fanout_delay_seconds",
            "From a publisher packet's arrival (kernel stamp) to the end of its fan-out on a media thread, a hold until its frame was whole included (per packet).",
            &shared.packet_delay,
        );
        text
    }
}

/// Appends a fan-out delay histogram in Prometheus text format (the media
/// threads keep their own bucket counts, so it is written here rather than
/// recorded sample by sample into the registry).
fn render_histogram(text: &mut String, name: &str, help: &str, h: &DelayHistogram) {
    use std::fmt::Write;
    let (cumulative, sum, count) = h.snapshot();
    let _ = writeln!(text, "# HELP {name} {help}");
    let _ = writeln!(text, "# TYPE {name} histogram");
    for (bound, n) in FANOUT_DELAY_BUCKETS.iter().zip(&cumulative) {
        let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(text, "{name}_sum {sum}");
    let _ = writeln!(text, "{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fanout_delay_renders_as_a_cumulative_histogram() {
        let h = DelayHistogram::default();
        for us in [80, 150, 150, 900, 1_900, 7_000, 400_000] {
            h.observe(Duration::from_micros(us));
        }
        let mut text = String::new();
        render_histogram(
            &mut text,
            "edgerelay_media_fanout_delay_seconds",
            "help",
            &h,
        );
        let value = |le: &str| -> u64 {
            let key = format!("edgerelay_media_fanout_delay_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no bucket {le} in {text}"))
        };
        assert_eq!(value("0.00005"), 0);
        assert_eq!(value("0.0001"), 1);
        assert_eq!(value("0.0002"), 3);
        assert_eq!(value("0.001"), 4);
        assert_eq!(value("0.002"), 5);
        assert_eq!(value("0.0075"), 6);
        assert_eq!(value("0.1"), 6);
        assert_eq!(value("+Inf"), 7);
        assert!(text.contains("# TYPE edgerelay_media_fanout_delay_seconds histogram"));
        assert!(text.contains("edgerelay_media_fanout_delay_seconds_count 7"));
        assert!(text.contains("edgerelay_media_fanout_delay_seconds_sum 0.41018"));
    }

    #[test]
    fn a_pass_that_sent_several_packets_counts_each() {
        let h = DelayHistogram::default();
        h.observe_n(Duration::from_micros(300), 7);
        h.observe_n(Duration::from_millis(20), 3);
        let (cumulative, sum, count) = h.snapshot();
        assert_eq!(count, 10);
        assert!((sum - (7.0 * 0.0003 + 3.0 * 0.02)).abs() < 1e-9, "{sum}");
        let at = |le: f64| cumulative[FANOUT_DELAY_BUCKETS.iter().position(|&b| b == le).unwrap()];
        assert_eq!((at(0.0002), at(0.0003), at(0.01), at(0.025)), (0, 7, 7, 10));
    }
}
