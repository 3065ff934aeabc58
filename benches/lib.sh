# Shared plumbing of the loopback bench scripts (sourced, not run):
#   bench_init NAME      EDGERELAY_BIN (built if unset), TMP (removed on exit), fd limit,
#                        and a trap that stops the edge started by start_edge
#   start_edge CONFIG [ARGS...]
#                        starts `edgerelay edge --config CONFIG --media-listen 127.0.0.1:0 ARGS`,
#                        waits for its READY line; sets EDGE_PID and HTTP (its base URL)
#   stop_edge            stops it (also done on exit)
# shellcheck shell=bash

bench_init() {
  ROOT=$(cd "$(dirname "${BASH_SOURCE[1]}")/.." && pwd)
  if [ -z "${EDGERELAY_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin edgerelay >&2)
    EDGERELAY_BIN="$ROOT/target/release/edgerelay"
  fi
  TMP=$(mktemp -d "/tmp/edgerelay-$1.XXXXXX")
  EDGE_PID=
  trap 'stop_edge; rm -rf "$TMP"' EXIT
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

start_edge() {
  local config=$1 out
  shift
  out="${config%.toml}"
  "${EDGE_BIN:-$EDGERELAY_BIN}" edge --config "$config" --media-listen 127.0.0.1:0 "$@" \
    >"$out.out" 2>"$out.err" &
  EDGE_PID=$!
  for _ in $(seq 100); do grep -q EDGERELAY_READY "$out.out" 2>/dev/null && break; sleep 0.1; done
  HTTP=$(grep -o 'http=[^ ]*' "$out.out" | head -1 | cut -d= -f2)
  [ -n "$HTTP" ] || { echo "edge did not start:" >&2; cat "$out.err" >&2; return 1; }
}

stop_edge() {
  if [ -n "${EDGE_PID:-}" ]; then
    kill "$EDGE_PID" 2>/dev/null || true
    wait "$EDGE_PID" 2>/dev/null || true
  fi
  EDGE_PID=
}
