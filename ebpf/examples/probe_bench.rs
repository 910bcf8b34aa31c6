//! Cost of one look at the kernel, for each source, over the sockets on one port.
//!
//! `probe_bench --port P [--expect N] [--rounds R]` waits until N sockets on port P are
//! established (as sock_diag counts them), then takes R snapshots with the eBPF source and R with
//! sock_diag, alternating, and prints one JSON line per source: wall and on-CPU time per scan
//! (CLOCK_THREAD_CPUTIME_ID, which includes the kernel's work in read(2) and recv(2)).
//! Used by scripts/bench-probes.sh.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roomcast_ebpf::{Probes, Source, state};

/// This thread's CPU time (user + system, which includes the kernel's walk in read(2)).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    anyhow::ensure!(rc == 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let port: u16 = arg("--port").context("--port P")?.parse()?;
    let expect: u64 = arg("--expect").map(|v| v.parse()).transpose()?.unwrap_or(0);
    let rounds: usize = arg("--rounds").map(|v| v.parse()).transpose()?.unwrap_or(30);
    let mut ebpf = Probes::open_ebpf(&[port])?;
    let mut diag = Probes::open_sock_diag(&[port])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = diag.snapshot()?;
        if s.in_state(state::ESTABLISHED) >= expect {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {} of {expect} connections established", s.in_state(state::ESTABLISHED));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut wall = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    let mut last = [None, None];
    for _ in 0..rounds {
        for (i, p) in [&mut ebpf, &mut diag].into_iter().enumerate() {
            let (c0, t0) = (thread_cpu_ns()?, Instant::now());
            let snap = p.snapshot()?;
            wall[i].push(t0.elapsed().as_secs_f64() * 1e3);
            cpu[i].push((thread_cpu_ns()? - c0) as f64 / 1e6);
            last[i] = Some(snap);
        }
    }
    for i in 0..2 {
        let snap = last[i].take().context("a snapshot")?;
        let source = if i == 0 { Source::Ebpf } else { Source::SockDiag };
        println!(
            "{}",
            serde_json::json!({
                "source": source.as_str(),
                "port": port,
                "rounds": rounds,
                "sockets_watched": snap.sockets,
                "sockets_visited": snap.visited,
                "established": snap.in_state(state::ESTABLISHED),
                "wall_ms_p50": pct(&mut wall[i], 0.5),
                "wall_ms_p99": pct(&mut wall[i], 0.99),
                "wall_ms_max": pct(&mut wall[i], 1.0),
                "cpu_ms_p50": pct(&mut cpu[i], 0.5),
                "cpu_ms_p99": pct(&mut cpu[i], 0.99),
                "cpu_ns_per_socket_visited": pct(&mut cpu[i], 0.5) * 1e6 / snap.visited.max(1) as f64,
            })
        );
    }
    Ok(())
}
