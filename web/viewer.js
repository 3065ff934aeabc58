// edgerelay viewer page: the gateway flow (join or create a session, then the edge
// WebSocket, docs/PROTOCOL.md section 4) or WHEP into a <video>, the viewer's role,
// live stats from getStats(), and input on the `control` channel.
//
// Query parameters:
//   ?ws=<socket url>                                  open an edge socket URL directly
//   ?gateway=<base>&api_token=<t>&session=<id>        join a session (spectator)
//   ?gateway=<base>&api_token=<t>                     create a session (controller)
//   ?mode=whep&room=<room>&token=<viewer token>       WHEP fallback (also the default
//                                                     when no gateway parameter is given)
"use strict";

const params = new URLSearchParams(location.search);
const gateway = (params.get("gateway") || "").replace(/\/+$/, "");
const apiToken = params.get("api_token") || "";
const directWs = params.get("ws") || "";
const mode = params.get("mode") || (directWs || gateway ? "ws" : "whep");
let room = params.get("room") || params.get("session") || "demo";
const token = params.get("token") || "";
const $ = (id) => document.getElementById(id);
$("room").textContent = room;
if (params.get("relay") === "1") $("relay").checked = true;

let pc = null;
let control = null;
let resource = null;
let socket = null;

function log(msg) {
  const el = $("log");
  el.textContent = (new Date().toISOString().slice(11, 19) + " " + msg + "\n" + el.textContent).slice(0, 4000);
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Parses `Link: <turn:...>; rel="ice-server"; username="..."; credential="..."` headers.
function iceServersFromLinks(header) {
  if (!header) return [];
  const out = [];
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = part.match(/<([^>]+)>/);
    if (!m || !/rel="?ice-server"?/.test(part)) continue;
    const s = { urls: m[1] };
    const u = part.match(/username="([^"]*)"/);
    const c = part.match(/credential="([^"]*)"/);
    if (u) s.username = u[1];
    if (c) s.credential = c[1];
    out.push(s);
  }
  return out;
}

async function waitGathering(pc) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const t = setTimeout(resolve, 2000);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
    });
  });
}

// Calls the gateway API; returns the envelope's metadata or throws its error message.
async function gatewayCall(method, path, body) {
  const resp = await fetch(gateway + path, {
    method,
    headers: { "Authorization": "Bearer " + apiToken, "Content-Type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const env = await resp.json().catch(() => ({ error: "gateway answered " + resp.status }));
  if (!resp.ok) throw new Error("gateway: " + (env.error || resp.status));
  return env.metadata;
}

// `stun_servers` entries use `password`; RTCIceServer wants `credential`.
function toIceServers(list) {
  return (list || []).map((s) => {
    const o = { urls: s.urls };
    if (s.username) o.username = s.username;
    if (s.password) o.credential = s.password;
    return o;
  });
}

function newPeer(iceServers, recvTransceivers) {
  const relayOnly = $("relay").checked;
  pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" });
  if (recvTransceivers) {
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
  }
  pc.ontrack = (e) => {
    const v = $("video");
    if (!v.srcObject) v.srcObject = new MediaStream();
    v.srcObject.addTrack(e.track);
  };
  pc.onconnectionstatechange = () => status(pc.connectionState, pc.connectionState === "failed");
  // Opened before the offer arrives, like Anbox-style clients; the edge's own
  // `control` channel (ondatachannel) carries the instance's messages too.
  control = pc.createDataChannel("control");
  const onMsg = (e) => log("instance: " + (typeof e.data === "string" ? e.data : "[binary]"));
  control.onmessage = onMsg;
  pc.ondatachannel = (e) => { e.channel.onmessage = onMsg; };
  return pc;
}

// The gateway flow: get a socket URL (join, create, or given), then speak section 4.
async function connectWs() {
  if (pc) { pc.close(); pc = null; }
  if (socket) { socket.close(); socket = null; }
  status("connecting");
  let url = directWs;
  let iceServers = [];
  if (!url) {
    if (!gateway) throw new Error("no gateway= or ws= parameter");
    const session = params.get("session");
    const m = session
      ? await gatewayCall("POST", "/1.0/sessions/" + encodeURIComponent(session) + "/join")
      : await gatewayCall("POST", "/1.0/sessions", { app: "viewer-page", joinable: true, idle_time_min: 5 });
    url = m.url;
    iceServers = toIceServers(m.stun_servers);
    room = m.id || session;
    $("room").textContent = room;
    if (!session) {
      const share = location.origin + location.pathname + "?gateway=" + encodeURIComponent(gateway) +
        "&api_token=" + encodeURIComponent(apiToken) + "&session=" + encodeURIComponent(room);
      log("spectators join with: " + share);
      log("new session " + room + ": waiting for its instance");
    }
  }
  newPeer(iceServers, false);
  socket = new WebSocket(url);
  const send = (m) => socket.send(JSON.stringify(m));
  pc.onicecandidate = (e) => {
    if (e.candidate && e.candidate.candidate && socket.readyState === WebSocket.OPEN) {
      send({ type: "candidate", candidate: btoa(e.candidate.candidate), sdpMid: e.candidate.sdpMid, sdpMLineIndex: e.candidate.sdpMLineIndex });
    }
  };
  socket.onopen = () => send({ type: "discover" });
  socket.onclose = (e) => log("socket closed (" + e.code + ")");
  socket.onmessage = async (ev) => {
    let m;
    try { m = JSON.parse(ev.data); } catch (e) { return; }
    try {
      if (m.type === "resp:discover") {
        $("role").textContent = m.role;
        $("role").className = m.role;
        send({ type: "settings", api_version: 2, data_channels: ["control"], enable_video: true, enable_audio: true });
      } else if (m.type === "offer") {
        await pc.setRemoteDescription({ type: "offer", sdp: atob(m.sdp) });
        await pc.setLocalDescription(await pc.createAnswer());
        send({ type: "answer", sdp: btoa(pc.localDescription.sdp) });
        log("joined as " + (m.role || $("role").textContent) + " over the WebSocket");
      } else if (m.type === "candidate" && m.candidate) {
        await pc.addIceCandidate({ candidate: atob(m.candidate), sdpMid: m.sdpMid, sdpMLineIndex: m.sdpMLineIndex });
      } else if (m.type === "error") {
        status("edge: " + m.message, true);
      }
    } catch (e) {
      status(String(e), true);
    }
  };
}

function connect() {
  return mode === "whep" ? connectWhep() : connectWs();
}

async function connectWhep() {
  if (pc) { pc.close(); pc = null; }
  status("connecting");
  const headers = { "Content-Type": "application/sdp" };
  if (token) headers["Authorization"] = "Bearer " + token;
  // Ask once for the ICE servers (the edge's TURN) when relay-only is wanted.
  let iceServers = [];
  const relayOnly = $("relay").checked;
  if (relayOnly) {
    const probe = await fetch("/api/ice-servers", { headers });
    if (probe.ok) iceServers = await probe.json();
  }
  newPeer(iceServers, true);
  await pc.setLocalDescription(await pc.createOffer());
  await waitGathering(pc);
  const resp = await fetch("/whep/" + encodeURIComponent(room), {
    method: "POST", headers, body: pc.localDescription.sdp,
  });
  if (resp.status !== 201) {
    status("error " + resp.status + ": " + (await resp.text()).trim(), true);
    return;
  }
  resource = resp.headers.get("Location");
  const role = resp.headers.get("X-Edgerelay-Role") || "?";
  $("role").textContent = role;
  $("role").className = role;
  await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
  log("joined as " + role);
}

function sendInput(obj) {
  if (control && control.readyState === "open") control.send(JSON.stringify(obj));
}

$("video").addEventListener("pointerdown", (e) => {
  const r = e.target.getBoundingClientRect();
  sendInput({ type: "touch", x: Math.round((e.clientX - r.left) / r.width * 1000) / 1000, y: Math.round((e.clientY - r.top) / r.height * 1000) / 1000 });
});
window.addEventListener("keydown", (e) => sendInput({ type: "key", key: e.key }));
$("connect").addEventListener("click", () => connect().catch((e) => status(String(e), true)));
window.addEventListener("beforeunload", () => {
  if (resource) fetch(resource, { method: "DELETE", headers: token ? { Authorization: "Bearer " + token } : {}, keepalive: true });
});

let last = null;
setInterval(async () => {
  if (!pc) return;
  const stats = await pc.getStats();
  let inbound = null, pair = null, codecs = {};
  const byId = {};
  stats.forEach((s) => { byId[s.id] = s; });
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
    if (s.type === "candidate-pair" && s.state === "succeeded" && s.nominated) pair = s;
    if (s.type === "codec") codecs[s.id] = s.mimeType;
  });
  if (inbound) {
    if (last) {
      const dt = (inbound.timestamp - last.timestamp) / 1000;
      $("s-bitrate").textContent = ((inbound.bytesReceived - last.bytesReceived) * 8 / dt / 1000).toFixed(0) + " kbit/s";
      $("s-fps").textContent = ((inbound.framesDecoded - last.framesDecoded) / dt).toFixed(1);
    }
    $("s-decoded").textContent = inbound.framesDecoded;
    $("s-res").textContent = (inbound.frameWidth || "?") + "x" + (inbound.frameHeight || "?");
    const lost = inbound.packetsLost || 0;
    $("s-loss").textContent = lost + " (" + (100 * lost / Math.max(1, lost + inbound.packetsReceived)).toFixed(2) + "%)";
    $("s-codec").textContent = codecs[inbound.codecId] || "-";
    last = inbound;
  }
  if (pair) {
    $("s-rtt").textContent = pair.currentRoundTripTime !== undefined ? (pair.currentRoundTripTime * 1000).toFixed(0) + " ms" : "-";
    const l = byId[pair.localCandidateId], r = byId[pair.remoteCandidateId];
    $("s-pair").textContent = (l ? l.candidateType : "?") + " -> " + (r ? r.candidateType : "?");
  }
}, 1000);

if (params.get("autoplay") !== "0") connect().catch((e) => status(String(e), true));
