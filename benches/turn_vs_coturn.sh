#!/usr/bin/env bash
# Side-by-side TURN relay cost: edgerelay-turn vs coturn (Debian `turnserver`).
#
# Same closed-loop ChannelData load (turn-load: N clients, each with its own
# loopback echo peer, W packets in flight) against both servers, alternating
# rounds. Reports server CPU microseconds per relayed packet, from
# /proc/PID/stat utime+stime (all threads) over packets relayed (each round
# trip = 2 relayed packets), and the loss.
#
# A second, paced scenario (PACED_CLIENTS clients x PACED_RATE packets/s each,
# like media streams; open loop) is reported on a `PACED` line.
#
# Env: PACKETS (per round, default 300000), CLIENTS (4), SIZE (200 bytes),
#      WINDOW (32), ROUNDS (3), PACED_CLIENTS (200), PACED_RATE (50),
#      PACED_PACKETS (100000, 0 = skip), CARGO_TARGET_DIR.
# Last line: RESULT ours_us_per_pkt=... coturn_us_per_pkt=... ratio=... ours_loss_pct=... coturn_loss_pct=...
set -euo pipefail
cd "$(dirname "$0")/.."

PACKETS=${PACKETS:-300000}
CLIENTS=${CLIENTS:-4}
SIZE=${SIZE:-200}
WINDOW=${WINDOW:-32}
ROUNDS=${ROUNDS:-3}
TARGET=${CARGO_TARGET_DIR:-target}
PACED_CLIENTS=${PACED_CLIENTS:-200}
PACED_RATE=${PACED_RATE:-50}
PACED_PACKETS=${PACED_PACKETS:-100000}

if ! command -v turnserver >/dev/null; then
  echo "SKIP: coturn (turnserver) not installed: apt-get install -y coturn"
  exit 0
fi

cargo build --release -q -p edgerelay-turn --bins
OURS_BIN="$TARGET/release/edgerelay-turn"
LOAD_BIN="$TARGET/release/turn-load"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

free_udp_port() {
  python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

# --- our server ---
"$OURS_BIN" --listen-udp 127.0.0.1:0 --user bench:bench --realm bench \
  --relay-ip 127.0.0.1 --allow-loopback-peers-for-testing --max-bandwidth 0 \
  --max-allocations-per-user 1000 >"$TMP/ours.out" 2>"$TMP/ours.err" &
OURS_PID=$!
PIDS+=("$OURS_PID")
for _ in $(seq 50); do grep -q TURN_READY "$TMP/ours.out" 2>/dev/null && break; sleep 0.1; done
OURS_ADDR=$(sed -nE 's/^TURN_READY udp=([^ ]+) .*/\1/p' "$TMP/ours.out")
[ -n "$OURS_ADDR" ] || { echo "our server did not start"; cat "$TMP/ours.err"; exit 1; }

# --- coturn ---
CPORT=$(free_udp_port)
turnserver -n --no-cli --listening-ip 127.0.0.1 --listening-port "$CPORT" \
  --relay-ip 127.0.0.1 --min-port 40000 --max-port 44999 \
  --lt-cred-mech --user bench:bench --realm bench --allow-loopback-peers \
  --pidfile "$TMP/coturn.pid" --userdb "$TMP/coturn.db" \
  --no-tls --no-dtls --no-tcp-relay --log-file "$TMP/coturn.log" --simple-log \
  >"$TMP/coturn.out" 2>&1 &
COTURN_PID=$!
PIDS+=("$COTURN_PID")
sleep 1.5
kill -0 "$COTURN_PID" || { echo "coturn did not start"; cat "$TMP/coturn.out"; exit 1; }

CLK=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

declare -A T R S L
for k in ours coturn; do T[$k]=0; R[$k]=0; S[$k]=0; L[$k]=0; done

run() { # name pid addr
  local name=$1 pid=$2 addr=$3 a b out
  a=$(ticks "$pid")
  out=$("$LOAD_BIN" --server "$addr" --user bench --pass bench --clients "$CLIENTS" \
        --packets "$PACKETS" --size "$SIZE" --window "$WINDOW" --max-secs 120)
  b=$(ticks "$pid")
  echo "  $name: $out cpu_ticks=$((b - a))"
  T[$name]=$(( T[$name] + b - a ))
  R[$name]=$(( R[$name] + $(sed -nE 's/.* relayed=([0-9]+).*/\1/p' <<<"$out") ))
  S[$name]=$(( S[$name] + $(sed -nE 's/.* sent=([0-9]+).*/\1/p' <<<"$out") ))
  L[$name]=$(( L[$name] + $(sed -nE 's/.* lost=([0-9]+).*/\1/p' <<<"$out") ))
}

echo "turn_vs_coturn: packets/round=$PACKETS clients=$CLIENTS size=$SIZE window=$WINDOW rounds=$ROUNDS"
echo "  coturn: $(turnserver --version 2>/dev/null | head -1 || echo unknown)"
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  run ours "$OURS_PID" "$OURS_ADDR"
  run coturn "$COTURN_PID" "127.0.0.1:$CPORT"
done

paced() { # name pid addr -> prints us/pkt
  local name=$1 pid=$2 addr=$3 a b out
  a=$(ticks "$pid")
  out=$("$LOAD_BIN" --server "$addr" --user bench --pass bench --clients "$PACED_CLIENTS" \
        --packets "$PACED_PACKETS" --size "$SIZE" --rate "$PACED_RATE" --max-secs 120)
  b=$(ticks "$pid")
  echo "  paced $name: $out cpu_ticks=$((b - a))" >&2
  awk -v t="$((b - a))" -v c="$CLK" -v r="$(sed -nE 's/.* relayed=([0-9]+).*/\1/p' <<<"$out")" \
    'BEGIN{ if (r==0) print "nan"; else printf "%.3f", t*1e6/c/r }'
}

us() { awk -v t="$1" -v c="$CLK" -v r="$2" 'BEGIN{ if (r==0) print "nan"; else printf "%.3f", t*1e6/c/r }'; }
pct() { awk -v l="$1" -v s="$2" 'BEGIN{ if (s==0) print "nan"; else printf "%.3f", 100*l/s }'; }
OURS_US=$(us "${T[ours]}" "${R[ours]}")
COTURN_US=$(us "${T[coturn]}" "${R[coturn]}")
RATIO=$(awk -v a="$OURS_US" -v b="$COTURN_US" 'BEGIN{ if (b==0) print "nan"; else printf "%.3f", a/b }')
if [ "$PACED_PACKETS" -gt 0 ]; then
  echo "paced: clients=$PACED_CLIENTS rate=${PACED_RATE}pps each packets=$PACED_PACKETS"
  P_OURS=$(paced ours "$OURS_PID" "$OURS_ADDR")
  P_COTURN=$(paced coturn "$COTURN_PID" "127.0.0.1:$CPORT")
  echo "PACED ours_us_per_pkt=$P_OURS coturn_us_per_pkt=$P_COTURN ratio=$(awk -v a="$P_OURS" -v b="$P_COTURN" 'BEGIN{ if (b==0) print "nan"; else printf "%.3f", a/b }')"
fi
printf '%-8s %14s %12s %10s\n' server relayed_pkts us_per_pkt loss_pct
printf '%-8s %14s %12s %10s\n' ours "${R[ours]}" "$OURS_US" "$(pct "${L[ours]}" "${S[ours]}")"
printf '%-8s %14s %12s %10s\n' coturn "${R[coturn]}" "$COTURN_US" "$(pct "${L[coturn]}" "${S[coturn]}")"
echo "RESULT ours_us_per_pkt=$OURS_US coturn_us_per_pkt=$COTURN_US ratio=$RATIO ours_loss_pct=$(pct "${L[ours]}" "${S[ours]}") coturn_loss_pct=$(pct "${L[coturn]}" "${S[coturn]}")"
