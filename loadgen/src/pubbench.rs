//! `loadgen pubbench`: a closed-loop publish benchmark against the edge's HTTP API.
//!
//! `--concurrency` clients (tasks on a tokio runtime sharing one keep-alive `reqwest` pool)
//! each publish back to back: the next request leaves as soon as the previous one is answered,
//! so the rate found is what the edge sustains at that concurrency (the paced publisher of
//! `run` only offers a fixed rate). Rooms are taken round robin over all clients. After
//! `--warmup` seconds (connections made, rooms created, not counted) it measures for
//! `--duration` seconds: publishes answered 200 per second, acknowledgement latency (request
//! sent to answer read, hdrhistogram), every other answer by status (no retries: a refusal is
//! counted and the client goes on), and the edge's CPU (utime + stime of `--server-pid`, all
//! threads, from /proc/PID/stat) per accepted publish, beside the generator's own.
//!
//! An edge with publish keys answers 401 without one: the key comes from the same places as
//! `run`'s (`ROOMCAST_API_KEY`, or `--api-key-file`: [`crate::publish::KeyArgs`]), never from
//! the command line, and is never printed; the result records where it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::Percentiles;
use crate::stats::histogram;

// Numeric flags take a value with a leading '-', so a negative number gets the flag's own
// error rather than clap's "unexpected argument" (as `run`'s do).
#[derive(clap::Args, Clone, Debug)]
pub struct PubbenchArgs {
    /// The edge's HTTP API (host:port).
    #[arg(long)]
    http: SocketAddr,
    /// Rooms, taken round robin: `<room-prefix>0` .. `<room-prefix>N-1`; at least 1.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one::<u32>, allow_negative_numbers = true)]
    rooms: u32,
    #[arg(long, default_value = "pb")]
    room_prefix: String,
    /// Clients, each with one request in flight; at least 1.
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one::<usize>, allow_negative_numbers = true)]
    concurrency: usize,
    /// Measured seconds, above 0.
    #[arg(long, default_value_t = 10.0, value_parser = crate::positive_seconds, allow_negative_numbers = true)]
    duration: f64,
    /// Seconds published before measuring (not counted).
    #[arg(long, default_value_t = 1.0, value_parser = crate::seconds, allow_negative_numbers = true)]
    warmup: f64,
    /// Kind published (the edge's default config makes `gift` must-deliver).
    #[arg(long, default_value = "gift")]
    kind: String,
    /// Size of the message body (the JSON value of `body`), bytes, at least 8.
    #[arg(long, default_value_t = 64, value_parser = body_bytes, allow_negative_numbers = true)]
    body_bytes: usize,
    /// Edge process whose CPU is measured (refused when no such process is running).
    #[arg(long, value_parser = crate::process_id, allow_negative_numbers = true)]
    server_pid: Option<u32>,
    /// Generator threads (tokio workers), at least 1; 1 leaves the other CPU of a 2-vCPU box
    /// to the edge.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one::<usize>, allow_negative_numbers = true)]
    threads: usize,
    /// Writes the result (JSON) here too.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free text recorded in the result.
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    key: crate::publish::KeyArgs,
}

#[derive(Debug, serde::Serialize)]
struct Second {
    t_s: f64,
    accepted: u64,
    other: u64,
    /// Slowest acknowledgement answered in this second, ms (a stall shows here).
    max_ack_ms: f64,
}

/// One client's figures over the measured window.
#[derive(Default)]
struct ClientResult {
    hist: Option<Histogram<u64>>,
    answers: BTreeMap<u16, u64>,
    errors: u64,
    accepted: u64,
}

fn ticks(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `--body-bytes`: at least 8 (the body is `{"p":"..."}`), refused as the flag's own error.
fn body_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("{e}"))?;
    if n >= 8 { Ok(n) } else { Err(format!("at least 8 (the body is {{\"p\":\"...\"}}), not {n}")) }
}

pub fn run(a: &PubbenchArgs) -> anyhow::Result<()> {
    // On stderr: stdout is the result (JSON).
    let key = a.key.load()?.map(|(k, line)| {
        eprintln!("{line}");
        k
    });
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads).enable_all().build()?
    };
    rt.block_on(bench(a, key.as_ref()))
}

async fn bench(a: &PubbenchArgs, key: Option<&crate::publish::ApiKey>) -> anyhow::Result<()> {
    let auth = key.map(crate::publish::ApiKey::header);
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(a.concurrency).timeout(Duration::from_secs(10)).build()?;
    // `{"kind":K,"user":"","body":{"p":"xxx"}}`, the body value exactly body_bytes long.
    let body = format!(r#"{{"p":"{}"}}"#, "x".repeat(a.body_bytes - 8));
    let payload = format!(r#"{{"kind":"{}","user":"","body":{body}}}"#, a.kind);
    let urls: Arc<[String]> =
        (0..a.rooms).map(|r| format!("http://{}/v1/rooms/{}{r}/messages", a.http, a.room_prefix)).collect();
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let next = Arc::new(AtomicU64::new(0));
    let accepted_now = Arc::new(AtomicU64::new(0));
    let other_now = Arc::new(AtomicU64::new(0));
    let max_now = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::with_capacity(a.concurrency);
    for _ in 0..a.concurrency {
        let (client, urls, payload, next) = (client.clone(), urls.clone(), payload.clone(), next.clone());
        let auth = auth.clone();
        let (accepted_now, other_now, max_now) = (accepted_now.clone(), other_now.clone(), max_now.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult { hist: Some(histogram()), ..ClientResult::default() };
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return r;
                }
                let room = (next.fetch_add(1, Ordering::Relaxed) % urls.len() as u64) as usize;
                let mut req = client.post(&urls[room]).header("Content-Type", "application/json");
                if let Some(auth) = &auth {
                    req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
                }
                let answer = req.body(payload.clone()).send().await;
                // The answer's body is read: the acknowledgement is complete only then.
                let status = match answer {
                    Ok(resp) => {
                        let s = resp.status().as_u16();
                        resp.bytes().await.ok().map(|_| s)
                    }
                    Err(_) => None,
                };
                let done = Instant::now();
                let counted = sent >= measure_from && done <= end;
                max_now.fetch_max(done.duration_since(sent).as_micros() as u64, Ordering::Relaxed);
                match status {
                    Some(200) => {
                        accepted_now.fetch_add(1, Ordering::Relaxed);
                        if counted {
                            r.accepted += 1;
                            let us = done.duration_since(sent).as_micros().max(1) as u64;
                            let _ = r.hist.as_mut().map(|h| h.record(us));
                        }
                    }
                    Some(s) => {
                        other_now.fetch_add(1, Ordering::Relaxed);
                        if counted {
                            *r.answers.entry(s).or_default() += 1;
                        }
                    }
                    None => {
                        other_now.fetch_add(1, Ordering::Relaxed);
                        if counted {
                            r.errors += 1;
                        }
                        // A refused connection must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }

    // Per-second progress, and the CPU readings at the window's edges.
    let mut seconds = Vec::new();
    tokio::time::sleep_until(measure_from.into()).await;
    let (edge0, own0) = (ticks(a.server_pid), ticks(None));
    let (mut last_acc, mut last_other) = (accepted_now.load(Ordering::Relaxed), other_now.load(Ordering::Relaxed));
    max_now.store(0, Ordering::Relaxed);
    let mut tick = measure_from;
    while tick < end {
        tick = (tick + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(tick.into()).await;
        let (acc, other) = (accepted_now.load(Ordering::Relaxed), other_now.load(Ordering::Relaxed));
        let s = Second {
            t_s: tick.duration_since(measure_from).as_secs_f64(),
            accepted: acc - last_acc,
            other: other - last_other,
            max_ack_ms: max_now.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        };
        eprintln!("t={:5.1}s accepted={} other={} max_ack={:.1}ms", s.t_s, s.accepted, s.other, s.max_ack_ms);
        seconds.push(s);
        (last_acc, last_other) = (acc, other);
    }
    let (edge1, own1) = (ticks(a.server_pid), ticks(None));
    let window = Instant::now().duration_since(measure_from).as_secs_f64();

    let mut hist = histogram();
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let (mut accepted, mut errors) = (0u64, 0u64);
    for t in tasks {
        let r = t.await?;
        if let Some(h) = &r.hist {
            hist.add(h).expect("same bounds");
        }
        for (s, n) in r.answers {
            *answers.entry(s.to_string()).or_default() += n;
        }
        accepted += r.accepted;
        errors += r.errors;
    }
    let hz = clk_tck();
    let edge_cpu_s = edge0.zip(edge1).map(|(x, y)| (y - x) as f64 / hz);
    let own_cpu_s = own0.zip(own1).map(|(x, y)| (y - x) as f64 / hz);
    let per = |cpu: Option<f64>| cpu.filter(|_| accepted > 0).map(|c| c * 1e6 / accepted as f64);
    let result = serde_json::json!({
        "label": a.label,
        "http": a.http.to_string(),
        "kind": a.kind,
        "rooms": a.rooms,
        "concurrency": a.concurrency,
        "generator_threads": a.threads.max(1),
        "warmup_s": a.warmup,
        "duration_s": a.duration,
        "body_bytes": a.body_bytes,
        "request_body_bytes": payload.len(),
        "accepted": accepted,
        "accepted_per_s": accepted as f64 / a.duration,
        "ack_ms": Percentiles::of(&hist),
        "ack_mean_ms": hist.mean() / 1000.0,
        "other_answers": answers,
        "transport_errors": errors,
        "edge_cpu_s": edge_cpu_s,
        "edge_cpu_cores": edge_cpu_s.map(|c| c / window),
        "edge_cpu_us_per_publish": per(edge_cpu_s),
        "generator_cpu_s": own_cpu_s,
        "generator_cpu_us_per_publish": per(own_cpu_s),
        "clock_ticks_per_s": hz,
        "per_second": seconds,
        "publish_api_key": key.map(crate::publish::ApiKey::source),
    });
    let text = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &a.out {
        std::fs::write(path, &text)?;
    }
    println!("{text}");
    // A 401 says what to do about the key (the counts are in other_answers).
    let refused: Vec<String> = answers.iter().map(|(s, n)| format!("{} {s}: {n}", a.kind)).collect();
    let hint = crate::publish::key_hint(&refused, key);
    if !hint.is_empty() {
        eprintln!("pubbench: publishes were refused 401{hint}");
    }
    Ok(())
}
