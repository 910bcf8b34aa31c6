//! TLS benchmarks, ignored by default (they take minutes and want the machine to themselves):
//! bench-results/2026-11-30-tls.md has the figures, the machine and the command:
//!
//! ```sh
//! ulimit -n 65536; touch /tmp/roomcast-bench.lock
//! cargo test -p edge --test tls_bench -- --ignored --nocapture --test-threads 1
//! rm /tmp/roomcast-bench.lock
//! ```
//!
//! - `handshakes`: full TLS handshakes per second against one shard (no resumption), ECDSA
//!   P-256 and RSA 2048 server certificates, and the edge's CPU per handshake (/proc/PID/stat);
//! - `delivery`: the edge's CPU per delivered message at `ROOMCAST_TLS_BENCH_MEMBERS` (10^4)
//!   members of one room, plain ws vs wss (user-space encryption), and its resident memory per
//!   connection. The clients read and discard (no WebSocket parsing): what is measured is the
//!   edge's share, read from its own counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roomcast_testsupport::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The edge's CPU time (user + system) so far.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: u64 = String::from_utf8(std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// The edge's resident memory, bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn no_resumption(pki: &TestPki) -> Arc<rustls::ClientConfig> {
    let mut c = (*pki.client_config()).clone();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "benchmark: bench-results/2026-11-30-tls.md"]
async fn handshakes() {
    const CONCURRENCY: usize = 16;
    const SECONDS: u64 = 10;
    for alg in [KeyAlg::EcdsaP256, KeyAlg::Rsa2048] {
        let pki = TestPki::new("bench-hs");
        pki.issue(1, "bench", alg);
        let edge = EdgeProc::start(&["--shards", "1", "--tls-cert", &pki.cert_path(), "--tls-key", &pki.key_path()]);
        let cfg = no_resumption(&pki);
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let cpu0 = cpu_of(edge.child.id());
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(SECONDS);
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (cfg, done, failed, addr) = (cfg.clone(), done.clone(), failed.clone(), edge.ws);
            tasks.push(tokio::spawn(async move {
                let connector = tokio_rustls::TlsConnector::from(cfg);
                while Instant::now() < end {
                    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                    match connector.connect(name, tcp).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_of(edge.child.id()).saturating_sub(cpu0).as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        println!(
            "handshakes {alg:?}: {n} in {wall:.1} s = {:.0}/s (clients on the same 2 CPUs); edge CPU {:.0} us per handshake \
             = {:.0} handshakes per edge CPU-second; failed {}",
            n as f64 / wall,
            cpu * 1e6 / n as f64,
            n as f64 / cpu,
            failed.load(Ordering::Relaxed)
        );
        assert!(n > 0);
    }
}

/// Opens `n` members of room `bench` (plain or TLS), each reading and discarding.
async fn members(addr: std::net::SocketAddr, n: usize, tls: Option<Arc<rustls::ClientConfig>>) -> Arc<AtomicU64> {
    let read = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut opening = Vec::new();
    for _ in 0..n {
        let (read, tls, permit) = (read.clone(), tls.clone(), sem.clone().acquire_owned().await.unwrap());
        opening.push(tokio::spawn(async move {
            let req = b"GET /ws?room=bench HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut buf = vec![0u8; 16 * 1024];
            match tls {
                Some(cfg) => {
                    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                    let mut s = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.expect("handshake");
                    s.write_all(req).await.unwrap();
                    drop(permit);
                    tokio::spawn(async move {
                        while let Ok(k) = s.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            read.fetch_add(k as u64, Ordering::Relaxed);
                        }
                    });
                }
                None => {
                    let mut s = tcp;
                    s.write_all(req).await.unwrap();
                    drop(permit);
                    tokio::spawn(async move {
                        while let Ok(k) = s.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            read.fetch_add(k as u64, Ordering::Relaxed);
                        }
                    });
                }
            }
        }));
    }
    for o in opening {
        o.await.unwrap();
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "benchmark: bench-results/2026-11-30-tls.md"]
async fn delivery() {
    let n: usize = std::env::var("ROOMCAST_TLS_BENCH_MEMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // 40 gifts a second for 10 s, merged into frames by the default window.
    const MESSAGES: u64 = 400;
    let pki = TestPki::new("bench-delivery");
    pki.issue(1, "bench", KeyAlg::EcdsaP256);
    for tls in [false, true] {
        let (cert, key) = (pki.cert_path(), pki.key_path());
        let mut args = vec!["--shards", "2", "--pin", "false", "--no-store"];
        if tls {
            args.extend_from_slice(&["--tls-cert", &cert, "--tls-key", &key]);
        }
        let edge = EdgeProc::start(&args);
        let p = Publisher::new(edge.http);
        let pid = edge.child.id();
        let rss0 = rss_of(pid);
        let read = members(edge.ws, n, tls.then(|| no_resumption(&pki))).await;
        assert!(
            wait_until(Duration::from_secs(120), || async { metric(&p, "roomcast_connections").await >= n as f64 })
                .await,
            "members connected"
        );
        // Every member joined: its `joined` frame was written.
        assert!(
            wait_until(Duration::from_secs(60), || async {
                metric(&p, "roomcast_frames_written_total").await >= n as f64
            })
            .await
        );
        let rss1 = rss_of(pid);
        let d0 = metric(&p, "roomcast_messages_delivered_total").await;
        let f0 = metric(&p, "roomcast_frames_written_total").await;
        let b0 = metric(&p, "roomcast_bytes_written_total").await;
        let cpu0 = cpu_of(pid);
        let t0 = Instant::now();
        for i in 0..MESSAGES {
            publish_gift(&p, "bench", i).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let want = d0 + (MESSAGES as usize * n) as f64;
        let all = wait_until(Duration::from_secs(120), || async {
            metric(&p, "roomcast_messages_delivered_total").await >= want
        })
        .await;
        let cpu = cpu_of(pid).saturating_sub(cpu0).as_secs_f64();
        let wall = t0.elapsed().as_secs_f64();
        let delivered = metric(&p, "roomcast_messages_delivered_total").await - d0;
        let frames = metric(&p, "roomcast_frames_written_total").await - f0;
        // On the wire: ciphertext with TLS (records' headers and tags included).
        let bytes = metric(&p, "roomcast_bytes_written_total").await - b0;
        assert!(read.load(Ordering::Relaxed) > 0, "the members read");
        println!(
            "delivery {}: {n} members, {delivered} messages delivered in {frames} frames over {wall:.1} s (all: {all}); \
             edge CPU {cpu:.2} s = {:.0} ns per delivered message, {:.0} ns per frame; {:.1} bytes written per message; \
             edge RSS {:.1} MiB -> {:.1} MiB with the members = {:.1} KiB per connection",
            if tls { "wss (user-space TLS)" } else { "ws (plain)" },
            cpu * 1e9 / delivered,
            cpu * 1e9 / frames,
            bytes / delivered,
            rss0 as f64 / 1_048_576.0,
            rss1 as f64 / 1_048_576.0,
            (rss1.saturating_sub(rss0)) as f64 / 1024.0 / n as f64,
        );
        drop(edge);
    }
}
