// Drives the Debian Chromium as a WHEP viewer with explicit ICE servers (the edge's
// built-in TURN) and an ICE transport policy, for the relay and NAT interop tests.
//
// Usage: node relay_chromium.mjs '<json options>'
//   {
//     "whep": "http://127.0.0.1:PORT/whep/room",  // WHEP endpoint (POSTed from node, not the page)
//     "token": "VIEW",                          // viewer bearer token
//     "iceServers": [{"urls": [...], "username": "...", "credential": "..."}],
//     "iceTransportPolicy": "relay",            // or "all"
//     "seconds": 15,                            // how long to watch at most (hard bound)
//     "minFrames": 30,                          // stop early once framesDecoded exceeds this
//     "fullDuration": false,                    // watch all `seconds` even when frames arrive
//     "executablePath": "/usr/bin/chromium",    // or a wrapper (e.g. `ip netns exec NS chromium`)
//     "extraArgs": ["--ignore-certificate-errors"]
//   }
//
// Signalling runs in node (so the browser itself may sit in a network namespace whose
// firewall lets only TURN through); the page is about:blank and only runs the
// RTCPeerConnection. Prints JSON lines: {"event":"gathered",...} (local candidates of the
// offer), {"event":"whep",...}, {"event":"stats",...} samples and a final {"event":"result",...}.
// Exits 0 when it produced a result (the Python test judges it), 2 on a harness error.
import {
  BASE_ARGS, driverOptions, emit, forwardPageLogs, freshUserDataDir, installStatsReader,
  runDriver, startWatchdog,
} from './chromium_common.mjs';

const { opts, seconds } = driverOptions(15);
const userDataDir = freshUserDataDir('edgerelay-relay-chromium-');
const args = [
  ...BASE_ARGS, '--disable-features=WebRtcHideLocalIpsWithMdns',
  ...(opts.extraArgs || []),
];
const guard = startWatchdog((seconds + 45) * 1000, 'relay chromium driver watchdog fired');

await runDriver({ userDataDir, args, executablePath: opts.executablePath, guard },
  async (browser) => {
  const page = browser.pages()[0] || await browser.newPage();
  forwardPageLogs(page);
  await installStatsReader(page);

  // 1. The offer, with all candidates gathered (non-trickle; bounded wait).
  const offer = await page.evaluate(async (o) => {
    const pc = new RTCPeerConnection({
      iceServers: o.iceServers || [],
      iceTransportPolicy: o.iceTransportPolicy || 'all',
    });
    window.__pc = pc;
    pc.addTransceiver('video', { direction: 'recvonly' });
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') return resolve();
      const t = setTimeout(resolve, 8000);
      pc.addEventListener('icegatheringstatechange', () => {
        if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
      });
    });
    const sdp = pc.localDescription.sdp;
    const candidates = sdp.split(/\r?\n/).filter((l) => l.startsWith('a=candidate:'))
      .map((l) => l.slice(2));
    return { sdp, candidates, gathering: pc.iceGatheringState };
  }, { iceServers: opts.iceServers, iceTransportPolicy: opts.iceTransportPolicy });
  emit({ event: 'gathered', candidates: offer.candidates, gathering: offer.gathering });

  // 2. WHEP from node.
  const resp = await fetch(opts.whep, {
    method: 'POST',
    headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${opts.token}` },
    body: offer.sdp,
    signal: AbortSignal.timeout(10000),
  });
  const answer = await resp.text();
  const location = resp.headers.get('location');
  const whep = { status: resp.status, location, role: resp.headers.get('x-edgerelay-role'),
    link: resp.headers.get('link') };
  emit({ event: 'whep', ...whep, body: resp.status === 201 ? undefined : answer });
  if (resp.status !== 201) {
    emit({ event: 'result', ok: false, whep, framesDecoded: 0, candidates: offer.candidates });
  } else {
    await page.evaluate(async (sdp) => {
      await window.__pc.setRemoteDescription({ type: 'answer', sdp });
    }, answer);

    // 3. Watch: sample getStats() until enough frames or the deadline.
    const deadline = Date.now() + seconds * 1000;
    let sample = null;
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      sample = await page.evaluate(async () => {
        const pc = window.__pc;
        const r = await window.__readStats(pc);
        const { byId, inbound: video } = r;
        // The selected pair: the transport's selectedCandidatePairId, else a nominated
        // succeeded pair.
        const pair = r.selectedPair || r.nominatedPair;
        const cand = (id) => {
          const c = id && byId[id];
          return c ? {
            type: c.candidateType, address: c.address, port: c.port, protocol: c.protocol,
            relayProtocol: c.relayProtocol || null, url: c.url || null,
          } : null;
        };
        return {
          iceState: pc.iceConnectionState,
          connState: pc.connectionState,
          framesDecoded: video ? (video.framesDecoded || 0) : 0,
          packetsReceived: video ? (video.packetsReceived || 0) : 0,
          bytesReceived: video ? (video.bytesReceived || 0) : 0,
          packetsLost: video ? (video.packetsLost || 0) : 0,
          nackCount: video ? (video.nackCount || 0) : 0,
          pliCount: video ? (video.pliCount || 0) : 0,
          freezeCount: video ? (video.freezeCount || 0) : 0,
          frameWidth: video ? (video.frameWidth || null) : null,
          pairState: pair ? pair.state : null,
          localCandidate: pair ? cand(pair.localCandidateId) : null,
          remoteCandidate: pair ? cand(pair.remoteCandidateId) : null,
        };
      });
      emit({ event: 'stats', ...sample });
      if (sample.framesDecoded > Number(opts.minFrames ?? 30) && !opts.fullDuration) break;
    }
    emit({ event: 'result', ok: true, whep, candidates: offer.candidates,
      ...(sample || { framesDecoded: 0 }) });
    if (location) {
      const url = new URL(location, opts.whep).toString();
      const del = await fetch(url, { method: 'DELETE', headers: { Authorization: `Bearer ${opts.token}` },
        signal: AbortSignal.timeout(5000) }).then((r) => r.status).catch((e) => String(e));
      emit({ event: 'delete', status: del });
    }
  }
});
