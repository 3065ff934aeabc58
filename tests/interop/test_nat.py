"""A viewer behind a masquerading NAT whose firewall lets only the TURN ports through.

Needs root (network namespaces, nftables); skips cleanly otherwise. Topology (relay_helpers.
NatTopology): the edge listens on the host end of a veth pair (HTTP, media, TURN UDP/TCP/TLS);
Chromium runs in ``er-viewer-<tag>``, whose only route leads through ``er-nat-<tag>``, which
masquerades and forwards from the viewer only UDP/TCP to the edge's TURN ports. Signalling
(WHEP) is done by the node driver on the host side, so HTTP needs no hole in the firewall.
"""

from __future__ import annotations

import re

import pytest

from conftest import require_chromium, run
from relay_helpers import (
    EdgePublisher,
    NatTopology,
    get_ice_servers,
    run_relay_chromium,
    start_turn_edge,
    summary,
    url_transport,
)


@pytest.fixture
def nat_topology():
    """The two namespaces and the NAT/firewall; always torn down."""
    topo = NatTopology()
    try:
        yield topo
    finally:
        topo.close()


def _port(url: str) -> int:
    m = re.match(r"turns?:(?:\[[^\]]+\]|[^:]+):(\d+)", url)
    assert m, f"cannot parse TURN URL {url!r}"
    return int(m.group(1))


def test_viewer_behind_nat_gets_video_only_via_turn(nat_topology, edge_factory, request, tmp_path):
    require_chromium()
    topo = nat_topology
    edge, urls = start_turn_edge(edge_factory, tmp_path, ip=topo.host_ip)
    udp = [_port(u) for u in urls if url_transport(u) == "udp"]
    tcp = [_port(u) for u in urls if url_transport(u) in ("tcp", "tls")]
    media_port = int(edge.media.rsplit(":", 1)[1])
    topo.firewall(topo.host_ip, udp, tcp, media_port)
    chromium = topo.chromium_wrapper(tmp_path)
    whep = f"{edge.http}/whep/nat"
    pub = EdgePublisher(request, tmp_path, edge, "nat")

    async def scenario():
        await pub.wait_live()
        # 1. No TURN: the direct path to the SFU is firewalled, so no video within 6 s.
        direct = await run_relay_chromium(request, tmp_path, whep, [], policy="all", seconds=6,
                                          full_duration=True, executable=chromium,
                                          name="chromium-direct")
        drops_direct = topo.drop_counts()
        # 2. The edge's TURN servers (all three URLs), policy "all": ICE must settle on relay.
        servers = await get_ice_servers(edge)
        relayed = await run_relay_chromium(request, tmp_path, whep, servers, policy="all",
                                           seconds=25, min_frames=30, executable=chromium,
                                           extra_args=["--ignore-certificate-errors"],
                                           name="chromium-turn")
        # 3. Control: open the SFU's media port in the firewall and the direct path works, so
        #    step 1 failed because of the firewall and nothing else.
        topo.open_udp(topo.host_ip, media_port)
        opened = await run_relay_chromium(request, tmp_path, whep, [], policy="all", seconds=15,
                                          min_frames=30, executable=chromium,
                                          name="chromium-direct-opened")
        return direct, drops_direct, relayed, opened

    try:
        direct, drops_direct, relayed, opened = run(scenario(), timeout=150)
    finally:
        pub.stop()
    edge.assert_alive()
    firewall = topo.ruleset()

    d = summary(direct)
    assert direct["whep"]["status"] == 201, f"direct WHEP: {direct['whep']}"
    assert not any(".local " in c for c in direct["candidates"]), f"mDNS host candidates: {d}"
    assert any(" typ host " in c and topo.viewer_ip in c for c in direct["candidates"]), (
        f"Chromium in the viewer namespace offered no host candidate on {topo.viewer_ip}: {d}")
    assert direct["framesDecoded"] == 0, (
        f"video arrived without TURN: the firewall did not block the direct path: {d}\n{firewall}")
    assert direct["iceState"] != "connected" and direct["iceState"] != "completed", (
        f"ICE connected without TURN: {d}\n{firewall}")
    assert drops_direct.get("media", 0) > 0, (
        f"the firewall never saw (and dropped) the viewer's checks to the SFU port {media_port}: "
        f"{drops_direct}\n{firewall}")

    r = summary(relayed)
    assert relayed["whep"]["status"] == 201, f"TURN WHEP: {relayed['whep']}"
    assert relayed["framesDecoded"] > 30, (
        f"behind the NAT with TURN: only {relayed['framesDecoded']} frames decoded in 25 s: {r}\n{firewall}")
    local = relayed["localCandidate"]
    assert local and local["type"] == "relay", f"selected local candidate is not relay: {r}"
    types = {c.split(" typ ")[1].split()[0] for c in relayed["candidates"] if " typ " in c}
    assert {"host", "relay"} <= types, (
        f"with policy 'all' the offer should hold host and relay candidates (NAT forced relay), got {types}")

    o = summary(opened)
    assert opened["framesDecoded"] > 30, (
        f"control run with the media port opened got no video, so the no-TURN run proved nothing: "
        f"{o}\n{firewall}")
    assert opened["localCandidate"] and opened["localCandidate"]["type"] in ("host", "srflx", "prflx"), (
        f"control run (no TURN servers) should be direct: {o}")


def test_viewer_behind_tls_only_firewall_uses_turns(nat_topology, edge_factory, request, tmp_path):
    """The firewall forwards only TCP to the edge's TURNS (TLS) port (the "only TCP/443 gets
    out" case): with all three TURN URLs offered, ICE ends on a relay over TLS and video
    arrives."""
    require_chromium()
    topo = nat_topology
    edge, urls = start_turn_edge(edge_factory, tmp_path, ip=topo.host_ip)
    tls = [_port(u) for u in urls if url_transport(u) == "tls"]
    media_port = int(edge.media.rsplit(":", 1)[1])
    topo.firewall(topo.host_ip, [], tls, media_port)
    chromium = topo.chromium_wrapper(tmp_path)
    pub = EdgePublisher(request, tmp_path, edge, "nat-tls")

    async def scenario():
        await pub.wait_live()
        servers = await get_ice_servers(edge)
        return await run_relay_chromium(request, tmp_path, f"{edge.http}/whep/nat-tls", servers,
                                        policy="all", seconds=25, min_frames=30, executable=chromium,
                                        extra_args=["--ignore-certificate-errors"], name="chromium-turns")

    try:
        res = run(scenario(), timeout=90)
    finally:
        pub.stop()
    edge.assert_alive()
    r = summary(res)
    firewall = topo.ruleset()
    relays = [c for c in res["candidates"] if " typ relay " in c]
    assert relays, f"no relay candidate gathered through the TLS-only firewall: {r}\n{firewall}"
    assert res["framesDecoded"] > 30, (
        f"TLS-only firewall: only {res['framesDecoded']} frames decoded in 25 s: {r}\n{firewall}")
    local = res["localCandidate"]
    assert local and local["type"] == "relay" and local["relayProtocol"] == "tls", (
        f"selected local candidate should be a relay over TLS: {r}")
    assert topo.drop_counts().get("other", 0) > 0, (
        f"the firewall dropped nothing else (TURN over UDP/TCP was not even tried?)\n{firewall}")
