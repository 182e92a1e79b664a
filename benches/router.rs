//! Criterion micro-benchmarks of the router's fan-out (`ssegate::router::Router::publish`):
//! one event to a topic followed by N connections, and one event to one user among N. The
//! mailboxes are drained outside the timed section, as the connections' bodies would.

use std::{
    collections::VecDeque,
    sync::Arc,
    task::{Context, Waker},
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ssegate::{
    domain::{Event, Target, Topic, UserId},
    router::{Registration, Router, RouterConfig, Subscription},
};

/// Publishes between drains; below the default queue capacity (256), so nobody is cut off.
const BATCH: u64 = 128;

fn setup(conns: usize) -> (Arc<Router>, Vec<Registration>) {
    let router = Router::new(RouterConfig::with_queue_capacity(256));
    let regs = (0..conns)
        .map(|i| {
            let sub = Subscription {
                user: UserId::parse(&format!("u{i}")).expect("valid user id"),
                groups: vec![],
                topics: vec![Topic::parse("t0").expect("valid topic")],
                abort: None,
                resume: None,
            };
            router.subscribe(sub).expect("under the connection limits")
        })
        .collect();
    (router, regs)
}

fn drain(regs: &[Registration]) {
    let mut cx = Context::from_waker(Waker::noop());
    for r in regs {
        let _ = r.mailbox().poll_drain(&mut cx, &mut VecDeque::new());
    }
}

/// Times only the publishes; drains every `BATCH` publishes, untimed.
fn timed(iters: u64, regs: &[Registration], mut publish: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let t = Instant::now();
        publish();
        total += t.elapsed();
        if i % BATCH == BATCH - 1 {
            drain(regs);
        }
    }
    drain(regs);
    total
}

fn bench_fan_out(c: &mut Criterion) {
    let event = Event { name: None, data: "1 42 1763900000123456789".into() };
    let mut g = c.benchmark_group("router_publish_topic");
    for conns in [100usize, 1_000, 10_000] {
        let (router, regs) = setup(conns);
        let topic = Target::Topic(Topic::parse("t0").expect("valid topic"));
        g.throughput(Throughput::Elements(conns as u64));
        g.bench_with_input(BenchmarkId::from_parameter(conns), &conns, |b, _| {
            b.iter_custom(|iters| {
                timed(iters, &regs, || {
                    router.publish(topic.clone(), &event).expect("router open");
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("router_publish_user");
    let (router, regs) = setup(10_000);
    let users: Vec<Target> =
        (0..10_000).map(|i| Target::users(vec![UserId::parse(&format!("u{i}")).expect("valid user id")])).collect();
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_of_10000", |b| {
        let mut next = 0;
        b.iter_custom(|iters| {
            timed(iters, &regs, || {
                next = (next + 1) % users.len();
                router.publish(users[next].clone(), &event).expect("router open");
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = bench_fan_out
}
criterion_main!(benches);
