//! The publish API and the operator endpoints, on their own tokio runtime and port, never on
//! the shards' threads: publishers use short HTTP connections, isolated from the push path.
//!
//! - `POST /v1/rooms/{room}/messages` `{"kind","user","body"}` -> `{"room","seq","ts_us"}`,
//!   with `Authorization: Bearer KEY` once any publish key is configured ([`PublishKeys`])
//! - `POST /v1/messages` `{"messages": [{"room","kind","user","body","idempotency_key"}]}` ->
//!   `{"results": [..]}`, one answer per message, in order
//! - `GET /healthz`, `GET /metrics` (Prometheus text), and the other GET endpoints: open

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use roomcast_proto::envelope::{validate_kind, validate_room};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bus::redis::Conn;

use crate::bus::{BusHandle, NewMessage, PublishError, RoomName};
use crate::config::{Config, ConfigError, Secret};
use crate::dispatch::{Dispatcher, EdgeHealth, registry};
use crate::health::{HealthReport, KernelView, level_name};
use crate::metrics::Metrics;

/// Longest `user` accepted.
pub const MAX_USER_LEN: usize = 64;

/// What every publish API handler shares: the bus, the figures, the keys and the edge's switches.
#[derive(Clone)]
pub struct AppState {
    /// Where publishes and room queries go.
    pub bus: BusHandle,
    /// The edge's metric families (for /metrics and the publish counters).
    pub metrics: Arc<Metrics>,
    /// Kernel probes and health (crate::health).
    pub kernel: Arc<KernelView>,
    /// Number of shards, for /healthz.
    pub shards: usize,
    /// When the edge started, for uptime in /healthz.
    pub started: Instant,
    /// Where `GET /v1/route` finds edges.
    pub route: Arc<RouteSource>,
    /// Bearer token for admin endpoints (None: refused).
    pub admin_token: Option<Secret>,
    /// Keys for the publish API (none: open, allowed only on loopback or when insecure_no_keys).
    pub keys: Arc<PublishKeys>,
    /// Kinds configured `publishers = "clients"`: refused here (403).
    pub clients_only_kinds: Arc<Vec<String>>,
    /// Asks the main thread to start a drain.
    pub drain: tokio::sync::mpsc::UnboundedSender<()>,
    /// Set once the edge drains: /v1/route stops sending clients here.
    pub draining: Arc<AtomicBool>,
    /// Asks the load reporter to publish now (None: no shared bus).
    pub report_now: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
    /// Browser origins that may read `/v1/route` (CORS): `ws.allowed_origins`, any when empty.
    pub cors_origins: Arc<[String]>,
    /// The single-node store, for `/healthz` (None: Redis mode or `--no-store`).
    pub store: Option<Arc<crate::store::Store>>,
    /// Moderation: bans, the shards' connections, and its figures.
    pub moderation: Arc<crate::moderation::Moderation>,
    /// The room streams' bounds (Redis mode's delete script trims as the publish script does).
    pub stream_limits: crate::bus::redis::StreamLimits,
    /// Longest ban (`moderation.max_ban_s`).
    pub max_ban_s: u64,
    /// The bounds of `POST /v1/messages`.
    pub batch: BatchLimits,
    /// `[tls]`: the certificate's dates for /healthz and /metrics (None: plain ws).
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl AppState {
    /// Marks the edge draining and waits (bounded) until dispatch can see it.
    pub async fn leave_dispatch(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Some(tx) = &self.report_now {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(done).is_ok()
                && let Ok(Ok(())) = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await
            {
                // Dispatch answers from reads up to CACHE_MS old: after this, none made
                // before the `draining` report was written.
                tokio::time::sleep(std::time::Duration::from_millis(registry::CACHE_MS)).await;
            }
        }
    }
}

/// Where `GET /v1/route` finds edges.
pub enum RouteSource {
    /// Single node: this edge, unless it drains.
    Embedded {
        /// This edge's WebSocket URL.
        url: String,
    },
    /// Every edge's load report in Redis.
    Redis {
        /// The connection the reports are read over.
        cm: Conn,
        /// Chooses among the live edges.
        dispatcher: Mutex<Dispatcher>,
        /// Edges whose last report is older than this (ms) count as gone.
        max_age_ms: u64,
        /// The reports as last read (at most [`registry::CACHE_MS`] old).
        reports: registry::Cache,
        /// `roomcast_dispatch_answers_total{outcome}`: routed, or why not.
        answers: prometheus::IntCounterVec,
    },
}

/// The outcomes of `GET /v1/route` over Redis: an edge named, the reports unreadable, no
/// report at all, or reports whose edges were all draining, overloaded, full or silent.
const ROUTE_OUTCOMES: [&str; 4] = ["routed", "reports_unavailable", "no_edge_reported", "none_eligible"];

impl RouteSource {
    /// Dispatch over the load reports in the Redis behind `cm`; its answers are counted in
    /// `registry` (`roomcast_dispatch_answers_total`).
    ///
    /// # Panics
    ///
    /// If the family's name or help text were invalid: a bug any dispatch test catches.
    pub fn redis(cm: Conn, registry: &prometheus::Registry) -> Self {
        let answers = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "dispatch_answers_total",
                "GET /v1/route answers from the load reports in Redis, by outcome: routed, reports_unavailable (Redis did not answer), no_edge_reported, none_eligible (every edge draining, overloaded, full or its report too old; the 503 names each).",
            )
            .namespace("roomcast"),
            &["outcome"],
        )
        .expect("valid metric");
        for o in ROUTE_OUTCOMES {
            answers.with_label_values(&[o]);
        }
        // A second registration (a test building two sources on one registry) keeps the first.
        let _ = registry.register(Box::new(answers.clone()));
        RouteSource::Redis {
            cm,
            dispatcher: Mutex::new(Dispatcher::default()),
            max_age_ms: REPORT_MAX_AGE_MS,
            reports: registry::Cache::default(),
            answers,
        }
    }
}

/// Edges whose last load report is older than this count as gone (reports are written each
/// second with a TTL of as long).
pub const REPORT_MAX_AGE_MS: u64 = 3000;

/// The HTTP API: publish, room stats, route, admin drain, kernel view, dashboard, health, metrics and moderation.
pub fn router(state: AppState, max_body: usize) -> Router {
    let batch_bytes = state.batch.max_bytes;
    Router::new()
        .route("/v1/rooms/{room}/messages", post(publish))
        .route("/v1/messages", post(publish_batch).layer(DefaultBodyLimit::max(batch_bytes)))
        .route("/v1/rooms/{room}", get(room_stats))
        .route("/v1/route", get(route).options(route_options))
        .route("/v1/admin/drain", post(admin_drain))
        .route("/v1/kernel", get(kernel))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/uplot.js", get(dashboard_js))
        .route("/dashboard/uplot.css", get(dashboard_css))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(crate::moderation::api::routes())
        // Unknown paths and methods get a reason too, not an empty body.
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The bounds of `POST /v1/messages` (`ingest.max_batch`, `ingest.max_batch_bytes`), and of
/// each message in it (`ingest.max_body_bytes`, as for one message).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most messages in one batch.
    pub max_messages: usize,
    /// Largest batch body (413 above).
    pub max_bytes: usize,
    /// Largest message in a batch, as for `POST /v1/rooms/{room}/messages`.
    pub max_message_bytes: usize,
}

/// The query of `GET /v1/route`: the room the client means to join, if given.
#[derive(Deserialize)]
pub struct RouteQuery {
    room: Option<String>,
}

/// Answers with the WebSocket URL of the least-loaded healthy edge (never a draining or
/// expired one), with the room already in the query.
pub async fn route_answer(src: &RouteSource, draining: bool, overloaded: bool, room: Option<&str>) -> Response {
    if let Some(r) = room
        && let Err(why) = validate_room(r)
    {
        return error(StatusCode::BAD_REQUEST, format!("bad room: {why}"));
    }
    let (url, id) = match src {
        RouteSource::Embedded { url } => {
            if draining {
                return error(StatusCode::SERVICE_UNAVAILABLE, "no edge available: this edge is draining");
            }
            if overloaded {
                return error(StatusCode::SERVICE_UNAVAILABLE, "no edge available: this edge is overloaded");
            }
            (url.clone(), String::from("local"))
        }
        RouteSource::Redis { cm, dispatcher, max_age_ms, reports, answers } => {
            let count = |outcome: &str| answers.with_label_values(&[outcome]).inc();
            let edges = match reports.live(cm, *max_age_ms).await {
                Ok(e) => e,
                Err(e) => {
                    count("reports_unavailable");
                    return error(StatusCode::SERVICE_UNAVAILABLE, format!("load reports unavailable: {e}"));
                }
            };
            let now = crate::bus::now_us() / 1000;
            let (r1, r2) = (fastrand::f64(), fastrand::f64());
            let mut d = dispatcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match d.pick(&edges, now, *max_age_ms, r1, r2) {
                Some(e) => {
                    count("routed");
                    (e.ws_url.clone(), e.id.clone())
                }
                None if edges.is_empty() => {
                    count("no_edge_reported");
                    return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy edge available: no edge has reported");
                }
                None => {
                    count("none_eligible");
                    // Why each edge was passed over (the first few: ids are operators' names).
                    let why: Vec<String> = edges
                        .iter()
                        .take(8)
                        .map(|e| format!("{}: {}", e.id, d.why_not(e, now, *max_age_ms).unwrap_or_default()))
                        .collect();
                    let more = edges.len().saturating_sub(why.len());
                    let more = if more > 0 { format!("; {more} more") } else { String::new() };
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no healthy edge available: {}{more}", why.join("; ")),
                    );
                }
            }
        }
    };
    let sse = sse_url(&url);
    let with_room = |u: String| match room {
        Some(r) => format!("{u}?room={r}"),
        None => u,
    };
    let url = with_room(url);
    match sse {
        // The same edge's SSE fallback, for browsers whose network breaks the upgrade.
        Some(sse) if room.is_some() => {
            Json(serde_json::json!({ "url": url, "edge": id, "sse": with_room(sse) })).into_response()
        }
        _ => Json(serde_json::json!({ "url": url, "edge": id })).into_response(),
    }
}

/// The SSE endpoint beside an edge's WebSocket URL: `ws://H/P/ws` -> `http://H/P/sse` (`wss` ->
/// `https`). None for a URL that does not end in `/ws` (a proxy's own path: no guess).
pub(crate) fn sse_url(ws_url: &str) -> Option<String> {
    let (scheme, rest) = ws_url.split_once("://")?;
    let scheme = match scheme {
        "ws" => "http",
        "wss" => "https",
        _ => return None,
    };
    let base = rest.strip_suffix("/ws")?;
    Some(format!("{scheme}://{base}/sse"))
}

async fn route(
    State(st): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // A query that does not read (`room` twice) gets the API's JSON error, like any other.
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return with_cors(error(StatusCode::BAD_REQUEST, e.body_text()), &st.cors_origins, &headers);
        }
    };
    let overloaded = st.kernel.status() == EdgeHealth::Overloaded;
    let answer = route_answer(&st.route, st.draining.load(Ordering::Relaxed), overloaded, q.room.as_deref()).await;
    with_cors(answer, &st.cors_origins, &headers)
}

async fn route_options(State(st): State<AppState>, headers: HeaderMap) -> Response {
    route_preflight(&st.cors_origins, &headers)
}

/// CORS on the dispatch answer: a page served from the app's origin asks dispatch on the edge's
/// (goaway sends browsers there too). The origins allowed are those allowed to open a socket
/// (`ws.allowed_origins`; any when the list is empty, as for the upgrade); no credentials.
pub fn with_cors(mut answer: Response, allowed: &[String], headers: &HeaderMap) -> Response {
    let h = answer.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if allowed.is_empty() {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
        && crate::auth::origin_allowed(allowed, origin)
        && let Ok(v) = HeaderValue::from_str(origin)
    {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    answer
}

/// The preflight a browser sends when the app adds headers of its own to the route request.
pub fn route_preflight(allowed: &[String], headers: &HeaderMap) -> Response {
    let mut answer = StatusCode::NO_CONTENT.into_response();
    let h = answer.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    with_cors(answer, allowed, headers)
}

async fn admin_drain(State(st): State<AppState>, headers: HeaderMap, uri: axum::http::Uri, body: Bytes) -> Response {
    let refused = |reason: &str| {
        st.metrics.bus.admin_refused.with_label_values(&[reason]).inc();
        // A line per refusal, at most one a second (someone guessing the token would otherwise
        // write the log as fast as they guess); the count is on /metrics.
        static LOGGED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = crate::bus::now_us() / 1_000_000;
        if LOGGED_AT.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(reason, "admin request refused (roomcast_admin_refused_total counts each)");
        }
    };
    let Some(token) = &st.admin_token else {
        refused("disabled");
        return error(StatusCode::FORBIDDEN, "admin endpoints are disabled: set admin_token in the config");
    };
    if !bearer(&headers).is_some_and(|given| ct_eq(given.as_bytes(), token.expose().as_bytes())) {
        refused("unauthorized");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"roomcast\"")],
            Json(serde_json::json!({ "error": "missing or wrong bearer token" })),
        )
            .into_response();
    }
    // It takes no parameters: a query (`?period_ms=...`) would otherwise be ignored and the
    // drain started on the config's schedule while the operator believed they had set another.
    // Nor a body (`{"period_ms":5}` was taken and ignored alike); an empty one, or `{}` as
    // HTTP clients send by habit, is no parameter.
    let body = body.trim_ascii();
    if uri.query().is_some() || !(body.is_empty() || body == b"{}") {
        refused("parameters");
        return error(
            StatusCode::BAD_REQUEST,
            "this endpoint takes no parameters: a drain follows the config's [drain] (period_ms, deadline_ms); nothing was started",
        );
    }
    let already = st.draining.load(Ordering::Relaxed);
    st.leave_dispatch().await;
    let _ = st.drain.send(());
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "draining": true, "already": already }))).into_response()
}

/// The body of `POST /v1/rooms/{room}/messages`: `{"kind","user","body"}`, no other field.
///
/// Read in two steps, so that the key's permission for the kind is checked between them (a
/// publisher whose key may not publish a kind is told so before anything else about the body):
/// [`PublishRequest::parse`] (JSON and the kind's name), then [`PublishRequest::check_fields`]
/// (what the body may not hold, and the user). Pure: the fuzz target `publish_body` drives both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The message's kind (1 to 32 bytes of `[a-z0-9_]`).
    pub kind: String,
    /// The user the message is attributed to (at most 64 bytes, no control characters; may be empty).
    #[serde(default)]
    pub user: String,
    /// The body, the exact JSON text sent (validated JSON: a `RawValue` only holds that).
    pub body: Box<RawValue>,
}

/// Why a publish body was refused (400): the `reason` label of
/// `roomcast_publish_rejected_total` and the message for the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRefusal {
    /// Not JSON, or not the request's shape.
    Json(String),
    /// The kind's name is not 1 to 32 bytes of `[a-z0-9_]`.
    Kind(&'static str),
    /// The body holds what no message may (see `envelope::check_body`).
    Body(&'static str),
    /// The user is longer than 64 bytes or holds control characters.
    User(&'static str),
}

impl BodyRefusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Json(_) => "bad_json",
            Self::Kind(_) => "bad_kind",
            Self::Body(_) => "bad_body",
            Self::User(_) => "bad_user",
        }
    }

    /// The answer's error text.
    pub fn message(&self) -> String {
        match self {
            Self::Json(e) => format!("bad JSON: {e}"),
            Self::Kind(why) => format!("bad kind: {why}"),
            Self::Body(why) => format!("bad body: {why}"),
            Self::User(why) => format!("bad user: {why}"),
        }
    }
}

/// A request must be a JSON object: serde would also take a struct's fields as a positional
/// array (`["gift", "alice", 1]`), which the API does not promise and whose errors confuse.
fn object_only(bytes: &[u8]) -> Result<(), BodyRefusal> {
    match bytes.trim_ascii_start().first() {
        Some(b'{') => Ok(()),
        _ => Err(BodyRefusal::Json("expected a JSON object".into())),
    }
}

impl PublishRequest {
    /// Step one: the JSON and the kind's name.
    pub fn parse(bytes: &[u8]) -> Result<Self, BodyRefusal> {
        object_only(bytes)?;
        let req: Self = serde_json::from_slice(bytes).map_err(|e| BodyRefusal::Json(e.to_string()))?;
        validate_kind(&req.kind).map_err(BodyRefusal::Kind)?;
        Ok(req)
    }

    /// Step two: what the body may not hold ([`check_body`](roomcast_proto::envelope::check_body):
    /// nesting, numbers) and the user.
    pub fn check_fields(&self) -> Result<(), BodyRefusal> {
        roomcast_proto::envelope::check_body(self.body.get()).map_err(BodyRefusal::Body)?;
        if self.user.len() > MAX_USER_LEN {
            return Err(BodyRefusal::User("longer than 64 bytes"));
        }
        if self.user.chars().any(char::is_control) {
            return Err(BodyRefusal::User("control characters"));
        }
        Ok(())
    }
}

/// An error answer: `status` with the JSON body `{"error": reason}`.
pub fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

/// Takes the whole request rather than `Bytes` so that the key is checked before the body is
/// read: a caller without a key gets 401 whatever it sends, and costs no body buffering.
async fn publish(State(st): State<AppState>, Path(room): Path<String>, request: Request) -> Response {
    let started = Instant::now();
    let answer = publish_inner(&st, room, request).await;
    let outcome = if answer.status() == StatusCode::OK { "accepted" } else { "refused" };
    st.metrics.bus.publish_seconds.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
    answer
}

/// A body that could not be read: over its bound (413, naming the setting), or cut short (400).
/// Counted.
fn body_refused(
    st: &AppState,
    rejection: &axum::extract::rejection::BytesRejection,
    key: &str,
    limit: usize,
) -> Response {
    let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
    st.metrics.bus.publish_rejected.with_label_values(&[if too_large { "too_large" } else { "bad_body" }]).inc();
    if too_large {
        error(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {limit} bytes ({key})"))
    } else {
        error(rejection.status(), format!("cannot read the body: {}", rejection.body_text()))
    }
}

/// The caller's publish key (None: keys are off), or the refusal to answer (counted).
fn publish_key<'a>(st: &'a AppState, headers: &HeaderMap) -> Result<Option<&'a PublishKey>, KeyRefusal> {
    let refuse = |r: KeyRefusal| {
        st.metrics.bus.publish_rejected.with_label_values(&[r.reason()]).inc();
        r
    };
    match st.keys.authenticate(headers) {
        Ok(Some(k)) if !k.may_publish() => Err(refuse(KeyRefusal::Scope { key: k.name.clone(), scope: SCOPE_PUBLISH })),
        Ok(k) => Ok(k),
        Err(r) => Err(refuse(r)),
    }
}

async fn publish_inner(st: &AppState, room: String, request: Request) -> Response {
    let reject = |reason: &str| {
        st.metrics.bus.publish_rejected.with_label_values(&[reason]).inc();
    };
    let key = match publish_key(st, request.headers()) {
        Ok(k) => k,
        Err(refused) => return refused.into_response(),
    };
    if let Err(why) = validate_room(&room) {
        reject("bad_room");
        return error(StatusCode::BAD_REQUEST, format!("bad room: {why}"));
    }
    if let Some(k) = key
        && !k.allows_room(&room)
    {
        let r = KeyRefusal::Room { key: k.name.clone(), room };
        reject(r.reason());
        return r.into_response();
    }
    // Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): a retry with the same key
    // gets the first answer and publishes nothing. Keys are the publisher's own: with API keys,
    // one publisher's key never answers another's request (the key name goes in front).
    let idem = match request.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str().map_err(|_| "must be visible ASCII characters").and_then(|k| {
            crate::engine::idem::check_key(k)?;
            Ok(match key {
                Some(pk) => Box::<str>::from(format!("{}:{k}", pk.name)),
                None => Box::<str>::from(k),
            })
        }) {
            Ok(k) => Some(k),
            Err(why) => {
                reject("bad_idempotency_key");
                return error(StatusCode::BAD_REQUEST, format!("bad Idempotency-Key: {why}"));
            }
        },
    };
    let body = match Bytes::from_request(request, st).await {
        Ok(b) => b,
        Err(rejection) => {
            // Over ingest.max_body_bytes (413), or a body that could not be read.
            return body_refused(st, &rejection, "ingest.max_body_bytes", st.batch.max_message_bytes);
        }
    };
    let refused = |r: BodyRefusal| {
        reject(r.reason());
        error(StatusCode::BAD_REQUEST, r.message())
    };
    let req = match PublishRequest::parse(&body) {
        Ok(r) => r,
        Err(r) => return refused(r),
    };
    if let Some(k) = key
        && !k.allows_kind(&req.kind)
    {
        let r = KeyRefusal::Kind { key: k.name.clone(), kind: req.kind };
        reject(r.reason());
        return r.into_response();
    }
    if st.clients_only_kinds.contains(&req.kind) {
        reject("kind_clients_only");
        return error(StatusCode::FORBIDDEN, format!("kind {} is published by clients only", req.kind));
    }
    if let Err(r) = req.check_fields() {
        return refused(r);
    }
    let room: RoomName = RoomName::from(room.as_str());
    let msg = NewMessage { kind: req.kind, user: req.user, body: req.body.get().to_owned(), idem };
    match st.bus.publish(room.clone(), msg).await {
        Ok(ack) => {
            let body = Json(serde_json::json!({
                "room": &*room,
                "seq": ack.seq,
                "ts_us": ack.ts_us,
                "replayed": ack.replayed,
            }));
            if ack.replayed {
                ([(HeaderName::from_static("idempotent-replayed"), "true")], body).into_response()
            } else {
                body.into_response()
            }
        }
        Err(e) => publish_error(&e),
    }
}

/// Maps a refused publish to its HTTP answer. Over a limit is 429 with `Retry-After`, for both
/// classes of kinds: a droppable message was dropped (`"dropped": true`), a must-deliver one was
/// rejected and must be retried (`"dropped": false`); the status tells the publisher to slow
/// down either way, and the flag tells it whether retrying is worth it.
fn publish_error(e: &PublishError) -> Response {
    let (status, retry_after_s, body) = publish_refusal(e);
    match retry_after_s {
        Some(secs) => (status, [(header::RETRY_AFTER, secs.to_string())], Json(body)).into_response(),
        None => (status, Json(body)).into_response(),
    }
}

/// A refused publish's status, `Retry-After` (seconds) and JSON body: one message's answer,
/// or one entry of a batch's.
fn publish_refusal(e: &PublishError) -> (StatusCode, Option<u64>, serde_json::Value) {
    match e {
        PublishError::ShuttingDown | PublishError::TooManyRooms(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, None, serde_json::json!({ "error": e.to_string() }))
        }
        PublishError::Busy { retry_after_ms } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(retry_after_ms.div_ceil(1000).max(1)),
            serde_json::json!({ "error": e.to_string(), "dropped": false, "retry_after_ms": retry_after_ms }),
        ),
        PublishError::StoreFull => {
            (StatusCode::INSUFFICIENT_STORAGE, None, serde_json::json!({ "error": e.to_string(), "dropped": false }))
        }
        PublishError::BusUnavailable | PublishError::StoreUnavailable | PublishError::NotReplicated { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(1), serde_json::json!({ "error": e.to_string(), "dropped": false }))
        }
        PublishError::UnknownKind(_) => (StatusCode::BAD_REQUEST, None, serde_json::json!({ "error": e.to_string() })),
        PublishError::RateLimited { retry_after_ms, must_deliver, .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            Some(retry_after_ms.div_ceil(1000).max(1)),
            serde_json::json!({
                "error": e.to_string(),
                "dropped": !must_deliver,
                "retry_after_ms": retry_after_ms,
            }),
        ),
        PublishError::Sampled => (
            StatusCode::ACCEPTED,
            None,
            serde_json::json!({ "dropped": true, "reason": "sampled", "error": e.to_string() }),
        ),
    }
}

/// One message of a `POST /v1/messages` batch: [`PublishRequest`]'s fields, the room, and an
/// optional idempotency key (the `Idempotency-Key` header's, per message).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    room: String,
    kind: String,
    #[serde(default)]
    user: String,
    body: Box<RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// The body of `POST /v1/messages`: `{"messages": [..]}`. Each message is parsed on its own,
/// so that one malformed message is refused alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

/// `POST /v1/messages`: several messages, to any rooms, in one request. A back end that
/// publishes thousands of messages a second pays one request (and one wait) per batch instead
/// of one per message. Each message is checked as `POST /v1/rooms/{room}/messages` checks one
/// (key, room, kind, fields, rate limits, sampling) and answered on its own, in order:
/// `{"results": [{"status": 200, "room", "seq", "ts_us", "replayed"} | {"status": 4xx/5xx,
/// "error", ..}]}`. The request fails as a whole only for what concerns all of it: the key
/// (401/403 before the body is read), a body that is not `{"messages": [..]}` (400), too many
/// messages (400) or too many bytes (413).
async fn publish_batch(State(st): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let answer = publish_batch_inner(&st, request).await;
    st.metrics.bus.publish_seconds.with_label_values(&["batch"]).observe(started.elapsed().as_secs_f64());
    answer
}

async fn publish_batch_inner(st: &AppState, request: Request) -> Response {
    let reject = |reason: &str| {
        st.metrics.bus.publish_rejected.with_label_values(&[reason]).inc();
    };
    let key = match publish_key(st, request.headers()) {
        Ok(k) => k,
        Err(refused) => return refused.into_response(),
    };
    let body = match Bytes::from_request(request, st).await {
        Ok(b) => b,
        Err(rejection) => {
            return body_refused(st, &rejection, "ingest.max_batch_bytes", st.batch.max_bytes);
        }
    };
    let batch: BatchBody<'_> = match object_only(&body)
        .map_err(|r| r.message())
        .and_then(|()| serde_json::from_slice(&body).map_err(|e| format!("bad JSON: {e}")))
    {
        Ok(b) => b,
        Err(why) => {
            reject("bad_json");
            return error(StatusCode::BAD_REQUEST, format!("{why} (expected {{\"messages\": [..]}})"));
        }
    };
    if batch.messages.len() > st.batch.max_messages {
        reject("batch_too_large");
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} messages in one batch: at most {} (ingest.max_batch)",
                batch.messages.len(),
                st.batch.max_messages
            ),
        );
    }
    // Checked first, every one: the refused get their answer, the admitted go to the bus
    // together.
    let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(batch.messages.len());
    let mut admitted = Vec::new();
    for raw in &batch.messages {
        match admit(st, key, raw) {
            Ok(m) => {
                admitted.push(m);
                results.push(None);
            }
            Err((reason, status, mut v)) => {
                reject(reason);
                v["status"] = status.as_u16().into();
                results.push(Some(v));
            }
        }
    }
    let rooms: Vec<RoomName> = admitted.iter().map(|(room, _)| room.clone()).collect();
    let mut answers = st.bus.publish_many(admitted).await.into_iter().zip(rooms);
    for slot in &mut results {
        if slot.is_some() {
            continue;
        }
        let Some((answer, room)) = answers.next() else { break };
        *slot = Some(match answer {
            Ok(ack) => serde_json::json!({
                "status": 200,
                "room": &*room,
                "seq": ack.seq,
                "ts_us": ack.ts_us,
                "replayed": ack.replayed,
            }),
            Err(e) => {
                let (status, _, mut v) = publish_refusal(&e);
                v["status"] = status.as_u16().into();
                v
            }
        });
    }
    Json(serde_json::json!({ "results": results })).into_response()
}

/// Checks one message of a batch as the one-message endpoint checks its request; a refusal
/// is its metric reason, status and answer.
fn admit(
    st: &AppState,
    key: Option<&PublishKey>,
    raw: &RawValue,
) -> Result<(RoomName, NewMessage), (&'static str, StatusCode, serde_json::Value)> {
    let bad = |reason: &'static str, message: String| {
        Err((reason, StatusCode::BAD_REQUEST, serde_json::json!({ "error": message })))
    };
    if raw.get().len() > st.batch.max_message_bytes {
        return Err((
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({ "error": format!("message over {} bytes (ingest.max_body_bytes)", st.batch.max_message_bytes) }),
        ));
    }
    if let Err(r) = object_only(raw.get().as_bytes()) {
        return bad(r.reason(), r.message());
    }
    let item: BatchItem = match serde_json::from_str(raw.get()) {
        Ok(i) => i,
        Err(e) => return bad("bad_json", format!("bad JSON: {e}")),
    };
    if let Err(why) = validate_room(&item.room) {
        return bad("bad_room", format!("bad room: {why}"));
    }
    let key_refusal = |r: KeyRefusal| {
        let (status, _, message) = r.parts();
        Err((r.reason(), status, serde_json::json!({ "error": message, "reason": r.reason() })))
    };
    if let Some(k) = key
        && !k.allows_room(&item.room)
    {
        return key_refusal(KeyRefusal::Room { key: k.name.clone(), room: item.room });
    }
    let idem = match &item.idempotency_key {
        None => None,
        Some(k) => match crate::engine::idem::check_key(k) {
            Ok(()) => Some(match key {
                Some(pk) => Box::<str>::from(format!("{}:{k}", pk.name)),
                None => Box::<str>::from(k.as_str()),
            }),
            Err(why) => return bad("bad_idempotency_key", format!("bad idempotency_key: {why}")),
        },
    };
    let req = PublishRequest { kind: item.kind, user: item.user, body: item.body };
    if let Err(why) = validate_kind(&req.kind) {
        let r = BodyRefusal::Kind(why);
        return bad(r.reason(), r.message());
    }
    if let Some(k) = key
        && !k.allows_kind(&req.kind)
    {
        return key_refusal(KeyRefusal::Kind { key: k.name.clone(), kind: req.kind });
    }
    if st.clients_only_kinds.contains(&req.kind) {
        return Err((
            "kind_clients_only",
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": format!("kind {} is published by clients only", req.kind) }),
        ));
    }
    if let Err(r) = req.check_fields() {
        return bad(r.reason(), r.message());
    }
    let room = RoomName::from(item.room.as_str());
    Ok((room, NewMessage { kind: req.kind, user: req.user, body: req.body.get().to_owned(), idem }))
}

async fn room_stats(State(st): State<AppState>, Path(room): Path<String>) -> Response {
    if let Err(why) = validate_room(&room) {
        return error(StatusCode::BAD_REQUEST, format!("bad room: {why}"));
    }
    let local = st.bus.room_stats(RoomName::from(room.as_str())).await;
    let RouteSource::Redis { cm, .. } = &*st.route else {
        return match local {
            Some(stats) => Json(stats).into_response(),
            None => error(StatusCode::NOT_FOUND, "no such room"),
        };
    };
    // With a shared bus the room is the cluster's: its count over every edge (and each edge's
    // share) and, when no member is here, its numbering, from Redis.
    let mut cm = cm.clone();
    let now_ms = crate::bus::now_us() / 1000;
    let (online, edges) = match crate::bus::redis::online(&mut cm, &room, now_ms).await {
        Ok(o) => o,
        Err(e) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("the message bus (redis) is unavailable: {e}"));
        }
    };
    // Redis numbers the room: its seq and epoch are Redis's (an edge that only publishes to
    // a room, with no member of it, does not follow its numbering).
    let (seq, epoch) = match crate::bus::redis::room_meta(&mut cm, &room).await {
        Ok(Some((seq, epoch))) => (seq, epoch.parse::<u64>().map(crate::bus::epoch_text).unwrap_or(epoch)),
        Ok(None) if local.is_some() => (0, String::new()),
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such room"),
        Err(e) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("the message bus (redis) is unavailable: {e}"));
        }
    };
    let mut v = match local {
        Some(stats) => serde_json::to_value(stats).unwrap_or_default(),
        None => serde_json::json!({ "room": room, "members": 0 }),
    };
    if !epoch.is_empty() {
        v["seq"] = seq.into();
        v["epoch"] = epoch.into();
    }
    v["online"] = online.into();
    v["online_edges"] = edges.into_iter().map(|(edge, n)| (edge, serde_json::Value::from(n))).collect();
    Json(v).into_response()
}

/// The edge's health as a whole: the kernel policy's verdict, made `degraded` (with a reason)
/// while the store or the bus refuses publishes or the edge drains. One answer for /healthz,
/// /metrics (`roomcast_health`: what the alerts read), /v1/kernel and so the dashboard.
fn edge_health(st: &AppState) -> (HealthReport, &'static str, &'static str, bool) {
    let mut h = st.kernel.report();
    let draining = st.draining.load(Ordering::Relaxed);
    let store = st.store.as_ref().map_or("off", |s| s.state());
    let bus = match &*st.route {
        RouteSource::Redis { .. } if st.metrics.bus.bus_up.get() == 1 => "up",
        RouteSource::Redis { .. } => "down",
        RouteSource::Embedded { .. } => "embedded",
    };
    let mut degrade = |why: String| {
        // Members are still served; publishes are refused: say so.
        if h.status == EdgeHealth::Ok {
            h.status = EdgeHealth::Degraded;
        }
        h.reasons.push(why);
    };
    if store != "ok" && store != "off" {
        degrade(format!("store {store}: must-deliver publishes are refused"));
    }
    if bus == "down" {
        degrade("bus down: redis is unreachable, publishes are refused (503)".to_owned());
    }
    // With bus.min_replicas_acked = N (and Redis's min-replicas-to-write N, as the docs ask), a
    // primary with fewer than N replicas up acknowledges no gift and, with that Redis setting,
    // takes no write at all: its rooms' publishes get 503 and their first joins wait.
    let wanted = st.stream_limits.min_replicas_acked as usize;
    if wanted > 0 {
        let nodes = st.metrics.bus.redis_nodes.nodes();
        // On a cluster only primaries that serve slots count; Sentinel's master serves all.
        let cluster = nodes.iter().any(|n| n.slots > 0);
        for n in nodes {
            if n.role == "primary" && n.up && (n.slots > 0 || !cluster) && n.replicas < wanted {
                degrade(format!(
                    "redis primary {} has {} replicas up, fewer than bus.min_replicas_acked = {wanted}: publishes to its rooms are refused (503) until one is back",
                    n.node, n.replicas
                ));
            }
        }
    }
    if draining {
        degrade("draining: out of dispatch, sending goaway".to_owned());
    }
    // Outside its dates the certificate fails every new wss handshake that checks them (every
    // browser): members already connected stay, new ones cannot join, so dispatch should prefer
    // other edges. Degraded rather than overloaded: plain-HTTP work (publish, SSE over http)
    // still goes on, and the 503 of overloaded would take it out of a load balancer. Close to
    // expiry it still serves everyone: the WARN and the gauge are for that.
    if let Some(tls) = &st.tls {
        let v = tls.validity();
        match v.state(crate::tls::unix_now()) {
            crate::tls::CertState::Expired => degrade(format!(
                "tls.cert {} expired {}: new wss handshakes fail; install a new certificate and send SIGHUP",
                v.cert, v.not_after_text
            )),
            crate::tls::CertState::NotYetValid => degrade(format!(
                "tls.cert {} is not valid before {}: new wss handshakes fail",
                v.cert, v.not_before_text
            )),
            crate::tls::CertState::Valid | crate::tls::CertState::Expiring => {}
        }
    }
    (h, store, bus, draining)
}

/// Redis Cluster: every node as this edge last saw it (null on one Redis or alone).
fn redis_nodes(st: &AppState) -> serde_json::Value {
    let nodes = st.metrics.bus.redis_nodes.nodes();
    if nodes.is_empty() { serde_json::Value::Null } else { serde_json::to_value(nodes).unwrap_or_default() }
}

/// The certificate's file, dates and state for /healthz (null without TLS).
fn tls_cert(st: &AppState) -> serde_json::Value {
    let Some(tls) = &st.tls else { return serde_json::Value::Null };
    let (v, now) = (tls.validity(), crate::tls::unix_now());
    let state = match v.state(now) {
        crate::tls::CertState::Valid => "valid",
        crate::tls::CertState::Expiring => "expiring",
        crate::tls::CertState::Expired => "expired",
        crate::tls::CertState::NotYetValid => "not_yet_valid",
    };
    serde_json::json!({
        "file": v.cert,
        "not_before": v.not_before_text,
        "not_after": v.not_after_text,
        "expires_in_s": v.expires_in_s(now),
        "state": state,
    })
}

/// Readiness: 200 while `ok` or `degraded`, 503 while `overloaded` or `draining` (send no new
/// clients), with the reasons either way.
async fn healthz(State(st): State<AppState>) -> Response {
    let (h, store, bus, draining) = edge_health(&st);
    // Readiness: send this edge no new clients while it is overloaded or draining.
    let code =
        if h.status == EdgeHealth::Overloaded || draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    // A draining edge is leaving whatever the policy says: its 503 is for that, and the status
    // says so (it said `degraded`, which a reader takes for a problem to look into).
    let status = if draining { "draining" } else { level_name(h.status) };
    let body = Json(serde_json::json!({
        "status": status,
        "store": store,
        "bus": bus,
        "redis_nodes": redis_nodes(&st),
        "reasons": h.reasons,
        "probes": h.source.unwrap_or("none"),
        "draining": draining,
        "shards": st.shards,
        "connections": st.metrics.connections(),
        "sse_connections": st.metrics.sse_connections(),
        "uptime_s": st.started.elapsed().as_secs(),
        "tls_cert": tls_cert(&st),
    }));
    (code, body).into_response()
}

/// The latest kernel snapshot and health verdict, for dashboards and `edge top`.
async fn kernel(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({
        "health": edge_health(&st).0,
        "snapshot": st.kernel.snapshot().as_deref(),
        "delivery": st.metrics.delivery(),
        "connections": st.metrics.connections(),
        "totals": st.metrics.totals(),
        "top_rooms": st.bus.top_rooms(5).await,
        "draining": st.draining.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard/index.html")).into_response()
}

/// uPlot (MIT, vendored in edge/src/dashboard/): the dashboard's charts, from the binary.
async fn dashboard_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=86400")],
        include_str!("dashboard/uplot.iife.min.js"),
    )
        .into_response()
}

async fn dashboard_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=86400")],
        include_str!("dashboard/uplot.min.css"),
    )
        .into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut out = String::with_capacity(16384);
    let cert = st.tls.as_ref().map(|t| t.validity());
    st.metrics.render(&st.kernel, &edge_health(&st).0, cert.as_deref(), &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

// ---------------------------------------------------------------------------------------------
// Publish API keys

/// Environment variable with more publish keys, unrestricted: `name1:key1,name2:key2` (for
/// container deployments, where a secret arrives as an environment variable).
pub const API_KEYS_ENV: &str = "ROOMCAST_API_KEYS";

/// Shortest key accepted, as for `admin_token`.
pub const MIN_KEY_LEN: usize = 16;

/// Longest key name.
pub const MAX_KEY_NAME_LEN: usize = 64;

/// Compares a presented credential with a configured one. The time taken depends only on the
/// configured secret's length (the same for every request), never on where the two differ nor
/// on the presented length, so timing tells a caller nothing about the secret. `subtle`'s
/// `ConstantTimeEq` does the byte comparisons and keeps the result a `Choice` (no branch) until
/// the end (Cargo.toml says why that crate).
pub fn ct_eq(given: &[u8], secret: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let mut same = (given.len() as u64).ct_eq(&(secret.len() as u64));
    for (i, s) in secret.iter().enumerate() {
        same &= given.get(i).copied().unwrap_or(0).ct_eq(s);
    }
    bool::from(same)
}

/// The token of an `Authorization: Bearer TOKEN` header (RFC 6750 §2.1; the scheme is
/// case-insensitive). None when absent, repeated, not ASCII, another scheme, or no token.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return None;
    }
    Some(token)
}

/// Whether `addr` is a loopback address (127.0.0.0/8, ::1, or 127.x mapped into IPv6): only
/// processes on this machine can reach a server listening there.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// One publish key, resolved (`key_env` read) and checked.
pub struct PublishKey {
    /// The key's name, shown in answers and logs instead of its value.
    pub name: String,
    secret: Secret,
    /// Exact names, or prefixes ending in `*`; None: every room.
    rooms: Option<Vec<String>>,
    /// None: every kind.
    kinds: Option<Vec<String>>,
    /// Its scopes: the publish API, the moderation API.
    publish: bool,
    moderate: bool,
}

/// The scopes a key may carry (`[[ingest.keys]] scopes`).
pub const SCOPE_PUBLISH: &str = "publish";
/// The scope of the moderation API (kick, ban, delete).
pub const SCOPE_MODERATE: &str = "moderate";

impl PublishKey {
    /// Whether the key may use the publish API (scope `publish`).
    pub fn may_publish(&self) -> bool {
        self.publish
    }

    /// Whether the key may use the moderation API (scope `moderate`).
    pub fn may_moderate(&self) -> bool {
        self.moderate
    }

    /// Whether the key reaches every room (no `rooms` list): a user's disconnect touches them all.
    pub fn all_rooms(&self) -> bool {
        self.rooms.is_none()
    }

    /// Whether the key may publish to (or moderate) `room`.
    pub fn allows_room(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|pats| pats.iter().any(|p| crate::auth::room_matches(p, room)))
    }

    /// Whether the key may publish `kind`.
    pub fn allows_kind(&self, kind: &str) -> bool {
        self.kinds.as_ref().is_none_or(|ks| ks.iter().any(|k| k == kind))
    }
}

/// The publish API's keys: `[[ingest.keys]]` and `ROOMCAST_API_KEYS`. Empty: the publish API is
/// open (config validation allows that only on a loopback `http` address or with
/// `ingest.insecure_no_keys`). `Debug` shows the names only.
#[derive(Default)]
pub struct PublishKeys {
    keys: Vec<PublishKey>,
}

impl std::fmt::Debug for PublishKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishKeys").field("names", &self.names()).finish()
    }
}

/// Why a publish was refused for its key. The answer names the key, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No `Authorization: Bearer` header, or a malformed one.
    NoKey,
    /// A key that is not configured.
    BadKey,
    /// A known key, not for this room.
    Room {
        /// The key's name.
        key: String,
        /// The room asked for.
        room: String,
    },
    /// A known key, not for this kind.
    Kind {
        /// The key's name.
        key: String,
        /// The kind asked for.
        kind: String,
    },
    /// A known key without the scope this endpoint needs (`publish` or `moderate`).
    Scope {
        /// The key's name.
        key: String,
        /// The scope it lacks.
        scope: &'static str,
    },
    /// A moderator's key used outside its rooms (None: a disconnect, which reaches every room,
    /// by a key limited to some).
    ModerateRoom {
        /// The key's name.
        key: String,
        /// The room asked for (None: all of them).
        room: Option<String>,
    },
}

impl KeyRefusal {
    /// The `reason` label in `roomcast_publish_rejected_total` and the answer's body.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoKey => "no_key",
            Self::BadKey => "bad_key",
            Self::Room { .. } | Self::ModerateRoom { .. } => "key_room",
            Self::Kind { .. } => "key_kind",
            Self::Scope { .. } => "key_scope",
        }
    }
}

impl KeyRefusal {
    /// The status, the `WWW-Authenticate` challenge and the message: 401 for no key or an
    /// unknown one, 403 for a key used outside its rooms or kinds (RFC 6750 §3.1 error codes).
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::NoKey => (
                StatusCode::UNAUTHORIZED,
                "Bearer realm=\"roomcast\"",
                "missing or malformed Authorization header: send Authorization: Bearer KEY".to_owned(),
            ),
            Self::BadKey => (
                StatusCode::UNAUTHORIZED,
                "Bearer realm=\"roomcast\", error=\"invalid_token\"",
                "unknown key".to_owned(),
            ),
            Self::Room { key, room } => (
                StatusCode::FORBIDDEN,
                "Bearer realm=\"roomcast\", error=\"insufficient_scope\"",
                format!("key {key:?} may not publish to room {room:?}"),
            ),
            Self::Kind { key, kind } => (
                StatusCode::FORBIDDEN,
                "Bearer realm=\"roomcast\", error=\"insufficient_scope\"",
                format!("key {key:?} may not publish kind {kind:?}"),
            ),
            Self::ModerateRoom { key, room: Some(room) } => (
                StatusCode::FORBIDDEN,
                "Bearer realm=\"roomcast\", error=\"insufficient_scope\"",
                format!("key {key:?} may not moderate room {room:?}"),
            ),
            Self::ModerateRoom { key, room: None } => (
                StatusCode::FORBIDDEN,
                "Bearer realm=\"roomcast\", error=\"insufficient_scope\"",
                format!(
                    "key {key:?} is limited to some rooms: a disconnect reaches every room (use a key without rooms)"
                ),
            ),
            Self::Scope { key, scope } => (
                StatusCode::FORBIDDEN,
                "Bearer realm=\"roomcast\", error=\"insufficient_scope\"",
                format!("key {key:?} lacks the {scope:?} scope this endpoint needs"),
            ),
        }
    }
}

impl IntoResponse for KeyRefusal {
    /// [`KeyRefusal::parts`], with `WWW-Authenticate: Bearer` as RFC 7235 requires.
    fn into_response(self) -> Response {
        let (status, challenge, message) = self.parts();
        (
            status,
            [(header::WWW_AUTHENTICATE, challenge)],
            Json(serde_json::json!({ "error": message, "reason": self.reason() })),
        )
            .into_response()
    }
}

fn key_error(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

fn check_key_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_KEY_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_KEY_NAME_LEN} bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(format!("name {name:?} may only hold A-Z a-z 0-9 _ . -"));
    }
    Ok(())
}

/// A key must be sendable as a bearer token and not guessable; the message never quotes it.
fn check_secret(secret: &str) -> Result<(), &'static str> {
    if secret.len() < MIN_KEY_LEN {
        return Err("the key must be at least 16 characters");
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the key may only hold printable ASCII characters, no spaces");
    }
    Ok(())
}

fn check_room_pattern(p: &str) -> Result<(), String> {
    let (stem, prefix) = match p.strip_suffix('*') {
        Some(stem) => (stem, true),
        None => (p, false),
    };
    if prefix && stem.is_empty() {
        return Ok(());
    }
    validate_room(stem)
        .map_err(|why| format!("bad room pattern {p:?} ({why}; a pattern is a room name, or a prefix ending in *)"))
}

impl PublishKeys {
    /// Resolves and checks the keys of `cfg.ingest.keys` and `ROOMCAST_API_KEYS`, reading the
    /// process environment. `Config::validate` calls it, so `--check-config` reports every
    /// problem, naming the setting (`ingest.keys` or `ROOMCAST_API_KEYS`).
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        Self::from_config_env(cfg, &|name| std::env::var(name).ok())
    }

    /// As [`Self::from_config`], with `env` in place of the process environment.
    pub fn from_config_env(cfg: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for (i, k) in cfg.ingest.keys.iter().enumerate() {
            let bad = |m: String| key_error("ingest.keys", format!("entry {} ({:?}): {m}", i + 1, k.name));
            check_key_name(&k.name).map_err(bad)?;
            let secret = match (&k.key, &k.key_env) {
                (Some(s), None) => s.clone(),
                (None, Some(var)) => match env(var) {
                    Some(v) if !v.is_empty() => Secret::new(v),
                    _ => return Err(bad(format!("key_env: environment variable {var} is not set"))),
                },
                _ => return Err(bad("set exactly one of key and key_env".to_owned())),
            };
            check_secret(secret.expose()).map_err(|m| bad(m.to_owned()))?;
            if let Some(rooms) = &k.rooms {
                if rooms.is_empty() {
                    return Err(bad("rooms is empty: list rooms, or leave it out for every room".to_owned()));
                }
                for p in rooms {
                    check_room_pattern(p).map_err(bad)?;
                }
            }
            if let Some(kinds) = &k.kinds {
                if kinds.is_empty() {
                    return Err(bad("kinds is empty: list kinds, or leave it out for every kind".to_owned()));
                }
                for kind in kinds {
                    if !cfg.kinds.contains_key(kind) {
                        return Err(bad(format!("kinds: {kind:?} is not a configured kind")));
                    }
                }
            }
            let (publish, moderate) = match &k.scopes {
                None => (true, false),
                Some(scopes) => {
                    if scopes.is_empty() {
                        return Err(bad(format!(
                            "scopes is empty: list {SCOPE_PUBLISH:?} and/or {SCOPE_MODERATE:?}, or leave it out for publish only"
                        )));
                    }
                    if let Some(other) = scopes.iter().find(|s| *s != SCOPE_PUBLISH && *s != SCOPE_MODERATE) {
                        return Err(bad(format!(
                            "scopes: unknown scope {other:?} (known: {SCOPE_PUBLISH:?}, {SCOPE_MODERATE:?})"
                        )));
                    }
                    (scopes.iter().any(|s| s == SCOPE_PUBLISH), scopes.iter().any(|s| s == SCOPE_MODERATE))
                }
            };
            keys.push(PublishKey {
                name: k.name.clone(),
                secret,
                rooms: k.rooms.clone(),
                kinds: k.kinds.clone(),
                publish,
                moderate,
            });
        }
        if let Some(list) = env(API_KEYS_ENV) {
            let entries = list.split(',').map(str::trim).filter(|e| !e.is_empty());
            for (j, entry) in entries.enumerate() {
                // Never quote the entry: it holds a key.
                let bad = |m: &str| key_error(API_KEYS_ENV, format!("entry {}: {m}", j + 1));
                let Some((name, secret)) = entry.split_once(':') else {
                    return Err(bad("not name:key"));
                };
                check_key_name(name).map_err(|m| bad(&m))?;
                check_secret(secret).map_err(bad)?;
                // Publish only: moderation needs a key from the config, with its scope said
                // there, or the admin token.
                keys.push(PublishKey {
                    name: name.to_owned(),
                    secret: Secret::new(secret),
                    rooms: None,
                    kinds: None,
                    publish: true,
                    moderate: false,
                });
            }
        }
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[..i] {
                if a.name == b.name {
                    return Err(key_error("ingest.keys", format!("key name {:?} is used twice", a.name)));
                }
                if a.secret.expose() == b.secret.expose() {
                    return Err(key_error(
                        "ingest.keys",
                        format!("keys {:?} and {:?} are the same key: give each holder its own", b.name, a.name),
                    ));
                }
            }
        }
        if keys.is_empty() && !cfg.ingest.insecure_no_keys && !is_loopback(cfg.http) {
            return Err(key_error(
                "ingest.keys",
                format!(
                    "no publish key, and http = {} is not a loopback address, so anyone who reaches it could \
                     publish: configure [[ingest.keys]] (or {API_KEYS_ENV}), serve the API on 127.0.0.1, or set \
                     ingest.insecure_no_keys = true",
                    cfg.http
                ),
            ));
        }
        Ok(Self { keys })
    }

    /// True when no key is configured: the publish API is open.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The keys' names (never their values), for logs and Debug.
    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// The key a request presents. `Ok(None)` when no key is configured (open API); otherwise
    /// the matching key, or why not. Every configured key is compared, in constant time and
    /// without stopping at a match, so timing does not tell which key (or how many) matched.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&PublishKey>, KeyRefusal> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let given = bearer(headers).ok_or(KeyRefusal::NoKey)?;
        self.find(given).map(Some).ok_or(KeyRefusal::BadKey)
    }

    /// The configured key equal to `given`, comparing every key in constant time without
    /// stopping at a match.
    pub fn find(&self, given: &str) -> Option<&PublishKey> {
        let mut found = None;
        for k in &self.keys {
            if ct_eq(given.as_bytes(), k.secret.expose().as_bytes()) {
                found = Some(k);
            }
        }
        found
    }

    /// Says at start-up, once, how the publish API is protected: the key names (never the
    /// keys), or a WARN when it is open.
    pub fn log_mode(&self, cfg: &Config, bound: SocketAddr) {
        if !self.is_empty() {
            tracing::info!(keys = ?self.names(), "publish API: Authorization: Bearer KEY required");
        } else if is_loopback(bound) {
            tracing::warn!(
                http = %bound,
                "publish API has no keys: any local process can publish (loopback only); \
                 configure [[ingest.keys]] or {API_KEYS_ENV}"
            );
        } else {
            debug_assert!(cfg.ingest.insecure_no_keys, "validation refuses this");
            tracing::warn!(
                http = %bound,
                "INSECURE: publish API has no keys and listens on a non-loopback address \
                 (ingest.insecure_no_keys = true): anyone who reaches {bound} can publish to any room"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const K1: &str = "k1-0123456789abcdef";
    const K2: &str = "k2-0123456789abcdef";

    fn cfg(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    #[test]
    fn sse_urls_sit_beside_the_websocket_url() {
        assert_eq!(sse_url("ws://10.0.0.7:8080/ws").as_deref(), Some("http://10.0.0.7:8080/sse"));
        assert_eq!(sse_url("wss://live.example/edge-7/ws").as_deref(), Some("https://live.example/edge-7/sse"));
        assert_eq!(sse_url("wss://live.example/socket"), None);
        assert_eq!(sse_url("http://x/ws"), None);
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The publish body's checks, with the label and message each refusal answers with; `1e400`
    /// was found by the fuzz target `publish_body` (JSON, but not a number serde_json or Go
    /// will read, so it broke the batch it travelled in for clients that read bodies).
    #[test]
    fn publish_bodies_are_read_and_checked() {
        let read = |b: &str| PublishRequest::parse(b.as_bytes()).and_then(|r| r.check_fields().map(|()| r));
        let r = read(r#"{"kind":"gift","user":"al","body": {"n": 12345678901234567890123}}"#).unwrap();
        assert_eq!(
            (r.kind.as_str(), r.user.as_str(), r.body.get()),
            ("gift", "al", r#"{"n": 12345678901234567890123}"#)
        );
        assert_eq!(read(r#"{"kind":"chat","body":1}"#).unwrap().user, "");
        let refused = |b: &str| {
            let e = read(b).unwrap_err();
            (e.reason(), e.message())
        };
        assert_eq!(refused(r#"{"kind":"chat"}"#).0, "bad_json");
        assert_eq!(refused(r#"{"kind":"chat","body":1,"room":"x"}"#).0, "bad_json");
        assert_eq!(
            refused(r#"{"kind":"Chat","body":1}"#),
            ("bad_kind", "bad kind: kind may only hold a-z 0-9 _".into())
        );
        let deep = format!(r#"{{"kind":"chat","body":{}{}}}"#, "[".repeat(33), "]".repeat(33));
        assert_eq!(refused(&deep), ("bad_body", "bad body: body nested deeper than 32 levels".into()));
        for number in ["1e400", "-2E+308", "[1,{\"a\":9e999}]"] {
            assert_eq!(refused(&format!(r#"{{"kind":"chat","body":{number}}}"#)).0, "bad_body", "{number}");
        }
        assert_eq!(refused(&format!(r#"{{"kind":"chat","user":"{}","body":1}}"#, "u".repeat(65))).0, "bad_user");
        assert_eq!(
            refused(r#"{"kind":"chat","user":"a\u0000","body":1}"#),
            ("bad_user", "bad user: control characters".into())
        );
    }

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn err(c: &Config, env: &dyn Fn(&str) -> Option<String>) -> String {
        PublishKeys::from_config_env(c, env).unwrap_err().to_string()
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(ct_eq(b"abcdefgh", b"abcdefgh"));
        assert!(!ct_eq(b"abcdefgh", b"abcdefgX"));
        assert!(!ct_eq(b"abcdefg", b"abcdefgh"));
        assert!(!ct_eq(b"abcdefgh\0", b"abcdefgh"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(&auth("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&auth("bearer  abc")), Some("abc"));
        assert_eq!(bearer(&auth("Basic abc")), None);
        assert_eq!(bearer(&auth("Bearer")), None);
        assert_eq!(bearer(&auth("Bearer ")), None);
        assert_eq!(bearer(&auth("Bearer a b")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
        let mut two = auth("Bearer abc");
        two.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer def"));
        assert_eq!(bearer(&two), None);
    }

    #[test]
    fn loopback_addresses() {
        for a in ["127.0.0.1:1", "127.9.8.7:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert!(is_loopback(a.parse().unwrap()), "{a}");
        }
        for a in ["0.0.0.0:1", "10.0.0.1:1", "[::]:1", "[::ffff:10.0.0.1]:1"] {
            assert!(!is_loopback(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn keys_restrict_rooms_and_kinds() {
        let c = cfg(&format!(
            "[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nrooms = [\"a*\", \"lobby\"]\nkinds = [\"chat\"]\n\
             [[ingest.keys]]\nname = \"all\"\nkey = \"{K2}\"\n"
        ));
        let keys = PublishKeys::from_config_env(&c, &no_env).unwrap();
        let a = keys.authenticate(&auth(&format!("Bearer {K1}"))).unwrap().unwrap();
        assert_eq!(a.name, "a");
        assert!(a.allows_room("a") && a.allows_room("a1") && a.allows_room("lobby"));
        assert!(!a.allows_room("b") && !a.allows_room("lobby2") && !a.allows_room("ba"));
        assert!(a.allows_kind("chat") && !a.allows_kind("gift"));
        let all = keys.authenticate(&auth(&format!("Bearer {K2}"))).unwrap().unwrap();
        assert!(all.allows_room("b") && all.allows_kind("gift"));
        assert_eq!(keys.authenticate(&HeaderMap::new()).err(), Some(KeyRefusal::NoKey));
        assert_eq!(keys.authenticate(&auth("Token x")).err(), Some(KeyRefusal::NoKey));
        assert_eq!(keys.authenticate(&auth(&format!("Bearer {K1}x"))).err(), Some(KeyRefusal::BadKey));
        assert_eq!(keys.authenticate(&auth(&format!("Bearer {}", &K1[1..]))).err(), Some(KeyRefusal::BadKey));
    }

    /// Scopes: `publish` by default, `moderate` on request; an unknown or empty list is a
    /// configuration error naming the key; environment keys publish only.
    #[test]
    fn scopes_say_what_a_key_may_do() {
        let c = cfg(&format!(
            "[[ingest.keys]]\nname = \"pub\"\nkey = \"{K1}\"\n\
             [[ingest.keys]]\nname = \"mod\"\nkey = \"{K2}\"\nscopes = [\"moderate\"]\nrooms = [\"show-*\"]\n"
        ));
        let env = |n: &str| (n == API_KEYS_ENV).then(|| "ops:ops-0123456789abcdef".to_owned());
        let keys = PublishKeys::from_config_env(&c, &env).unwrap();
        let p = keys.find(K1).unwrap();
        assert!(p.may_publish() && !p.may_moderate() && p.all_rooms());
        let m = keys.find(K2).unwrap();
        assert!(!m.may_publish() && m.may_moderate() && !m.all_rooms() && m.allows_room("show-1"));
        let ops = keys.find("ops-0123456789abcdef").unwrap();
        assert!(ops.may_publish() && !ops.may_moderate());
        assert!(keys.find("nope-0123456789abcdef").is_none());
        for bad in ["[]", "[\"admin\"]"] {
            let c = cfg(&format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nscopes = {bad}\n"));
            let e = err(&c, &no_env);
            assert!(e.starts_with("ingest.keys:") && e.contains("scope"), "{e}");
        }
        let both =
            cfg(&format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nscopes = [\"publish\", \"moderate\"]\n"));
        let k = PublishKeys::from_config_env(&both, &no_env).unwrap();
        assert!(k.find(K1).is_some_and(|k| k.may_publish() && k.may_moderate()));
        let r = KeyRefusal::Scope { key: "pub".into(), scope: SCOPE_MODERATE };
        assert_eq!(r.reason(), "key_scope");
        assert_eq!(r.into_response().status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn no_keys_is_open_on_loopback_only() {
        let keys = PublishKeys::from_config_env(&Config::default(), &no_env).unwrap();
        assert!(keys.is_empty());
        assert!(keys.authenticate(&HeaderMap::new()).unwrap().is_none());
        let c = cfg("http = \"[::1]:8081\"\n");
        assert!(PublishKeys::from_config_env(&c, &no_env).unwrap().is_empty());
        let c = cfg("http = \"0.0.0.0:8081\"\n");
        let e = err(&c, &no_env);
        assert!(e.starts_with("ingest.keys:") && e.contains("insecure_no_keys"), "{e}");
        assert!(c.validate().is_err() || std::env::var(API_KEYS_ENV).is_ok());
        let c = cfg("http = \"0.0.0.0:8081\"\n[ingest]\ninsecure_no_keys = true\n");
        assert!(PublishKeys::from_config_env(&c, &no_env).unwrap().is_empty());
        let c = cfg(&format!("http = \"0.0.0.0:8081\"\n[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\n"));
        assert_eq!(PublishKeys::from_config_env(&c, &no_env).unwrap().len(), 1);
    }

    #[test]
    fn environment_keys() {
        let env = |n: &str| match n {
            API_KEYS_ENV => Some(format!(" one:{K1}, two:{K2}:more ,")),
            "PUB_KEY" => Some("env-0123456789abcdef".to_owned()),
            _ => None,
        };
        let c = cfg("http = \"0.0.0.0:8081\"\n[[ingest.keys]]\nname = \"f\"\nkey_env = \"PUB_KEY\"\nrooms = [\"x\"]\n");
        let keys = PublishKeys::from_config_env(&c, &env).unwrap();
        assert_eq!(keys.names(), ["f", "one", "two"]);
        assert_eq!(keys.authenticate(&auth("Bearer env-0123456789abcdef")).unwrap().unwrap().name, "f");
        let one = keys.authenticate(&auth(&format!("Bearer {K1}"))).unwrap().unwrap();
        assert!(one.allows_room("anything") && one.allows_kind("gift"));
        let two = keys.authenticate(&auth(&format!("Bearer {K2}:more"))).unwrap().unwrap();
        assert_eq!(two.name, "two");
        // Only the environment's keys: not open.
        let only_env = |n: &str| (n == API_KEYS_ENV).then(|| format!("one:{K1}"));
        let c = cfg("http = \"0.0.0.0:8081\"\n");
        assert_eq!(PublishKeys::from_config_env(&c, &only_env).unwrap().len(), 1);
    }

    fn env_no_name(n: &str) -> Option<String> {
        (n == API_KEYS_ENV).then(|| K1.to_owned())
    }

    fn env_short(n: &str) -> Option<String> {
        (n == API_KEYS_ENV).then(|| "a:short-key".to_owned())
    }

    fn env_empty_name(n: &str) -> Option<String> {
        (n == API_KEYS_ENV).then(|| format!(":{K1}"))
    }

    #[test]
    fn bad_keys_are_refused_naming_the_setting_not_the_key() {
        let short = "short-key";
        type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
        let cases: Vec<(String, Env<'_>, &str)> = vec![
            (format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{short}\"\n"), &no_env, "ingest.keys:"),
            (format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nkey_env = \"X\"\n"), &no_env, "ingest.keys:"),
            ("[[ingest.keys]]\nname = \"a\"\n".to_owned(), &no_env, "ingest.keys:"),
            ("[[ingest.keys]]\nname = \"a\"\nkey_env = \"NOPE\"\n".to_owned(), &no_env, "ingest.keys:"),
            (format!("[[ingest.keys]]\nname = \"a b\"\nkey = \"{K1}\"\n"), &no_env, "ingest.keys:"),
            (format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nrooms = [\"a*b\"]\n"), &no_env, "ingest.keys:"),
            (format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nrooms = []\n"), &no_env, "ingest.keys:"),
            (format!("[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\nkinds = [\"tip\"]\n"), &no_env, "ingest.keys:"),
            (
                format!(
                    "[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\n[[ingest.keys]]\nname = \"a\"\nkey = \"{K2}\"\n"
                ),
                &no_env,
                "ingest.keys:",
            ),
            (
                format!(
                    "[[ingest.keys]]\nname = \"a\"\nkey = \"{K1}\"\n[[ingest.keys]]\nname = \"b\"\nkey = \"{K1}\"\n"
                ),
                &no_env,
                "ingest.keys:",
            ),
            (String::new(), &env_no_name, "ROOMCAST_API_KEYS:"),
            (String::new(), &env_short, "ROOMCAST_API_KEYS:"),
            (String::new(), &env_empty_name, "ROOMCAST_API_KEYS:"),
        ];
        for (toml, env, key) in cases {
            let e = err(&cfg(&toml), env);
            assert!(e.starts_with(key), "{toml:?}: {e}");
            assert!(!e.contains(K1) && !e.contains(short), "the key is never quoted: {e}");
        }
        assert!(Config::from_toml("[[ingest.keys]]\nname = \"a\"\nkey = \"x\"\nroom = [\"a\"]\n").is_err());
    }

    #[test]
    fn keys_and_admin_token_are_not_in_debug() {
        let c = cfg(&format!(
            "admin_token = \"admin-0123456789abcdef\"\n[[ingest.keys]]\nname = \"pub\"\nkey = \"{K1}\"\n\
             [[ingest.keys]]\nname = \"env\"\nkey_env = \"SOME_VAR\"\n"
        ));
        let env = |n: &str| match n {
            "SOME_VAR" => Some(K2.to_owned()),
            API_KEYS_ENV => Some("ops:ops-0123456789abcdef".to_owned()),
            _ => None,
        };
        let keys = PublishKeys::from_config_env(&c, &env).unwrap();
        for text in [format!("{c:?}"), format!("{c:#?}"), format!("{keys:?}"), format!("{:?}", c.ingest)] {
            for secret in [K1, K2, "admin-0123456789abcdef", "ops-0123456789abcdef"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        let text = format!("{c:?}");
        assert!(text.contains("\"pub\"") && text.contains("<redacted>") && text.contains("SOME_VAR"), "{text}");
        assert!(format!("{keys:?}").contains("ops"));
    }
}
