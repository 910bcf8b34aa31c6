//! Per-thread CPU accounting with perf counters (perf_event_open through `perf-event2`).
//!
//! Each counted thread (the shards, the publish API's, the store's) opens its own counters for
//! itself, kernel included (a shard's sends are mostly kernel time): task-clock (CPU time, ns),
//! context switches and migrations, which every Linux kernel has in software, and CPU cycles,
//! instructions and cache misses where the CPU exposes hardware counters (this VM does not).
//! A counter the kernel refuses (no PMU, `perf_event_paranoid`, a seccomp filter) is absent:
//! its series is not exported and `roomcast_perf_event_available{event}` says 0; nothing
//! stops the edge from starting. /metrics gets the totals per thread
//! (`roomcast_thread_cpu_seconds_total{thread}` from task-clock, `roomcast_thread_<counter>_total`
//! for the others), so a benchmark reads CPU per delivery per thread from task-clock instead of
//! sampling /proc.

use perf_event::events::{Hardware, Software};
use perf_event::{Builder, Counter};
use prometheus::{CounterVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The counters, in order.
pub const KINDS: [&str; 6] =
    ["task_clock", "context_switches", "cpu_migrations", "cycles", "instructions", "cache_misses"];

/// The families the counters feed.
#[derive(Clone)]
pub struct PerfFamilies {
    /// Which counters this kernel and CPU allow (1) or refuse (0).
    pub available: IntGaugeVec,
    /// CPU time per thread, from task-clock (seconds).
    pub cpu_seconds: CounterVec,
    /// The other counters per thread: index i-1 for `KINDS[i]`.
    pub counts: Vec<IntCounterVec>,
}

impl PerfFamilies {
    /// Creates the families and registers them in `r`.
    ///
    /// # Panics
    ///
    /// If `r` already holds a family of the same name (registered twice: a bug).
    pub fn register(r: &Registry) -> Self {
        let available = IntGaugeVec::new(
            Opts::new("perf_event_available", "Per-thread perf events this kernel and CPU allow (1) or refuse (0).")
                .namespace("roomcast"),
            &["event"],
        )
        .expect("valid metric");
        r.register(Box::new(available.clone())).expect("unique metric");
        let cpu_seconds = CounterVec::new(
            Opts::new("thread_cpu_seconds_total", "CPU time of each edge thread, kernel included (perf task-clock).")
                .namespace("roomcast"),
            &["thread"],
        )
        .expect("valid metric");
        r.register(Box::new(cpu_seconds.clone())).expect("unique metric");
        let counts = KINDS[1..]
            .iter()
            .map(|k| {
                let c = IntCounterVec::new(
                    Opts::new(format!("thread_{k}_total"), format!("{k} of each edge thread (perf counter)."))
                        .namespace("roomcast"),
                    &["thread"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            })
            .collect();
        Self { available, cpu_seconds, counts }
    }
}

fn open(i: usize) -> std::io::Result<Counter> {
    let mut b = match i {
        0 => Builder::new(Software::TASK_CLOCK),
        1 => Builder::new(Software::CONTEXT_SWITCHES),
        2 => Builder::new(Software::CPU_MIGRATIONS),
        3 => Builder::new(Hardware::CPU_CYCLES),
        4 => Builder::new(Hardware::INSTRUCTIONS),
        _ => Builder::new(Hardware::CACHE_MISSES),
    };
    let mut c = b.include_kernel().build()?;
    c.enable()?;
    Ok(c)
}

/// The calling thread's counters and their last readings.
pub struct ThreadCounters {
    thread: String,
    counters: Vec<Option<(Counter, u64)>>,
}

impl ThreadCounters {
    /// Opens every counter the kernel allows for the calling thread, labelled `thread` (a
    /// bounded set: "shard-N", "http", "store"), and records which are available.
    pub fn open_for_this_thread(thread: &str, f: &PerfFamilies) -> Self {
        let counters = (0..KINDS.len())
            .map(|i| {
                let c = open(i).ok().map(|c| (c, 0));
                f.available.with_label_values(&[KINDS[i]]).set(i64::from(c.is_some()));
                if c.is_some() {
                    // The thread's series exists from the start (at 0), not from its first count.
                    match i {
                        0 => drop(f.cpu_seconds.with_label_values(&[thread])),
                        _ => drop(f.counts[i - 1].with_label_values(&[thread])),
                    }
                }
                c
            })
            .collect::<Vec<_>>();
        if thread == "shard-0" {
            let (on, off): (Vec<_>, Vec<_>) = KINDS.iter().zip(&counters).partition(|(_, c)| c.is_some());
            let names = |v: Vec<(&&str, _)>| v.into_iter().map(|(k, _)| *k).collect::<Vec<_>>().join(",");
            tracing::info!(counted = %names(on), absent = %names(off), "perf counters per thread");
        }
        Self { thread: thread.to_owned(), counters }
    }

    /// Adds what each counter counted since the last call to the thread's series.
    pub fn publish(&mut self, f: &PerfFamilies) {
        for (i, slot) in self.counters.iter_mut().enumerate() {
            let Some((c, last)) = slot else { continue };
            let Ok(now) = c.read() else { continue };
            let d = now.saturating_sub(*last);
            *last = now;
            if d == 0 {
                continue;
            }
            let thread = [self.thread.as_str()];
            match i {
                0 => f.cpu_seconds.with_label_values(&thread).inc_by(d as f64 / 1e9),
                _ => f.counts[i - 1].with_label_values(&thread).inc_by(d),
            }
        }
    }

    /// Task-clock so far (ns), if counted.
    pub fn task_clock_ns(&self) -> Option<u64> {
        self.counters.first()?.as_ref().map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Task-clock counts this thread's CPU time: after 50 ms of this thread's CPU (however
    /// long that takes on a busy machine), task-clock agrees with the thread's CPU clock (the
    /// software counter exists on every Linux kernel the edge runs on).
    #[test]
    fn task_clock_counts_this_threads_cpu() {
        let reg = Registry::new();
        let f = PerfFamilies::register(&reg);
        let mut t = ThreadCounters::open_for_this_thread("test", &f);
        // Every counted event has its series from the start (a scrape shows migrations at 0).
        let series =
            |name: &str| reg.gather().iter().filter(|m| m.name() == name).map(|m| m.get_metric().len()).sum::<usize>();
        assert_eq!(series("roomcast_thread_cpu_migrations_total"), 1);
        assert_eq!(f.available.with_label_values(&["task_clock"]).get(), 1, "task-clock is a software counter");
        let start = crate::sys::thread_cpu_time();
        let mut x = 0u64;
        while crate::sys::thread_cpu_time().checked_sub(start).unwrap() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        t.publish(&f);
        let cpu = crate::sys::thread_cpu_time().checked_sub(start).unwrap().as_secs_f64();
        let secs = f.cpu_seconds.with_label_values(&["test"]).get();
        assert!(secs >= 0.9 * 0.05 && secs <= cpu * 1.1 + 0.01, "task-clock {secs} s, thread CPU {cpu} s");
        assert!(t.task_clock_ns().is_some_and(|ns| ns >= 45_000_000));
    }
}
