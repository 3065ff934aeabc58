"""(b) Debian's simple-whip-client as a second WHIP publisher, in its own room."""

import asyncio

from conftest import Publisher, Viewer, WhipClient, run


def test_simple_whip_client_publisher_viewed_by_aiortc(edge, request, tmp_path, gupnp_stub_dir):
    client = WhipClient(request, tmp_path, f"{edge.http}/whip/room-b", stub_dir=gupnp_stub_dir)

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-a")  # the first publisher, other room
        viewers = []
        try:
            await pub.wait_connected(15)
            # whip-client's WHIP session is up once a viewer gets 201 on its room.
            deadline = asyncio.get_running_loop().time() + 20
            vb = None
            while vb is None:
                assert client.alive(), f"whip-client exited with {client.proc.returncode}"
                try:
                    vb = await Viewer.connect(edge.http, "room-b", label="viewer-b")
                except AssertionError as e:
                    if "-> 404" not in str(e) or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            viewers.append(vb)
            va = await Viewer.connect(edge.http, "room-a", label="viewer-a")
            viewers.append(va)
            await vb.wait_frames(30, 20)
            await va.wait_frames(30, 20)
            assert vb.size == (320, 240), f"room-b viewer decoded {vb.size}"
            await vb.wait_frames(vb.frames + 30, 10)
            assert client.alive(), "whip-client exited while publishing"
            edge.assert_alive()
        finally:
            for v in viewers:
                await v.close()
            await pub.close()
            client.stop()

    run(scenario(), timeout=120)
