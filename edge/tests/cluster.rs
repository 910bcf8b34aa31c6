//! Several edges on one real Redis: shared rooms, dispatch, drain without loss, Redis restarts.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "test-admin-token-0123456789";

fn edge_on(redis: &RedisProc, extra: &[&str]) -> EdgeProc {
    edge_at(&redis.url(), extra)
}

fn edge_at(url: &str, extra: &[&str]) -> EdgeProc {
    edge_at_with(url, "", extra)
}

/// An edge on `url` with `toml` added to its config file (after its `[drain]` table).
fn edge_at_with(url: &str, toml: &str, extra: &[&str]) -> EdgeProc {
    let cfg = edge_config(toml);
    let mut args = vec!["--shards", "1", "--merge-window-ms", "10", "--bus", url, "--config", &cfg];
    args.extend_from_slice(extra);
    EdgeProc::start(&args)
}

/// As [`edge_on`], with the edge's log (at warn) collected.
fn edge_on_logged(redis: &RedisProc) -> (EdgeProc, std::sync::Arc<std::sync::Mutex<String>>) {
    let (cfg, url) = (edge_config(""), redis.url());
    let args = ["--shards", "1", "--merge-window-ms", "10", "--bus", &url, "--config", &cfg];
    EdgeProc::start_on(&data_dir("cluster-logged"), &args, "warn")
}

/// A config file of its own for one edge: the admin token, a short drain, then `toml`.
fn edge_config(toml: &str) -> String {
    // One file per edge: tests run in parallel, and a file rewritten while another edge reads
    // it can be read empty (that edge then has no admin token).
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = roomcast_testsupport::scratch().join(format!("roomcast-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("edge-{}.toml", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&cfg, format!("admin_token = \"{TOKEN}\"\n[drain]\nperiod_ms = 600\ndeadline_ms = 10000\n{toml}"))
        .unwrap();
    cfg.to_str().unwrap().to_owned()
}

async fn route(p: &Publisher, room: &str) -> Option<String> {
    let (status, body) = p.get(&format!("/v1/route?room={room}")).await;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["url"].as_str().map(str::to_owned)
}

/// A member that follows goaway through dispatch and reconnects with `since`.
struct Member {
    seen: Vec<u64>,
    edges: Vec<String>,
    goaways: u32,
}

/// What a member needs besides its first URL: where to ask for an edge after a bare close, and
/// the test's counters.
#[derive(Clone)]
struct Ctl {
    dispatch: String,
    stop: Arc<AtomicBool>,
    want: Arc<AtomicU64>,
    joined: Arc<std::sync::atomic::AtomicUsize>,
}

async fn member(first_url: String, room: &'static str, ctl: Ctl) -> Member {
    let Ctl { dispatch: fallback, stop, want, joined: joined_count } = ctl;
    let mut m = Member { seen: Vec::new(), edges: vec![first_url.clone()], goaways: 0 };
    let mut url = first_url;
    let mut since: Option<u64> = None;
    loop {
        let full = match since {
            Some(s) => format!("{url}&since={s}"),
            None => url.clone(),
        };
        // Like a real client: if the edge refuses (it may have just started draining), ask
        // dispatch again.
        let mut ws = None;
        for _ in 0..50 {
            let mut req = full.as_str().into_client_request().unwrap();
            req.headers_mut().remove("Sec-WebSocket-Protocol");
            match tokio_tungstenite::connect_async(req).await {
                Ok((w, _)) => {
                    ws = Some(w);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let mut ws = ws.expect("connected within 5 s");
        let joined = expect_joined(&mut ws, room).await;
        if since.is_none() {
            joined_count.fetch_add(1, Ordering::Relaxed);
        }
        since.get_or_insert(joined);
        let next: Option<String>;
        loop {
            if stop.load(Ordering::Relaxed) && m.seen.last().copied().unwrap_or(0) >= want.load(Ordering::Relaxed) {
                return m;
            }
            let got = match tokio::time::timeout(Duration::from_millis(200), next_msg(&mut ws)).await {
                Ok(Some(msg)) => Some(msg),
                Ok(None) => {
                    // Closed without a goaway (an edge stopped): a real client asks dispatch
                    // again. Never spin on a dead socket.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let r = reqwest::get(format!("{fallback}?room={room}")).await.unwrap();
                    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap();
                    next = Some(v["url"].as_str().expect("dispatch url").to_owned());
                    break;
                }
                Err(_) => None,
            };
            match got {
                Some(ServerMsg::Batch { messages, .. }) => {
                    for msg in messages {
                        m.seen.push(msg.seq);
                        since = Some(msg.seq);
                    }
                }
                Some(ServerMsg::Goaway { url: dispatch, .. }) => {
                    m.goaways += 1;
                    // Ask dispatch for another edge (retrying, like a real client).
                    let mut target = None;
                    let mut last = String::new();
                    // The goaway's URL is usable as is: it names the room already.
                    assert!(dispatch.ends_with(&format!("?room={room}")), "goaway url {dispatch}");
                    for _ in 0..50 {
                        let r = reqwest::get(dispatch.as_str()).await.unwrap();
                        let status = r.status().as_u16();
                        last = r.text().await.unwrap_or_default();
                        if status == 200 {
                            let v: serde_json::Value = serde_json::from_str(&last).unwrap();
                            target = v["url"].as_str().map(str::to_owned);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    next = Some(target.unwrap_or_else(|| panic!("dispatch answered {last}")));
                    break;
                }
                Some(ServerMsg::Gap { .. }) => panic!("unexpected gap"),
                Some(_) => {}
                None => {
                    if stop.load(Ordering::Relaxed)
                        && m.seen.last().copied().unwrap_or(0) >= want.load(Ordering::Relaxed)
                    {
                        return m;
                    }
                }
            }
        }
        url = next.expect("reconnect target");
        m.edges.push(url.clone());
    }
}

/// A member that joined before the first gift was published owes every gift, once, in order
/// (nothing else is published in its room).
fn assert_every_gift_once(seen: &[u64], gifts: &BTreeSet<u64>, who: usize) {
    let want: Vec<u64> = gifts.iter().copied().collect();
    assert_eq!(seen, want, "member {who}: every gift once, in order");
}

/// How many subscribers Redis counts on a room's channel (`PUBSUB NUMSUB`).
fn subscribers(redis: &RedisProc, room: &str) -> u64 {
    let out = redis_cli(redis.port, &["PUBSUB", "NUMSUB", &format!("rc:{{{room}}}:ch")]);
    out.lines().nth(1).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("PUBSUB NUMSUB: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_share_rooms_and_dispatch_spreads_clients() {
    let redis = RedisProc::start();
    let edges: Vec<EdgeProc> = (0..3).map(|_| edge_on(&redis, &[])).collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    // Load reports are published every second: wait until dispatch knows all three.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut set = BTreeSet::new();
            for _ in 0..30 {
                if let Some(u) = route(&pubs[0], "shared").await {
                    set.insert(u);
                }
            }
            set.len() == 3
        })
        .await,
        "dispatch answers with all three edges"
    );
    let mut clients = Vec::new();
    let mut per_edge: HashMap<String, u32> = HashMap::new();
    for i in 0..60 {
        let url = route(&pubs[i % 3], "shared").await.expect("route");
        *per_edge.entry(url.split('?').next().unwrap().to_owned()).or_default() += 1;
        let mut ws = connect(&url, None).await;
        expect_joined(&mut ws, "shared").await;
        clients.push(ws);
    }
    assert_eq!(per_edge.len(), 3, "arrivals spread over the edges: {per_edge:?}");
    assert!(per_edge.values().all(|&n| n >= 10), "{per_edge:?}");
    // Gifts published at every edge reach every member once, in order.
    let mut gifts = Vec::new();
    for n in 0..30u64 {
        gifts.push(publish_gift(&pubs[n as usize % 3], "shared", n).await);
    }
    assert_eq!(gifts, (1..=30).collect::<Vec<_>>(), "one seq space across edges");
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 30 {
            match next_msg_within(ws, Duration::from_secs(10)).await {
                Some(ServerMsg::Batch { messages, .. }) => got.extend(messages.iter().map(|m| m.seq)),
                other => panic!("client {i}: {other:?} after {got:?}"),
            }
        }
        assert_eq!(got, gifts, "client {i}");
    }
    // Edges subscribe only to rooms with local members: every edge follows "shared"; a room
    // with a member on one edge is followed by that edge alone, until the member leaves; a
    // room nobody joined is followed by none, whatever is published in it.
    assert_eq!(subscribers(&redis, "shared"), 3, "every edge with members follows the room");
    let mut lonely = connect(&edges[0].url("?room=lonely"), None).await;
    expect_joined(&mut lonely, "lonely").await;
    assert!(
        wait_until(Duration::from_secs(10), || async { subscribers(&redis, "lonely") == 1 }).await,
        "the edge with a member follows the room"
    );
    assert_eq!(subscribers(&redis, "lonely"), 1, "only the edge with a member follows the room");
    publish_gift(&pubs[2], "nobody", 0).await;
    assert_eq!(subscribers(&redis, "nobody"), 0, "no edge follows a room without members");
    drop(lonely);
    assert!(
        wait_until(Duration::from_secs(10), || async { subscribers(&redis, "lonely") == 0 }).await,
        "the edge stops following a room when its last member leaves"
    );
    assert_eq!(subscribers(&redis, "shared"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_edge_under_load_loses_no_gift() {
    let redis = RedisProc::start();
    let mut edges: Vec<EdgeProc> = (0..3).map(|_| edge_on(&redis, &[])).collect();
    let pubs: Vec<Arc<Publisher>> = edges.iter().map(|e| Arc::new(Publisher::new(e.http))).collect();
    let drained_url = format!("ws://{}/ws", edges[0].ws);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut set = BTreeSet::new();
            for _ in 0..30 {
                if let Some(u) = route(&pubs[1], "d").await {
                    set.insert(u);
                }
            }
            set.len() == 3
        })
        .await
    );
    let stop = Arc::new(AtomicBool::new(false));
    let want = Arc::new(AtomicU64::new(u64::MAX));
    let ctl = Ctl {
        dispatch: format!("http://{}/v1/route", edges[1].http),
        stop: stop.clone(),
        want: want.clone(),
        joined: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let mut members = Vec::new();
    // 30 members on the edge to drain, 15 on each other.
    for i in 0..60 {
        let url =
            if i < 30 { format!("{drained_url}?room=d") } else { format!("ws://{}/ws?room=d", edges[1 + i % 2].ws) };
        members.push(tokio::spawn(member(url, "d", ctl.clone())));
    }
    // Let them all join (a drain aborts connections still in their handshake).
    assert!(
        wait_until(Duration::from_secs(20), || async { ctl.joined.load(Ordering::Relaxed) == 60 }).await,
        "members joined"
    );
    let gifts = Arc::new(Mutex::new(BTreeSet::new()));
    let publisher = {
        let gifts = gifts.clone();
        let (p1, p2) = (pubs[1].clone(), pubs[2].clone());
        tokio::spawn(async move {
            for n in 0..200u64 {
                let p = if n % 2 == 0 { &p1 } else { &p2 };
                let seq = publish_gift(p, "d", n).await;
                gifts.lock().await.insert(seq);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Drain while gifts flow: some published already, most still to come.
    assert!(wait_until(Duration::from_secs(20), || async { gifts.lock().await.len() >= 20 }).await, "gifts flow");
    let (status, _) = pubs[0].post_raw("/v1/admin/drain", Vec::new()).await;
    assert_eq!(status, 401, "drain needs the token");
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", edges[0].http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // A draining edge is never returned by dispatch.
    for _ in 0..20 {
        if let Some(u) = route(&pubs[1], "d").await {
            assert!(!u.starts_with(&drained_url), "dispatch returned the draining edge");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.await.unwrap();
    let gifts = gifts.lock().await.clone();
    want.store(*gifts.iter().max().unwrap(), Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut moved = 0;
    for (i, m) in members.into_iter().enumerate() {
        let m = tokio::time::timeout(Duration::from_secs(30), m).await.expect("member finished").unwrap();
        let set: BTreeSet<u64> = m.seen.iter().copied().collect();
        assert_eq!(set.len(), m.seen.len(), "member {i}: no duplicate: {:?} via {:?}", m.seen, m.edges);
        assert_every_gift_once(&m.seen, &gifts, i);
        if i < 30 {
            assert!(m.goaways >= 1 && m.edges.len() >= 2, "member {i} moved off the drained edge");
            assert!(!m.edges.last().unwrap().starts_with(&drained_url));
            moved += 1;
        }
    }
    assert_eq!(moved, 30);
    assert_eq!(edges[0].wait_exit(Duration::from_secs(15)), Some(0), "the drained edge exits 0");
    edges.remove(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_loses_no_gift() {
    let mut redis = RedisProc::start();
    let edges: Vec<EdgeProc> = (0..2).map(|_| edge_on(&redis, &[])).collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut ws = connect(&format!("ws://{}/ws?room=rr", edges[i % 2].ws), None).await;
        expect_joined(&mut ws, "rr").await;
        clients.push(ws);
    }
    let mut gifts = Vec::new();
    for n in 0..20u64 {
        gifts.push(publish_gift(&pubs[n as usize % 2], "rr", n).await);
    }
    redis.restart();
    // Publishing retries through the outage and the reconnection.
    for n in 20..40u64 {
        gifts.push(publish_gift(&pubs[n as usize % 2], "rr", n).await);
    }
    assert_eq!(gifts, (1..=40).collect::<Vec<_>>(), "seqs continue across the restart");
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 40 {
            match next_msg_within(ws, Duration::from_secs(15)).await {
                Some(ServerMsg::Batch { messages, .. }) => got.extend(messages.iter().map(|m| m.seq)),
                other => panic!("client {i}: {other:?} after {got:?}"),
            }
        }
        assert_eq!(got, gifts, "client {i} sees every gift once, in order");
    }
}

/// Redis loses its last writes (an AOF without `appendfsync always`, a lagging replica
/// promoted): the room is back under the same epoch at a lower seq. Numbering on would hand out
/// seqs 6 and 7 again under the epoch clients hold them in, and a client resuming with
/// `since=7` would silently miss the new 6 and 7. The edge that sees it starts a new epoch:
/// members are reset, and the next gift is seq 1 of the new numbering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_writes_starts_a_new_epoch_instead_of_reusing_seqs() {
    let redis = RedisProc::start();
    let (edge, log) = edge_on_logged(&redis);
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=lossy"), None).await;
    expect_joined(&mut ws, "lossy").await;
    for n in 1..=7 {
        publish_gift(&p, "lossy", n).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 7 {
        match next_msg_within(&mut ws, Duration::from_secs(5)).await {
            Some(ServerMsg::Batch { messages, .. }) => seen.extend(messages.iter().map(|m| m.seq)),
            other => panic!("{other:?}"),
        }
    }
    let old_epoch = {
        let (_, body) = p.get("/v1/rooms/lossy").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["epoch"].as_str().unwrap().to_owned()
    };
    // What a restart from an AOF a second behind leaves: seqs 6 and 7 forgotten. Then the
    // edge's subscriber connection drops (as at a Redis restart) and it reads the room again.
    let cli = |args: &[&str]| {
        let out =
            std::process::Command::new("redis-cli").args(["-p", &redis.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["HSET", "rc:{lossy}:meta", "seq", "5"]);
    cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let reset = loop {
        match next_msg_within(&mut ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Reset { epoch, .. }) => break epoch,
            Some(ServerMsg::Batch { .. }) => {}
            other => panic!("expected a reset, got {other:?}"),
        }
    };
    assert_ne!(reset, old_epoch, "a new epoch, not the one clients hold seqs 6-7 in");
    // The log names the epoch given up as clients know it (hex), not as Redis keeps it
    // (decimal): an operator matches it with a client's report.
    let logged =
        || log.lock().unwrap().lines().find(|l| l.contains("redis lost writes of this room")).map(str::to_owned);
    assert!(wait_until(Duration::from_secs(5), || async { logged().is_some() }).await, "the renumbering is logged");
    let line = logged().unwrap_or_default();
    assert!(line.contains(&format!("old_epoch={old_epoch}")), "{line}");
    let seq = publish_gift(&p, "lossy", 8).await;
    assert_eq!(seq, 1, "the new numbering starts at 1");
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Batch { messages, .. }) => assert_eq!(messages[0].seq, 1),
        other => panic!("{other:?}"),
    }
    // A client that saw 7 in the old epoch is reset too, never joined silently.
    let mut late = connect(&edge.url(&format!("?room=lossy&since=7&epoch={old_epoch}")), None).await;
    match next_msg_within(&mut late, Duration::from_secs(5)).await {
        Some(ServerMsg::Reset { epoch, .. }) => assert_eq!(epoch, reset),
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// `[history]` counts are the fleet's: each publish trims the shared streams to the counts of
/// the edge that took it. An edge connecting after one with other counts says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_with_other_history_counts_than_the_fleet_says_so() {
    let redis = RedisProc::start();
    let url = redis.url();
    let start = |name: &str, must_deliver: u32| {
        let cfg = config(name, &format!("[history]\nmust_deliver = {must_deliver}\n"));
        let args = ["--shards", "1", "--bus", &url, "--config", &cfg];
        EdgeProc::start_on(&data_dir(name), &args, "warn")
    };
    let get = || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "GET", "rc:history"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (_a, a_log) = start("history-a", 100);
    assert!(wait_until(Duration::from_secs(10), || async { get().contains("must_deliver=100") }).await, "{}", get());
    let (_b, b_log) = start("history-b", 50);
    let said = |log: &std::sync::Mutex<String>| log.lock().unwrap().contains("had other [history] counts");
    assert!(wait_until(Duration::from_secs(10), || async { said(&b_log) }).await, "b says so");
    let b_text = b_log.lock().unwrap().clone();
    assert!(b_text.contains("must_deliver=50") && b_text.contains("must_deliver=100"), "{b_text}");
    // a, the first, found no counts to compare with.
    assert!(!said(&a_log), "{}", a_log.lock().unwrap());
}

/// /healthz tells the truth about what the edge can do: Redis down is `degraded` with the
/// reason and `roomcast_bus_up 0` (publishes get 503), Redis back is `ok` again; a draining edge
/// answers 503 (send it no new clients) while /livez stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_bus_and_draining() {
    let mut redis = RedisProc::start();
    let mut edge = edge_on(&redis, &[]);
    let p = Publisher::new(edge.http);
    let health = |p: &Publisher| {
        let p = p.clone();
        async move {
            let (code, body) = p.get("/healthz").await;
            (code, serde_json::from_str::<serde_json::Value>(&body).unwrap())
        }
    };
    let metric = |p: &Publisher| {
        let p = p.clone();
        async move {
            let (_, text) = p.get("/metrics").await;
            text.lines().find_map(|l| l.strip_prefix("roomcast_bus_up ").map(str::to_owned))
        }
    };
    assert!(wait_until(Duration::from_secs(10), || async { health(&p).await.1["bus"] == "up" }).await);
    assert_eq!(metric(&p).await.as_deref(), Some("1"));
    redis.kill();
    assert!(
        wait_until(Duration::from_secs(10), || async { health(&p).await.1["bus"] == "down" }).await,
        "{:?}",
        health(&p).await
    );
    let (code, h) = health(&p).await;
    assert_eq!((code, h["status"].as_str()), (200, Some("degraded")), "{h}");
    assert!(h["reasons"].to_string().contains("redis is unreachable"), "{h}");
    assert_eq!(metric(&p).await.as_deref(), Some("0"));
    // A publish meanwhile is refused (503, retry), and counted; so are the failed connects.
    let (code, body) = p.post_raw("/v1/rooms/h/messages", br#"{"kind":"gift","body":1}"#.to_vec()).await;
    assert_eq!(code, 503, "{body}");
    let (_, text) = p.get("/metrics").await;
    assert!(
        text.lines().any(|l| l.starts_with("roomcast_publish_rejected_total{reason=\"bus_unavailable\"} ")),
        "refusal counted"
    );
    // /metrics says what /healthz says: the alerts read it (RoomcastRedisDown).
    assert!(text.lines().any(|l| l == "roomcast_health{state=\"degraded\"} 1"), "health on /metrics is degraded too");
    drop(text);
    let errors = || async {
        let (_, text) = p.get("/metrics").await;
        text.lines().any(|l| l.starts_with("roomcast_redis_errors_total{op=\"connect\"} "))
    };
    assert!(wait_until(Duration::from_secs(10), errors).await, "failed reconnects are counted");
    redis.restart();
    assert!(wait_until(Duration::from_secs(15), || async { health(&p).await.1["bus"] == "up" }).await);
    assert_eq!(health(&p).await.1["status"], "ok");
    // Draining: readiness says no, liveness yes.
    let mut ws = connect(&edge.url("?room=h"), None).await;
    expect_joined(&mut ws, "h").await;
    edge.sigterm();
    assert!(wait_until(Duration::from_secs(5), || async { health(&p).await.0 == 503 }).await);
    let (_, h) = health(&p).await;
    assert_eq!(h["draining"], true, "{h}");
    assert_eq!(p.get("/livez").await.0, 200);
}

/// `bus.min_replicas_acked` on one Redis: a gift is acknowledged only once a replica holds it.
/// Without a replica it is refused (503: numbered, not acknowledged) while chat, which never
/// waits, flows; once a replica syncs, the publisher's retry with the same Idempotency-Key is
/// acknowledged with the seq the first attempt took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_wait_for_a_replica_on_one_redis() {
    let redis = RedisProc::start();
    let edge = edge_on(&redis, &["--min-replicas-acked", "1"]);
    let p = Publisher::new(edge.http);
    let key = [("Idempotency-Key", "gift-1")];
    let (code, _, body) = p.publish_with("w", "gift", json!({ "n": 1 }), &key).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("replicas"), "{body}");
    assert_eq!(p.publish("w", "chat", json!("hi")).await, 2, "droppable kinds do not wait");
    let port = redis.port.to_string();
    let _replica = RedisProc::start_with(&["--replicaof", "127.0.0.1", &port]);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let out =
                std::process::Command::new("redis-cli").args(["-p", &port, "INFO", "replication"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains("state=online")
        })
        .await,
        "replica in sync"
    );
    let (code, _, body) = p.publish_with("w", "gift", json!({ "n": 1 }), &key).await;
    assert_eq!((code, body["seq"].as_u64(), body["replayed"].as_bool()), (200, Some(1), Some(true)), "{body}");
    let (code, _, body) = p.publish_with("w", "gift", json!({ "n": 2 }), &[]).await;
    assert_eq!((code, body["seq"].as_u64()), (200, Some(3)), "{body}");
    let (_, text) = p.get("/metrics").await;
    assert!(text.contains("roomcast_publish_rejected_total{reason=\"not_replicated\"} 1"), "refusal counted");
}

/// One Redis with a replica and three Sentinels, the smaller HA option: the master is killed
/// mid-stream, Sentinel promotes the replica, the edges follow the announced master (resubscribe,
/// re-read, fill), and with `bus.min_replicas_acked = 1` no acknowledged gift is lost: every
/// member gets every acknowledged gift once, in order, each seq with its gift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_no_acknowledged_gift() {
    sentinel_failover(true).await;
}

/// The same with the master alive: an operator's `SENTINEL FAILOVER` demotes it to a replica
/// (its connections stay up, writes get READONLY); the edges see Sentinel name another master
/// within a second and move to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_switchover_is_followed() {
    sentinel_failover(false).await;
}

/// A TCP relay between a replica and its master that can stop passing the replication stream
/// (what the master sends is then read and dropped: the replica never gets it, and never
/// acknowledges it), as a replica that lags when its master dies. Returns the relay's port.
async fn replication_relay(master: u16, cut: Arc<AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((replica, _)) = l.accept().await {
            let cut = cut.clone();
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", master)).await else { return };
                let (mut rr, mut rw) = replica.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut rr, &mut uw).await });
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !cut.load(Ordering::Relaxed) && rw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

async fn sentinel_failover(kill: bool) {
    let mut master = RedisProc::start();
    let port = master.port.to_string();
    // The replica follows its master through a relay the test can cut.
    let cut = Arc::new(AtomicBool::new(false));
    let relay = replication_relay(master.port, cut.clone()).await.to_string();
    let replica = RedisProc::start_with(&["--replicaof", "127.0.0.1", &relay]);
    let online = |p: &str| {
        let out = std::process::Command::new("redis-cli").args(["-p", p, "INFO", "replication"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("state=online")
    };
    assert!(wait_until(Duration::from_secs(10), || async { online(&port) }).await, "replica in sync");
    let sentinels = Sentinels::start(master.port, 3, 2);
    let url = sentinels.url();
    let edges: Vec<EdgeProc> = (0..2).map(|_| edge_at(&url, &["--min-replicas-acked", "1"])).collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    let room = "sent";
    let want = Arc::new(AtomicU64::new(u64::MAX));
    let mut members = Vec::new();
    for e in &edges {
        for _ in 0..3 {
            let (url, want) = (e.url(&format!("?room={room}")), want.clone());
            members.push(tokio::spawn(async move {
                let mut ws = connect(&url, None).await;
                expect_joined(&mut ws, room).await;
                // Gifts (seq, n), chat seqs, and gaps announced, as received.
                let (mut seen, mut chats, mut gaps) = (Vec::<(u64, u64)>::new(), Vec::new(), Vec::new());
                let end = Instant::now() + Duration::from_secs(120);
                while seen.last().is_none_or(|&(s, _)| s < want.load(Ordering::Relaxed)) {
                    assert!(Instant::now() < end, "only {seen:?}");
                    match tokio::time::timeout(Duration::from_millis(200), next_msg(&mut ws)).await {
                        Err(_) => {}
                        Ok(Some(ServerMsg::Batch { messages, .. })) => {
                            for m in messages {
                                let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
                                if m.kind == "chat" {
                                    chats.push(m.seq);
                                } else {
                                    seen.push((m.seq, body["n"].as_u64().unwrap()));
                                }
                            }
                        }
                        Ok(Some(ServerMsg::Gap { from, to, .. })) => gaps.push((from, to)),
                        Ok(other) => panic!("{other:?} after {seen:?}"),
                    }
                }
                (seen, chats, gaps)
            }));
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = pubs[0].get(&format!("/v1/rooms/{room}")).await;
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["online"].as_u64() == Some(6))
        })
        .await,
        "members joined"
    );
    const GIFTS: u64 = 300;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (pubs, acked) = (pubs.clone(), acked.clone());
        tokio::spawn(async move {
            let mut gifts = Vec::new();
            for n in 0..GIFTS {
                let key = format!("s-{n}");
                let end = Instant::now() + Duration::from_secs(60);
                let seq = loop {
                    let p = &pubs[n as usize % 2];
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        p.publish_with(room, "gift", json!({ "n": n }), &[("Idempotency-Key", key.as_str())]),
                    )
                    .await;
                    if let Ok((200, _, v)) = r {
                        break v["seq"].as_u64().unwrap();
                    }
                    assert!(Instant::now() < end, "gift {n} never acknowledged: {r:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                gifts.push((seq, n));
                acked.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            gifts
        })
    };
    assert!(wait_until(Duration::from_secs(30), || async { acked.load(Ordering::Relaxed) >= 60 }).await);
    let mut chat_seq = None;
    if kill {
        // The replica falls behind first: nothing the master numbers now reaches it. Without
        // bus.min_replicas_acked those gifts would be acknowledged, shown to members, and gone
        // with the master (this test then fails: members are reset); with it they are refused
        // (503) and retried until the promoted replica has a replica again.
        cut.store(true, Ordering::Relaxed);
        let seq_on =
            |port: u16| redis_cli(port, &["HGET", &format!("rc:{{{room}}}:meta"), "seq"]).trim().parse::<u64>().ok();
        assert!(
            wait_until(Duration::from_secs(30), || async { seq_on(master.port) > seq_on(replica.port) }).await,
            "the master numbered gifts its replica never got"
        );
        // Chat is not waited for: the master numbers it and members see it at once; it dies
        // with the master. Without the failover fence the promoted replica then hands its seq
        // to the next gift, which every member that saw the chat skips as already seen (a
        // gift lost); and the gift waiting for its replica, which members got from a fill,
        // came again under another seq once retried (a duplicate).
        let (status, _, v) = pubs[0].publish_with(room, "chat", json!({ "text": "lost with the master" }), &[]).await;
        assert_eq!(status, 200, "{v}");
        chat_seq = v["seq"].as_u64();
        master.kill();
    } else {
        redis_cli(sentinels.ports[0], &["SENTINEL", "FAILOVER", "roomcast"]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || async { sentinels.master_port() == Some(replica.port) }).await,
        "sentinel promoted the replica"
    );
    if kill {
        // The old master comes back; Sentinel makes it the new master's replica
        // (min_replicas_acked needs one).
        master.restart();
    }
    let gifts = publisher.await.unwrap();
    let seqs: Vec<u64> = gifts.iter().map(|&(s, _)| s).collect();
    // The promoted replica moved every room's seq on (the failover fence): one jump, past
    // anything the old master can have numbered alone.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "each gift acknowledged once, in order: {seqs:?}");
    let jumps: Vec<&[u64]> = seqs.windows(2).filter(|w| w[1] > w[0] + 1).collect();
    assert!(jumps.len() <= 2, "{jumps:?}");
    assert!(
        jumps.iter().any(|w| w[1] - w[0] > edge::bus::redis::FAILOVER_SEQ_SKIP),
        "the fence moved the seq on at the failover: {jumps:?}"
    );
    want.store(*seqs.last().unwrap(), Ordering::Relaxed);
    for (i, m) in members.into_iter().enumerate() {
        let (seen, chats, gaps) =
            tokio::time::timeout(Duration::from_secs(60), m).await.expect("member finished").unwrap();
        assert_eq!(seen, gifts, "member {i}: every acknowledged gift once, in order (chat {chats:?}, gaps {gaps:?})");
        // The chat the master numbered alone may reach members (live, before the master dies)
        // or not (chat may be dropped); what must not happen is its seq going to a gift.
        assert!(chat_seq.is_none_or(|c| !seqs.contains(&c)), "the lost chat's seq {chat_seq:?} went to a gift");
        assert!(!chats.iter().any(|c| seqs.contains(c)), "member {i}: a seq seen as chat went to a gift");
        for &(from, to) in &gaps {
            assert!(!seqs.iter().any(|s| (from..=to).contains(s)), "member {i}: a gap {from}..={to} over a gift");
        }
    }
    // And Redis has them all: a member joining now with `since=0` recovers every one.
    let mut late = connect(&edges[1].url(&format!("?room={room}&since=0")), None).await;
    let mut recovered = Vec::new();
    while recovered.len() < gifts.len() {
        match next_msg_within(&mut late, Duration::from_secs(10)).await {
            Some(ServerMsg::Joined { .. }) => {}
            Some(ServerMsg::Batch { messages, .. }) => {
                for m in messages {
                    let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
                    recovered.push((m.seq, body["n"].as_u64().unwrap()));
                }
            }
            other => panic!("late member: {other:?} after {recovered:?}"),
        }
    }
    assert_eq!(recovered, gifts, "recovered from Redis after the failover");
    // /healthz lists the nodes the sentinels name: the promoted replica is the primary now.
    let new_primary = format!("127.0.0.1:{}", replica.port);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = pubs[0].get("/healthz").await;
            let h: serde_json::Value = serde_json::from_str(&body).unwrap();
            h["redis_nodes"].as_array().is_some_and(|n| {
                n.iter().any(|n| n["node"] == new_primary.as_str() && n["role"] == "primary" && n["up"] == true)
            })
        })
        .await,
        "{}",
        pubs[0].get("/healthz").await.1
    );
}

/// Members sent from a drained edge to one that never followed their room come back with a
/// `since` older than anything it has: what they missed is read from Redis. A restarted edge
/// given 34,674 of them at 10^6 read Redis once per join, all at once: the reads timed out and
/// 130,950 gift deliveries were lost (bench-results/2026-12-01-restart-storm-README.md). Here
/// 200 members come back together while Redis is held for 2 s: every one gets exactly the
/// gifts after its own `since`, from a few reads of Redis rather than one (or more) each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_coming_back_together_share_their_reads_of_redis() {
    let redis = RedisProc::start();
    let old = edge_on(&redis, &[]);
    let p = Publisher::new(old.http);
    let mut gifts = Vec::new();
    for n in 0..20 {
        gifts.push(publish_gift(&p, "back", n).await);
    }
    assert_eq!(gifts, (1..=20).collect::<Vec<_>>());
    let fresh = edge_on(&redis, &[]);
    // The room is followed (synced) on the fresh edge before the others come back.
    let mut opener = connect(&fresh.url("?room=back"), None).await;
    assert_eq!(expect_joined(&mut opener, "back").await, 20);
    let xranges = || {
        let stats = redis_cli(redis.port, &["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_xrange:calls="))
            .and_then(|l| l.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = xranges();
    assert_eq!(redis_cli(redis.port, &["CLIENT", "PAUSE", "2000", "ALL"]).trim(), "OK");
    let members: Vec<_> = (0..200u64)
        .map(|i| {
            let since = [3, 5, 8][i as usize % 3];
            let url = fresh.url(&format!("?room=back&since={since}"));
            tokio::spawn(async move {
                let mut ws = connect(&url, None).await;
                let mut seen = Vec::new();
                while seen.last() != Some(&20) {
                    match next_msg_within(&mut ws, Duration::from_secs(20)).await {
                        Some(ServerMsg::Joined { .. }) => {}
                        Some(ServerMsg::Batch { messages, .. }) => seen.extend(messages.iter().map(|m| m.seq)),
                        other => panic!("member {i} (since {since}): {other:?} after {seen:?}"),
                    }
                }
                (since, seen)
            })
        })
        .collect();
    for m in members {
        let (since, seen) = m.await.unwrap();
        assert_eq!(seen, (since + 1..=20).collect::<Vec<_>>(), "since {since}");
    }
    // Redis's own count (a read retried while Redis is held counts again): one per join before.
    let calls = xranges() - before;
    assert!(calls < 100, "{calls} XRANGE calls for 200 joins");
    let fp = Publisher::new(fresh.http);
    let reads = metric(&fp, "roomcast_recovery_reads_total").await;
    let joins = metric(&fp, "roomcast_recovery_joins_total").await;
    assert_eq!(joins, 200.0);
    assert!((1.0..=10.0).contains(&reads), "{reads} reads for 200 joins");
}

/// A join on a room this edge does not follow yet waits for Redis to give the room's seq. A
/// read Redis leaves unanswered past the command timeout (3 s) is made again, and a join kept
/// waiting past its bound (10 s) is sent back with 1013, counted, to come again. A new user's
/// trial froze Redis: the first joins on a room waited without end, with no answer, and the
/// room's read was never made again while the connection stayed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_on_a_room_redis_does_not_answer_for_are_read_again_then_sent_back() {
    let redis = RedisProc::start();
    let edge = edge_on(&redis, &[]);
    let p = Publisher::new(edge.http);
    // Scripts (the room's read among them) held 5 s: the first read times out, the next one is
    // answered once Redis is back, well within the join's bound.
    assert_eq!(redis_cli(redis.port, &["CLIENT", "PAUSE", "5000", "WRITE"]).trim(), "OK");
    let mut ws = connect(&edge.url("?room=late"), None).await;
    match next_msg_within(&mut ws, Duration::from_secs(9)).await {
        Some(ServerMsg::Joined { room, .. }) => assert_eq!(room, "late"),
        other => panic!("expected joined once Redis answered the room's read again: {other:?}"),
    }
    // Held past the join's bound: sent back, with the reason counted.
    assert_eq!(redis_cli(redis.port, &["CLIENT", "PAUSE", "30000", "WRITE"]).trim(), "OK");
    let mut ws = connect(&edge.url("?room=later"), None).await;
    assert_eq!(close_code(&mut ws, Duration::from_secs(15)).await, Some(1013));
    // Counted once the edge has closed the socket, after the close's linger.
    let closed = || async {
        let (_, text) = p.get("/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("roomcast_connections_closed_total{") && l.contains("reason=\"room_unavailable\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(wait_until(Duration::from_secs(10), || async { closed().await == 1.0 }).await, "{}", closed().await);
    // Back: it comes again and joins.
    assert_eq!(redis_cli(redis.port, &["CLIENT", "UNPAUSE"]).trim(), "OK");
    let mut ws = connect(&edge.url("?room=later"), None).await;
    assert_eq!(expect_joined(&mut ws, "later").await, 0);
}

/// A drain's goaways wait while no other edge takes members: sent away, they would only meet
/// dispatch's refusals, between sockets, while the draining edge still serves them. Here the
/// only other edge is full: the members stay (and get their gifts) past the drain's period;
/// once it has room, the goaways go and every member moves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_while_no_other_edge_takes_members() {
    let redis = RedisProc::start();
    let mut a = edge_on(&redis, &["--drain-period-ms", "2000"]);
    let b = edge_at_with(&redis.url(), "[ws]\nmax_connections_per_shard = 32\n", &[]);
    let (pa, pb) = (Publisher::new(a.http), Publisher::new(b.http));
    // B's load report, as dispatch reads it.
    let report = || {
        let v = redis_cli(redis.port, &["GET", &format!("rc:edge:ws://{}/ws", b.ws)]);
        serde_json::from_str::<serde_json::Value>(v.trim()).ok()
    };
    assert!(wait_until(Duration::from_secs(10), || async { report().is_some() }).await, "B reports");
    let capacity = report().unwrap()["capacity"].as_u64().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..capacity {
        let mut ws = connect(&b.url("?room=other"), None).await;
        expect_joined(&mut ws, "other").await;
        fillers.push(ws);
    }
    assert!(
        wait_until(Duration::from_secs(10), || async { report().is_some_and(|r| r["connections"] == capacity) }).await,
        "B reports itself full"
    );
    let mut members = joined(&a, "p", 10).await;
    admin_drain(&a).await;
    // Twice the period: held, every member still here and served.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(metric(&pa, "roomcast_goaway_sent_total").await, 0.0, "no goaway while B is full");
    assert_eq!(metric(&pa, "roomcast_drain_held").await, 1.0);
    let seq = publish_gift(&pb, "p", 1).await;
    for ws in &mut members {
        match next_msg_within(ws, Duration::from_secs(5)).await {
            Some(ServerMsg::Batch { messages, .. }) => assert_eq!(messages[0].seq, seq),
            other => panic!("a held member is served: {other:?}"),
        }
    }
    // Room on B: the goaways go, and each member is sent there.
    fillers.truncate(capacity as usize - 12);
    for ws in &mut members {
        match next_msg_within(ws, Duration::from_secs(15)).await {
            Some(ServerMsg::Goaway { .. }) => {}
            other => panic!("expected goaway once B has room: {other:?}"),
        }
    }
    assert_eq!(metric(&pa, "roomcast_drain_holds_total").await, 1.0);
    assert_eq!(a.wait_exit(Duration::from_secs(15)), Some(0), "the drained edge exits 0");
}

/// Reports that cannot be read hold a drain's goaways too: dispatch routes by the same
/// reports, so members sent away would wait between sockets (a trial froze Redis mid-drain:
/// the drain sent everyone away on schedule and they waited 15 s for a route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_while_the_fleets_reports_cannot_be_read() {
    let redis = RedisProc::start();
    let mut a = edge_on(&redis, &["--drain-period-ms", "2000"]);
    let _b = edge_on(&redis, &[]);
    let pa = Publisher::new(a.http);
    let mut members = joined(&a, "p", 5).await;
    admin_drain(&a).await;
    assert_eq!(redis_cli(redis.port, &["CLIENT", "PAUSE", "8000", "ALL"]).trim(), "OK");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(metric(&pa, "roomcast_goaway_sent_total").await, 0.0, "no goaway while the reports are unread");
    assert_eq!(metric(&pa, "roomcast_drain_held").await, 1.0);
    assert_eq!(redis_cli(redis.port, &["CLIENT", "UNPAUSE"]).trim(), "OK");
    for ws in &mut members {
        match next_msg_within(ws, Duration::from_secs(15)).await {
            Some(ServerMsg::Goaway { .. }) => {}
            other => panic!("expected goaway once the reports read again: {other:?}"),
        }
    }
    assert_eq!(a.wait_exit(Duration::from_secs(15)), Some(0), "the drained edge exits 0");
}

/// `n` members of `room` on `e`, each joined.
async fn joined(e: &EdgeProc, room: &str, n: usize) -> Vec<Ws> {
    let mut members = Vec::new();
    for _ in 0..n {
        let mut ws = connect(&e.url(&format!("?room={room}")), None).await;
        expect_joined(&mut ws, room).await;
        members.push(ws);
    }
    members
}

/// Starts `e`'s drain through the admin API.
async fn admin_drain(e: &EdgeProc) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", e.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
}
