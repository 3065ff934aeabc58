#!/usr/bin/env bash
# Before/after A/B of two edgerelay builds: the same loadtest client (BIN_B's) against an
# edge from BIN_A ("before") and one from BIN_B ("after"), alternating A, B, A, B... on
# loopback, same cached 2 Mbit/s H.264 source, default edge configuration. Prints
#   RESULT build=A|B round=.. n=.. us_per_pkt=.. loss_pct=.. rss_kb_per_viewer=.. server_cpu_pct=..
#   MEDIAN build=.. us_per_pkt=.. rss_kb_per_viewer=..
#   RATIO after/before us_per_pkt=.. rss_kb_per_viewer=..
#
# Build "before" from an older commit, e.g.
#   git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release --bin edgerelay)
#   BIN_A=/tmp/before/target/release/edgerelay BIN_B=target/release/edgerelay N=200 benches/binary_ab.sh
# Environment: BIN_A, BIN_B (required), N=200, ROUNDS=2, STEADY=15, JOIN_RATE=50,
# LOADTEST_ARGS (extra loadtest options for every round, e.g. "--receiver-gro": the
# loopback viewers take UDP GRO, so less of the edge's CPU is their delivery and a change
# to the edge's own work shows more clearly).
# Loopback only; bounded in time.
set -euo pipefail

: "${BIN_A:?set BIN_A (before)}"
: "${BIN_B:?set BIN_B (after)}"
N=${N:-200}
ROUNDS=${ROUNDS:-2}
read -r -a EXTRA <<<"${LOADTEST_ARGS:-}"
STEADY=${STEADY:-15}
JOIN_RATE=${JOIN_RATE:-50}
EDGERELAY_BIN=$BIN_B
# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init binab

run_one() {
  local label=$1 bin=$2 round=$3 dir="$TMP/$1-$3"
  mkdir -p "$dir"
  cat > "$dir/edge.toml" <<TOML
[node]
id = "ab-$label"
[http]
listen = "127.0.0.1:0"
[auth]
publisher_tokens = ["ab-publisher-token"]
viewer_tokens = ["ab-viewer-token"]
TOML
  EDGE_BIN=$bin start_edge "$dir/edge.toml"
  timeout $((STEADY + N / JOIN_RATE + 90)) "$BIN_B" loadtest \
    --whep "$HTTP/whep/bench" --token ab-viewer-token --viewers "$N" --join-rate "$JOIN_RATE" \
    --seconds "$STEADY" --server-pid "$EDGE_PID" "${EXTRA[@]}" \
    --source-whip "$HTTP/whip/bench" --source-token ab-publisher-token \
    --source-cache "$TMP/source.cache" --json >"$dir/result.json" 2>"$dir/loadtest.err" || true
  stop_edge
  python3 - "$dir/result.json" "$label" "$round" "$N" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(f"RESULT build={sys.argv[2]} round={sys.argv[3]} n={sys.argv[4]} us_per_pkt={r['us_per_pkt']} "
          f"loss_pct={r['loss_pct']} rss_kb_per_viewer={r['rss_kb_per_viewer']} "
          f"server_cpu_pct={r['server_cpu_pct']}")
except Exception as e:
    print(f"RESULT build={sys.argv[2]} round={sys.argv[3]} n={sys.argv[4]} error={e!r}")
PY
}

{
  for round in $(seq "$ROUNDS"); do
    run_one A "$BIN_A" "$round"
    run_one B "$BIN_B" "$round"
  done
} | tee "$TMP/results"

python3 - "$TMP/results" <<'PY'
import re, statistics, sys
vals = {}
for line in open(sys.argv[1]):
    m = re.match(r"RESULT build=(\S+) .* us_per_pkt=(\S+) loss_pct=\S+ rss_kb_per_viewer=(\S+)", line)
    if m:
        vals.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))
med = {}
for b, v in sorted(vals.items()):
    med[b] = (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
    print(f"MEDIAN build={b} us_per_pkt={med[b][0]:.3f} rss_kb_per_viewer={med[b][1]:.1f}")
if "A" in med and "B" in med and med["A"][0] > 0 and med["A"][1] > 0:
    print(f"RATIO after/before us_per_pkt={med['B'][0] / med['A'][0]:.2f} "
          f"rss_kb_per_viewer={med['B'][1] / med['A'][1]:.2f}")
PY
