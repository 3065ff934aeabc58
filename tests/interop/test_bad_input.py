"""(d) Bad input gets the exact 4xx with a short plain-text message; the live room is unharmed."""

from conftest import (PUB_TOKEN, VIEW_TOKEN, Publisher, Viewer, http_request, make_offer, run,
                      wait_for)


def _assert_error(case: str, got: tuple, want: int) -> None:
    status, headers, body = got
    assert status == want, f"{case}: want {want}, got {status} {body[:200]!r}"
    ctype = headers.get("Content-Type", "")
    assert ctype.startswith("text/plain"), f"{case}: error content type {ctype!r}"
    assert 0 < len(body.strip()) <= 512, f"{case}: error body {body[:600]!r}"


def test_bad_requests_get_exact_codes_and_room_survives(edge):
    async def scenario():
        pub = await Publisher.connect(edge.http, "live")
        viewer = None
        try:
            await pub.wait_connected(15)
            viewer = await Viewer.connect(edge.http, "live", label="live-viewer", control=True)
            await viewer.wait_frames(20, 15)
            pub_offer = await make_offer("publish")
            view_offer = await make_offer("view")
            base = edge.http
            big = pub_offer + ("a=x-padding:" + "p" * 1000 + "\r\n") * 70  # > 64 KiB
            assert len(big.encode()) > 64 * 1024

            cases = [
                ("malformed SDP (WHIP)", ("POST", "/whip/other", PUB_TOKEN, "this is not an SDP offer",
                                          "application/sdp"), 400),
                ("malformed SDP (WHEP)", ("POST", "/whep/live", VIEW_TOKEN, "v=0\r\ngarbage\r\n",
                                          "application/sdp"), 400),
                ("missing token (WHIP)", ("POST", "/whip/other", None, pub_offer, "application/sdp"), 401),
                ("wrong token (WHIP)", ("POST", "/whip/other", "nope", pub_offer, "application/sdp"), 401),
                ("missing token (WHEP)", ("POST", "/whep/live", None, view_offer, "application/sdp"), 401),
                ("wrong token (WHEP)", ("POST", "/whep/live", "nope", view_offer, "application/sdp"), 401),
                ("WHEP on a room without publisher", ("POST", "/whep/nobody-here", VIEW_TOKEN, view_offer,
                                                      "application/sdp"), 404),
                ("second publisher for a busy room", ("POST", "/whip/live", PUB_TOKEN, pub_offer,
                                                      "application/sdp"), 409),
                ("oversized body (WHIP)", ("POST", "/whip/other", PUB_TOKEN, big, "application/sdp"), 413),
                ("oversized body (WHEP)", ("POST", "/whep/live", VIEW_TOKEN, big, "application/sdp"), 413),
                ("wrong content type (WHIP)", ("POST", "/whip/other", PUB_TOKEN, pub_offer, "text/plain"), 415),
                ("JSON content type (WHEP)", ("POST", "/whep/live", VIEW_TOKEN, view_offer,
                                              "application/json"), 415),
            ]
            failures = []
            for case, (method, path, token, body, ctype), want in cases:
                got = await http_request(method, base + path, token=token, body=body, content_type=ctype)
                try:
                    _assert_error(case, got, want)
                except AssertionError as e:
                    failures.append(str(e))
            # A publisher token is not a viewer token and vice versa.
            for case, path, token, offer in (("viewer token on WHIP", "/whip/other", VIEW_TOKEN, pub_offer),
                                             ("publisher token on WHEP", "/whep/live", PUB_TOKEN, view_offer)):
                status, _, body = await http_request("POST", base + path, token=token, body=offer)
                if status not in (401, 403):
                    failures.append(f"{case}: want 401/403, got {status} {body[:200]!r}")

            # The live room is unharmed: its viewer keeps decoding, its publisher stays up.
            before = viewer.frames
            await viewer.wait_frames(before + 30, 10)
            assert pub.pc.connectionState == "connected", f"publisher {pub.pc.connectionState}"
            assert viewer.role == "controller", f"live viewer role {viewer.role!r}"
            await wait_for(viewer.dc_open, 10, "live viewer control channel open")
            viewer.dc.send("still-in-control")
            await wait_for(lambda: "still-in-control" in pub.received, 10,
                           f"controller input after the bad requests (publisher got {pub.received})")
            edge.assert_alive()
            assert not failures, "wrong error responses:\n" + "\n".join(failures)
        finally:
            if viewer:
                await viewer.close()
            await pub.close()

    run(scenario(), timeout=120)


def test_healthz_and_metrics(edge):
    async def scenario():
        status, _, body = await http_request("GET", edge.http + "/healthz")
        assert status == 200, f"/healthz -> {status} {body!r}"
        pub = await Publisher.connect(edge.http, "metered")
        viewer = await Viewer.connect(edge.http, "metered")
        try:
            await viewer.wait_frames(10, 15)
            status, headers, text = await http_request("GET", edge.http + "/metrics")
            assert status == 200, f"/metrics -> {status}"
            assert headers.get("Content-Type", "").startswith("text/plain"), headers.get("Content-Type")
            names = {line.split()[0].split("{")[0] for line in text.splitlines()
                     if line and not line.startswith("#")}
            assert names, "no samples in /metrics"
            bad = sorted(n for n in names if not n.startswith("edgerelay_"))
            assert not bad, f"metrics without the edgerelay_ prefix: {bad}"
        finally:
            await viewer.close()
            await pub.close()

    run(scenario(), timeout=60)
