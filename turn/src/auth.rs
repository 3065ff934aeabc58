//! Long-term credentials: static users, the TURN REST shared-secret scheme and
//! stateless nonces.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

/// PASSWORD-ALGORITHM number for MD5 (RFC 8489 §18.5).
pub const ALG_MD5: u16 = 1;
/// PASSWORD-ALGORITHM number for SHA-256.
pub const ALG_SHA256: u16 = 2;

/// Mint TURN REST credentials (the scheme shared by coturn and Anbox).
///
/// Returns `(username, password)` where username is `"<now_unix + ttl_secs>:<user>"`
/// and password is `base64(HMAC-SHA1(secret, username))`.
pub fn rest_credentials(
    secret: &str,
    user: &str,
    ttl_secs: u64,
    now_unix: u64,
) -> (String, String) {
    let username = format!("{}:{}", now_unix.saturating_add(ttl_secs), user);
    let password = rest_password(secret, &username);
    (username, password)
}

/// `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Long-term credential key: `MD5(username ":" realm ":" password)` (or SHA-256 of
/// the same string for PASSWORD-ALGORITHM SHA-256).
pub fn long_term_key(username: &str, realm: &str, password: &str, algorithm: u16) -> Vec<u8> {
    let s = format!("{username}:{realm}:{password}");
    if algorithm == ALG_SHA256 {
        Sha256::digest(s.as_bytes()).to_vec()
    } else {
        Md5::digest(s.as_bytes()).to_vec()
    }
}

/// Why authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown user or malformed REST username.
    UnknownUser,
    /// REST username whose expiry is in the past.
    Expired,
    /// Integrity check failed (wrong password).
    BadIntegrity,
}

impl AuthFailure {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired",
            AuthFailure::BadIntegrity => "bad_integrity",
        }
    }
}

/// The credential store: static users and REST secrets.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, String>,
    secrets: Vec<String>,
}

impl Credentials {
    /// Build a store for `realm`.
    pub fn new(realm: &str, users: HashMap<String, String>, secrets: Vec<String>) -> Self {
        Credentials {
            realm: realm.to_string(),
            users,
            secrets,
        }
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Candidate passwords for `username`: the static one, or one per REST secret.
    ///
    /// `Err` when the user is unknown or the REST credential has expired.
    pub fn passwords(&self, username: &str, now_unix: u64) -> Result<Vec<String>, AuthFailure> {
        if let Some(p) = self.users.get(username) {
            return Ok(vec![p.clone()]);
        }
        if self.secrets.is_empty() {
            return Err(AuthFailure::UnknownUser);
        }
        let ts = username.split(':').next().unwrap_or("");
        let expiry: u64 = ts.parse().map_err(|_| AuthFailure::UnknownUser)?;
        if expiry < now_unix {
            return Err(AuthFailure::Expired);
        }
        Ok(self
            .secrets
            .iter()
            .map(|s| rest_password(s, username))
            .collect())
    }

    /// The quota key for a username: the part after the colon for REST names.
    pub fn quota_user(username: &str) -> &str {
        match username.split_once(':') {
            Some((ts, user)) if ts.bytes().all(|b| b.is_ascii_digit()) => user,
            _ => username,
        }
    }
}

/// Stateless nonces: `hex(ts) || hex(HMAC-SHA1(key, ts || client ip)[..8])`.
#[derive(Clone)]
pub struct NonceKey {
    key: [u8; 32],
    lifetime_secs: u64,
}

impl NonceKey {
    /// A nonce key; nonces older than `lifetime_secs` are stale.
    pub fn new(key: [u8; 32], lifetime_secs: u64) -> Self {
        NonceKey { key, lifetime_secs }
    }

    fn tag(&self, ts: u64, ip: IpAddr) -> [u8; 8] {
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(&ts.to_be_bytes());
        match ip {
            IpAddr::V4(v) => mac.update(&v.octets()),
            IpAddr::V6(v) => mac.update(&v.octets()),
        }
        let out = mac.finalize().into_bytes();
        let mut t = [0u8; 8];
        t.copy_from_slice(&out[..8]);
        t
    }

    /// Mint a nonce for `ip` at `now_unix`.
    pub fn mint(&self, now_unix: u64, ip: IpAddr) -> String {
        let mut s = String::with_capacity(32);
        for b in now_unix
            .to_be_bytes()
            .iter()
            .chain(self.tag(now_unix, ip).iter())
        {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Check a nonce: `Ok(())` valid, `Err(true)` stale (valid but expired), `Err(false)` invalid.
    pub fn check(&self, nonce: &[u8], now_unix: u64, ip: IpAddr) -> Result<(), bool> {
        if nonce.len() != 32 {
            return Err(false);
        }
        let mut raw = [0u8; 16];
        for (i, r) in raw.iter_mut().enumerate() {
            let hi = hexval(nonce[2 * i]).ok_or(false)?;
            let lo = hexval(nonce[2 * i + 1]).ok_or(false)?;
            *r = hi << 4 | lo;
        }
        let mut tsb = [0u8; 8];
        tsb.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(tsb);
        let tag = self.tag(ts, ip);
        if tag.iter().zip(&raw[8..]).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return Err(false);
        }
        if ts > now_unix.saturating_add(5) || now_unix.saturating_sub(ts) >= self.lifetime_secs {
            return Err(true);
        }
        Ok(())
    }
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_matches_coturn_scheme() {
        let (u, p) = rest_credentials("north", "alice", 3600, 1_000_000);
        assert_eq!(u, "1003600:alice");
        // Known-answer: base64(HMAC-SHA1("north", "1003600:alice")) computed independently.
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(b"north").unwrap();
        mac.update(b"1003600:alice");
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(p, want);
        let c = Credentials::new("r", HashMap::new(), vec!["old".into(), "north".into()]);
        assert!(c.passwords(&u, 1_000_000).unwrap().contains(&p));
        assert_eq!(c.passwords(&u, 2_000_000), Err(AuthFailure::Expired));
        assert_eq!(c.passwords("alice", 0), Err(AuthFailure::UnknownUser));
        assert_eq!(Credentials::quota_user(&u), "alice");
    }

    #[test]
    fn long_term_key_rfc5769() {
        // RFC 5769 §2.4: username "<U+30DE><U+30C8><U+30EA><U+30C3><U+30AF><U+30B9>",
        // realm "example.org"; here just check MD5 of a simple known string.
        let k = long_term_key("user", "realm", "pass", ALG_MD5);
        assert_eq!(k, Md5::digest(b"user:realm:pass").to_vec());
        assert_eq!(k.len(), 16);
        assert_eq!(long_term_key("u", "r", "p", ALG_SHA256).len(), 32);
    }

    #[test]
    fn nonce_lifecycle() {
        let k = NonceKey::new([9; 32], 60);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let n = k.mint(1000, ip);
        assert_eq!(k.check(n.as_bytes(), 1030, ip), Ok(()));
        assert_eq!(k.check(n.as_bytes(), 1060, ip), Err(true));
        assert_eq!(
            k.check(n.as_bytes(), 1030, "192.0.2.2".parse().unwrap()),
            Err(false)
        );
        assert_eq!(k.check(b"garbage", 1030, ip), Err(false));
    }
}
