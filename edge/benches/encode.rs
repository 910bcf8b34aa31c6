//! The encode path of one room flush: build the batch, serialize it once per encoding, wrap it
//! into a frame. This runs once per room per window, not per member: the figures show how
//! small it is next to the per-member write (about 5 µs of kernel CPU per write here).
//!
//! Run: `cargo bench -p edge --bench encode`. Results: bench-results/*-encode/.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};

fn batch(n: usize) -> ServerMsg {
    ServerMsg::Batch {
        room: "hot-room".into(),
        messages: (0..n as u64)
            .map(|i| PushMessage {
                seq: 1000 + i,
                ts_us: 1_764_000_000_000_000 + i,
                kind: if i % 100 == 0 { "gift".into() } else { "chat".into() },
                user: format!("user{i}"),
                body: format!(r#"{{"text":"message number {i} in this window","t":{i}}}"#),
            })
            .collect(),
        online: None,
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("flush");
    for n in [1usize, 10, 100] {
        let msg = batch(n);
        g.throughput(Throughput::Elements(n as u64));
        for proto in Subprotocol::ALL {
            g.bench_with_input(BenchmarkId::new(proto.token(), n), &msg, |b, msg| {
                b.iter(|| {
                    let payload = envelope::encode(proto, msg).expect("encode");
                    edge::bus::frame(proto, &payload)
                });
            });
        }
    }
    g.finish();
    let msg = batch(10);
    let bytes = envelope::encode_rkyv(&msg).expect("encode");
    c.bench_function("client/access_rkyv/10", |b| b.iter(|| envelope::access_rkyv(&bytes).is_ok()));
    let json = envelope::encode(Subprotocol::Json, &msg).expect("encode");
    c.bench_function("client/decode_json/10", |b| b.iter(|| envelope::decode_json(&json).expect("valid")));
}

criterion_group!(benches, encode);
criterion_main!(benches);
