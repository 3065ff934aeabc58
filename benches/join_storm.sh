#!/usr/bin/env bash
# Join storm: N viewers join one room of one edge (loopback) at JOIN_RATE per second
# (default 1000 within 5 s), then a steady phase. The bench source publishes the cached
# 2 Mbit/s 30 fps H.264 loop (GOP 2 s) first, so the edge has a keyframe cached.
# Reports how many viewers got a complete first keyframe, join -> first complete
# keyframe p50/p99/max, and the keyframe requests the publisher saw during ramp + steady
# (edge counters `edgerelay_keyframe_requests_upstream_total` / `_answered_by_cache_total`
# and the source's own count, with the most requests within any 300 ms), then
#   RESULT n=.. held=.. keyframe_complete=.. join_kf_p50_ms=.. join_kf_p99_ms=.. join_kf_max_ms=..
#          upstream_kf_requests=.. budget_300ms=.. source_kf_max_per_300ms=.. ramp_s=.. loss_pct=..
#
# Environment: N=1000, JOIN_RATE=200, STEADY=10, THREADS (swarm threads, default: CPUs),
# BITRATE_KBPS=2000, SFU_EXTRA (extra [sfu] lines, e.g. "bwe = false"), EDGE_ARGS (extra edge
# flags, e.g. "--media-threads 2 --span-viewers 256"), EDGERELAY_BIN (default: cargo build --release). Loopback only;
# bounded in time. On a 2-core machine the generator shares the CPU with the edge: read
# `held` (viewers receiving in the steady phase) and loss before trusting the timings.
set -euo pipefail

N=${N:-1000}
JOIN_RATE=${JOIN_RATE:-200}
STEADY=${STEADY:-10}
BITRATE_KBPS=${BITRATE_KBPS:-2000}
# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init storm

cat > "$TMP/edge.toml" <<TOML
[node]
id = "join-storm"
[http]
listen = "127.0.0.1:0"
[auth]
publisher_tokens = ["js-publisher-token"]
viewer_tokens = ["js-viewer-token"]
[sfu]
max_viewers_per_room = $((N + 10))
${SFU_EXTRA:-}
TOML
# shellcheck disable=SC2086 # EDGE_ARGS is a list of flags
start_edge "$TMP/edge.toml" --public-ip 127.0.0.1 ${EDGE_ARGS:-}

threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")
timeout $((STEADY + N / JOIN_RATE + 150)) "$EDGERELAY_BIN" loadtest \
  --whep "$HTTP/whep/storm" --token js-viewer-token --viewers "$N" --join-rate "$JOIN_RATE" \
  --seconds "$STEADY" --settle-seconds 1 --server-pid "$EDGE_PID" "${threads[@]}" \
  --source-whip "$HTTP/whip/storm" --source-token js-publisher-token \
  --source-bitrate-kbps "$BITRATE_KBPS" \
  --source-cache "$TMP/source-$BITRATE_KBPS.cache" --json >"$TMP/result.json" 2>"$TMP/loadtest.err" || true
# RESULT_JSON=path keeps the full loadtest report.
[ -z "${RESULT_JSON:-}" ] || cp "$TMP/result.json" "$RESULT_JSON" 2>/dev/null || true

python3 - "$TMP/result.json" "$N" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"RESULT n={sys.argv[2]} error={e!r}")
    sys.exit(0)
kc = r["join_ms_keyframe_complete"]
jc = r.get("join_ms_connected") or {}
ja = r.get("join_ms_answered") or {}
kf = r.get("keyframe_requests_edge") or {}
print(json.dumps({k: r[k] for k in (
    "viewers", "viewers_received_any", "viewers_receiving_steady", "join_failures",
    "join_failure_sample", "ramp_seconds", "keyframe_window_seconds",
    "join_ms_answered", "join_ms_connected", "join_ms_first_rtp", "join_ms_first_keyframe", "join_ms_keyframe_complete",
    "keyframe_requests_edge", "edge_counters_delta", "keyframe_requests_at_source",
    "keyframe_requests_at_source_max_per_300ms", "keyframe_requests_at_source_min_gap_ms",
    "loss_pct", "server_cpu_pct", "client_cpu_pct", "us_per_pkt")}, indent=1))
print(f"RESULT n={r['viewers']} held={r['viewers_receiving_steady']} "
      f"keyframe_complete={r['viewers_keyframe_complete']} join_kf_p50_ms={kc['p50']} "
      f"join_kf_p99_ms={kc['p99']} join_kf_max_ms={kc['max']} "
      f"join_answer_p99_ms={ja.get('p99')} join_connected_p50_ms={jc.get('p50')} "
      f"join_connected_p99_ms={jc.get('p99')} "
      f"upstream_kf_requests={kf.get('upstream')} answered_by_cache={kf.get('answered_by_cache')} "
      f"budget_300ms={r['keyframe_requests_upstream_budget_300ms']} "
      f"source_kf_requests={r['keyframe_requests_at_source']} "
      f"source_kf_max_per_300ms={r['keyframe_requests_at_source_max_per_300ms']} "
      f"starts_from_cache={(r.get('edge_counters_delta') or {}).get('viewer_starts_from_cache')} "
      f"video_pauses={(r.get('edge_counters_delta') or {}).get('video_pauses')} "
      f"ramp_s={r['ramp_seconds']} loss_pct={r['loss_pct']} join_failures={r['join_failures']}")
PY
