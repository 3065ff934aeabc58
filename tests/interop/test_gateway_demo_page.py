"""`edgerelay demo` with its in-process gateway, viewed by the real viewer page in Chromium:
the controller link (edge socket URL from the demo's session), a spectator page that joins
through the gateway API, and a page that creates its own session (the demo starts a synthetic
instance for it) all decode video over the WebSocket flow; `?mode=whep` still works."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from conftest import CHROMIUM, EDGE_BIN, HERE, _tail, attach_log, require_chromium, run


def _start_demo(request, tmp_path):
    if not EDGE_BIN.exists():
        pytest.fail(f"edgerelay binary {EDGE_BIN} missing: run `cargo build --release --bins` first")
    out_path, log_path = tmp_path / "demo.stdout", tmp_path / "demo.stderr"
    attach_log(request, "demo stdout", out_path)
    attach_log(request, "demo stderr", log_path)
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    with open(out_path, "wb") as out, open(log_path, "wb") as err:
        proc = subprocess.Popen([str(EDGE_BIN), "demo", "--http-listen", "127.0.0.1:0",
                                 "--width", "320", "--height", "240"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while True:
        links = {}
        for line in out_path.read_text(errors="replace").splitlines():
            line = line.strip()
            for key in ("controller:", "spectators:", "new session:", "WHEP:"):
                if line.startswith(key):
                    links[key.rstrip(":")] = line[len(key):].split()[0]
        if len(links) == 4:
            return proc, links
        if proc.poll() is not None:
            pytest.fail(f"demo exited {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"demo links not printed within 30 s:\n{_tail(out_path)}")
        time.sleep(0.1)


async def _pages(request, tmp_path, urls: dict, seconds: float = 40) -> dict:
    log_path = tmp_path / "pages.log"
    attach_log(request, "page driver output", log_path)
    opts = {"urls": urls, "seconds": seconds, "minFrames": 30, "executablePath": CHROMIUM}
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / "gateway_page.mjs"), json.dumps(opts), cwd=str(HERE),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    text = out.decode(errors="replace")
    log_path.write_text(text)
    events = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    errors = [e for e in events if e.get("event") in ("error", "pageerror")]
    assert not errors, errors
    results = [e for e in events if e.get("event") == "result"]
    assert results, text[-2000:]
    return results[-1]["pages"]


def test_demo_viewer_page_follows_the_gateway_flow(request, tmp_path):
    require_chromium()
    proc, links = _start_demo(request, tmp_path)
    try:
        urls = {"controller": links["controller"], "spectator": links["spectators"],
                "own-session": links["new session"], "whep": links["WHEP"]}
        pages = run(_pages(request, tmp_path, urls))
        assert pages["controller"]["role"] == "controller", pages
        assert pages["spectator"]["role"] == "spectator", pages
        assert pages["own-session"]["role"] == "controller", pages
        # The created session is a different room than the demo's.
        assert pages["own-session"]["room"] != pages["controller"]["room"], pages
        assert pages["whep"]["role"] == "spectator", pages
        for name, p in pages.items():
            assert p["decoded"] > 30, f"{name}: {p}"
        assert proc.poll() is None, "demo died"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
