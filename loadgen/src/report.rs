//! Result files: `result.json` (machine-readable), `README.md` (environment, command, figures),
//! `latency.svg` and `throughput.svg` (over time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::Sample;
use crate::worker::Target;

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram in microseconds, in milliseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ServerFigures {
    pub measured: bool,
    /// Server CPU from before the first connect to 0.5 s after the last upgrade, and per
    /// connection that completed it: what a handshake costs (accept, upgrade, token, join).
    pub cpu_s_connecting: f64,
    pub cpu_us_per_connection: Option<f64>,
    pub cpu_s_publishing: f64,
    pub cpu_us_per_delivery: Option<f64>,
    pub rss_idle_bytes: u64,
    pub rss_connected_bytes: u64,
    pub rss_bytes_per_connection: Option<f64>,
    /// From the edge's perf counters (task-clock per thread, kernel included) over the
    /// publishing phase: µs of CPU per delivery, per thread and summed over the threads.
    pub task_clock_us_per_delivery: Option<f64>,
    pub task_clock_us_per_delivery_by_thread: std::collections::BTreeMap<String, f64>,
}

impl ServerFigures {
    pub fn new(
        before: Option<(f64, u64)>,
        connected: Option<(f64, u64)>,
        after: Option<(f64, u64)>,
        conns: u64,
        deliveries: u64,
    ) -> Self {
        match (before, connected, after) {
            (Some((cpu0, rss0)), Some((cpu1, rss1)), Some((cpu2, _))) => {
                let cpu = cpu2 - cpu1;
                Self {
                    measured: true,
                    cpu_s_connecting: cpu1 - cpu0,
                    cpu_us_per_connection: (conns > 0).then(|| (cpu1 - cpu0) * 1e6 / conns as f64),
                    cpu_s_publishing: cpu,
                    cpu_us_per_delivery: (deliveries > 0).then(|| cpu * 1e6 / deliveries as f64),
                    rss_idle_bytes: rss0,
                    rss_connected_bytes: rss1,
                    rss_bytes_per_connection: (conns > 0).then(|| (rss1 as f64 - rss0 as f64) / conns as f64),
                    ..Self::default()
                }
            }
            _ => Self::default(),
        }
    }

    /// Adds CPU per delivery per thread from the edge's task-clock readings.
    pub fn with_threads(
        mut self,
        before: Option<&std::collections::BTreeMap<String, f64>>,
        after: Option<&std::collections::BTreeMap<String, f64>>,
        deliveries: u64,
    ) -> Self {
        // A thread's counter lower than before: the edge restarted in between and its counters
        // began again at 0 (RESTART runs of bench-million.sh): the differences would mix two
        // processes (one came out at -0.28 µs per delivery), so none is reported.
        let restarted = |b: &std::collections::BTreeMap<String, f64>, a: &std::collections::BTreeMap<String, f64>| {
            a.iter().any(|(t, v)| b.get(t).is_some_and(|was| v < was))
        };
        if let (Some(b), Some(a)) = (before, after)
            && deliveries > 0
            && !restarted(b, a)
        {
            for (t, v) in a {
                let d = v - b.get(t).copied().unwrap_or(0.0);
                self.task_clock_us_per_delivery_by_thread.insert(t.clone(), d * 1e6 / deliveries as f64);
            }
            self.task_clock_us_per_delivery = Some(self.task_clock_us_per_delivery_by_thread.values().sum());
        }
        self
    }
}

/// A worker process that ended before its final report.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerDeath {
    /// Worker index (its connections are global indexes `first..first + count`).
    pub id: usize,
    pub first: usize,
    pub count: usize,
    /// Connections it held at its last progress report.
    pub connected: u64,
    /// How it ended: "exit status N" or "signal N".
    pub status: String,
    /// Seconds into the run.
    pub at_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: Target,
    pub connections: u64,
    pub failed_connections: u64,
    /// Failed connection attempts by reason (refused, reset, timeout, http_503, ...).
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Workers that died before their final report (their members are out of every other
    /// figure: connections, deliveries and loss count the workers that reported).
    pub workers_died: Vec<WorkerDeath>,
    pub closed_during_run: u64,
    /// Of `connections`, the members open when the run ended (each worker waits up to 10 s past
    /// the publishing's end for members between sockets to land); those between sockets then
    /// for less than 10 s (on their way back: an edge closing idle members every second); and
    /// those between sockets for longer (an edge that died and never came back leaves every
    /// member reconnecting). Members neither open nor on their way fail the run.
    pub members_open_at_end: u64,
    pub members_moving_at_end: u64,
    pub members_reconnecting_at_end: u64,
    /// Of `members_open_at_end`, those the generator closed as a client leaving does: a close
    /// frame with 1000 written whole (an event stream: its socket shut), then its write side
    /// shut (the edge counts them `peer_closed`); and those whose server had not closed its side
    /// within 3 s (dropped then).
    pub closed_by_generator_at_end: u64,
    pub close_unanswered_at_end: u64,
    /// Close frames the members received from the server, by close code ("none": no code).
    pub closes_by_code: BTreeMap<String, u64>,
    /// Members' open sockets that ended without a close frame, by how: `eof` (the peer's FIN),
    /// `reset`, ... (an edge killed, a connection the kernel refused for the edge).
    pub sockets_lost_by_reason: BTreeMap<String, u64>,
    pub rooms: u32,
    pub dist: String,
    pub encoding: String,
    pub workers: usize,
    pub connect_s: f64,
    /// The connect phase's deadline (`--connect-deadline`, or its default), seconds.
    pub connect_deadline_s: f64,
    pub connect_per_s: f64,
    pub publish_secs: f64,
    pub published: BTreeMap<String, u64>,
    /// Refusals of every kind (retries of must-deliver messages included).
    pub publish_refused: u64,
    /// Messages the publisher tried, per kind, and per second over the publishing time (the
    /// offered load actually reached: a stream behind its pace sends back to back).
    pub publish_offered: BTreeMap<String, u64>,
    pub publish_offered_per_s: BTreeMap<String, f64>,
    /// Refusals by "kind status" ("gift 429", "chat 202", "gift error" for a transport error).
    pub publish_refused_by_status: BTreeMap<String, u64>,
    /// Messages never accepted (dropped by the server, or must-deliver given up), per kind, and
    /// the must-deliver ones given up (after --gift-give-up, at most 5 s past --duration, or on
    /// a final answer).
    pub publish_not_accepted: BTreeMap<String, u64>,
    pub publish_gave_up: BTreeMap<String, u64>,
    /// Publish to acknowledgement, accepted messages (first attempt to acceptance), per kind.
    pub publish_ack_ms: BTreeMap<String, Percentiles>,
    /// Publishing threads per kind.
    pub publish_streams: BTreeMap<String, usize>,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub frames: u64,
    /// Of `frames`, those that arrived compressed (`--deflate`).
    #[serde(default)]
    pub compressed_frames: u64,
    pub bytes: u64,
    pub received: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
    /// Loss on the connections that read at full speed (the others may be cut off as slow).
    pub lost_fast_readers: BTreeMap<String, u64>,
    pub slow_readers: u64,
    /// Connections whose byte stream stopped parsing (must be 0), or ended mid-frame.
    pub corrupt_streams: u64,
    pub partial_frames_at_end: u64,
    pub duplicates: BTreeMap<String, u64>,
    /// Members that joined afresh on a new socket (the first was lost before its `joined`:
    /// no position to resume from, so no `since`, as the clients do) ...
    #[serde(default)]
    pub fresh_starts: u64,
    /// ... and, by kind, the messages published before such a join: not owed to those
    /// members, so neither lost nor received (each member's stream starts at the first
    /// message it got after the join; one that got none is owed all).
    #[serde(default)]
    pub not_owed: BTreeMap<String, u64>,
    /// Messages another run published to these rooms (another run id in the body): in no
    /// other figure (two runs on the same rooms each counted the other's as lost and
    /// duplicated).
    #[serde(default)]
    pub foreign_messages: u64,
    /// `gap` and `reset` messages the members received, by type (both keys always there): a
    /// `gap` says seqs of the member's room cannot be recovered (a `since` older than history,
    /// or lost by the bus), a `reset` that its position is void (the room's numbering
    /// restarted, or its `since` was ahead of the room). Over WebSocket and event streams alike.
    pub gaps_and_resets: BTreeMap<String, u64>,
    /// The seqs the `gap` messages named, in all (`to - from + 1` each).
    pub gap_seqs: u64,
    pub latency_ms: BTreeMap<String, Percentiles>,
    /// The same, for the connections that read at full speed and for the slow readers.
    pub latency_fast_readers_ms: BTreeMap<String, Percentiles>,
    pub latency_slow_readers_ms: BTreeMap<String, Percentiles>,
    pub handshake_ms: Percentiles,
    /// First connects allowed in flight per worker (`--connect-inflight`), and the most one
    /// worker had at once.
    #[serde(default)]
    pub connect_inflight: usize,
    #[serde(default)]
    pub connect_inflight_peak: u64,
    /// The most moves (dispatch request or connect and upgrade, after a goaway or a lost
    /// socket) one worker had in flight at once; at most `connect_inflight` (plain members).
    #[serde(default)]
    pub move_inflight_peak: u64,
    /// Connections that followed a goaway to another edge (reconnecting with `since`), those
    /// that could not, and the time from goaway to the new upgrade.
    pub reconnects: u64,
    pub reconnect_failed: u64,
    /// Failed attempts of the moves by reason, each one: retried with jittered backoff, or the
    /// last of a move given up (`dispatch_http_503`: every refusal dispatch answered).
    #[serde(default)]
    pub reconnect_attempts_failed_by_reason: BTreeMap<String, u64>,
    /// Move attempts past their deadline (5 s dispatch, 10 s upgrade) whose answer had arrived
    /// but waited for the generator's worker to read it: taken, not counted as failures. Many
    /// of them say the generator, not the server, is late.
    #[serde(default)]
    pub move_answers_read_late: u64,
    /// Of `reconnects`, those that came back with `since` after a close with 4000 or 1013.
    #[serde(default)]
    pub resumed_after_close: u64,
    pub reconnect_ms: Percentiles,
    pub server: ServerFigures,
    pub generator_cpu_s: f64,
    pub generator_max_worker_core_share: f64,
    pub samples: Vec<Sample>,
    pub note: String,
    pub args: String,
    /// Where the publish API key came from (`ROOMCAST_API_KEY`, or `--api-key-file PATH`), never
    /// the key; None: publishes went without one.
    pub publish_api_key: Option<String>,
    /// Members whose first connect could fail without failing the run
    /// (`--allow-connect-failures`, as a number of members).
    pub connect_failures_allowed: u64,
    /// Why the run stopped before its `--duration` (no member connected; every publish refused
    /// for good), or None.
    pub stopped_early: Option<String>,
    /// What the run did not do that it was asked to, one sentence each (workers died, members
    /// never connected or down at the end, publishes refused for good, stopped early): the
    /// error it exits non-zero with. Empty: it did what it was asked.
    pub run_errors: Vec<String>,
}

impl Report {
    /// The keys other tools read, flat.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "target": self.target,
            "connections": self.connections,
            "failed_connections": self.failed_connections,
            "failed_by_reason": self.failed_by_reason,
            "connect_failures_allowed": self.connect_failures_allowed,
            "stopped_early": self.stopped_early,
            "run_errors": self.run_errors,
            "members_open_at_end": self.members_open_at_end,
            "closed_by_generator_at_end": self.closed_by_generator_at_end,
            "connect_per_s": self.connect_per_s,
            "connect_inflight_peak": self.connect_inflight_peak,
            "move_inflight_peak": self.move_inflight_peak,
            "reconnects": self.reconnects,
            "reconnect_failed": self.reconnect_failed,
            "reconnect_attempts_failed_by_reason": self.reconnect_attempts_failed_by_reason,
            "move_answers_read_late": self.move_answers_read_late,
            "workers_died": self.workers_died,
            "deliveries": self.deliveries,
            "deliveries_per_s": self.deliveries_per_s,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "fresh_starts": self.fresh_starts,
            "not_owed": self.not_owed,
            "foreign_messages": self.foreign_messages,
            "gaps_and_resets": self.gaps_and_resets,
            "gap_seqs": self.gap_seqs,
            "latency_ms": self.latency_ms,
            "edge_cpu_us_per_delivery": self.server.cpu_us_per_delivery,
            "edge_shards_task_clock_us_per_delivery": self.server.task_clock_us_per_delivery,
            "edge_task_clock_us_per_delivery_by_thread": self.server.task_clock_us_per_delivery_by_thread,
            "edge_cpu_us_per_connection": self.server.cpu_us_per_connection,
            "edge_rss_bytes_per_connection": self.server.rss_bytes_per_connection,
            "corrupt_streams": self.corrupt_streams,
            "publish_offered_per_s": self.publish_offered_per_s,
            "publish_refused_by_status": self.publish_refused_by_status,
            "publish_gave_up": self.publish_gave_up,
            "publish_ack_ms": self.publish_ack_ms,
            "generator_cpu_s": self.generator_cpu_s,
            "generator_saturated": self.generator_max_worker_core_share > 0.9,
        })
    }
}

fn date() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d").output();
    out.ok().and_then(|o| String::from_utf8(o.stdout).ok()).map_or_else(|| "undated".into(), |s| s.trim().to_owned())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPUs ({model}), Linux {}", kernel.trim())
}

/// The files a run writes into its folder (`window.svg` only when the edge reported a merge
/// window).
pub const FILES: [&str; 5] = ["result.json", "README.md", "latency.svg", "throughput.svg", "window.svg"];

/// The folder of a run of `scenario` under `root` started today: `<root>/<date>-<scenario>/`.
pub fn folder(root: &Path, scenario: &str) -> PathBuf {
    root.join(format!("{}-{scenario}", date()))
}

/// Of the files a run writes ([`FILES`]), those `dir` holds already: an earlier run's results,
/// which writing this run's would overwrite. Other files (a script's logs beside them) are not
/// the generator's and do not count.
pub fn earlier_results(dir: &Path) -> Vec<&'static str> {
    FILES.into_iter().filter(|f| dir.join(f).exists()).collect()
}

/// Writes the results into `dir` ([`folder`], named when the run started), replacing the
/// generator's files an earlier run left there (the caller has refused that without
/// `--replace`).
pub fn write(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut full = serde_json::to_value(r)?;
    if let (Some(obj), serde_json::Value::Object(sum)) = (full.as_object_mut(), r.summary_json()) {
        for (k, v) in sum {
            obj.insert(k, v);
        }
    }
    std::fs::write(dir.join("result.json"), serde_json::to_string_pretty(&full)?)?;
    plot(dir, r)?;
    let lat_of = |m: &BTreeMap<String, Percentiles>, k: &str| {
        m.get(k)
            .filter(|p| p.count > 0)
            .map_or(String::from("-"), |p| format!("{:.1} / {:.1} / {:.1} / {:.1}", p.p50, p.p99, p.p999, p.max))
    };
    let lat = |k: &str| lat_of(&r.latency_ms, k);
    let ack = |k: &str| {
        r.publish_ack_ms
            .get(k)
            .filter(|p| p.count > 0)
            .map_or(String::from("-"), |p| format!("{:.2} / {:.2} / {:.2}", p.p50, p.p99, p.max))
    };
    let cpu = r.server.cpu_us_per_delivery.map_or("not measured".into(), |v| format!("{v:.3}"));
    let tclock = r.server.task_clock_us_per_delivery.map_or("not measured".into(), |v| {
        let per: Vec<String> =
            r.server.task_clock_us_per_delivery_by_thread.iter().map(|(t, u)| format!("{t} {u:.3}")).collect();
        format!("{v:.3} ({})", per.join(", "))
    });
    let cpu_conn = r.server.cpu_us_per_connection.map_or("not measured".into(), |v| format!("{v:.1}"));
    let rss = r.server.rss_bytes_per_connection.map_or("not measured".into(), |v| format!("{v:.0}"));
    let md = format!(
        "# {scenario}\n\n- Date: {date}\n- Machine: {machine}\n- Target: {target:?}; {note}\n- loadgen: {args}\n\n\
         | figure | value |\n|---|---|\n\
         | outcome | {run_errors} |\n\
         | stopped early | {stopped} |\n\
         | connections (failed; failures allowed) | {conns} ({failed}; {allowed}) |\n\
         | members open at the end; on their way back; reconnecting 10 s or more | {open_end}; {moving_end}; {reconnecting_end} |\n\
         | members closed by the generator at the end (close frame 1000 out); left without the server's close after 3 s | {closed_end}; {unanswered_end} |\n\
         | failed connections by reason | {failed_by} |\n\
         | workers died (their connections) | {died} |\n\
         | connect rate | {cps:.0}/s; handshake p50/p99 {hs50:.1}/{hs99:.1} ms; in flight per worker at most {inflight_peak} of {inflight} |\n\
         | closes received, by code | {closes} |\n\
         | sockets lost without a close frame, by how | {lost} |\n\
         | reconnected with since: after goaway or a server close (failed; of which after a close); to upgraded p50/p99; moves in flight per worker at most | {moved} ({mfail}; {resumed}); {rc50:.1}/{rc99:.1} ms; {move_peak} |\n\
         | published gift / chat (refused) | {pg} / {pc} ({refused}) |\n\
         | offered gift / chat per second (streams) | {og:.1} ({sg}) / {oc:.1} ({sc}) |\n\
         | refusals by status | {by_status} |\n\
         | gifts given up (never accepted) | {gave_up} |\n\
         | gift / chat acknowledgement p50 / p99 / max (ms) | {ackg} ; {ackc} |\n\
         | deliveries, per second | {deliv} , {dps:.0}/s |\n\
         | lost gift / chat | {lg} / {lc} |\n\
         | slow readers; lost gift / chat on the others | {slow}; {flg} / {flc} |\n\
         | duplicates gift / chat | {dg} / {dc} |\n\
         | members that joined afresh (no position); gift / chat published before, not owed | {fresh}; {nog} / {noc} |\n\
         | messages of another run (not counted) | {foreign} |\n\
         | gap / reset messages received (seqs the gaps named) | {gaps} / {resets} ({gap_seqs}) |\n\
         | gift latency p50 / p99 / p99.9 / max (ms) | {lgift} |\n\
         | gift latency, full-speed readers / slow readers (same percentiles) | {lgf} ; {lgs} |\n\
         | chat latency p50 / p99 / p99.9 / max (ms) | {lchat} |\n\
         | server CPU µs per delivery | {cpu} |\n\
         | edge shards' CPU µs per delivery from task-clock (per thread) | {tclock} |\n\
         | server CPU µs per connection (connect phase) | {cpu_conn} |\n\
         | server RSS bytes per connection | {rss} |\n\
         | generator CPU s (max worker share of a core) | {gcpu:.1} ({gshare:.0}%) |\n\n\
         Raw data: result.json. Plots: latency.svg, throughput.svg.\n",
        scenario = r.scenario,
        date = date(),
        machine = machine(),
        target = r.target,
        note = r.note,
        args = r.args,
        run_errors = if r.run_errors.is_empty() {
            "did what it was asked".to_owned()
        } else {
            format!("failed: {}", r.run_errors.join("; "))
        },
        stopped = r.stopped_early.as_deref().unwrap_or("no"),
        conns = r.connections,
        failed = r.failed_connections,
        allowed = r.connect_failures_allowed,
        open_end = r.members_open_at_end,
        moving_end = r.members_moving_at_end,
        reconnecting_end = r.members_reconnecting_at_end,
        closed_end = r.closed_by_generator_at_end,
        unanswered_end = r.close_unanswered_at_end,
        failed_by = if r.failed_by_reason.is_empty() {
            "none".to_owned()
        } else {
            r.failed_by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        },
        died = if r.workers_died.is_empty() {
            "none".to_owned()
        } else {
            r.workers_died
                .iter()
                .map(|d| {
                    format!("worker {} ({} held of {}): {} at {:.1} s", d.id, d.connected, d.count, d.status, d.at_s)
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        cps = r.connect_per_s,
        hs50 = r.handshake_ms.p50,
        hs99 = r.handshake_ms.p99,
        inflight = r.connect_inflight,
        inflight_peak = r.connect_inflight_peak,
        moved = r.reconnects,
        move_peak = r.move_inflight_peak,
        resumed = r.resumed_after_close,
        mfail = r.reconnect_failed,
        rc50 = r.reconnect_ms.p50,
        rc99 = r.reconnect_ms.p99,
        pg = r.published.get("gift").copied().unwrap_or(0),
        pc = r.published.get("chat").copied().unwrap_or(0),
        refused = r.publish_refused,
        og = r.publish_offered_per_s.get("gift").copied().unwrap_or(0.0),
        oc = r.publish_offered_per_s.get("chat").copied().unwrap_or(0.0),
        sg = r.publish_streams.get("gift").copied().unwrap_or(1),
        sc = r.publish_streams.get("chat").copied().unwrap_or(1),
        lost = if r.sockets_lost_by_reason.is_empty() {
            "none".to_owned()
        } else {
            r.sockets_lost_by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        },
        closes = if r.closes_by_code.is_empty() {
            "none".to_owned()
        } else {
            r.closes_by_code.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        },
        by_status = if r.publish_refused_by_status.is_empty() {
            "none".to_owned()
        } else {
            r.publish_refused_by_status.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        },
        gave_up = r.publish_gave_up.get("gift").copied().unwrap_or(0),
        ackg = ack("gift"),
        ackc = ack("chat"),
        deliv = r.deliveries,
        dps = r.deliveries_per_s,
        lg = r.lost.get("gift").copied().unwrap_or(0),
        slow = r.slow_readers,
        flg = r.lost_fast_readers.get("gift").copied().unwrap_or(0),
        flc = r.lost_fast_readers.get("chat").copied().unwrap_or(0),
        lc = r.lost.get("chat").copied().unwrap_or(0),
        dg = r.duplicates.get("gift").copied().unwrap_or(0),
        fresh = r.fresh_starts,
        foreign = r.foreign_messages,
        nog = r.not_owed.get("gift").copied().unwrap_or(0),
        noc = r.not_owed.get("chat").copied().unwrap_or(0),
        dc = r.duplicates.get("chat").copied().unwrap_or(0),
        gaps = r.gaps_and_resets.get("gap").copied().unwrap_or(0),
        resets = r.gaps_and_resets.get("reset").copied().unwrap_or(0),
        gap_seqs = r.gap_seqs,
        lgift = lat("gift"),
        lgf = lat_of(&r.latency_fast_readers_ms, "gift"),
        lgs = lat_of(&r.latency_slow_readers_ms, "gift"),
        lchat = lat("chat"),
        gcpu = r.generator_cpu_s,
        gshare = r.generator_max_worker_core_share * 100.0,
    );
    let warn = if r.generator_max_worker_core_share > 0.9 {
        "\n**Warning:** a load generator worker used over 90% of a core: it may be the bottleneck.\n"
    } else {
        ""
    };
    std::fs::write(dir.join("README.md"), format!("{md}{warn}"))?;
    if !warn.is_empty() {
        eprintln!("warning: a load generator worker saturated a core; figures may understate the server");
    }
    Ok(())
}

fn plot(dir: &Path, r: &Report) -> anyhow::Result<()> {
    let xmax = r.samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    {
        let path = dir.join("latency.svg");
        let root = SVGBackend::new(&path, (800, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = r.samples.iter().map(|s| s.p99_ms).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: latency over time (all kinds, per second)", r.scenario), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart.configure_mesh().x_desc("seconds").y_desc("ms").draw()?;
        chart
            .draw_series(LineSeries::new(r.samples.iter().map(|s| (s.t_s, s.p50_ms)), &BLUE))?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(r.samples.iter().map(|s| (s.t_s, s.p99_ms)), &RED))?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().border_style(BLACK).draw()?;
        root.present()?;
    }
    if r.samples.iter().any(|s| s.window_ms.is_some()) {
        let path = dir.join("window.svg");
        let root = SVGBackend::new(&path, (800, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = r.samples.iter().filter_map(|s| s.window_ms).max().unwrap_or(100) as f64 * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: merge window of room r0 (red: chat sampled)", r.scenario), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart.configure_mesh().x_desc("seconds").y_desc("window ms").draw()?;
        chart
            .draw_series(LineSeries::new(r.samples.iter().filter_map(|s| Some((s.t_s, s.window_ms? as f64))), &BLUE))?;
        chart.draw_series(
            r.samples
                .iter()
                .filter(|s| s.sampling_visible_rate.is_some())
                .filter_map(|s| Some(Circle::new((s.t_s, s.window_ms? as f64), 4, RED.filled()))),
        )?;
        root.present()?;
    } else {
        // An earlier run's (replaced) would otherwise stay beside this run's results.
        let _ = std::fs::remove_file(dir.join("window.svg"));
    }
    {
        let path = dir.join("throughput.svg");
        let root = SVGBackend::new(&path, (800, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = r.samples.iter().map(|s| s.deliveries_per_s).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: deliveries per second", r.scenario), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart.configure_mesh().x_desc("seconds").y_desc("deliveries/s").draw()?;
        chart.draw_series(LineSeries::new(r.samples.iter().map(|s| (s.t_s, s.deliveries_per_s)), &BLUE))?;
        root.present()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::ServerFigures;

    fn threads(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
        v.iter().map(|(t, s)| ((*t).to_owned(), *s)).collect()
    }

    /// CPU per delivery per thread is the counters' growth over the deliveries; a counter
    /// that went back (the edge restarted: a new process counting from 0) gives no figure,
    /// rather than a negative one and a total mixing two processes.
    #[test]
    fn thread_cpu_per_delivery_is_not_reported_across_a_restart() {
        let before = threads(&[("shard-0", 1.0), ("shard-1", 2.0)]);
        let after = threads(&[("shard-0", 3.0), ("shard-1", 3.0)]);
        let f = ServerFigures::default().with_threads(Some(&before), Some(&after), 1_000_000);
        assert_eq!(f.task_clock_us_per_delivery_by_thread["shard-0"], 2.0);
        assert_eq!(f.task_clock_us_per_delivery, Some(3.0));

        let restarted = threads(&[("shard-0", 4.0), ("shard-1", 0.5)]);
        let f = ServerFigures::default().with_threads(Some(&before), Some(&restarted), 1_000_000);
        assert_eq!(f.task_clock_us_per_delivery, None);
        assert!(f.task_clock_us_per_delivery_by_thread.is_empty(), "{:?}", f.task_clock_us_per_delivery_by_thread);
    }
}
