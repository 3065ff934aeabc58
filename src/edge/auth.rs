//! Token checks of the edge: static bearer tokens from the config, and the gateway's
//! signed per-session tokens (docs/PROTOCOL.md section 2), verified offline.

use axum::http::StatusCode;
use edgerelay_sfu::RoleRequest;

use crate::gateway::token::{self, Role, TokenError};

/// What a request is allowed to do once its token checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A static token from `[auth]` (publisher or viewer list).
    Static,
    /// A valid gateway token with this role, for the requested session.
    Session(Role),
}

impl Grant {
    /// The SFU role request for a viewer with this grant: a gateway spectator token
    /// must yield a spectator, a controller token asks for the controller seat, and a
    /// static viewer token keeps the first-come rule.
    pub fn viewer_role(self) -> RoleRequest {
        match self {
            Grant::Static => RoleRequest::Auto,
            Grant::Session(Role::Controller) => RoleRequest::Controller,
            Grant::Session(_) => RoleRequest::Spectator,
        }
    }
}

/// A refused token: HTTP status (401 or 403) and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    /// 401 (missing, malformed, bad signature, expired) or 403 (wrong session or role).
    pub status: StatusCode,
    /// One-line reason, safe to show the client.
    pub message: String,
}

impl AuthError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AuthError {
            status,
            message: message.into(),
        }
    }
}

/// The keys and static tokens an endpoint accepts.
pub struct Verifier<'a> {
    /// Static tokens accepted on this endpoint.
    pub static_tokens: &'a [String],
    /// With no static token configured, anyone may use the endpoint (open WHEP).
    pub open_if_empty: bool,
    /// Gateway token keys (empty: gateway tokens are not accepted).
    pub token_keys: &'a [String],
}

/// Constant-time comparison against every configured token.
pub fn static_token_ok(allowed: &[String], given: &str) -> bool {
    let mut ok = false;
    for t in allowed {
        let a = t.as_bytes();
        let b = given.as_bytes();
        let mut diff = u8::from(a.len() != b.len());
        for i in 0..a.len().max(b.len()) {
            diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
        }
        ok |= diff == 0;
    }
    ok
}

/// Maps a token verification failure to its HTTP class and message.
pub fn token_error(e: TokenError) -> AuthError {
    let status = match e {
        TokenError::Malformed | TokenError::BadSignature | TokenError::Expired => {
            StatusCode::UNAUTHORIZED
        }
        TokenError::WrongSession | TokenError::WrongRole => StatusCode::FORBIDDEN,
    };
    AuthError::new(status, e.to_string())
}

impl Verifier<'_> {
    /// Checks `given` for `session` (the room) and the roles allowed on the endpoint.
    /// A static token wins; otherwise the token must be a valid gateway token.
    pub fn check(
        &self,
        given: Option<&str>,
        session: &str,
        roles: &[Role],
        now_unix: u64,
    ) -> Result<Grant, AuthError> {
        if self.open_if_empty && self.static_tokens.is_empty() && given.is_none() {
            return Ok(Grant::Static);
        }
        let Some(given) = given.filter(|g| !g.is_empty()) else {
            return Err(AuthError::new(
                StatusCode::UNAUTHORIZED,
                "missing token (Authorization: Bearer <token> or ?token=)",
            ));
        };
        if static_token_ok(self.static_tokens, given) {
            return Ok(Grant::Static);
        }
        if self.token_keys.is_empty() {
            if self.open_if_empty && self.static_tokens.is_empty() {
                return Ok(Grant::Static);
            }
            return Err(AuthError::new(StatusCode::UNAUTHORIZED, "invalid token"));
        }
        match token::verify_any_for(self.token_keys, given, now_unix, session, roles) {
            Ok(claims) => Ok(Grant::Session(claims.role)),
            // An open endpoint ignores a token it cannot use only if it is not a gateway
            // token at all; a gateway token that fails its checks is always refused.
            Err(TokenError::Malformed) if self.open_if_empty && self.static_tokens.is_empty() => {
                Ok(Grant::Static)
            }
            Err(e) => Err(token_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::token::{sign, Claims};

    const KEY: &str = "edge-test-token-key-0123456789";
    const NOW: u64 = 1_700_000_000;

    fn tok(key: &str, session: &str, role: Role, exp: u64) -> String {
        sign(
            key.as_bytes(),
            &Claims {
                session: session.into(),
                role,
                exp,
                jti: "n".into(),
            },
        )
    }

    fn keys() -> Vec<String> {
        vec!["old-key-old-key-old-key-1".into(), KEY.into()]
    }

    #[test]
    fn static_tokens_compare_exactly() {
        let allowed = vec!["secret-token".to_string(), "other-token-1".to_string()];
        assert!(static_token_ok(&allowed, "secret-token"));
        assert!(static_token_ok(&allowed, "other-token-1"));
        assert!(!static_token_ok(&allowed, "secret-toke"));
        assert!(!static_token_ok(&allowed, "secret-tokenX"));
        assert!(!static_token_ok(&allowed, ""));
        assert!(!static_token_ok(&[], "x"));
    }

    #[test]
    fn whip_accepts_static_or_publisher_token() {
        let statics = vec!["publisher-static".to_string()];
        let k = keys();
        let v = Verifier {
            static_tokens: &statics,
            open_if_empty: false,
            token_keys: &k,
        };
        let pubr = [Role::Publisher];
        assert_eq!(
            v.check(Some("publisher-static"), "s1", &pubr, NOW),
            Ok(Grant::Static)
        );
        let t = tok(KEY, "s1", Role::Publisher, NOW + 60);
        assert_eq!(
            v.check(Some(&t), "s1", &pubr, NOW),
            Ok(Grant::Session(Role::Publisher))
        );
        // Wrong session / role -> 403.
        assert_eq!(
            v.check(Some(&t), "s2", &pubr, NOW).map_err(|e| e.status),
            Err(StatusCode::FORBIDDEN)
        );
        let spect = tok(KEY, "s1", Role::Spectator, NOW + 60);
        let e = v.check(Some(&spect), "s1", &pubr, NOW).expect_err("role");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.message, "token role not allowed");
        // Expired, forged, malformed, missing -> 401.
        let old = tok(KEY, "s1", Role::Publisher, NOW);
        assert_eq!(
            v.check(Some(&old), "s1", &pubr, NOW).map_err(|e| e.message),
            Err("token expired".into())
        );
        let forged = tok("not-the-key-not-the-key", "s1", Role::Publisher, NOW + 60);
        let e = v
            .check(Some(&forged), "s1", &pubr, NOW)
            .expect_err("forged");
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::UNAUTHORIZED, "bad token signature")
        );
        let e = v.check(Some("garbage"), "s1", &pubr, NOW).expect_err("bad");
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::UNAUTHORIZED, "malformed token")
        );
        assert_eq!(
            v.check(None, "s1", &pubr, NOW).map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn viewer_roles_map_to_sfu_requests() {
        let k = keys();
        let v = Verifier {
            static_tokens: &[],
            open_if_empty: true,
            token_keys: &k,
        };
        let viewers = [Role::Controller, Role::Spectator];
        let c = tok(KEY, "s1", Role::Controller, NOW + 60);
        let s = tok(KEY, "s1", Role::Spectator, NOW + 60);
        let g = v.check(Some(&c), "s1", &viewers, NOW).expect("controller");
        assert_eq!(g.viewer_role(), RoleRequest::Controller);
        let g = v.check(Some(&s), "s1", &viewers, NOW).expect("spectator");
        assert_eq!(g.viewer_role(), RoleRequest::Spectator);
        // Open WHEP without a token, or with a non-gateway token: first-come rule.
        assert_eq!(
            v.check(None, "s1", &viewers, NOW).map(Grant::viewer_role),
            Ok(RoleRequest::Auto)
        );
        assert_eq!(
            v.check(Some("whatever"), "s1", &viewers, NOW)
                .map(Grant::viewer_role),
            Ok(RoleRequest::Auto)
        );
        // But a publisher token or another session's token is refused, even there.
        let p = tok(KEY, "s1", Role::Publisher, NOW + 60);
        assert_eq!(
            v.check(Some(&p), "s1", &viewers, NOW).map_err(|e| e.status),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            v.check(Some(&c), "other", &viewers, NOW)
                .map_err(|e| e.status),
            Err(StatusCode::FORBIDDEN)
        );
        // A tampered token (spectator signature on a controller payload) is forged.
        let (payload, _) = c.split_once('.').expect("two parts");
        let (_, sig) = s.split_once('.').expect("two parts");
        let forged = format!("{payload}.{sig}");
        assert_eq!(
            v.check(Some(&forged), "s1", &viewers, NOW)
                .map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn without_keys_only_static_tokens() {
        let statics = vec!["viewer-static-1".to_string()];
        let v = Verifier {
            static_tokens: &statics,
            open_if_empty: true,
            token_keys: &[],
        };
        let t = tok(KEY, "s1", Role::Controller, NOW + 60);
        assert_eq!(
            v.check(Some(&t), "s1", &[Role::Controller], NOW)
                .map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            v.check(Some("viewer-static-1"), "s1", &[Role::Controller], NOW),
            Ok(Grant::Static)
        );
    }
}
