//! The publish API and the operator endpoints, on their own tokio runtime and port, never on
//! the shards' threads: publishers use short HTTP connections, isolated from the push path.
//!
//! - `POST /v1/rooms/{room}/messages` `{"kind","user","body"}` -> `{"room","seq","ts_us"}`
//! - `GET /healthz`, `GET /metrics` (Prometheus text)

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use roomcast_proto::envelope::{validate_kind, validate_room};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bus::{BusHandle, NewMessage, PublishError, RoomName};
use crate::metrics::Metrics;

/// Longest `user` accepted.
pub const MAX_USER_LEN: usize = 64;

#[derive(Clone)]
pub struct AppState {
    pub bus: BusHandle,
    pub metrics: Arc<Metrics>,
    pub shards: usize,
    pub started: Instant,
}

pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/rooms/{room}/messages", post(publish))
        .route("/v1/rooms/{room}", get(room_stats))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    kind: String,
    #[serde(default)]
    user: String,
    body: Box<RawValue>,
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
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

async fn healthz(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "shards": st.shards,
        "connections": st.metrics.connections(),
        "uptime_s": st.started.elapsed().as_secs(),
    }))
    .into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut out = String::with_capacity(8192);
    st.metrics.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}
