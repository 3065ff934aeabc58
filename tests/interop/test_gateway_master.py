"""The instance side of the edge WebSocket protocol (docs/PROTOCOL.md section 4.2) with a real
peer: Chromium publishes its fake camera as the *instance* of a gateway session over
``/1.0/session/{id}/sockets/master?token=<publisher token>``, a Chromium controller
(``/sockets/slave`` with the session's controller URL) and a Chromium spectator (a ``/join``
URL) watch it, all driven by ``gateway_master.mjs``.

Asserted: the master-side message sequence (discover -> resp:discover role ``publisher``,
the instance's base64 offer with an SCTP section -> the edge's ICE-lite answer with its
candidates, the instance's trickled candidates accepted without ``error``); both viewers
decode > 30 frames; the gateway moves the session to ``active``; the controller's ``control``
messages reach the instance page, the spectator's do not, and the instance's own messages
reach both viewers. Then the instance closes its socket: as sections 1.3 and 5 say, the
gateway marks the session ``terminated`` ("instance gone") and tells the edge, which ends the
viewers' sockets with ``error`` "session terminated" (close 1008).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import pytest

from conftest import CHROMIUM, HERE, attach_log, require_aiortc, require_chromium, run
from conftest_gateway import api, start_gateway, start_gateway_edge

CTRL = "ctrl-input"
SPECT = "spect-input"


def _metric(base: str, name: str, label: str = "") -> float:
    """Sum of every sample of ``name`` (whose labels contain ``label``) on ``/metrics``."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if (key == name or key.startswith(name + "{")) and label in key:
            total += float(value)
    return total


class Driver:
    """``gateway_master.mjs`` running under asyncio: its latest stats snapshot and commands."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path):
        self.proc = proc
        self.log = open(log_path, "w")
        self.pages: dict[str, dict] = {}
        self.result: dict | None = None
        self.errors: list[str] = []
        self.acks: list[str] = []
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            self.log.write(text + "\n")
            self.log.flush()
            try:
                ev = json.loads(text)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind in ("stats", "result"):
                self.pages = ev["pages"]
                if kind == "result":
                    self.result = ev["pages"]
            elif kind in ("error", "pageerror"):
                self.errors.append(str(ev.get("error")))
            elif kind == "ack":
                self.acks.append(ev["command"])

    def summary(self) -> str:
        keep = ("wsState", "role", "iceState", "framesDecoded", "framesEncoded", "codec",
                "dcState", "sent", "receivedCount", "errors", "closeCode", "messages")
        return json.dumps({n: {k: p.get(k) for k in keep} for n, p in self.pages.items()})

    async def wait_for(self, what: str, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            assert not self.errors, f"chromium driver error: {self.errors}"
            try:
                if pred(self.pages):
                    return self.pages
            except (KeyError, TypeError):
                pass
            if self.task.done():
                raise AssertionError(f"driver exited while waiting for {what}: {self.summary()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s: {self.summary()}")
            await asyncio.sleep(0.2)

    async def command(self, cmd: str, timeout: float = 5) -> None:
        self.proc.stdin.write((cmd + "\n").encode())
        await self.proc.stdin.drain()
        await self.wait_for(f"ack of {cmd}", lambda _: cmd in self.acks, timeout)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.task.cancel()
        self.log.close()


async def _session(gw, sid: str) -> dict:
    code, env = await asyncio.to_thread(api, gw, "GET", f"/1.0/sessions/{sid}")
    assert code == 200, env
    return env["metadata"]


async def _wait_session(gw, sid: str, what: str, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await _session(gw, sid)
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"session {sid}: {what} not within {timeout}s: {s}")
        await asyncio.sleep(0.2)


def test_chromium_instance_over_sockets_master(request, tmp_path):
    require_chromium()
    gw = start_gateway(request, tmp_path)
    edge = None
    try:
        edge = start_gateway_edge(request, tmp_path, gw)
        code, env = api(gw, "POST", "/1.0/sessions", {"app": "interop-master", "region": "eu-west"})
        assert code == 201, env
        s = env["metadata"]
        sid = s["id"]
        assert s["status"] == "created" and s["role"] == "controller", s
        ws_base = edge.http.replace("http://", "ws://")
        pub = s["publisher"]
        assert pub["master_url"] == f"{ws_base}/1.0/session/{sid}/sockets/master?token={pub['token']}", pub
        code, env = api(gw, "POST", f"/1.0/sessions/{sid}/join")
        assert code == 200, env
        j = env["metadata"]
        assert j["role"] == "spectator", j
        run(_scenario(request, tmp_path, gw, edge, sid, pub["master_url"], s["url"], j["url"]),
            timeout=55)
    finally:
        for p in (edge, gw):
            if p is not None:
                p.stop()


async def _scenario(request, tmp_path, gw, edge, sid, master_url, ctrl_url, spect_url):
    opts = {
        "origin": edge.http,
        "masterUrl": master_url,
        "viewers": [
            # The controller connects first and waits for the instance (PROTOCOL 4.1.1).
            {"name": "controller", "url": ctrl_url, "sendPrefix": CTRL, "sendCount": 10,
             "early": True},
            {"name": "spectator", "url": spect_url, "sendPrefix": SPECT, "sendCount": 10},
        ],
        "seconds": 45,
        "executablePath": CHROMIUM,
    }
    log_path = tmp_path / "chromium-master.log"
    attach_log(request, "chromium driver output", log_path)
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / "gateway_master.mjs"), json.dumps(opts), cwd=str(HERE),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    d = Driver(proc, log_path)
    try:
        await _phases(d, gw, edge, sid)
    finally:
        await d.close()


def _ctrl_at_instance(pages) -> list[str]:
    return [m for m in pages["instance"]["received"] if m.startswith(CTRL + "-")]


async def _phases(d: Driver, gw, edge, sid: str) -> None:
    # 1. Media flows instance -> edge -> both viewers; input flows controller -> instance.
    def flowing(p):
        inst, c, sp = p["instance"], p["controller"], p["spectator"]
        return (inst["framesEncoded"] > 30 and c["framesDecoded"] > 30 and sp["framesDecoded"] > 30
                and c["sent"] >= 10 and sp["sent"] >= 10 and len(_ctrl_at_instance(p)) >= 10
                and c["receivedCount"] > 0 and sp["receivedCount"] > 0)

    await d.wait_for("instance publishing, viewers decoding, controller input at the instance",
                     flowing, timeout=30)

    # 2. The gateway saw the instance through the edge's heartbeat.
    st = await _wait_session(gw, sid, "active with 2 viewers",
                             lambda s: s["status"] == "active" and s["viewers"] == 2, timeout=10)
    assert st["publisher_connected"] is True, st

    # The spectator's messages were sent together with the controller's; give any leak time.
    await asyncio.sleep(1.0)
    pages = d.pages
    inst, ctrl, spect = pages["instance"], pages["controller"], pages["spectator"]

    # Master-side signalling exactly as PROTOCOL 4.2 says.
    assert inst["role"] == "publisher" and inst["session"] == sid, inst
    assert [m["type"] for m in inst["messages"]] == ["resp:discover", "answer"], inst["messages"]
    assert inst["messages"][0].get("max_api_version") == 2, inst["messages"]
    assert not inst["errors"], f"instance: edge errors {inst['errors']}"
    assert inst["wsState"] == "open", inst
    assert inst["offerHasApplication"] and inst["answerHasApplication"], inst
    assert inst["answerIceLite"] and inst["answerCandidates"] >= 1, inst
    assert inst["answerVideoDirection"] == "recvonly", inst
    assert inst["candidatesSent"] >= 1 and inst["endOfCandidatesSent"], inst
    assert inst["dcState"] == "open", inst
    assert inst["iceState"] in ("connected", "completed"), inst
    assert inst["remoteCandidate"] and inst["remoteCandidate"]["address"] == "127.0.0.1", inst

    # Viewers: roles, media, the instance's own control messages.
    for name, p, role in (("controller", ctrl, "controller"), ("spectator", spect, "spectator")):
        assert not p["errors"], f"{name}: edge errors {p['errors']}"
        assert p["role"] == role and p["offerRole"] == role, p
        assert p["offerHasApplication"], p
        assert p["dcState"] == "open", p
        assert p["framesDecoded"] > 30, p
        assert p["codec"] == inst["codec"], (p["codec"], inst["codec"])
        assert any(m.startswith("instance-msg-") for m in p["received"]), p["received"]

    # Controller input reached the instance page (all of it, in order); the spectator's did not.
    assert _ctrl_at_instance(pages)[:10] == [f"{CTRL}-{i}" for i in range(10)], inst["received"]
    leaked = [m for m in inst["received"] if m.startswith(SPECT)]
    assert not leaked, f"spectator input reached the instance: {leaked}"
    assert _metric(edge.http, "edgerelay_input_dropped_spectator_total") >= 10
    assert _metric(edge.http, "edgerelay_input_forwarded_total") >= 10
    assert _metric(edge.http, "edgerelay_ws_sessions_total", 'side="master"') >= 1

    # 3. The instance closes its socket. PROTOCOL 1.3 / 5: the edge reports the room without
    # a publisher, the gateway terminates the session ("instance gone") and lists it in
    # `terminate_sessions`, and the edge ends the viewers' sockets ("session terminated").
    await d.command("close-instance")
    st = await _wait_session(gw, sid, "no longer active",
                             lambda s: s["status"] != "active", timeout=10)
    assert st["status"] == "terminated" and st["status_message"] == "instance gone", st
    assert st["publisher_connected"] is False, st

    def viewers_closed(p):
        return all(p[n]["wsState"] == "closed" for n in ("controller", "spectator"))

    await d.wait_for("viewer sockets closed by the edge", viewers_closed, timeout=10)
    await d.command("finish")
    await d.wait_for("the final result", lambda _: d.result is not None, timeout=10)
    res = d.result
    inst = res["instance"]
    # The close code the instance sees is 1006, not its own 1000: the edge does not echo the
    # Close frame (test_websocket_close_handshake_is_echoed below), so it is not asserted here.
    assert inst["closedByUs"] and inst["wsState"] == "closed", inst
    assert not inst["errors"], f"instance: edge errors {inst['errors']}"
    for name in ("controller", "spectator"):
        p = res[name]
        assert p["errors"] == ["session terminated"], f"{name}: {p['errors']}"
        assert p["closeCode"] == 1008 and p["closeClean"] is True, p
        assert p["messages"][-1] == {"type": "error", "message": "session terminated"}, p

    log = re.sub(r"\x1b\[[0-9;]*m", "", edge.logs())
    assert re.search(r"websocket instance publishing.*" + sid, log) or \
        re.search(sid + r".*websocket instance publishing", log), "no 'instance publishing' log"
    assert "websocket instance gone" in log, "no 'websocket instance gone' log line"
    # The viewers outlived the instance and were closed by the gateway's termination.
    assert re.search(r"gateway terminated the session: closing it room=" + sid + r" peers=2", log), \
        "edge did not close the session's 2 viewers on the gateway's terminate_sessions"


def test_websocket_close_handshake_is_echoed(request, tmp_path):
    """A client that closes its socket with 1000 gets the edge's Close frame back, on both
    sides: the instance (``/sockets/master`` after ``resp:discover``) and a viewer
    (``/sockets/slave`` after ``settings``, waiting for the instance)."""
    require_aiortc()  # aiohttp comes with it
    import aiohttp

    gw = start_gateway(request, tmp_path)
    edge = None
    try:
        edge = start_gateway_edge(request, tmp_path, gw)
        code, env = api(gw, "POST", "/1.0/sessions", {"app": "interop-close", "region": "eu-west"})
        if code != 201:
            pytest.fail(f"session create: {code} {env}")
        s = env["metadata"]

        async def close_after(url: str, msgs: list[dict]) -> tuple[int | None, dict]:
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=3))
                await ws.send_json({"type": "discover"})
                resp = await ws.receive_json(timeout=5)
                for m in msgs:
                    await ws.send_json(m)
                await asyncio.sleep(0.3)
                await ws.close(code=1000)
                return ws.close_code, resp

        async def both():
            master = await close_after(s["publisher"]["master_url"], [])
            slave = await close_after(s["url"], [{"type": "settings", "api_version": 2}])
            return master, slave

        (m_code, m_resp), (s_code, s_resp) = run(both(), timeout=30)
        if m_resp.get("role") != "publisher" or s_resp.get("role") != "controller":
            pytest.fail(f"unexpected resp:discover: {m_resp} {s_resp}")
        assert (m_code, s_code) == (1000, 1000), \
            f"close code seen by the client: master {m_code}, slave {s_code}"
    finally:
        for p in (edge, gw):
            if p is not None:
                p.stop()
