/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The few kernel types the roomcast probes read, declared by hand instead of dumping all of
 * /sys/kernel/btf/vmlinux (135k lines). Every record carries preserve_access_index, so clang
 * emits CO-RE relocations and the loader (aya) moves each field access to the offset this
 * running kernel's BTF gives it: field order and padding here do not matter, names and sizes
 * do. The kernel nests several of these fields in anonymous unions; the relocation walks into
 * them by name.
 *
 * Regenerate nothing: when a probe needs a new field, add it here with the kernel's type.
 */
#ifndef __ROOMCAST_VMLINUX_H__
#define __ROOMCAST_VMLINUX_H__

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u32 uid_t;
typedef int pid_t;
typedef unsigned short umode_t;
typedef _Bool bool;
enum { false = 0, true = 1 };

/* uapi constants (include/uapi/linux/bpf.h) */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
};
enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
};

struct sock {
	struct sock_common __sk_common;
	u16 sk_protocol;
	u16 sk_type;
	u32 sk_ack_backlog;
	u32 sk_max_ack_backlog;
};

struct inet_sock {
	struct sock sk;
};

struct inet_connection_sock {
	struct inet_sock icsk_inet;
};

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	u32 copied_seq;
	u32 write_seq;
	u32 rcv_nxt;
	u32 snd_una;
	u32 total_retrans;
};

struct request_sock {
	struct sock_common __req_common;
};

struct seq_file;
struct sk_buff;

struct bpf_iter_meta {
	struct seq_file *seq;
	u64 session_id;
	u64 seq_num;
};

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	uid_t uid;
};

struct inode {
	umode_t i_mode;
	unsigned long i_ino;
};

struct file {
	struct inode *f_inode;
};

struct pid_namespace;

/* One of a process's ids: its number in one pid namespace. Declared whole (an int and a
 * pointer) because the holder iterator indexes struct pid's numbers[] with it; the loader's
 * size relocation (bpf_core_type_size) is what the index is scaled by. */
struct upid {
	int nr;
	struct pid_namespace *ns;
};

/* A process's ids in every pid namespace from the root (numbers[0]) down to its own
 * (numbers[level]). */
struct pid {
	unsigned int level;
	struct upid numbers[1];
};

struct task_struct {
	pid_t tgid;
	struct task_struct *group_leader;
	struct pid *thread_pid;
};

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	u32 fd;
	struct file *file;
};

#pragma clang attribute pop

#endif /* __ROOMCAST_VMLINUX_H__ */
