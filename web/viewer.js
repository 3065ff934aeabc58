// edgerelay viewer page: WHEP (or the gateway flow when configured) into a <video>,
// the viewer's role, live stats from getStats(), and input on the `control` channel.
"use strict";

const params = new URLSearchParams(location.search);
const room = params.get("room") || "demo";
const token = params.get("token") || "";
const $ = (id) => document.getElementById(id);
$("room").textContent = room;
if (params.get("relay") === "1") $("relay").checked = true;

let pc = null;
let control = null;
let resource = null;

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

async function connect() {
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
  pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  control = pc.createDataChannel("control");
  control.onmessage = (e) => log("instance: " + (typeof e.data === "string" ? e.data : "[binary]"));
  pc.ontrack = (e) => {
    const v = $("video");
    if (!v.srcObject) v.srcObject = new MediaStream();
    v.srcObject.addTrack(e.track);
  };
  pc.onconnectionstatechange = () => status(pc.connectionState, pc.connectionState === "failed");
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
