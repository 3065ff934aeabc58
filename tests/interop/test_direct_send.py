"""The direct send path (`[sfu] direct_send`): media sealed by the SFU itself reaches
real browsers and aiortc, decodes, and really took that path (metrics)."""

import asyncio

from conftest import Publisher, Viewer, require_chromium, run, run_chromium
from relay_helpers import scrape_metrics


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
            edge.assert_alive()
        finally:
            if viewer:
                await viewer.close()
            await pub.close()

    run(scenario(), timeout=120)
