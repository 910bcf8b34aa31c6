//! roomcast kernel probes: what the kernel knows about the edge's TCP sockets.
//!
//! Two sources give the same [`Snapshot`]:
//! - [`Source::Ebpf`]: C programs (`bpf/tcp_probes.bpf.c`, built by `build.rs` with clang,
//!   loaded with aya) aggregate in the kernel: an `iter/tcp` walk returns one summary of every
//!   watched socket per read, and BTF tracepoints count retransmits and state transitions.
//! - [`Source::SockDiag`]: a netlink sock_diag dump (what `ss` uses) plus /proc/net/netstat,
//!   for hosts where BPF cannot load (no BTF, no privileges, old kernel).
//!
//! [`Probes::open`] tries eBPF first and falls back with one log line naming the reason; it
//! never fails. Sockets count when their local port is one of the watched ports.

#![warn(missing_docs)]

pub mod bpf;
pub mod holders;
pub mod procfs;
pub mod snapshot;
pub mod sock_diag;

pub use snapshot::{Listener, QueueStats, RemoteRetransmits, STATE_NAMES, Snapshot, Source, state};

/// How many peers [`Snapshot::top_retransmits`] lists.
pub const TOP_REMOTES: usize = 10;

/// Why a probe source could not open or take a look.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The build had no clang: no eBPF object is embedded.
    #[error("this build has no eBPF object (clang was missing when it was compiled)")]
    NotBuilt,
    /// More ports than the programs' table holds.
    #[error("at most {max} ports can be watched, {0} asked", max = bpf::MAX_PORTS)]
    TooManyPorts(usize),
    /// More socket inodes than one holder search takes.
    #[error("at most {max} sockets can be looked for at once, {0} asked", max = holders::MAX_HOLDER_INODES)]
    TooManyInodes(usize),
    /// The kernel has no BTF, which CO-RE relocation needs.
    #[error("kernel BTF unavailable (/sys/kernel/btf/vmlinux): {0}")]
    Btf(String),
    /// The verifier or the attach call refused a program.
    #[error("the kernel refused to load or attach {program}: {detail}")]
    Load {
        /// The program.
        program: &'static str,
        /// The loader's error chain.
        detail: String,
    },
    /// A map could not be read or written.
    #[error("map {map}: {detail}")]
    Map {
        /// The map.
        map: &'static str,
        /// The loader's error chain.
        detail: String,
    },
    /// The object lacks a program or map the loader expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// The iterator's output is not one summary.
    #[error("the tcp iterator wrote {0} bytes, not one summary (object and loader out of step?)")]
    BadSummary(usize),
    /// A system call failed (`what` names it).
    #[error("{what}: {source}")]
    Io {
        /// The call or file.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered a sock_diag dump with an error.
    #[error("sock_diag: {0}")]
    Netlink(String),
}

/// What every source adds last: the namespace's listen counters, and how long the look took.
fn finish(snap: &mut Snapshot, started: std::time::Instant) -> Result<(), ProbeError> {
    (snap.listen_overflows, snap.listen_drops) =
        procfs::listen_counters().map_err(|source| ProbeError::Io { what: "/proc/net/netstat", source })?;
    snap.scan_us = started.elapsed().as_micros() as u64;
    Ok(())
}

/// The probes for a set of local ports, from whichever source could be opened.
pub enum Probes {
    /// The eBPF programs (iterator and tracepoints).
    Ebpf(Box<bpf::BpfProbe>),
    /// The netlink sock_diag fallback.
    SockDiag(sock_diag::SockDiag),
}

impl Probes {
    /// eBPF when the kernel takes the programs, else sock_diag. Logs which, and why.
    /// `None` only when neither works (no netlink either: the error is logged).
    pub fn open(ports: &[u16]) -> Option<Self> {
        match Self::open_ebpf(ports) {
            Ok(p) => {
                tracing::info!(source = "ebpf", ?ports, "kernel probes: eBPF (iter/tcp + BTF tracepoints)");
                Some(p)
            }
            Err(ebpf_err) => match Self::open_sock_diag(ports) {
                Ok(p) => {
                    tracing::warn!(
                        source = "sock_diag", ?ports, reason = %ebpf_err,
                        "kernel probes: sock_diag fallback (eBPF unavailable)"
                    );
                    Some(p)
                }
                Err(e) => {
                    tracing::error!(ebpf = %ebpf_err, sock_diag = %e, "kernel probes unavailable");
                    None
                }
            },
        }
    }

    /// The eBPF source only (no fallback).
    pub fn open_ebpf(ports: &[u16]) -> Result<Self, ProbeError> {
        Ok(Self::Ebpf(Box::new(bpf::BpfProbe::load(ports)?)))
    }

    /// The sock_diag source only.
    pub fn open_sock_diag(ports: &[u16]) -> Result<Self, ProbeError> {
        Ok(Self::SockDiag(sock_diag::SockDiag::open(ports)?))
    }

    /// Which source these probes are.
    pub fn source(&self) -> Source {
        match self {
            Self::Ebpf(_) => Source::Ebpf,
            Self::SockDiag(_) => Source::SockDiag,
        }
    }

    /// Looks at the kernel now.
    pub fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        match self {
            Self::Ebpf(p) => p.snapshot(),
            Self::SockDiag(p) => p.snapshot(),
        }
    }
}
