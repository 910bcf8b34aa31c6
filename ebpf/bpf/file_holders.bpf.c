// SPDX-License-Identifier: GPL-2.0
/*
 * The processes holding given sockets: `ss -p` without its walk of every /proc/[pid]/fd.
 *
 *  - iter/task_file rc_file_holders: visits every open file of every process once per read of
 *    its file (threads sharing a table are visited once) and writes the process id (tgid, a
 *    u32) for each socket whose inode is a key of `want` (filled by the loader before the
 *    iterator is attached). Everything else costs a type check and, for sockets, one hash
 *    lookup, in the kernel: no dentry or proc inode is made per descriptor, as each readlink
 *    of /proc/[pid]/fd/N makes.
 *
 * The id written is the one the reader's /proc knows the process by, not the kernel's global
 * tgid: in a container (a pid namespace of its own, with its /proc) the global id is another
 * process's or none, and the guard named "pid 6791 (?)" for an edge that was pid 2 there.
 *
 * The edge's listen guard asks it which process holds the listeners on its port (an edge of
 * 10^6 members beside a load generator holding as many descriptors made that walk seconds long).
 * GPL because bpf_seq_write is GPL-only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* Socket inode numbers to look for (value unused). Sized in step with MAX_HOLDER_INODES in
 * src/bpf.rs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} want SEC(".maps");

/* How many pid namespaces the reader's /proc sits above the reader's own: the entries of NSpid
 * in /proc/self/status less one (0 where /proc belongs to the reader's namespace, as in a
 * container; 1 after `unshare --pid --fork` without a /proc of its own). Set by the loader. */
const volatile __u32 proc_ns_up = 0;

/* MAX_PID_NS_LEVEL (include/linux/pid_namespace.h): no pid has more levels. */
#define MAX_PID_LEVEL 32

/* The id of `task`'s process in the pid namespace `level` levels below the root; 0 when it has
 * none there. */
static __always_inline __u32 pid_at_level(struct task_struct *task, __u32 level)
{
	struct pid *p = BPF_CORE_READ(task, group_leader, thread_pid);
	__u32 deepest;
	int nr = 0;

	if (!p || level >= MAX_PID_LEVEL)
		return 0;
	deepest = BPF_CORE_READ(p, level);
	if (level > deepest)
		return 0;
	/* numbers[] is sized at run time (level + 1 entries): the address is computed from the
	 * running kernel's offsets and sizes, then read. */
	bpf_probe_read_kernel(&nr, sizeof(nr),
			      (const char *)p + bpf_core_field_offset(struct pid, numbers) +
				      (__u64)level * bpf_core_type_size(struct upid) +
				      bpf_core_field_offset(struct upid, nr));
	return nr > 0 ? (__u32)nr : 0;
}

SEC("iter/task_file")
int rc_file_holders(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct task_struct *task = ctx->task;
	struct inode *inode;
	__u64 ino;
	__u32 pid, reader_level;

	if (!file || !task)
		return 0;
	inode = file->f_inode;
	if (!inode || (inode->i_mode & S_IFMT) != S_IFSOCK)
		return 0;
	ino = inode->i_ino;
	if (!bpf_map_lookup_elem(&want, &ino))
		return 0;
	/* The reader's level, less the levels its /proc sits above it: the namespace whose ids the
	 * reader looks up. */
	reader_level = BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), thread_pid, level);
	if (proc_ns_up > reader_level)
		return 0;
	pid = pid_at_level(task, reader_level - proc_ns_up);
	if (!pid)
		return 0;
	bpf_seq_write(ctx->meta->seq, &pid, sizeof(pid));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
