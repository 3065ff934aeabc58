#!/usr/bin/env bash
# Relayed vs direct viewers: one edge with the built-in TURN server enabled on loopback,
# the same cached 2 Mbit/s H.264 stream, and two `edgerelay loadtest` runs side by side:
# N direct viewers, then N viewers that reach the edge only through its TURN server
# (`--relay udp`: Allocate, ChannelBind, ChannelData; str0m offers only the relayed
# candidate). Server CPU is the edge process's (all threads), so it includes the TURN
# thread's work. Prints
#   RESULT mode=direct|relay n=.. us_per_pkt=.. loss_pct=.. server_cpu_pct=.. rss_kb_per_viewer=..
#   MEDIAN direct=.. relay=..
#   RATIO relay/direct=..
#
# Environment: N=200 (viewers), STEADY=15 (measured seconds), JOIN_RATE=50, ROUNDS=1
# (direct and relay alternate per round; the ratio is of the medians),
# MODES="direct relay" (e.g. MODES=relay STEADY=330 checks TURN refreshes on a long run),
# EDGE_ARGS (extra edge flags, e.g. "--media-threads 2 --span-viewers 1": relayed viewers
# on a room spanning threads), EDGERELAY_BIN (default: cargo build --release). Loopback only;
# bounded in time.
# The bench config raises the TURN allocation caps (generous for many viewers on one
# host; each viewer now gets a REST user of its own); nothing else differs from the
# defaults. The SFU is a peer the TURN server always allows (in-process hand-off), so no
# loopback-peer exception is needed.
set -euo pipefail

N=${N:-200}
STEADY=${STEADY:-15}
JOIN_RATE=${JOIN_RATE:-50}
# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init relay

cat > "$TMP/edge.toml" <<TOML
[node]
id = "relay-bench"
[http]
listen = "127.0.0.1:0"
[auth]
publisher_tokens = ["rb-publisher-token"]
viewer_tokens = ["rb-viewer-token"]
[turn]
enabled = true
[turn.server]
listen_udp = ["127.0.0.1:0"]
listen_tcp = []
relay_ip = "127.0.0.1"
relay_port_min = 0
relay_port_max = 0
max_allocations_per_user = $((N * ${ROUNDS:-1} + 16))
max_allocations = $((N * ${ROUNDS:-1} + 64))
TOML
# shellcheck disable=SC2086 # EDGE_ARGS is a list of flags
start_edge "$TMP/edge.toml" --public-ip 127.0.0.1 ${EDGE_ARGS:-}

run_mode() {
  local mode=$1 round=$2 extra=()
  [ "$mode" = relay ] && extra=(--relay udp)
  # Each run publishes its own room, so the runs do not share state.
  timeout $((STEADY + N / JOIN_RATE + 120)) "$EDGERELAY_BIN" loadtest \
    --whep "$HTTP/whep/$mode-$round" --token rb-viewer-token --viewers "$N" --join-rate "$JOIN_RATE" \
    --seconds "$STEADY" --server-pid "$EDGE_PID" "${extra[@]}" \
    --source-whip "$HTTP/whip/$mode-$round" --source-token rb-publisher-token \
    --source-cache "$TMP/source.cache" --json >"$TMP/$mode.json" 2>"$TMP/$mode.err" || true
  # RESULT_JSON=prefix keeps the full reports (prefix-direct.json, prefix-relay.json: last round).
  [ -z "${RESULT_JSON:-}" ] || cp "$TMP/$mode.json" "$RESULT_JSON-$mode.json" 2>/dev/null || true
  python3 - "$TMP/$mode.json" "$mode" "$N" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"RESULT mode={sys.argv[2]} n={sys.argv[3]} error={e!r}")
    sys.exit(0)
print(f"RESULT mode={sys.argv[2]} n={sys.argv[3]} us_per_pkt={r['us_per_pkt']} "
      f"loss_pct={r['loss_pct']} server_cpu_pct={r['server_cpu_pct']} "
      f"rss_kb_per_viewer={r['rss_kb_per_viewer']} receiving={r['viewers_receiving_steady']} "
      f"join_failures={r['join_failures']} turn_errors={r.get('turn_errors')} "
      f"client_cpu_pct={r['client_cpu_pct']}")
if r.get("join_failure_sample"):
    print(f"  first join failure: {r['join_failure_sample']}")
PY
}

# Modes alternate within each round (the machine's noise hits both alike).
for round in $(seq "${ROUNDS:-1}"); do
  for mode in ${MODES:-direct relay}; do
    run_mode "$mode" "$round"
  done
done | tee "$TMP/results"
# The TURN counters, as a check that media really went through it.
curl -s "$HTTP/metrics" | grep -E '^edgerelay_(turn_(allocations|relayed_packets_total|media_sends_total|handoff_out_total)|address_takeovers_total)' || true

python3 - "$TMP/results" <<'PY'
import re, sys
import statistics
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"RESULT mode=(\S+) n=\S+ us_per_pkt=([0-9.]+)", line)
    if m:
        rows.setdefault(m.group(1), []).append(float(m.group(2)))
rows = {k: statistics.median(v) for k, v in rows.items()}
if "direct" in rows and "relay" in rows and rows["direct"] > 0:
    print(f"MEDIAN direct={rows['direct']:.3f} relay={rows['relay']:.3f}")
    print(f"RATIO relay/direct={rows['relay'] / rows['direct']:.2f}")
else:
    print("RATIO relay/direct=unavailable")
PY
