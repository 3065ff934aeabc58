//! The gateway's state machine, without HTTP: node registry, routing, session store.
//!
//! Every method takes the current time (`now_ms`, unix milliseconds) so tests are deterministic.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha1::Sha1;

use super::config::{valid_name, GatewayConfig};
use super::proto::{NodeRecord, RegisterReply};
use super::token::{self, Claims, Role};

/// An API-level error: HTTP status code and message (rendered as the error envelope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
}

/// Lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Created, the instance has not connected to the edge yet.
    Created,
    /// The instance (publisher) is connected to the edge.
    Active,
    /// Ended: DELETE, idle timeout or the instance went away.
    Terminated,
    /// The session's edge was lost.
    Error,
}

impl SessionStatus {
    /// Parses the lowercase wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(Self::Created),
            "active" => Some(Self::Active),
            "terminated" => Some(Self::Terminated),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
    /// True for `created` and `active`.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Created | Self::Active)
    }
}

/// Screen settings a client may ask for (passed through to the instance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screen {
    /// Width in pixels.
    #[serde(default)]
    pub width: u32,
    /// Height in pixels.
    #[serde(default)]
    pub height: u32,
    /// Frames per second.
    #[serde(default)]
    pub fps: u32,
    /// Density (dpi).
    #[serde(default)]
    pub density: u32,
}

/// A client location for routing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

/// Body of `POST /1.0/sessions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateRequest {
    /// Application name (required).
    #[serde(default)]
    pub app: String,
    /// Preferred region.
    #[serde(default)]
    pub region: Option<String>,
    /// Client location for nearest-edge routing.
    #[serde(default)]
    pub location: Option<Location>,
    /// Screen settings.
    #[serde(default)]
    pub screen: Option<Screen>,
    /// Whether further viewers may join (default true).
    #[serde(default)]
    pub joinable: Option<bool>,
    /// Idle timeout in minutes (0/absent: the gateway default).
    #[serde(default)]
    pub idle_time_min: Option<u32>,
    /// Opaque data passed to the instance.
    #[serde(default)]
    pub extra_data: Option<String>,
    /// Ephemeral sessions are removed as soon as they are terminated.
    #[serde(default)]
    pub ephemeral: Option<bool>,
}

/// A registered edge.
#[derive(Debug, Clone)]
pub struct Node {
    /// The last record the edge sent.
    pub record: NodeRecord,
    /// When the last heartbeat arrived (unix ms).
    pub last_seen_ms: u64,
    /// When the node (re)appeared (unix ms).
    pub registered_ms: u64,
    /// Viewers routed here since the last heartbeat (not yet in the reported load).
    pub reserved: u32,
}

impl Node {
    fn viewers(&self) -> u64 {
        u64::from(self.record.load.viewers) + u64::from(self.reserved)
    }
    /// True when the node cannot take one more viewer.
    pub fn is_full(&self) -> bool {
        let cap = self.record.capacity;
        self.viewers() >= u64::from(cap.max_viewers)
            || (cap.max_egress_kbps > 0 && self.record.load.egress_kbps >= cap.max_egress_kbps)
    }
    /// Load ratio used to break ties: the larger of viewers and egress over capacity.
    pub fn load_ratio(&self) -> f64 {
        let cap = self.record.capacity;
        let v = if cap.max_viewers == 0 {
            1.0
        } else {
            self.viewers() as f64 / f64::from(cap.max_viewers)
        };
        let e = if cap.max_egress_kbps == 0 {
            0.0
        } else {
            self.record.load.egress_kbps as f64 / cap.max_egress_kbps as f64
        };
        v.max(e)
    }
    /// WebSocket base URL of the edge.
    pub fn ws_base(&self) -> String {
        match &self.record.ws_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let h = self.record.http_url.trim_end_matches('/');
                if let Some(rest) = h.strip_prefix("https://") {
                    format!("wss://{rest}")
                } else if let Some(rest) = h.strip_prefix("http://") {
                    format!("ws://{rest}")
                } else {
                    h.to_owned()
                }
            }
        }
    }
    /// HTTP base URL of the edge.
    pub fn http_base(&self) -> &str {
        self.record.http_url.trim_end_matches('/')
    }
}

/// A session.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    /// Session id (20 lowercase hex characters); also the room name on the edge.
    pub id: String,
    /// Application name.
    pub app: String,
    /// Owning service account.
    pub owner: String,
    /// Region of the chosen edge.
    pub region: String,
    /// Id of the chosen edge.
    pub node: String,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// Why the session is in its state (empty for created/active).
    pub status_message: String,
    /// Whether further viewers may join.
    pub joinable: bool,
    /// Removed once terminated.
    pub ephemeral: bool,
    /// Screen settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screen: Option<Screen>,
    /// Opaque data for the instance.
    pub extra_data: String,
    /// Idle timeout, minutes (0: gateway default).
    pub idle_time_min: u32,
    /// True while the instance is connected (as last reported by the edge).
    pub publisher_connected: bool,
    /// Viewers connected (as last reported by the edge).
    pub viewers: u32,
    /// Creation time, unix seconds.
    pub created_at: u64,
    /// Last state change, unix seconds.
    pub updated_at: u64,
    #[serde(skip)]
    last_activity_ms: u64,
    /// Since when an active session's instance has been missing.
    #[serde(skip)]
    instance_lost_ms: Option<u64>,
}

/// ICE server entry handed to clients (`stun_servers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    /// STUN/TURN URLs.
    pub urls: Vec<String>,
    /// TURN REST username (`<expiry>:<user>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN REST password (`base64(HMAC-SHA1(secret, username))`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// Computes TURN REST credentials (coturn `use-auth-secret` / Anbox scheme).
///
/// Returns `(username, password)` with username `"<expiry unix secs>:<user>"` and password
/// `base64(HMAC-SHA1(secret, username))`.
pub fn turn_rest_credentials(secret: &[u8], user: &str, expiry_unix: u64) -> (String, String) {
    let username = format!("{expiry_unix}:{user}");
    #[allow(clippy::expect_used)]
    let mut m = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(username.as_bytes());
    let password = STANDARD.encode(m.finalize().into_bytes());
    (username, password)
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: Location, b: Location) -> f64 {
    const R: f64 = 6371.0;
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dla = la2 - la1;
    let dlo = (b.lon - a.lon).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

/// Distances closer than this are considered equal when routing (load decides).
pub const DISTANCE_TIE_KM: f64 = 25.0;

/// What a client needs to connect to its session on the edge.
#[derive(Debug, Clone, Serialize)]
pub struct ClientAccess {
    /// WebSocket URL with the client's token.
    pub url: String,
    /// ICE servers with fresh credentials.
    pub stun_servers: Vec<IceServer>,
    /// The token itself (also in `url`).
    pub token: String,
    /// The token's role.
    pub role: Role,
}

/// The gateway state.
#[derive(Debug)]
pub struct Core {
    cfg: Arc<GatewayConfig>,
    nodes: BTreeMap<String, Node>,
    sessions: BTreeMap<String, Session>,
    /// Insertion counter so listing is in creation order.
    order: BTreeMap<(u64, u64), String>,
    seq: u64,
}

fn check_loc(what: &str, l: Location) -> Result<(), ApiError> {
    if !l.lat.is_finite() || !(-90.0..=90.0).contains(&l.lat) {
        return Err(ApiError::bad(format!("{what}.lat must be within -90..90")));
    }
    if !l.lon.is_finite() || !(-180.0..=180.0).contains(&l.lon) {
        return Err(ApiError::bad(format!(
            "{what}.lon must be within -180..180"
        )));
    }
    Ok(())
}

fn check_url(what: &str, u: &str, schemes: &[&str]) -> Result<(), ApiError> {
    if u.len() > 512
        || !schemes.iter().any(|s| u.starts_with(s))
        || u.chars().any(char::is_whitespace)
    {
        return Err(ApiError::bad(format!(
            "{what}: {u:?} must be a URL starting with one of {schemes:?}, at most 512 characters"
        )));
    }
    Ok(())
}

/// Validates a node record from a registration.
pub fn validate_record(r: &NodeRecord) -> Result<(), ApiError> {
    if !valid_name(&r.id) {
        return Err(ApiError::bad(
            "id must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    if !valid_name(&r.region) {
        return Err(ApiError::bad(
            "region must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    check_loc(
        "node",
        Location {
            lat: r.lat,
            lon: r.lon,
        },
    )?;
    check_url("http_url", &r.http_url, &["http://", "https://"])?;
    if let Some(ws) = &r.ws_url {
        check_url("ws_url", ws, &["ws://", "wss://"])?;
    }
    if r.ice_urls.len() > 16 {
        return Err(ApiError::bad("ice_urls: at most 16 entries"));
    }
    for u in &r.ice_urls {
        check_url("ice_urls", u, &["stun:", "turn:", "turns:"])?;
    }
    if r.sessions.len() > 100_000 {
        return Err(ApiError::bad("sessions: at most 100000 entries"));
    }
    if !r.load.cpu.is_finite() {
        return Err(ApiError::bad("load.cpu must be a finite number"));
    }
    Ok(())
}

fn new_session_id() -> String {
    let b: [u8; 10] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Core {
    /// An empty gateway state.
    pub fn new(cfg: Arc<GatewayConfig>) -> Self {
        Core {
            cfg,
            nodes: BTreeMap::new(),
            sessions: BTreeMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }

    /// Registered nodes by id.
    #[allow(dead_code)]
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// A session by id (any owner).
    #[allow(dead_code)]
    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    fn set_status(s: &mut Session, st: SessionStatus, msg: &str, now_ms: u64) {
        if s.status != st {
            tracing::info!(session = %s.id, from = ?s.status, to = ?st, reason = msg, "session state");
            s.status = st;
            s.status_message = msg.to_owned();
            s.updated_at = now_ms / 1000;
        }
    }

    /// True once the instance has been missing for longer than `grace_ms`
    /// (starting the clock the first time it is seen missing).
    fn instance_gone_for(s: &mut Session, now_ms: u64, grace_ms: u64) -> bool {
        let since = *s.instance_lost_ms.get_or_insert(now_ms);
        now_ms.saturating_sub(since) >= grace_ms
    }

    /// Handles a registration/heartbeat: stores the record and updates the sessions it reports.
    pub fn register(&mut self, rec: NodeRecord, now_ms: u64) -> Result<RegisterReply, ApiError> {
        validate_record(&rec)?;
        let grace_ms = self.cfg.instance_grace_secs.saturating_mul(1000);
        let mut terminate = Vec::new();
        let reported: std::collections::HashMap<&str, &super::proto::SessionReport> =
            rec.sessions.iter().map(|s| (s.id.as_str(), s)).collect();
        for (id, rep) in &reported {
            match self.sessions.get_mut(*id) {
                Some(s) if s.node == rec.id => {
                    if !s.status.is_live() {
                        terminate.push((*id).to_owned());
                        continue;
                    }
                    s.publisher_connected = rep.publisher;
                    s.viewers = rep.viewers;
                    if rep.viewers > 0 {
                        s.last_activity_ms = now_ms;
                    }
                    if rep.publisher {
                        s.instance_lost_ms = None;
                    }
                    if rep.publisher && s.status == SessionStatus::Created {
                        Self::set_status(s, SessionStatus::Active, "", now_ms);
                        s.last_activity_ms = now_ms;
                    } else if !rep.publisher
                        && s.status == SessionStatus::Active
                        && Self::instance_gone_for(s, now_ms, grace_ms)
                    {
                        Self::set_status(s, SessionStatus::Terminated, "instance gone", now_ms);
                        terminate.push((*id).to_owned());
                    }
                }
                // Rooms the gateway does not know (plain WHIP/WHEP rooms) are ignored.
                _ => {}
            }
        }
        // Active sessions of this node that the edge no longer reports: the instance is gone.
        for s in self.sessions.values_mut() {
            if s.node == rec.id
                && s.status == SessionStatus::Active
                && !reported.contains_key(s.id.as_str())
                && Self::instance_gone_for(s, now_ms, grace_ms)
            {
                Self::set_status(s, SessionStatus::Terminated, "instance gone", now_ms);
                s.publisher_connected = false;
                s.viewers = 0;
            }
        }
        match self.nodes.get_mut(&rec.id) {
            Some(n) => {
                n.record = rec;
                n.last_seen_ms = now_ms;
                n.reserved = 0;
            }
            None => {
                tracing::info!(node = %rec.id, region = %rec.region, url = %rec.http_url, "node registered");
                self.nodes.insert(
                    rec.id.clone(),
                    Node {
                        record: rec,
                        last_seen_ms: now_ms,
                        registered_ms: now_ms,
                        reserved: 0,
                    },
                );
            }
        }
        self.remove_ended_ephemeral();
        Ok(RegisterReply {
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.cfg.heartbeat_timeout_ms,
            terminate_sessions: terminate,
        })
    }

    /// Removes a node at its request (clean shutdown); its live sessions go to `error`.
    pub fn deregister(&mut self, id: &str, now_ms: u64) -> bool {
        if self.nodes.remove(id).is_none() {
            return false;
        }
        tracing::info!(node = %id, "node deregistered");
        self.fail_node_sessions(id, "edge node shut down", now_ms);
        true
    }

    fn fail_node_sessions(&mut self, node: &str, msg: &str, now_ms: u64) {
        for s in self.sessions.values_mut() {
            if s.node == node && s.status.is_live() {
                Self::set_status(s, SessionStatus::Error, msg, now_ms);
                s.publisher_connected = false;
                s.viewers = 0;
            }
        }
    }

    fn remove_ended_ephemeral(&mut self) {
        let gone: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.ephemeral && s.status == SessionStatus::Terminated)
            .map(|s| s.id.clone())
            .collect();
        for id in gone {
            self.sessions.remove(&id);
        }
        if self.order.len() != self.sessions.len() {
            let sessions = &self.sessions;
            self.order.retain(|_, id| sessions.contains_key(id));
        }
    }

    /// Periodic housekeeping: drops silent nodes, times out idle sessions, forgets old ones.
    pub fn sweep(&mut self, now_ms: u64) {
        let timeout = self.cfg.heartbeat_timeout_ms;
        let lost: Vec<String> = self
            .nodes
            .values()
            .filter(|n| now_ms.saturating_sub(n.last_seen_ms) > timeout)
            .map(|n| n.record.id.clone())
            .collect();
        for id in lost {
            tracing::warn!(node = %id, "node lost: no heartbeat");
            self.nodes.remove(&id);
            self.fail_node_sessions(&id, "edge node lost", now_ms);
        }
        let default_idle_ms = self.cfg.session_idle_timeout_secs.saturating_mul(1000);
        for s in self.sessions.values_mut() {
            if !s.status.is_live() || s.viewers > 0 {
                continue;
            }
            let idle_ms = if s.idle_time_min > 0 {
                u64::from(s.idle_time_min) * 60_000
            } else {
                default_idle_ms
            };
            if now_ms.saturating_sub(s.last_activity_ms) > idle_ms {
                Self::set_status(s, SessionStatus::Terminated, "idle timeout", now_ms);
            }
        }
        let keep_s = self.cfg.session_retention_secs;
        let now_s = now_ms / 1000;
        let old: Vec<String> = self
            .sessions
            .values()
            .filter(|s| !s.status.is_live() && now_s.saturating_sub(s.updated_at) > keep_s)
            .map(|s| s.id.clone())
            .collect();
        for id in old {
            self.sessions.remove(&id);
        }
        self.remove_ended_ephemeral();
    }

    /// Chooses an edge: requested region first (least loaded), else the nearest to `location`
    /// (or the region's coordinates), ties broken by load; full or draining edges are skipped.
    pub fn pick_node(
        &self,
        region: Option<&str>,
        location: Option<Location>,
    ) -> Result<&Node, ApiError> {
        if self.nodes.is_empty() {
            return Err(ApiError::new(
                503,
                "no edge available: no edge is registered",
            ));
        }
        let usable: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| !n.record.draining && !n.is_full())
            .collect();
        let mut reference = location;
        if let Some(r) = region {
            let known =
                self.cfg.region(r).is_some() || self.nodes.values().any(|n| n.record.region == r);
            if !known {
                return Err(ApiError::bad(format!("unknown region {r:?}")));
            }
            let in_region: Vec<&Node> = usable
                .iter()
                .copied()
                .filter(|n| n.record.region == r)
                .collect();
            if let Some(best) = best_of(&in_region, location) {
                return Ok(best);
            }
            if reference.is_none() {
                reference = self.cfg.region(r).map(|c| Location {
                    lat: c.lat,
                    lon: c.lon,
                });
            }
        }
        best_of(&usable, reference).ok_or_else(|| {
            ApiError::new(
                503,
                format!(
                    "no edge available: all {} registered edges are full or draining",
                    self.nodes.len()
                ),
            )
        })
    }

    fn live_sessions(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.status.is_live())
            .count()
    }

    /// Creates a session on the best edge and returns it with the controller's access and the
    /// publisher's token.
    pub fn create_session(
        &mut self,
        owner: &str,
        req: CreateRequest,
        now_ms: u64,
    ) -> Result<(Session, ClientAccess, String), ApiError> {
        let app = req.app.trim();
        if app.is_empty() {
            return Err(ApiError::bad("app: required"));
        }
        if app.len() > 128 {
            return Err(ApiError::bad("app: at most 128 characters"));
        }
        if let Some(r) = &req.region {
            if !valid_name(r) {
                return Err(ApiError::bad(
                    "region: must be 1-64 characters of [A-Za-z0-9._-]",
                ));
            }
        }
        if let Some(l) = req.location {
            check_loc("location", l)?;
        }
        if let Some(sc) = req.screen {
            if sc.width > 8192 || sc.height > 8192 || sc.fps > 240 || sc.density > 1000 {
                return Err(ApiError::bad(
                    "screen: width/height at most 8192, fps at most 240, density at most 1000",
                ));
            }
        }
        let extra = req.extra_data.unwrap_or_default();
        if extra.len() > 8192 {
            return Err(ApiError::bad("extra_data: at most 8192 bytes"));
        }
        let idle = req.idle_time_min.unwrap_or(0);
        if idle > 7 * 24 * 60 {
            return Err(ApiError::bad("idle_time_min: at most 10080"));
        }
        if self.live_sessions() >= self.cfg.max_sessions {
            return Err(ApiError::new(503, "session limit reached"));
        }
        let node_id = self
            .pick_node(req.region.as_deref(), req.location)?
            .record
            .id
            .clone();
        let mut id = new_session_id();
        while self.sessions.contains_key(&id) {
            id = new_session_id();
        }
        let node = self
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| ApiError::new(500, "internal error: chosen node vanished"))?;
        node.reserved = node.reserved.saturating_add(1);
        let session = Session {
            id: id.clone(),
            app: app.to_owned(),
            owner: owner.to_owned(),
            region: node.record.region.clone(),
            node: node_id,
            status: SessionStatus::Created,
            status_message: String::new(),
            joinable: req.joinable.unwrap_or(true),
            ephemeral: req.ephemeral.unwrap_or(false),
            screen: req.screen,
            extra_data: extra,
            idle_time_min: idle,
            publisher_connected: false,
            viewers: 0,
            created_at: now_ms / 1000,
            updated_at: now_ms / 1000,
            last_activity_ms: now_ms,
            instance_lost_ms: None,
        };
        tracing::info!(session = %id, node = %session.node, region = %session.region, owner, "session created");
        let node = node.clone();
        let access = self.access(&session, &node, Role::Controller, now_ms);
        let publisher = self.sign(&session.id, Role::Publisher, now_ms);
        self.seq += 1;
        self.order.insert((now_ms, self.seq), id.clone());
        self.sessions.insert(id, session.clone());
        Ok((session, access, publisher))
    }

    /// Looks up a session visible to `owner` (admins see all).
    pub fn get(&self, owner: &str, admin: bool, id: &str) -> Result<&Session, ApiError> {
        match self.sessions.get(id) {
            Some(s) if admin || s.owner == owner => Ok(s),
            _ => Err(ApiError::new(404, format!("session {id:?} not found"))),
        }
    }

    /// Access for a further viewer (spectator) of a session, on the session's edge.
    pub fn join(
        &mut self,
        owner: &str,
        admin: bool,
        id: &str,
        now_ms: u64,
    ) -> Result<(Session, ClientAccess), ApiError> {
        let s = self.get(owner, admin, id)?.clone();
        if !s.status.is_live() {
            return Err(ApiError::new(
                409,
                format!("session is not running (status {:?})", s.status).to_lowercase(),
            ));
        }
        if !s.joinable {
            return Err(ApiError::new(403, "session is not joinable"));
        }
        let node = self
            .nodes
            .get_mut(&s.node)
            .ok_or_else(|| ApiError::new(409, "session's edge is not available"))?;
        let cap = node.record.capacity.max_viewers;
        if node.is_full() {
            return Err(ApiError::new(
                503,
                format!("no edge available: the session's edge is full ({cap} viewers)"),
            ));
        }
        node.reserved = node.reserved.saturating_add(1);
        let node = node.clone();
        if let Some(sm) = self.sessions.get_mut(id) {
            sm.last_activity_ms = now_ms;
        }
        let access = self.access(&s, &node, Role::Spectator, now_ms);
        Ok((s, access))
    }

    /// Terminates a session (DELETE).
    pub fn delete(
        &mut self,
        owner: &str,
        admin: bool,
        id: &str,
        now_ms: u64,
    ) -> Result<Session, ApiError> {
        self.get(owner, admin, id)?;
        let s = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| ApiError::new(404, format!("session {id:?} not found")))?;
        if s.status.is_live() {
            Self::set_status(s, SessionStatus::Terminated, "deleted", now_ms);
        }
        let out = s.clone();
        self.remove_ended_ephemeral();
        Ok(out)
    }

    /// Sessions visible to `owner`, in creation order, filtered by status, paginated.
    pub fn list(
        &self,
        owner: &str,
        admin: bool,
        status: Option<SessionStatus>,
        offset: usize,
        limit: usize,
    ) -> Vec<&Session> {
        self.order
            .values()
            .filter_map(|id| self.sessions.get(id))
            .filter(|s| admin || s.owner == owner)
            .filter(|s| status.is_none_or(|st| s.status == st))
            .skip(offset)
            .take(limit)
            .collect()
    }

    /// `GET /1.0/status` metadata.
    pub fn status_json(&self, now_ms: u64) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .values()
            .map(|n| {
                let r = &n.record;
                json!({
                    "id": r.id,
                    "region": r.region,
                    "lat": r.lat,
                    "lon": r.lon,
                    "http_url": n.http_base(),
                    "ws_url": n.ws_base(),
                    "ice_urls": r.ice_urls,
                    "capacity": r.capacity,
                    "load": r.load,
                    "load_ratio": n.load_ratio(),
                    "full": n.is_full(),
                    "draining": r.draining,
                    "version": r.version,
                    "sessions": self.sessions.values().filter(|s| s.node == r.id && s.status.is_live()).count(),
                    "last_seen_ms_ago": now_ms.saturating_sub(n.last_seen_ms),
                    "registered_at": n.registered_ms / 1000,
                })
            })
            .collect();
        let count = |st| self.sessions.values().filter(|s| s.status == st).count();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "nodes": nodes,
            "sessions": {
                "created": count(SessionStatus::Created),
                "active": count(SessionStatus::Active),
                "terminated": count(SessionStatus::Terminated),
                "error": count(SessionStatus::Error),
            },
        })
    }

    /// `GET /1.0/regions` metadata: configured regions plus regions edges registered in.
    pub fn regions_json(&self) -> Value {
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        let avail = |name: &str| {
            let nodes: Vec<&Node> = self
                .nodes
                .values()
                .filter(|n| n.record.region == name)
                .collect();
            let usable = nodes.iter().any(|n| !n.record.draining && !n.is_full());
            (nodes.len(), usable)
        };
        for r in &self.cfg.regions {
            let (n, ok) = avail(&r.name);
            out.insert(
                r.name.clone(),
                json!({"name": r.name, "lat": r.lat, "lon": r.lon, "nodes": n, "available": ok}),
            );
        }
        for n in self.nodes.values() {
            let name = &n.record.region;
            if !out.contains_key(name) {
                let (c, ok) = avail(name);
                out.insert(
                    name.clone(),
                    json!({"name": name, "lat": null, "lon": null, "nodes": c, "available": ok}),
                );
            }
        }
        Value::Array(out.into_values().collect())
    }

    fn sign(&self, session: &str, role: Role, now_ms: u64) -> String {
        let key = self
            .cfg
            .token_keys
            .first()
            .map(|k| k.as_bytes())
            .unwrap_or_default();
        token::sign(
            key,
            &Claims::new(session, role, now_ms / 1000, self.cfg.token_ttl_secs),
        )
    }

    /// ICE servers of `node` with fresh TURN REST credentials for `user`.
    pub fn ice_servers(&self, node: &Node, user: &str, now_ms: u64) -> Vec<IceServer> {
        let urls = node.record.ice_urls.clone();
        if urls.is_empty() {
            return Vec::new();
        }
        match self.cfg.turn_secrets.first() {
            Some(secret) => {
                let expiry = now_ms / 1000 + self.cfg.turn_ttl_secs;
                let (u, p) = turn_rest_credentials(secret.as_bytes(), user, expiry);
                vec![IceServer {
                    urls,
                    username: Some(u),
                    password: Some(p),
                }]
            }
            None => vec![IceServer {
                urls,
                username: None,
                password: None,
            }],
        }
    }

    fn access(&self, s: &Session, node: &Node, role: Role, now_ms: u64) -> ClientAccess {
        let token = self.sign(&s.id, role, now_ms);
        ClientAccess {
            url: format!(
                "{}/1.0/session/{}/sockets/slave?token={}",
                node.ws_base(),
                s.id,
                token
            ),
            stun_servers: self.ice_servers(node, &s.id, now_ms),
            token,
            role,
        }
    }

    /// The publisher's endpoints for session `s` with `token`.
    pub fn publisher_json(&self, s: &Session, token: &str) -> Value {
        let Some(node) = self.nodes.get(&s.node) else {
            return Value::Null;
        };
        json!({
            "token": token,
            "whip_url": format!("{}/whip/{}", node.http_base(), s.id),
            "master_url": format!("{}/1.0/session/{}/sockets/master?token={}", node.ws_base(), s.id, token),
        })
    }

    /// The URL of node `id`, if registered.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }
}

fn best_of<'a>(nodes: &[&'a Node], reference: Option<Location>) -> Option<&'a Node> {
    let key = |n: &Node| {
        let bucket = match reference {
            Some(r) => {
                let d = distance_km(
                    r,
                    Location {
                        lat: n.record.lat,
                        lon: n.record.lon,
                    },
                );
                (d / DISTANCE_TIE_KM).floor() as u64
            }
            None => 0,
        };
        (bucket, n.load_ratio())
    };
    nodes.iter().copied().min_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(a.record.id.cmp(&b.record.id))
    })
}

#[cfg(test)]
mod tests {
    use super::super::config::Region;
    use super::super::proto::{Capacity, Load, SessionReport};
    use super::*;

    const KEY: &str = "token-key-0123456789";

    fn cfg() -> Arc<GatewayConfig> {
        Arc::new(GatewayConfig {
            token_keys: vec![KEY.into()],
            turn_secrets: vec!["turn-secret-0123456789".into()],
            regions: vec![
                Region {
                    name: "eu-west".into(),
                    lat: 48.85,
                    lon: 2.35,
                },
                Region {
                    name: "us-east".into(),
                    lat: 40.71,
                    lon: -74.0,
                },
                Region {
                    name: "ap-south".into(),
                    lat: 1.35,
                    lon: 103.8,
                },
            ],
            ..GatewayConfig::default()
        })
    }

    fn rec(id: &str, region: &str, lat: f64, lon: f64, viewers: u32, max: u32) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            region: region.into(),
            lat,
            lon,
            http_url: format!("http://{id}.test:8080"),
            ws_url: None,
            ice_urls: vec![format!("turn:{id}.test:3478?transport=udp")],
            capacity: Capacity {
                max_viewers: max,
                max_egress_kbps: 0,
            },
            load: Load {
                viewers,
                ..Load::default()
            },
            sessions: vec![],
            draining: false,
            version: "t".into(),
        }
    }

    fn three(core: &mut Core, now: u64) {
        core.register(rec("paris", "eu-west", 48.85, 2.35, 0, 100), now)
            .expect("ok");
        core.register(rec("nyc", "us-east", 40.71, -74.0, 0, 100), now)
            .expect("ok");
        core.register(rec("sing", "ap-south", 1.35, 103.8, 0, 100), now)
            .expect("ok");
    }

    fn create(core: &mut Core, body: CreateRequest, now: u64) -> Result<Session, ApiError> {
        core.create_session("ops", body, now).map(|(s, _, _)| s)
    }

    fn req(region: Option<&str>, loc: Option<(f64, f64)>) -> CreateRequest {
        CreateRequest {
            app: "game".into(),
            region: region.map(Into::into),
            location: loc.map(|(lat, lon)| Location { lat, lon }),
            ..CreateRequest::default()
        }
    }

    #[test]
    fn turn_rest_known_answer() {
        // Independent computation: HMAC-SHA1("secret", "1000:user") checked against openssl:
        // printf '1000:user' | openssl dgst -sha1 -hmac secret -binary | base64
        let (u, p) = turn_rest_credentials(b"secret", "user", 1000);
        assert_eq!(u, "1000:user");
        assert_eq!(p, "SIIw2sH2+IUxomKaQD8E99fkVoo=");
    }

    #[test]
    fn distance_sane() {
        let paris = Location {
            lat: 48.85,
            lon: 2.35,
        };
        let nyc = Location {
            lat: 40.71,
            lon: -74.0,
        };
        let d = distance_km(paris, nyc);
        assert!((5800.0..5900.0).contains(&d), "{d}");
        assert!(distance_km(paris, paris) < 1e-6);
    }

    #[test]
    fn routes_by_region_then_location() {
        let mut core = Core::new(cfg());
        three(&mut core, 0);
        assert_eq!(
            create(&mut core, req(Some("us-east"), None), 0)
                .expect("ok")
                .node,
            "nyc"
        );
        assert_eq!(
            create(&mut core, req(None, Some((35.0, 139.0))), 0)
                .expect("ok")
                .node,
            "sing"
        );
        assert_eq!(
            create(&mut core, req(None, Some((51.5, -0.1))), 0)
                .expect("ok")
                .node,
            "paris"
        );
        let e = create(&mut core, req(Some("mars"), None), 0).expect_err("unknown");
        assert_eq!(e.code, 400);
    }

    #[test]
    fn load_breaks_ties_and_full_is_skipped() {
        let mut core = Core::new(cfg());
        core.register(rec("a", "eu-west", 48.85, 2.35, 50, 100), 0)
            .expect("ok");
        core.register(rec("b", "eu-west", 48.86, 2.36, 10, 100), 0)
            .expect("ok");
        assert_eq!(
            create(&mut core, req(Some("eu-west"), None), 0)
                .expect("ok")
                .node,
            "b"
        );
        assert_eq!(
            create(&mut core, req(None, Some((48.0, 2.0))), 0)
                .expect("ok")
                .node,
            "b"
        );
        // b full: region falls to a.
        core.register(rec("b", "eu-west", 48.86, 2.36, 100, 100), 0)
            .expect("ok");
        assert_eq!(
            create(&mut core, req(Some("eu-west"), None), 0)
                .expect("ok")
                .node,
            "a"
        );
        // both full: region empty, fallback to the nearest other region.
        core.register(rec("a", "eu-west", 48.85, 2.35, 100, 100), 0)
            .expect("ok");
        core.register(rec("nyc", "us-east", 40.71, -74.0, 0, 100), 0)
            .expect("ok");
        assert_eq!(
            create(&mut core, req(Some("eu-west"), None), 0)
                .expect("ok")
                .node,
            "nyc"
        );
        core.register(rec("nyc", "us-east", 40.71, -74.0, 100, 100), 0)
            .expect("ok");
        let e = create(&mut core, req(None, None), 0).expect_err("all full");
        assert_eq!(e.code, 503);
        assert!(e.message.contains("no edge available"), "{}", e.message);
    }

    #[test]
    fn reservations_count_until_heartbeat() {
        let mut core = Core::new(cfg());
        core.register(rec("a", "eu-west", 48.85, 2.35, 0, 2), 0)
            .expect("ok");
        create(&mut core, req(None, None), 0).expect("1");
        let s = create(&mut core, req(None, None), 0).expect("2");
        assert_eq!(
            create(&mut core, req(None, None), 0)
                .expect_err("full")
                .code,
            503
        );
        assert_eq!(
            core.join("ops", false, &s.id, 0).expect_err("full").code,
            503
        );
        core.register(rec("a", "eu-west", 48.85, 2.35, 0, 2), 10)
            .expect("ok");
        create(&mut core, req(None, None), 10).expect("room again");
    }

    #[test]
    fn lifecycle_from_heartbeats() {
        let mut core = Core::new(cfg());
        core.register(rec("a", "eu-west", 48.85, 2.35, 0, 100), 0)
            .expect("ok");
        let (s, access, ptoken) = core.create_session("ops", req(None, None), 0).expect("ok");
        assert_eq!(s.status, SessionStatus::Created);
        assert!(access.url.starts_with(&format!(
            "ws://a.test:8080/1.0/session/{}/sockets/slave?token=",
            s.id
        )));
        let now = 1;
        let c = token::verify_for(
            KEY.as_bytes(),
            &access.token,
            now,
            &s.id,
            &[Role::Controller],
        )
        .expect("controller");
        assert_eq!(c.role, Role::Controller);
        token::verify_for(KEY.as_bytes(), &ptoken, now, &s.id, &[Role::Publisher])
            .expect("publisher");
        let srv = &access.stun_servers[0];
        assert!(srv
            .username
            .as_deref()
            .is_some_and(|u| u.ends_with(&format!(":{}", s.id))));

        let mut r = rec("a", "eu-west", 48.85, 2.35, 1, 100);
        r.sessions = vec![SessionReport {
            id: s.id.clone(),
            publisher: true,
            viewers: 1,
        }];
        core.register(r.clone(), 1000).expect("ok");
        assert_eq!(
            core.session(&s.id).expect("s").status,
            SessionStatus::Active
        );
        let (_, j) = core.join("ops", false, &s.id, 1000).expect("join");
        assert_eq!(j.role, Role::Spectator);
        assert_eq!(
            core.join("other", false, &s.id, 1000)
                .expect_err("not owner")
                .code,
            404
        );

        r.sessions.clear();
        // Within the grace period the session waits for its instance to come back...
        core.register(r.clone(), 2000).expect("ok");
        assert_eq!(
            core.session(&s.id).expect("s").status,
            SessionStatus::Active
        );
        // ...and ends once the instance has been gone longer than that.
        let grace = cfg().instance_grace_secs * 1000;
        let reply = core.register(r, 2000 + grace).expect("ok");
        assert!(reply.terminate_sessions.is_empty());
        let st = core.session(&s.id).expect("s");
        assert_eq!(st.status, SessionStatus::Terminated);
        assert_eq!(st.status_message, "instance gone");
        assert_eq!(
            core.join("ops", false, &s.id, 2000 + grace)
                .expect_err("ended")
                .code,
            409
        );
    }

    #[test]
    fn delete_ephemeral_and_report_terminate() {
        let mut core = Core::new(cfg());
        core.register(rec("a", "eu-west", 48.85, 2.35, 0, 100), 0)
            .expect("ok");
        let mut body = req(None, None);
        body.ephemeral = Some(true);
        let e = create(&mut core, body, 0).expect("ok");
        let p = create(&mut core, req(None, None), 0).expect("ok");
        core.delete("ops", false, &e.id, 1).expect("deleted");
        assert!(core.session(&e.id).is_none(), "ephemeral removed");
        core.delete("ops", false, &p.id, 1).expect("deleted");
        assert_eq!(
            core.session(&p.id).expect("kept").status,
            SessionStatus::Terminated
        );
        let mut r = rec("a", "eu-west", 48.85, 2.35, 0, 100);
        r.sessions = vec![SessionReport {
            id: p.id.clone(),
            publisher: true,
            viewers: 0,
        }];
        let reply = core.register(r, 2).expect("ok");
        assert_eq!(reply.terminate_sessions, vec![p.id.clone()]);
    }

    #[test]
    fn node_loss_and_idle() {
        let mut core = Core::new(cfg());
        three(&mut core, 0);
        let s = create(&mut core, req(Some("us-east"), None), 0).expect("ok");
        let t = create(&mut core, req(Some("eu-west"), None), 0).expect("ok");
        core.register(rec("paris", "eu-west", 48.85, 2.35, 0, 100), 5000)
            .expect("ok");
        core.register(rec("sing", "ap-south", 1.35, 103.8, 0, 100), 5000)
            .expect("ok");
        core.sweep(6000);
        assert!(core.nodes().contains_key("nyc"), "exactly 6 s: still there");
        core.sweep(6001);
        assert!(!core.nodes().contains_key("nyc"));
        assert_eq!(core.session(&s.id).expect("s").status, SessionStatus::Error);
        assert_eq!(
            core.session(&t.id).expect("t").status,
            SessionStatus::Created
        );
        // idle: default 300 s.
        core.register(rec("paris", "eu-west", 48.85, 2.35, 0, 100), 300_000)
            .expect("ok");
        core.sweep(300_001);
        assert_eq!(
            core.session(&t.id).expect("t").status,
            SessionStatus::Terminated
        );
        assert_eq!(
            core.list("ops", false, Some(SessionStatus::Error), 0, 10)
                .len(),
            1
        );
        assert_eq!(core.list("ops", false, None, 1, 10).len(), 1);
        assert_eq!(core.list("nobody", false, None, 0, 10).len(), 0);
        assert_eq!(core.list("nobody", true, None, 0, 10).len(), 2);
    }

    #[test]
    fn bad_records_refused() {
        let mut core = Core::new(cfg());
        let mut r = rec("a b", "eu-west", 0.0, 0.0, 0, 1);
        assert_eq!(core.register(r.clone(), 0).expect_err("id").code, 400);
        r.id = "a".into();
        r.lat = 91.0;
        assert!(core.register(r.clone(), 0).is_err());
        r.lat = 0.0;
        r.http_url = "ftp://x".into();
        assert!(core.register(r.clone(), 0).is_err());
        r.http_url = "http://x".into();
        r.ice_urls = vec!["http://not-ice".into()];
        assert!(core.register(r, 0).is_err());
    }
}
