//! What one look at the kernel returns, whichever source took it. Pure data: no I/O.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use serde::Serialize;

/// log2 buckets of the queue histograms (bucket 0 holds 0; bucket i holds [2^(i-1), 2^i - 1]).
pub const QUEUE_BUCKETS: usize = 32;

/// TCP states as `ss` names them, indexed by the kernel's state number (1..=11).
/// The kernel's request sockets (TCP_NEW_SYN_RECV, 12) count as `syn_recv`, as in `ss`.
pub const STATE_NAMES: [&str; 12] = [
    "unknown",
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "listen",
    "closing",
];

/// Kernel state numbers used by the policy and tests (include/net/tcp_states.h).
pub mod state {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: usize = 1;
    /// `TCP_SYN_SENT`.
    pub const SYN_SENT: usize = 2;
    /// `TCP_SYN_RECV`.
    pub const SYN_RECV: usize = 3;
    /// `TCP_TIME_WAIT`.
    pub const TIME_WAIT: usize = 6;
    /// `TCP_CLOSE_WAIT`.
    pub const CLOSE_WAIT: usize = 8;
    /// `TCP_LISTEN`.
    pub const LISTEN: usize = 10;
    /// `TCP_NEW_SYN_RECV`.
    pub const NEW_SYN_RECV: usize = 12;
}

/// Which mechanism produced a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The iter/tcp program and the tracepoints in bpf/tcp_probes.bpf.c.
    Ebpf,
    /// A netlink sock_diag dump (what `ss` uses) plus /proc/net/netstat.
    SockDiag,
}

impl Source {
    /// The name in `/healthz` and `/v1/kernel` (`ebpf`, `sock_diag`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::SockDiag => "sock_diag",
        }
    }
}

/// Sum, maximum and log2 histogram of one queue over the watched non-listening sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Sockets counted (established and closing states; not listeners, TIME_WAIT or SYN_RECV).
    pub sockets: u64,
    /// Bytes queued, summed over those sockets.
    pub sum: u64,
    /// The largest queue, bytes.
    pub max: u64,
    /// Non-cumulative counts per bucket; see [`QueueStats::upper_bound`].
    pub buckets: [u64; QUEUE_BUCKETS],
}

impl Default for QueueStats {
    fn default() -> Self {
        Self { sockets: 0, sum: 0, max: 0, buckets: [0; QUEUE_BUCKETS] }
    }
}

impl QueueStats {
    /// The bucket a queue length falls in.
    pub fn bucket_of(bytes: u64) -> usize {
        if bytes == 0 {
            return 0;
        }
        ((64 - bytes.leading_zeros()) as usize).min(QUEUE_BUCKETS - 1)
    }

    /// Largest value bucket `i` holds (`None` for the last, unbounded one).
    pub fn upper_bound(i: usize) -> Option<u64> {
        if i + 1 >= QUEUE_BUCKETS { None } else { Some((1u64 << i) - 1) }
    }

    /// Adds one socket's queue length.
    pub fn add(&mut self, bytes: u64) {
        self.sockets += 1;
        self.sum += bytes;
        self.max = self.max.max(bytes);
        self.buckets[Self::bucket_of(bytes)] += 1;
    }

    /// An upper bound for the `q` quantile (0..=1): the top of the bucket it falls in, capped by
    /// the maximum seen. 0 when no socket is counted.
    pub fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper_bound(i).unwrap_or(u64::MAX).min(self.max);
            }
        }
        self.max
    }
}

/// The listening sockets on one watched port (several with SO_REUSEPORT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// The local port.
    pub port: u16,
    /// Listening sockets on it.
    pub sockets: u64,
    /// Connections completed but not yet accepted (`ss` Recv-Q of a listener).
    pub backlog: u64,
    /// The accept queues' limits (`ss` Send-Q of a listener).
    pub backlog_max: u64,
    /// The fullest single listener (by queue / limit): its queue and its limit. With one
    /// listener per shard, a shard that stops accepting shows here while the sums look fine.
    pub fullest: u64,
    /// The fullest listener's limit.
    pub fullest_max: u64,
}

impl Listener {
    /// Counts one listening socket.
    pub(crate) fn add(&mut self, backlog: u64, max: u64) {
        self.sockets += 1;
        self.backlog += backlog;
        self.backlog_max += max;
        if self.sockets == 1
            || u128::from(backlog) * u128::from(self.fullest_max) > u128::from(self.fullest) * u128::from(max)
        {
            self.fullest = backlog;
            self.fullest_max = max;
        }
    }
}

/// Retransmits towards one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteRetransmits {
    /// The peer's address.
    pub addr: IpAddr,
    /// Segments retransmitted towards it.
    pub retransmits: u64,
}

/// One look at the kernel's TCP state for the watched ports.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Which mechanism took it.
    pub source: Source,
    /// Local ports watched.
    pub ports: Vec<u16>,
    /// How long taking it took, µs.
    pub scan_us: u64,
    /// TCP sockets seen in the namespace, and those on a watched port.
    pub visited: u64,
    /// TCP sockets on a watched port.
    pub sockets: u64,
    /// Sockets per state, indexed like [`STATE_NAMES`].
    pub states: [u64; 12],
    /// Send-Q (bytes not yet acknowledged by the peer) over the watched sockets.
    pub send_queue: QueueStats,
    /// Recv-Q (bytes not yet read by the edge) over the watched sockets.
    pub recv_queue: QueueStats,
    /// The watched ports' listening sockets and accept queues.
    pub listeners: Vec<Listener>,
    /// Retransmitted segments on watched sockets since the probes started (a counter).
    pub retransmits: u64,
    /// tcp_info.total_retrans summed over the live watched sockets.
    pub retransmits_live: u64,
    /// SYN-ACKs retransmitted by watched listeners (eBPF only).
    pub synack_retransmits: Option<u64>,
    /// Connections that reached ESTABLISHED / CLOSE, and entered CLOSE_WAIT (eBPF only: no
    /// snapshot of sockets can see transitions).
    pub opened: Option<u64>,
    /// Connections that reached CLOSE (eBPF only).
    pub closed: Option<u64>,
    /// Connections that entered CLOSE_WAIT (eBPF only).
    pub close_wait_entered: Option<u64>,
    /// The namespace's TcpExt ListenOverflows and ListenDrops (/proc/net/netstat).
    pub listen_overflows: u64,
    /// The namespace's TcpExt ListenDrops.
    pub listen_drops: u64,
    /// Peers with the most retransmits, worst first (bounded).
    pub top_retransmits: Vec<RemoteRetransmits>,
}

impl Snapshot {
    pub(crate) fn empty(source: Source, ports: &[u16]) -> Self {
        Self {
            source,
            ports: ports.to_vec(),
            scan_us: 0,
            visited: 0,
            sockets: 0,
            states: [0; 12],
            send_queue: QueueStats::default(),
            recv_queue: QueueStats::default(),
            listeners: ports
                .iter()
                .map(|&port| Listener { port, sockets: 0, backlog: 0, backlog_max: 0, fullest: 0, fullest_max: 0 })
                .collect(),
            retransmits: 0,
            retransmits_live: 0,
            synack_retransmits: None,
            opened: None,
            closed: None,
            close_wait_entered: None,
            listen_overflows: 0,
            listen_drops: 0,
            top_retransmits: Vec::new(),
        }
    }

    /// Counts one socket in state `st` (kernel numbering; NEW_SYN_RECV folds into SYN_RECV).
    pub(crate) fn count_state(&mut self, st: usize, n: u64) {
        let st = if st == state::NEW_SYN_RECV { state::SYN_RECV } else { st };
        if let Some(slot) = self.states.get_mut(st) {
            *slot += n;
        } else {
            self.states[0] += n;
        }
    }

    /// Sockets in `state` (e.g. [`state::CLOSE_WAIT`]).
    pub fn in_state(&self, st: usize) -> u64 {
        self.states.get(st).copied().unwrap_or(0)
    }

    /// The fullest single accept queue, as a fraction of its limit (0 with no listener).
    pub fn accept_queue_fill(&self) -> f64 {
        self.listeners
            .iter()
            .filter(|l| l.fullest_max > 0)
            .map(|l| l.fullest as f64 / l.fullest_max as f64)
            .fold(0.0, f64::max)
    }

    /// States by name, for JSON and tables.
    pub fn states_by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STATE_NAMES.iter().copied().zip(self.states.iter().copied()).skip(1)
    }
}

/// Keeps the `n` largest entries, largest first.
pub(crate) fn top_n(mut v: Vec<RemoteRetransmits>, n: usize) -> Vec<RemoteRetransmits> {
    v.sort_unstable_by(|a, b| b.retransmits.cmp(&a.retransmits).then(a.addr.cmp(&b.addr)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(QueueStats::bucket_of(0), 0);
        assert_eq!(QueueStats::bucket_of(1), 1);
        assert_eq!(QueueStats::bucket_of(2), 2);
        assert_eq!(QueueStats::bucket_of(3), 2);
        assert_eq!(QueueStats::bucket_of(4), 3);
        assert_eq!(QueueStats::bucket_of(65535), 16);
        assert_eq!(QueueStats::bucket_of(65536), 17);
        assert_eq!(QueueStats::bucket_of(u64::MAX), QUEUE_BUCKETS - 1);
        for v in [0u64, 1, 5, 1000, 1 << 20] {
            let b = QueueStats::bucket_of(v);
            assert!(v <= QueueStats::upper_bound(b).unwrap(), "{v} in bucket {b}");
            if b > 0 {
                assert!(v > QueueStats::upper_bound(b - 1).unwrap());
            }
        }
        assert_eq!(QueueStats::upper_bound(QUEUE_BUCKETS - 1), None);
    }

    #[test]
    fn quantile_is_a_bucket_top_capped_by_max() {
        let mut q = QueueStats::default();
        assert_eq!(q.quantile(0.99), 0);
        for _ in 0..98 {
            q.add(0);
        }
        q.add(100);
        q.add(5000);
        assert_eq!(q.quantile(0.5), 0);
        assert_eq!(q.quantile(0.99), 127);
        assert_eq!(q.quantile(1.0), 5000);
        assert_eq!(q.sum, 5100);
        assert_eq!(q.sockets, 100);
    }

    #[test]
    fn request_sockets_count_as_syn_recv() {
        let mut s = Snapshot::empty(Source::SockDiag, &[80]);
        s.count_state(state::NEW_SYN_RECV, 2);
        s.count_state(state::SYN_RECV, 1);
        s.count_state(99, 1);
        assert_eq!(s.in_state(state::SYN_RECV), 3);
        assert_eq!(s.states[0], 1);
    }

    #[test]
    fn accept_queue_fill_takes_the_fullest() {
        let mut s = Snapshot::empty(Source::Ebpf, &[1, 2]);
        s.listeners[0].add(1, 4);
        s.listeners[1].add(9, 10);
        assert!((s.accept_queue_fill() - 0.9).abs() < 1e-9);
        // Six shard listeners, one of them stuck: the sum says 17%, the fullest 100%.
        let mut l = Snapshot::empty(Source::Ebpf, &[3]);
        for q in [0, 0, 4096, 0, 0, 0] {
            l.listeners[0].add(q, 4096);
        }
        assert_eq!((l.listeners[0].backlog, l.listeners[0].backlog_max), (4096, 6 * 4096));
        assert!((l.accept_queue_fill() - 1.0).abs() < 1e-9);
    }
}
