"""(b) Debian's simple-whip-client as a second WHIP publisher, in its own room.

whip-client (libnice) cannot use loopback, so it runs in a network namespace created by the
test and the edge listens on the host end of the veth pair (root needed; skips otherwise).
"""

import asyncio
import subprocess

import pytest

from conftest import Publisher, Viewer, WhipClient, run, wait_for


def _gst_version():
    try:
        out = subprocess.run(["gst-inspect-1.0", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "GStreamer" in line:
            parts = line.split()[-1].split(".")
            try:
                return tuple(int(x) for x in parts[:2])
            except ValueError:
                return None
    return None


# Known incompatibility, asserted rather than hidden: str0m 0.25's DTLS stack (dimpl) only
# offers ECDHE_ECDSA suites and ECDSA client certificates, while GStreamer 1.22's webrtcbin
# (Debian 12) always generates an RSA certificate, so the handshake ends with alert 40.
# strict=True: the day this passes (newer GStreamer, or RSA support in the DTLS stack), the
# marker must go and the test counts again.
_OLD_GST = (_gst_version() or (0, 0)) < (1, 24)


class DtlsIncompatible(AssertionError):
    """The handshake failed for the known RSA-vs-ECDSA reason, and only for it."""


@pytest.mark.xfail(_OLD_GST, strict=True, raises=DtlsIncompatible,
                   reason="GStreamer < 1.24 webrtcbin uses RSA DTLS certificates; str0m's DTLS "
                          "supports ECDSA only (handshake alert 40)")
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
            raise DtlsIncompatible(
                "whip-client's DTLS handshake with the edge failed. GStreamer 1.22 (Debian 12) "
                "webrtcbin always uses an RSA certificate; the edge must accept RSA DTLS peers "
                "(ECDHE_RSA suites, rsa_sign client certificates) to interoperate with it. "
                f"Underlying failure: {e}") from e
        raise
