"""Gateway -> edge -> SFU with real peers: a session created at the gateway, the built-in
publisher publishing with the session's publisher token, and Chromium pages speaking the
edge WebSocket protocol (docs/PROTOCOL.md section 4) with the controller URL and a /join
spectator URL."""

from __future__ import annotations

import re
import urllib.request

from conftest import require_chromium, run
from conftest_gateway import (
    api,
    run_gateway_chromium,
    start_gateway,
    start_gateway_edge,
    start_publisher,
    wait_session_status,
)


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_chromium_controller_and_spectator_over_websocket(request, tmp_path):
    require_chromium()
    gw = start_gateway(request, tmp_path)
    edge = pub = None
    try:
        edge = start_gateway_edge(request, tmp_path, gw)
        code, env = api(gw, "POST", "/1.0/sessions", {"app": "interop", "region": "eu-west"})
        assert code == 201, env
        s = env["metadata"]
        assert s["node"] == "edge-a" and s["role"] == "controller", s
        assert s["url"].startswith(edge.http.replace("http://", "ws://") + f"/1.0/session/{s['id']}/sockets/slave?token="), s
        pub = start_publisher(request, tmp_path, s["publisher"]["whip_url"], s["publisher"]["token"])
        wait_session_status(gw, s["id"], "active")
        code, env = api(gw, "POST", f"/1.0/sessions/{s['id']}/join")
        assert code == 200, env
        j = env["metadata"]
        assert j["role"] == "spectator", j

        pages = [
            {"name": "controller", "url": s["url"], "iceServers": [], "sendPrefix": "ctrl-input"},
            {"name": "spectator", "url": j["url"], "iceServers": [], "sendPrefix": "spect-input"},
        ]
        res = run(run_gateway_chromium(request, tmp_path, edge.http, pages, seconds=30))
        ctrl, spect = res["pages"]["controller"], res["pages"]["spectator"]
        for name, p in (("controller", ctrl), ("spectator", spect)):
            assert not p["errors"], f"{name}: edge errors {p['errors']}"
            assert p["framesDecoded"] > 30, f"{name}: decoded {p['framesDecoded']} frames: {p}"
            assert p["frameWidth"] == 320, p
            assert p["dcState"] == "open", p
            assert p["sent"] >= 10, p
            assert p["candidatesSent"] >= 1, f"{name}: trickled no candidate: {p}"
        assert ctrl["role"] == "controller" and ctrl["offerRole"] == "controller", ctrl
        assert spect["role"] == "spectator" and spect["offerRole"] == "spectator", spect
        # Both receive the instance's own control-channel messages.
        assert ctrl["receivedCount"] > 0 and spect["receivedCount"] > 0, (ctrl, spect)

        # The controller's input reached the instance, the spectator's did not.
        log = re.sub(r"\x1b\[[0-9;]*m", "", pub.logs())  # drop ANSI colours
        got = re.findall(r"input message received.*?msg=(\S+)", log)
        assert any(m.startswith("ctrl-input-") for m in got), f"no controller input at the instance: {got}"
        assert not any(m.startswith("spect-input-") for m in got), f"spectator input leaked: {got}"
        assert _metric(edge.http, "edgerelay_input_dropped_spectator_total") >= 10
        assert _metric(edge.http, "edgerelay_input_forwarded_total") >= 10

        # The gateway saw the viewers through the heartbeats.
        st = wait_session_status(gw, s["id"], "active")
        assert st["publisher_connected"] is True, st
    finally:
        for p in (pub, edge, gw):
            if p is not None:
                p.stop()
