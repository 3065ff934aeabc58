"""The direct send path (`[sfu] direct_send`): media sealed by the SFU itself reaches
real browsers and aiortc, decodes, and really took that path (metrics)."""

import asyncio
import subprocess

from conftest import CHROMIUM, Publisher, Viewer, require_chromium, run, run_chromium
from relay_helpers import require_netns_root, run_relay_chromium, scrape_metrics


def _total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def test_direct_send_to_chromium_and_aiortc(edge_factory, request, tmp_path):
    require_chromium()
    edge = edge_factory(extra_args=["--direct-send", "true"])

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-direct")
        viewer = None
        try:
            await pub.wait_connected(15)
            chrome = asyncio.ensure_future(run_chromium(
                request, tmp_path, edge.http, "room-direct", seconds=12, min_frames=30))
            viewer = await Viewer.connect(edge.http, "room-direct")
            await viewer.wait_connected(15)
            await viewer.wait_frames(30, 15)
            assert viewer.size == (320, 240), f"aiortc viewer decoded {viewer.size}"
            c = await chrome
            res = c["result"]
            assert res["framesDecoded"] > 30, (
                f"chromium decoded only {res['framesDecoded']} frames in 12 s: {res}")
            assert res["frameWidth"] == 320, f"chromium frame width {res['frameWidth']}"

            m = await scrape_metrics(edge)
            direct = _total(m, "edgerelay_direct_packets_total")
            out = _total(m, "edgerelay_rtp_packets_out_total")
            assert _total(m, "edgerelay_direct_unavailable_viewers_total") == 0, (
                "a viewer fell back to str0m's send path (no keys / unknown SRTP profile)")
            # All but the once-a-second sync packets were sealed by the SFU.
            assert direct > 0.8 * out > 0, (
                f"direct {direct} of {out} RTP packets: "
                f"{ {k: v for k, v in m.items() if 'direct' in k or 'rtp_packets' in k} }")
            # The room held aiortc's multi-packet frames (its keyframes at least)
            # until their last packet, and aiortc marks every frame's end: no hold
            # ended without it (a cut would stop the room's holds for a second).
            gather = {k: v for k, v in m.items() if "gather" in k}
            assert _total(m, "edgerelay_gather_frames_total") > 0, f"no frame held: {gather}"
            assert _total(m, "edgerelay_gather_cut_total") == 0, f"a hold was cut: {gather}"
            edge.assert_alive()
        finally:
            if viewer:
                await viewer.close()
            await pub.close()

    run(scenario(), timeout=120)


def test_direct_send_repairs_loss_for_chromium(netns, edge_factory, request, tmp_path):
    """Chromium in a namespace whose inbound datagrams from the edge's media port are
    dropped at random (5 %, nftables): the SFU answers its NACKs on the direct path
    and video keeps decoding."""
    require_chromium()
    require_netns_root()

    edge = edge_factory(ip=netns.host_ip)
    media_port = edge.media.rsplit(":", 1)[1]
    table = "edgerelay_loss"
    for cmd in (
        ["add", "table", "inet", table],
        ["add", "chain", "inet", table, "in",
         "{ type filter hook input priority 0 ; policy accept ; }"],
        ["add", "rule", "inet", table, "in", "ip", "saddr", netns.host_ip, "udp", "sport",
         media_port, "numgen", "random", "mod", "100", "<", "5", "drop"],
    ):
        r = subprocess.run(netns.prefix() + ["nft", *cmd], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0, f"nft {' '.join(cmd)}: {r.stderr}"
    wrapper = tmp_path / "chromium-in-ns.sh"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(netns.prefix())} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-loss")
        try:
            await pub.wait_connected(15)
            res = await run_relay_chromium(
                request, tmp_path, f"{edge.http}/whep/room-loss", [], policy="all",
                seconds=12, full_duration=True, executable=str(wrapper), name="chromium-lossy")
            m = await scrape_metrics(edge)
            stats = {k: v for k, v in m.items()
                     if "direct" in k or "nack" in k or "resend" in k or "rtp_packets" in k}
            digest = {k: res.get(k) for k in ("framesDecoded", "packetsReceived", "packetsLost",
                                              "nackCount", "pliCount", "freezeCount")}
            assert res.get("framesDecoded", 0) > 100, f"chromium under loss: {digest} {stats}"
            assert res.get("nackCount", 0) > 0, f"no NACKs: was there loss? {digest}"
            assert _total(m, "edgerelay_direct_resends_total") > 0, (
                f"NACKs not answered on the direct path: {digest} {stats}")
            assert _total(m, "edgerelay_direct_packets_total") > 0.8 * _total(
                m, "edgerelay_rtp_packets_out_total"), stats
            edge.assert_alive()
        finally:
            await pub.close()

    run(scenario(), timeout=120)
