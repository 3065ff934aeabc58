//! Signalling of one swarm viewer: WHEP (the viewer offers, recvonly video) or the
//! Janus streaming plugin over Janus's HTTP API (create a session, attach
//! `janus.plugin.streaming`, `watch` a mountpoint, long-poll for Janus's offer, answer
//! with `start`, keep the session alive, destroy it at the end).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind};
use str0m::Candidate;

use super::swarm::{rtc_config, NewViewer, ViewerCounters};
use super::turn_client::{TurnClient, TurnEvent};
use crate::publisher::signal;

/// Longest wait for one TURN step (Allocate, or permissions and channels) of a join.
const TURN_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for Janus's offer.
const JANUS_OFFER_TIMEOUT: Duration = Duration::from_secs(20);
/// Janus session keepalive period (Janus's default session timeout is 60 s).
const JANUS_KEEPALIVE: Duration = Duration::from_secs(20);
/// Upper bound of a Janus response we read.
const MAX_JANUS_BODY: usize = 256 * 1024;

/// What must be cleaned up when the viewer leaves.
#[derive(Debug, Clone)]
pub enum Teardown {
    /// WHEP resource URL to DELETE (if the server gave one).
    Whep(Option<String>),
    /// Janus session to destroy.
    Janus {
        /// Session id.
        session: u64,
    },
}

fn bind_for(ip: IpAddr) -> anyhow::Result<(std::net::UdpSocket, Candidate)> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
    let cand = Candidate::host(socket.local_addr()?, "udp")
        .map_err(|e| anyhow::anyhow!("host candidate: {e}"))?;
    Ok((socket, cand))
}

/// Where and as whom relayed viewers allocate (the edge's built-in TURN over UDP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// TURN server address (UDP).
    pub server: SocketAddr,
    /// Long-term (REST) username.
    pub username: String,
    /// Its password.
    pub credential: String,
}

/// The UDP server address of a `turn:host:port?transport=udp` URL (or one without
/// `transport`); `None` for `turns:` and TCP URLs.
pub fn turn_udp_addr(url: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = url.strip_prefix("turn:")?;
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    if query.split('&').any(|kv| {
        kv.strip_prefix("transport=")
            .is_some_and(|t| !t.eq_ignore_ascii_case("udp"))
    }) {
        return None;
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().ok()?),
        _ => (hostport, 3478),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port).to_socket_addrs().ok()?.next()
}

/// Parses RFC 9725 `Link: <turn:...>; rel="ice-server"; username=".."; credential=".."`
/// values into (url, username, credential).
pub fn parse_ice_links<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in values {
        // One header value may carry several comma-separated links.
        for link in v.split(',') {
            let link = link.trim();
            let Some(rest) = link.strip_prefix('<') else {
                continue;
            };
            let Some((url, params)) = rest.split_once('>') else {
                continue;
            };
            let (mut rel, mut user, mut cred) = (false, None, None);
            for p in params.split(';') {
                let Some((k, val)) = p.trim().split_once('=') else {
                    continue;
                };
                let val = val.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "rel" => rel = val.split_whitespace().any(|r| r == "ice-server"),
                    "username" => user = Some(val.to_owned()),
                    "credential" => cred = Some(val.to_owned()),
                    _ => {}
                }
            }
            if let (true, Some(u), Some(c)) = (rel, user, cred) {
                out.push((url.to_owned(), u, c));
            }
        }
    }
    out
}

/// Finds the edge's TURN server and credentials: `GET /api/ice-servers` next to the
/// WHEP URL, else the `Link` headers of a probe WHEP answer (its session is deleted).
pub async fn relay_config(
    client: &reqwest::Client,
    whep: &str,
    token: Option<&str>,
    local_ip: IpAddr,
) -> anyhow::Result<RelayConfig> {
    let mut candidates: Vec<(String, String, String)> = Vec::new();
    if let Ok(mut u) = reqwest::Url::parse(whep) {
        u.set_path("/api/ice-servers");
        u.set_query(None);
        let mut req = client.get(u);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Ok(resp) = req.send().await {
            if resp.status().is_success() {
                if let Ok(Value::Array(list)) = resp.json::<Value>().await {
                    for s in list {
                        let (Some(user), Some(cred)) =
                            (s["username"].as_str(), s["credential"].as_str())
                        else {
                            continue;
                        };
                        for url in s["urls"].as_array().into_iter().flatten() {
                            if let Some(url) = url.as_str() {
                                candidates.push((url.to_owned(), user.to_owned(), cred.to_owned()));
                            }
                        }
                    }
                }
            }
        }
    }
    if candidates.is_empty() {
        // Probe: one WHEP exchange only for its Link headers.
        let mut rtc = rtc_config().build(Instant::now());
        let (_socket, cand) = bind_for(local_ip)?;
        rtc.add_local_candidate(cand);
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let (offer, _pending) = api
            .apply()
            .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;
        let mut req = client
            .post(whep)
            .header(reqwest::header::CONTENT_TYPE, "application/sdp")
            .body(offer.to_sdp_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let links: Vec<String> = resp
            .headers()
            .get_all(reqwest::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| reqwest::Url::parse(whep).ok()?.join(l).ok());
        if let Some(loc) = location {
            let _ = signal::delete_resource(client, loc.as_str(), token).await;
        }
        candidates = parse_ice_links(links.iter().map(String::as_str));
    }
    candidates
        .into_iter()
        .find_map(|(url, username, credential)| {
            Some(RelayConfig {
                server: turn_udp_addr(&url)?,
                username,
                credential,
            })
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the edge advertises no turn:...?transport=udp server (is [turn] enabled?)"
            )
        })
}

/// UDP candidates (`a=candidate:` lines) of an SDP, as addresses.
pub fn sdp_udp_candidates(sdp: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in sdp.lines() {
        let Some(c) = line.trim().strip_prefix("a=candidate:") else {
            continue;
        };
        let f: Vec<&str> = c.split_whitespace().collect();
        let (Some(proto), Some(ip), Some(port)) = (f.get(2), f.get(4), f.get(5)) else {
            continue;
        };
        if !proto.eq_ignore_ascii_case("udp") {
            continue;
        }
        if let (Ok(ip), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) {
            let a = SocketAddr::new(ip, port);
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Runs TURN transactions on `sock` until `want` success events arrived.
async fn drive_turn(
    sock: &tokio::net::UdpSocket,
    tc: &mut TurnClient,
    mut want: usize,
) -> anyhow::Result<()> {
    let end = Instant::now() + TURN_STEP_TIMEOUT;
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some(d) = tc.poll_transmit() {
            sock.send_to(&d, tc.server()).await?;
        }
        while let Some(e) = tc.poll_event() {
            match e {
                TurnEvent::Failed(why) => anyhow::bail!("TURN: {why}"),
                _ => want = want.saturating_sub(1),
            }
        }
        if want == 0 {
            return Ok(());
        }
        let now = Instant::now();
        anyhow::ensure!(now < end, "TURN: no answer within {TURN_STEP_TIMEOUT:?}");
        let wake = tc.poll_timeout().unwrap_or(end).min(end);
        match tokio::time::timeout(
            wake.saturating_duration_since(now),
            sock.recv_from(&mut buf),
        )
        .await
        {
            Ok(Ok((n, from))) => {
                if from == tc.server() {
                    let _ = tc.handle_input(Instant::now(), &buf[..n]);
                }
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => tc.handle_timeout(Instant::now()),
        }
    }
}

/// Joins through WHEP: recvonly video offer, answer applied. With `relay`, the
/// viewer first allocates on the TURN server, offers only that relayed candidate, and
/// binds a channel to every UDP candidate of the answer before media starts.
pub async fn join_whep(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    local_ip: IpAddr,
    relay: Option<&RelayConfig>,
    counters: Arc<ViewerCounters>,
) -> anyhow::Result<(NewViewer, Teardown)> {
    let requested = Instant::now();
    let mut rtc = rtc_config().build(Instant::now());
    let (direct, turn) = match relay {
        None => {
            let (socket, cand) = bind_for(local_ip)?;
            rtc.add_local_candidate(cand);
            (Some(socket), None)
        }
        Some(r) => {
            let std_sock = std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
            std_sock.set_nonblocking(true)?;
            let sock = tokio::net::UdpSocket::from_std(std_sock)?;
            let mut tc = TurnClient::new(r.server, &r.username, &r.credential, Instant::now());
            drive_turn(&sock, &mut tc, 1).await?;
            let relayed = tc
                .relayed()
                .ok_or_else(|| anyhow::anyhow!("TURN: no relayed address"))?;
            let cand = Candidate::relayed(relayed, sock.local_addr()?, "udp")
                .map_err(|e| anyhow::anyhow!("relay candidate: {e}"))?;
            rtc.add_local_candidate(cand);
            (None, Some((sock, tc, relayed)))
        }
    };
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;
    let ex = signal::post_offer(client, url, token, &offer.to_sdp_string()).await?;
    let cleanup = |e: anyhow::Error| {
        let r = ex.resource.clone();
        async move {
            if let Some(r) = r {
                let _ = signal::delete_resource(client, &r, token).await;
            }
            Err(e)
        }
    };
    let answer = match SdpAnswer::from_sdp_string(&ex.answer) {
        Ok(a) => a,
        Err(e) => return cleanup(anyhow::anyhow!("bad SDP answer: {e}")).await,
    };
    if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
        return cleanup(anyhow::anyhow!("answer rejected: {e}")).await;
    }
    let (socket, turn) = match (direct, turn) {
        (Some(socket), _) => (socket, None),
        (None, Some((sock, mut tc, relayed))) => {
            let peers: Vec<SocketAddr> = sdp_udp_candidates(&ex.answer)
                .into_iter()
                .filter(|a| a.is_ipv4() == relayed.is_ipv4())
                .collect();
            if peers.is_empty() {
                return cleanup(anyhow::anyhow!("the answer has no usable UDP candidate")).await;
            }
            let now = Instant::now();
            tc.create_permission(now, &peers);
            for p in &peers {
                tc.bind_channel(now, *p);
            }
            if let Err(e) = drive_turn(&sock, &mut tc, 1 + peers.len()).await {
                return cleanup(e).await;
            }
            (sock.into_std()?, Some(tc))
        }
        (None, None) => anyhow::bail!("no socket"),
    };
    Ok((
        NewViewer {
            rtc,
            socket,
            requested,
            counters,
            turn,
            controller: ex.role.as_deref() == Some("controller"),
        },
        Teardown::Whep(ex.resource),
    ))
}

/// A Janus HTTP API endpoint, e.g. `http://10.0.0.2:8088/janus`.
#[derive(Clone, Debug)]
pub struct Janus {
    client: reqwest::Client,
    base: String,
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Janus {
    /// A client for the API at `base`.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    async fn read(resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let body = resp.bytes().await?;
        anyhow::ensure!(
            body.len() <= MAX_JANUS_BODY,
            "Janus response too large ({} bytes)",
            body.len()
        );
        anyhow::ensure!(status.is_success(), "Janus: HTTP {status}");
        let v: Value = serde_json::from_slice(&body)?;
        if v["janus"] == "error" {
            anyhow::bail!("Janus error: {}", v["error"]);
        }
        Ok(v)
    }

    async fn post(&self, path: &str, mut body: Value) -> anyhow::Result<Value> {
        body["transaction"] = Value::String(transaction());
        let url = format!("{}{path}", self.base);
        let resp = self.client.post(&url).json(&body).send().await?;
        Self::read(resp).await
    }

    fn id(v: &Value) -> anyhow::Result<u64> {
        v["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("Janus response without data.id: {v}"))
    }

    /// Long-polls the session's events until one carries a JSEP offer.
    async fn wait_offer(&self, session: u64) -> anyhow::Result<String> {
        let deadline = Instant::now() + JANUS_OFFER_TIMEOUT;
        while Instant::now() < deadline {
            let url = format!("{}/{session}?maxev=5&rid={}", self.base, transaction());
            let v = Self::read(self.client.get(&url).send().await?).await?;
            let evs = match v {
                Value::Array(a) => a,
                other => vec![other],
            };
            for ev in evs {
                if ev["janus"] == "event" {
                    let res = &ev["plugindata"]["data"];
                    if res["error"].is_string() {
                        anyhow::bail!("streaming plugin: {}", res["error"]);
                    }
                    if ev["jsep"]["type"] == "offer" {
                        if let Some(sdp) = ev["jsep"]["sdp"].as_str() {
                            return Ok(sdp.to_owned());
                        }
                    }
                }
            }
        }
        anyhow::bail!("no offer from Janus within {JANUS_OFFER_TIMEOUT:?}")
    }

    /// Joins a streaming mountpoint: returns the viewer and the session to destroy later.
    pub async fn join(
        &self,
        mountpoint: u64,
        local_ip: IpAddr,
        counters: Arc<ViewerCounters>,
    ) -> anyhow::Result<(NewViewer, Teardown)> {
        let requested = Instant::now();
        let session = Self::id(&self.post("", json!({"janus": "create"})).await?)?;
        let r = self.join_session(session, mountpoint, local_ip).await;
        match r {
            Ok((rtc, socket)) => Ok((
                NewViewer {
                    rtc,
                    socket,
                    requested,
                    counters,
                    turn: None,
                    controller: false,
                },
                Teardown::Janus { session },
            )),
            Err(e) => {
                let _ = self.destroy(session).await;
                Err(e)
            }
        }
    }

    async fn join_session(
        &self,
        session: u64,
        mountpoint: u64,
        local_ip: IpAddr,
    ) -> anyhow::Result<(str0m::Rtc, std::net::UdpSocket)> {
        let attach = json!({"janus": "attach", "plugin": "janus.plugin.streaming"});
        let handle = Self::id(&self.post(&format!("/{session}"), attach).await?)?;
        let watch = json!({"janus": "message", "body": {"request": "watch", "id": mountpoint}});
        self.post(&format!("/{session}/{handle}"), watch).await?;
        let offer = self.wait_offer(session).await?;
        let offer = SdpOffer::from_sdp_string(&offer)
            .map_err(|e| anyhow::anyhow!("bad Janus offer: {e}"))?;
        let mut rtc = rtc_config().build(Instant::now());
        let (socket, cand) = bind_for(local_ip)?;
        rtc.add_local_candidate(cand);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| anyhow::anyhow!("cannot answer Janus's offer: {e}"))?;
        let start = json!({
            "janus": "message",
            "body": {"request": "start"},
            "jsep": {"type": "answer", "sdp": answer.to_sdp_string()},
        });
        self.post(&format!("/{session}/{handle}"), start).await?;
        let done = json!({"janus": "trickle", "candidate": {"completed": true}});
        self.post(&format!("/{session}/{handle}"), done).await?;
        Ok((rtc, socket))
    }

    /// Sends one keepalive for `session`.
    pub async fn keepalive(&self, session: u64) -> anyhow::Result<()> {
        self.post(&format!("/{session}"), json!({"janus": "keepalive"}))
            .await
            .map(|_| ())
    }

    /// Destroys `session` (and its handles and PeerConnection).
    pub async fn destroy(&self, session: u64) -> anyhow::Result<()> {
        self.post(&format!("/{session}"), json!({"janus": "destroy"}))
            .await
            .map(|_| ())
    }

    /// Keeps every session in `sessions` alive until `stop` flips to true.
    pub async fn keepalive_loop(
        self,
        sessions: Arc<std::sync::Mutex<Vec<u64>>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(JANUS_KEEPALIVE) => {}
                _ = stop.changed() => return,
            }
            let ids: Vec<u64> = sessions.lock().map(|s| s.clone()).unwrap_or_default();
            for id in ids {
                if let Err(e) = self.keepalive(id).await {
                    tracing::debug!(session = id, "Janus keepalive failed: {e:#}");
                }
            }
        }
    }
}

/// Removes a viewer's server-side state (best effort).
pub async fn teardown(
    client: &reqwest::Client,
    janus: Option<&Janus>,
    token: Option<&str>,
    t: Teardown,
) {
    match t {
        Teardown::Whep(Some(r)) => {
            if let Err(e) = signal::delete_resource(client, &r, token).await {
                tracing::debug!("WHEP DELETE failed: {e:#}");
            }
        }
        Teardown::Whep(None) => {}
        Teardown::Janus { session } => {
            if let Some(j) = janus {
                if let Err(e) = j.destroy(session).await {
                    tracing::debug!("Janus destroy failed: {e:#}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_headers_and_turn_urls() {
        let v = [
            "<turn:127.0.0.1:3478?transport=udp>; rel=\"ice-server\"; username=\"123:whep\"; credential=\"pw=\"; credential-type=\"password\"",
            "<turns:127.0.0.1:5349?transport=tcp>; rel=\"ice-server\"; username=\"u\"; credential=\"c\", <https://x>; rel=\"next\"",
        ];
        let l = parse_ice_links(v);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].1, "123:whep");
        assert_eq!(l[0].2, "pw=");
        assert_eq!(
            turn_udp_addr(&l[0].0),
            Some("127.0.0.1:3478".parse().expect("addr"))
        );
        assert_eq!(turn_udp_addr(&l[1].0), None);
        assert_eq!(turn_udp_addr("turn:127.0.0.1:9?transport=tcp"), None);
        assert_eq!(
            turn_udp_addr("turn:[::1]:3479"),
            Some("[::1]:3479".parse().expect("addr"))
        );
        assert_eq!(
            turn_udp_addr("turn:127.0.0.1"),
            Some("127.0.0.1:3478".parse().expect("addr"))
        );
        assert!(parse_ice_links(["garbage", "<x", "<turn:a>; rel=other"]).is_empty());
    }

    #[test]
    fn finds_udp_candidates_in_an_answer() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n\
                   a=candidate:2 1 tcp 2130706431 127.0.0.1 5001 typ host\r\n\
                   a=candidate:3 1 UDP 1 ::1 5002 typ host\r\na=candidate:bad\r\n";
        assert_eq!(
            sdp_udp_candidates(sdp),
            vec![
                "127.0.0.1:5000".parse::<SocketAddr>().expect("addr"),
                "[::1]:5002".parse().expect("addr")
            ]
        );
    }
}
