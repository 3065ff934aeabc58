//! The thin axum layer over [`Core`]: envelopes, auth, body limits, routes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::config::GatewayConfig;
use super::core::{ApiError, Core, CreateRequest, SessionStatus};
use super::proto::NodeRecord;

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct AppState {
    core: Arc<Mutex<Core>>,
    cfg: Arc<GatewayConfig>,
}

impl AppState {
    /// State over a fresh [`Core`].
    pub fn new(cfg: Arc<GatewayConfig>) -> Self {
        AppState {
            core: Arc::new(Mutex::new(Core::new(cfg.clone()))),
            cfg,
        }
    }

    /// Locks the core (a poisoned lock is recovered: the core has no invariants a panic breaks).
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Current unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A success envelope with `status_code` = `code`.
pub fn sync(code: StatusCode, metadata: Value) -> Response {
    (
        code,
        Json(json!({
            "type": "sync",
            "status": "success",
            "status_code": code.as_u16(),
            "error": "",
            "metadata": metadata,
        })),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code.is_server_error() {
            tracing::warn!(code = self.code, error = %self.message, "api error");
        } else {
            tracing::debug!(code = self.code, error = %self.message, "api error");
        }
        let mut resp = (
            code,
            Json(json!({
                "type": "error",
                "status": "failed",
                "status_code": code.as_u16(),
                "error": self.message,
                "metadata": null,
            })),
        )
            .into_response();
        if code == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Extracts the presented credential: `Authorization: Bearer <t>`,
/// `Authorization: macaroon root=<t>` or `?api_token=<t>`.
fn presented_token(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(rest.to_owned());
        }
        if scheme.eq_ignore_ascii_case("macaroon") {
            return rest
                .split([',', ' '])
                .find_map(|kv| kv.trim().strip_prefix("root="))
                .map(|t| t.trim_matches('"').to_owned());
        }
        return None;
    }
    let q: Query<HashMap<String, String>> = Query::try_from_uri(&parts.uri).ok()?;
    q.0.get("api_token").cloned()
}

/// An authenticated API caller (service account).
pub struct Caller {
    /// Account name.
    pub name: String,
    /// Whether the account sees every session.
    pub admin: bool,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(t) = presented_token(parts) else {
            return Err(ApiError::new(401, "missing API token"));
        };
        // Check every account so the time taken does not reveal which one matched.
        let mut found = None;
        for a in &state.cfg.accounts {
            if ct_eq(a.token.as_bytes(), t.as_bytes()) && found.is_none() {
                found = Some(Caller {
                    name: a.name.clone(),
                    admin: a.admin,
                });
            }
        }
        found.ok_or_else(|| ApiError::new(401, "invalid API token"))
    }
}

/// An authenticated edge node (shared node key as Bearer).
pub struct NodeAuth;

impl FromRequestParts<AppState> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let t = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (s, r) = v.trim().split_once(' ')?;
                s.eq_ignore_ascii_case("bearer")
                    .then(|| r.trim().to_owned())
            })
            .ok_or_else(|| ApiError::new(401, "missing node key"))?;
        let ok = state
            .cfg
            .node_keys
            .iter()
            .fold(false, |acc, k| acc | ct_eq(k.as_bytes(), t.as_bytes()));
        if ok {
            Ok(NodeAuth)
        } else {
            Err(ApiError::new(401, "invalid node key"))
        }
    }
}

/// A JSON request body whose every failure becomes an error envelope:
/// too large -> 413, not JSON -> 400, not an object / wrong shape -> 400.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let code = e.status().as_u16();
            if code == 413 {
                ApiError::new(413, "request body too large")
            } else {
                ApiError::new(code, format!("cannot read request body: {}", e.body_text()))
            }
        })?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(400, format!("malformed JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::new(400, "request body must be a JSON object"));
        }
        serde_json::from_value(v)
            .map(JsonBody)
            .map_err(|e| ApiError::new(400, format!("invalid request: {e}")))
    }
}

async fn create_session(
    caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
    JsonBody(req): JsonBody<CreateRequest>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let core = &mut *st.core();
    core.sweep(now);
    let (s, access, ptoken) = core.create_session(&caller.name, req, now)?;
    let publisher = core.publisher_json(&s, &ptoken);
    let mut meta = session_json(core, &s);
    if let Some(m) = meta.as_object_mut() {
        m.insert("url".into(), json!(access.url));
        m.insert("stun_servers".into(), json!(access.stun_servers));
        m.insert("role".into(), json!(access.role));
        m.insert("token".into(), json!(access.token));
        m.insert("publisher".into(), publisher);
    }
    Ok(sync(StatusCode::CREATED, meta))
}

fn session_json(core: &Core, s: &super::core::Session) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let (Some(m), Some(n)) = (v.as_object_mut(), core.node(&s.node)) {
        m.insert("edge_url".into(), json!(n.http_base()));
    }
    v
}

async fn join_session(
    caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let core = &mut *st.core();
    core.sweep(now);
    let (s, access) = core.join(&caller.name, caller.admin, &id, now)?;
    Ok(sync(
        StatusCode::OK,
        json!({
            "id": s.id,
            "url": access.url,
            "stun_servers": access.stun_servers,
            "role": access.role,
            "token": access.token,
            "region": s.region,
            "status": s.status,
        }),
    ))
}

async fn list_sessions(
    caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(SessionStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                400,
                format!("status: {s:?} is not one of created, active, terminated, error"),
            )
        })?),
    };
    let num = |k: &str, default: usize| -> Result<usize, ApiError> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| {
                ApiError::new(400, format!("{k}: {v:?} is not a non-negative integer"))
            }),
        }
    };
    let limit = num("limit", 100)?.min(1000);
    let offset = num("offset", 0)?;
    let now = now_ms();
    let core = &mut *st.core();
    core.sweep(now);
    let list: Vec<Value> = core
        .list(&caller.name, caller.admin, status, offset, limit)
        .into_iter()
        .map(|s| session_json(core, s))
        .collect();
    Ok(sync(StatusCode::OK, Value::Array(list)))
}

async fn get_session(
    caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let core = &mut *st.core();
    core.sweep(now_ms());
    let s = core.get(&caller.name, caller.admin, &id)?;
    Ok(sync(StatusCode::OK, session_json(core, s)))
}

async fn delete_session(
    caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let core = &mut *st.core();
    let s = core.delete(&caller.name, caller.admin, &id, now_ms())?;
    Ok(sync(StatusCode::OK, session_json(core, &s)))
}

async fn status(
    _caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
) -> Response {
    let now = now_ms();
    let core = &mut *st.core();
    core.sweep(now);
    sync(StatusCode::OK, core.status_json(now))
}

async fn regions(
    _caller: Caller,
    axum::extract::State(st): axum::extract::State<AppState>,
) -> Response {
    let core = &mut *st.core();
    core.sweep(now_ms());
    sync(StatusCode::OK, core.regions_json())
}

async fn register_node(
    _node: NodeAuth,
    axum::extract::State(st): axum::extract::State<AppState>,
    JsonBody(rec): JsonBody<NodeRecord>,
) -> Result<Response, ApiError> {
    let reply = st.core().register(rec, now_ms())?;
    Ok(sync(
        StatusCode::OK,
        serde_json::to_value(reply).unwrap_or(Value::Null),
    ))
}

async fn deregister_node(
    _node: NodeAuth,
    axum::extract::State(st): axum::extract::State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if st.core().deregister(&id, now_ms()) {
        Ok(sync(StatusCode::OK, Value::Null))
    } else {
        Err(ApiError::new(404, format!("node {id:?} not registered")))
    }
}

async fn root() -> Response {
    sync(
        StatusCode::OK,
        json!({"api_version": "1.0", "version": env!("CARGO_PKG_VERSION")}),
    )
}

/// Fallback for unknown routes: 404 envelope.
pub async fn not_found() -> ApiError {
    ApiError::new(404, "not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "method not allowed")
}

/// The gateway's routes (no fallback, so the edge can merge them into its own router).
///
/// Spawns the housekeeping task (node timeouts, idle sessions), so call it inside a runtime.
pub fn routes(cfg: Arc<GatewayConfig>) -> Router {
    let state = AppState::new(cfg.clone());
    spawn_sweeper(state.clone());
    Router::new()
        .route("/1.0", get(root))
        .route("/1.0/sessions", post(create_session).get(list_sessions))
        .route(
            "/1.0/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route("/1.0/sessions/{id}/join", post(join_session))
        .route("/1.0/status", get(status))
        .route("/1.0/regions", get(regions))
        .route("/1.0/nodes/register", post(register_node))
        .route("/1.0/nodes/{id}", delete(deregister_node))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state)
}

/// The full gateway router: [`routes`] plus the 404 envelope for unknown paths.
pub fn router(cfg: Arc<GatewayConfig>) -> Router {
    routes(cfg).fallback(not_found)
}

fn spawn_sweeper(state: AppState) {
    let period = Duration::from_millis((state.cfg.heartbeat_timeout_ms / 8).clamp(50, 1000));
    let weak = Arc::downgrade(&state.core);
    drop(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Stop once every router holding the state is gone.
            let Some(core) = weak.upgrade() else { break };
            core.lock()
                .unwrap_or_else(|p| p.into_inner())
                .sweep(now_ms());
        }
    });
}
