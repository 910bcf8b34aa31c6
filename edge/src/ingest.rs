//! The publish API and the operator endpoints, on their own tokio runtime and port, never on
//! the shards' threads: publishers use short HTTP connections, isolated from the push path.
//!
//! - `POST /v1/rooms/{room}/messages` `{"kind","user","body"}` -> `{"room","seq","ts_us"}`
//! - `GET /healthz`, `GET /metrics` (Prometheus text)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use roomcast_proto::envelope::{validate_kind, validate_room};
use serde::Deserialize;
use serde_json::value::RawValue;

use ::redis::aio::ConnectionManager;

use crate::bus::{BusHandle, NewMessage, PublishError, RoomName};
use crate::dispatch::{Dispatcher, EdgeHealth, registry};
use crate::health::{KernelView, level_name};
use crate::metrics::Metrics;

/// Longest `user` accepted.
pub const MAX_USER_LEN: usize = 64;

#[derive(Clone)]
pub struct AppState {
    pub bus: BusHandle,
    pub metrics: Arc<Metrics>,
    /// Kernel probes and health (crate::health).
    pub kernel: Arc<KernelView>,
    pub shards: usize,
    pub started: Instant,
    pub route: Arc<RouteSource>,
    /// Bearer token for admin endpoints (None: refused).
    pub admin_token: Option<String>,
    /// Asks the main thread to start a drain.
    pub drain: tokio::sync::mpsc::UnboundedSender<()>,
    pub draining: Arc<AtomicBool>,
    /// Asks the load reporter to publish now (None: no shared bus).
    pub report_now: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
}

impl AppState {
    /// Marks the edge draining and waits (bounded) until dispatch can see it.
    pub async fn leave_dispatch(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Some(tx) = &self.report_now {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(done).is_ok() {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await;
            }
        }
    }
}

/// Where `GET /v1/route` finds edges.
pub enum RouteSource {
    /// Single node: this edge, unless it drains.
    Embedded { url: String },
    /// Every edge's load report in Redis.
    Redis { cm: ConnectionManager, dispatcher: Mutex<Dispatcher>, max_age_ms: u64 },
}

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/rooms/{room}/messages", post(publish))
        .route("/v1/rooms/{room}", get(room_stats))
        .route("/v1/route", get(route))
        .route("/v1/admin/drain", post(admin_drain))
        .route("/v1/kernel", get(kernel))
        .route("/dashboard", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

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
        RouteSource::Redis { cm, dispatcher, max_age_ms } => {
            let now = crate::bus::now_us() / 1000;
            let mut cm = cm.clone();
            let edges = match registry::live(&mut cm, now, *max_age_ms).await {
                Ok(e) => e,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("load reports unavailable: {e}")),
            };
            let (r1, r2) = (rand01(), rand01());
            let mut d = dispatcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match d.pick(&edges, now, *max_age_ms, r1, r2) {
                Some(e) => (e.ws_url.clone(), e.id.clone()),
                None => return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy edge available"),
            }
        }
    };
    let url = match room {
        Some(r) => format!("{url}?room={r}"),
        None => url,
    };
    Json(serde_json::json!({ "url": url, "edge": id })).into_response()
}

fn rand01() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh SipHash key per call (std's RandomState): enough entropy to spread arrivals.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::bus::now_us());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn route(State(st): State<AppState>, Query(q): Query<RouteQuery>) -> Response {
    let overloaded = st.kernel.status() == EdgeHealth::Overloaded;
    route_answer(&st.route, st.draining.load(Ordering::Relaxed), overloaded, q.room.as_deref()).await
}

async fn admin_drain(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = &st.admin_token else {
        return error(StatusCode::FORBIDDEN, "admin endpoints are disabled: set admin_token in the config");
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(token.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let already = st.draining.load(Ordering::Relaxed);
    st.leave_dispatch().await;
    let _ = st.drain.send(());
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "draining": true, "already": already }))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    kind: String,
    #[serde(default)]
    user: String,
    body: Box<RawValue>,
}

pub fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": reason.into() }))).into_response()
}

async fn publish(State(st): State<AppState>, Path(room): Path<String>, body: Bytes) -> Response {
    let reject = |reason: &str| {
        st.metrics.bus.publish_rejected.with_label_values(&[reason]).inc();
    };
    if let Err(why) = validate_room(&room) {
        reject("bad_room");
        return error(StatusCode::BAD_REQUEST, format!("bad room: {why}"));
    }
    let req: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            reject("bad_json");
            return error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}"));
        }
    };
    if let Err(why) = validate_kind(&req.kind) {
        reject("bad_kind");
        return error(StatusCode::BAD_REQUEST, format!("bad kind: {why}"));
    }
    if req.user.len() > MAX_USER_LEN {
        reject("bad_user");
        return error(StatusCode::BAD_REQUEST, "bad user: longer than 64 bytes");
    }
    let room: RoomName = RoomName::from(room.as_str());
    let msg = NewMessage { kind: req.kind, user: req.user, body: req.body.get().to_owned() };
    match st.bus.publish(room.clone(), msg).await {
        Ok(ack) => Json(serde_json::json!({ "room": &*room, "seq": ack.seq, "ts_us": ack.ts_us })).into_response(),
        Err(e) => publish_error(&e),
    }
}

/// Maps a refused publish to its HTTP answer. Over a limit is 429 with `Retry-After`, for both
/// classes of kinds: a droppable message was dropped (`"dropped": true`), a must-deliver one was
/// rejected and must be retried (`"dropped": false`); the status tells the publisher to slow
/// down either way, and the flag tells it whether retrying is worth it.
fn publish_error(e: &PublishError) -> Response {
    match e {
        PublishError::ShuttingDown | PublishError::TooManyRooms(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        PublishError::Busy { retry_after_ms } => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, retry_after_ms.div_ceil(1000).max(1).to_string())],
            Json(serde_json::json!({ "error": e.to_string(), "dropped": false, "retry_after_ms": retry_after_ms })),
        )
            .into_response(),
        PublishError::BusUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1".to_owned())],
            Json(serde_json::json!({ "error": e.to_string(), "dropped": false })),
        )
            .into_response(),
        PublishError::UnknownKind(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        PublishError::RateLimited { retry_after_ms, must_deliver, .. } => {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(serde_json::json!({
                    "error": e.to_string(),
                    "dropped": !must_deliver,
                    "retry_after_ms": retry_after_ms,
                })),
            )
                .into_response()
        }
        PublishError::Sampled => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "dropped": true, "reason": "sampled", "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn room_stats(State(st): State<AppState>, Path(room): Path<String>) -> Response {
    if let Err(why) = validate_room(&room) {
        return error(StatusCode::BAD_REQUEST, format!("bad room: {why}"));
    }
    match st.bus.room_stats(RoomName::from(room.as_str())).await {
        Some(stats) => Json(stats).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such room"),
    }
}

/// 200 while `ok` or `degraded`, 503 while `overloaded` (a readiness answer: send no new
/// clients), with the policy's reasons either way.
async fn healthz(State(st): State<AppState>) -> Response {
    let h = st.kernel.report();
    let code = if h.status == EdgeHealth::Overloaded { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = Json(serde_json::json!({
        "status": level_name(h.status),
        "reasons": h.reasons,
        "probes": h.source.unwrap_or("none"),
        "draining": st.draining.load(Ordering::Relaxed),
        "shards": st.shards,
        "connections": st.metrics.connections(),
        "uptime_s": st.started.elapsed().as_secs(),
    }));
    (code, body).into_response()
}

/// The latest kernel snapshot and health verdict, for dashboards and `edge top`.
async fn kernel(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({
        "health": st.kernel.report(),
        "snapshot": st.kernel.snapshot().as_deref(),
        "connections": st.metrics.connections(),
        "draining": st.draining.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard.html")).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut out = String::with_capacity(16384);
    st.metrics.render(&st.kernel, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}
