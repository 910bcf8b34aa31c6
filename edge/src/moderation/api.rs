//! The moderation API, on the publish API's port and runtime (docs/PROTOCOL.md, "Moderation"):
//!
//! - `POST /v1/users/{user}/disconnect`: close every connection of the user, on every edge
//!   (4002: clients do not reconnect on their own);
//! - `POST /v1/rooms/{room}/bans` `{"user","duration_s"}`: joins of the room refused for the
//!   user until then, and its connections there leave it; `GET` lists the room's bans;
//!   `DELETE /v1/rooms/{room}/bans/{user}` lifts one;
//! - `DELETE /v1/rooms/{room}/messages/{seq}`: a tombstone in the message's place in history
//!   and a live tombstone to members.
//!
//! Who may: a publish key with the `moderate` scope (within its `rooms`; a disconnect, which
//! reaches every room, needs a key without `rooms`), or the `admin_token`. With neither
//! configured the API is open, as the publish API is (loopback only, or
//! `ingest.insecure_no_keys`). Every refusal is counted (`roomcast_moderation_refused_total`).

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use bytes::Bytes;
use roomcast_proto::envelope::validate_room;
use serde::Deserialize;

use super::{BanError, check_user};
use crate::bus::redis::{self, BanOutcome, ModEvent};
use crate::bus::{DeleteError, PublishError, RoomName};
use crate::ingest::{AppState, KeyRefusal, RouteSource, SCOPE_MODERATE, bearer, ct_eq};

/// The moderation endpoints (kick, ban, delete), merged into the publish API's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/users/{user}/disconnect", post(disconnect))
        .route("/v1/rooms/{room}/bans", post(ban).get(list_bans))
        .route("/v1/rooms/{room}/bans/{user}", delete(unban))
        .route("/v1/rooms/{room}/messages/{seq}", delete(delete_message))
}

/// Who a request comes from (for the audit log line each action writes).
enum Who {
    /// No key and no admin token configured: open, as the publish API is.
    Open,
    Admin,
    Key(String),
}

impl Who {
    fn name(&self) -> &str {
        match self {
            Self::Open => "(open api)",
            Self::Admin => "admin_token",
            Self::Key(k) => k,
        }
    }
}

/// A refusal: counted by reason, answered with `{"error","reason"}`.
fn refuse(st: &AppState, status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    st.moderation.stats.refused.with_label_values(&[reason]).inc();
    (status, Json(serde_json::json!({ "error": message.into(), "reason": reason }))).into_response()
}

fn refuse_key(st: &AppState, r: KeyRefusal) -> Response {
    st.moderation.stats.refused.with_label_values(&[r.reason()]).inc();
    r.into_response()
}

/// The caller may moderate `room` (None: every room, as a disconnect needs).
/// The refusal is boxed: an answer is large, and the happy path should not carry its size.
fn authorize(st: &AppState, headers: &HeaderMap, room: Option<&str>) -> Result<Who, Box<Response>> {
    let admin = st.admin_token.as_ref();
    if st.keys.is_empty() && admin.is_none() {
        return Ok(Who::Open);
    }
    let Some(given) = bearer(headers) else { return Err(Box::new(refuse_key(st, KeyRefusal::NoKey))) };
    // Both compared in constant time, whichever matches.
    let is_admin = admin.is_some_and(|t| ct_eq(given.as_bytes(), t.expose().as_bytes()));
    let key = st.keys.find(given);
    if is_admin {
        return Ok(Who::Admin);
    }
    let Some(k) = key else { return Err(Box::new(refuse_key(st, KeyRefusal::BadKey))) };
    if !k.may_moderate() {
        return Err(Box::new(refuse_key(st, KeyRefusal::Scope { key: k.name.clone(), scope: SCOPE_MODERATE })));
    }
    let allowed = match room {
        Some(r) => k.allows_room(r),
        None => k.all_rooms(),
    };
    if !allowed {
        let r = KeyRefusal::ModerateRoom { key: k.name.clone(), room: room.map(str::to_owned) };
        return Err(Box::new(refuse_key(st, r)));
    }
    Ok(Who::Key(k.name.clone()))
}

/// Redis's connection, with a shared bus.
fn shared_bus(st: &AppState) -> Option<crate::bus::redis::Conn> {
    match &*st.route {
        RouteSource::Redis { cm, .. } => Some(cm.clone()),
        RouteSource::Embedded { .. } => None,
    }
}

fn now_ms() -> u64 {
    crate::bus::now_us() / 1000
}

fn bus_down(st: &AppState, e: &::redis::RedisError) -> Response {
    tracing::warn!(error = %e, "moderation: redis request failed");
    refuse(st, StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", "the message bus (redis) is unavailable; retry")
}

/// `POST /v1/users/{user}/disconnect`
async fn disconnect(State(st): State<AppState>, Path(user): Path<String>, headers: HeaderMap) -> Response {
    let who = match authorize(&st, &headers, None) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if let Err(why) = check_user(&user) {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad user: {why}"));
    }
    // Here first, then every other edge: a retry (after a 503) closes what is left.
    let closed = st.moderation.kick_local(&user).await;
    let edges = match shared_bus(&st) {
        Some(mut cm) => {
            let ev = ModEvent::Kick { user: user.clone(), from: st.moderation.origin.clone() };
            match redis::publish_event(&mut cm, &ev).await {
                Ok(n) => n,
                Err(e) => return bus_down(&st, &e),
            }
        }
        None => 1,
    };
    st.moderation.stats.actions.with_label_values(&["disconnect"]).inc();
    tracing::info!(by = who.name(), user = ?user, closed, edges, "moderation: disconnect");
    Json(serde_json::json!({ "user": user, "closed": closed, "edges": edges })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanRequest {
    user: String,
    duration_s: u64,
}

/// `POST /v1/rooms/{room}/bans` `{"user","duration_s"}`
async fn ban(State(st): State<AppState>, Path(room): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match authorize(&st, &headers, Some(&room)) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if let Err(why) = validate_room(&room) {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad room: {why}"));
    }
    let req: BanRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad JSON: {e}")),
    };
    if let Err(why) = check_user(&req.user) {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad user: {why}"));
    }
    if req.duration_s == 0 || req.duration_s > st.max_ban_s {
        let why = format!("bad duration_s: 1 to {} (moderation.max_ban_s)", st.max_ban_s);
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", why);
    }
    let now = now_ms();
    let until_ms = now + req.duration_s * 1000;
    let full = |st: &AppState, max: usize| {
        let why = format!("too many bans in force (moderation.max_bans = {max}): lift some or wait for them to expire");
        refuse(st, StatusCode::INSUFFICIENT_STORAGE, "bans_full", why)
    };
    let max = st.moderation.bans.max();
    // With a shared bus Redis holds the ban first (every edge, and edges that start later,
    // read it there); then this edge applies it.
    let edges = match shared_bus(&st) {
        Some(mut cm) => {
            let from = st.moderation.origin.clone();
            let ev = ModEvent::Ban { room: room.clone(), user: req.user.clone(), until_ms, from };
            match redis::ban(&mut cm, &ev, now, max).await {
                Ok(BanOutcome::Done { edges }) => edges,
                Ok(BanOutcome::Full) => return full(&st, max),
                Err(e) => return bus_down(&st, &e),
            }
        }
        None => 1,
    };
    let removed = match st.moderation.ban_local(&room, &req.user, until_ms, now).await {
        Ok(n) => n,
        Err(BanError::Full(_)) => return full(&st, max),
        Err(e) => return refuse(&st, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()),
    };
    st.moderation.stats.actions.with_label_values(&["ban"]).inc();
    tracing::info!(by = who.name(), room = %room, user = ?req.user, duration_s = req.duration_s, removed, "moderation: ban");
    Json(serde_json::json!({
        "room": room,
        "user": req.user,
        "until_ms": until_ms,
        "removed": removed,
        "edges": edges,
    }))
    .into_response()
}

/// `GET /v1/rooms/{room}/bans`: the room's bans in force.
async fn list_bans(State(st): State<AppState>, Path(room): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&st, &headers, Some(&room)) {
        return *r;
    }
    if let Err(why) = validate_room(&room) {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad room: {why}"));
    }
    let bans: Vec<serde_json::Value> = st
        .moderation
        .bans
        .list(Some(&room), now_ms())
        .into_iter()
        .map(|b| serde_json::json!({ "user": b.user, "until_ms": b.until_ms }))
        .collect();
    Json(serde_json::json!({ "room": room, "bans": bans })).into_response()
}

/// `DELETE /v1/rooms/{room}/bans/{user}`: lifts a ban (200 whether or not one was in force).
async fn unban(State(st): State<AppState>, Path((room, user)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let who = match authorize(&st, &headers, Some(&room)) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if let Err(why) =
        validate_room(&room).map_err(str::to_owned).and_then(|()| check_user(&user).map_err(str::to_owned))
    {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", why);
    }
    let now = now_ms();
    if let Some(mut cm) = shared_bus(&st) {
        let ev = ModEvent::Unban { room: room.clone(), user: user.clone(), from: st.moderation.origin.clone() };
        if let Err(e) = redis::unban(&mut cm, &ev).await {
            return bus_down(&st, &e);
        }
    }
    let lifted = match st.moderation.unban_local(&room, &user, now).await {
        Ok(l) => l,
        Err(e) => return refuse(&st, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()),
    };
    st.moderation.stats.actions.with_label_values(&["unban"]).inc();
    tracing::info!(by = who.name(), room = %room, user = ?user, lifted, "moderation: unban");
    Json(serde_json::json!({ "room": room, "user": user, "lifted": lifted })).into_response()
}

/// `DELETE /v1/rooms/{room}/messages/{seq}`
async fn delete_message(
    State(st): State<AppState>,
    Path((room, seq)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let who = match authorize(&st, &headers, Some(&room)) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if let Err(why) = validate_room(&room) {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", format!("bad room: {why}"));
    }
    let Ok(seq) = seq.parse::<u64>() else {
        return refuse(&st, StatusCode::BAD_REQUEST, "bad_request", "bad seq: not an unsigned integer");
    };
    let result = match shared_bus(&st) {
        Some(mut cm) => match redis::delete_message(&mut cm, &room, seq, st.stream_limits).await {
            Ok(r) => r,
            Err(e) => return bus_down(&st, &e),
        },
        None => st.bus.delete(RoomName::from(room.as_str()), seq).await,
    };
    let done = match result {
        Ok(d) => d,
        Err(DeleteError::NotFound) => {
            return refuse(&st, StatusCode::NOT_FOUND, "not_found", DeleteError::NotFound.to_string());
        }
        Err(DeleteError::Tombstone) => {
            return refuse(&st, StatusCode::CONFLICT, "not_deletable", DeleteError::Tombstone.to_string());
        }
        Err(DeleteError::Publish(e)) => return publish_refusal(&st, &e),
    };
    st.moderation.stats.actions.with_label_values(&["delete"]).inc();
    let tombstone_seq = done.tombstone.map(|a| a.seq);
    tracing::info!(by = who.name(), room = %room, seq, ?tombstone_seq, in_history = done.in_history, "moderation: delete");
    Json(serde_json::json!({
        "room": room,
        "seq": seq,
        "tombstone_seq": tombstone_seq,
        "already_deleted": done.tombstone.is_none(),
        "in_history": done.in_history,
    }))
    .into_response()
}

/// A delete the room's engine could not take (the same causes refuse publishes).
fn publish_refusal(st: &AppState, e: &PublishError) -> Response {
    let (status, reason) = match e {
        PublishError::BusUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable"),
        PublishError::StoreFull => (StatusCode::INSUFFICIENT_STORAGE, "store_unavailable"),
        PublishError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        PublishError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "engine_busy"),
    };
    let mut r = refuse(st, status, reason, e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}
