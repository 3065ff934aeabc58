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
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const opts = JSON.parse(process.argv[2] || '{}');
const seconds = Number(opts.seconds ?? 15);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgerelay-relay-chromium-'));
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream', '--disable-features=WebRtcHideLocalIpsWithMdns',
  ...(opts.extraArgs || []),
];

let browser;
let exitCode = 0;
const guard = setTimeout(() => {
  emit({ event: 'error', error: 'relay chromium driver watchdog fired' });
  process.exit(3);
}, (seconds + 45) * 1000);

try {
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.executablePath || '/usr/bin/chromium',
    headless: true,
    args,
    timeout: 30000,
  });
  const page = browser.pages()[0] || await browser.newPage();
  page.on('console', (m) => emit({ event: 'console', type: m.type(), text: m.text() }));
  page.on('pageerror', (e) => emit({ event: 'pageerror', error: String(e) }));

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
        const stats = await pc.getStats();
        const byId = {};
        stats.forEach((s) => { byId[s.id] = s; });
        let video = null; let pair = null;
        stats.forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'video') video = s;
        });
        // The selected pair: the transport's selectedCandidatePairId, else a nominated
        // succeeded pair.
        stats.forEach((s) => {
          if (s.type === 'transport' && s.selectedCandidatePairId) pair = byId[s.selectedCandidatePairId] || pair;
        });
        if (!pair) {
          stats.forEach((s) => {
            if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
          });
        }
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
} catch (e) {
  emit({ event: 'error', error: String(e && e.stack ? e.stack : e) });
  exitCode = 2;
} finally {
  clearTimeout(guard);
  if (browser) await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
