#!/usr/bin/env bash
# TURN interop: coturn's turnutils_* tools and the webrtc-rs turn client against
# edgerelay-turn on ephemeral loopback ports, plus the in-memory security tests.
# Installs coturn when missing and running as root on Debian; otherwise the
# coturn tests print SKIP and pass.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v turnutils_uclient >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q coturn >/dev/null
  else
    echo "SKIP: coturn tools missing (apt-get install coturn); running the Rust-only tests"
  fi
fi
# pipefail: a failing cargo test fails the script.
cargo test -p edgerelay-turn -- --nocapture 2>&1 |
  grep -E "^test |test result|SKIP|UclientResult|panicked|FAILED|error"
