//! Which processes hold given sockets, found by an eBPF iterator over every open file
//! (bpf/file_holders.bpf.c) instead of a readlink of every /proc/[pid]/fd entry.
//!
//! The walk through /proc costs the kernel a dentry and a proc inode per descriptor; beside a
//! load generator holding 10^6 client sockets one walk took seconds of CPU, and on a box whose
//! CPUs are busy (the reconnect storm after a crash) minutes of wall time. The iterator visits
//! the same files without making anything and hands back only the matches. It needs what the
//! probes need (CAP_BPF and CAP_PERFMON, BTF); callers keep the /proc walk for when it is
//! refused.

use std::io::Read;

use aya::maps::HashMap as BpfHashMap;
use aya::programs::Iter;
use aya::{Btf, EbpfLoader};

use crate::ProbeError;
use crate::bpf::{error_chain, load_err};

/// The compiled object (empty when clang was missing at build time).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/file_holders.bpf.o"));

/// The most inodes one look takes (the `want` map's size in bpf/file_holders.bpf.c).
pub const MAX_HOLDER_INODES: usize = 1024;

const PROGRAM: &str = "rc_file_holders";

/// The ids of the processes with any of the sockets `inodes` among their open files, sorted,
/// each once. Empty when no process holds them (a socket only an io_uring of a dead process
/// still refers to, say).
pub fn socket_holders(inodes: &[u64]) -> Result<Vec<u32>, ProbeError> {
    if OBJECT.is_empty() {
        return Err(ProbeError::NotBuilt);
    }
    if inodes.len() > MAX_HOLDER_INODES {
        return Err(ProbeError::TooManyInodes(inodes.len()));
    }
    let btf = Btf::from_sys_fs().map_err(|e| ProbeError::Btf(error_chain(&e)))?;
    // The ids come back as this process's /proc knows them (see bpf/file_holders.bpf.c): the
    // program is told how far above this process's pid namespace that /proc's sits.
    let up = std::fs::read_to_string("/proc/self/status").map_or(0, |s| proc_ns_up(&s));
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("proc_ns_up", &up, true)
        .load(OBJECT)
        .map_err(|e| ProbeError::Load { program: "file_holders.bpf.o", detail: error_chain(&e) })?;
    {
        let mut want: BpfHashMap<_, u64, u8> =
            BpfHashMap::try_from(ebpf.map_mut("want").ok_or(ProbeError::Missing("want"))?)
                .map_err(|e| ProbeError::Map { map: "want", detail: error_chain(&e) })?;
        for &inode in inodes {
            want.insert(inode, 1, 0).map_err(|e| ProbeError::Map { map: "want", detail: error_chain(&e) })?;
        }
    }
    let it: &mut Iter =
        ebpf.program_mut(PROGRAM).ok_or(ProbeError::Missing(PROGRAM))?.try_into().map_err(load_err(PROGRAM))?;
    it.load("task_file", &btf).map_err(load_err(PROGRAM))?;
    let link = it.attach().map_err(load_err(PROGRAM))?;
    let link = it.take_link(link).map_err(load_err(PROGRAM))?;
    let mut file = link.into_file().map_err(|e| ProbeError::Load { program: PROGRAM, detail: error_chain(&e) })?;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // The kernel pauses a long walk that writes nothing: go on.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
            Err(source) => return Err(ProbeError::Io { what: "reading the task_file iterator", source }),
        }
    }
    Ok(pids(&out))
}

/// How many pid namespaces above this process's own the /proc that printed `status` (the text of
/// /proc/self/status) belongs to: the ids on its `NSpid:` line less one; 0 without that line
/// (kernels before 4.1, which print only the /proc's own id).
fn proc_ns_up(status: &str) -> u32 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map_or(0, |ids| u32::try_from(ids.split_whitespace().count().saturating_sub(1)).unwrap_or(0))
}

/// The iterator's output (native-endian u32 process ids, one per matching file) as sorted,
/// distinct ids; a torn tail is ignored.
fn pids(bytes: &[u8]) -> Vec<u32> {
    let mut pids: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_sorted_distinct_pids() {
        let mut b = Vec::new();
        for p in [7u32, 3, 7, 1] {
            b.extend_from_slice(&p.to_ne_bytes());
        }
        b.push(9);
        assert_eq!(pids(&b), vec![1, 3, 7]);
        assert!(pids(&[]).is_empty());
    }

    #[test]
    fn proc_ns_up_counts_the_namespaces_between_proc_and_this_process() {
        // /proc of this process's own namespace (the host, or a container with its /proc).
        assert_eq!(proc_ns_up("Name:\tedge\nTgid:\t2\nNSpid:\t2\nNSpgid:\t2\n"), 0);
        // The host's /proc read from a child namespace (unshare --pid --fork, no --mount-proc).
        assert_eq!(proc_ns_up("Tgid:\t6791\nNSpid:\t6791\t2\n"), 1);
        assert_eq!(proc_ns_up("NSpid:\t9\t5\t1\n"), 2);
        assert_eq!(proc_ns_up("Name:\tedge\nPid:\t7\n"), 0);
        assert_eq!(proc_ns_up(""), 0);
    }
}
