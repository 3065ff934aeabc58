//! Wire types of the gateway API shared by the gateway and the edge's registration client.

use serde::{Deserialize, Serialize};

/// What an edge can carry at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Maximum number of viewers (0 = the node takes no viewers).
    pub max_viewers: u32,
    /// Maximum egress bitrate, kbit/s (0 = not limited).
    #[serde(default)]
    pub max_egress_kbps: u64,
}

/// The load an edge reports in each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Rooms (sessions) hosted.
    #[serde(default)]
    pub rooms: u32,
    /// Viewers connected.
    #[serde(default)]
    pub viewers: u32,
    /// Egress bitrate, kbit/s.
    #[serde(default)]
    pub egress_kbps: u64,
    /// CPU use, 0.0..=1.0 per machine.
    #[serde(default)]
    pub cpu: f64,
}

/// The state of one session (room) on an edge, as reported in a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// Session id (the room name on the edge).
    pub id: String,
    /// True while the instance (publisher) is connected.
    #[serde(default)]
    pub publisher: bool,
    /// Viewers currently connected to this session.
    #[serde(default)]
    pub viewers: u32,
}

/// The node record an edge POSTs to `/1.0/nodes/register` at start and every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node id, 1-64 characters of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Region name.
    pub region: String,
    /// Latitude of the node, degrees.
    pub lat: f64,
    /// Longitude of the node, degrees.
    pub lon: f64,
    /// Public HTTP(S) base URL of the edge (WHIP/WHEP), e.g. `https://edge1.example.com:8443`.
    pub http_url: String,
    /// Public WebSocket base URL; defaults to `http_url` with `ws(s)://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_url: Option<String>,
    /// The edge's STUN/TURN URLs (`stun:`, `turn:`, `turns:`), handed to clients with credentials.
    #[serde(default)]
    pub ice_urls: Vec<String>,
    /// Capacity.
    pub capacity: Capacity,
    /// Current load.
    #[serde(default)]
    pub load: Load,
    /// The sessions this edge currently serves.
    #[serde(default)]
    pub sessions: Vec<SessionReport>,
    /// True when the edge is draining: it keeps its sessions but takes no new ones.
    #[serde(default)]
    pub draining: bool,
    /// Software version (informational).
    #[serde(default)]
    pub version: String,
}

/// The gateway's reply to a registration (`metadata` of the envelope).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    /// Heartbeat interval the gateway expects, milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The node is dropped after this long without a heartbeat, milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Sessions reported by the edge that the gateway considers ended (DELETE, idle, error):
    /// the edge should close them (disconnect their publisher and viewers).
    #[serde(default)]
    pub terminate_sessions: Vec<String>,
}
