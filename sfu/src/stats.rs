//! Counters kept by the core with plain integer adds; the driver exports them as metrics.

/// Adds `$other`'s counters into `$self`, field by field.
macro_rules! add_fields {
    ($self:ident, $other:ident, $($f:ident),* $(,)?) => { $( $self.$f += $other.$f; )* };
}

/// Monotonic counters since start.
#[derive(Debug, Default, Clone)]
pub struct SfuStats {
    /// Datagrams accepted by a peer.
    pub datagrams_in: u64,
    /// Bytes of accepted datagrams.
    pub bytes_in: u64,
    /// Datagrams handed to the driver.
    pub datagrams_out: u64,
    /// Bytes handed to the driver.
    pub bytes_out: u64,
    /// RTP packets received from publishers.
    pub rtp_in: u64,
    /// RTP packets written to viewers.
    pub rtp_out: u64,
    /// Keyframes that started a new cached GOP.
    pub keyframes_in: u64,
    /// Keyframe requests received from viewers.
    pub keyframe_requests_from_viewers: u64,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests_upstream: u64,
    /// Viewer requests merged into one already in flight.
    pub keyframe_requests_merged: u64,
    /// Viewer requests answered by the GOP cache.
    pub keyframe_requests_answered_by_cache: u64,
    /// Viewers started from the GOP cache.
    pub viewer_starts_from_cache: u64,
    /// Cached packets replayed to viewers.
    pub packets_replayed: u64,
    /// Slices the replays were written in (each at most a send queue's worth).
    pub replay_slices: u64,
    /// Datagrams from an address no peer owns.
    pub dropped_unknown_source: u64,
    /// Datagrams str0m rejected or could not parse.
    pub dropped_malformed: u64,
    /// RTP of a stream the room does not forward.
    pub dropped_unknown_stream: u64,
    /// RTP whose codec the viewer did not negotiate.
    pub dropped_no_codec: u64,
    /// Video not sent to a viewer paused for bandwidth.
    pub dropped_paused: u64,
    /// Controller input forwarded to the publisher.
    pub input_forwarded: u64,
    /// Spectator input dropped.
    pub input_dropped_spectator: u64,
    /// Publisher data-channel messages fanned out.
    pub data_to_viewers: u64,
    /// Data-channel writes that did not fit the buffer.
    pub data_dropped: u64,
    /// Viewers paused for bandwidth.
    pub video_pauses: u64,
    /// Viewers resumed.
    pub video_resumes: u64,
    /// str0m timeouts due within a few microseconds served without the timer heap.
    pub immediate_reticks: u64,
    /// RTP packets sealed and sent by the direct send path.
    pub direct_out: u64,
    /// Direct-path packets sent through str0m instead (sender-report sync, header
    /// extension values).
    pub direct_sync: u64,
    /// Direct-path packets that fell back to str0m (no route, SSRC or seal).
    pub direct_fallbacks: u64,
    /// Viewers that could not use the direct path (no keys, unknown SRTP profile).
    pub direct_unavailable: u64,
    /// Sequence numbers viewers reported lost (direct path).
    pub nacked: u64,
    /// Of those, resent.
    pub direct_resends: u64,
    /// Of those, not resent: no longer known or cached.
    pub nack_unanswered: u64,
    /// Of those, not resent: over the viewer's resend budget.
    pub resends_capped: u64,
    /// Packets not forwarded to a direct-path viewer because it had them already
    /// (the publisher sent one twice).
    pub dropped_duplicate: u64,
    /// Fan-outs paused after one slice to let the driver send (a batch to more
    /// viewers than one slice covers), to go on at the next poll.
    pub fanout_slices: u64,
    /// Addresses a new session took over from another (stale) one that still held
    /// them: a NAT reusing a port, a client restarting within the ICE timeout.
    pub address_takeovers: u64,
    /// Publisher packets copied out to other media threads' mirrors of a room
    /// (counted once per packet, however many mirrors take it).
    pub feed_packets_out: u64,
    /// Packets a mirror room took from its home thread's feed.
    pub feed_packets_in: u64,
    /// Feed packets dropped: no such mirror room here any more, or too many layers.
    pub feed_packets_dropped: u64,
    /// Keyframe requests a mirror room passed to its home thread (before the
    /// home's own throttle, which `keyframe_requests_upstream` counts after).
    pub keyframe_requests_to_home: u64,
    /// Video frames a room held until their last packet and sent whole
    /// ([`SfuConfig::gather`](crate::SfuConfig::gather)); frames that arrived in
    /// one piece are not counted.
    pub frames_gathered: u64,
    /// Holds released at their deadline, before the frame's last packet (a
    /// publisher that paces a frame over longer than the window).
    pub gather_expired: u64,
    /// Holds released by a packet of a later frame: the marker never came (lost,
    /// or a sender that never sets it); that layer stops holding for a second.
    pub gather_cut: u64,
    /// Holds released because they were full (a large keyframe).
    pub gather_full: u64,
}

impl SfuStats {
    /// Adds another core's counters (the edge runs one core per media thread).
    pub fn add(&mut self, o: &SfuStats) {
        add_fields!(
            self,
            o,
            datagrams_in,
            bytes_in,
            datagrams_out,
            bytes_out,
            rtp_in,
            rtp_out,
            keyframes_in,
            keyframe_requests_from_viewers,
            keyframe_requests_upstream,
            keyframe_requests_merged,
            keyframe_requests_answered_by_cache,
            viewer_starts_from_cache,
            packets_replayed,
            replay_slices,
            dropped_unknown_source,
            dropped_malformed,
            dropped_unknown_stream,
            dropped_no_codec,
            dropped_paused,
            input_forwarded,
            input_dropped_spectator,
            data_to_viewers,
            data_dropped,
            video_pauses,
            video_resumes,
            immediate_reticks,
            direct_out,
            direct_sync,
            direct_fallbacks,
            direct_unavailable,
            nacked,
            direct_resends,
            nack_unanswered,
            resends_capped,
            dropped_duplicate,
            fanout_slices,
            address_takeovers,
            feed_packets_out,
            feed_packets_in,
            feed_packets_dropped,
            keyframe_requests_to_home,
            frames_gathered,
            gather_expired,
            gather_cut,
            gather_full,
        );
    }
}
