"""Helpers for the gateway interop tests: a real ``edgerelay gateway``, edges that register with
it (config files in the test's tmp dir, ephemeral loopback ports), the built-in publisher
(``edgerelay publish``) with a session's publisher token, and the Chromium WebSocket client
(``gateway_ws.mjs``).

Import from a test module (``from conftest_gateway import ...``); nothing here is a pytest
plugin, so the shared ``conftest.py`` stays untouched. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import CHROMIUM, EDGE_BIN, _tail, attach_log, run_node_driver

API_TOKEN = "interop-api-token-0123456789"
NODE_KEY = "interop-node-key-0123456789"
TOKEN_KEY = "interop-token-key-0123456789"
TURN_SECRET = "interop-turn-secret-0123456789"


class Proc:
    """A child process with its log; SIGTERM then SIGKILL at stop."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, info: dict[str, str] | None = None):
        self.proc = proc
        self.log_path = log_path
        self.info = info or {}
        self.http = self.info.get("http", "").rstrip("/")

    def logs(self) -> str:
        return _tail(self.log_path, 200000)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _require_binary() -> None:
    if not EDGE_BIN.exists():
        pytest.fail(f"edgerelay binary {EDGE_BIN} missing: run `cargo build --release --bins` first")


def _spawn_ready(request, tmp_path: Path, name: str, args: list[str], ready: str,
                 timeout: float = 20.0) -> Proc:
    """Start ``edgerelay <args>`` and wait for its ``<ready> http=...`` stdout line."""
    _require_binary()
    out_path = tmp_path / f"{name}.stdout"
    log_path = tmp_path / f"{name}.stderr"
    attach_log(request, f"{name} stderr", log_path)
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info,edgerelay=debug")
    with open(out_path, "wb") as out, open(log_path, "wb") as err:
        proc = subprocess.Popen([str(EDGE_BIN)] + args, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith(ready):
                info = dict(tok.split("=", 1) for tok in line.split()[1:] if "=" in tok)
                return Proc(proc, log_path, info)
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode} before {ready}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=5)
            pytest.fail(f"{name} not ready within {timeout}s:\n{_tail(log_path)}")
        time.sleep(0.05)


def start_gateway(request, tmp_path: Path) -> Proc:
    """``edgerelay gateway`` on 127.0.0.1:0 with one admin API account."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
listen = "127.0.0.1:0"
node_keys = ["{NODE_KEY}"]
token_keys = ["{TOKEN_KEY}"]
turn_secrets = ["{TURN_SECRET}"]
heartbeat_interval_ms = 500
instance_grace_secs = 1
[[accounts]]
name = "interop"
token = "{API_TOKEN}"
admin = true
[[regions]]
name = "eu-west"
lat = 48.85
lon = 2.35
""")
    return _spawn_ready(request, tmp_path, "gateway", ["gateway", "--config", str(cfg)], "GATEWAY_READY")


def start_gateway_edge(request, tmp_path: Path, gateway: Proc, node_id: str = "edge-a",
                       region: str = "eu-west", lat: float = 48.85, lon: float = 2.35) -> Proc:
    """``edgerelay edge`` registering with ``gateway`` (gateway tokens only: no static tokens)."""
    cfg = tmp_path / f"{node_id}.toml"
    cfg.write_text(f"""
[node]
id = "{node_id}"
region = "{region}"
[http]
listen = "127.0.0.1:0"
[media]
listen = "127.0.0.1:0"
[auth]
token_keys = ["{TOKEN_KEY}"]
[gateway]
url = "{gateway.http}"
node_key = "{NODE_KEY}"
lat = {lat}
lon = {lon}
max_viewers = 50
heartbeat_interval_ms = 500
""")
    edge = _spawn_ready(request, tmp_path, node_id, ["edge", "--config", str(cfg)], "EDGERELAY_READY")
    deadline = time.monotonic() + 15
    while True:
        nodes = [n["id"] for n in api(gateway, "GET", "/1.0/status")[1]["metadata"]["nodes"]]
        if node_id in nodes:
            return edge
        if time.monotonic() > deadline:
            pytest.fail(f"{node_id} did not register within 15 s:\n{edge.logs()}")
        time.sleep(0.2)


def api(gateway: Proc, method: str, path: str, body: dict | None = None,
        token: str = API_TOKEN) -> tuple[int, dict]:
    """One gateway API call; returns (HTTP status, envelope)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(gateway.http + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def start_publisher(request, tmp_path: Path, whip_url: str, token: str, name: str = "publisher",
                    seconds: int = 120) -> Proc:
    """The built-in synthetic publisher (``edgerelay publish``), small and light."""
    _require_binary()
    log_path = tmp_path / f"{name}.stderr"
    attach_log(request, f"{name} stderr", log_path)
    env = dict(os.environ)
    env["RUST_LOG"] = "info"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            [str(EDGE_BIN), "publish", "--whip", whip_url, "--token", token,
             "--width", "320", "--height", "240", "--fps", "15", "--bitrate-kbps", "400",
             "--keyframe-interval-ms", "1000", "--seconds", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
    return Proc(proc, log_path)


def wait_session_status(gateway: Proc, sid: str, want: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, env = api(gateway, "GET", f"/1.0/sessions/{sid}")
        assert code == 200, env
        if env["metadata"]["status"] == want:
            return env["metadata"]
        if time.monotonic() > deadline:
            raise AssertionError(f"session {sid} not {want} within {timeout}s: {env['metadata']}")
        time.sleep(0.2)


async def run_gateway_chromium(request, tmp_path: Path, origin: str, pages: list[dict], *,
                               seconds: float = 25, min_frames: int = 30,
                               name: str = "chromium-ws") -> dict:
    """Run gateway_ws.mjs: one Chromium, one page per entry of ``pages``
    (``{"name", "url", "iceServers", "sendPrefix"}``); returns the final result event."""
    opts = {"origin": origin, "pages": pages, "seconds": seconds, "minFrames": min_frames,
            "executablePath": CHROMIUM}
    _, result, _ = await run_node_driver(request, tmp_path, "gateway_ws.mjs", opts, name=name,
                                         bound=seconds + 60)
    return result
