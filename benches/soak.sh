#!/usr/bin/env bash
# Memory soak: N direct viewers of the cached 2 Mbit/s H.264 stream on one edge
# (loopback) for a long steady phase; the load generator samples the edge's RSS every
# RSS_INTERVAL seconds and reports RSS per viewer at the start and the end of the steady
# phase and the least-squares slope over all samples. Prints
#   RESULT n=.. seconds=.. rss_kb_per_viewer_start=.. rss_kb_per_viewer_end=..
#          rss_slope_kib_per_min=.. us_per_pkt=.. loss_pct=..
# ("per viewer" = (RSS - RSS before any viewer joined) / viewers receiving).
#
# Environment: N=200, SECONDS=600 (steady seconds; SOAK_SECONDS also works),
# JOIN_RATE=50, RSS_INTERVAL=10, EDGE_ARGS (extra edge flags, e.g. "--media-threads 2
# --span-viewers 1"), EDGERELAY_BIN (default: cargo build --release).
# Loopback only; bounded in time.
# SECONDS is bash's own counter (it starts at the value exported to the script), so
# read it first thing.
DURATION=${SOAK_SECONDS:-$SECONDS}
[ "$DURATION" -ge 5 ] 2>/dev/null || DURATION=600
set -euo pipefail

N=${N:-200}
JOIN_RATE=${JOIN_RATE:-50}
RSS_INTERVAL=${RSS_INTERVAL:-10}
# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init soak

cat > "$TMP/edge.toml" <<TOML
[node]
id = "soak"
[http]
listen = "127.0.0.1:0"
[auth]
publisher_tokens = ["soak-publisher-token"]
viewer_tokens = ["soak-viewer-token"]
TOML
# shellcheck disable=SC2086 # EDGE_ARGS is a list of flags
start_edge "$TMP/edge.toml" --public-ip 127.0.0.1 ${EDGE_ARGS:-}

timeout $((DURATION + N / JOIN_RATE + 120)) "$EDGERELAY_BIN" loadtest \
  --whep "$HTTP/whep/soak" --token soak-viewer-token --viewers "$N" --join-rate "$JOIN_RATE" \
  --seconds "$DURATION" --rss-interval "$RSS_INTERVAL" --server-pid "$EDGE_PID" \
  --source-whip "$HTTP/whip/soak" --source-token soak-publisher-token \
  --source-cache "$TMP/source.cache" --json >"$TMP/result.json" 2>"$TMP/loadtest.err" || true
# RESULT_JSON=path keeps the full loadtest report.
[ -z "${RESULT_JSON:-}" ] || cp "$TMP/result.json" "$RESULT_JSON" 2>/dev/null || true

python3 - "$TMP/result.json" "$N" "$DURATION" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"RESULT n={sys.argv[2]} seconds={sys.argv[3]} error={e!r}")
    sys.exit(0)
print(f"RESULT n={r['viewers']} receiving={r['viewers_receiving_steady']} seconds={r['steady_seconds']} "
      f"rss_kb_before={r['rss_kb_before']} rss_kb_start={r['rss_kb_steady_start']} "
      f"rss_kb_end={r['rss_kb_steady_end']} "
      f"rss_kb_per_viewer_start={r['rss_kb_per_viewer_steady_start']} "
      f"rss_kb_per_viewer_end={r['rss_kb_per_viewer_steady_end']} "
      f"rss_slope_kib_per_min={r['rss_slope_kib_per_min']} "
      f"rss_slope_kib_per_min_second_half={r.get('rss_slope_kib_per_min_second_half')} samples={r['rss_samples']} "
      f"us_per_pkt={r['us_per_pkt']} loss_pct={r['loss_pct']}")
print("SERIES minutes:rss_kb " + " ".join(f"{m}:{kb:.0f}" for m, kb in r.get("rss_series_min_kb") or []))
PY
