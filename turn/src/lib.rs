//! `edgerelay-turn`: the STUN/TURN server of edgerelay.
//!
//! * [`server::Server`] is the sans-IO core (RFC 8489 STUN, RFC 8656 TURN over UDP
//!   relays, long-term and TURN REST credentials, stateless nonces, peer policy,
//!   quotas). It takes `(now, 5-tuple, bytes)` and returns one [`server::Action`].
//! * [`driver`] runs the core on real sockets: one dedicated thread owns the UDP
//!   listeners and the relay sockets (mio); TCP and TLS connections are served by
//!   tokio tasks that forward frames to that thread.
//! * [`rest_credentials`] mints TURN REST credentials for WHIP/WHEP `Link` headers.
//!
//! See docs/TURN.md for configuration, security defaults, metrics and the SFU hand-off.

pub mod auth;
pub mod config;
pub mod driver;
pub mod ice;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod stun;

pub use auth::rest_credentials;
pub use config::TurnConfig;
pub use driver::{
    ChannelPeer, LocalHandoff, LocalPacket, LocalRoutes, RouteTable, TurnHandle, TurnServer,
};
pub use ice::{ice_urls, link_header_values};

pub use server::{
    Action, FiveTuple, FxHasher, LocalPeer, LocalRoute, Relay, RelayAllocator, Server, Transport,
};
