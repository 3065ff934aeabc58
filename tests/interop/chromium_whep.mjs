// Drives the Debian Chromium as a WHEP viewer of an edgerelay room.
//
// Usage: node chromium_whep.mjs '<json options>'
//   {
//     "base": "http://127.0.0.1:PORT",  // the edge's HTTP base URL
//     "room": "r1", "token": "VIEW",
//     "seconds": 10,                   // how long to watch (hard bound)
//     "minFrames": 30,                 // stop early once framesDecoded exceeds this
//     "dataChannel": false,            // open a `control` data channel before the offer
//     "sendMessages": ["hello"],        // sent on `control` once it is open
//     "waitMessages": 0                // also wait until this many messages were received
//   }
//
// Prints one JSON line per progress sample ({"event":"stats",...}) and a final
// line {"event":"result",...}; exits 0 if the WHEP request itself succeeded
// (the Python test decides what counts as success), 2 on a harness error.
import {
  BASE_ARGS, driverOptions, emit, forwardPageLogs, freshUserDataDir, installStatsReader,
  runDriver, startWatchdog,
} from './chromium_common.mjs';

const { opts, seconds, deadline } = driverOptions(10);
const userDataDir = freshUserDataDir('edgerelay-chromium-');
// Hard guard: whatever happens, never outlive the deadline by much.
const guard = startWatchdog((seconds + 30) * 1000);

await runDriver({ userDataDir, args: BASE_ARGS, executablePath: opts.executablePath, guard },
  async (browser) => {
  const page = browser.pages()[0] || await browser.newPage();
  forwardPageLogs(page);
  // Same origin as the edge, so fetch() needs no CORS.
  const health = await page.goto(`${opts.base}/healthz`, { timeout: 15000 });
  emit({ event: 'healthz', status: health ? health.status() : null });
  await installStatsReader(page);

  const setup = await page.evaluate(async (o) => {
    const pc = new RTCPeerConnection({ iceServers: [] });
    window.__pc = pc;
    window.__received = [];
    window.__dcState = 'none';
    pc.addTransceiver('video', { direction: 'recvonly' });
    if (o.dataChannel) {
      const dc = pc.createDataChannel('control');
      window.__dc = dc;
      dc.onopen = () => {
        window.__dcState = 'open';
        for (const m of o.sendMessages || []) dc.send(m);
      };
      dc.onclose = () => { window.__dcState = 'closed'; };
      dc.onmessage = (ev) => {
        window.__received.push(typeof ev.data === 'string' ? ev.data : '[binary]');
      };
    }
    await pc.setLocalDescription(await pc.createOffer());
    // Non-trickle: wait (bounded) for ICE gathering to complete.
    await new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') return resolve();
      const t = setTimeout(resolve, 5000);
      pc.addEventListener('icegatheringstatechange', () => {
        if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
      });
    });
    const resp = await fetch(`/whep/${encodeURIComponent(o.room)}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${o.token}` },
      body: pc.localDescription.sdp,
    });
    const body = await resp.text();
    const out = {
      status: resp.status,
      location: resp.headers.get('Location'),
      role: resp.headers.get('X-Edgerelay-Role'),
      contentType: resp.headers.get('Content-Type'),
    };
    if (resp.status !== 201) return { ...out, body };
    await pc.setRemoteDescription({ type: 'answer', sdp: body });
    return out;
  }, { room: opts.room, token: opts.token, dataChannel: !!opts.dataChannel, sendMessages: opts.sendMessages || [] });
  emit({ event: 'whep', ...setup });
  if (setup.status !== 201) {
    emit({ event: 'result', ok: false, whep: setup, framesDecoded: 0, received: [] });
  } else {
    let sample = null;
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      sample = await page.evaluate(async () => {
        const pc = window.__pc;
        const { byId: cands, inbound: video, nominatedPair: pair } = await window.__readStats(pc);
        const cand = (id) => (id && cands[id]
          ? { type: cands[id].candidateType, address: cands[id].address, port: cands[id].port, protocol: cands[id].protocol }
          : null);
        return {
          iceState: pc.iceConnectionState,
          connState: pc.connectionState,
          dcState: window.__dcState,
          framesDecoded: video ? (video.framesDecoded || 0) : 0,
          framesReceived: video ? (video.framesReceived || 0) : 0,
          packetsReceived: video ? (video.packetsReceived || 0) : 0,
          packetsLost: video ? (video.packetsLost || 0) : 0,
          keyFramesDecoded: video ? (video.keyFramesDecoded || 0) : 0,
          codec: video && cands[video.codecId] ? cands[video.codecId].mimeType : null,
          frameWidth: video ? video.frameWidth : null,
          pliCount: video ? video.pliCount : null,
          localCandidate: pair ? cand(pair.localCandidateId) : null,
          remoteCandidate: pair ? cand(pair.remoteCandidateId) : null,
          received: window.__received.slice(),
        };
      });
      emit({ event: 'stats', ...sample, received: sample.received.length });
      const framesOk = sample.framesDecoded > Number(opts.minFrames ?? 30);
      const msgsOk = sample.received.length >= Number(opts.waitMessages ?? 0);
      if (framesOk && msgsOk && !opts.fullDuration) break;
    }
    emit({ event: 'result', ok: true, whep: setup, ...(sample || { framesDecoded: 0, received: [] }) });
    // End the WHEP session politely.
    if (setup.location) {
      const del = await page.evaluate(async (o) => {
        const r = await fetch(o.location, { method: 'DELETE', headers: { Authorization: `Bearer ${o.token}` } });
        return r.status;
      }, { location: setup.location, token: opts.token }).catch((e) => String(e));
      emit({ event: 'delete', status: del });
    }
  }
});
