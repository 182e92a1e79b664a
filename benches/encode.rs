//! Criterion micro-benchmarks of the SSE encoder (`ssegate::event_stream::encode`): the
//! per-event cost paid once per publish, outside the router's lock.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ssegate::{domain::EventId, event_stream};

fn bench_encode(c: &mut Criterion) {
    let id = EventId { epoch: 0x1f3a_9c0b_2d4e_5f60, seq: 1_234_567 };
    let small = "1 42 1763900000123456789";
    let json = format!(r#"{{"order":42,"state":"shipped","items":[{}]}}"#, "1,".repeat(300));
    let multiline = "line of text\n".repeat(80);
    let mut g = c.benchmark_group("encode");
    for (name, event, data) in [
        ("small_message", None, small),
        ("named_1k_json", Some("status"), json.as_str()),
        ("80_lines", Some("log"), multiline.as_str()),
    ] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(name, |b| b.iter(|| event_stream::encode(black_box(event), black_box(data)).finish(id)));
    }
    g.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
