"""A room spanning media threads (``--media-threads 2 --span-viewers 1``), with aiortc
peers: the controller sits on the room's home thread, spectators are dealt to both
threads, and every viewer decodes the publisher's video, whichever thread (UDP port)
serves it. The room is listed once, with all its viewers."""

import json
import re

from conftest import Publisher, Viewer, http_request, require_chromium, run, run_chromium
from relay_helpers import scrape_metrics

# Homed on thread 1 of 2 (FNV-1a of the name, as the edge hashes it): with the seats
# dealt 0, 1, 0, 1, ... past the controller, the sixth viewer (Chromium) sits on thread 0,
# a mirror.
ROOM = "room-span"


def media_ports(sdp: str) -> set[int]:
    """The UDP ports of the host candidates in an SDP answer."""
    return {int(m.group(1)) for m in re.finditer(r"a=candidate:\S+ 1 udp \d+ \S+ (\d+) typ host", sdp)}


def test_spectators_on_both_media_threads_decode_the_rooms_video(edge_factory, request, tmp_path):
    require_chromium()
    edge = edge_factory(extra_args=["--media-threads", "2", "--span-viewers", "1"])

    async def scenario():
        pub = await Publisher.connect(edge.http, ROOM)
        viewers = []
        try:
            await pub.wait_connected(15)
            # The first viewer takes the controller seat (home); past one viewer at
            # home, the others are dealt to the two threads in turn.
            for i in range(5):
                v = await Viewer.connect(edge.http, ROOM, label=f"viewer{i}", control=(i == 0))
                viewers.append(v)
                await v.wait_connected(15)
            assert viewers[0].role == "controller", viewers[0].headers
            assert all(v.role == "spectator" for v in viewers[1:]), [v.role for v in viewers]
            ports = [media_ports(v.pc.remoteDescription.sdp) for v in viewers]
            assert all(len(p) == 1 for p in ports), ports
            used = set().union(*ports)
            assert len(used) == 2, f"viewers sit on both threads' ports: {ports}"
            for v in viewers:
                await v.wait_frames(30, 20)
                assert v.size == (320, 240), f"{v.label} decoded {v.size}"

            m = await scrape_metrics(edge)
            seated = m.get("edgerelay_span_viewers_seated_total", 0)
            assert seated >= 1, f"viewers seated on a mirror: {seated}"
            out = m.get("edgerelay_span_feed_packets_out_total", 0)
            got = m.get("edgerelay_span_feed_packets_in_total", 0)
            # (In counts the home's cached GOP a new mirror starts from, too; both are
            # each thread's state as last published, a fraction of a second old.)
            assert out >= 5 and got >= 5, f"packets handed to the mirror: out {out}, in {got}"
            assert m.get("edgerelay_span_messages_dropped_total", 0) == 0
            status, _, body = await http_request("GET", edge.http + "/api/rooms", content_type=None)
            assert status == 200, body
            rooms = [r for r in json.loads(body) if r["name"] == ROOM]
            assert len(rooms) == 1, f"one entry for the spanning room: {body}"
            assert rooms[0]["viewers"] == 5 and rooms[0]["publisher"], rooms

            # Chromium takes the next seat, on the mirror, and decodes there.
            c = await run_chromium(request, tmp_path, edge.http, ROOM, seconds=10, min_frames=30)
            res = c["result"]
            assert res["whep"]["status"] == 201, f"chromium WHEP: {res['whep']}"
            assert res["whep"]["role"] == "spectator", res["whep"]
            assert res["framesDecoded"] > 30, f"chromium on the mirror decoded {res['framesDecoded']}: {res}"
            m2 = await scrape_metrics(edge)
            assert m2.get("edgerelay_span_viewers_seated_total", 0) == seated + 1, \
                f"chromium was seated on a mirror: {seated} -> {m2.get('edgerelay_span_viewers_seated_total')}"

            # The mirror's viewers leave: it closes and unsubscribes; the home's viewers
            # keep decoding, and a newcomer is served (from the home's cache).
            home_port = next(iter(ports[0]))
            mirror = [v for v, p in zip(viewers, ports) if home_port not in p]
            assert mirror, ports
            for v in mirror:
                await v.close()
                viewers.remove(v)
            before = [v.frames for v in viewers]
            for v, b in zip(viewers, before):
                await v.wait_frames(b + 15, 15)
            late = await Viewer.connect(edge.http, ROOM, label="late")
            viewers.append(late)
            await late.wait_connected(15)
            await late.wait_frames(15, 20)
            edge.assert_alive()
        finally:
            for v in viewers:
                await v.close()
            await pub.close()

    run(scenario(), timeout=150)
