//! Kernel figures → health: the probe thread, the policy, and the view the API and shards read.
//!
//! One thread (`roomcast-probes`) owns the [`Probes`] and looks at the kernel every
//! `probes.interval_ms`: the snapshot, the rates between the last two, and the policy's verdict
//! are published in a [`KernelView`]. Readers (/metrics, /v1/kernel, /healthz, the load report)
//! take the latest under a short lock and never touch the kernel; the shards read one atomic
//! byte when a handshake completes.
//!
//! The policy (also in ARCHITECTURE.md): each rule compares one figure with a `degraded` and
//! an `overloaded` threshold from `[health]`, and the worst rule wins:
//! - CLOSE_WAIT sockets on the edge's port (peers gone, edge not closing);
//! - the 99th percentile of Send-Q (clients not reading what the edge sends);
//! - the fullest accept queue as a fraction of its limit (shards not accepting);
//! - retransmitted segments per second (a lossy or congested path).
//!
//! The state worsens at once and improves only after `recover_after` consecutive better looks.
//! While overloaded the shards answer handshakes 503, the load report tells dispatch, and
//! (when `drain_after_overloaded_s` is set) a drain starts once it has lasted that long.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use roomcast_ebpf::{Probes, Snapshot, state};
use serde::Serialize;

use crate::config::{HealthConfig, ProbeSource, ProbesConfig};
use crate::dispatch::EdgeHealth;

/// What the policy looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Inputs {
    /// Sockets in CLOSE_WAIT: peers closed and the edge has not yet.
    pub close_wait: u64,
    /// 99th percentile of the connected sockets' unsent bytes (Send-Q).
    pub send_queue_p99_bytes: u64,
    /// Connected sockets the Send-Q percentile is taken over.
    pub send_queue_sockets: u64,
    /// Fullest listener accept queue, as a share of its backlog (0 to 1).
    pub accept_queue_fill: f64,
    /// TCP retransmits per second, as the probe source counts them.
    pub retransmits_per_s: f64,
}

/// Per-second rates between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// TCP retransmits per second.
    pub retransmits_per_s: f64,
    /// Connections opened per second (None where the probe source does not count them).
    pub opened_per_s: Option<f64>,
    /// Connections closed per second (None where the probe source does not count them).
    pub closed_per_s: Option<f64>,
    /// Sockets entering CLOSE_WAIT per second (None where the probe source does not count them).
    pub close_wait_entered_per_s: Option<f64>,
    /// The namespace's TcpExt ListenDrops per second: connections dropped before any accept.
    pub listen_drops_per_s: f64,
}

impl Rates {
    /// Rates from the counters of two snapshots taken `dt` apart.
    pub fn between(prev: &Snapshot, now: &Snapshot, dt: Duration) -> Self {
        let dt = dt.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
        let opt = |a: Option<u64>, b: Option<u64>| Some(rate(a?, b?));
        Self {
            retransmits_per_s: rate(prev.retransmits, now.retransmits),
            opened_per_s: opt(prev.opened, now.opened),
            closed_per_s: opt(prev.closed, now.closed),
            close_wait_entered_per_s: opt(prev.close_wait_entered, now.close_wait_entered),
            listen_drops_per_s: rate(prev.listen_drops, now.listen_drops),
        }
    }
}

impl Inputs {
    /// The policy's inputs from a snapshot and the rates leading to it.
    pub fn from_snapshot(s: &Snapshot, rates: &Rates) -> Self {
        Self {
            close_wait: s.in_state(state::CLOSE_WAIT),
            send_queue_p99_bytes: s.send_queue.quantile(0.99),
            send_queue_sockets: s.send_queue.sockets,
            accept_queue_fill: s.accept_queue_fill(),
            retransmits_per_s: rates.retransmits_per_s,
        }
    }
}

/// The raw verdict for one look: the worst rule, and every rule past a threshold.
pub fn assess(cfg: &HealthConfig, i: &Inputs) -> (EdgeHealth, Vec<String>) {
    let mut level = EdgeHealth::Ok;
    let mut reasons = Vec::new();
    let mut rule = |name: &str, v: f64, degraded: f64, overloaded: f64, shown: String| {
        let l = if v >= overloaded {
            EdgeHealth::Overloaded
        } else if v >= degraded {
            EdgeHealth::Degraded
        } else {
            return;
        };
        let limit = if l == EdgeHealth::Overloaded { overloaded } else { degraded };
        reasons.push(format!("{name} {shown} >= {limit} ({})", level_name(l)));
        level = level.max(l);
    };
    rule(
        "close_wait",
        i.close_wait as f64,
        cfg.close_wait_degraded as f64,
        cfg.close_wait_overloaded as f64,
        i.close_wait.to_string(),
    );
    if i.send_queue_sockets >= cfg.send_queue_min_sockets {
        rule(
            "send_queue_p99_bytes",
            i.send_queue_p99_bytes as f64,
            cfg.send_queue_p99_degraded_bytes as f64,
            cfg.send_queue_p99_overloaded_bytes as f64,
            i.send_queue_p99_bytes.to_string(),
        );
    }
    rule(
        "accept_queue_fill",
        i.accept_queue_fill,
        cfg.accept_queue_degraded,
        cfg.accept_queue_overloaded,
        format!("{:.2}", i.accept_queue_fill),
    );
    rule(
        "retransmits_per_s",
        i.retransmits_per_s,
        cfg.retransmits_degraded_per_s,
        cfg.retransmits_overloaded_per_s,
        format!("{:.1}", i.retransmits_per_s),
    );
    (level, reasons)
}

/// The level as /healthz and the metrics label name it.
pub fn level_name(h: EdgeHealth) -> &'static str {
    match h {
        EdgeHealth::Ok => "ok",
        EdgeHealth::Degraded => "degraded",
        EdgeHealth::Overloaded => "overloaded",
    }
}

/// The hysteresis: worsen at once, improve after `recover_after` better looks in a row.
#[derive(Debug)]
pub struct Policy {
    current: EdgeHealth,
    better: u32,
    recover_after: u32,
}

impl Policy {
    /// Starts at `ok`, improving only after `recover_after` better looks in a row.
    pub fn new(recover_after: u32) -> Self {
        Self { current: EdgeHealth::Ok, better: 0, recover_after }
    }

    /// The state in force.
    pub fn current(&self) -> EdgeHealth {
        self.current
    }

    /// Feeds one raw verdict; returns the state to act on.
    pub fn step(&mut self, raw: EdgeHealth) -> EdgeHealth {
        if raw >= self.current {
            self.current = raw;
            self.better = 0;
        } else {
            self.better += 1;
            if self.better >= self.recover_after {
                self.current = raw;
                self.better = 0;
            }
        }
        self.current
    }
}

/// The published verdict.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The state in force (after hysteresis).
    pub status: EdgeHealth,
    /// Rules past a threshold at the last look (may be empty while recovering).
    pub reasons: Vec<String>,
    /// The figures the rules looked at.
    pub inputs: Inputs,
    /// The rates the figures came with.
    pub rates: Rates,
    /// Where the figures come from (`None`: no kernel probes).
    pub source: Option<&'static str>,
    /// ms since the epoch of the last look (0: none yet).
    pub at_ms: u64,
}

impl HealthReport {
    fn initial(note: &str) -> Self {
        Self {
            status: EdgeHealth::Ok,
            reasons: vec![note.to_owned()],
            inputs: Inputs::default(),
            rates: Rates::default(),
            source: None,
            at_ms: 0,
        }
    }
}

/// What the probe thread publishes.
pub struct KernelView {
    latest: Mutex<Option<Arc<Snapshot>>>,
    report: Mutex<HealthReport>,
    /// `EdgeHealth::level()` of the current state, read by the shards at every handshake.
    level: Arc<AtomicU8>,
    /// Whether shards refuse handshakes while overloaded.
    pub refuse_when_overloaded: bool,
    drain: Mutex<Option<tokio::sync::mpsc::UnboundedSender<()>>>,
    stop: AtomicBool,
}

impl KernelView {
    /// A view with no snapshot yet that publishes the state into `level`, shared with the shards.
    pub fn new(level: Arc<AtomicU8>, refuse_when_overloaded: bool) -> Self {
        Self {
            latest: Mutex::new(None),
            report: Mutex::new(HealthReport::initial("no kernel snapshot yet")),
            level,
            refuse_when_overloaded,
            drain: Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }

    /// The latest kernel snapshot, if one was taken.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The latest verdict (a copy), for /healthz.
    pub fn report(&self) -> HealthReport {
        self.report.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The state in force, as the shards read it.
    pub fn status(&self) -> EdgeHealth {
        EdgeHealth::from_level(self.level.load(Ordering::Relaxed))
    }

    /// Where the policy sends its drain request (`health.drain_after_overloaded_s`).
    pub fn set_drain_trigger(&self, tx: tokio::sync::mpsc::UnboundedSender<()>) {
        *self.drain.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    fn publish(&self, snap: Arc<Snapshot>, report: HealthReport) {
        self.level.store(report.status.level(), Ordering::Relaxed);
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(snap);
        *self.report.lock().unwrap_or_else(PoisonError::into_inner) = report;
    }

    fn note(&self, note: String) {
        let mut r = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        r.reasons = vec![note];
    }
}

/// Opens the configured source: `None` when there is none (logged).
fn open(cfg: &ProbesConfig, ports: &[u16]) -> Option<Probes> {
    match cfg.source {
        ProbeSource::Off => None,
        ProbeSource::Auto => Probes::open(ports),
        ProbeSource::Ebpf => Probes::open_ebpf(ports)
            .inspect(|_| tracing::info!(source = "ebpf", ?ports, "kernel probes: eBPF"))
            .inspect_err(|e| tracing::error!(error = %e, "kernel probes: eBPF asked for but unavailable; none in use"))
            .ok(),
        ProbeSource::SockDiag => Probes::open_sock_diag(ports)
            .inspect(|_| tracing::info!(source = "sock_diag", ?ports, "kernel probes: sock_diag"))
            .inspect_err(|e| tracing::error!(error = %e, "kernel probes: sock_diag unavailable; none in use"))
            .ok(),
    }
}

/// The probe thread.
pub struct Monitor {
    /// What the probe thread found, shared with the HTTP API and the shards.
    pub view: Arc<KernelView>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts looking at the sockets on `ports`. Never fails: without probes the view says so
    /// and health stays `ok`.
    pub fn start(probes: ProbesConfig, health: HealthConfig, ports: Vec<u16>, level: Arc<AtomicU8>) -> Self {
        let view = Arc::new(KernelView::new(level, health.refuse_when_overloaded));
        if probes.source == ProbeSource::Off {
            view.note("kernel probes off (probes.source)".into());
            return Self { view, thread: None };
        }
        let v = view.clone();
        let thread = std::thread::Builder::new()
            .name("roomcast-probes".into())
            .spawn(move || run(&probes, &health, &ports, &v))
            .map_err(|e| tracing::error!(error = %e, "cannot start the probe thread"))
            .ok();
        Self { view, thread }
    }

    /// Stops the probe thread and waits for it to end.
    pub fn stop(&mut self) {
        self.view.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(cfg: &ProbesConfig, health: &HealthConfig, ports: &[u16], view: &KernelView) {
    let Some(mut probes) = open(cfg, ports) else {
        view.note("kernel probes unavailable (see the log)".into());
        return;
    };
    let source = probes.source().as_str();
    let interval = Duration::from_millis(cfg.interval_ms);
    let mut policy = Policy::new(health.recover_after);
    let mut prev: Option<(Arc<Snapshot>, Instant)> = None;
    let mut overloaded_since: Option<Instant> = None;
    let mut drain_sent = false;
    let mut failing = false;
    let mut stretched = false;
    while !view.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match probes.snapshot() {
            Ok(snap) => {
                if failing {
                    tracing::info!(source, "kernel probes working again");
                    failing = false;
                }
                let snap = Arc::new(snap);
                let rates = prev.as_ref().map(|(p, at)| Rates::between(p, &snap, started - *at)).unwrap_or_default();
                let inputs = Inputs::from_snapshot(&snap, &rates);
                let (raw, reasons) = assess(health, &inputs);
                let before = policy.current();
                let status = policy.step(raw);
                if status != before {
                    let reasons = reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                    tracing::warn!(from = level_name(before), to = level_name(status), reasons = %reasons, "edge health changed");
                }
                overloaded_since = match (status, overloaded_since) {
                    (EdgeHealth::Overloaded, None) => Some(started),
                    (EdgeHealth::Overloaded, s) => s,
                    _ => None,
                };
                if let Some(since) = overloaded_since
                    && health.drain_after_overloaded_s > 0
                    && !drain_sent
                    && since.elapsed() >= Duration::from_secs(health.drain_after_overloaded_s)
                {
                    let tx = view.drain.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    if let Some(tx) = tx {
                        tracing::warn!(
                            overloaded_s = since.elapsed().as_secs(),
                            "overloaded for health.drain_after_overloaded_s: starting a drain"
                        );
                        let _ = tx.send(());
                        drain_sent = true;
                    }
                }
                let report = HealthReport {
                    status,
                    reasons,
                    inputs,
                    rates,
                    source: Some(source),
                    at_ms: crate::bus::now_us() / 1000,
                };
                view.publish(snap.clone(), report);
                prev = Some((snap, started));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(source, error = %e, "kernel probe snapshot failed");
                    failing = true;
                }
                view.note(format!("kernel probe snapshot failed: {e}"));
            }
        }
        // A look at 10^5 sockets takes tens of ms: keep the probe thread under 5% of a core by
        // looking less often when a look is that long.
        let took = started.elapsed();
        let period = interval.max(took * LOOK_SHARE_INVERSE);
        if period > interval && !stretched {
            tracing::info!(
                took_ms = took.as_millis() as u64,
                period_ms = period.as_millis() as u64,
                "kernel probes: looking less often than probes.interval_ms (a look takes over 5% of it)"
            );
        }
        stretched = period > interval;
        std::thread::park_timeout(period.saturating_sub(took));
    }
}

/// The probe thread spends at most 1/this of its time looking.
const LOOK_SHARE_INVERSE: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(close_wait: u64, p99: u64, fill: f64, retr: f64) -> Inputs {
        Inputs {
            close_wait,
            send_queue_p99_bytes: p99,
            send_queue_sockets: 1000,
            accept_queue_fill: fill,
            retransmits_per_s: retr,
        }
    }

    #[test]
    fn a_few_sockets_do_not_make_a_send_queue_percentile() {
        let cfg = HealthConfig::default();
        let mut i = inputs(0, 1 << 20, 0.0, 0.0);
        i.send_queue_sockets = 3;
        assert_eq!(assess(&cfg, &i).0, EdgeHealth::Ok, "one bulk transfer is not an overloaded edge");
        i.send_queue_sockets = 100;
        assert_eq!(assess(&cfg, &i).0, EdgeHealth::Overloaded);
    }

    #[test]
    fn each_rule_moves_the_state() {
        let cfg = HealthConfig::default();
        assert_eq!(assess(&cfg, &inputs(0, 0, 0.0, 0.0)), (EdgeHealth::Ok, vec![]));
        let (l, r) = assess(&cfg, &inputs(300, 0, 0.0, 0.0));
        assert_eq!(l, EdgeHealth::Degraded);
        assert_eq!(r, vec!["close_wait 300 >= 256 (degraded)".to_string()]);
        assert_eq!(assess(&cfg, &inputs(5000, 0, 0.0, 0.0)).0, EdgeHealth::Overloaded);
        assert_eq!(assess(&cfg, &inputs(0, 10_000, 0.0, 0.0)).0, EdgeHealth::Degraded);
        assert_eq!(assess(&cfg, &inputs(0, 30_000, 0.0, 0.0)).0, EdgeHealth::Overloaded);
        assert_eq!(assess(&cfg, &inputs(0, 0, 0.6, 0.0)).0, EdgeHealth::Degraded);
        assert_eq!(assess(&cfg, &inputs(0, 0, 1.0, 0.0)).0, EdgeHealth::Overloaded);
        assert_eq!(assess(&cfg, &inputs(0, 0, 0.0, 250.0)).0, EdgeHealth::Degraded);
        assert_eq!(assess(&cfg, &inputs(0, 0, 0.0, 2500.0)).0, EdgeHealth::Overloaded);
    }

    #[test]
    fn the_worst_rule_wins_and_all_are_named() {
        let cfg = HealthConfig::default();
        let (l, r) = assess(&cfg, &inputs(300, 30_000, 0.0, 0.0));
        assert_eq!(l, EdgeHealth::Overloaded);
        assert_eq!(r.len(), 2);
        assert!(r[1].starts_with("send_queue_p99_bytes 30000 >= 24576"), "{r:?}");
    }

    #[test]
    fn worsens_at_once_recovers_slowly() {
        let mut p = Policy::new(3);
        assert_eq!(p.step(EdgeHealth::Overloaded), EdgeHealth::Overloaded);
        assert_eq!(p.step(EdgeHealth::Ok), EdgeHealth::Overloaded);
        assert_eq!(p.step(EdgeHealth::Ok), EdgeHealth::Overloaded);
        // A relapse restarts the count.
        assert_eq!(p.step(EdgeHealth::Overloaded), EdgeHealth::Overloaded);
        assert_eq!(p.step(EdgeHealth::Degraded), EdgeHealth::Overloaded);
        assert_eq!(p.step(EdgeHealth::Ok), EdgeHealth::Overloaded);
        assert_eq!(p.step(EdgeHealth::Ok), EdgeHealth::Ok);
        assert_eq!(p.step(EdgeHealth::Degraded), EdgeHealth::Degraded);
        let mut now = Policy::new(1);
        now.step(EdgeHealth::Degraded);
        assert_eq!(now.step(EdgeHealth::Ok), EdgeHealth::Ok);
    }
}
