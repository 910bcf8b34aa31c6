//! One Redis with a replica and Sentinel, the smaller HA option than a cluster:
//! `bus = "redis-sentinel://[user:password@]host:port,host:port/MASTER"` names the sentinels
//! and the master's name; the password (if any) is the data nodes'.
//!
//! The bridge asks the sentinels which node is the master (`SENTINEL get-master-addr-by-name`,
//! the first sentinel that answers; the node must then say `ROLE` master) each time it connects,
//! and asks again each second while connected: when the answer changes (Sentinel announced a
//! failover) it drops its connections and connects to the new master, which is the same path
//! as a Redis restart: resubscribe, re-read every room's seq, fill from the streams. Other
//! users of the bus (load reports, dispatch, room figures) use [`SentinelConn`], which asks
//! again after an error.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, RedisError, RedisResult};

/// Sentinels and the master they watch, from a `redis-sentinel://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// `host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// `user:password@` for the data nodes (empty: none).
    pub auth: String,
}

impl SentinelTarget {
    /// The `redis://` URL of a data node.
    pub fn node_url(&self, addr: &str) -> String {
        format!("redis://{}{addr}", self.auth)
    }

    /// The master's `host:port`, as the first sentinel that knows it says, checked with the
    /// node's own `ROLE` (a sentinel may announce a master that is still being promoted).
    pub async fn master(&self) -> RedisResult<String> {
        let mut last: Option<RedisError> = None;
        for s in &self.sentinels {
            match ask(s, &self.master).await {
                Ok(Some(addr)) => {
                    return match role(&self.node_url(&addr)).await {
                        Ok(r) if r == "master" => Ok(addr),
                        Ok(r) => Err(err(format!("sentinel names {addr}, which says it is a {r}"))),
                        Err(e) => Err(e),
                    };
                }
                Ok(None) => last = Some(err(format!("sentinel {s} does not know master {:?}", self.master))),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err("no sentinel".into())))
    }
}

fn err(msg: String) -> RedisError {
    RedisError::from((::redis::ErrorKind::Io, "sentinel", msg))
}

async fn connect(url: &str) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    ::redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&config).await
}

async fn ask(sentinel: &str, master: &str) -> RedisResult<Option<String>> {
    let mut c = connect(&format!("redis://{sentinel}")).await?;
    let addr: Option<(String, u16)> =
        ::redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master).query_async(&mut c).await?;
    Ok(addr.map(|(h, p)| format!("{h}:{p}")))
}

async fn role(url: &str) -> RedisResult<String> {
    let mut c = connect(url).await?;
    let v: ::redis::Value = ::redis::cmd("ROLE").query_async(&mut c).await?;
    match v {
        ::redis::Value::Array(items) => match items.first() {
            Some(::redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(::redis::Value::SimpleString(s)) => Ok(s.clone()),
            _ => Err(err("unreadable ROLE answer".into())),
        },
        _ => Err(err("unreadable ROLE answer".into())),
    }
}

/// The nodes as the sentinels list them (the master and its replicas), each PINGed from this
/// edge, every second, into `board` (/healthz `redis_nodes`, `roomcast_redis_node_up`).
pub async fn watch_nodes(target: SentinelTarget, board: super::cluster::NodeBoard) {
    loop {
        let mut nodes = Vec::new();
        for s in &target.sentinels {
            let Ok(Some(master)) = ask(s, &target.master).await else { continue };
            nodes.push((master, "primary", false));
            if let Ok(mut c) = connect(&format!("redis://{s}")).await {
                let replicas: RedisResult<Vec<Vec<String>>> =
                    ::redis::cmd("SENTINEL").arg("replicas").arg(&target.master).query_async(&mut c).await;
                for fields in replicas.unwrap_or_default() {
                    let get = |k: &str| fields.chunks(2).find(|kv| kv[0] == k).and_then(|kv| kv.get(1)).cloned();
                    if let (Some(ip), Some(port)) = (get("ip"), get("port")) {
                        let flags = get("flags").unwrap_or_default();
                        nodes.push((
                            format!("{ip}:{port}"),
                            "replica",
                            flags.contains("s_down") || flags.contains("o_down"),
                        ));
                    }
                }
            }
            break;
        }
        let mut health = Vec::new();
        for (addr, role, failing) in nodes {
            let up = match connect(&target.node_url(&addr)).await {
                Ok(mut c) => ::redis::cmd("PING").query_async::<String>(&mut c).await.is_ok(),
                Err(_) => false,
            };
            health.push(super::cluster::NodeHealth { node: addr, role, up, failing, slots: 0, replicas: 0 });
        }
        let live_replicas = health.iter().filter(|n| n.role == "replica" && n.up && !n.failing).count();
        for n in &mut health {
            if n.role == "primary" {
                n.replicas = live_replicas;
            }
        }
        if !health.is_empty() {
            board.set(health);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A command connection that follows the master Sentinel names: connected to it on first use,
/// and asked again after a connection error or a `READONLY` (the node was demoted).
#[derive(Clone)]
pub struct SentinelConn {
    target: Arc<SentinelTarget>,
    current: Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
    response_timeout: Duration,
}

impl SentinelConn {
    /// Nothing is connected until the first command; each reply waits at most `response_timeout`.
    pub fn new(target: SentinelTarget, response_timeout: Duration) -> Self {
        Self { target: Arc::new(target), current: Arc::default(), response_timeout }
    }

    async fn conn(&self) -> RedisResult<ConnectionManager> {
        let mut cur = self.current.lock().await;
        if let Some(c) = &*cur {
            return Ok(c.clone());
        }
        let addr = self.target.master().await?;
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(self.response_timeout));
        let c = ConnectionManager::new_with_config(::redis::Client::open(self.target.node_url(&addr))?, config).await?;
        *cur = Some(c.clone());
        Ok(c)
    }

    /// After this error, is the master to be asked again?
    async fn check(&self, e: &RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.to_string().contains("READONLY")
        {
            *self.current.lock().await = None;
        }
    }
}

impl ::redis::aio::ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a ::redis::Cmd) -> ::redis::RedisFuture<'a, ::redis::Value> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let r = c.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.check(e).await;
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let r = c.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &r {
                self.check(e).await;
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
