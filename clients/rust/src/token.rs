//! Connection tokens: fetched from the application's async callback, refreshed before expiry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

/// Error type a token callback may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Where the client gets connection tokens (JWTs signed by the application's back end): an
/// async callback, called before the first connection, again before the token's `exp` (the new
/// one is sent as a `refresh`), and whenever the edge refuses the current one (401 at the
/// upgrade, close 4001).
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenSource {
    /// Wraps an async callback, e.g. `TokenSource::new(|| async { fetch_token().await })`.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(f())))
    }

    pub(crate) fn fetch(&self) -> TokenFuture {
        (self.0)()
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource(..)")
    }
}

/// The `exp` claim of a JWT (seconds since the Unix epoch), read without verifying anything:
/// the edge verifies; the client only needs to know when to refresh. `None` if the token is not
/// a JWT or has no numeric `exp`.
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

/// A token in use and when it expires.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub value: String,
    pub exp: Option<u64>,
}

impl Token {
    pub fn new(value: String) -> Self {
        let exp = jwt_exp(&value);
        Self { value, exp }
    }

    /// How long from `now_unix` (seconds) until the client should refresh: `before` ahead of
    /// `exp`, but never earlier than half the remaining lifetime (a short-lived token is not
    /// refreshed at once). `None` when the expiry is unknown.
    pub fn refresh_in(&self, now_unix: f64, before: Duration) -> Option<Duration> {
        let left = self.exp? as f64 - now_unix;
        if left <= 0.0 {
            return Some(Duration::ZERO);
        }
        let ahead = before.as_secs_f64().min(left / 2.0);
        Some(Duration::from_secs_f64(left - ahead))
    }

    /// Whether the token is too close to its expiry to open a connection with (less than
    /// `margin` left).
    pub fn stale(&self, now_unix: f64, margin: Duration) -> bool {
        self.exp.is_some_and(|exp| (exp as f64) - now_unix < margin.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(claims))
    }

    #[test]
    fn reads_exp() {
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"u","exp":1900000000}"#)), Some(1_900_000_000));
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"u"}"#)), None);
        assert_eq!(jwt_exp("opaque-token"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
    }

    #[test]
    fn refresh_schedule() {
        let t = Token::new(jwt(r#"{"exp":1000}"#));
        let before = Duration::from_secs(60);
        // Long-lived: refresh 60 s ahead.
        assert_eq!(t.refresh_in(100.0, before), Some(Duration::from_secs(840)));
        // 200 s left: 60 s ahead.
        assert_eq!(t.refresh_in(800.0, before), Some(Duration::from_secs(140)));
        // 100 s left: at most half the remaining life ahead (50 s).
        assert_eq!(t.refresh_in(900.0, before), Some(Duration::from_secs(50)));
        // 30 s left: half way (15 s), not at once.
        assert_eq!(t.refresh_in(970.0, before), Some(Duration::from_secs(15)));
        assert_eq!(t.refresh_in(1001.0, before), Some(Duration::ZERO));
        assert!(!t.stale(900.0, Duration::from_secs(5)));
        assert!(t.stale(996.0, Duration::from_secs(5)));
        assert_eq!(Token::new("opaque".into()).refresh_in(0.0, before), None);
    }
}
