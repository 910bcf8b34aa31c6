//! Moderation through the real edge: a user disconnected on every edge (close 4002, SSE too, and
//! the Rust client does not come back), a banned user refused on every join path (handshake,
//! `join`, SSE) on every edge until the ban is lifted or expires (and kept across a restart of
//! the single-node edge), a deleted message replaced by a tombstone (live, and in its place in
//! every `since` replay: single node with its store, and Redis), and who may do any of it.
//! Every test here fails without the moderation API (its endpoints answer 404).

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};
use roomcast_testsupport::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
/// A key with the `moderate` scope, for every room.
const MOD: &str = "moderator-0123456789abcdef";
/// A key with the `moderate` scope for `show-*` only.
const SHOW_MOD: &str = "showmod-0123456789abcdef";
/// A key with the default scope (`publish`) only.
const PUB: &str = "publisher-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";
const T: Duration = Duration::from_secs(10);

/// A config with tokens required, the three keys and the admin token, and a short drain (the
/// tests restart edges); `extra` is appended.
fn config_text(extra: &str) -> String {
    format!(
        "admin_token = \"{ADMIN}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
         [[ingest.keys]]\nname = \"mods\"\nkey = \"{MOD}\"\nscopes = [\"moderate\"]\n\
         [[ingest.keys]]\nname = \"showmods\"\nkey = \"{SHOW_MOD}\"\nscopes = [\"moderate\"]\nrooms = [\"show-*\"]\n\
         [[ingest.keys]]\nname = \"backend\"\nkey = \"{PUB}\"\n[drain]\nperiod_ms = 200\ndeadline_ms = 2000\n{extra}"
    )
}

fn edge_config(name: &str) -> String {
    config(name, &config_text(""))
}

fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = edge::auth::Claims { sub: sub.into(), exp: now + 3600, rooms: None, publish: None, nbf: None };
    edge::auth::sign_hs256(SECRET.as_bytes(), &claims).unwrap()
}

/// The HTTP API of one edge, with or without a key.
struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    fn new(e: &EdgeProc) -> Self {
        Self { c: reqwest::Client::new(), base: format!("http://{}", e.http) }
    }

    async fn call(&self, method: reqwest::Method, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut r = self.c.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            r = r.header("Authorization", format!("Bearer {k}"));
        }
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        let r = r.send().await.expect("http");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn kick(&self, user: &str, key: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::POST, &format!("/v1/users/{user}/disconnect"), key, None).await
    }

    async fn ban(&self, room: &str, user: &str, duration_s: u64, key: Option<&str>) -> (u16, Value) {
        let body = json!({ "user": user, "duration_s": duration_s });
        self.call(reqwest::Method::POST, &format!("/v1/rooms/{room}/bans"), key, Some(body)).await
    }

    async fn unban(&self, room: &str, user: &str, key: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, &format!("/v1/rooms/{room}/bans/{user}"), key, None).await
    }

    async fn delete(&self, room: &str, seq: u64, key: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, &format!("/v1/rooms/{room}/messages/{seq}"), key, None).await
    }

    /// Publishes with the publisher's key; returns the seq.
    async fn publish(&self, room: &str, kind: &str, body: Value) -> u64 {
        let req = json!({ "kind": kind, "user": "backend", "body": body });
        let (status, v) =
            self.call(reqwest::Method::POST, &format!("/v1/rooms/{room}/messages"), Some(PUB), Some(req)).await;
        assert_eq!(status, 200, "publish: {v}");
        v["seq"].as_u64().unwrap()
    }

    /// A metric summed over the label sets whose text contains `label`.
    async fn metric(&self, name: &str, label: &str) -> f64 {
        let (_, text) = self.call(reqwest::Method::GET, "/metrics", None, None).await;
        let text = text.as_str().unwrap_or_default().to_owned();
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The status of an upgrade attempt (101 when it is accepted).
async fn upgrade_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// Everything up to the close frame, and its code (None: no close frame).
async fn until_close(ws: &mut Ws) -> (Vec<ServerMsg>, Option<u16>) {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => got.push(envelope::decode_json(t.as_bytes()).unwrap()),
            Ok(Some(Ok(Message::Binary(b)))) => got.push(envelope::decode_rkyv(&b).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => return (got, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (got, None),
            Err(elapsed) => panic!("no close within {T:?} ({elapsed}); got {got:?}"),
        }
    }
}

/// The next message that is not a batch of room traffic nor an online count.
async fn next_signal(ws: &mut Ws) -> ServerMsg {
    loop {
        match next_msg_within(ws, T).await {
            Some(ServerMsg::Batch { .. }) => {}
            Some(m) => return m,
            None => panic!("connection ended"),
        }
    }
}

/// Messages until one with `seq` arrives (batches only).
async fn messages_upto(ws: &mut Ws, seq: u64) -> Vec<PushMessage> {
    let mut got: Vec<PushMessage> = Vec::new();
    while got.last().is_none_or(|m| m.seq < seq) {
        match next_msg_within(ws, T).await {
            Some(ServerMsg::Batch { messages, .. }) => got.extend(messages),
            Some(ServerMsg::Gap { from, to, .. }) => panic!("no gap expected, got {from}..={to} after {got:?}"),
            Some(_) => {}
            None => panic!("no message {seq}; got {got:?}"),
        }
    }
    got
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// An SSE client (the WHATWG parser over reqwest), or the refusal's status.
async fn sse(url: &str) -> Result<Events, u16> {
    let r = reqwest::Client::new().get(url).header("Accept", "text/event-stream").send().await.expect("http");
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    Ok(Box::pin(r.bytes_stream().eventsource()))
}

/// The envelopes of an SSE stream until it ends.
async fn sse_until_end(events: &mut Events) -> Vec<ServerMsg> {
    let mut got = Vec::new();
    let fut = async {
        while let Some(Ok(ev)) = events.next().await {
            got.push(envelope::decode_json(ev.data.as_bytes()).unwrap());
        }
    };
    assert!(tokio::time::timeout(T, fut).await.is_ok(), "the stream did not end");
    got
}

async fn sse_joined(events: &mut Events) {
    let ev = tokio::time::timeout(T, events.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(envelope::decode_json(ev.data.as_bytes()).unwrap(), ServerMsg::Joined { .. }), "{}", ev.data);
}

fn is_error(m: &ServerMsg, want: &str) -> bool {
    matches!(m, ServerMsg::Error { code, .. } if code == want)
}

/// The shared bus of a test: one real Redis, or a real Redis Cluster.
enum Shared {
    One(RedisProc),
    Cluster(RedisCluster),
}

impl Shared {
    /// One Redis, or a cluster of 3 primaries (`replicas` each).
    fn start(cluster: bool, replicas: usize) -> Self {
        if cluster { Self::Cluster(RedisCluster::start(3, replicas)) } else { Self::One(RedisProc::start()) }
    }

    fn url(&self) -> String {
        match self {
            Self::One(r) => r.url(),
            Self::Cluster(c) => c.url(),
        }
    }

    /// Waits until `n` edges are subscribed to the moderation channel (the bus being up comes
    /// first: the subscription follows within a tick).
    async fn on_mod_channel(&self, n: u64) {
        let (port, args) = match self {
            Self::One(r) => (r.port, vec!["PUBSUB", "NUMSUB", edge::bus::redis::MOD_CHANNEL]),
            Self::Cluster(c) => {
                let slot = edge::bus::slots::slot_of(edge::bus::redis::MOD_ROOM.as_bytes());
                (c.owner_of(slot), vec!["PUBSUB", "SHARDNUMSUB", "rc:{#mod}:ch"])
            }
        };
        let counted = wait_until(T, || {
            let out = redis_cli(port, &args);
            async move { out.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()) == Some(n) }
        })
        .await;
        assert!(counted, "{n} edges on the moderation channel");
    }
}

/// Two edges on one real Redis or a Redis Cluster, with the bus up on both (the moderation
/// channel is subscribed).
fn two_edges(name: &str, cluster: bool) -> (Shared, EdgeProc, EdgeProc) {
    let redis = Shared::start(cluster, 0);
    let a = redis_edge(&redis, &format!("{name}-a"));
    let b = redis_edge(&redis, &format!("{name}-b"));
    (redis, a, b)
}

fn redis_edge(redis: &Shared, name: &str) -> EdgeProc {
    let cfg = edge_config(name);
    let url = redis.url();
    EdgeProc::start(&["--shards", "2", "--merge-window-ms", "10", "--bus", url.as_str(), "--config", cfg.as_str()])
}

async fn bus_up(e: &EdgeProc) {
    let api = Api::new(e);
    let up = wait_until(T, || async { api.metric("roomcast_bus_up", "").await == 1.0 }).await;
    assert!(up, "the edge's bus is up");
}

/// A disconnect closes every connection of the user on every edge, WebSocket (`error` `kicked`,
/// then 4002) and SSE (the event, then the end), whatever room they are in or none; other
/// users stay. The Rust client takes 4002 as "do not come back". Failed before: 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_closes_every_connection_of_the_user_on_every_edge() {
    Box::pin(disconnect_on_every_edge(false)).await;
}

/// The same on a Redis Cluster (sharded pub/sub): failed before with 501 `cluster_unsupported`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_closes_every_connection_of_the_user_on_every_edge_of_a_cluster() {
    Box::pin(disconnect_on_every_edge(true)).await;
}

async fn disconnect_on_every_edge(cluster: bool) {
    let (redis, a, b) = two_edges("kick", cluster);
    bus_up(&a).await;
    bus_up(&b).await;
    redis.on_mod_channel(2).await;
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    let alice = token("alice");
    let mut in_room_a = connect(&a.url(&format!("?room=show-1&token={alice}")), None).await;
    expect_joined(&mut in_room_a, "show-1").await;
    let mut no_room_a = connect(&a.url(&format!("?token={alice}")), None).await;
    let mut in_room_b = connect(&b.url(&format!("?room=show-1&token={alice}")), Some("roomcast.rkyv.v2")).await;
    expect_joined(&mut in_room_b, "show-1").await;
    let mut sse_b = sse(&format!("http://{}/sse?room=show-2&token={alice}", b.ws)).await.unwrap();
    sse_joined(&mut sse_b).await;
    let mut bob_b = connect(&b.url(&format!("?room=show-1&token={}", token("bob"))), None).await;
    expect_joined(&mut bob_b, "show-1").await;
    // The Rust client, as an app would run it.
    let cfg = roomcast_client::Config::url(b.url("")).room("show-1").token(roomcast_client::TokenSource::new({
        let t = alice.clone();
        move || {
            let t = t.clone();
            async move { Ok::<_, roomcast_client::BoxError>(t) }
        }
    }));
    let (client, mut events) = roomcast_client::Client::start(cfg).unwrap();
    let joined = tokio::time::timeout(T, async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, roomcast_client::Event::Joined { .. }) {
                return true;
            }
        }
        false
    });
    assert!(joined.await.unwrap(), "the Rust client joined");

    let (status, v) = api_a.kick("alice", Some(MOD)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["closed"], 2, "two connections on the edge that took the request: {v}");
    assert_eq!(v["edges"], 2, "both edges got it: {v}");
    for ws in [&mut in_room_a, &mut no_room_a, &mut in_room_b] {
        let (msgs, code) = until_close(ws).await;
        assert_eq!(code, Some(4002), "{msgs:?}");
        assert!(msgs.iter().any(|m| is_error(m, "kicked")), "told why first: {msgs:?}");
    }
    let msgs = sse_until_end(&mut sse_b).await;
    assert!(msgs.iter().any(|m| is_error(m, "kicked")), "{msgs:?}");
    // The Rust client: closed with 4002, then it stops (no reconnect).
    let mut seen = Vec::new();
    let stopped = tokio::time::timeout(T, async {
        while let Some(ev) = events.recv().await {
            if ev == roomcast_client::Event::State(roomcast_client::ConnectionState::Closed) {
                return true;
            }
            seen.push(ev);
        }
        false
    })
    .await;
    assert_eq!(stopped, Ok(true), "the client stopped: {seen:?}");
    assert!(
        seen.iter().any(|e| matches!(
            e,
            roomcast_client::Event::Error(roomcast_client::ErrorEvent::Closed { code: 4002, .. })
        )),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, roomcast_client::Event::State(roomcast_client::ConnectionState::Connecting { .. })))
    );
    drop(client);
    // Bob is still there and served.
    let seq = api_a.publish("show-1", "gift", json!({ "n": 1 })).await;
    assert_eq!(messages_upto(&mut bob_b, seq).await.last().map(|m| m.seq), Some(seq));
    // A kick is not a ban: alice may come back.
    assert_eq!(upgrade_status(&a.url(&format!("?room=show-1&token={alice}"))).await, 101);
    // Counted on each edge.
    assert_eq!(api_a.metric("roomcast_moderated_connections_total", "action=\"kick\"").await, 2.0);
    assert_eq!(api_b.metric("roomcast_moderated_connections_total", "action=\"kick\"").await, 3.0);
    assert_eq!(api_a.metric("roomcast_moderation_actions_total", "action=\"disconnect\"").await, 1.0);
    assert_eq!(api_b.metric("roomcast_moderation_actions_total", "action=\"disconnect\"").await, 0.0);
}

/// A ban taken by one edge holds on every edge and every join path: the handshake's `?room=`
/// (403), the `join` signal (`error` `banned`), SSE (403); members there are taken out (`error`
/// `banned`, then `left`; the WebSocket stays open, an SSE stream ends); an edge started later
/// knows it; lifting it (on another edge) or its expiry lets the user in again. Failed before:
/// the ban endpoint answered 404 and every join went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_refuses_every_join_on_every_edge_until_lifted_or_expired() {
    ban_on_every_edge(false).await;
}

/// The same on a Redis Cluster: failed before with 501 `cluster_unsupported`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_refuses_every_join_on_every_edge_of_a_cluster_until_lifted_or_expired() {
    ban_on_every_edge(true).await;
}

async fn ban_on_every_edge(cluster: bool) {
    let (redis, a, b) = two_edges("ban", cluster);
    bus_up(&a).await;
    bus_up(&b).await;
    redis.on_mod_channel(2).await;
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    let (alice, bob) = (token("alice"), token("bob"));
    let mut member_b = connect(&b.url(&format!("?room=show-1&token={alice}")), None).await;
    expect_joined(&mut member_b, "show-1").await;
    let mut sse_b = sse(&format!("http://{}/sse?room=show-1&token={alice}", b.ws)).await.unwrap();
    sse_joined(&mut sse_b).await;
    let mut elsewhere_a = connect(&a.url(&format!("?room=show-2&token={alice}")), None).await;
    expect_joined(&mut elsewhere_a, "show-2").await;

    let (status, v) = api_a.ban("show-1", "alice", 60, Some(SHOW_MOD)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["removed"].as_u64(), v["edges"].as_u64()), (Some(0), Some(2)), "{v}");
    // Taken out of the room on the other edge; the connection stays.
    assert!(is_error(&next_signal(&mut member_b).await, "banned"));
    assert_eq!(next_signal(&mut member_b).await, ServerMsg::Left { room: "show-1".into() });
    send_json(&mut member_b, json!({ "op": "join", "room": "show-1" })).await;
    assert!(is_error(&next_signal(&mut member_b).await, "banned"), "the join signal is refused");
    send_json(&mut member_b, json!({ "op": "join", "room": "show-3" })).await;
    expect_joined(&mut member_b, "show-3").await;
    let msgs = sse_until_end(&mut sse_b).await;
    assert!(msgs.iter().any(|m| is_error(m, "banned")), "{msgs:?}");
    // Every handshake path, on both edges; other users and rooms are untouched.
    for e in [&a, &b] {
        assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={alice}"))).await, 403);
        assert_eq!(sse(&format!("http://{}/sse?room=show-1&token={alice}", e.ws)).await.err(), Some(403));
        assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={bob}"))).await, 101);
    }
    send_json(&mut elsewhere_a, json!({ "op": "ping" })).await;
    assert_eq!(next_signal(&mut elsewhere_a).await, ServerMsg::Pong, "alice in another room is untouched");
    send_json(&mut elsewhere_a, json!({ "op": "join", "room": "show-1" })).await;
    assert!(is_error(&next_signal(&mut elsewhere_a).await, "banned"));
    send_json(&mut elsewhere_a, json!({ "op": "ping" })).await;
    assert_eq!(
        next_signal(&mut elsewhere_a).await,
        ServerMsg::Pong,
        "a refused join leaves the connection where it was"
    );
    // Listed on any edge; an edge that starts now loads it from Redis.
    let (status, v) = api_b.call(reqwest::Method::GET, "/v1/rooms/show-1/bans", Some(MOD), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["bans"][0]["user"], "alice", "{v}");
    let c = redis_edge(&redis, "ban-c");
    bus_up(&c).await;
    redis.on_mod_channel(3).await;
    let refused_on_c =
        wait_until(T, || async { upgrade_status(&c.url(&format!("?room=show-1&token={alice}"))).await == 403 }).await;
    assert!(refused_on_c, "a later edge knows the ban");
    // Lifted on another edge than the one that banned: allowed everywhere.
    let (status, v) = api_b.unban("show-1", "alice", Some(MOD)).await;
    assert_eq!((status, v["lifted"].as_bool()), (200, Some(true)), "{v}");
    for e in [&a, &b, &c] {
        let url = e.url(&format!("?room=show-1&token={alice}"));
        assert!(wait_until(T, || async { upgrade_status(&url).await == 101 }).await, "allowed again");
    }
    send_json(&mut elsewhere_a, json!({ "op": "join", "room": "show-1" })).await;
    assert_eq!(next_signal(&mut elsewhere_a).await, ServerMsg::Left { room: "show-2".into() });
    expect_joined(&mut elsewhere_a, "show-1").await;
    // A short ban takes the member out, and ends by itself.
    let (status, _) = api_b.ban("show-1", "alice", 1, Some(MOD)).await;
    assert_eq!(status, 200);
    assert!(is_error(&next_signal(&mut elsewhere_a).await, "banned"));
    assert_eq!(next_signal(&mut elsewhere_a).await, ServerMsg::Left { room: "show-1".into() });
    let url = a.url(&format!("?room=show-1&token={alice}"));
    assert!(wait_until(Duration::from_secs(5), || async { upgrade_status(&url).await == 101 }).await, "expired");
    // Counted.
    assert!(api_a.metric("roomcast_connections_refused_total", "reason=\"banned\"").await >= 3.0);
    assert!(api_b.metric("roomcast_moderated_connections_total", "action=\"ban\"").await >= 2.0);
    assert_eq!(api_a.metric("roomcast_moderation_actions_total", "action=\"ban\"").await, 1.0);
    assert_eq!(api_b.metric("roomcast_moderation_actions_total", "action=\"unban\"").await, 1.0);
}

/// On a cluster the moderation channel lives in one slot: when that slot's primary dies, the
/// edges follow the channel to the replica that takes over, and a ban taken meanwhile (503
/// until Redis takes it; retried as a publisher would) holds on both edges (read again when
/// the channel is live again), as does one taken after. Failed before: 501 for every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_follows_its_channel_across_a_cluster_failover() {
    use edge::bus::{redis::MOD_ROOM, slots::slot_of};
    let shared = Shared::start(true, 1);
    let url = shared.url();
    let (ca, cb) = (edge_config("mod-failover-a"), edge_config("mod-failover-b"));
    let a = EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--config", ca.as_str()]);
    let b = EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--config", cb.as_str()]);
    bus_up(&a).await;
    bus_up(&b).await;
    shared.on_mod_channel(2).await;
    let Shared::Cluster(mut cluster) = shared else { unreachable!() };
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    // Both edges are on the channel: a ban reaches both.
    let (status, v) = api_a.ban("show-1", "alice", 600, Some(MOD)).await;
    assert_eq!((status, v["edges"].as_u64()), (200, Some(2)), "{v}");
    let channel_primary = cluster.owner_of(slot_of(MOD_ROOM.as_bytes()));
    cluster.kill(channel_primary);
    // A ban while the channel's primary is gone: refused (503, retry) until Redis takes it.
    let taken =
        wait_until(Duration::from_secs(30), || async { api_b.ban("show-1", "carol", 600, Some(MOD)).await.0 == 200 })
            .await;
    assert!(taken, "the ban was taken once the cluster healed");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            cluster.owner(slot_of(MOD_ROOM.as_bytes())).is_some_and(|p| p != channel_primary)
        })
        .await,
        "failover"
    );
    for (e, who) in [(&a, "a"), (&b, "b")] {
        for user in ["alice", "carol"] {
            let url = e.url(&format!("?room=show-1&token={}", token(user)));
            let refused = wait_until(T, || async { upgrade_status(&url).await == 403 }).await;
            assert!(refused, "{user} banned on edge {who} after the failover");
        }
    }
    // And the channel is followed: a ban now reaches both edges (each resubscribed on the
    // promoted replica).
    let reached =
        wait_until(T, || async { api_a.ban("show-1", "dave", 600, Some(MOD)).await.1["edges"].as_u64() == Some(2) })
            .await;
    assert!(reached, "a ban after the failover reaches both edges");
    let url = b.url(&format!("?room=show-1&token={}", token("dave")));
    assert_eq!(upgrade_status(&url).await, 403);
    assert_eq!(upgrade_status(&b.url(&format!("?room=show-1&token={}", token("erin")))).await, 101);
}

/// Single node: a ban is kept in the store, so a restart does not lift it. Failed before: 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_survives_a_restart_of_the_single_node_edge() {
    let data = data_dir("ban-restart");
    let cfg = edge_config("ban-restart");
    let args = ["--shards", "2", "--config", cfg.as_str()];
    let (mut e, _log) = EdgeProc::start_on(&data, &args, "warn");
    let alice = token("alice");
    let mut member = connect(&e.url(&format!("?room=show-1&token={alice}")), None).await;
    expect_joined(&mut member, "show-1").await;
    let (status, v) = Api::new(&e).ban("show-1", "alice", 600, Some(MOD)).await;
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)), "{v}");
    assert!(is_error(&next_signal(&mut member).await, "banned"));
    assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={alice}"))).await, 403);
    e.sigterm();
    assert_eq!(e.wait_exit(T), Some(0));
    let (e, _log) = EdgeProc::start_on(&data, &args, "warn");
    assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={alice}"))).await, 403, "still banned");
    assert_eq!(sse(&format!("http://{}/sse?room=show-1&token={alice}", e.ws)).await.err(), Some(403));
    let api = Api::new(&e);
    let (_, v) = api.call(reqwest::Method::GET, "/v1/rooms/show-1/bans", Some(MOD), None).await;
    assert_eq!(v["bans"].as_array().map(Vec::len), Some(1), "{v}");
    let (status, v) = api.unban("show-1", "alice", Some(MOD)).await;
    assert_eq!((status, v["lifted"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={alice}"))).await, 101);
    drop(e);
    let (e, _log) = EdgeProc::start_on(&data, &args, "warn");
    assert_eq!(upgrade_status(&e.url(&format!("?room=show-1&token={alice}"))).await, 101, "lifted for good");
    drop(e);
    let _ = std::fs::remove_dir_all(data);
}

/// What a `since` replay of `room` from 0 carries, in order. The replay is queued with
/// `joined`, so a `ping` sent once `joined` is in comes back after all of it.
async fn replay_from_start(e: &EdgeProc, room: &str, proto: Option<&str>) -> Vec<PushMessage> {
    let mut ws = connect(&e.url(&format!("?room={room}&since=0&token={}", token("carol"))), proto).await;
    expect_joined(&mut ws, room).await;
    send_json(&mut ws, json!({ "op": "ping" })).await;
    let mut got = Vec::new();
    loop {
        match next_msg_within(&mut ws, T).await {
            Some(ServerMsg::Batch { messages, .. }) => got.extend(messages),
            Some(ServerMsg::Pong) => return got,
            Some(ServerMsg::Gap { from, to, .. }) => panic!("a false gap {from}..={to} after {got:?}"),
            other => panic!("unexpected {other:?} after {got:?}"),
        }
    }
}

fn tombstone(seq: u64, target: u64) -> (u64, String, String, String) {
    (seq, "deleted".into(), String::new(), format!("{{\"seq\":{target}}}"))
}

fn brief(ms: &[PushMessage]) -> Vec<(u64, String, String, String)> {
    ms.iter().map(|m| (m.seq, m.kind.clone(), m.user.clone(), m.body.clone())).collect()
}

/// Single node with its store: a deleted gift is replaced, in place, by a tombstone (in both
/// encodings, live and in every replay, before and after a restart), a live tombstone reaches
/// members, no gap is reported, a retry publishes nothing, a tombstone cannot be deleted.
/// Failed before: 404, and the gift came back in every replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_is_never_replayed_single_node() {
    let data = data_dir("delete");
    let cfg = edge_config("delete");
    let args = ["--shards", "2", "--merge-window-ms", "10", "--config", cfg.as_str()];
    let (mut e, _log) = EdgeProc::start_on(&data, &args, "warn");
    let api = Api::new(&e);
    let dave = token("dave");
    let mut json_member = connect(&e.url(&format!("?room=show-1&token={dave}")), None).await;
    expect_joined(&mut json_member, "show-1").await;
    let mut rkyv_member = connect(&e.url(&format!("?room=show-1&token={dave}")), Some("roomcast.rkyv.v2")).await;
    expect_joined(&mut rkyv_member, "show-1").await;
    assert_eq!(api.publish("show-1", "gift", json!({ "rude": true })).await, 1);
    assert_eq!(api.publish("show-1", "chat", json!("hello")).await, 2);
    assert_eq!(api.publish("show-1", "gift", json!({ "rose": 3 })).await, 3);
    for ws in [&mut json_member, &mut rkyv_member] {
        assert_eq!(messages_upto(ws, 3).await.len(), 3);
    }
    let (status, v) = api.delete("show-1", 1, Some(MOD)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["tombstone_seq"].as_u64(), v["in_history"].as_bool()), (Some(4), Some(true)), "{v}");
    for ws in [&mut json_member, &mut rkyv_member] {
        assert_eq!(brief(&messages_upto(ws, 4).await), vec![tombstone(4, 1)], "the live tombstone, both encodings");
    }
    let (status, v) = api.delete("show-1", 1, Some(MOD)).await;
    assert_eq!((status, v["already_deleted"].as_bool(), &v["tombstone_seq"]), (200, Some(true), &Value::Null), "{v}");
    assert_eq!(api.delete("show-1", 4, Some(MOD)).await.0, 409, "a tombstone cannot be deleted");
    assert_eq!(api.delete("show-1", 99, Some(MOD)).await.0, 404);
    assert_eq!(api.delete("nowhere", 1, Some(MOD)).await.0, 404);
    let gift3 = (3, "gift".to_owned(), "backend".to_owned(), r#"{"rose":3}"#.to_owned());
    let want = vec![tombstone(1, 1), gift3, tombstone(4, 1)];
    assert_eq!(brief(&replay_from_start(&e, "show-1", None).await), want, "in place, no gap, never the gift");
    assert_eq!(brief(&replay_from_start(&e, "show-1", Some("roomcast.rkyv.v2")).await), want);
    // The store holds the tombstone, not the gift.
    e.sigterm();
    assert_eq!(e.wait_exit(T), Some(0));
    let (mut e, _log) = EdgeProc::start_on(&data, &args, "warn");
    assert_eq!(brief(&replay_from_start(&e, "show-1", None).await), want, "after a restart");
    let original = replay_from_start(&e, "show-1", None).await;
    assert!(!original.iter().any(|m| m.body.contains("rude")));
    e.kill9();
    let (e, _log) = EdgeProc::start_on(&data, &args, "warn");
    assert_eq!(brief(&replay_from_start(&e, "show-1", None).await), want, "after a crash");
    drop(e);
    let _ = std::fs::remove_dir_all(data);
}

/// Redis: the delete (on one edge) reaches members on another as a live tombstone; every edge's
/// replay, from its own history or from Redis (an edge that follows the room from now, one that
/// starts later), carries the tombstone in place. Failed before: 404, the gift replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_is_never_replayed_with_redis() {
    delete_with_a_shared_bus(false).await;
}

/// The same on a Redis Cluster: failed before with 501 `cluster_unsupported`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_is_never_replayed_on_a_cluster() {
    delete_with_a_shared_bus(true).await;
}

async fn delete_with_a_shared_bus(cluster: bool) {
    let (redis, a, b) = two_edges("delete", cluster);
    bus_up(&a).await;
    bus_up(&b).await;
    let api_a = Api::new(&a);
    let mut member_b = connect(&b.url(&format!("?room=show-7&token={}", token("dave"))), None).await;
    expect_joined(&mut member_b, "show-7").await;
    for n in 1..=3 {
        assert_eq!(api_a.publish("show-7", "gift", json!({ "n": n })).await, n);
    }
    assert_eq!(messages_upto(&mut member_b, 3).await.len(), 3);
    let (status, v) = api_a.delete("show-7", 2, Some(MOD)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tombstone_seq"], 4, "{v}");
    assert_eq!(brief(&messages_upto(&mut member_b, 4).await), vec![tombstone(4, 2)]);
    assert_eq!(api_a.delete("show-7", 2, Some(MOD)).await.1["already_deleted"], true);
    assert_eq!(api_a.delete("show-7", 4, Some(MOD)).await.0, 409);
    assert_eq!(api_a.delete("show-7", 5, Some(MOD)).await.0, 404);
    let gift = |n: u64| (n, "gift".to_owned(), "backend".to_owned(), format!("{{\"n\":{n}}}"));
    let want = vec![gift(1), tombstone(2, 2), gift(3), tombstone(4, 2)];
    assert_eq!(brief(&replay_from_start(&b, "show-7", None).await), want, "the edge that followed the room");
    assert_eq!(brief(&replay_from_start(&a, "show-7", None).await), want, "recovered from redis");
    let c = redis_edge(&redis, "delete-c");
    bus_up(&c).await;
    assert_eq!(brief(&replay_from_start(&c, "show-7", Some("roomcast.rkyv.v2")).await), want, "a later edge");
    // What follows is numbered on as usual.
    assert_eq!(api_a.publish("show-7", "gift", json!({ "n": 5 })).await, 5);
    assert_eq!(messages_upto(&mut member_b, 5).await.last().map(|m| m.seq), Some(5));
}

/// One moderation request of each kind, by name.
async fn moderate(api: &Api, what: &str, key: Option<&str>, seq: u64) -> (u16, Value) {
    match what {
        "disconnect" => api.kick("alice", key).await,
        "ban" => api.ban("show-1", "alice", 60, key).await,
        "unban" => api.unban("show-1", "alice", key).await,
        "delete" => api.delete("show-1", seq, key).await,
        _ => api.call(reqwest::Method::GET, "/v1/rooms/show-1/bans", key, None).await,
    }
}

/// Who may moderate: a key with the `moderate` scope (within its rooms; a disconnect needs one
/// for every room), or the admin token. No key, an unknown key, a publish-only key: refused
/// (401, 401, 403 insufficient_scope), each counted by reason; a moderate-only key may not
/// publish. With neither keys nor admin token (loopback), the API is open like the publish API.
/// Failed before: 404 for every moderation request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_needs_a_moderator() {
    let cfg = edge_config("mod-auth");
    let e = EdgeProc::start(&["--shards", "1", "--no-store", "--config", cfg.as_str()]);
    let api = Api::new(&e);
    let seq = api.publish("show-1", "gift", json!({ "n": 1 })).await;
    for what in ["disconnect", "ban", "unban", "delete", "list"] {
        for (key, status, reason) in
            [(None, 401, "no_key"), (Some("not-a-key-0123456789"), 401, "bad_key"), (Some(PUB), 403, "key_scope")]
        {
            let (s, v) = moderate(&api, what, key, seq).await;
            assert_eq!((s, v["reason"].as_str()), (status, Some(reason)), "{what} with {key:?}: {v}");
        }
    }
    // A key for show-* may not moderate another room, nor disconnect (every room).
    assert_eq!(api.ban("lobby", "alice", 60, Some(SHOW_MOD)).await.1["reason"], "key_room");
    assert_eq!(api.kick("alice", Some(SHOW_MOD)).await.1["reason"], "key_room");
    assert_eq!(api.ban("show-1", "alice", 60, Some(SHOW_MOD)).await.0, 200);
    assert_eq!(api.unban("show-1", "alice", Some(SHOW_MOD)).await.0, 200);
    // The admin token may do anything moderation does.
    assert_eq!(api.kick("alice", Some(ADMIN)).await.0, 200);
    // Bad requests.
    assert_eq!(api.ban("show-1", "alice", 0, Some(MOD)).await.1["reason"], "bad_request");
    assert_eq!(api.ban("show-1", &"x".repeat(65), 60, Some(MOD)).await.1["reason"], "bad_request");
    assert_eq!(api.delete("show-1", 0, Some(MOD)).await.1["reason"], "not_found");
    let (s, _) = api.call(reqwest::Method::DELETE, "/v1/rooms/show-1/messages/x", Some(MOD), None).await;
    assert_eq!(s, 400);
    // A moderate-only key may not publish.
    let (s, v) = api
        .call(reqwest::Method::POST, "/v1/rooms/show-1/messages", Some(MOD), Some(json!({ "kind": "gift", "body": 1 })))
        .await;
    assert_eq!((s, v["reason"].as_str()), (403, Some("key_scope")), "{v}");
    // Every refusal counted, by reason.
    let refused = |reason: &'static str| {
        let api = &api;
        async move { api.metric("roomcast_moderation_refused_total", &format!("reason=\"{reason}\"")).await }
    };
    assert_eq!(refused("no_key").await, 5.0);
    assert_eq!(refused("bad_key").await, 5.0);
    assert_eq!(refused("key_scope").await, 5.0);
    assert_eq!(refused("key_room").await, 2.0);
    assert_eq!(refused("bad_request").await, 3.0);
    assert_eq!(api.metric("roomcast_publish_rejected_total", "reason=\"key_scope\"").await, 1.0);
    drop(e);
    // Open (no key, no admin token, loopback), as the publish API is.
    let open = EdgeProc::start(&["--shards", "1", "--no-store"]);
    assert_eq!(Api::new(&open).kick("anyone", None).await.0, 200);
}
