//! Connection tokens (JWT, RFC 7519) and the identity the server makes from them.
//!
//! A connection's identity comes from a signed token, never from what the client says: the
//! `sub` claim is the user every message it publishes carries, `rooms` bounds what it may join,
//! `pub` which kinds it may publish over the socket. Verification uses `jsonwebtoken` (HS256
//! with a shared secret; RS256/ES256 with public keys, several at once for rotation, chosen by
//! `kid`). Expiry is checked here against the `now` the caller passes (the library's own clock
//! check is off), so an open connection's `exp` is enforced the same way as a handshake's.
//!
//! With no key configured the edge runs in anonymous mode: every connection gets a server-made
//! id and may publish only the kinds configured for clients.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, KeyAlg};

/// Longest `sub` accepted (it is the `user` of every message the connection publishes).
pub const MAX_SUB_LEN: usize = 64;

/// Whether `user` can be a user id: 1 to MAX_SUB_LEN bytes and no control characters (a line
/// break in an id would forge lines in the edge's text logs and in a moderator's tools).
pub fn check_user_id(user: &str) -> Result<(), &'static str> {
    if user.is_empty() || user.len() > MAX_SUB_LEN {
        return Err("must be 1 to 64 bytes");
    }
    if user.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// Why a token was refused. The text goes to the client (401 body or `error` message): it
/// names the problem, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the query or the Authorization header.
    #[error("missing token: pass ?token=JWT or Authorization: Bearer JWT")]
    Missing,
    /// Not a JWT this edge accepts: malformed, bad signature or wrong algorithm (the reason follows).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Its `exp` has passed (leeway included).
    #[error("token expired")]
    Expired,
    /// Its `nbf` is still ahead (leeway included).
    #[error("token not valid yet (nbf)")]
    NotYet,
    /// Its `kid` names no configured key.
    #[error("token has no usable key: unknown kid {0:?}")]
    UnknownKid(String),
    /// Its `sub` is empty, longer than 64 bytes or holds control characters.
    #[error("bad sub: 1 to 64 bytes, no control characters")]
    BadSub,
}

/// Why the auth configuration cannot be used (start-up errors name the key).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A key file could not be read.
    #[error("auth.keys[{index}].file: cannot read {path}: {source}")]
    ReadKey {
        /// The key's place in `auth.keys`.
        index: usize,
        /// The file named.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// A key file does not hold a public key of its algorithm in PEM.
    #[error("auth.keys[{index}].file: not a {alg:?} public key in PEM: {message}")]
    BadKey {
        /// The key's place in `auth.keys`.
        index: usize,
        /// The algorithm the key was configured for.
        alg: KeyAlg,
        /// The parser's complaint.
        message: String,
    },
    /// The HS256 secret is too short to resist brute force.
    #[error("auth.hs256_secret: at least 32 bytes (a shorter HMAC secret can be brute-forced)")]
    ShortSecret,
}

/// Room patterns: an exact name, or a prefix ending in `*`.
pub fn room_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

/// Whether a browser page from `origin` may connect: any when `allowed` is empty, else an exact
/// match (ASCII case-insensitive) or `scheme://*.domain` matching any subdomain of `domain`
/// (not `domain` itself) with the same scheme and port.
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    if allowed.is_empty() {
        return true;
    }
    // An origin is scheme://host[:port], the host made of DNS labels (or an IP literal):
    // nothing else is compared, so nothing can hide another host in it.
    let Some((oscheme, oauth)) = origin.split_once("://") else { return false };
    let Some((ohost, oport)) = host_port(oauth) else { return false };
    let ohost = ohost.to_ascii_lowercase();
    allowed.iter().any(|a| {
        let Some((scheme, auth)) = a.split_once("://") else { return false };
        if !scheme.eq_ignore_ascii_case(oscheme) {
            return false;
        }
        let (wild, auth) = match auth.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, auth),
        };
        let Some((host, port)) = host_port(auth) else { return false };
        let host = host.to_ascii_lowercase();
        let host_ok = if wild {
            ohost.len() > host.len() + 1
                && ohost.ends_with(&host)
                && ohost.as_bytes()[ohost.len() - host.len() - 1] == b'.'
        } else {
            ohost == host
        };
        host_ok && port == oport
    })
}

/// `host[:port]` of an origin or an allow-list entry: the host is DNS labels (letters, digits,
/// hyphens, dots) or a bracketed IPv6 literal; the port, digits. None for anything else.
pub fn host_port(s: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let (v6, after) = (&rest[..end], &rest[end + 1..]);
        if v6.is_empty() || !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (&s[..end + 2], port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let labels_ok = !host.starts_with('[')
        && !host.is_empty()
        && host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    (labels_ok || host.starts_with('[')).then_some((host, port))
}

/// Who a connection is, as the server established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user every message this connection publishes carries.
    pub user: Arc<str>,
    /// Token expiry, seconds since the Unix epoch (None: anonymous, never expires).
    pub exp: Option<u64>,
    /// Rooms the connection may join (None: every room).
    pub rooms: Option<Arc<[String]>>,
    /// Kinds the connection may publish over the socket (None: the kinds configured for clients).
    pub publish: Option<Arc<[String]>>,
    /// No token: the edge made up the user id (anonymous mode).
    pub anonymous: bool,
}

impl Identity {
    /// An anonymous identity with a server-made id.
    pub fn anonymous(id: u64) -> Self {
        Self { user: Arc::from(format!("anon-{id:016x}")), exp: None, rooms: None, publish: None, anonymous: true }
    }

    /// Whether the token's room patterns (if any) let this connection join `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|r| r.iter().any(|p| room_matches(p, room)))
    }

    /// Whether this connection may publish `kind` over its socket; `for_clients` is the kind's
    /// configured default.
    pub fn may_publish(&self, kind: &str, for_clients: bool) -> bool {
        match &self.publish {
            Some(kinds) => kinds.iter().any(|k| k == kind),
            None => for_clients,
        }
    }
}

/// The claims a connection token carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (1 to 64 bytes, no control characters).
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Room patterns the connection may join (exact names or `prefix*`); absent: every room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Kinds the connection may publish over its socket (claim `pub`); absent: the configured defaults.
    #[serde(default, rename = "pub", skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Not before (RFC 7519 §4.1.5), seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies connection tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Verifier").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier for `cfg`, or None when no key is configured (anonymous mode). The HS256
    /// secret comes from `auth.hs256_secret` or the environment (`ROOMCAST_AUTH_SECRET`).
    pub fn from_config(cfg: &AuthConfig, env_secret: Option<String>) -> Result<Option<Self>, AuthConfigError> {
        let mut keys = Vec::new();
        let configured = cfg.hs256_secret.as_ref().map(|s| s.expose().to_owned());
        if let Some(secret) = configured.or(env_secret) {
            if secret.len() < 32 {
                return Err(AuthConfigError::ShortSecret);
            }
            let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|_| AuthConfigError::ShortSecret)?;
            keys.push(Key { kid: None, alg: Algorithm::HS256, key });
        }
        for (index, k) in cfg.keys.iter().enumerate() {
            let pem = std::fs::read(&k.file).map_err(|source| AuthConfigError::ReadKey {
                index,
                path: k.file.clone(),
                source,
            })?;
            let (alg, key) = match k.alg {
                KeyAlg::Rs256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
                KeyAlg::Es256 => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
            };
            let key = key.map_err(|e| AuthConfigError::BadKey { index, alg: k.alg, message: e.to_string() })?;
            keys.push(Key { kid: k.kid.clone(), alg, key });
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self { keys, issuer: cfg.issuer.clone(), audience: cfg.audience.clone(), leeway_s: cfg.leeway_s }))
    }

    /// Verifies `token` at `now_s` (seconds since the Unix epoch) and makes the identity.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(header_reason(&e)))?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let by_kid: Vec<&Key> = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).collect();
                if by_kid.is_empty() {
                    // The kid is the client's text: quoted (escaped) and cut short in the reason.
                    return Err(AuthError::UnknownKid(kid.chars().take(64).collect()));
                }
                by_kid
            }
            None => self.keys.iter().collect(),
        };
        let mut last = AuthError::Invalid(format!("algorithm not accepted ({:?}: no key for it)", header.alg));
        for k in candidates.into_iter().filter(|k| k.alg == header.alg) {
            let mut v = Validation::new(k.alg);
            v.validate_exp = false; // checked below against the caller's `now`
            v.leeway = 0;
            // A configured issuer or audience is required, not only checked when present: a
            // token minted by the same key for another service has neither ours nor, often, any.
            let mut required = vec!["exp", "sub"];
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            match &self.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => return identity(data.claims, now_s, self.leeway_s),
                Err(e) => last = AuthError::Invalid(jwt_reason(&e)),
            }
        }
        Err(last)
    }
}

/// A stable, short reason for a token the library refused: the client reads it (401 body,
/// `error` message) and operators grep logs for it, so it names the kind of fault and never
/// carries the library's wording, which changes between versions and can quote the input.
/// The reason for a header the library could not read: an algorithm it does not know (`none`
/// among them) is "not accepted"; anything else is malformed.
fn header_reason(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        jsonwebtoken::errors::ErrorKind::Json(j) if j.to_string().contains("unknown variant") => {
            "algorithm not accepted".into()
        }
        _ => jwt_reason(e),
    }
}

fn jwt_reason(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not accepted".into(),
        K::InvalidIssuer => "wrong issuer (iss)".into(),
        K::InvalidAudience => "wrong audience (aud)".into(),
        K::MissingRequiredClaim(c) if matches!(c.as_str(), "exp" | "sub" | "iss" | "aud") => {
            format!("missing claim {c}")
        }
        K::ImmatureSignature => "token not valid yet (nbf)".into(),
        K::ExpiredSignature => "token expired".into(),
        K::Json(j) => {
            let j = j.to_string();
            match ["exp", "sub"].into_iter().find(|c| j.contains(&format!("missing field `{c}`"))) {
                Some(c) => format!("missing claim {c}"),
                None => "malformed claims (sub and exp are required; rooms and pub are lists of strings)".into(),
            }
        }
        _ => "malformed token (expected header.payload.signature in base64url)".into(),
    }
}

fn identity(c: Claims, now_s: u64, leeway_s: u64) -> Result<Identity, AuthError> {
    if c.exp.saturating_add(leeway_s) <= now_s {
        return Err(AuthError::Expired);
    }
    if c.nbf.is_some_and(|nbf| nbf > now_s.saturating_add(leeway_s)) {
        return Err(AuthError::NotYet);
    }
    if check_user_id(&c.sub).is_err() {
        return Err(AuthError::BadSub);
    }
    Ok(Identity {
        user: Arc::from(c.sub),
        exp: Some(c.exp),
        rooms: c.rooms.map(Arc::from),
        publish: c.publish.map(Arc::from),
        anonymous: false,
    })
}

/// Signs an HS256 token (`edge token`, and tests).
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    let key = EncodingKey::from_secret(secret).map_err(|e| AuthError::Invalid(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).map_err(|e| AuthError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        let cfg = AuthConfig { hs256_secret: Some(crate::config::Secret::new(SECRET)), ..AuthConfig::default() };
        Verifier::from_config(&cfg, None).unwrap().unwrap()
    }

    fn token(sub: &str, exp: u64, rooms: Option<Vec<&str>>, publish: Option<Vec<&str>>) -> String {
        let c = Claims {
            sub: sub.into(),
            exp,
            rooms: rooms.map(|r| r.into_iter().map(String::from).collect()),
            publish: publish.map(|p| p.into_iter().map(String::from).collect()),
            nbf: None,
        };
        sign_hs256(SECRET.as_bytes(), &c).unwrap()
    }

    #[test]
    fn a_valid_token_makes_the_identity() {
        let id = verifier().verify(&token("alice", 2000, Some(vec!["lobby", "show-*"]), Some(vec!["gift"])), 1000);
        let id = id.unwrap();
        assert_eq!(&*id.user, "alice");
        assert_eq!(id.exp, Some(2000));
        assert!(id.may_join("lobby") && id.may_join("show-42") && !id.may_join("lobby2") && !id.may_join("other"));
        assert!(id.may_publish("gift", false) && !id.may_publish("chat", true), "pub replaces the kind defaults");
    }

    /// With an issuer and an audience configured, a token must carry both (a token the same
    /// key signed for another service, with neither claim, used to pass).
    #[test]
    fn configured_issuer_and_audience_are_required() {
        let cfg = AuthConfig {
            hs256_secret: Some(crate::config::Secret::new(SECRET)),
            issuer: Some("https://auth.example".into()),
            audience: Some("roomcast".into()),
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg, None).unwrap().unwrap();
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let good = sign(serde_json::json!({"sub":"a","exp":2000,"iss":"https://auth.example","aud":"roomcast"}));
        assert!(v.verify(&good, 1000).is_ok());
        let no_iss = sign(serde_json::json!({"sub":"a","exp":2000,"aud":"roomcast"}));
        assert_eq!(v.verify(&no_iss, 1000), Err(AuthError::Invalid("missing claim iss".into())));
        let no_aud = sign(serde_json::json!({"sub":"a","exp":2000,"iss":"https://auth.example"}));
        assert_eq!(v.verify(&no_aud, 1000), Err(AuthError::Invalid("missing claim aud".into())));
        let null_aud = sign(serde_json::json!({"sub":"a","exp":2000,"iss":"https://auth.example","aud":null}));
        assert!(v.verify(&null_aud, 1000).is_err());
        let wrong = sign(serde_json::json!({"sub":"a","exp":2000,"iss":"https://evil","aud":"roomcast"}));
        assert_eq!(v.verify(&wrong, 1000), Err(AuthError::Invalid("wrong issuer (iss)".into())));
        // The documented phrases for the common faults.
        let no_exp = sign(serde_json::json!({"sub":"a","iss":"https://auth.example","aud":"roomcast"}));
        assert_eq!(v.verify(&no_exp, 1000), Err(AuthError::Invalid("missing claim exp".into())));
        // {"alg":"none","typ":"JWT"} . {"sub":"a","exp":2000} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjoyMDAwfQ.";
        assert_eq!(v.verify(none, 1000), Err(AuthError::Invalid("algorithm not accepted".into())));
        let hs384 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS384),
            &serde_json::json!({"sub":"a","exp":2000}),
            &key,
        )
        .unwrap();
        assert!(
            matches!(v.verify(&hs384, 1000), Err(AuthError::Invalid(r)) if r.starts_with("algorithm not accepted"))
        );
    }

    #[test]
    fn expiry_is_checked_against_the_callers_clock() {
        let v = verifier();
        let t = token("bob", 1000, None, None);
        // The default leeway (5 s) tolerates clock skew, no more.
        assert!(v.verify(&t, 1004).is_ok());
        assert_eq!(v.verify(&t, 1005), Err(AuthError::Expired));
        let id = v.verify(&t, 10).unwrap();
        assert!(id.may_join("anything") && id.may_publish("chat", true) && !id.may_publish("gift", false));
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let v = verifier();
        let other = sign_hs256(
            b"another secret, also 32 bytes long",
            &Claims { sub: "mallory".into(), exp: 5000, rooms: None, publish: None, nbf: None },
        )
        .unwrap();
        assert!(matches!(v.verify(&other, 1), Err(AuthError::Invalid(_))), "wrong signature");
        assert!(matches!(v.verify("not.a.jwt", 1), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify("", 1), Err(AuthError::Invalid(_))));
        // alg=none is never accepted.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(v.verify(none, 1).is_err());
        assert_eq!(v.verify(&token(&"x".repeat(65), 5000, None, None), 1), Err(AuthError::BadSub));
        assert_eq!(v.verify(&token("", 5000, None, None), 1), Err(AuthError::BadSub));
        // A line break would forge lines in text logs (found by a new user's trial).
        assert_eq!(v.verify(&token("a\nb", 5000, None, None), 1), Err(AuthError::BadSub));
        assert_eq!(v.verify(&token("a\u{7f}", 5000, None, None), 1), Err(AuthError::BadSub));
        assert!(v.verify(&token("caf\u{e9} 42", 5000, None, None), 1).is_ok());
        let later = Claims { sub: "early".into(), exp: 5000, rooms: None, publish: None, nbf: Some(2000) };
        let later = sign_hs256(SECRET.as_bytes(), &later).unwrap();
        assert_eq!(v.verify(&later, 1000), Err(AuthError::NotYet), "nbf in the future");
        assert!(v.verify(&later, 2000).is_ok());
    }

    /// ES256 with two public keys (rotation): the token's `kid` picks the key; a token signed
    /// by a key that is not configured is refused whatever its `kid` says.
    #[test]
    fn es256_keys_rotate_by_kid() {
        use crate::config::PublicKeyConfig;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
        let cfg = AuthConfig {
            keys: vec![
                PublicKeyConfig { kid: Some("a".into()), alg: KeyAlg::Es256, file: format!("{dir}/es256-a.pub.pem") },
                PublicKeyConfig { kid: Some("b".into()), alg: KeyAlg::Es256, file: format!("{dir}/es256-b.pub.pem") },
            ],
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg, None).unwrap().unwrap();
        let sign = |key: &str, kid: &str| {
            let pem = std::fs::read(format!("{dir}/es256-{key}.key.pem")).unwrap();
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            let c = Claims { sub: "carol".into(), exp: 5000, rooms: None, publish: None, nbf: None };
            jsonwebtoken::encode(&h, &c, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
        };
        assert_eq!(&*v.verify(&sign("a", "a"), 1).unwrap().user, "carol");
        assert_eq!(&*v.verify(&sign("b", "b"), 1).unwrap().user, "carol");
        assert!(matches!(v.verify(&sign("a", "b"), 1), Err(AuthError::Invalid(_))), "kid b, signed by a");
        assert_eq!(v.verify(&sign("a", "c"), 1), Err(AuthError::UnknownKid("c".into())));
        // An HS256 token is not accepted where only ES256 keys are configured.
        let hs = sign_hs256(
            SECRET.as_bytes(),
            &Claims { sub: "x".into(), exp: 5000, rooms: None, publish: None, nbf: None },
        );
        assert!(v.verify(&hs.unwrap(), 1).is_err());
        let bad = AuthConfig {
            keys: vec![PublicKeyConfig { kid: None, alg: KeyAlg::Es256, file: format!("{dir}/missing.pem") }],
            ..AuthConfig::default()
        };
        let e = Verifier::from_config(&bad, None).unwrap_err().to_string();
        assert!(e.starts_with("auth.keys[0].file"), "{e}");
    }

    #[test]
    fn origins_exact_and_wildcard_subdomains() {
        let list = vec!["https://live.example.com".to_owned(), "https://*.example.org".to_owned()];
        assert!(origin_allowed(&[], "https://evil.test"), "no list: any");
        assert!(origin_allowed(&list, "https://live.example.com"));
        assert!(origin_allowed(&list, "HTTPS://LIVE.EXAMPLE.COM"));
        assert!(origin_allowed(&list, "https://a.example.org") && origin_allowed(&list, "https://a.b.example.org"));
        assert!(!origin_allowed(&list, "https://example.org"), "the wildcard is for subdomains");
        assert!(!origin_allowed(&list, "https://evilexample.org"));
        assert!(!origin_allowed(&list, "http://a.example.org"), "scheme must match");
        assert!(!origin_allowed(&list, "https://a.example.org:8443"), "port must match");
        assert!(!origin_allowed(&list, "https://live.example.com.evil.test"));
        assert!(!origin_allowed(&list, "null"));
        let v6 = vec!["http://[::1]:8080".to_owned()];
        assert!(origin_allowed(&v6, "http://[::1]:8080") && !origin_allowed(&v6, "http://[::1]:8081"));
        assert!(!origin_allowed(&v6, "http://[::1]x"));
        for sneaky in [
            "https://evil.com/.example.org",
            "https://evil.com?.example.org",
            "https://evil.com#.example.org",
            "https://evil.com\\.example.org",
            "https://user@x.example.org",
            "https://evil.com:.example.org",
            "https://evil.com%2f.example.org",
            "https://*.example.org",
            "https://a..example.org",
            "https://a.example.org:",
            "https://a.example.org:99999x",
        ] {
            assert!(!origin_allowed(&list, sneaky), "{sneaky}");
        }
    }

    #[test]
    fn no_key_is_anonymous_mode_and_short_secrets_are_refused() {
        assert!(Verifier::from_config(&AuthConfig::default(), None).unwrap().is_none());
        let short = AuthConfig { hs256_secret: Some(crate::config::Secret::new("short")), ..AuthConfig::default() };
        assert!(matches!(Verifier::from_config(&short, None), Err(AuthConfigError::ShortSecret)));
        assert!(Verifier::from_config(&AuthConfig::default(), Some(SECRET.into())).unwrap().is_some(), "env secret");
        let a = Identity::anonymous(7);
        assert!(a.anonymous && a.user.starts_with("anon-") && a.exp.is_none());
        assert!(format!("{:?}", verifier()).find(SECRET).is_none(), "the secret is never printed");
    }
}
