//! `ssegate-bench raw-nats`: the broker's own figure. A plain JetStream publisher (async-nats,
//! as ssegate uses) stores events in a fresh stream of the same kind as ssegate's (file
//! storage, the same limits and duplicate window), keeping a window of publishes waiting for
//! their acknowledgement on each of several tasks, and reports acknowledged publishes per
//! second and the broker's CPU per event. Run beside ssegate on the same broker, it says how
//! far from the broker's limit ssegate's ingest is (BENCHMARKS.md, NATS backplane).
//!
//! With `--streams N` (and `--replicas R` on a cluster) the publishers spread over N streams,
//! publisher i on stream i mod N: the broker's side of partitioned streams (issue 26, goal 3).
//! Each `--broker-pid` is one node, reported separately, so that a leader's CPU per event
//! and a follower's can be told apart, with the node each stream's leader landed on.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use clap::Args;

use crate::{args::MAX_DURATION, procstat};

#[derive(Args, Debug)]
pub struct RawNatsArgs {
    /// The broker (loopback only).
    #[arg(long, default_value = "nats://127.0.0.1:14222")]
    pub nats_url: String,
    /// The stream to create (deleted first if it exists) and its subject. With several
    /// streams, `<stream>_<k>` on `<subject>.<k>`.
    #[arg(long, default_value = "SSEGATE_RAW_BENCH")]
    pub stream: String,
    #[arg(long, default_value = "ssegate-raw-bench")]
    pub subject: String,
    /// Streams to spread the publishers over (publisher i publishes to stream i mod N).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Copies of each stream (JetStream `num_replicas`: 1, or 3 on a cluster of 3).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Server tags to place the streams on, stream k on the k-th (mod their number): spreads
    /// R1 streams' leaders over the nodes (each node started with `server_tags: [<tag>]`).
    /// JetStream places them by itself otherwise (all on one node, often).
    #[arg(long, value_delimiter = ',')]
    pub place_on: Vec<String>,
    /// Publishing tasks, and publishes each keeps waiting for their acknowledgement.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Bytes of each event's payload.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    #[arg(long, default_value = "10s", value_parser = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string()))]
    pub duration: Duration,
    /// The broker's process, to report its CPU per event; once per node of a cluster.
    #[arg(long)]
    pub broker_pid: Vec<u32>,
    #[arg(long, default_value = "raw-nats")]
    pub label: String,
}

pub fn run(args: RawNatsArgs) -> Result<(), String> {
    let host = args.nats_url.trim_start_matches("nats://").split(':').next().unwrap_or("");
    if !(host == "localhost" || host.starts_with("127.") || host == "[::1]") {
        return Err(format!("refusing a non-loopback broker: {}", args.nats_url));
    }
    if args.duration.is_zero() || args.duration > MAX_DURATION || args.publishers == 0 || args.window == 0 {
        return Err("--duration must be positive and at most 10 min; --publishers and --window at least 1".into());
    }
    if args.streams == 0 || args.streams > 64 || !(1..=5).contains(&args.replicas) {
        return Err("--streams must be 1 to 64 and --replicas 1 to 5".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client = async_nats::connect(&args.nats_url).await.map_err(|e| format!("connect: {e}"))?;
        let js = jetstream::new(client);
        let names: Vec<(String, String)> = if args.streams == 1 {
            vec![(args.stream.clone(), args.subject.clone())]
        } else {
            (0..args.streams).map(|k| (format!("{}_{k}", args.stream), format!("{}.{k}", args.subject))).collect()
        };
        let mut leaders = Vec::new();
        for (k, (name, subject)) in names.iter().enumerate() {
            let _ = js.delete_stream(name).await;
            let placement = (!args.place_on.is_empty()).then(|| stream::Placement {
                tags: vec![args.place_on[k % args.place_on.len()].clone()],
                ..Default::default()
            });
            let mut created = js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    storage: stream::StorageType::File,
                    num_replicas: args.replicas,
                    placement,
                    max_age: Duration::from_secs(3600),
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create stream {name}: {e}"))?;
            let info = created.info().await.map_err(|e| format!("stream info {name}: {e}"))?;
            leaders.push(info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default());
        }
        let broker = || args.broker_pid.iter().map(|p| procstat::read_one(*p)).collect::<Vec<_>>();
        let before = broker();
        let start = Instant::now();
        let deadline = start + args.duration;
        let payload = bytes::Bytes::from(vec![b'x'; args.payload_bytes]);
        let mut tasks = Vec::new();
        for i in 0..args.publishers {
            let subject = names[i % names.len()].1.clone();
            let (js, payload, window) = (js.clone(), payload.clone(), args.window);
            tasks.push(tokio::spawn(async move {
                let (mut acked, mut failed) = (0u64, 0u64);
                let mut waiting: VecDeque<PublishAckFuture> = VecDeque::with_capacity(window);
                while Instant::now() < deadline {
                    if waiting.len() == window
                        && let Some(f) = waiting.pop_front()
                    {
                        match f.await {
                            Ok(_) => acked += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    match js
                        .send_publish(
                            subject.clone(),
                            jetstream::message::PublishMessage::build().payload(payload.clone()),
                        )
                        .await
                    {
                        Ok(f) => waiting.push_back(f),
                        Err(_) => failed += 1,
                    }
                }
                for f in waiting {
                    match tokio::time::timeout(Duration::from_secs(10), f).await {
                        Ok(Ok(_)) => acked += 1,
                        _ => failed += 1,
                    }
                }
                (acked, failed)
            }));
        }
        let (mut acked, mut failed) = (0, 0);
        for t in tasks {
            let (a, f) = t.await.map_err(|e| e.to_string())?;
            acked += a;
            failed += f;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = broker();
        // One entry per node: its CPU per acknowledged event (of all streams).
        let cpu: Vec<serde_json::Value> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| match (b, a) {
                (Some(b), Some(a)) if acked > 0 => {
                    let us = |x: f64| x * 1e6 / acked as f64;
                    serde_json::json!({
                        "user_us": us((a.cpu_seconds - a.sys_seconds) - (b.cpu_seconds - b.sys_seconds)),
                        "system_us": us(a.sys_seconds - b.sys_seconds),
                    })
                }
                _ => serde_json::Value::Null,
            })
            .collect();
        for (name, _) in &names {
            let _ = js.delete_stream(name).await;
        }
        let line = serde_json::json!({
            "label": args.label,
            "publishers": args.publishers,
            "streams": args.streams,
            "replicas": args.replicas,
            "leaders": leaders,
            "window": args.window,
            "acked": acked,
            "failed": failed,
            "seconds": elapsed,
            "acked_per_second": acked as f64 / elapsed,
            // A single broker's figure as an object (as before), a cluster's as one per node.
            "broker_cpu_per_event": match cpu.len() {
                0 => serde_json::Value::Null,
                1 => cpu[0].clone(),
                _ => serde_json::Value::Array(cpu),
            },
        });
        println!("{line}");
        Ok(())
    })
}
