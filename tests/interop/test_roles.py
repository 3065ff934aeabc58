"""(c) Controller vs spectator on the `control` data channel."""

import asyncio

from conftest import Publisher, Viewer, require_chromium, run, run_chromium, wait_for


def test_controller_input_reaches_publisher_spectator_input_dropped(edge):
    async def scenario():
        pub = await Publisher.connect(edge.http, "room-c")
        viewers = []
        try:
            await pub.wait_connected(15)
            await wait_for(pub.dc_open, 10, "publisher control channel open")
            ctl = await Viewer.connect(edge.http, "room-c", label="controller", control=True)
            viewers.append(ctl)
            spec = await Viewer.connect(edge.http, "room-c", label="spectator", control=True)
            viewers.append(spec)
            assert ctl.role == "controller", f"first viewer role {ctl.role!r}"
            assert spec.role == "spectator", f"second viewer role {spec.role!r}"
            await wait_for(ctl.dc_open, 15, "controller control channel open")
            await wait_for(spec.dc_open, 15, "spectator control channel open")

            # Spectator speaks first; if it were forwarded it would arrive before the controller's.
            spec.dc.send("input-from-spectator")
            await asyncio.sleep(0.3)
            ctl.dc.send("input-from-controller")
            await wait_for(lambda: "input-from-controller" in pub.received, 10,
                           f"controller input at the publisher (got {pub.received})")
            await asyncio.sleep(1.0)
            assert "input-from-spectator" not in pub.received, f"spectator input leaked: {pub.received}"

            pub.dc.send("from-publisher")
            await wait_for(lambda: "from-publisher" in ctl.received, 10,
                           f"publisher message at the controller (got {ctl.received})")
            await wait_for(lambda: "from-publisher" in spec.received, 10,
                           f"publisher message at the spectator (got {spec.received})")
            # Both viewers also get video.
            await ctl.wait_frames(10, 10)
            await spec.wait_frames(10, 10)
            edge.assert_alive()
        finally:
            for v in viewers:
                await v.close()
            await pub.close()

    run(scenario(), timeout=90)


def test_chromium_controller_and_aiortc_spectator(edge, request, tmp_path):
    """A browser controller: its input reaches the aiortc publisher; publisher messages reach it."""
    require_chromium()

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-cb")
        spec = None
        try:
            await pub.wait_connected(15)
            await wait_for(pub.dc_open, 10, "publisher control channel open")
            pub.start_ticks(0.5)
            c = await run_chromium(request, tmp_path, edge.http, "room-cb", seconds=20, min_frames=30,
                                   data_channel=True, send_messages=["input-from-chromium"],
                                   wait_messages=2)
            res = c["result"]
            assert res["whep"]["status"] == 201, f"chromium WHEP: {res['whep']}"
            assert res["whep"]["role"] == "controller", f"chromium role {res['whep']['role']!r}"
            assert res["dcState"] == "open", f"chromium control channel {res['dcState']}"
            assert "input-from-chromium" in pub.received, f"publisher got {pub.received}"
            ticks = [m for m in res["received"] if m.startswith("pub-tick-")]
            assert len(ticks) >= 2, f"chromium got publisher messages {res['received']}"
            assert res["framesDecoded"] > 30, f"chromium decoded {res['framesDecoded']}"
            # Chromium left; a new viewer is still served.
            spec = await Viewer.connect(edge.http, "room-cb", label="after-chromium", control=True)
            await spec.wait_frames(10, 15)
            await wait_for(lambda: any(m.startswith("pub-tick-") for m in spec.received), 10,
                           f"publisher ticks at the later viewer (got {spec.received})")
        finally:
            if spec:
                await spec.close()
            await pub.close()

    run(scenario(), timeout=120)
