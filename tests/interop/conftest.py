"""Shared helpers for the edgerelay interop tests (real peers against the real edge binary).

- ``edge`` fixture: starts ``target/release/edgerelay edge`` on ephemeral loopback ports,
  waits for its ``EDGERELAY_READY`` line, captures stderr to a file and attaches it to the
  report of any failing test, kills the process at teardown.
- ``Publisher`` / ``Viewer``: aiortc peers speaking WHIP / WHEP (non-trickle).
- ``run_chromium``: drives the Debian Chromium through ``chromium_whep.mjs`` (playwright-core).
- ``require_*``: skip only when a peer binary is truly absent.

Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EDGE_BIN = Path(os.environ.get("EDGERELAY_BIN", REPO / "target" / "release" / "edgerelay"))
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")

PUB_TOKEN = "PUB-interop-token"  # the edge requires tokens of >= 8 characters
VIEW_TOKEN = "VIEW-interop-token"

try:  # aiortc is a peer too: skip (not crash collection) if it is truly absent.
    import aioice.ice
    import aiohttp
    import av
    from aiortc import (
        RTCConfiguration,
        RTCPeerConnection,
        RTCRtpSender,
        RTCSessionDescription,
        VideoStreamTrack,
    )
    from aiortc.mediastreams import MediaStreamError

    HAVE_AIORTC = True
    AIORTC_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the machine
    HAVE_AIORTC = False
    AIORTC_ERROR = str(e)

if HAVE_AIORTC:
    # aioice leaves 127.0.0.1 out of its host candidates; every test talks to an edge on
    # loopback, so offer exactly one loopback host candidate (aioice calls this module-level
    # function from Connection.gather_candidates).
    def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = _loopback_host_addresses


# --------------------------------------------------------------------------------------------
# failure reporting: attach logs registered on the test item
# --------------------------------------------------------------------------------------------


def attach_log(request: pytest.FixtureRequest, name: str, path: Path) -> None:
    """Register a log file to print in the report if the test fails."""
    logs = getattr(request.node, "_edgerelay_logs", None)
    if logs is None:
        logs = []
        request.node._edgerelay_logs = logs
    logs.append((name, Path(path)))


def _tail(path: Path, max_chars: int = 20000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    if len(text) > max_chars:
        text = f"... ({len(text) - max_chars} chars cut) ...\n" + text[-max_chars:]
    return text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for name, path in getattr(item, "_edgerelay_logs", []):
            rep.sections.append((f"{name} ({path})", _tail(path)))


# --------------------------------------------------------------------------------------------
# peers present?
# --------------------------------------------------------------------------------------------


def require_aiortc() -> None:
    if not HAVE_AIORTC:
        pytest.skip(f"aiortc not installed: {AIORTC_ERROR}")


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not installed at {CHROMIUM}")
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/interop/node_modules/playwright-core missing: run `npm install` in tests/interop")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


# --------------------------------------------------------------------------------------------
# the edge
# --------------------------------------------------------------------------------------------


class Edge:
    """A running ``edgerelay edge`` process."""

    def __init__(self, proc: subprocess.Popen, info: dict[str, str], log_path: Path):
        self.proc = proc
        self.info = info
        self.log_path = log_path
        self.http = info["http"].rstrip("/")
        self.media = info.get("media", "")

    def logs(self) -> str:
        return _tail(self.log_path)

    def assert_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"edge exited with {code}; stderr:\n{self.logs()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_edge(tmp_path: Path, extra_args: list[str] | None = None, timeout: float = 20.0,
               ip: str = "127.0.0.1", name: str = "edge") -> Edge:
    """Start the edge on ephemeral ports of ``ip`` (loopback by default) and wait for READY."""
    if not EDGE_BIN.exists():
        pytest.fail(f"edge binary {EDGE_BIN} missing: run `cargo build --release --bins` first")
    args = [
        str(EDGE_BIN), "edge",
        "--http-listen", f"{ip}:0",
        "--media-listen", f"{ip}:0",
        "--public-ip", ip,
        "--publisher-token", PUB_TOKEN,
        "--viewer-token", VIEW_TOKEN,
    ] + (extra_args or [])
    out_path = tmp_path / f"{name}.stdout"
    log_path = tmp_path / f"{name}.stderr"
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info,edgerelay=debug,edgerelay_sfu=debug")
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("NO_COLOR", "1")
    with open(out_path, "wb") as out, open(log_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        text = out_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("EDGERELAY_READY"):
                info = dict(tok.split("=", 1) for tok in line.split()[1:] if "=" in tok)
                if "http" not in info:
                    proc.kill()
                    pytest.fail(f"READY line without http=: {line!r}\nstderr:\n{_tail(log_path)}")
                return Edge(proc, info, log_path)
        code = proc.poll()
        if code is not None:
            pytest.fail(
                f"edge exited with {code} before READY: {' '.join(args)}\n"
                f"stdout:\n{text}\nstderr:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=5)
            pytest.fail(f"edge not READY within {timeout}s\nstdout:\n{text}\nstderr:\n{_tail(log_path)}")
        time.sleep(0.05)


@pytest.fixture
def edge_factory(request, tmp_path):
    """Starts edges (``edge_factory(ip=...)``); logs attached on failure, all stopped at teardown."""
    require_aiortc()
    edges: list[Edge] = []

    def make(ip: str = "127.0.0.1", extra_args: list[str] | None = None) -> Edge:
        name = f"edge{len(edges)}" if edges else "edge"
        attach_log(request, f"{name} stderr", tmp_path / f"{name}.stderr")
        attach_log(request, f"{name} stdout", tmp_path / f"{name}.stdout")
        e = start_edge(tmp_path, extra_args, ip=ip, name=name)
        edges.append(e)
        return e

    try:
        yield make
    finally:
        for e in edges:
            e.stop()


@pytest.fixture
def edge(edge_factory):
    """A fresh loopback edge per test; its stderr is attached to the report on failure."""
    return edge_factory()


class NetNs:
    """A network namespace joined to the host by a veth pair (host side ``host_ip``/30,
    namespace side ``ns_ip``/30). Needs root; removed by ``close()``."""

    def __init__(self):
        if os.geteuid() != 0:
            pytest.skip("needs root to create a network namespace")
        if shutil.which("ip") is None:
            pytest.skip("iproute2 (ip) not installed")
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.name = f"edgerelay-it-{tag}"
        self.veth_host, self.veth_ns = f"erh{tag}", f"ern{tag}"
        a, b = random.randrange(0, 256), random.randrange(0, 64) * 4
        self.host_ip, self.ns_ip = f"10.213.{a}.{b + 1}", f"10.213.{a}.{b + 2}"
        self.created = False
        try:
            self._ip("netns", "add", self.name)
            self.created = True
            self._ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            self._ip("link", "set", self.veth_ns, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
            self._ip("link", "set", self.veth_host, "up")
            self._ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns)
            self._ip("-n", self.name, "link", "set", self.veth_ns, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self.created = False
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True, timeout=10)


@pytest.fixture
def netns():
    """A fresh network namespace with a veth link to the host (skips without root)."""
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()


# --------------------------------------------------------------------------------------------
# asyncio helpers
# --------------------------------------------------------------------------------------------


async def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def run(coro, timeout: float = 120.0):
    """Run a test scenario with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def http_request(method: str, url: str, *, token: str | None = None, body: bytes | str | None = None,
                       content_type: str | None = "application/sdp", headers: dict | None = None,
                       timeout: float = 10.0):
    """One HTTP request; returns (status, headers, text body)."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if content_type is not None and body is not None:
        h["Content-Type"] = content_type
    if isinstance(body, str):
        body = body.encode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.request(method, url, data=body, headers=h, allow_redirects=False) as r:
            return r.status, r.headers, await r.text(errors="replace")


def absolute(base: str, location: str) -> str:
    if location.startswith("http://") or location.startswith("https://"):
        return location
    return base + location


# --------------------------------------------------------------------------------------------
# aiortc peers
# --------------------------------------------------------------------------------------------

if HAVE_AIORTC:

    class MovingPatternTrack(VideoStreamTrack):
        """A real, moving 320x240 test picture: a bright square sweeping over a gradient,
        plus a per-frame bar code of the frame number (so every frame differs)."""

        kind = "video"

        def __init__(self, width: int = 320, height: int = 240):
            super().__init__()
            self.width, self.height = width, height
            self.n = 0
            row = bytes((16 + (x * 200) // width) for x in range(width))
            self.background = row * height

        async def recv(self):
            pts, time_base = await self.next_timestamp()
            w, h = self.width, self.height
            frame = av.VideoFrame(w, h, "yuv420p")
            y = bytearray(self.background)
            size = 48
            x0 = (self.n * 4) % (w - size)
            y0 = (self.n * 3) % (h - size)
            white = b"\xeb" * size
            for r in range(y0, y0 + size):
                y[r * w + x0: r * w + x0 + size] = white
            for bit in range(16):  # frame counter as 16 bars along the top
                val = b"\xeb" if (self.n >> bit) & 1 else b"\x10"
                for r in range(0, 8):
                    y[r * w + bit * 20: r * w + bit * 20 + 16] = val * 16
            self.n += 1
            frame.planes[0].update(bytes(y))
            frame.planes[1].update(bytes([128]) * ((w // 2) * (h // 2)))
            frame.planes[2].update(bytes([128]) * ((w // 2) * (h // 2)))
            frame.pts = pts
            frame.time_base = time_base
            return frame

    def _h264_first(transceiver) -> None:
        caps = RTCRtpSender.getCapabilities("video")
        prefs = [c for c in caps.codecs if c.mimeType.lower() == "video/h264"]
        prefs += [c for c in caps.codecs if c.mimeType.lower() == "video/rtx"]
        transceiver.setCodecPreferences(prefs)

    class Peer:
        """Common state of an aiortc WHIP/WHEP peer."""

        def __init__(self, label: str):
            self.label = label
            self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            self.dc = None
            self.received: list[str] = []
            self.status: int | None = None
            self.headers = None
            self.location: str | None = None
            self.base = ""
            self.token = ""

            @self.pc.on("connectionstatechange")
            def _state():  # noqa: ANN202
                pass

        def open_control(self) -> None:
            self.dc = self.pc.createDataChannel("control")

            @self.dc.on("message")
            def _on_message(msg):  # noqa: ANN001, ANN202
                self.received.append(msg if isinstance(msg, str) else msg.decode(errors="replace"))

        def dc_open(self) -> bool:
            return self.dc is not None and self.dc.readyState == "open"

        async def signal(self, base: str, path: str, token: str) -> None:
            """Non-trickle offer/answer over WHIP/WHEP; raises on a non-201."""
            self.base, self.token = base, token
            await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers all candidates
            status, headers, body = await http_request(
                "POST", base + path, token=token, body=self.pc.localDescription.sdp)
            self.status, self.headers = status, headers
            assert status == 201, f"{self.label}: POST {path} -> {status}: {body!r}"
            assert headers.get("Content-Type", "").startswith("application/sdp"), \
                f"{self.label}: answer content type {headers.get('Content-Type')!r}"
            self.location = headers.get("Location")
            assert self.location, f"{self.label}: 201 without Location"
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

        async def wait_connected(self, timeout: float = 15.0) -> None:
            await wait_for(lambda: self.pc.connectionState == "connected", timeout,
                           f"{self.label} connectionState=connected (now {self.pc.connectionState})")

        async def close(self, delete: bool = True) -> int | None:
            """DELETE the resource (returns its status) and close the peer connection."""
            status = None
            if delete and self.location:
                try:
                    status, _, _ = await http_request("DELETE", absolute(self.base, self.location),
                                                      token=self.token, timeout=5)
                except Exception:  # noqa: BLE001 - best effort at teardown
                    status = None
            await self.pc.close()
            return status

    class Publisher(Peer):
        """aiortc WHIP publisher: moving H.264 video + a `control` data channel."""

        def __init__(self, label: str = "publisher", video: bool = True, control: bool = True):
            super().__init__(label)
            self.track = None
            if video:
                self.track = MovingPatternTrack()
                _h264_first(self.pc.addTransceiver(self.track, direction="sendonly"))
            if control:
                self.open_control()
            self._ticker = None

        @classmethod
        async def connect(cls, base: str, room: str, token: str = PUB_TOKEN, **kw) -> "Publisher":
            p = cls(**kw)
            await p.signal(base, f"/whip/{room}", token)
            return p

        def start_ticks(self, interval: float = 0.5) -> None:
            """Send `pub-tick-N` on `control` every interval (for late-joining viewers)."""

            async def tick():
                n = 0
                while True:
                    if self.dc_open():
                        self.dc.send(f"pub-tick-{n}")
                        n += 1
                    await asyncio.sleep(interval)

            self._ticker = asyncio.ensure_future(tick())

        async def close(self, delete: bool = True) -> int | None:
            if self._ticker:
                self._ticker.cancel()
            return await super().close(delete)

    class Viewer(Peer):
        """aiortc WHEP viewer counting decoded video frames."""

        def __init__(self, label: str = "viewer", control: bool = False):
            super().__init__(label)
            self.frames = 0
            self.size = None
            self._tasks = []
            self.pc.addTransceiver("video", direction="recvonly")
            if control:
                self.open_control()

            @self.pc.on("track")
            def _on_track(track):  # noqa: ANN001, ANN202
                if track.kind == "video":
                    self._tasks.append(asyncio.ensure_future(self._count(track)))

        async def _count(self, track) -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.frames += 1
                self.size = (frame.width, frame.height)

        @property
        def role(self) -> str | None:
            return self.headers.get("X-Edgerelay-Role") if self.headers else None

        @classmethod
        async def connect(cls, base: str, room: str, token: str = VIEW_TOKEN, **kw) -> "Viewer":
            v = cls(**kw)
            await v.signal(base, f"/whep/{room}", token)
            return v

        async def wait_frames(self, n: int, timeout: float) -> None:
            await wait_for(lambda: self.frames >= n, timeout,
                           f"{self.label} to decode {n} frames (has {self.frames}, "
                           f"state {self.pc.connectionState})")

        async def close(self, delete: bool = True) -> int | None:
            for t in self._tasks:
                t.cancel()
            return await super().close(delete)

    async def make_offer(kind: str) -> str:
        """A valid, complete SDP offer (publisher- or viewer-shaped) from a throwaway peer."""
        p = Publisher(label="probe") if kind == "publish" else Viewer(label="probe", control=True)
        try:
            await p.pc.setLocalDescription(await p.pc.createOffer())
            return p.pc.localDescription.sdp
        finally:
            await p.pc.close()


# --------------------------------------------------------------------------------------------
# Chromium
# --------------------------------------------------------------------------------------------


async def run_node_driver(request, tmp_path: Path, script: str, opts: dict, *, name: str,
                          bound: float, what: str = "chromium driver",
                          prefix: str = "") -> tuple[list[dict], dict, int | None]:
    """Run the node driver ``script`` (in this directory) with ``opts`` as its JSON argument.

    Every stdout line goes to ``<name>.log`` (attached to the report on failure) and is parsed
    as a JSON event. Fails the test if it runs longer than ``bound`` seconds, emits an
    ``error`` event or exits without a ``result`` event. Returns (events, last result,
    exit code); ``what`` and ``prefix`` only shape the failure messages.
    """
    log_path = tmp_path / f"{name}.log"
    attach_log(request, f"{name} driver output", log_path)
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / script), json.dumps(opts), cwd=str(HERE),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    events: list[dict] = []
    with open(log_path, "w") as log:
        try:
            async with asyncio.timeout(bound):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    text = line.decode(errors="replace").rstrip()
                    log.write(text + "\n")
                    log.flush()
                    try:
                        events.append(json.loads(text))
                    except ValueError:
                        events.append({"event": "raw", "text": text})
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{prefix}{what} did not finish within {bound}s")
    errors = [e for e in events if e.get("event") == "error"]
    assert not errors, f"{prefix}chromium driver error: {errors[0].get('error')}"
    results = [e for e in events if e.get("event") == "result"]
    assert results, f"{prefix}chromium driver exited {proc.returncode} without a result"
    return events, results[-1], proc.returncode


async def run_chromium(request, tmp_path: Path, base: str, room: str, *, token: str = VIEW_TOKEN,
                       seconds: float = 15, min_frames: int = 30, data_channel: bool = False,
                       send_messages: list[str] | None = None, wait_messages: int = 0,
                       name: str = "chromium") -> dict:
    """Run chromium_whep.mjs; returns {"result": {...}, "events": [...]} (log attached on failure)."""
    opts = {
        "base": base, "room": room, "token": token, "seconds": seconds, "minFrames": min_frames,
        "dataChannel": data_channel, "sendMessages": send_messages or [], "waitMessages": wait_messages,
        "executablePath": CHROMIUM,
    }
    events, result, returncode = await run_node_driver(
        request, tmp_path, "chromium_whep.mjs", opts, name=name, bound=seconds + 60)
    return {"result": result, "events": events, "returncode": returncode}


# --------------------------------------------------------------------------------------------
# simple-whip-client
# --------------------------------------------------------------------------------------------

WHIP_CLIENT_VIDEO = (
    "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 ! "
    "videoconvert ! queue ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 ! "
    "video/x-h264,profile=constrained-baseline ! rtph264pay config-interval=-1 pt=96 ! queue ! "
    "application/x-rtp,media=video,encoding-name=H264,payload=96"
)


@pytest.fixture(scope="session")
def gupnp_stub_dir(tmp_path_factory) -> Path | None:
    """Directory holding a build of gupnp_igd_stub.c as libgupnp-igd-1.0.so.4 (see that file:
    without it Debian 12's whip-client aborts on a libsoup2/libsoup3 clash), or None if no
    C compiler is available."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = tmp_path_factory.mktemp("gupnp-stub")
    lib = out / "libgupnp-igd-1.0.so.4"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), "-Wl,-soname,libgupnp-igd-1.0.so.4",
                    str(HERE / "gupnp_igd_stub.c")], check=True, timeout=60)
    return out


# whip-client asks webrtcbin for max-bundle only when it has both audio and video (with a single
# pipeline its offer has no a=group:BUNDLE), so the tests publish both.
WHIP_CLIENT_AUDIO = (
    "audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! queue ! "
    "opusenc ! rtpopuspay pt=111 ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111"
)


class WhipClient:
    """Debian's simple-whip-client (`whip-client`) publishing a GStreamer test pattern
    (non-trickle: candidates in the offer).

    libnice ignores loopback interfaces and pins each host-candidate socket to its interface
    (IP_UNICAST_IF), so whip-client cannot reach an edge on 127.0.0.1: the test runs it in a
    network namespace (``prefix``) and the edge on the host end of the veth pair."""

    def __init__(self, request, tmp_path: Path, url: str, token: str = PUB_TOKEN,
                 video: str | None = WHIP_CLIENT_VIDEO, audio: str | None = WHIP_CLIENT_AUDIO,
                 stub_dir: Path | None = None, prefix: list[str] | None = None):
        exe = shutil.which("whip-client") or shutil.which("simple-whip-client")
        if exe is None:
            pytest.skip("simple-whip-client (whip-client) not installed")
        self.log_path = tmp_path / "whip-client.log"
        attach_log(request, "whip-client output", self.log_path)
        self.args = (prefix or []) + [exe, "-u", url, "-t", token, "-n", "-o", "-l", "5"]
        if video:
            self.args += ["-V", video]
        if audio:
            self.args += ["-A", audio]
        with open(self.log_path, "wb") as log:
            env = dict(os.environ)
            env.setdefault("GST_DEBUG", "2")
            if stub_dir is not None:
                env["LD_LIBRARY_PATH"] = f"{stub_dir}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def log(self) -> str:
        return _tail(self.log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # lets it DELETE its WHIP resource
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def pytest_report_header(config):  # noqa: ANN001, ANN201
    return [f"edgerelay binary: {EDGE_BIN} (exists: {EDGE_BIN.exists()})",
            f"python: {sys.version.split()[0]}, aiortc available: {HAVE_AIORTC}"]
