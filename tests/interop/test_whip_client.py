"""(b) Debian's simple-whip-client as a second WHIP publisher, in its own room.

whip-client (libnice) cannot use loopback, so it runs in a network namespace created by the
test and the edge listens on the host end of the veth pair (root needed; skips otherwise).
"""

import asyncio

from conftest import Publisher, Viewer, WhipClient, run, wait_for


def test_simple_whip_client_publisher_viewed_by_aiortc(edge_factory, netns, request, tmp_path,
                                                        gupnp_stub_dir):
    edge = edge_factory(ip=netns.host_ip)
    client = WhipClient(request, tmp_path, f"{edge.http}/whip/room-b", stub_dir=gupnp_stub_dir,
                        prefix=netns.prefix())

    async def scenario():
        pub = await Publisher.connect(edge.http, "room-a")  # the first publisher, other room
        viewers = []
        try:
            await pub.wait_connected(15)
            # whip-client's WHIP session is up once a viewer of its room gets 201.
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
            await wait_for(lambda: vb.frames >= 30 or not client.alive(), 20,
                           f"viewer-b to decode 30 frames (has {vb.frames})")
            assert client.alive(), f"whip-client exited with {client.proc.returncode}"
            await vb.wait_frames(30, 1)
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

    try:
        run(scenario(), timeout=120)
    except AssertionError as e:
        log = client.log()
        if "DTLS failed" in log or "no client certificate" in edge.logs():
            raise AssertionError(
                "whip-client's DTLS handshake with the edge failed. GStreamer 1.22 (Debian 12) "
                "webrtcbin always uses an RSA certificate; the edge must accept RSA DTLS peers "
                "(ECDHE_RSA suites, rsa_sign client certificates) to interoperate with it. "
                f"Underlying failure: {e}") from e
        raise
