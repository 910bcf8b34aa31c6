//! The edge's HTTP side: publishing, reading /metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Publisher {
    client: reqwest::Client,
    base: String,
}

impl Publisher {
    pub fn new(http: SocketAddr) -> Self {
        Self { client: reqwest::Client::new(), base: format!("http://{http}") }
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let r = self.client.post(format!("{}{path}", self.base)).body(body).send().await.expect("http");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// POSTs `body` to `path` with extra request headers; returns the status and the JSON body.
    pub async fn post_with(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let mut r = self.client.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.send().await.expect("http");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Publishes with extra request headers; returns the status, the response's headers and
    /// its JSON body.
    pub async fn publish_with(
        &self,
        room: &str,
        kind: &str,
        body: serde_json::Value,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let req = serde_json::json!({ "kind": kind, "body": body });
        let mut r = self.client.post(format!("{}/v1/rooms/{room}/messages", self.base)).body(req.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.send().await.expect("http");
        let (status, h) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().await.unwrap_or_default();
        (status, h, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Publishes and returns the assigned seq (panics unless 200).
    pub async fn publish(&self, room: &str, kind: &str, body: serde_json::Value) -> u64 {
        let req = serde_json::json!({ "kind": kind, "body": body });
        let (status, v) = self.post_raw(&format!("/v1/rooms/{room}/messages"), req.to_string().into_bytes()).await;
        assert_eq!(status, 200, "publish failed: {v}");
        v["seq"].as_u64().expect("seq")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("http");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }
}

/// Reads one metric's value summed over its label sets from /metrics.
pub async fn metric(p: &Publisher, name: &str) -> f64 {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Publishes a gift of body `{"n": n}`, retrying while the edge answers 503 (nothing numbered:
/// the bus or store is unavailable) for up to 30 s, as a publisher that must not lose a gift
/// does; returns its seq. Any other answer fails the test.
pub async fn publish_gift(p: &Publisher, room: &str, n: u64) -> u64 {
    let body = serde_json::json!({ "kind": "gift", "body": { "n": n } }).to_string().into_bytes();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = p.post_raw(&format!("/v1/rooms/{room}/messages"), body.clone()).await;
        match status {
            200 => return v["seq"].as_u64().expect("seq"),
            503 if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => panic!("publish failed: {status} {v}"),
        }
    }
}
