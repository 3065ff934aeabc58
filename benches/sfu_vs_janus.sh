#!/usr/bin/env bash
# Side-by-side fan-out benchmark: edgerelay vs the Janus streaming plugin.
#
# One H.264 stream (2 Mbit/s, 30 fps, 1280x720, the built-in publisher's OpenH264
# encoder, encoded once into a loop by `edgerelay loadtest`'s source) goes to N viewers
# through edgerelay (WHIP in, WHEP out) and through Janus (plain RTP into a streaming
# mountpoint, viewers via Janus's HTTP API). The same client (`edgerelay loadtest`, str0m
# peers in RTP mode) measures both. Each server runs alone, in a network namespace
# joined to the host by a veth pair (Janus needs a non-loopback interface; edgerelay
# runs the same way so both pay the same network path). For each N the script prints
# the loadtest tables and one line
#   RESULT n=... edgerelay_us_per_pkt=... janus_us_per_pkt=... ratio=... edgerelay_loss_pct=... janus_loss_pct=...
#
# Needs root (namespaces). Installs janus (and python3) via apt if missing.
# Environment: NS_LIST="50 200 500", STEADY=20 (measured seconds), JOIN_RATE=50,
# EDGERELAY_BIN=path (default: cargo build --release), JANUS_EVENT_LOOPS (unset: Janus
# default, one thread per handle), KEEP_TMP=1 to keep the logs.
# On a 2-core machine the load generator shares the CPU with the server under test.
set -euo pipefail

NS_LIST=${NS_LIST:-"50 200 500"}
STEADY=${STEADY:-20}
JOIN_RATE=${JOIN_RATE:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "sfu_vs_janus.sh: needs root (network namespace)" >&2
  exit 1
fi
need_apt=()
command -v janus >/dev/null || need_apt+=(janus)
command -v python3 >/dev/null || need_apt+=(python3)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} via apt" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
JANUS_LIB=$(dirname "$(dirname "$(find /usr/lib -name libjanus_streaming.so -print -quit)")")
[ -d "$JANUS_LIB/plugins" ] || { echo "janus streaming plugin not found" >&2; exit 1; }

if [ -z "${EDGERELAY_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin edgerelay >&2)
  EDGERELAY_BIN="$ROOT/target/release/edgerelay"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TAG=$$
NS=erb$TAG
VH=erbh$TAG
VN=erbn$TAG
OCT=$((TAG % 200 + 20))
HOST_IP=10.213.$OCT.1
NS_IP=10.213.$OCT.2
TMP=$(mktemp -d /tmp/sfu_vs_janus.XXXXXX)
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true
  done
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VH" 2>/dev/null || true
  if [ -z "${KEEP_TMP:-}" ]; then rm -rf "$TMP"; else echo "logs kept in $TMP" >&2; fi
}
trap cleanup EXIT INT TERM

ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VH"
ip link set "$VH" up
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$VN"
ip netns exec "$NS" ip link set "$VN" up

# Janus configuration (only the HTTP transport and the streaming plugin).
JCFG=$TMP/janus
JPORT=$((18000 + TAG % 1000))
RTP_PORT=$((19000 + TAG % 1000))
mkdir -p "$JCFG"
{
  echo "general: {"
  echo "  configs_folder = \"$JCFG\""
  echo "  plugins_folder = \"$JANUS_LIB/plugins\""
  echo "  transports_folder = \"$JANUS_LIB/transports\""
  echo "  events_folder = \"$JANUS_LIB/events\""
  echo "  loggers_folder = \"$JANUS_LIB/loggers\""
  echo "  debug_level = 2"
  echo "  session_timeout = 60"
  [ -n "${JANUS_EVENT_LOOPS:-}" ] && echo "  event_loops = $JANUS_EVENT_LOOPS"
  echo "}"
  echo "media: { ipv6 = false rtp_port_range = \"30000-39999\" }"
  echo "nat: { ice_enforce_list = \"$VN\" }"
  echo "plugins: { disable = \"libjanus_audiobridge.so,libjanus_echotest.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_videoroom.so,libjanus_voicemail.so,libjanus_lua.so,libjanus_duktape.so\" }"
  echo "transports: { disable = \"libjanus_websockets.so,libjanus_pfunix.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_rabbitmq.so\" }"
  echo "events: { broadcast = false }"
  echo "loggers: { disable = \"libjanus_jsonlog.so\" }"
} >"$JCFG/janus.jcfg"
cat >"$JCFG/janus.transport.http.jcfg" <<EOF
general: {
  json = "plain"
  base_path = "/janus"
  http = true
  port = $JPORT
  ip = "$NS_IP"
  https = false
}
admin: {
  admin_http = false
}
EOF
cat >"$JCFG/janus.plugin.streaming.jcfg" <<EOF
general: {
}
bench: {
  type = "rtp"
  id = 1
  description = "edgerelay bench: H.264 2 Mbit/s 30 fps"
  audio = false
  video = true
  videoport = $RTP_PORT
  videopt = 96
  videocodec = "h264"
  videofmtp = "profile-level-id=42e01f;packetization-mode=1"
}
EOF

LOOP_CACHE=$TMP/loop.bin
COMMON=(--join-rate "$JOIN_RATE" --seconds "$STEADY" --json --source-cache "$LOOP_CACHE"
        --source-bitrate-kbps 2000 --source-fps 30 --source-width 1280 --source-height 720)

start_edge() {
  ip netns exec "$NS" "$EDGERELAY_BIN" edge --http-listen "$NS_IP:0" --media-listen "$NS_IP:0" \
    --public-ip "$NS_IP" --publisher-token bench-pub --viewer-token bench-view \
    >"$TMP/edge.out" 2>"$TMP/edge.log" &
  EDGE_PID=$!
  PIDS+=("$EDGE_PID")
  for _ in $(seq 1 100); do
    grep -q EDGERELAY_READY "$TMP/edge.out" 2>/dev/null && break
    sleep 0.1
  done
  EDGE_HTTP=$(sed -n 's/.*EDGERELAY_READY http=\([^ ]*\).*/\1/p' "$TMP/edge.out" | head -1)
  EDGE_HTTP=${EDGE_HTTP%/}
  [ -n "$EDGE_HTTP" ] || { echo "edge did not start" >&2; cat "$TMP/edge.log" >&2; exit 1; }
}

start_janus() {
  ip netns exec "$NS" janus -F "$JCFG" -C "$JCFG/janus.jcfg" -N >"$TMP/janus.log" 2>&1 &
  JANUS_PID=$!
  PIDS+=("$JANUS_PID")
  for _ in $(seq 1 100); do
    curl -fsS "http://$NS_IP:$JPORT/janus/info" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "janus did not start" >&2
  tail -20 "$TMP/janus.log" >&2
  exit 1
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

echo "# sfu_vs_janus: $(date -u +%F) nproc=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')\" janus=$(janus --version 2>/dev/null | head -1 | sed 's/.*(\(.*\))/\1/')"
echo "# N in: $NS_LIST; steady phase ${STEADY}s; join rate ${JOIN_RATE}/s"
RESULTS=()
for N in $NS_LIST; do
  start_edge
  echo "## edgerelay, N=$N" >&2
  "$EDGERELAY_BIN" loadtest --whep "$EDGE_HTTP/whep/bench" --token bench-view \
    --source-whip "$EDGE_HTTP/whip/bench" --source-token bench-pub \
    --viewers "$N" --server-pid "$EDGE_PID" --label edgerelay "${COMMON[@]}" \
    >"$TMP/edgerelay_$N.json" 2>"$TMP/edgerelay_$N.log" || { tail -5 "$TMP/edgerelay_$N.log" >&2; exit 1; }
  stop_pid "$EDGE_PID"

  start_janus
  echo "## janus, N=$N" >&2
  "$EDGERELAY_BIN" loadtest --janus "http://$NS_IP:$JPORT/janus" --janus-mountpoint 1 \
    --source-rtp "$NS_IP:$RTP_PORT" \
    --viewers "$N" --server-pid "$JANUS_PID" --label janus "${COMMON[@]}" \
    >"$TMP/janus_$N.json" 2>"$TMP/janus_$N.log" || { tail -5 "$TMP/janus_$N.log" >&2; exit 1; }
  stop_pid "$JANUS_PID"

  OUT=$(python3 - "$N" "$TMP/edgerelay_$N.json" "$TMP/janus_$N.json" <<'EOF'
import json, sys
n = sys.argv[1]
e = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
j = json.loads(open(sys.argv[3]).read().strip().splitlines()[-1])
def g(r, k, sub=None):
    v = r.get(k)
    if sub is not None and isinstance(v, dict):
        v = v.get(sub)
    return v
rows = [
    ("viewers receiving (steady)", "viewers_receiving_steady", None),
    ("join failures", "join_failures", None),
    ("us CPU per forwarded packet", "us_per_pkt", None),
    ("server CPU %", "server_cpu_pct", None),
    ("packets/s delivered", "packets_per_second", None),
    ("loss %", "loss_pct", None),
    ("delay p50 ms", "delay_ms", "p50"),
    ("delay p99 ms", "delay_ms", "p99"),
    ("join->first RTP p50 ms", "join_ms_first_rtp", "p50"),
    ("join->first RTP p99 ms", "join_ms_first_rtp", "p99"),
    ("join->keyframe complete p50 ms", "join_ms_keyframe_complete", "p50"),
    ("join->keyframe complete p99 ms", "join_ms_keyframe_complete", "p99"),
    ("RSS growth per viewer KiB", "rss_kb_per_viewer", None),
]
out = [f"### N={n}", f"{'':34} {'edgerelay':>12} {'janus':>12} {'ratio':>8}"]
for name, k, sub in rows:
    a, b = g(e, k, sub), g(j, k, sub)
    r = f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
    out.append(f"{name:34} {str(a):>12} {str(b):>12} {r:>8}")
eu, ju = e.get("us_per_pkt"), j.get("us_per_pkt")
ratio = f"{eu / ju:.3f}" if eu and ju else "nan"
print("\n".join(out))
print(f"RESULT n={n} edgerelay_us_per_pkt={eu} janus_us_per_pkt={ju} ratio={ratio} "
      f"edgerelay_loss_pct={e.get('loss_pct')} janus_loss_pct={j.get('loss_pct')} "
      f"edgerelay_delay_p99_ms={g(e, 'delay_ms', 'p99')} janus_delay_p99_ms={g(j, 'delay_ms', 'p99')} "
      f"edgerelay_join_p99_ms={g(e, 'join_ms_keyframe_complete', 'p99')} janus_join_p99_ms={g(j, 'join_ms_keyframe_complete', 'p99')}")
EOF
)
  echo "$OUT" | grep -v '^RESULT'
  echo "# edgerelay json: $(tail -1 "$TMP/edgerelay_$N.json")"
  echo "# janus json: $(tail -1 "$TMP/janus_$N.json")"
  RESULTS+=("$(echo "$OUT" | grep '^RESULT')")
done
for r in "${RESULTS[@]}"; do echo "$r"; done
