// Drives the Debian Chromium as the *instance* of a gateway session (docs/PROTOCOL.md section
// 4.2, `/1.0/session/{id}/sockets/master`) and as its viewers (`/sockets/slave`, section 4.1),
// all in one browser with one page each.
//
// Instance page: Chromium's fake camera (`--use-fake-device-for-media-stream`, a moving
// picture) as a sendonly video track, a `control` data channel created before the offer;
// over the socket: discover -> resp:discover, then the instance offers (base64 SDP), the
// edge answers, the instance trickles its candidates (base64) and an empty one at the end.
// It records every message the edge sends and every `control` message it receives, and
// sends its own numbered messages on `control` (viewers should receive them).
//
// Viewer pages: discover -> resp:discover -> settings -> offer (from the edge) -> answer,
// candidates trickled; a `control` channel opened before the offer; `sendCount` numbered
// input messages `<sendPrefix>-N` sent on it.
//
// Usage: node gateway_master.mjs '<json options>'
//   {
//     "origin": "http://127.0.0.1:PORT",        // page origin (the edge's /healthz)
//     "masterUrl": "ws://.../sockets/master?token=...",
//     "viewers": [{"name": "controller", "url": "ws://.../sockets/slave?token=...",
//                  "sendPrefix": "ctrl-input", "early": true}],   // early: before the instance
//     "seconds": 45,                              // hard bound for the whole run
//     "executablePath": "/usr/bin/chromium"
//   }
//
// Commands on stdin, one per line: `close-instance` (the instance page closes its WebSocket
// with code 1000; its peer connection is left alone) and `finish` (print the result, exit).
// Prints JSON lines: {"event":"stats","pages":{name: sample}} every 500 ms, {"event":"ack",
// "command":...} per command, and a final {"event":"result","pages":{...}}; exit 0 unless the
// harness itself failed (2) or the watchdog fired (3).
import readline from 'node:readline';
import {
  BASE_ARGS, driverOptions, emit, forwardPageLogs, freshUserDataDir, installStatsReader,
  runDriver, startWatchdog,
} from './chromium_common.mjs';

const { opts, seconds, deadline } = driverOptions(45);
const userDataDir = freshUserDataDir('edgerelay-chromium-master-');
const args = [
  ...BASE_ARGS, '--use-fake-device-for-media-stream',
  // Host candidates as real addresses, not mDNS names the edge cannot resolve.
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];
const guard = startWatchdog((seconds + 20) * 1000);

const commands = [];
readline.createInterface({ input: process.stdin }).on('line', (l) => {
  if (l.trim()) commands.push(l.trim());
});

// Runs inside the instance page.
async function instanceMain(o) {
  const st = {
    kind: 'instance', wsState: 'connecting', role: null, session: null, errors: [],
    messages: [], received: [], dcState: 'none', sent: 0, candidatesSent: 0,
    endOfCandidatesSent: false, candidatesReceived: 0, closeCode: null, closeClean: null,
    closedByUs: false,
    offerHasApplication: false, answerHasApplication: false, answerIceLite: false,
    answerCandidates: 0, answerVideoDirection: null, answerCodecs: [],
  };
  window.__st = st;
  const stream = await navigator.mediaDevices.getUserMedia({
    video: { width: 320, height: 240, frameRate: 15 }, audio: false,
  });
  const pc = new RTCPeerConnection({ iceServers: [] });
  window.__pc = pc;
  for (const track of stream.getTracks()) {
    pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
  }
  const dc = pc.createDataChannel('control');
  dc.onopen = () => {
    st.dcState = 'open';
    const tick = setInterval(() => {
      if (dc.readyState !== 'open' || st.sent >= 40) { clearInterval(tick); return; }
      dc.send(`instance-msg-${st.sent}`);
      st.sent++;
    }, 250);
  };
  dc.onclose = () => { st.dcState = 'closed'; };
  const onMsg = (ev) => st.received.push(typeof ev.data === 'string' ? ev.data : '[binary]');
  dc.onmessage = onMsg;
  pc.ondatachannel = (ev) => { ev.channel.onmessage = onMsg; };

  const ws = new WebSocket(o.url);
  window.__ws = ws;
  const send = (m) => ws.send(JSON.stringify(m));
  let offerSent = false;
  const pending = [];
  const sendCandidate = (c) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    if (c === null) {
      send({ type: 'candidate', candidate: '', sdpMid: '0', sdpMLineIndex: 0 });
      st.endOfCandidatesSent = true;
      return;
    }
    send({ type: 'candidate', candidate: btoa(c.candidate), sdpMid: c.sdpMid,
           sdpMLineIndex: c.sdpMLineIndex });
    st.candidatesSent++;
  };
  // The edge accepts candidates only after the offer: hold them until it is sent.
  pc.onicecandidate = (e) => {
    const c = e.candidate && e.candidate.candidate ? e.candidate : null;
    if (offerSent) sendCandidate(c); else pending.push(c);
  };
  ws.onopen = () => { st.wsState = 'open'; send({ type: 'discover' }); };
  ws.onclose = (e) => {
    st.wsState = 'closed'; st.closeCode = e.code; st.closeClean = e.wasClean;
  };
  ws.onmessage = async (ev) => {
    let m;
    try { m = JSON.parse(ev.data); } catch (e) { st.errors.push('bad JSON from edge'); return; }
    st.messages.push(m.type === 'answer' ? { type: 'answer', sdpBytes: (m.sdp || '').length }
      : m);
    try {
      if (m.type === 'resp:discover') {
        st.role = m.role;
        st.session = m.session;
        const offer = await pc.createOffer();
        await pc.setLocalDescription(offer);
        st.offerHasApplication = /\r\nm=application /.test(pc.localDescription.sdp);
        send({ type: 'offer', sdp: btoa(pc.localDescription.sdp) });
        offerSent = true;
        for (const c of pending.splice(0)) sendCandidate(c);
      } else if (m.type === 'answer') {
        const sdp = atob(m.sdp);
        st.answerHasApplication = /\r\nm=application /.test(sdp);
        st.answerIceLite = /\r\na=ice-lite/.test(sdp);
        st.answerCandidates = (sdp.match(/\r\na=candidate:/g) || []).length;
        const video = sdp.split(/\r\n(?=m=)/).find((s) => s.startsWith('m=video'));
        if (video) {
          const dir = video.match(/\r\na=(sendrecv|sendonly|recvonly|inactive)/);
          st.answerVideoDirection = dir ? dir[1] : null;
          st.answerCodecs = [...video.matchAll(/\r\na=rtpmap:\d+ ([^/\r]+)/g)].map((x) => x[1]);
        }
        await pc.setRemoteDescription({ type: 'answer', sdp });
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
      st.errors.push('instance: ' + String(e));
    }
  };
  window.__closeSocket = () => { st.closedByUs = true; ws.close(1000, 'instance done'); };
}

// Runs inside a viewer page.
function viewerMain(o) {
  const st = {
    kind: 'viewer', wsState: 'connecting', role: null, offerRole: null, errors: [],
    messages: [], received: [], dcState: 'none', sent: 0, candidatesSent: 0,
    candidatesReceived: 0, closeCode: null, closeClean: null, offerHasApplication: false,
  };
  window.__st = st;
  const pc = new RTCPeerConnection({ iceServers: o.iceServers || [] });
  window.__pc = pc;
  const dc = pc.createDataChannel('control');
  dc.onopen = () => {
    st.dcState = 'open';
    const tick = setInterval(() => {
      if (dc.readyState !== 'open' || st.sent >= (o.sendCount || 10)) {
        clearInterval(tick);
        return;
      }
      dc.send(`${o.sendPrefix}-${st.sent}`);
      st.sent++;
    }, 200);
  };
  dc.onclose = () => { st.dcState = 'closed'; };
  const onMsg = (ev) => st.received.push(typeof ev.data === 'string' ? ev.data : '[binary]');
  dc.onmessage = onMsg;
  pc.ondatachannel = (ev) => { ev.channel.onmessage = onMsg; };
  const ws = new WebSocket(o.url);
  window.__ws = ws;
  const send = (m) => ws.send(JSON.stringify(m));
  pc.onicecandidate = (e) => {
    if (!e.candidate || !e.candidate.candidate || ws.readyState !== WebSocket.OPEN) return;
    send({ type: 'candidate', candidate: btoa(e.candidate.candidate), sdpMid: e.candidate.sdpMid,
           sdpMLineIndex: e.candidate.sdpMLineIndex });
    st.candidatesSent++;
  };
  ws.onopen = () => { st.wsState = 'open'; send({ type: 'discover' }); };
  ws.onclose = (e) => {
    st.wsState = 'closed'; st.closeCode = e.code; st.closeClean = e.wasClean;
  };
  ws.onmessage = async (ev) => {
    let m;
    try { m = JSON.parse(ev.data); } catch (e) { st.errors.push('bad JSON from edge'); return; }
    st.messages.push(m.type === 'offer' ? { type: 'offer', role: m.role } : m);
    try {
      if (m.type === 'resp:discover') {
        st.role = m.role;
        send({ type: 'settings', api_version: 2, data_channels: ['control'],
               enable_video: true, enable_audio: true });
      } else if (m.type === 'offer') {
        st.offerRole = m.role || null;
        const sdp = atob(m.sdp);
        st.offerHasApplication = /\r\nm=application /.test(sdp);
        await pc.setRemoteDescription({ type: 'offer', sdp });
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
      st.errors.push('viewer: ' + String(e));
    }
  };
}

async function sample(page) {
  return page.evaluate(async () => {
    const st = window.__st;
    const pc = window.__pc;
    if (!st || !pc) return { wsState: 'starting' };
    const {
      byId, inbound, outbound, nominatedPair: pair,
    } = await window.__readStats(pc);
    const rtp = inbound || outbound;
    const cand = (id) => (id && byId[id]
      ? { type: byId[id].candidateType, address: byId[id].address, port: byId[id].port } : null);
    return {
      ...st,
      received: st.received.slice(0, 60),
      receivedCount: st.received.length,
      iceState: pc.iceConnectionState,
      connState: pc.connectionState,
      framesDecoded: inbound ? (inbound.framesDecoded || 0) : 0,
      framesEncoded: outbound ? (outbound.framesEncoded || 0) : 0,
      packetsSent: outbound ? (outbound.packetsSent || 0) : 0,
      frameWidth: rtp ? (rtp.frameWidth ?? null) : null,
      codec: rtp && byId[rtp.codecId] ? byId[rtp.codecId].mimeType : null,
      localCandidate: pair ? cand(pair.localCandidateId) : null,
      remoteCandidate: pair ? cand(pair.remoteCandidateId) : null,
    };
  });
}

await runDriver({ userDataDir, args, executablePath: opts.executablePath, guard },
  async (browser) => {
  const pages = [];
  const open = async (name, fn, arg) => {
    const page = await browser.newPage();
    forwardPageLogs(page, name);
    const health = await page.goto(`${opts.origin}/healthz`, { timeout: 15000 });
    emit({ event: 'page', page: name, healthz: health ? health.status() : null });
    await installStatsReader(page);
    await page.evaluate(fn, arg);
    pages.push({ name, page });
    return page;
  };
  const viewers = opts.viewers || [];
  for (const v of viewers.filter((x) => x.early)) await open(v.name, viewerMain, v);
  // Let the early viewers reach the edge's wait for the instance.
  if (viewers.some((x) => x.early)) await new Promise((r) => setTimeout(r, 1000));
  const instance = await open('instance', instanceMain, { url: opts.masterUrl });
  for (const v of viewers.filter((x) => !x.early)) await open(v.name, viewerMain, v);

  let finished = false;
  while (!finished && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 500));
    while (commands.length) {
      const c = commands.shift();
      if (c === 'close-instance') {
        await instance.evaluate(() => window.__closeSocket());
      } else if (c === 'finish') {
        finished = true;
      }
      emit({ event: 'ack', command: c, at: Date.now() });
    }
    const snap = {};
    for (const { name, page } of pages) snap[name] = await sample(page);
    emit({ event: finished ? 'result' : 'stats', at: Date.now(), pages: snap });
  }
  if (!finished) emit({ event: 'error', error: `no "finish" command within ${seconds}s` });
});
