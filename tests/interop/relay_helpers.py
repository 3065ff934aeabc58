"""Helpers for the built-in TURN interop tests (test_relay.py, test_nat.py).

- ``turn_config`` / ``self_signed_cert``: a temp edge TOML enabling ``[turn]`` on ephemeral ports
  (UDP, TCP and TLS with a fresh openssl certificate).
- ``start_turn_edge``: the harness's ``edge_factory`` with ``--config`` plus the TURN URLs parsed
  from the ``EDGERELAY_READY`` line (the harness keeps only one ``turn=`` key).
- ``scrape_metrics``, ``get_ice_servers``, ``parse_link_headers``, ``for_transport``.
- ``EdgePublisher``: ``edgerelay publish`` (the built-in synthetic H.264 publisher) as a subprocess.
- ``run_relay_chromium``: drives ``relay_chromium.mjs`` (Chromium with explicit ICE servers and
  ``iceTransportPolicy``; signalling from node so the browser may run in a namespace).

Every wait is bounded; failures carry the edge's stderr (the harness attaches it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    CHROMIUM,
    EDGE_BIN,
    PUB_TOKEN,
    VIEW_TOKEN,
    attach_log,
    http_request,
    run_node_driver,
)

def _tail(path: Path, max_chars: int = 20000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return text[-max_chars:]


# --------------------------------------------------------------------------------------------
# edge with TURN
# --------------------------------------------------------------------------------------------


def self_signed_cert(tmp_path: Path, ip: str) -> tuple[Path, Path]:
    """A fresh self-signed P-256 certificate for ``ip`` and ``localhost`` (openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (needed for the TURNS certificate)")
    cert, key = tmp_path / "turn-cert.pem", tmp_path / "turn-key.pem"
    r = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", f"subjectAltName=DNS:localhost,IP:{ip}"],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"openssl req failed: {r.stderr}"
    return cert, key


def turn_config(tmp_path: Path, ip: str = "127.0.0.1", *, tls: bool = True) -> Path:
    """An edge TOML with the built-in TURN on ephemeral ports of ``ip`` (UDP, TCP, TLS)."""
    lines = [
        "[turn]",
        "enabled = true",
        "credential_ttl_secs = 600",
        "[turn.server]",
        f'listen_udp = ["{ip}:0"]',
        f'listen_tcp = ["{ip}:0"]',
        f'relay_ip = "{ip}"',
        "relay_port_min = 0",
        "relay_port_max = 0",
        # A fixed secret so the test can also check credentials it computes itself.
        'rest_secrets = ["interop-turn-secret"]',
    ]
    if tls:
        cert, key = self_signed_cert(tmp_path, ip)
        lines += [f'listen_tls = ["{ip}:0"]', f'tls_cert = "{cert}"', f'tls_key = "{key}"']
    path = tmp_path / "edge-turn.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ready_turn_urls(edge) -> list[str]:
    """All ``turn=`` URLs of the edge's READY line."""
    stdout = Path(edge.log_path).with_suffix(".stdout")
    for line in stdout.read_text(errors="replace").splitlines():
        if line.startswith("EDGERELAY_READY"):
            return [tok.split("=", 1)[1] for tok in line.split()[1:] if tok.startswith("turn=")]
    raise AssertionError(f"no READY line in {stdout}")


def start_turn_edge(edge_factory, tmp_path: Path, ip: str = "127.0.0.1", *, tls: bool = True):
    """Starts an edge with TURN on ``ip``; returns ``(edge, turn_urls)``."""
    cfg = turn_config(tmp_path, ip, tls=tls)
    edge = edge_factory(ip=ip, extra_args=["--config", str(cfg)])
    urls = ready_turn_urls(edge)
    want = 3 if tls else 2
    assert len(urls) == want, (
        f"READY line advertises {len(urls)} TURN URLs, want {want} (udp, tcp{', tls' if tls else ''}): "
        f"{urls}\nstderr:\n{edge.logs()}")
    return edge, urls


async def scrape_metrics(edge) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}``."""
    status, _, body = await http_request("GET", edge.http + "/metrics", content_type=None)
    assert status == 200, f"/metrics -> {status}: {body[:200]!r}"
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


async def get_ice_servers(edge, token: str = VIEW_TOKEN) -> list[dict]:
    """``GET /api/ice-servers`` with the viewer token (asserts a 200 JSON list)."""
    status, _, body = await http_request("GET", edge.http + "/api/ice-servers", token=token,
                                         content_type=None)
    assert status == 200, f"/api/ice-servers -> {status}: {body!r}"
    servers = json.loads(body)
    assert isinstance(servers, list) and servers, f"/api/ice-servers: {body!r}"
    for s in servers:
        assert set(s) >= {"urls", "username", "credential"}, f"/api/ice-servers entry {s}"
    return servers


_LINK_RE = re.compile(r'<([^>]*)>((?:\s*;\s*[A-Za-z-]+\s*=\s*(?:"[^"]*"|[^;,]*))*)')
_PARAM_RE = re.compile(r';\s*([A-Za-z-]+)\s*=\s*(?:"([^"]*)"|([^;,]*))')


def parse_link_headers(values: list[str]) -> list[dict]:
    """RFC 9725 ``Link: <url>; rel="ice-server"; username=..; credential=..`` headers -> ICE
    server dicts (one per URL), ignoring links of other relations."""
    servers = []
    for value in values:
        for m in _LINK_RE.finditer(value):
            params = {k.lower(): (q if q != "" or u is None else u.strip())
                      for k, q, u in _PARAM_RE.findall(m.group(2))}
            if params.get("rel") != "ice-server":
                continue
            s = {"urls": [m.group(1)]}
            if "username" in params:
                s["username"] = params["username"]
            if "credential" in params:
                s["credential"] = params["credential"]
            servers.append(s)
    return servers


def url_transport(url: str) -> str:
    """``udp``, ``tcp`` or ``tls`` for a ``turn:``/``turns:`` URL."""
    if url.startswith("turns:"):
        return "tls"
    m = re.search(r"[?&]transport=(udp|tcp)", url)
    return m.group(1) if m else "udp"


def for_transport(servers: list[dict], transport: str) -> list[dict]:
    """The servers restricted to URLs of one transport (``udp``/``tcp``/``tls``); asserts one."""
    out = []
    for s in servers:
        urls = s["urls"] if isinstance(s["urls"], list) else [s["urls"]]
        keep = [u for u in urls if url_transport(u) == transport]
        if keep:
            out.append({**s, "urls": keep})
    assert out, f"no {transport} TURN URL in {servers}"
    return out


# --------------------------------------------------------------------------------------------
# publisher: `edgerelay publish`
# --------------------------------------------------------------------------------------------


class EdgePublisher:
    """``edgerelay publish`` (synthetic H.264, 320x240 30 fps) into ``room`` of the edge."""

    def __init__(self, request, tmp_path: Path, edge, room: str, seconds: int = 120,
                 name: str = "publisher"):
        self.edge, self.room = edge, room
        self.log_path = tmp_path / f"{name}.log"
        attach_log(request, f"{name} (edgerelay publish) output", self.log_path)
        args = [str(EDGE_BIN), "publish", "--whip", f"{edge.http}/whip/{room}", "--token", PUB_TOKEN,
                "--width", "320", "--height", "240", "--fps", "30", "--bitrate-kbps", "600",
                "--keyframe-interval-ms", "1000", "--seconds", str(seconds)]
        env = dict(os.environ, NO_COLOR="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def logs(self) -> str:
        return _tail(self.log_path)

    async def wait_live(self, timeout: float = 15.0) -> None:
        """Until ``/api/rooms`` shows the room with its publisher connected."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"edgerelay publish exited with {self.proc.returncode}:\n{self.logs()}")
            status, _, body = await http_request("GET", self.edge.http + "/api/rooms",
                                                 content_type=None)
            last = (status, body)
            if status == 200:
                for r in json.loads(body):
                    if r.get("name") == self.room and r.get("publisher"):
                        return
            await asyncio.sleep(0.2)
        raise AssertionError(f"publisher not live in room {self.room} within {timeout}s "
                             f"(/api/rooms: {last}); publisher output:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# --------------------------------------------------------------------------------------------
# Chromium with explicit ICE servers
# --------------------------------------------------------------------------------------------


async def run_relay_chromium(request, tmp_path: Path, whep: str, ice_servers: list[dict], *,
                             policy: str = "relay", token: str = VIEW_TOKEN, seconds: float = 15,
                             min_frames: int = 30, full_duration: bool = False,
                             executable: str = CHROMIUM, extra_args: list[str] | None = None,
                             name: str = "chromium") -> dict:
    """Runs relay_chromium.mjs; returns its final ``result`` event plus ``events``."""
    opts = {
        "whep": whep, "token": token, "iceServers": ice_servers, "iceTransportPolicy": policy,
        "seconds": seconds, "minFrames": min_frames, "fullDuration": full_duration,
        "executablePath": executable, "extraArgs": extra_args or [],
    }
    events, result, _ = await run_node_driver(
        request, tmp_path, "relay_chromium.mjs", opts, name=name, bound=seconds + 60,
        what="relay chromium driver", prefix=f"{name}: ")
    res = dict(result)
    res["events"] = events
    return res


def summary(res: dict) -> str:
    """A one-line digest of a Chromium result for assertion messages."""
    keys = ("framesDecoded", "packetsReceived", "iceState", "connState", "localCandidate",
            "remoteCandidate", "candidates", "whep")
    return json.dumps({k: res.get(k) for k in keys})


# --------------------------------------------------------------------------------------------
# aiortc relay-only viewer
# --------------------------------------------------------------------------------------------


def relay_viewer(ice_servers: list[dict], label: str = "relay-viewer"):
    """The harness's aiortc WHEP ``Viewer`` but with ``ice_servers`` and
    ``iceTransportPolicy=RELAY`` (aioice gathers no host candidates then, and uses only the
    first TURN server/URL, so pass exactly the one to test)."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection

    from conftest import Viewer

    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=s["urls"], username=s.get("username"),
                                 credential=s.get("credential")) for s in ice_servers],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY)

    class RelayViewer(Viewer):
        # Peer.__init__ assigns a default RTCPeerConnection(iceServers=[]); this property swaps
        # in one with the relay configuration before any transceiver is added.
        @property
        def pc(self):  # noqa: ANN202
            return self._relay_pc

        @pc.setter
        def pc(self, _default) -> None:  # noqa: ANN001
            self._relay_pc = RTCPeerConnection(config)

    return RelayViewer(label=label)


# --------------------------------------------------------------------------------------------
# NAT: viewer namespace behind a masquerading, firewalled NAT namespace
# --------------------------------------------------------------------------------------------


def _run(args: list[str], check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def require_netns_root() -> None:
    """Skip unless running as root with ``ip netns`` and ``nft`` available."""
    if os.geteuid() != 0:
        pytest.skip("NAT test needs root (network namespaces, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"NAT test needs `{tool}` (iproute2 / nftables)")
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"`ip netns` unavailable: {r.stderr.strip()}")


class NatTopology:
    """host (edge) <-veth-> ``er-nat-<tag>`` (masquerade + firewall) <-veth-> ``er-viewer-<tag>``.

    Addresses: host ``10.214.N.1``/30 <-> nat ``10.214.N.2``/30; nat ``10.215.N.1``/30 <->
    viewer ``10.215.N.2``/30 (default route via the nat). The nat namespace forwards only what
    ``firewall()`` allows from the viewer to the edge, plus established/related replies, and
    masquerades everything it forwards to the host side. ``close()`` removes the nft table, both
    namespaces and the host-side veth (idempotent)."""

    TABLE = "ernat"

    def __init__(self):
        require_netns_root()
        self.tag = os.urandom(3).hex()
        self.nat, self.viewer = f"er-nat-{self.tag}", f"er-viewer-{self.tag}"
        self.veth_host, self.veth_nat_up = f"erh{self.tag}", f"eru{self.tag}"
        self.veth_nat_down, self.veth_viewer = f"erd{self.tag}", f"erv{self.tag}"
        used = _run(["ip", "-4", "-o", "addr"], check=False).stdout
        n = next((i for i in (int.from_bytes(os.urandom(1), "big") for _ in range(64))
                  if f"10.214.{i}." not in used), 77)
        self.host_ip, self.nat_up_ip = f"10.214.{n}.1", f"10.214.{n}.2"
        self.nat_down_ip, self.viewer_ip = f"10.215.{n}.1", f"10.215.{n}.2"
        self._created: list[str] = []
        try:
            self._build()
        except RuntimeError as e:
            self.close()
            if "Operation not permitted" in str(e) or "not supported" in str(e).lower():
                pytest.skip(f"cannot build network namespaces here: {e}")
            raise

    def _build(self) -> None:
        for ns in (self.nat, self.viewer):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        ip = lambda *a: _run(["ip", *a])  # noqa: E731
        ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_nat_up)
        ip("link", "set", self.veth_nat_up, "netns", self.nat)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        ip("link", "set", self.veth_host, "up")
        ip("-n", self.nat, "link", "add", self.veth_nat_down, "type", "veth", "peer", "name", self.veth_viewer)
        ip("-n", self.nat, "link", "set", self.veth_viewer, "netns", self.viewer)
        ip("-n", self.nat, "addr", "add", f"{self.nat_up_ip}/30", "dev", self.veth_nat_up)
        ip("-n", self.nat, "addr", "add", f"{self.nat_down_ip}/30", "dev", self.veth_nat_down)
        for dev in ("lo", self.veth_nat_up, self.veth_nat_down):
            ip("-n", self.nat, "link", "set", dev, "up")
        ip("-n", self.viewer, "addr", "add", f"{self.viewer_ip}/30", "dev", self.veth_viewer)
        for dev in ("lo", self.veth_viewer):
            ip("-n", self.viewer, "link", "set", dev, "up")
        ip("-n", self.viewer, "route", "add", "default", "via", self.nat_down_ip)
        _run(["ip", "netns", "exec", self.nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def firewall(self, edge_ip: str, turn_udp: list[int], turn_tcp: list[int], media_port: int) -> None:
        """Forward from the viewer only UDP to ``turn_udp`` and TCP to ``turn_tcp`` on
        ``edge_ip``; count (then drop) attempts on the SFU's media port; drop all else."""
        allow = ""
        for proto, ports in (("udp", turn_udp), ("tcp", turn_tcp)):
            if ports:
                allow += (f'        iifname "{self.veth_nat_down}" ip daddr {edge_ip} {proto} dport '
                          f'{{ {", ".join(str(p) for p in ports)} }} counter accept\n')
        rules = f"""
table inet {self.TABLE} {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
{allow}        iifname "{self.veth_nat_down}" ip daddr {edge_ip} udp dport {media_port} counter drop comment "media"
        counter drop comment "other"
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{self.veth_nat_up}" masquerade
    }}
}}
"""
        r = subprocess.run(["ip", "netns", "exec", self.nat, "nft", "-f", "-"], input=rules,
                           capture_output=True, text=True, timeout=15)
        if r.returncode != 0:
            raise RuntimeError(f"nft -f (in {self.nat}) failed: {r.stderr.strip()}\n{rules}")

    def open_udp(self, edge_ip: str, port: int) -> None:
        """Inserts an accept rule for UDP from the viewer to ``edge_ip:port`` (a control run)."""
        _run(["ip", "netns", "exec", self.nat, "nft", "insert", "rule", "inet", self.TABLE, "forward",
              "iifname", self.veth_nat_down, "ip", "daddr", edge_ip, "udp", "dport", str(port), "accept"])

    def drop_counts(self) -> dict[str, int]:
        """Packets dropped by the ``media`` and ``other`` rules so far."""
        out = _run(["ip", "netns", "exec", self.nat, "nft", "list", "chain", "inet", self.TABLE,
                    "forward"]).stdout
        counts = {}
        for line in out.splitlines():
            m = re.search(r'counter packets (\d+) bytes \d+ drop comment "(\w+)"', line)
            if m:
                counts[m.group(2)] = int(m.group(1))
        return counts

    def ruleset(self) -> str:
        return _run(["ip", "netns", "exec", self.nat, "nft", "list", "ruleset"], check=False).stdout

    def chromium_wrapper(self, tmp_path: Path) -> str:
        """An executable that runs Chromium inside the viewer namespace (playwright's pipe
        file descriptors pass through ``ip netns exec``)."""
        path = tmp_path / "chromium-in-viewer-ns.sh"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.viewer} {CHROMIUM} "$@"\n')
        path.chmod(0o755)
        return str(path)

    def close(self) -> None:
        if self.nat in self._created:
            _run(["ip", "netns", "exec", self.nat, "nft", "delete", "table", "inet", self.TABLE],
                 check=False)
        for ns in reversed(self._created):
            _run(["ip", "netns", "del", ns], check=False)
        self._created.clear()
        # Deleting the nat namespace destroys its veth ends (and so their peers); make sure.
        _run(["ip", "link", "del", self.veth_host], check=False)
