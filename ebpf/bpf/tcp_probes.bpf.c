// SPDX-License-Identifier: GPL-2.0
/*
 * roomcast kernel probes: what the kernel knows about the edge's TCP sockets.
 *
 *  - iter/tcp rc_tcp_summary: walks every TCP socket of the namespace once per read of its
 *    file and writes ONE struct rc_tcp_summary (states, Send-Q/Recv-Q sums, maxima and log2
 *    histograms, accept queues per watched port), so a scrape over 10^5 sockets costs one
 *    read(2) and ~1 KiB of output instead of 10^5 lines.
 *  - tp_btf/tcp_retransmit_skb, tp_btf/tcp_retransmit_synack: retransmit counters, and the
 *    worst remote addresses in a bounded LRU map.
 *  - tp_btf/inet_sock_set_state: connections opened and closed, transitions into CLOSE_WAIT.
 *
 * Only sockets whose local port is in watch_ports count (set by the loader before load).
 * GPL because bpf_seq_write and the tracing helpers are GPL-only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "tcp_probes.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

/* include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT,
	TCP_SYN_RECV,
	TCP_FIN_WAIT1,
	TCP_FIN_WAIT2,
	TCP_TIME_WAIT,
	TCP_CLOSE,
	TCP_CLOSE_WAIT,
	TCP_LAST_ACK,
	TCP_LISTEN,
	TCP_CLOSING,
	TCP_NEW_SYN_RECV,
};

const volatile __u16 watch_ports[RC_MAX_PORTS] = {};
const volatile __u32 n_watch_ports = 0;

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rc_tcp_summary);
} summary SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RC_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct rc_remote);
	__type(value, __u64);
} retrans_by_remote SEC(".maps");

/* Index of port in watch_ports, or -1. */
static __always_inline int port_index(__u16 port)
{
	for (int i = 0; i < RC_MAX_PORTS; i++) {
		if (i >= n_watch_ports)
			break;
		if (watch_ports[i] == port)
			return i;
	}
	return -1;
}

/* 0 for 0, else floor(log2 v) + 1, capped at the last bucket. */
static __always_inline __u32 bucket_of(__u64 v)
{
	__u32 r = 0;

	if (v == 0)
		return 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	r += 1;
	return r < RC_QUEUE_BUCKETS ? r : RC_QUEUE_BUCKETS - 1;
}

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);

	if (c)
		*c += 1;
}

static __always_inline void count_remote(const struct sock_common *skc)
{
	struct rc_remote key = {};
	__u64 one = 1, *v;

	key.family = skc->skc_family;
	if (key.family == AF_INET6)
		__builtin_memcpy(key.addr, &skc->skc_v6_daddr, 16);
	else
		__builtin_memcpy(key.addr, &skc->skc_daddr, 4);
	v = bpf_map_lookup_elem(&retrans_by_remote, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&retrans_by_remote, &key, &one, BPF_NOEXIST);
}

SEC("iter/tcp")
int rc_tcp_summary(struct bpf_iter__tcp *ctx)
{
	struct bpf_iter_meta *meta = ctx->meta;
	struct sock_common *skc = ctx->sk_common;
	struct rc_tcp_summary *s;
	struct tcp_sock *tp;
	__u32 zero = 0, sendq, recvq, b;
	__s32 rq;
	__u8 state;
	int idx;

	s = bpf_map_lookup_elem(&summary, &zero);
	if (!s)
		return 0;
	/* A new scan starts at seq_num 0: forget the previous one. */
	if (meta->seq_num == 0) {
		__u64 *w = (__u64 *)s;

		/* volatile: clang would turn the loop into a memset call, which BPF lacks */
		for (int i = 0; i < (int)(sizeof(*s) / sizeof(__u64)); i++)
			*(volatile __u64 *)&w[i] = 0;
		s->magic = RC_SUMMARY_MAGIC;
	}
	/* Called once more with no socket when the walk ends: hand the summary over. */
	if (!skc) {
		bpf_seq_write(meta->seq, s, sizeof(*s));
		return 0;
	}
	s->visited++;
	idx = port_index(skc->skc_num);
	if (idx < 0)
		return 0;
	idx &= RC_MAX_PORTS - 1;
	s->matched++;
	state = skc->skc_state;
	if (state < RC_TCP_STATES)
		s->states[state]++;
	/* no queues to speak of (sock_diag reports zeros for these too) */
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV || state == TCP_SYN_RECV)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	if (state == TCP_LISTEN) {
		struct sock *sk = (struct sock *)tp;
		__u64 q = sk->sk_ack_backlog, max = sk->sk_max_ack_backlog;

		s->listen_sockets[idx]++;
		s->listen_backlog[idx] += q;
		s->listen_backlog_max[idx] += max;
		/* fuller means a larger q / max; compare q * other_max with other_q * max */
		if (s->listen_sockets[idx] == 1 || q * s->listen_fullest_max[idx] > s->listen_fullest[idx] * max) {
			s->listen_fullest[idx] = q;
			s->listen_fullest_max[idx] = max;
		}
		return 0;
	}
	/* The same arithmetic as tcp_diag_get_info(), which `ss` shows. */
	sendq = tp->write_seq - tp->snd_una;
	rq = (__s32)(tp->rcv_nxt - tp->copied_seq);
	recvq = rq < 0 ? 0 : (__u32)rq;
	s->sendq_sum += sendq;
	s->recvq_sum += recvq;
	if (sendq > s->sendq_max)
		s->sendq_max = sendq;
	if (recvq > s->recvq_max)
		s->recvq_max = recvq;
	b = bucket_of(sendq) & (RC_QUEUE_BUCKETS - 1);
	s->sendq_hist[b]++;
	b = bucket_of(recvq) & (RC_QUEUE_BUCKETS - 1);
	s->recvq_hist[b]++;
	s->retrans_live += tp->total_retrans;
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(rc_retransmit_skb, const struct sock *sk, const struct sk_buff *skb, int err)
{
	if (err)
		return 0;
	if (port_index(sk->__sk_common.skc_num) < 0)
		return 0;
	count(RC_CNT_RETRANS);
	count_remote(&sk->__sk_common);
	return 0;
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(rc_retransmit_synack, const struct sock *sk, const struct request_sock *req)
{
	if (port_index(sk->__sk_common.skc_num) < 0)
		return 0;
	count(RC_CNT_SYNACK_RETRANS);
	count_remote(&req->__req_common);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (port_index(sk->__sk_common.skc_num) < 0)
		return 0;
	if (newstate == TCP_ESTABLISHED)
		count(RC_CNT_OPENED);
	else if (newstate == TCP_CLOSE && oldstate != TCP_LISTEN)
		count(RC_CNT_CLOSED);
	else if (newstate == TCP_CLOSE_WAIT)
		count(RC_CNT_TO_CLOSE_WAIT);
	return 0;
}
