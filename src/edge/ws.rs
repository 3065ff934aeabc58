//! WebSocket signalling (docs/PROTOCOL.md section 4): `/1.0/session/{id}/sockets/slave`
//! for viewers (the edge makes the offer) and `/sockets/master` for the instance (it
//! offers, the edge answers). SDP and candidates travel base64-encoded in JSON text frames.
//!
//! Every socket is bounded: 64 KiB per message, a token-bucket message rate, 30 s to
//! finish the handshake, and the token is checked before the upgrade.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use edgerelay_sfu::{PeerId, SfuError};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{AuthError, Grant, Verifier};
use super::http::AppState;
use super::media::MediaCmd;
use crate::gateway::token::{now_unix, Role};

/// Largest accepted text message, bytes (larger: `error` and close).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The transport refuses anything beyond this outright.
const TRANSPORT_LIMIT: usize = 2 * MAX_MESSAGE;
/// Time to complete discover + settings (viewer) or discover + offer (instance).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a viewer waits for the session's instance to appear on this edge.
pub const ROOM_WAIT: Duration = Duration::from_secs(30);
/// Time a viewer has to answer the edge's offer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Message rate: bucket size and refill per second.
const RATE_BURST: f64 = 60.0;
const RATE_PER_SEC: f64 = 20.0;
/// Highest protocol version spoken.
pub const MAX_API_VERSION: u64 = 2;
/// Most data channel labels in `settings`, and longest label.
const MAX_CHANNELS: usize = 16;
const MAX_LABEL: usize = 128;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    /// A viewer (`/sockets/slave`).
    Slave,
    /// The instance (`/sockets/master`).
    Master,
}

/// `GET /1.0/session/{id}/sockets/slave?token=...`: a viewer's socket.
pub async fn slave(
    state: State<Arc<AppState>>,
    path: Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    upgrade(Side::Slave, state, path, query, headers, ws)
}

/// `GET /1.0/session/{id}/sockets/master?token=...`: the instance's socket.
pub async fn master(
    state: State<Arc<AppState>>,
    path: Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    upgrade(Side::Master, state, path, query, headers, ws)
}

fn plain(code: StatusCode, msg: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{msg}\n"),
    )
        .into_response()
}

fn ws_error(reason: &'static str) {
    metrics::counter!("edgerelay_ws_errors_total", "reason" => reason).increment(1);
}

fn upgrade(
    side: Side,
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(e) = super::http::check_room(&session) {
        return e.into_response();
    }
    let Ok(Query(query)) = query else {
        return plain(StatusCode::BAD_REQUEST, "malformed query string");
    };
    // `?token=` (browsers cannot set headers on a WebSocket) or `Authorization: Bearer`.
    let token = query
        .get("token")
        .map(String::as_str)
        .or_else(|| super::http::bearer(&headers));
    let (statics, open, roles): (&[String], bool, &[Role]) = match side {
        Side::Slave => (
            &state.viewer_tokens,
            true,
            &[Role::Controller, Role::Spectator],
        ),
        Side::Master => (&state.publisher_tokens, false, &[Role::Publisher]),
    };
    let verifier = Verifier {
        static_tokens: statics,
        open_if_empty: open,
        token_keys: &state.token_keys,
    };
    let grant = match verifier.check(token, &session, roles, now_unix()) {
        Ok(g) => g,
        Err(AuthError { status, message }) => {
            ws_error("auth");
            warn!(%session, ?side, %status, "websocket refused: {message}");
            return plain(status, &message);
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "edge is draining; no new sessions",
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return plain(
                StatusCode::UPGRADE_REQUIRED,
                &format!("WebSocket upgrade required: {e}"),
            )
        }
    };
    ws.max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| async move {
            let mut conn = Conn::new(socket);
            metrics::counter!("edgerelay_ws_sessions_total", "side" => side.as_str()).increment(1);
            match side {
                Side::Slave => run_viewer(&state, &mut conn, &session, grant).await,
                Side::Master => run_instance(&state, &mut conn, &session).await,
            }
        })
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Slave => "slave",
            Side::Master => "master",
        }
    }
}

/// One received message, or why there is none.
enum Recv {
    /// A JSON object with a string `type`.
    Msg(String, Value),
    /// The peer closed (or the transport failed).
    Closed,
    /// A protocol violation; the reason is sent as `error` before closing.
    Fail(&'static str, String),
}

/// A socket plus its rate limiter.
struct Conn {
    socket: WebSocket,
    tokens: f64,
    last: Instant,
}

impl Conn {
    fn new(socket: WebSocket) -> Self {
        Conn {
            socket,
            tokens: RATE_BURST,
            last: Instant::now(),
        }
    }

    async fn send(&mut self, v: Value) -> bool {
        self.socket
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
            .is_ok()
    }

    /// Sends `{"type":"error"}` and closes the socket.
    async fn fail(&mut self, reason: &'static str, msg: &str) {
        ws_error(reason);
        debug!(reason, "websocket error: {msg}");
        let _ = self.send(json!({"type": "error", "message": msg})).await;
        let _ = self
            .socket
            .send(Message::Close(Some(CloseFrame {
                code: 1008,
                reason: Utf8Bytes::from_static("protocol error"),
            })))
            .await;
        // Wait (briefly) for the peer's Close: dropping the connection right after ours
        // can reset it before the peer answers, which a browser reports as an unclean close.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(m)) = self.socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * RATE_PER_SEC).min(RATE_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The next message, bounded by `deadline` (cancel-safe: nothing is lost if dropped
    /// before a text frame is returned).
    async fn recv(&mut self, deadline: Option<Instant>) -> Recv {
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.socket.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        return Recv::Fail("timeout", "timed out waiting for the client".into())
                    }
                },
                None => self.socket.recv().await,
            };
            let text = match next {
                None | Some(Err(_)) => return Recv::Closed,
                Some(Ok(Message::Close(_))) => {
                    // Complete the closing handshake: the reply close frame is queued
                    // by the WebSocket layer and only leaves on a flush.
                    let flush = futures_util::SinkExt::flush(&mut self.socket);
                    let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                    return Recv::Closed;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Recv::Fail(
                        "binary",
                        "binary frames are not supported: send JSON text".into(),
                    )
                }
                Some(Ok(Message::Text(t))) => t,
            };
            if !self.take_token() {
                return Recv::Fail("rate", "too many messages".into());
            }
            if text.len() > MAX_MESSAGE {
                return Recv::Fail(
                    "too_large",
                    format!("message too large (limit {MAX_MESSAGE} bytes)"),
                );
            }
            let v: Value = match serde_json::from_str(text.as_str()) {
                Ok(v) => v,
                Err(e) => return Recv::Fail("json", format!("malformed JSON: {e}")),
            };
            let Some(kind) = v.get("type").and_then(Value::as_str) else {
                return Recv::Fail(
                    "no_type",
                    "message must be a JSON object with a string \"type\"".into(),
                );
            };
            return Recv::Msg(kind.to_owned(), v);
        }
    }
}

/// Decodes a base64 field into UTF-8 text.
fn b64_field(v: &Value, field: &str) -> Result<String, String> {
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{field}\" must be a base64 string"))?;
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| format!("\"{field}\" is not valid base64"))?;
    String::from_utf8(bytes).map_err(|_| format!("\"{field}\" is not UTF-8 once decoded"))
}

/// Settings a viewer sent.
#[derive(Debug, PartialEq)]
struct Settings {
    audio: bool,
    video: bool,
}

fn parse_settings(v: &Value) -> Result<Settings, String> {
    match v.get("api_version") {
        None | Some(Value::Null) => {}
        Some(x) => match x.as_u64() {
            Some(n) if (1..=MAX_API_VERSION).contains(&n) => {}
            _ => {
                return Err(format!(
                    "\"api_version\" must be an integer from 1 to {MAX_API_VERSION}"
                ))
            }
        },
    }
    match v.get("data_channels") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a))
            if a.len() <= MAX_CHANNELS
                && a.iter()
                    .all(|l| l.as_str().is_some_and(|s| s.len() <= MAX_LABEL)) => {}
        Some(_) => {
            return Err(format!(
                "\"data_channels\" must be an array of at most {MAX_CHANNELS} strings"
            ))
        }
    }
    let flag = |name: &str| match v.get(name) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("\"{name}\" must be a boolean")),
    };
    Ok(Settings {
        video: flag("enable_video")?,
        audio: flag("enable_audio")?,
    })
}

fn sfu_message(e: &SfuError) -> String {
    match e {
        SfuError::BadSdp(m) => format!("invalid SDP: {m}"),
        other => other.to_string(),
    }
}

fn role_name(grant: Grant) -> &'static str {
    match grant {
        Grant::Session(Role::Controller) => "controller",
        Grant::Session(Role::Spectator) => "spectator",
        Grant::Session(Role::Publisher) => "publisher",
        Grant::Static => "viewer",
    }
}

/// Removes the peer from the SFU and the index when the socket ends.
async fn end_peer(state: &AppState, session: &str, peer: PeerId) {
    state.sessions.remove(session, peer);
    let _ = state
        .media
        .call(|reply| MediaCmd::Remove { peer, reply })
        .await;
}

async fn run_viewer(state: &Arc<AppState>, conn: &mut Conn, session: &str, grant: Grant) {
    let handshake = Instant::now() + HANDSHAKE_TIMEOUT;
    // 1. discover
    match conn.recv(Some(handshake)).await {
        Recv::Msg(k, _) if k == "discover" => {}
        Recv::Msg(k, _) => {
            return conn
                .fail(
                    "order",
                    &format!("expected \"discover\" first, got \"{k}\""),
                )
                .await
        }
        Recv::Closed => return,
        Recv::Fail(r, m) => return conn.fail(r, &m).await,
    }
    let resp = json!({
        "type": "resp:discover",
        "max_api_version": MAX_API_VERSION,
        "session": session,
        "role": role_name(grant),
    });
    if !conn.send(resp).await {
        return;
    }
    // 2. settings
    let settings = match conn.recv(Some(handshake)).await {
        Recv::Msg(k, v) if k == "settings" => match parse_settings(&v) {
            Ok(s) => s,
            Err(m) => {
                return conn
                    .fail("settings", &format!("invalid settings: {m}"))
                    .await
            }
        },
        Recv::Msg(k, _) => {
            return conn
                .fail("order", &format!("expected \"settings\", got \"{k}\""))
                .await
        }
        Recv::Closed => return,
        Recv::Fail(r, m) => return conn.fail(r, &m).await,
    };
    debug!(%session, ?settings, "websocket settings");
    // 3. the offer, once the session's instance is on this edge
    let role = grant.viewer_role();
    let room_deadline = Instant::now() + ROOM_WAIT;
    let joined = loop {
        let r = session.to_owned();
        let res = state
            .media
            .call(|reply| MediaCmd::ViewOffer {
                room: r,
                role,
                audio: settings.audio,
                reply,
            })
            .await;
        match res {
            Ok(Ok(j)) => break j,
            Ok(Err(SfuError::RoomNotFound(_))) if Instant::now() < room_deadline => {
                let wait = tokio::time::sleep(Duration::from_millis(250));
                tokio::select! {
                    _ = wait => continue,
                    m = conn.recv(Some(room_deadline)) => match m {
                        Recv::Closed => return,
                        Recv::Msg(k, _) => return conn.fail("order", &format!("\"{k}\" before the offer")).await,
                        Recv::Fail(r, m) => return conn.fail(r, &m).await,
                    },
                }
            }
            Ok(Err(SfuError::RoomNotFound(_))) => {
                return conn
                    .fail(
                        "no_session",
                        "session is not running on this edge (no instance connected)",
                    )
                    .await
            }
            Ok(Err(e)) => {
                state.metrics.signalling_error("ws", &e);
                return conn.fail("sfu", &sfu_message(&e)).await;
            }
            Err(e) => return conn.fail("media", &e.to_string()).await,
        }
    };
    let peer = joined.peer;
    let terminated = Arc::new(Notify::new());
    state.sessions.add(session, peer, Some(terminated.clone()));
    info!(%session, peer = peer.as_u64(), role = joined.role.as_str(), "websocket viewer offered");
    let offer = json!({
        "type": "offer",
        "sdp": STANDARD.encode(joined.sdp.as_bytes()),
        "role": joined.role.as_str(),
    });
    if conn.send(offer).await {
        viewer_loop(state, conn, peer, &terminated).await;
    }
    end_peer(state, session, peer).await;
    info!(%session, peer = peer.as_u64(), "websocket viewer gone");
}

async fn viewer_loop(state: &AppState, conn: &mut Conn, peer: PeerId, terminated: &Notify) {
    let mut answered = false;
    let answer_deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let deadline = (!answered).then_some(answer_deadline);
        let m = tokio::select! {
            _ = terminated.notified() => {
                return conn.fail("terminated", "session terminated").await;
            }
            m = conn.recv(deadline) => m,
        };
        match m {
            Recv::Closed => return,
            Recv::Fail(r, m) => return conn.fail(r, &m).await,
            Recv::Msg(k, v) if k == "answer" && !answered => {
                let sdp = match b64_field(&v, "sdp") {
                    Ok(s) => s,
                    Err(m) => return conn.fail("answer", &format!("invalid answer: {m}")).await,
                };
                match state
                    .media
                    .call(|reply| MediaCmd::Answer { peer, sdp, reply })
                    .await
                {
                    Ok(Ok(())) => answered = true,
                    Ok(Err(e)) => {
                        state.metrics.signalling_error("ws", &e);
                        return conn.fail("answer", &sfu_message(&e)).await;
                    }
                    Err(e) => return conn.fail("media", &e.to_string()).await,
                }
            }
            Recv::Msg(k, v) if k == "candidate" => {
                if let Err(m) = candidate(state, peer, &v).await {
                    return conn.fail("candidate", &m).await;
                }
            }
            Recv::Msg(k, _) if k == "answer" => {
                return conn.fail("order", "\"answer\" already received").await
            }
            Recv::Msg(k, _) if k == "discover" || k == "settings" => {
                return conn.fail("order", &format!("\"{k}\" out of order")).await
            }
            Recv::Msg(k, _) => {
                return conn
                    .fail("unknown", &format!("unknown message type \"{k}\""))
                    .await
            }
        }
    }
}

/// Applies a trickled candidate; an empty one (end of candidates) is accepted and ignored.
async fn candidate(state: &AppState, peer: PeerId, v: &Value) -> Result<(), String> {
    let raw = v
        .get("candidate")
        .and_then(Value::as_str)
        .ok_or("\"candidate\" must be a base64 string")?;
    if raw.trim().is_empty() {
        return Ok(());
    }
    let line = b64_field(v, "candidate")?;
    if line.trim().is_empty() {
        return Ok(());
    }
    match state
        .media
        .call(|reply| MediaCmd::Candidate {
            peer,
            candidate: line,
            reply,
        })
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(sfu_message(&e)),
        Err(e) => Err(e.to_string()),
    }
}

async fn run_instance(state: &Arc<AppState>, conn: &mut Conn, session: &str) {
    let handshake = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut discovered = false;
    let offer = loop {
        match conn.recv(Some(handshake)).await {
            Recv::Msg(k, _) if k == "discover" && !discovered => {
                discovered = true;
                let resp = json!({
                    "type": "resp:discover",
                    "max_api_version": MAX_API_VERSION,
                    "session": session,
                    "role": "publisher",
                });
                if !conn.send(resp).await {
                    return;
                }
            }
            Recv::Msg(k, v) if k == "settings" && discovered => {
                if let Err(m) = parse_settings(&v) {
                    return conn
                        .fail("settings", &format!("invalid settings: {m}"))
                        .await;
                }
            }
            Recv::Msg(k, v) if k == "offer" && discovered => match b64_field(&v, "sdp") {
                Ok(s) => break s,
                Err(m) => return conn.fail("offer", &format!("invalid offer: {m}")).await,
            },
            Recv::Msg(k, _) if !discovered => {
                return conn
                    .fail(
                        "order",
                        &format!("expected \"discover\" first, got \"{k}\""),
                    )
                    .await
            }
            Recv::Msg(k, _) => {
                return conn
                    .fail("order", &format!("expected \"offer\", got \"{k}\""))
                    .await
            }
            Recv::Closed => return,
            Recv::Fail(r, m) => return conn.fail(r, &m).await,
        }
    };
    let r = session.to_owned();
    let joined = match state
        .media
        .call(|reply| MediaCmd::Publish {
            room: r,
            offer,
            reply,
        })
        .await
    {
        Ok(Ok(j)) => j,
        Ok(Err(e)) => {
            state.metrics.signalling_error("ws", &e);
            return conn.fail("sfu", &sfu_message(&e)).await;
        }
        Err(e) => return conn.fail("media", &e.to_string()).await,
    };
    let peer = joined.peer;
    let terminated = Arc::new(Notify::new());
    state.sessions.add(session, peer, Some(terminated.clone()));
    info!(%session, peer = peer.as_u64(), "websocket instance publishing");
    let answer = json!({"type": "answer", "sdp": STANDARD.encode(joined.sdp.as_bytes())});
    if conn.send(answer).await {
        loop {
            let m = tokio::select! {
                _ = terminated.notified() => {
                    conn.fail("terminated", "session terminated").await;
                    break;
                }
                m = conn.recv(None) => m,
            };
            match m {
                Recv::Closed => break,
                Recv::Fail(r, m) => {
                    conn.fail(r, &m).await;
                    break;
                }
                Recv::Msg(k, v) if k == "candidate" => {
                    if let Err(m) = candidate(state, peer, &v).await {
                        conn.fail("candidate", &m).await;
                        break;
                    }
                }
                Recv::Msg(k, _) => {
                    conn.fail("order", &format!("unexpected \"{k}\" after the answer"))
                        .await;
                    break;
                }
            }
        }
    }
    end_peer(state, session, peer).await;
    info!(%session, peer = peer.as_u64(), "websocket instance gone");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated() {
        let ok = parse_settings(
            &json!({"type":"settings","api_version":2,"data_channels":["control"],"enable_video":true,"enable_audio":false}),
        );
        assert_eq!(
            ok,
            Ok(Settings {
                audio: false,
                video: true
            })
        );
        assert_eq!(
            parse_settings(&json!({"type":"settings"})),
            Ok(Settings {
                audio: true,
                video: true
            })
        );
        for bad in [
            json!({"api_version": 3}),
            json!({"api_version": "2"}),
            json!({"api_version": 0}),
            json!({"data_channels": "control"}),
            json!({"data_channels": [1]}),
            json!({"data_channels": vec!["x"; 17]}),
            json!({"enable_audio": "yes"}),
        ] {
            assert!(parse_settings(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_fields() {
        let v = json!({"sdp": STANDARD.encode("v=0\r\n")});
        assert_eq!(b64_field(&v, "sdp"), Ok("v=0\r\n".into()));
        assert!(b64_field(&json!({"sdp": "%%%"}), "sdp").is_err());
        assert!(b64_field(&json!({"sdp": 3}), "sdp").is_err());
        assert!(b64_field(&json!({}), "sdp").is_err());
        let not_utf8 = STANDARD.encode([0xff, 0xfe]);
        assert!(b64_field(&json!({"sdp": not_utf8}), "sdp").is_err());
    }
}
