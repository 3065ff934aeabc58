//! Prometheus metrics of the edge. The media thread keeps plain counters; they
//! are copied into the `metrics` registry when `/metrics` is scraped, so the
//! packet path never touches the registry.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use edgerelay_sfu::SfuError;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::media::Shared;

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
            c("edgerelay_datagrams_in_total", s.datagrams_in);
            c("edgerelay_bytes_in_total", s.bytes_in);
            c("edgerelay_datagrams_out_total", s.datagrams_out);
            c("edgerelay_bytes_out_total", s.bytes_out);
            c("edgerelay_rtp_packets_in_total", s.rtp_in);
            c("edgerelay_rtp_packets_out_total", s.rtp_out);
            c("edgerelay_keyframes_in_total", s.keyframes_in);
            c(
                "edgerelay_keyframe_requests_from_viewers_total",
                s.keyframe_requests_from_viewers,
            );
            c(
                "edgerelay_keyframe_requests_upstream_total",
                s.keyframe_requests_upstream,
            );
            c(
                "edgerelay_keyframe_requests_merged_total",
                s.keyframe_requests_merged,
            );
            c(
                "edgerelay_keyframe_requests_answered_by_cache_total",
                s.keyframe_requests_answered_by_cache,
            );
            c(
                "edgerelay_viewer_starts_from_cache_total",
                s.viewer_starts_from_cache,
            );
            c("edgerelay_packets_replayed_total", s.packets_replayed);
            c("edgerelay_input_forwarded_total", s.input_forwarded);
            c(
                "edgerelay_input_dropped_spectator_total",
                s.input_dropped_spectator,
            );
            c("edgerelay_data_to_viewers_total", s.data_to_viewers);
            c("edgerelay_video_pauses_total", s.video_pauses);
            c("edgerelay_video_resumes_total", s.video_resumes);
            let d = |reason: &'static str, v: u64| {
                counter!("edgerelay_dropped_packets_total", "reason" => reason).absolute(v)
            };
            d("unknown_source", s.dropped_unknown_source);
            d("malformed", s.dropped_malformed);
            d("unknown_stream", s.dropped_unknown_stream);
            d("no_codec", s.dropped_no_codec);
            d("paused", s.dropped_paused);
            d("data_channel_full", s.data_dropped);
            d("send_error", shared.send_errors.load(Ordering::Relaxed));
            c(
                "edgerelay_media_loop_iterations_total",
                shared.loop_iterations.load(Ordering::Relaxed),
            );
            c(
                "edgerelay_media_receive_calls_total",
                shared.receive_calls.load(Ordering::Relaxed),
            );
            c(
                "edgerelay_media_datagrams_received_total",
                shared.datagrams_received.load(Ordering::Relaxed),
            );
            c(
                "edgerelay_turn_handoff_in_total",
                shared.relayed_in.load(Ordering::Relaxed),
            );
            c(
                "edgerelay_turn_handoff_out_total",
                shared.relayed_out.load(Ordering::Relaxed),
            );
        }
        let rooms = shared.rooms.lock().map(|r| r.len()).unwrap_or(0);
        gauge!("edgerelay_rooms").set(rooms as f64);
        gauge!("edgerelay_viewers").set(shared.viewers.load(Ordering::Relaxed) as f64);
        gauge!("edgerelay_peers").set(shared.peers.load(Ordering::Relaxed) as f64);
        self.handle.render()
    }
}
