//! The eBPF source: loads bpf/tcp_probes.bpf.c with aya and reads what it aggregates.
//!
//! Load: the watched ports go into the object's read-only globals before the verifier sees it,
//! the three tracing programs attach for the life of the [`Ebpf`] value, and the iterator is
//! attached afresh for every scan (an iterator file is read once, to its end).

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{BtfTracePoint, Iter};
use aya::{Btf, Ebpf, EbpfLoader};

use crate::snapshot::{QUEUE_BUCKETS, RemoteRetransmits, Snapshot, Source, top_n};
use crate::{ProbeError, TOP_REMOTES};

/// The compiled object (empty when clang was missing at build time).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcp_probes.bpf.o"));

/// bpf/tcp_probes.h
pub const MAX_PORTS: usize = 16;
const TCP_STATES: usize = 16;
const SUMMARY_MAGIC: u64 = 0x3130_4354_434d_5252;
const CNT_RETRANS: u32 = 0;
const CNT_SYNACK_RETRANS: u32 = 1;
const CNT_OPENED: u32 = 2;
const CNT_CLOSED: u32 = 3;
const CNT_TO_CLOSE_WAIT: u32 = 4;

/// `struct rc_tcp_summary` (bpf/tcp_probes.h), read from the iterator's output.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Summary {
    magic: u64,
    visited: u64,
    matched: u64,
    states: [u64; TCP_STATES],
    sendq_sum: u64,
    sendq_max: u64,
    recvq_sum: u64,
    recvq_max: u64,
    sendq_hist: [u64; QUEUE_BUCKETS],
    recvq_hist: [u64; QUEUE_BUCKETS],
    listen_sockets: [u64; MAX_PORTS],
    listen_backlog: [u64; MAX_PORTS],
    listen_backlog_max: [u64; MAX_PORTS],
    listen_fullest: [u64; MAX_PORTS],
    listen_fullest_max: [u64; MAX_PORTS],
    retrans_live: u64,
}
const _: () =
    assert!(std::mem::size_of::<Summary>() == 8 * (3 + TCP_STATES + 4 + 2 * QUEUE_BUCKETS + 5 * MAX_PORTS + 1));

/// Reads consecutive native-endian u64 words (the summary is nothing else).
struct Words<'a>(std::slice::ChunksExact<'a, u8>);

impl Words<'_> {
    fn one(&mut self) -> u64 {
        self.0.next().map_or(0, |c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
    }

    fn array<const N: usize>(&mut self) -> [u64; N] {
        std::array::from_fn(|_| self.one())
    }
}

impl Summary {
    /// Decodes the iterator's bytes in field order, as the kernel wrote them.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != std::mem::size_of::<Self>() {
            return None;
        }
        let mut w = Words(b.chunks_exact(8));
        let s = Self {
            magic: w.one(),
            visited: w.one(),
            matched: w.one(),
            states: w.array(),
            sendq_sum: w.one(),
            sendq_max: w.one(),
            recvq_sum: w.one(),
            recvq_max: w.one(),
            sendq_hist: w.array(),
            recvq_hist: w.array(),
            listen_sockets: w.array(),
            listen_backlog: w.array(),
            listen_backlog_max: w.array(),
            listen_fullest: w.array(),
            listen_fullest_max: w.array(),
            retrans_live: w.one(),
        };
        (s.magic == SUMMARY_MAGIC).then_some(s)
    }
}

/// `struct rc_remote` (bpf/tcp_probes.h): key of the per-peer retransmit map.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Remote {
    addr: [u8; 16],
    family: u16,
    pad: [u16; 3],
}
const _: () = assert!(std::mem::size_of::<Remote>() == 24);

// SAFETY: Remote is #[repr(C)], made of integers only, with no padding (16 + 2 + 6 = 24 bytes),
// so every bit pattern is a valid value.
unsafe impl aya::Pod for Remote {}

impl Remote {
    fn ip(&self) -> IpAddr {
        if self.family == libc::AF_INET6 as u16 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            IpAddr::V4(Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]))
        }
    }
}

/// The loaded programs and their maps.
pub struct BpfProbe {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    remotes: BpfHashMap<MapData, Remote, u64>,
    ports: Vec<u16>,
    buf: Vec<u8>,
}

pub(crate) fn load_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> ProbeError {
    move |e| ProbeError::Load { program, detail: error_chain(&e) }
}

/// An error and its sources on one line (the verifier's complaint is in a source).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl BpfProbe {
    /// Loads and attaches the probes for sockets whose local port is in `ports`.
    pub fn load(ports: &[u16]) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        if ports.len() > MAX_PORTS {
            return Err(ProbeError::TooManyPorts(ports.len()));
        }
        let mut watch = [0u16; MAX_PORTS];
        watch[..ports.len()].copy_from_slice(ports);
        let n = ports.len() as u32;
        let btf = Btf::from_sys_fs().map_err(|e| ProbeError::Btf(error_chain(&e)))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("watch_ports", &watch, true)
            .override_global("n_watch_ports", &n, true)
            .load(OBJECT)
            .map_err(|e| ProbeError::Load { program: "tcp_probes.bpf.o", detail: error_chain(&e) })?;

        for (prog, tracepoint) in [
            ("rc_retransmit_skb", "tcp_retransmit_skb"),
            ("rc_retransmit_synack", "tcp_retransmit_synack"),
            ("rc_set_state", "inet_sock_set_state"),
        ] {
            let p: &mut BtfTracePoint =
                ebpf.program_mut(prog).ok_or(ProbeError::Missing(prog))?.try_into().map_err(load_err(prog))?;
            p.load(tracepoint, &btf).map_err(load_err(prog))?;
            p.attach().map_err(load_err(prog))?;
        }
        let it: &mut Iter = ebpf
            .program_mut("rc_tcp_summary")
            .ok_or(ProbeError::Missing("rc_tcp_summary"))?
            .try_into()
            .map_err(load_err("rc_tcp_summary"))?;
        it.load("tcp", &btf).map_err(load_err("rc_tcp_summary"))?;

        let counters = PerCpuArray::try_from(ebpf.take_map("counters").ok_or(ProbeError::Missing("counters"))?)
            .map_err(|e| ProbeError::Map { map: "counters", detail: error_chain(&e) })?;
        let remotes =
            BpfHashMap::try_from(ebpf.take_map("retrans_by_remote").ok_or(ProbeError::Missing("retrans_by_remote"))?)
                .map_err(|e| ProbeError::Map { map: "retrans_by_remote", detail: error_chain(&e) })?;
        let mut probe = Self { ebpf, counters, remotes, ports: ports.to_vec(), buf: Vec::with_capacity(4096) };
        // One scan now, so a program the kernel accepts but cannot run fails here, not at the
        // first scrape.
        probe.scan()?;
        Ok(probe)
    }

    /// Walks every TCP socket once (one read of a fresh iterator).
    fn scan(&mut self) -> Result<Summary, ProbeError> {
        let it: &mut Iter = self
            .ebpf
            .program_mut("rc_tcp_summary")
            .ok_or(ProbeError::Missing("rc_tcp_summary"))?
            .try_into()
            .map_err(load_err("rc_tcp_summary"))?;
        let link = it.attach().map_err(load_err("rc_tcp_summary"))?;
        let link = it.take_link(link).map_err(load_err("rc_tcp_summary"))?;
        let mut file =
            link.into_file().map_err(|e| ProbeError::Load { program: "rc_tcp_summary", detail: error_chain(&e) })?;
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // Past a million sockets without output the kernel pauses the walk: go on.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
                Err(source) => return Err(ProbeError::Io { what: "reading the tcp iterator", source }),
            }
        }
        Summary::from_bytes(&self.buf).ok_or(ProbeError::BadSummary(self.buf.len()))
    }

    fn counter(&self, index: u32) -> Result<u64, ProbeError> {
        let per_cpu =
            self.counters.get(&index, 0).map_err(|e| ProbeError::Map { map: "counters", detail: error_chain(&e) })?;
        Ok(per_cpu.iter().sum())
    }

    /// One look: the iterator's summary, the maps' counters and the listeners.
    pub fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        let started = Instant::now();
        let s = self.scan()?;
        let mut snap = Snapshot::empty(Source::Ebpf, &self.ports);
        snap.visited = s.visited;
        snap.sockets = s.matched;
        for (st, &n) in s.states.iter().enumerate() {
            if n > 0 {
                snap.count_state(st, n);
            }
        }
        snap.send_queue.buckets = s.sendq_hist;
        snap.send_queue.sum = s.sendq_sum;
        snap.send_queue.max = s.sendq_max;
        snap.send_queue.sockets = s.sendq_hist.iter().sum();
        snap.recv_queue.buckets = s.recvq_hist;
        snap.recv_queue.sum = s.recvq_sum;
        snap.recv_queue.max = s.recvq_max;
        snap.recv_queue.sockets = s.recvq_hist.iter().sum();
        for (i, l) in snap.listeners.iter_mut().enumerate() {
            l.sockets = s.listen_sockets[i];
            l.backlog = s.listen_backlog[i];
            l.backlog_max = s.listen_backlog_max[i];
            l.fullest = s.listen_fullest[i];
            l.fullest_max = s.listen_fullest_max[i];
        }
        snap.retransmits_live = s.retrans_live;
        snap.retransmits = self.counter(CNT_RETRANS)?;
        snap.synack_retransmits = Some(self.counter(CNT_SYNACK_RETRANS)?);
        snap.opened = Some(self.counter(CNT_OPENED)?);
        snap.closed = Some(self.counter(CNT_CLOSED)?);
        snap.close_wait_entered = Some(self.counter(CNT_TO_CLOSE_WAIT)?);
        let mut remotes = Vec::new();
        // An entry evicted between listing and lookup is simply gone (an Err here).
        for (k, v) in self.remotes.iter().flatten() {
            remotes.push(RemoteRetransmits { addr: k.ip(), retransmits: v });
        }
        snap.top_retransmits = top_n(remotes, TOP_REMOTES);
        crate::finish(&mut snap, started)?;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_decodes_in_field_order_and_checks_magic_and_size() {
        let n = std::mem::size_of::<Summary>() / 8;
        let mut words: Vec<u64> = (0..n as u64).collect();
        words[0] = SUMMARY_MAGIC;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let s = Summary::from_bytes(&bytes).unwrap();
        assert_eq!((s.visited, s.matched, s.states[0]), (1, 2, 3));
        assert_eq!(s.sendq_sum, 3 + TCP_STATES as u64);
        assert_eq!(s.retrans_live, n as u64 - 1);
        assert!(Summary::from_bytes(&bytes[..bytes.len() - 8]).is_none(), "short");
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(Summary::from_bytes(&bad).is_none(), "wrong magic");
    }
}
