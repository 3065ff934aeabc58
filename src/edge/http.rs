//! HTTP signalling of the edge: WHIP ingest, WHEP egress (RFC 9725 conventions),
//! health, metrics and the viewer page.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use edgerelay_sfu::{Joined, PeerId, SfuError};
use tower_http::cors::{Any, CorsLayer};
use tracing::{info, warn};

use super::auth::{static_token_ok, Grant, Verifier};
use super::media::{MediaCmd, MediaHandle};
use super::metrics::Metrics;
use crate::gateway::token::{now_unix, Role};

/// Room names: what may appear in `/whip/{room}`.
const MAX_ROOM_LEN: usize = 64;

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The media thread.
    pub media: MediaHandle,
    /// Accepted publisher tokens.
    pub publisher_tokens: Vec<String>,
    /// Accepted viewer tokens (empty: open).
    pub viewer_tokens: Vec<String>,
    /// Prometheus exporter.
    pub metrics: Metrics,
    /// The built-in TURN server, advertised in `Link` headers.
    pub turn: Option<Arc<super::turn::EdgeTurn>>,
    /// True once SIGTERM arrived: no new sessions.
    pub draining: std::sync::atomic::AtomicBool,
    /// Viewer page directory override.
    pub web_root: Option<std::path::PathBuf>,
    /// Keys verifying the gateway's signed session tokens (`[auth] token_keys`).
    pub token_keys: Vec<String>,
    /// Peers per room, so sessions the gateway terminates can be closed.
    pub sessions: super::register::PeerIndex,
}

/// An error response: status plus a one-line plain-text reason.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", self.1),
        )
            .into_response()
    }
}

impl ApiError {
    fn new(code: StatusCode, msg: impl Into<String>) -> Self {
        ApiError(code, msg.into())
    }
}

impl From<SfuError> for ApiError {
    fn from(e: SfuError) -> Self {
        let code = match &e {
            SfuError::BadSdp(_) => StatusCode::BAD_REQUEST,
            SfuError::RoomNotFound(_) | SfuError::UnknownPeer => StatusCode::NOT_FOUND,
            SfuError::PublisherBusy(_)
            | SfuError::ControllerTaken(_)
            | SfuError::NoPendingOffer => StatusCode::CONFLICT,
            SfuError::RoomFull(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

/// Builds the router.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
        ])
        .expose_headers([
            header::LOCATION,
            header::LINK,
            header::ETAG,
            header::HeaderName::from_static("x-edgerelay-role"),
        ]);
    Router::new()
        .route("/whip/{room}", post(whip_post))
        .route(
            "/whip/{room}/{id}",
            axum::routing::delete(resource_delete).patch(resource_patch),
        )
        .route("/whep/{room}", post(whep_post))
        .route("/1.0/session/{id}/sockets/slave", get(super::ws::slave))
        .route("/1.0/session/{id}/sockets/master", get(super::ws::master))
        .route(
            "/whep/{room}/{id}",
            axum::routing::delete(resource_delete).patch(resource_patch),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/rooms", get(rooms))
        .route("/api/ice-servers", get(ice_servers))
        .route("/", get(index))
        .route("/viewer.js", get(viewer_js))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(cors)
        .with_state(state)
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn check_auth(
    allowed: &[String],
    headers: &HeaderMap,
    open_if_empty: bool,
) -> Result<(), ApiError> {
    if open_if_empty && allowed.is_empty() {
        return Ok(());
    }
    match bearer(headers) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
        )),
        Some(t) if !static_token_ok(allowed, t) => {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"))
        }
        Some(_) => Ok(()),
    }
}

/// Who may use `/whip/{room}` (publisher) or `/whep/{room}` (viewer).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Whip,
    Whep,
}

/// Checks a static token or a gateway token for `room` (401/403 with a one-line reason).
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    room: &str,
    ep: Endpoint,
) -> Result<Grant, ApiError> {
    let (statics, open, roles): (&[String], bool, &[Role]) = match ep {
        Endpoint::Whip => (&state.publisher_tokens, false, &[Role::Publisher]),
        Endpoint::Whep => (
            &state.viewer_tokens,
            true,
            &[Role::Controller, Role::Spectator],
        ),
    };
    let v = Verifier {
        static_tokens: statics,
        open_if_empty: open,
        token_keys: &state.token_keys,
    };
    v.check(bearer(headers), room, roles, now_unix())
        .map_err(|e| {
            metrics::counter!("edgerelay_auth_refused_total", "endpoint" => if ep == Endpoint::Whip { "whip" } else { "whep" }).increment(1);
            ApiError::new(e.status, e.message)
        })
}

/// Room names: 1-64 characters of `[A-Za-z0-9._-]`.
pub(crate) fn check_room(room: &str) -> Result<(), ApiError> {
    let ok = !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid room name: use 1-{MAX_ROOM_LEN} characters of [A-Za-z0-9._-]"),
        ))
    }
}

fn sdp_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    max: usize,
) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/sdp"))
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type must be application/sdp, got '{ct}'"),
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large (limit {max} bytes)"),
            )
        } else {
            ApiError::new(e.status(), format!("cannot read body: {e}"))
        }
    })?;
    String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid SDP: not UTF-8"))
}

fn created(state: &AppState, kind: &str, room: &str, j: Joined) -> Response {
    let location = format!("/{kind}/{room}/{}", j.peer.as_u64());
    let mut resp = (StatusCode::CREATED, j.sdp).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", j.peer.as_u64())) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        "x-edgerelay-role",
        HeaderValue::from_static(j.role.as_str()),
    );
    if let Some(t) = &state.turn {
        for link in t.link_headers(&super::turn::EdgeTurn::session_user(kind)) {
            if let Ok(v) = HeaderValue::from_str(&link) {
                h.append(header::LINK, v);
            }
        }
    }
    resp
}

fn not_draining(state: &AppState) -> Result<(), ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "edge is draining; no new sessions",
        ))
    } else {
        Ok(())
    }
}

async fn whip_post(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    offer_post(&state, room, &headers, body, Endpoint::Whip).await
}

async fn whep_post(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    offer_post(&state, room, &headers, body, Endpoint::Whep).await
}

/// The shared WHIP/WHEP flow: checks, offer to the media thread, 201 or the error.
async fn offer_post(
    state: &Arc<AppState>,
    room: String,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    ep: Endpoint,
) -> Result<Response, ApiError> {
    check_room(&room)?;
    let grant = authorize(state, headers, &room, ep)?;
    not_draining(state)?;
    let offer = sdp_body(headers, body, state.metrics.max_body)?;
    let r = room.clone();
    let res = state
        .media
        .call(|reply| match ep {
            Endpoint::Whip => MediaCmd::Publish {
                room: r,
                offer,
                reply,
            },
            Endpoint::Whep => MediaCmd::View {
                room: r,
                offer,
                role: grant.viewer_role(),
                reply,
            },
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let kind = match ep {
        Endpoint::Whip => "whip",
        Endpoint::Whep => "whep",
    };
    match res {
        Ok(j) => {
            info!(%room, peer = j.peer.as_u64(), role = j.role.as_str(), "{kind} session accepted");
            state.sessions.add(&room, j.peer, None);
            Ok(created(state, kind, &room, j))
        }
        Err(e) => {
            warn!(%room, "{kind} offer refused: {e}");
            state.metrics.signalling_error(kind, &e);
            Err(e.into())
        }
    }
}

fn parse_peer(id: &str) -> Result<PeerId, ApiError> {
    id.parse::<u64>()
        .map(PeerId::from_u64)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "unknown session"))
}

async fn resource_delete(
    State(state): State<Arc<AppState>>,
    Path((room, id)): Path<(String, String)>,
    method_path: axum::extract::OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let is_whip = method_path.path().starts_with("/whip/");
    check_room(&room)?;
    let ep = if is_whip {
        Endpoint::Whip
    } else {
        Endpoint::Whep
    };
    authorize(&state, &headers, &room, ep)?;
    let peer = parse_peer(&id)?;
    let res = state
        .media
        .call(|reply| MediaCmd::Remove { peer, reply })
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    res?;
    state.sessions.remove(&room, peer);
    info!(%room, peer = peer.as_u64(), "session deleted");
    Ok(StatusCode::OK.into_response())
}

async fn resource_patch() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "trickle ICE and ICE restart are not supported: send a complete offer",
    )
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.media.shared.alive.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "media thread down\n").into_response()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.media.shared.alive.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "media thread down\n").into_response();
    }
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(&state.media.shared);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn rooms(State(state): State<Arc<AppState>>) -> Response {
    let rooms = state
        .media
        .shared
        .rooms
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    axum::Json(rooms).into_response()
}

/// ICE servers (the built-in TURN with fresh credentials) for viewers holding a viewer token.
async fn ice_servers(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_auth(&state.viewer_tokens, &headers, true)?;
    let list: Vec<super::turn::IceServer> = state
        .turn
        .iter()
        .map(|t| t.ice_server(&super::turn::EdgeTurn::session_user("viewer")))
        .collect();
    Ok(axum::Json(list).into_response())
}

async fn index(State(state): State<Arc<AppState>>) -> Response {
    static_file(
        &state,
        "index.html",
        include_str!("../../web/index.html"),
        "text/html; charset=utf-8",
    )
    .await
}

async fn viewer_js(State(state): State<Arc<AppState>>) -> Response {
    static_file(
        &state,
        "viewer.js",
        include_str!("../../web/viewer.js"),
        "text/javascript; charset=utf-8",
    )
    .await
}

async fn static_file(
    state: &AppState,
    name: &str,
    builtin: &'static str,
    ct: &'static str,
) -> Response {
    let body = match &state.web_root {
        Some(dir) => match tokio::fs::read_to_string(dir.join(name)).await {
            Ok(s) => s,
            Err(_) => builtin.to_string(),
        },
        None => builtin.to_string(),
    };
    if ct.starts_with("text/html") {
        return Html(body).into_response();
    }
    ([(header::CONTENT_TYPE, ct)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_bounded() {
        assert!(check_room("demo-1_a.b").is_ok());
        assert!(check_room("").is_err());
        assert!(check_room("a/b").is_err());
        assert!(check_room(&"a".repeat(65)).is_err());
    }
}
