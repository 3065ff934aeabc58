"""(a) aiortc WHIP publisher -> edgerelay -> Chromium (WHEP) and an aiortc WHEP viewer at once."""

import asyncio
import time

from conftest import VIEW_TOKEN, Publisher, Viewer, absolute, http_request, require_chromium, run, run_chromium


def test_aiortc_publisher_to_chromium_and_aiortc_viewers(edge, request, tmp_path):
    require_chromium()

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-a")
        viewer = None
        try:
            await pub.wait_connected(15)
            chrome = asyncio.ensure_future(run_chromium(
                request, tmp_path, edge.http, "room-a", seconds=15, min_frames=30))
            viewer = await Viewer.connect(edge.http, "room-a")
            await viewer.wait_connected(15)
            await viewer.wait_frames(30, 15)
            # Still growing while Chromium watches too.
            before = viewer.frames
            await viewer.wait_frames(before + 15, 10)
            assert viewer.size == (320, 240), f"aiortc viewer decoded {viewer.size}"

            c = await chrome
            res = c["result"]
            assert res["whep"]["status"] == 201, f"chromium WHEP: {res['whep']}"
            assert res["whep"]["location"], "chromium WHEP: no Location"
            assert res["whep"]["role"] in ("controller", "spectator"), f"role header {res['whep']}"
            assert res["framesDecoded"] > 30, (
                f"chromium decoded only {res['framesDecoded']} frames in 15 s: {res}")
            assert res["codec"] and res["codec"].lower() == "video/h264", f"chromium codec {res['codec']}"
            assert res["frameWidth"] == 320, f"chromium frame width {res['frameWidth']}"
            # The aiortc viewer kept decoding after Chromium left.
            before = viewer.frames
            await viewer.wait_frames(before + 15, 10)
            edge.assert_alive()

            # DELETE ends the viewer's resource.
            status, _, body = await http_request("DELETE", absolute(edge.http, viewer.location),
                                                 token=VIEW_TOKEN)
            assert status in (200, 204), f"DELETE viewer -> {status} {body!r}"
            viewer.location = None
        finally:
            if viewer:
                await viewer.close()
            status = await pub.close()
        assert status in (200, 204), f"DELETE publisher -> {status}"

    run(scenario(), timeout=120)


def test_two_aiortc_viewers_join_late_and_decode_quickly(edge):
    """A viewer joining mid-stream gets a decodable picture quickly (GOP cache)."""

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-late")
        viewers = []
        try:
            await pub.wait_connected(15)
            await asyncio.sleep(3)  # the stream is well past its first keyframe
            for i in range(2):
                t0 = time.monotonic()
                v = await Viewer.connect(edge.http, "room-late", label=f"late-viewer-{i}")
                viewers.append(v)
                await v.wait_frames(1, 10)
                first = time.monotonic() - t0
                assert first < 5, f"late viewer {i} waited {first:.1f}s for its first frame"
            for v in viewers:
                await v.wait_frames(v.frames + 30, 15)
        finally:
            for v in viewers:
                await v.close()
            await pub.close()

    run(scenario(), timeout=90)
