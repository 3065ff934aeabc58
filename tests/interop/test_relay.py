"""Viewers reach the SFU only through the edge's built-in TURN server (relay-only ICE).

The edge runs with ``[turn] enabled`` on ephemeral loopback ports (UDP, TCP, TLS with a fresh
self-signed certificate); ``edgerelay publish`` feeds a room; the viewers force
``iceTransportPolicy: relay``, so media can only flow client -> TURN -> in-process hand-off ->
SFU and back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import random
import socket
import time

import pytest

from conftest import VIEW_TOKEN, Viewer, http_request, require_aiortc, require_chromium, run
from relay_helpers import (
    EdgePublisher,
    for_transport,
    get_ice_servers,
    parse_link_headers,
    relay_viewer,
    run_relay_chromium,
    scrape_metrics,
    start_turn_edge,
    summary,
    url_transport,
)

HANDOFF_IN = "edgerelay_turn_handoff_in_total"
HANDOFF_OUT = "edgerelay_turn_handoff_out_total"
MEDIA_SENDS = "edgerelay_turn_media_sends_total"
ALLOCATIONS_CREATED = "edgerelay_turn_allocations_created_total"


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_chromium_relay_only(edge_factory, request, tmp_path, transport):
    """Chromium, relay-only, ICE servers from /api/ice-servers restricted to one transport:
    the selected pair's local candidate is a relay of that protocol and video decodes."""
    require_chromium()
    edge, _ = start_turn_edge(edge_factory, tmp_path)
    pub = EdgePublisher(request, tmp_path, edge, "relay")

    async def scenario():
        await pub.wait_live()
        servers = for_transport(await get_ice_servers(edge), transport)
        before = await scrape_metrics(edge)
        res = await run_relay_chromium(
            request, tmp_path, f"{edge.http}/whep/relay", servers, policy="relay", seconds=20,
            min_frames=30, extra_args=["--ignore-certificate-errors"] if transport == "tls" else [])
        after = await scrape_metrics(edge)
        return servers, before, res, after

    try:
        servers, before, res, after = run(scenario(), timeout=90)
    finally:
        pub.stop()
    edge.assert_alive()
    digest = summary(res)
    assert res["whep"]["status"] == 201, f"WHEP: {res['whep']}"
    # The offer carries relay candidates only (and at least one).
    cands = res["candidates"]
    assert cands, f"Chromium gathered no candidate from {servers}: {digest}"
    assert all(" typ relay" in c for c in cands), f"non-relay candidate in a relay-only offer: {cands}"
    assert res["framesDecoded"] > 30, (
        f"relay-only over {transport}: only {res['framesDecoded']} frames decoded in 20 s: {digest}")
    local, remote = res["localCandidate"], res["remoteCandidate"]
    assert local and local["type"] == "relay", f"selected local candidate is not relay: {digest}"
    assert local["relayProtocol"] == transport, (
        f"selected relay candidate uses relayProtocol {local['relayProtocol']!r}, want {transport!r}: {digest}")
    media_port = int(edge.media.rsplit(":", 1)[1])
    assert remote and remote["port"] == media_port, (
        f"remote candidate should be the SFU's media port {media_port}: {digest}")
    # The SFU got the viewer's packets through the in-process hand-off, and answered through
    # TURN: from its media thread over UDP, through the hand-off over TCP/TLS.
    d_in = after.get(HANDOFF_IN, 0) - before.get(HANDOFF_IN, 0)
    assert after.get(ALLOCATIONS_CREATED, 0) - before.get(ALLOCATIONS_CREATED, 0) >= 1, (
        f"no TURN allocation counted: {after.get(ALLOCATIONS_CREATED)}")
    assert d_in > 0, f"{HANDOFF_IN} did not grow ({before.get(HANDOFF_IN)} -> {after.get(HANDOFF_IN)})"
    _check_way_back(before, after, transport)


def _check_rest_credentials(server: dict, secret: str, ttl: int) -> None:
    user, cred = server["username"], server["credential"]
    expiry, _, name = user.partition(":")
    assert expiry.isdigit() and name, f"REST username not '<expiry>:<user>': {user!r}"
    now = time.time()
    assert now < int(expiry) <= now + ttl + 5, f"REST expiry {expiry} not within ttl {ttl}s of now {now:.0f}"
    want = base64.b64encode(hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest()).decode()
    assert cred == want, f"credential for {user!r} is {cred!r}, want base64(HMAC-SHA1(secret, user)) {want!r}"


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_aiortc_relay_only_via_link_header_servers(edge_factory, request, tmp_path, monkeypatch, transport):
    """aiortc, relay-only over one transport, with the ICE server taken from a WHEP 201's
    ``Link`` headers: decodes frames, and the edge counts the packets the TURN server handed to
    the SFU in-process (``edgerelay_turn_handoff_in_total``)."""
    require_aiortc()
    edge, ready_urls = start_turn_edge(edge_factory, tmp_path)
    # aioice verifies the TURNS certificate against the default store: trust the test's own.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "turn-cert.pem"))
    pub = EdgePublisher(request, tmp_path, edge, "relay-aio")

    async def scenario():
        await pub.wait_live()
        # A first (direct) viewer: its 201 carries the Link headers.
        probe = await Viewer.connect(edge.http, "relay-aio", label="probe")
        try:
            links = probe.headers.getall("Link", [])
        finally:
            await probe.close()
        link_servers = parse_link_headers(links)
        api = await get_ice_servers(edge)

        # Link headers: one per URL, same URLs as /api/ice-servers and the READY line, valid creds.
        assert len(link_servers) == 3, f"want 3 Link ice-server headers (udp, tcp, tls), got {links}"
        assert sorted(u for s in link_servers for u in s["urls"]) == sorted(ready_urls), (
            f"Link URLs {link_servers} differ from READY URLs {ready_urls}")
        assert sorted(u for s in api for u in s["urls"]) == sorted(ready_urls), (
            f"/api/ice-servers URLs {api} differ from READY URLs {ready_urls}")
        assert sorted(url_transport(u) for u in ready_urls) == ["tcp", "tls", "udp"], ready_urls
        for s in link_servers + api:
            _check_rest_credentials(s, "interop-turn-secret", 600)

        chosen = for_transport(link_servers, transport)[:1]  # aioice uses only the first server
        before = await scrape_metrics(edge)
        viewer = relay_viewer(chosen, label=f"aiortc-relay-{transport}")
        try:
            await viewer.signal(edge.http, "/whep/relay-aio", VIEW_TOKEN)
            offer = viewer.pc.localDescription.sdp
            cands = [l for l in offer.splitlines() if l.startswith("a=candidate:")]
            assert cands and all(" typ relay" in c for c in cands), (
                f"aiortc relay-only offer over {transport} must carry relay candidates only, and at least "
                f"one (none means the TURN allocation failed): {cands}")
            await viewer.wait_connected(15)
            await viewer.wait_frames(30, 20)
            pair = viewer.pc.getTransceivers()[0].receiver.transport.transport \
                .iceGatherer._connection._nominated.get(1)
            after = await scrape_metrics(edge)
            return viewer.frames, viewer.size, pair, before, after
        finally:
            await viewer.close()

    try:
        frames, size, pair, before, after = run(scenario(), timeout=90)
    finally:
        pub.stop()
    edge.assert_alive()
    assert frames >= 30 and size == (320, 240), f"aiortc relay viewer decoded {frames} frames of {size}"
    assert pair is not None and pair.local_candidate.type == "relay", (
        f"aiortc nominated pair is not relayed: {pair}")
    allocations = after.get(ALLOCATIONS_CREATED, 0) - before.get(ALLOCATIONS_CREATED, 0)
    assert allocations >= 1, f"no TURN allocation over {transport} counted"
    d_in = after.get(HANDOFF_IN, 0) - before.get(HANDOFF_IN, 0)
    assert d_in > 0, (
        f"{HANDOFF_IN} did not grow ({before.get(HANDOFF_IN)} -> {after.get(HANDOFF_IN)}): "
        f"the viewer's packets did not reach the SFU through the in-process hand-off")
    _check_way_back(before, after, transport)


def _check_way_back(before, after, transport):
    """Video went back to the relayed viewer: over UDP the media thread frames and sends it
    itself (ChannelData from the TURN listener), over TCP/TLS it takes the hand-off to the TURN
    thread (which frames it on the stream)."""
    d_out = after.get(HANDOFF_OUT, 0) - before.get(HANDOFF_OUT, 0)
    d_media = after.get(MEDIA_SENDS, 0) - before.get(MEDIA_SENDS, 0)
    if transport == "udp":
        assert d_media > 30, f"{MEDIA_SENDS} grew by only {d_media} (hand-off: {d_out})"
    else:
        assert d_out > 30, f"{HANDOFF_OUT} grew by only {d_out}: video did not go back through TURN"
        assert d_media == 0, f"{MEDIA_SENDS} grew by {d_media} for a {transport} allocation"


def test_direct_viewer_on_a_port_a_relay_gave_up(edge_factory, request, tmp_path):
    """A client that binds a port the TURN server's relay just released (same IP: the same
    host, or loopback here) is a direct viewer: the edge must answer its ICE checks on the
    media socket, not send them into the ended allocation. Before the fix, the media thread
    kept the address marked as relayed for an hour and the viewer never connected (1-3 of
    200 direct viewers in the bench's later rounds on one edge)."""
    require_aiortc()
    # Imported here: without aiortc (and its aioice) the test is skipped, not an import error.
    from aioice import stun
    from aioice.turn import create_turn_endpoint
    from aiortc import RTCPeerConnection

    edge, _ = start_turn_edge(edge_factory, tmp_path, tls=False)
    pub = EdgePublisher(request, tmp_path, edge, "reuse")

    class Sink(asyncio.DatagramProtocol):
        pass

    def sdp_value(sdp: str, attr: str) -> str:
        """The value of the first ``a=<attr>:`` line."""
        return next(l for l in sdp.splitlines() if l.startswith(f"a={attr}:")).split(":", 1)[1].strip()

    async def binding(sock: socket.socket, media: tuple[str, int], ufrags: str, pwd: str):
        """Sends ICE checks (aioice's STUN codec) until a success response comes back (3 s)."""
        loop = asyncio.get_running_loop()
        tid = os.urandom(12)
        msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST,
                           transaction_id=tid)
        msg.attributes["USERNAME"] = ufrags
        msg.attributes["PRIORITY"] = 1853824767
        msg.attributes["ICE-CONTROLLING"] = random.getrandbits(64)
        msg.attributes["USE-CANDIDATE"] = None
        msg.add_message_integrity(pwd.encode())
        msg.add_fingerprint()
        for _ in range(15):
            sock.sendto(bytes(msg), media)
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.2)
            except asyncio.TimeoutError:
                continue
            reply = stun.parse_message(data)
            if reply.transaction_id == tid:
                return reply
        return None

    async def scenario():
        await pub.wait_live()
        server = for_transport(await get_ice_servers(edge), "udp")[0]
        host, port = server["urls"][0].split(":", 1)[1].split("?")[0].rsplit(":", 1)
        # The media address, from a first answer's candidate.
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        await pc.close()
        status, _, answer = await http_request("POST", edge.http + "/whep/reuse", token=VIEW_TOKEN,
                                               body=offer)
        assert status == 201, f"WHEP POST -> {status}: {answer[:300]}"
        cand = next(l for l in answer.splitlines() if l.startswith("a=candidate:") and " udp " in l.lower())
        f = cand.split()
        media = (f[4], int(f[5]))

        # 1. A TURN allocation that talks to the SFU (its relayed address reaches the media
        #    thread through the hand-off), then is deleted (Refresh, LIFETIME 0).
        turn, _ = await create_turn_endpoint(Sink, (host, int(port)), server["username"],
                                             server["credential"])
        relayed = turn.get_extra_info("sockname")
        for _ in range(5):
            turn.sendto(b"\x00\x01\x00\x00" + os.urandom(16), media)
            await asyncio.sleep(0.05)
        before = await scrape_metrics(edge)
        turn.close()
        await asyncio.sleep(0.5)

        # 2. A direct client on the released port, with a session of its own.
        sock = None
        for _ in range(20):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(tuple(relayed))
                break
            except OSError:
                sock.close()
                sock = None
                await asyncio.sleep(0.1)
        assert sock is not None, f"relay port {relayed} was not released after the allocation was deleted"
        sock.setblocking(False)
        try:
            status, _, answer = await http_request("POST", edge.http + "/whep/reuse", token=VIEW_TOKEN,
                                                   body=offer)
            assert status == 201, f"second WHEP POST -> {status}: {answer[:300]}"
            ufrags = f"{sdp_value(answer, 'ice-ufrag')}:{sdp_value(offer, 'ice-ufrag')}"
            reply = await binding(sock, media, ufrags, sdp_value(answer, "ice-pwd"))
        finally:
            sock.close()
        return before, relayed, reply

    try:
        before, relayed, reply = run(scenario(), timeout=60)
    finally:
        pub.stop()
    edge.assert_alive()
    assert before.get(HANDOFF_IN, 0) >= 1, f"the allocation's packets never reached the SFU: {before}"
    assert reply is not None, (
        f"no ICE answer to a direct viewer on {relayed}, a port the TURN relay had released: "
        f"the edge still sent to it as a relayed address")
    assert reply.message_class == stun.Class.RESPONSE, f"ICE check from {relayed} refused: {reply}"
