//! The client's one configuration struct, validated when the client starts.

use std::time::Duration;

use roomcast_proto::envelope::validate_room;

use crate::backoff::Backoff;
use crate::token::TokenSource;
use crate::urls::{self, UrlError};

pub use roomcast_proto::Subprotocol as Encoding;

/// Where the client finds an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A dispatch endpoint (`http://HOST:PORT/v1/route`, on any edge's HTTP port or a
    /// stand-alone `edge dispatch`): asked before every connection, so each reconnect goes to
    /// the least-loaded healthy edge. What production deployments use.
    Dispatch(String),
    /// A fixed WebSocket URL (`ws://HOST:PORT/ws`): one edge, reconnected to as it is. A
    /// `goaway` still sends the client through the dispatch URL it names.
    Url(String),
}

/// Client configuration. Every field has a default ([`Config::dispatch`], [`Config::url`]);
/// the builder methods set one each.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to find an edge.
    pub endpoint: Endpoint,
    /// Envelope encoding: [`Encoding::Json`] (`roomcast.json.v1`, default) or
    /// [`Encoding::Rkyv`] (`roomcast.rkyv.v2`, binary archives: less CPU to read).
    pub encoding: Encoding,
    /// A room to join at once (in the first connection's URL). Default: none.
    pub room: Option<String>,
    /// Reconnect backoff. Default: 500 ms to 20 s, full jitter.
    pub backoff: Backoff,
    /// Bound on noticing a dead connection: with nothing received for half of it, the client
    /// pings the edge; with nothing for all of it, it drops the connection and reconnects.
    /// Default 20 s (the edge pings every 30 s by default, so the client's pings set the
    /// bound).
    pub liveness: Duration,
    /// Time for dispatch plus the TCP connect and WebSocket upgrade. Default 10 s.
    pub connect_timeout: Duration,
    /// Connection tokens, if the edge wants them. Default: none (anonymous).
    pub token: Option<TokenSource>,
    /// Refresh the token this long before its `exp` (at most half its remaining life).
    /// Default 60 s.
    pub refresh_before: Duration,
    /// Events buffered for the application. When the application falls this far behind the
    /// client stops reading the socket; the edge then sheds the connection (4000) and the
    /// client resumes with `since`: must-deliver messages are not lost, but the application
    /// should keep up. Default 4096.
    pub event_capacity: usize,
    /// TLS for `wss://` edges (what dispatch hands out when the edge serves TLS): a rustls
    /// client configuration, e.g. trusting a private CA ([`Config::tls_roots`]). Default: None,
    /// the web PKI roots of the `webpki-roots` bundle.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The endpoint URL is unusable.
    #[error("endpoint: {0}")]
    Endpoint(#[from] UrlError),
    /// A room the edge would refuse.
    #[error("room {room:?}: {why}")]
    Room {
        /// The room.
        room: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A bound (backoff, liveness, queue) out of range.
    #[error("{0}")]
    Bound(&'static str),
}

impl Config {
    fn with(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            encoding: Encoding::Json,
            room: None,
            backoff: Backoff::default(),
            liveness: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            token: None,
            refresh_before: Duration::from_secs(60),
            event_capacity: 4096,
            tls: None,
        }
    }

    /// Connect through a dispatch endpoint (`http://HOST:PORT/v1/route`).
    pub fn dispatch(url: impl Into<String>) -> Self {
        Self::with(Endpoint::Dispatch(url.into()))
    }

    /// Connect to one edge's WebSocket URL (`ws://HOST:PORT/ws`).
    pub fn url(url: impl Into<String>) -> Self {
        Self::with(Endpoint::Url(url.into()))
    }

    /// Use the rkyv encoding (`roomcast.rkyv.v2`).
    #[must_use]
    pub fn rkyv(mut self) -> Self {
        self.encoding = Encoding::Rkyv;
        self
    }

    /// Use this encoding.
    #[must_use]
    pub fn encoding(mut self, e: Encoding) -> Self {
        self.encoding = e;
        self
    }

    /// Join `room` at once.
    #[must_use]
    pub fn room(mut self, room: impl Into<String>) -> Self {
        self.room = Some(room.into());
        self
    }

    /// Reconnect backoff bounds.
    #[must_use]
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Dead-connection bound.
    #[must_use]
    pub fn liveness(mut self, d: Duration) -> Self {
        self.liveness = d;
        self
    }

    /// Connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Use this rustls configuration for `wss://` connections.
    #[must_use]
    pub fn tls(mut self, c: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(c);
        self
    }

    /// Trust these roots (a private CA, a test CA) for `wss://`, instead of the web PKI's.
    ///
    /// # Panics
    /// Never: the built-in aws-lc-rs provider supports the default protocol versions.
    #[must_use]
    pub fn tls_roots(self, roots: rustls::RootCertStore) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the provider's defaults support TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        self.tls(std::sync::Arc::new(c))
    }

    /// Connection tokens from an async callback.
    #[must_use]
    pub fn token(mut self, t: TokenSource) -> Self {
        self.token = Some(t);
        self
    }

    /// Checks everything a connection would trip on later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.endpoint {
            Endpoint::Dispatch(u) => {
                urls::dispatch_request(u, None)?;
            }
            Endpoint::Url(u) => {
                urls::ws_url(u, None)?;
            }
        }
        if let Some(r) = &self.room {
            validate_room(r).map_err(|why| ConfigError::Room { room: r.clone(), why })?;
        }
        self.backoff.validate().map_err(ConfigError::Bound)?;
        if self.liveness < Duration::from_millis(100) {
            return Err(ConfigError::Bound("liveness must be at least 100 ms"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Bound("connect_timeout must be above zero"));
        }
        if self.event_capacity == 0 {
            return Err(ConfigError::Bound("event_capacity must be above zero"));
        }
        if self.encoding == Encoding::Sse {
            // The edge's SSE transport is for browsers on networks that break WebSockets; this
            // client speaks WebSocket only.
            return Err(ConfigError::Bound("encoding: Sse is the browsers' fallback transport; use Json or Rkyv"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        assert!(Config::dispatch("http://127.0.0.1:8081/v1/route").room("lobby").validate().is_ok());
        assert!(Config::url("ws://127.0.0.1:8080/ws").rkyv().validate().is_ok());
        assert!(matches!(Config::url("ftp://x").validate(), Err(ConfigError::Endpoint(_))));
        assert!(matches!(Config::dispatch("ws://x/v1/route").validate(), Err(ConfigError::Endpoint(_))));
        assert!(matches!(Config::url("ws://x/ws").room("a b").validate(), Err(ConfigError::Room { .. })));
        assert!(matches!(
            Config::url("ws://x/ws").liveness(Duration::from_millis(1)).validate(),
            Err(ConfigError::Bound(_))
        ));
        assert!(matches!(Config::url("ws://x/ws").encoding(Encoding::Sse).validate(), Err(ConfigError::Bound(_))));
    }
}
