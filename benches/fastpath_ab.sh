#!/usr/bin/env bash
# Fast-path A/B: the same edgerelay binary in several media configurations, side by
# side in one run, against the same client (`edgerelay loadtest`) and the same cached
# 2 Mbit/s H.264 stream, on loopback. For each variant it prints the loadtest figures and
# one line
#   RESULT variant=... n=... receiving=... join_failures=... us_per_pkt=... loss_pct=... rss_kb_per_viewer=... server_cpu_pct=...
#          gso_segs_per_send=... gso_pct_of_datagrams=... fanout_p50_le_ms=... fanout_p99_le_ms=...
#          pkt_fanout_p50_le_ms=... pkt_fanout_p99_le_ms=... (the same delay per publisher packet,
#          not per media loop pass: passes that brought only RTCP do not count)
#          viewers_on_mirrors=... (viewers seated on another thread than their room's)
#          delay_p50_ms=... frame_delay_p50_ms=... frame_delay_p99_ms=... (the viewers' one-way
#          delay from the source's stamp in a frame to the frame's first packet, and to its
#          last: when the frame can be decoded; wall clock, generator included)
#          ctl_frame_p50_ms=... ctl_frame_p99_ms=... (the same to the last packet, of the
#          room's controller only; with LOADTEST_ARGS="--controller-last" it joined last)
# (gso_*, fanout_*, pkt_fanout_* and viewers_on_mirrors from the edge's /metrics, steady phase only: the difference between a
# scrape once the joins are done and one at the end; the fan-out delay quantiles are
# bucket upper bounds, per media loop iteration), and at the end the ratio of each
# variant to the baseline (one datagram per syscall).
#
# Variants (edge.toml fragments; "str0m" = viewers on str0m's send path, [sfu] direct_send = false):
#   baseline      str0m, [media] batch_io = false   one system call per datagram
#   batched_nogso str0m, [media] gso = false        recvmmsg/sendmmsg, one datagram per message
#   batched       str0m                             recvmmsg/sendmmsg + UDP GSO, bandwidth estimation
#   batched_nobwe str0m, [sfu] bwe = false          no per-viewer bandwidth estimation
#   direct_nogso  [media] gso = false               direct send path (SFU-sealed SRTP), no GSO
#   direct        defaults                          direct send path + GSO + frames held until whole (the shipped default)
#   direct_rxgro  defaults, `loadtest --receiver-gro` as `direct`, but the loopback viewers
#                 take UDP GRO: a GSO batch is delivered into a viewer socket whole instead of
#                 datagram by datagram inside the edge's sendmmsg (what a NIC with segmentation
#                 offload and receivers on other machines would spare the server)
#   direct_rps    defaults, in a network namespace of its own whose loopback steers received
#                 packets to the other CPUs (RPS), the edge pinned to CPU 0 and the load
#                 generator to the others: the receivers'
#                 kernel work (IP/UDP receive, socket queueing, wake-ups) runs on the
#                 generator's CPUs instead of inside the edge's sendmmsg, as it would on
#                 other machines; the edge still pays every syscall, copy, GSO skb and
#                 loopback transmit of its own. Needs root, `ip` and `taskset`, and 2+ CPUs
#                 (skipped otherwise). The edge's few received packets are steered too.
#   direct_nic    defaults, on a model of a network card: the edge in a network namespace of
#                 its own, the generator in another, joined by a veth pair with 4 queues
#                 whose receive side runs in NAPI kernel threads (threaded NAPI, GRO on, so
#                 a GSO message crosses whole as on a NIC with segmentation offload). The
#                 edge and its own NAPI threads are pinned to CPU 0 and the CPU time of
#                 those threads counts as the edge's (`loadtest --server-kernel-tid`); the
#                 generator and its NAPI threads run on the other CPUs. The edge pays its
#                 whole send path down to the device's queue, as on a NIC, and its own
#                 receive path; the viewers' receive path is theirs. Needs root, `ip`,
#                 `ethtool`, `taskset` and 2+ CPUs (skipped otherwise). Any variant name
#                 with the suffix `_nic` runs on this model (`span2_nic`: pin the edge to
#                 more CPUs with NIC_EDGE_CPUS, e.g. 0-1).
#   direct_nogather  [media] gather_us = 0: each publisher packet is fanned out as it
#                 comes, instead of its room holding a video frame's packets until the
#                 last one (at most 20 ms by default) and sending the frame whole
#                 (direct_nogather_rxgro, direct_nogather_nic: the same on those models)
#   one_thread2   [media] threads = 2, span_viewers = 0: two media threads, the room on one
#                 (the baseline for span2)
#   span2         [media] threads = 2, span_viewers = 1: the room spans both threads (its
#                 viewers dealt to them in turn, the publisher's packets handed over in memory)
#   one_thread2_rxgro, span2_rxgro   the same with `loadtest --receiver-gro`
#
# Environment: N=200 (viewers), STEADY=15 (measured seconds), JOIN_RATE=50,
# NIC_EDGE_CPUS=0 and NIC_QUEUES=4 (the *_nic variants),
# VARIANTS="baseline batched ..." (default: all, in that order),
# EDGERELAY_BIN (default: cargo build --release), EDGE_BIN (the edge only, default
# EDGERELAY_BIN: another build's edge against this build's load generator), KEEP=dir (keep each variant's /metrics
# scrapes there), LOADTEST_ARGS (extra `edgerelay loadtest` flags for every variant, e.g.
# "--source-pace-kbps 5000": the source paces its packets as a libwebrtc sender does;
# "--controller-last": the controller joins after every spectator, and its own frame
# delay is reported as ctl_frame_p50_ms / ctl_frame_p99_ms). Loopback only; bounded in time.
# Note: on loopback the server's CPU also pays the kernel's delivery of each datagram to
# the receiving client socket (and the wake-up of the client's thread); on a NIC it does not.
set -euo pipefail

N=${N:-200}
STEADY=${STEADY:-15}
JOIN_RATE=${JOIN_RATE:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${EDGERELAY_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin edgerelay >&2)
  EDGERELAY_BIN="$ROOT/target/release/edgerelay"
fi
TMP=$(mktemp -d /tmp/edgerelay-ab.XXXXXX)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The network namespace of the direct_rps variant while it runs (removed after it, and on
# exit: the variants run in a subshell, so the name is fixed here).
NETNS_NAME=edgerelay-rps-$$
NETNS=
cleanup() {
  if [ -e "/run/netns/$NETNS_NAME" ]; then ip netns del "$NETNS_NAME" 2>/dev/null || true; fi
  rm -rf "$TMP"
}

# The NIC model of the *_nic variants: two namespaces joined by a veth pair (names with
# this script's pid, so that its NAPI threads can be told apart), removed after each
# variant and on exit.
NIC_E=edgerelay-nic-e-$$
NIC_G=edgerelay-nic-g-$$
NIC_DEV_E=ne$$
NIC_DEV_G=ng$$
NIC_EDGE_IP=10.219.0.1
NIC_GEN_IP=10.219.0.2
NIC_EDGE_CPUS=${NIC_EDGE_CPUS:-0}
NIC_TIDS=()
NIC_REST_CPUS=
nic_cleanup() {
  for n in "$NIC_E" "$NIC_G"; do
    if [ -e "/run/netns/$n" ]; then ip netns del "$n" 2>/dev/null || true; fi
  done
}
trap 'nic_cleanup; cleanup' EXIT

# Root, `ip`, `taskset` and 2+ CPUs: what the variants in namespaces of their own need.
can_pin_namespaces() {
  [ "$(id -u)" = 0 ] && [ "$(nproc)" -ge 2 ] && command -v ip >/dev/null &&
    command -v taskset >/dev/null
}

# NAPI kernel threads of device $1 (their names start napi/<dev>-).
napi_threads() {
  ps -eo pid=,comm= | awk -v p="napi/$1-" 'index($2, p) == 1 { print $1 }'
}

# Makes the NIC model; sets NIC_TIDS to the edge's NAPI threads and NIC_REST_CPUS to the
# generator's CPUs.
make_nic_netns() {
  local q=${NIC_QUEUES:-4} t
  if ! can_pin_namespaces || ! command -v ethtool >/dev/null; then
    return 1
  fi
  NIC_REST_CPUS=$(nic_rest_cpus)
  ip netns add "$NIC_E" && ip netns add "$NIC_G" &&
    ip link add "$NIC_DEV_E" netns "$NIC_E" numtxqueues "$q" numrxqueues "$q" type veth \
      peer name "$NIC_DEV_G" netns "$NIC_G" numtxqueues "$q" numrxqueues "$q" &&
    ip -n "$NIC_E" addr add "$NIC_EDGE_IP/30" dev "$NIC_DEV_E" &&
    ip -n "$NIC_G" addr add "$NIC_GEN_IP/30" dev "$NIC_DEV_G" || return 1
  for side in "$NIC_E $NIC_DEV_E" "$NIC_G $NIC_DEV_G"; do
    set -- $side
    ip -n "$1" link set lo up && ip -n "$1" link set "$2" up &&
      # GRO on makes veth deliver through NAPI (tso off: a UDP GSO message qualifies).
      ip netns exec "$1" ethtool -K "$2" gro on tso off >/dev/null &&
      ip netns exec "$1" sh -c "echo 1 > /sys/class/net/$2/threaded" || return 1
  done
  NIC_TIDS=()
  for t in $(napi_threads "$NIC_DEV_E"); do
    taskset -pc "$NIC_EDGE_CPUS" "$t" >/dev/null && NIC_TIDS+=("$t")
  done
  for t in $(napi_threads "$NIC_DEV_G"); do taskset -pc "$NIC_REST_CPUS" "$t" >/dev/null; done
  [ "${#NIC_TIDS[@]}" -gt 0 ]
}

# The CPUs not given to the edge: the generator's.
nic_rest_cpus() {
  python3 - "$NIC_EDGE_CPUS" "$(nproc)" <<'PY'
import sys
edge = set()
for part in sys.argv[1].split(","):
    a, _, b = part.partition("-")
    edge.update(range(int(a), int(b or a) + 1))
rest = [c for c in range(int(sys.argv[2])) if c not in edge]
print(",".join(map(str, rest or [0])))
PY
}

# Makes NETNS: loopback up, its received packets steered to every CPU but CPU 0.
make_rps_netns() {
  local cpus mask
  cpus=$(nproc)
  if ! can_pin_namespaces; then
    return 1
  fi
  mask=$(printf '%x' $(((1 << cpus) - 2)))
  NETNS=$NETNS_NAME
  ip netns add "$NETNS" &&
    ip netns exec "$NETNS" ip link set lo up &&
    ip netns exec "$NETNS" sh -c "echo $mask > /sys/class/net/lo/queues/rx-0/rps_cpus"
}

run_variant() {
  local name=$1 fragment=$2 dir="$TMP/$1" client=() ns=() gns=() pin=() rest=() ip=127.0.0.1
  case $name in *_rxgro) client=(--receiver-gro) ;; esac
  # shellcheck disable=SC2206 # LOADTEST_ARGS is a list of flags
  client+=(${LOADTEST_ARGS:-})
  if [ "$name" = direct_rps ]; then
    if ! make_rps_netns; then
      echo "RESULT variant=$name n=$N skipped=needs root, ip, taskset and 2+ CPUs"
      return 0
    fi
    ns=(ip netns exec "$NETNS")
    gns=("${ns[@]}")
    pin=(taskset -c 0)
    rest=(taskset -c "1-$(($(nproc) - 1))")
  fi
  case $name in *_nic)
    if ! make_nic_netns; then
      nic_cleanup
      echo "RESULT variant=$name n=$N skipped=needs root, ip, ethtool, taskset and 2+ CPUs"
      return 0
    fi
    ns=(ip netns exec "$NIC_E")
    gns=(ip netns exec "$NIC_G")
    pin=(taskset -c "$NIC_EDGE_CPUS")
    rest=(taskset -c "$NIC_REST_CPUS")
    ip=$NIC_EDGE_IP
    for t in "${NIC_TIDS[@]}"; do client+=(--server-kernel-tid "$t"); done
    ;;
  esac
  mkdir -p "$dir"
  cat > "$dir/edge.toml" <<TOML
[node]
id = "ab-$name"
[http]
listen = "$ip:0"
[auth]
publisher_tokens = ["ab-publisher-token"]
viewer_tokens = ["ab-viewer-token"]
[sfu]
max_viewers_per_room = $((N > 1000 ? N : 1000))
$fragment
TOML
  # `ip netns exec` and `taskset` exec the edge: $! is the edge's pid.
  "${ns[@]}" "${pin[@]}" "${EDGE_BIN:-$EDGERELAY_BIN}" edge --config "$dir/edge.toml" \
    --media-listen "$ip:0" >"$dir/out" 2>"$dir/err" &
  local pid=$!
  for _ in $(seq 100); do grep -q EDGERELAY_READY "$dir/out" 2>/dev/null && break; sleep 0.1; done
  local http
  http=$(grep -o 'http=[^ ]*' "$dir/out" | cut -d= -f2)
  ( sleep $((N / JOIN_RATE + 6)); "${gns[@]}" curl -s --max-time 5 "$http/metrics" >"$dir/metrics.start" 2>/dev/null ) &
  local scrape=$!
  timeout $((STEADY + N / JOIN_RATE + 90)) "${gns[@]}" "${rest[@]}" "$EDGERELAY_BIN" loadtest \
    --whep "$http/whep/bench" --token ab-viewer-token --viewers "$N" --join-rate "$JOIN_RATE" \
    --seconds "$STEADY" --server-pid "$pid" "${client[@]}" \
    --source-whip "$http/whip/bench" --source-token ab-publisher-token \
    --source-cache "$TMP/source.cache" --json >"$dir/result.json" 2>"$dir/loadtest.err" || true
  wait "$scrape" 2>/dev/null || true
  "${gns[@]}" curl -s --max-time 5 "$http/metrics" >"$dir/metrics" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$dir/metrics" "$KEEP/$name.metrics" &&
      cp "$dir/metrics.start" "$KEEP/$name.metrics.start" 2>/dev/null || true
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$NETNS" ]; then
    ip netns del "$NETNS" 2>/dev/null || true
    NETNS=
  fi
  nic_cleanup
  python3 - "$dir/result.json" "$name" "$N" "$dir/metrics" "$dir/metrics.start" <<'PY'
import json, re, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"RESULT variant={sys.argv[2]} n={sys.argv[3]} error={e!r}")
    sys.exit(0)
def scrape(path, hist):
    m, buckets = {}, []
    try:
        for line in open(path):
            x = re.match(r'(edgerelay_(?:media_\w+?|datagrams_out_total|span_viewers_seated_total))(\{le="([^"]+)"\})? (\S+)$', line)
            if not x:
                continue
            if x.group(1) == hist + "_bucket":
                buckets.append((float(x.group(3)), float(x.group(4))))
            else:
                m[x.group(1)] = float(x.group(4))
    except OSError:
        pass
    return m, buckets
def steady(hist):
    m, buckets = scrape(sys.argv[4], hist)
    m0, b0 = scrape(sys.argv[5], hist)
    whole = dict(m)  # whole run (the seats are taken while joining)
    if b0 and len(b0) == len(buckets):
        m = {k: v - m0.get(k, 0) for k, v in m.items()}
        buckets = [(le, n - n0) for (le, n), (_, n0) in zip(buckets, b0)]
    return m, buckets, whole
m, buckets, m1 = steady("edgerelay_media_fanout_delay_seconds")
_, pkt_buckets, _ = steady("edgerelay_media_packet_fanout_delay_seconds")
sends = m.get("edgerelay_media_gso_sends_total", 0)
segs = f"{m.get('edgerelay_media_gso_segments_total', 0) / sends:.2f}" if sends else "0"
out = m.get("edgerelay_datagrams_out_total", 0)
share = f"{100 * m.get('edgerelay_media_gso_segments_total', 0) / out:.0f}" if out else "0"
def quantile(q, buckets=buckets):
    # Upper bound of the bucket holding the q-quantile.
    if not buckets or buckets[-1][1] == 0:
        return "na"
    for le, n in buckets:
        if n >= q * buckets[-1][1]:
            return "inf" if le == float("inf") else f"{le * 1000:g}"
    return "na"
print(f"RESULT variant={sys.argv[2]} n={sys.argv[3]} receiving={r.get('viewers_receiving_steady')} "
      f"join_failures={r.get('join_failures')} us_per_pkt={r['us_per_pkt']} "
      f"loss_pct={r['loss_pct']} rss_kb_per_viewer={r['rss_kb_per_viewer']} "
      f"server_cpu_pct={r['server_cpu_pct']} gso_segs_per_send={segs} gso_pct_of_datagrams={share} "
      f"fanout_p50_le_ms={quantile(0.5)} fanout_p99_le_ms={quantile(0.99)} "
      f"pkt_fanout_p50_le_ms={quantile(0.5, pkt_buckets)} pkt_fanout_p99_le_ms={quantile(0.99, pkt_buckets)} "
      f"viewers_on_mirrors={m1.get('edgerelay_span_viewers_seated_total', 0):.0f} "
      f"delay_p50_ms={(r.get('delay_ms') or {}).get('p50')} "
      f"frame_delay_p50_ms={(r.get('frame_delay_ms') or {}).get('p50')} "
      f"frame_delay_p99_ms={(r.get('frame_delay_ms') or {}).get('p99')}"
      + (f" ctl_frame_p50_ms={c['p50']} ctl_frame_p99_ms={c['p99']}" if (c := r.get('controller_frame_delay_ms') or {}).get('n') else "")
      + (f" kernel_threads_cpu_s={r['server_kernel_threads_cpu_seconds']}" if r.get('server_kernel_threads_cpu_seconds') is not None else ""))
PY
}

# (The fragments go right after the [sfu] table: [sfu] keys first, then other tables.)
STR0M='direct_send = false'
fragment() {
  case $1 in
    baseline) echo "$STR0M"$'\n[media]\nbatch_io = false' ;;
    batched_nogso) echo "$STR0M"$'\n[media]\ngso = false' ;;
    batched) echo "$STR0M" ;;
    batched_nobwe) echo "$STR0M"$'\nbwe = false' ;;
    direct_nogso) echo $'[media]\ngso = false' ;;
    direct | direct_rxgro | direct_rps | direct_nic) echo '' ;;
    direct_nogather | direct_nogather_rxgro | direct_nogather_nic) echo $'[media]\ngather_us = 0' ;;
    one_thread2 | one_thread2_rxgro | one_thread2_nic) echo $'[media]\nthreads = 2\nspan_viewers = 0' ;;
    span2 | span2_rxgro | span2_nic) echo $'[media]\nthreads = 2\nspan_viewers = 1' ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
for v in ${VARIANTS:-baseline batched_nogso batched batched_nobwe direct_nogso direct direct_rxgro}; do
  run_variant "$v" "$(fragment "$v")"
done | tee "$TMP/results"

python3 - "$TMP/results" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"RESULT variant=(\S+) n=\S+ .*?us_per_pkt=(\S+)", line)
    if m:
        rows[m.group(1)] = float(m.group(2))
base = rows.get("baseline")
if base:
    print("RATIOS " + " ".join(f"{k}={v / base:.2f}" for k, v in rows.items()))
PY
