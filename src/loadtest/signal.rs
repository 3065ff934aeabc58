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
use crate::publisher::signal;

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

/// Joins through WHEP: recvonly video offer, answer applied.
pub async fn join_whep(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    local_ip: IpAddr,
    counters: Arc<ViewerCounters>,
) -> anyhow::Result<(NewViewer, Teardown)> {
    let requested = Instant::now();
    let mut rtc = rtc_config().build(Instant::now());
    let (socket, cand) = bind_for(local_ip)?;
    rtc.add_local_candidate(cand);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| anyhow::anyhow!("str0m produced no offer"))?;
    let ex = signal::post_offer(client, url, token, &offer.to_sdp_string()).await?;
    let answer = SdpAnswer::from_sdp_string(&ex.answer)
        .map_err(|e| anyhow::anyhow!("bad SDP answer: {e}"))?;
    if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
        if let Some(r) = &ex.resource {
            let _ = signal::delete_resource(client, r, token).await;
        }
        anyhow::bail!("answer rejected: {e}");
    }
    Ok((
        NewViewer {
            rtc,
            socket,
            requested,
            counters,
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
