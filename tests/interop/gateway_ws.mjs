// Drives the Debian Chromium as clients of the edge WebSocket signalling protocol
// (docs/PROTOCOL.md section 4): each page opens the session URL the gateway returned,
// sends discover + settings, answers the edge's base64 offer, trickles its candidates,
// opens a `control` data channel before the offer (as Anbox-style clients do) and sends
// input on it.
//
// Usage: node gateway_ws.mjs '<json options>'
//   {
//     "origin": "http://127.0.0.1:PORT",   // page origin (the edge's /healthz)
//     "pages": [{"name": "controller", "url": "ws://.../sockets/slave?token=...",
//                "iceServers": [], "sendPrefix": "ctrl-input"}],
//     "seconds": 25,                        // hard bound
//     "minFrames": 30                       // stop once every page decoded more than this
//   }
//
// Prints {"event":"stats",...} samples and a final {"event":"result","pages":{name: sample}};
// exit 0 unless the harness itself failed (2).
import {
  BASE_ARGS, driverOptions, emit, forwardPageLogs, freshUserDataDir, installStatsReader,
  runDriver, startWatchdog,
} from './chromium_common.mjs';

const { opts, seconds, deadline } = driverOptions(25);
const userDataDir = freshUserDataDir('edgerelay-chromium-ws-');
const guard = startWatchdog((seconds + 30) * 1000);

// Runs inside the page: the client side of the protocol.
function clientMain(o) {
  const st = {
    role: null, offerRole: null, errors: [], wsState: 'connecting', dcState: 'none',
    received: [], sent: 0, candidatesSent: 0, candidatesReceived: 0, closeCode: null,
  };
  window.__st = st;
  const pc = new RTCPeerConnection({ iceServers: o.iceServers || [] });
  window.__pc = pc;
  const dc = pc.createDataChannel('control');
  dc.onopen = () => {
    st.dcState = 'open';
    let n = 0;
    const tick = setInterval(() => {
      if (dc.readyState !== 'open' || n >= (o.sendCount || 10)) { clearInterval(tick); return; }
      dc.send(`${o.sendPrefix}-${n++}`);
      st.sent = n;
    }, 300);
  };
  dc.onclose = () => { st.dcState = 'closed'; };
  const onMsg = (ev) => st.received.push(typeof ev.data === 'string' ? ev.data : '[binary]');
  dc.onmessage = onMsg;
  pc.ondatachannel = (ev) => { ev.channel.onmessage = onMsg; };
  const ws = new WebSocket(o.url);
  window.__ws = ws;
  const send = (m) => ws.send(JSON.stringify(m));
  pc.onicecandidate = (e) => {
    if (!e.candidate || !e.candidate.candidate) return;
    send({ type: 'candidate', candidate: btoa(e.candidate.candidate),
           sdpMid: e.candidate.sdpMid, sdpMLineIndex: e.candidate.sdpMLineIndex });
    st.candidatesSent++;
  };
  ws.onopen = () => { st.wsState = 'open'; send({ type: 'discover' }); };
  ws.onclose = (e) => { st.wsState = 'closed'; st.closeCode = e.code; };
  ws.onmessage = async (ev) => {
    let m;
    try { m = JSON.parse(ev.data); } catch (e) { st.errors.push('bad JSON from edge'); return; }
    try {
      if (m.type === 'resp:discover') {
        st.role = m.role;
        send({ type: 'settings', api_version: 2, data_channels: ['control'],
               enable_video: true, enable_audio: true });
      } else if (m.type === 'offer') {
        st.offerRole = m.role || null;
        await pc.setRemoteDescription({ type: 'offer', sdp: atob(m.sdp) });
        await pc.setLocalDescription(await pc.createAnswer());
        send({ type: 'answer', sdp: btoa(pc.localDescription.sdp) });
      } else if (m.type === 'candidate') {
        st.candidatesReceived++;
        if (m.candidate) {
          await pc.addIceCandidate({ candidate: atob(m.candidate), sdpMid: m.sdpMid,
                                     sdpMLineIndex: m.sdpMLineIndex });
        }
      } else if (m.type === 'error') {
        st.errors.push(m.message);
      }
    } catch (e) {
      st.errors.push('client: ' + String(e));
    }
  };
}

async function sample(page) {
  return page.evaluate(async () => {
    const pc = window.__pc;
    const st = window.__st;
    const { byId, inbound: video, nominatedPair: pair } = await window.__readStats(pc);
    const cand = (id) => (id && byId[id]
      ? { type: byId[id].candidateType, address: byId[id].address, port: byId[id].port } : null);
    return {
      ...st,
      received: st.received.slice(-20),
      receivedCount: st.received.length,
      iceState: pc.iceConnectionState,
      connState: pc.connectionState,
      framesDecoded: video ? (video.framesDecoded || 0) : 0,
      frameWidth: video ? video.frameWidth : null,
      codec: video && byId[video.codecId] ? byId[video.codecId].mimeType : null,
      localCandidate: pair ? cand(pair.localCandidateId) : null,
      remoteCandidate: pair ? cand(pair.remoteCandidateId) : null,
    };
  });
}

await runDriver({ userDataDir, args: BASE_ARGS, executablePath: opts.executablePath, guard },
  async (browser) => {
  const pages = [];
  for (const p of opts.pages || []) {
    const page = await browser.newPage();
    forwardPageLogs(page, p.name);
    const health = await page.goto(`${opts.origin}/healthz`, { timeout: 15000 });
    emit({ event: 'healthz', page: p.name, status: health ? health.status() : null });
    await installStatsReader(page);
    await page.evaluate(clientMain, p);
    pages.push({ name: p.name, page });
    // Join in order: the first page is the controller when the tokens say so.
    await new Promise((r) => setTimeout(r, 300));
  }
  const last = {};
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 500));
    let done = true;
    for (const { name, page } of pages) {
      const s = await sample(page);
      last[name] = s;
      emit({ event: 'stats', page: name, framesDecoded: s.framesDecoded, role: s.role,
             ice: s.iceState, dc: s.dcState, sent: s.sent, received: s.receivedCount,
             errors: s.errors });
      const sentAll = s.dcState !== 'open' || s.sent >= 10;
      if (!(s.framesDecoded > Number(opts.minFrames ?? 30) && sentAll)) done = false;
    }
    if (done) break;
  }
  // Let the last input messages travel before the pages close.
  await new Promise((r) => setTimeout(r, 1000));
  emit({ event: 'result', pages: last });
});
