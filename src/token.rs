//! Signed, expiring, per-session access tokens.
//!
//! The gateway issues a token for every client of a session: the instance that publishes
//! (`publisher`), the first viewer (`controller`) and further viewers (`spectator`). An edge
//! verifies tokens offline with the key(s) in its config; nothing is looked up.
//!
//! Format: `base64url(payload) "." base64url(HMAC-SHA256(key, base64url(payload)))`, no padding,
//! where `payload` is compact JSON: `{"s":"<session>","r":"<role>","e":<exp unix secs>,"j":"<nonce>"}`.
//! Several keys can be accepted at once ([`verify_any`]) so keys can be rotated without downtime:
//! sign with the new key, keep accepting the old one until its tokens have expired.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted by [`verify`]; anything longer is `Malformed` without further work.
pub const MAX_TOKEN_LEN: usize = 2048;

/// What the bearer of a token may do in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The instance: may publish media into the session's room (WHIP or `/sockets/master`).
    Publisher,
    /// The first viewer: receives media and its input reaches the instance.
    Controller,
    /// A further viewer: receives media only; its input is dropped.
    Spectator,
}

impl Role {
    /// The lowercase wire name (`publisher`, `controller`, `spectator`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Controller => "controller",
            Role::Spectator => "spectator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Session id (on the edge: the room name).
    #[serde(rename = "s")]
    pub session: String,
    /// Role of the bearer.
    #[serde(rename = "r")]
    pub role: Role,
    /// Expiry, unix seconds; the token is refused at and after this instant.
    #[serde(rename = "e")]
    pub exp: u64,
    /// Random nonce / token id, so two tokens with the same claims differ.
    #[serde(rename = "j")]
    pub jti: String,
}

impl Claims {
    /// Claims for `session`/`role` valid for `ttl_secs` from `now_unix`, with a random nonce.
    pub fn new(session: &str, role: Role, now_unix: u64, ttl_secs: u64) -> Self {
        let nonce: [u8; 12] = rand::random();
        Claims {
            session: session.to_owned(),
            role,
            exp: now_unix.saturating_add(ttl_secs),
            jti: URL_SAFE_NO_PAD.encode(nonce),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all: wrong shape, bad base64, bad JSON, too long.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match any accepted key (forged or tampered with).
    #[error("bad token signature")]
    BadSignature,
    /// The token was valid but has expired.
    #[error("token expired")]
    Expired,
    /// The token belongs to another session.
    #[error("token is for another session")]
    WrongSession,
    /// The token's role is not allowed here (e.g. spectator on the controller's socket).
    #[error("token role not allowed")]
    WrongRole,
}

fn mac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // Invariant, not input-dependent: HMAC accepts keys of any length.
    #[allow(clippy::expect_used)]
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(data);
    m
}

/// Signs `claims` with `key` and returns the compact token string.
pub fn sign(key: &[u8], claims: &Claims) -> String {
    // Serialising a struct of strings and integers cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let payload = URL_SAFE_NO_PAD.encode(json);
    let tag = mac(key, payload.as_bytes()).finalize().into_bytes();
    let mut out = payload;
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(tag));
    out
}

/// Verifies `token` with one key and checks expiry against `now_unix`.
pub fn verify(key: &[u8], token: &str, now_unix: u64) -> Result<Claims, TokenError> {
    verify_any(&[key], token, now_unix)
}

/// Verifies `token` against several keys (rotation): accepted if any key's signature matches.
pub fn verify_any<K: AsRef<[u8]>>(
    keys: &[K],
    token: &str,
    now_unix: u64,
) -> Result<Claims, TokenError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    if payload.is_empty() || sig.contains('.') {
        return Err(TokenError::Malformed);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    if sig.len() != 32 {
        return Err(TokenError::Malformed);
    }
    // `verify_slice` compares in constant time.
    let ok = keys.iter().any(|k| {
        mac(k.as_ref(), payload.as_bytes())
            .verify_slice(&sig)
            .is_ok()
    });
    if !ok {
        return Err(TokenError::BadSignature);
    }
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if now_unix >= claims.exp {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// Verifies `token` with one key and checks it is for `session` with one of `allowed_roles`.
pub fn verify_for(
    key: &[u8],
    token: &str,
    now_unix: u64,
    session: &str,
    allowed_roles: &[Role],
) -> Result<Claims, TokenError> {
    verify_any_for(&[key], token, now_unix, session, allowed_roles)
}

/// Like [`verify_for`] with several accepted keys (rotation).
pub fn verify_any_for<K: AsRef<[u8]>>(
    keys: &[K],
    token: &str,
    now_unix: u64,
    session: &str,
    allowed_roles: &[Role],
) -> Result<Claims, TokenError> {
    let claims = verify_any(keys, token, now_unix)?;
    if claims.session != session {
        return Err(TokenError::WrongSession);
    }
    if !allowed_roles.contains(&claims.role) {
        return Err(TokenError::WrongRole);
    }
    Ok(claims)
}

/// Current unix time in seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-signing-key-0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn token(session: &str, role: Role, exp: u64) -> String {
        sign(
            KEY,
            &Claims {
                session: session.into(),
                role,
                exp,
                jti: "n1".into(),
            },
        )
    }

    #[test]
    fn roundtrip() {
        let c = Claims::new("abc", Role::Controller, NOW, 60);
        let t = sign(KEY, &c);
        assert_eq!(verify(KEY, &t, NOW), Ok(c.clone()));
        assert_eq!(
            verify_for(KEY, &t, NOW + 59, "abc", &[Role::Controller]),
            Ok(c)
        );
        assert!(!t.contains('='), "no padding in a URL token");
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
    }

    #[test]
    fn nonces_differ() {
        let a = Claims::new("s", Role::Spectator, NOW, 60);
        let b = Claims::new("s", Role::Spectator, NOW, 60);
        assert_ne!(sign(KEY, &a), sign(KEY, &b));
    }

    #[test]
    fn forged_with_other_key() {
        let c = Claims::new("abc", Role::Controller, NOW, 60);
        let t = sign(b"another key entirely", &c);
        assert_eq!(verify(KEY, &t, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_payload() {
        // Take a spectator token and swap in a controller payload, keeping the signature.
        let spect = token("abc", Role::Spectator, NOW + 60);
        let ctrl = token("abc", Role::Controller, NOW + 60);
        let (_, sig) = spect.split_once('.').expect("two parts");
        let (payload, _) = ctrl.split_once('.').expect("two parts");
        let forged = format!("{payload}.{sig}");
        assert_eq!(verify(KEY, &forged, NOW), Err(TokenError::BadSignature));
        // Flip one signature character.
        let mut bytes = ctrl.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).expect("ascii");
        assert_eq!(verify(KEY, &flipped, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired() {
        let t = token("abc", Role::Controller, NOW);
        assert_eq!(verify(KEY, &t, NOW), Err(TokenError::Expired));
        assert_eq!(verify(KEY, &t, NOW + 1000), Err(TokenError::Expired));
        assert!(verify(KEY, &t, NOW - 1).is_ok());
    }

    #[test]
    fn wrong_session() {
        let t = token("abc", Role::Controller, NOW + 60);
        assert_eq!(
            verify_for(KEY, &t, NOW, "other", &[Role::Controller]),
            Err(TokenError::WrongSession)
        );
    }

    #[test]
    fn wrong_role() {
        let t = token("abc", Role::Spectator, NOW + 60);
        assert_eq!(
            verify_for(KEY, &t, NOW, "abc", &[Role::Controller]),
            Err(TokenError::WrongRole)
        );
        assert_eq!(
            verify_for(KEY, &t, NOW, "abc", &[Role::Publisher]),
            Err(TokenError::WrongRole)
        );
        assert!(verify_for(KEY, &t, NOW, "abc", &[Role::Controller, Role::Spectator]).is_ok());
    }

    #[test]
    fn truncated() {
        let t = token("abc", Role::Controller, NOW + 60);
        for cut in 0..t.len() {
            let r = verify(KEY, &t[..cut], NOW);
            assert!(
                matches!(
                    r,
                    Err(TokenError::Malformed) | Err(TokenError::BadSignature)
                ),
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn garbage() {
        for g in [
            "",
            ".",
            "..",
            "a.b.c",
            "not a token",
            "%%%.%%%",
            "eyJzIjoiYWJjIn0.",
            "\u{0}\u{1}",
            "ünïcödé.ünïcödé",
        ] {
            let r = verify(KEY, g, NOW);
            assert!(
                matches!(
                    r,
                    Err(TokenError::Malformed) | Err(TokenError::BadSignature)
                ),
                "{g:?}: {r:?}"
            );
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(verify(KEY, &long, NOW), Err(TokenError::Malformed));
        // Signed, but the payload is not JSON claims.
        let payload = URL_SAFE_NO_PAD.encode(b"{\"x\":1}");
        let tag = mac(KEY, payload.as_bytes()).finalize().into_bytes();
        let t = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag));
        assert_eq!(verify(KEY, &t, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rotation() {
        let old = b"old-key-old-key-old-key".as_slice();
        let new = b"new-key-new-key-new-key".as_slice();
        let c = Claims::new("abc", Role::Publisher, NOW, 60);
        let t_old = sign(old, &c);
        let t_new = sign(new, &c);
        assert!(verify_any(&[new, old], &t_old, NOW).is_ok());
        assert!(verify_any(&[new, old], &t_new, NOW).is_ok());
        assert_eq!(
            verify_any(&[new], &t_old, NOW),
            Err(TokenError::BadSignature)
        );
        let none: [&[u8]; 0] = [];
        assert_eq!(
            verify_any(&none, &t_new, NOW),
            Err(TokenError::BadSignature)
        );
    }
}
