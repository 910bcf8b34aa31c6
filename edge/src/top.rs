//! `edge top`: the kernel's view of a running edge, refreshed every second, like `ss` + `top`.
//!
//! It reads the edge's `GET /v1/kernel` (so it needs no privileges and shows exactly what the
//! health policy sees) and renders one screen of text.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// Fetches `/v1/kernel` from the edge's HTTP address.
pub fn fetch(http: SocketAddr) -> anyhow::Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(format!("http://{http}/v1/kernel")).call()?;
    if resp.status() != 200 {
        anyhow::bail!("{http} answered {}", resp.status());
    }
    Ok(serde_json::from_reader(resp.body_mut().as_reader())?)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn bytes(n: f64) -> String {
    match n {
        n if n >= 1024.0 * 1024.0 => format!("{:.1}M", n / 1024.0 / 1024.0),
        n if n >= 1024.0 => format!("{:.1}K", n / 1024.0),
        n => format!("{n:.0}"),
    }
}

/// One screen from a `/v1/kernel` answer (and the one before it, `secs` earlier, for rates).
pub fn render(k: &Value, prev: Option<(&Value, f64)>, http: SocketAddr) -> String {
    let h = &k["health"];
    let mut o = String::new();
    let status = h["status"].as_str().unwrap_or("?");
    o.push_str(&format!(
        "roomcast edge {http}   health: {}   probes: {}   connections: {}{}\n",
        status.to_uppercase(),
        h["source"].as_str().unwrap_or("none"),
        k["connections"],
        if k["draining"].as_bool() == Some(true) { "   DRAINING" } else { "" },
    ));
    for r in h["reasons"].as_array().into_iter().flatten() {
        o.push_str(&format!("  - {}\n", r.as_str().unwrap_or("")));
    }
    // Traffic: rates from the cumulative totals of two answers.
    let t = &k["totals"];
    let total = |v: &Value, name: &str| -> f64 {
        match &v["totals"][name] {
            Value::Object(m) => m.values().map(num).sum(),
            x => num(x),
        }
    };
    let per_s = |name: &str| match prev {
        Some((p, secs)) if secs > 0.0 => format!("{:.0}/s", ((total(k, name) - total(p, name)) / secs).max(0.0)),
        _ => "-".to_owned(),
    };
    if !t.is_null() {
        o.push_str(&format!(
            "\nrooms {}   messages in {}   deliveries {}   publishes refused {}   dropped {}   goaways {}   slow closes {}\n",
            num(&t["rooms"]) as u64,
            per_s("messages_in"),
            per_s("messages_delivered"),
            per_s("publish_rejected"),
            per_s("messages_dropped"),
            per_s("goaways"),
            per_s("slow_consumer_closes"),
        ));
        for r in k["top_rooms"].as_array().into_iter().flatten().take(5) {
            let shown = match r["sampling_visible_rate"].as_f64() {
                Some(v) => format!("  chat shown {v:.1}/s"),
                None => String::new(),
            };
            o.push_str(&format!(
                "  {:<24} {:>8} members {:>8.1} msgs/s  window {} ms{shown}\n",
                r["room"].as_str().unwrap_or("?"),
                r["members"],
                num(&r["publish_rate"]),
                r["window_ms"],
            ));
        }
    }
    let s = &k["snapshot"];
    if s.is_null() {
        o.push_str("\n(no kernel snapshot yet)\n");
        return o;
    }
    let rates = &h["rates"];
    let rate = |v: &Value| if v.is_null() { "-".to_string() } else { format!("{:.1}/s", num(v)) };
    o.push_str(&format!(
        "\nsockets {}   scan {} µs   opened {}   closed {}   ->close_wait {}   retransmits {} ({})   listen drops {}\n",
        s["sockets"],
        s["scan_us"],
        rate(&rates["opened_per_s"]),
        rate(&rates["closed_per_s"]),
        rate(&rates["close_wait_entered_per_s"]),
        s["retransmits"],
        rate(&rates["retransmits_per_s"]),
        rate(&rates["listen_drops_per_s"]),
    ));
    o.push_str("\nSTATE         SOCKETS\n");
    let names = roomcast_ebpf::STATE_NAMES;
    for (i, n) in s["states"].as_array().into_iter().flatten().enumerate().skip(1) {
        if num(n) > 0.0 {
            o.push_str(&format!("{:<12} {:>8}\n", names.get(i).copied().unwrap_or("?"), num(n) as u64));
        }
    }
    for (name, q) in [("Send-Q", &s["send_queue"]), ("Recv-Q", &s["recv_queue"])] {
        let count = num(&q["sockets"]).max(1.0);
        o.push_str(&format!(
            "\n{name}: sum {}  mean {}  max {}\n",
            bytes(num(&q["sum"])),
            bytes(num(&q["sum"]) / count),
            bytes(num(&q["max"]))
        ));
        let buckets: Vec<f64> = q["buckets"].as_array().into_iter().flatten().map(num).collect();
        let peak = buckets.iter().copied().fold(1.0, f64::max);
        for (i, n) in buckets.iter().enumerate().filter(|(_, n)| **n > 0.0) {
            let upto = roomcast_ebpf::QueueStats::upper_bound(i).map_or("inf".into(), |u| bytes(u as f64));
            let bar = "#".repeat(((n / peak) * 40.0).ceil() as usize);
            o.push_str(&format!("  <= {upto:>7} {n:>8} {bar}\n"));
        }
    }
    o.push_str("\nLISTEN PORT   ACCEPT QUEUE   LIMIT   SOCKETS   FULLEST\n");
    for l in s["listeners"].as_array().into_iter().flatten() {
        let [port, backlog, max, socks] = [&l["port"], &l["backlog"], &l["backlog_max"], &l["sockets"]].map(num);
        let (f, fm) = (num(&l["fullest"]), num(&l["fullest_max"]));
        o.push_str(&format!("{port:<13} {backlog:>12} {max:>7} {socks:>9}   {f}/{fm}\n"));
    }
    o.push_str(&format!("ListenOverflows {}   ListenDrops {}\n", s["listen_overflows"], s["listen_drops"]));
    let peers = s["top_retransmits"].as_array().cloned().unwrap_or_default();
    if !peers.is_empty() {
        o.push_str("\nPEER                                     RETRANSMITS\n");
        for p in peers {
            o.push_str(&format!("{:<40} {:>11}\n", p["addr"].as_str().unwrap_or("?"), num(&p["retransmits"])));
        }
    }
    o
}

/// Refreshes once a second until interrupted (`once`: print one screen and return; it reads
/// twice, a second apart, so that it has rates).
pub fn run(http: SocketAddr, once: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let mut prev: Option<(Value, std::time::Instant)> = None;
    if once {
        prev = Some((fetch(http)?, std::time::Instant::now()));
        std::thread::sleep(Duration::from_secs(1));
    }
    let terminal = std::io::stdout().is_terminal();
    loop {
        let screen = match fetch(http) {
            Ok(k) => {
                let now = std::time::Instant::now();
                let screen = render(&k, prev.as_ref().map(|(p, at)| (p, now.duration_since(*at).as_secs_f64())), http);
                prev = Some((k, now));
                screen
            }
            Err(e) if once => return Err(e),
            Err(e) => format!("roomcast edge {http}: {e}\n"),
        };
        if once {
            print!("{screen}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then draw (into a pipe or a file: screens one
        // after another, no escape codes).
        if terminal {
            print!("\x1b[H\x1b[2J{screen}");
        } else {
            println!("{screen}");
        }
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_states_queues_and_listeners() {
        let k = serde_json::json!({
            "connections": 3, "draining": false,
            "health": { "status": "degraded", "reasons": ["close_wait 300 >= 256 (degraded)"], "source": "ebpf",
                        "rates": { "retransmits_per_s": 1.5, "opened_per_s": 2.0, "closed_per_s": 0.0,
                                   "close_wait_entered_per_s": 0.0, "listen_drops_per_s": 0.0 } },
            "snapshot": { "sockets": 4, "scan_us": 120, "retransmits": 7,
                          "states": [0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0],
                          "send_queue": { "sockets": 3, "sum": 2048, "max": 2048, "buckets": [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] },
                          "recv_queue": { "sockets": 3, "sum": 0, "max": 0, "buckets": [3] },
                          "listeners": [{ "port": 8080, "backlog": 1, "backlog_max": 4096, "sockets": 2 }],
                          "listen_overflows": 0, "listen_drops": 0,
                          "top_retransmits": [{ "addr": "10.0.0.1", "retransmits": 7 }] }
        });
        let mut before = k.clone();
        before["totals"] = serde_json::json!({ "rooms": 2, "messages_in": 100, "messages_delivered": 1000,
            "publish_rejected": { "bad_json": 1 }, "messages_dropped": {}, "goaways": 0, "slow_consumer_closes": 0 });
        let mut k = k;
        k["totals"] = serde_json::json!({ "rooms": 2, "messages_in": 150, "messages_delivered": 3000,
            "publish_rejected": { "bad_json": 3 }, "messages_dropped": {}, "goaways": 0, "slow_consumer_closes": 0 });
        k["top_rooms"] =
            serde_json::json!([{ "room": "lobby", "members": 40, "publish_rate": 9.5, "window_ms": 100, "seq": 7 }]);
        let out = render(&k, Some((&before, 2.0)), "127.0.0.1:8081".parse().unwrap());
        assert!(out.contains("messages in 25/s   deliveries 1000/s   publishes refused 1/s"), "{out}");
        assert!(out.contains("lobby") && out.contains("40 members"), "{out}");
        assert!(out.contains("health: DEGRADED"), "{out}");
        assert!(out.contains("close_wait 300 >= 256"));
        assert!(out.contains("close_wait          1"), "{out}");
        assert!(out.contains("<=    4.0K        1"), "{out}");
        assert!(out.contains("8080"));
        assert!(out.contains("10.0.0.1"));
        assert!(out.contains("retransmits 7 (1.5/s)"));
    }

    /// One canned HTTP answer on a local listener; returns its address.
    fn serve_once(answer: &'static str) -> SocketAddr {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "GET /v1/kernel HTTP/1.1\r\n");
            while line != "\r\n" {
                line.clear();
                r.read_line(&mut line).unwrap();
            }
            s.write_all(answer.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn fetch_reads_the_kernel_answer_and_refuses_an_error_status() {
        let body = r#"{"connections":3,"health":{"status":"ok"}}"#;
        let ok: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let k = fetch(serve_once(ok)).unwrap();
        assert_eq!(k["connections"], 3);
        assert_eq!(k["health"]["status"], "ok");
        let err = fetch(serve_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")).unwrap_err();
        assert!(err.to_string().contains("answered 503"), "{err}");
        // Nothing listening: an error, not a hang.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(fetch(closed).is_err());
    }
}
