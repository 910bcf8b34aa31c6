/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shapes shared by tcp_probes.bpf.c and its Rust loader (ebpf/src/bpf.rs mirrors each struct
 * as #[repr(C)] with a size assert). Change both together.
 */
#ifndef __ROOMCAST_TCP_PROBES_H__
#define __ROOMCAST_TCP_PROBES_H__

/* Ports the loader may watch (read-only globals, set at load time). Power of two. */
#define RC_MAX_PORTS 16
/* log2 buckets: bucket 0 holds 0, bucket i (1..30) holds [2^(i-1), 2^i - 1], bucket 31 the rest. */
#define RC_QUEUE_BUCKETS 32
/* Indexed by the kernel's TCP state number (TCP_ESTABLISHED = 1 ... TCP_NEW_SYN_RECV = 12). */
#define RC_TCP_STATES 16
/* Written first in every summary, so the reader can tell a layout mismatch from data. */
#define RC_SUMMARY_MAGIC 0x31304354434d5252ULL /* "RRMCTC01" */

/* One scan of every TCP socket of the namespace, reduced to what the edge exports. The
 * iterator writes exactly one of these per read of its file. */
struct rc_tcp_summary {
	__u64 magic;
	/* sockets the iterator visited, and those on a watched port */
	__u64 visited;
	__u64 matched;
	__u64 states[RC_TCP_STATES];
	/* Send-Q (write_seq - snd_una) and Recv-Q (rcv_nxt - copied_seq) of non-listening full
	 * sockets: the same figures `ss` prints */
	__u64 sendq_sum;
	__u64 sendq_max;
	__u64 recvq_sum;
	__u64 recvq_max;
	__u64 sendq_hist[RC_QUEUE_BUCKETS];
	__u64 recvq_hist[RC_QUEUE_BUCKETS];
	/* per watched port (same index as watch_ports): listening sockets, their accept queues
	 * (sk_ack_backlog) and the queues' limits (sk_max_ack_backlog), summed over SO_REUSEPORT
	 * siblings */
	__u64 listen_sockets[RC_MAX_PORTS];
	__u64 listen_backlog[RC_MAX_PORTS];
	__u64 listen_backlog_max[RC_MAX_PORTS];
	/* the single fullest listener per port (one shard not accepting shows here, not in the
	 * sum): its accept queue and that queue's limit */
	__u64 listen_fullest[RC_MAX_PORTS];
	__u64 listen_fullest_max[RC_MAX_PORTS];
	/* tcp_sock.total_retrans summed over the live matched sockets */
	__u64 retrans_live;
};

/* Event counters (per-CPU array, summed by the reader). */
enum rc_counter {
	RC_CNT_RETRANS = 0,     /* tcp_retransmit_skb on a watched socket */
	RC_CNT_SYNACK_RETRANS,  /* tcp_retransmit_synack on a watched listener */
	RC_CNT_OPENED,          /* transitions into ESTABLISHED */
	RC_CNT_CLOSED,          /* transitions into CLOSE (listeners excluded) */
	RC_CNT_TO_CLOSE_WAIT,   /* transitions into CLOSE_WAIT */
	RC_COUNTERS,
};

/* Key of the per-remote retransmit map: the peer address, IPv4 in the first four bytes. */
struct rc_remote {
	__u8 addr[16];
	__u16 family;
	__u16 pad[3];
};

#endif /* __ROOMCAST_TCP_PROBES_H__ */
