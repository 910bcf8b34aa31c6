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
 * The edge's listen guard asks it which process holds the listeners on its port (an edge of
 * 10^6 members beside a load generator holding as many descriptors made that walk seconds long).
 * GPL because bpf_seq_write is GPL-only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

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

SEC("iter/task_file")
int rc_file_holders(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct task_struct *task = ctx->task;
	struct inode *inode;
	__u64 ino;
	__u32 pid;

	if (!file || !task)
		return 0;
	inode = file->f_inode;
	if (!inode || (inode->i_mode & S_IFMT) != S_IFSOCK)
		return 0;
	ino = inode->i_ino;
	if (!bpf_map_lookup_elem(&want, &ino))
		return 0;
	pid = task->tgid;
	bpf_seq_write(ctx->meta->seq, &pid, sizeof(pid));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
