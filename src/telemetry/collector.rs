//! The collector that reads the server's counts at scrape time: the router's `Stats`, the
//! edges' `EdgeMetrics` and the backplane's state, encoded as OpenMetrics families; and the
//! small encoding helpers the process collector shares.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::{
    histogram::Histogram,
    metrics::{AuthorizerOutcome, EdgeMetrics, REJECTIONS},
};
use crate::{
    backplane::Backplane,
    presence::Hub,
    router::{CloseReason, Partitions, RESUME_OUTCOMES, TARGET_KINDS},
};

pub(super) struct ServerCollector {
    pub routers: Arc<Partitions>,
    pub backplane: Arc<Backplane>,
    pub presence: Arc<Hub>,
    pub edge: Arc<EdgeMetrics>,
}

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCollector")
    }
}

/// Writes one sample of a counter or gauge.
fn value(mut m: MetricEncoder, ty: MetricType, v: f64) -> Result<(), std::fmt::Error> {
    match ty {
        MetricType::Counter => m.encode_counter::<NoLabelSet, _, f64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

/// Writes one metric without labels.
pub(super) fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    v: f64,
) -> Result<(), std::fmt::Error> {
    value(enc.encode_descriptor(name, help, None, ty)?, ty, v)
}

/// Writes one metric with one sample per label set.
fn labelled<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        value(m.encode_family(&labels)?, ty, v as f64)?;
    }
    Ok(())
}

fn histogram(enc: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> Result<(), std::fmt::Error> {
    let (sum, count, buckets) = h.snapshot();
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for ServerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter as C, Gauge as G};
        let s = self.routers.stats();
        let e = &self.edge;
        single(&mut enc, "ssegate_connections", "Open SSE connections", G, s.connections as f64)?;
        single(&mut enc, "ssegate_users", "Distinct users with an open connection", G, s.users as f64)?;
        single(&mut enc, "ssegate_groups", "Distinct groups joined by an open connection", G, s.groups as f64)?;
        single(&mut enc, "ssegate_topics", "Distinct topics followed by an open connection", G, s.topics as f64)?;
        single(&mut enc, "ssegate_connections_opened", "SSE connections opened", C, s.connections_opened as f64)?;
        labelled(
            &mut enc,
            "ssegate_connections_closed",
            "SSE connections closed, by reason",
            C,
            CloseReason::ALL.iter().map(|r| ([("reason", r.as_str())], e.closed[*r as usize].load(Relaxed))),
        )?;
        labelled(
            &mut enc,
            "ssegate_connections_rejected",
            "SSE connection requests refused, by reason",
            C,
            REJECTIONS.iter().enumerate().map(|(i, r)| ([("reason", *r)], e.rejected[i].load(Relaxed))),
        )?;
        labelled(
            &mut enc,
            "ssegate_authorizer_calls",
            "Calls to the backend's authorizer (--authorizer-addr), by outcome (breaker_open: refused without a call)",
            C,
            AuthorizerOutcome::ALL
                .iter()
                .enumerate()
                .map(|(i, o)| ([("outcome", *o)], e.authorizer_calls[i].load(Relaxed))),
        )?;
        labelled(
            &mut enc,
            "ssegate_authorizer_cache",
            "Authorizer look-ups, by result (hit: a cached answer; miss: a call, or one in flight for the same credential)",
            C,
            [("hit", 0), ("miss", 1)].map(|(r, i)| ([("result", r)], e.authorizer_cache[i].load(Relaxed))),
        )?;
        let published =
            TARGET_KINDS.iter().zip(s.published_by_target).map(|(t, n)| ([("target", *t), ("outcome", "ok")], n));
        let failed = TARGET_KINDS.iter().enumerate().flat_map(|(i, t)| {
            [("invalid", 0), ("unavailable", 1), ("unknown", 2)]
                .map(|(outcome, j)| ([("target", *t), ("outcome", outcome)], e.publish_failed[i][j].load(Relaxed)))
        });
        labelled(
            &mut enc,
            "ssegate_events_published",
            "Publish requests, by target kind and outcome (ok; invalid; unavailable: not applied; unknown: sent, not acknowledged)",
            C,
            published.chain(failed),
        )?;
        single(
            &mut enc,
            "ssegate_events_delivered",
            "Event copies written to connections",
            C,
            s.events_delivered as f64,
        )?;
        single(
            &mut enc,
            "ssegate_events_dropped",
            "Event copies queued for a connection that closed before writing them",
            C,
            s.events_dropped as f64,
        )?;
        single(&mut enc, "ssegate_events_replayed", "Missed events re-sent on resume", C, s.events_replayed as f64)?;
        labelled(
            &mut enc,
            "ssegate_replay_resumes",
            "Connections that came with Last-Event-ID, by outcome (resumed = replay hit; others are misses)",
            C,
            RESUME_OUTCOMES.iter().zip(s.resumes_by_outcome).map(|(o, n)| ([("outcome", *o)], n)),
        )?;
        single(&mut enc, "ssegate_replay_log_events", "Events in the replay log", G, s.replay_log_events as f64)?;
        single(&mut enc, "ssegate_replay_log_bytes", "Bytes in the replay log", G, s.replay_log_bytes as f64)?;
        single(
            &mut enc,
            "ssegate_retained_values",
            "Retained values (one per target and event name)",
            G,
            s.retained_values as f64,
        )?;
        single(&mut enc, "ssegate_retained_bytes", "Bytes the retained values take", G, s.retained_bytes as f64)?;
        single(
            &mut enc,
            "ssegate_retained_sent",
            "Retained events sent to connections as they opened",
            C,
            s.retained_sent as f64,
        )?;
        histogram(
            &mut enc,
            "ssegate_delivery_latency_seconds",
            "Publish to socket write, one sample per write (its oldest event)",
            &e.delivery_latency,
        )?;
        histogram(
            &mut enc,
            "ssegate_queue_depth",
            "Frames found queued at each drain of a connection",
            &e.queue_depth,
        )?;
        single(
            &mut enc,
            "ssegate_backplane_up",
            "1 while the backplane takes publishes (memory: always, or with --data-dir while its writes succeed; NATS: while JetStream answers its probe), else 0",
            G,
            if self.backplane.is_up() { 1.0 } else { 0.0 },
        )?;
        single(
            &mut enc,
            "ssegate_retained_persist_failures",
            "Retained values the NATS backplane could not write to its key-value bucket (the events were published)",
            C,
            self.backplane.retained_persist_failures() as f64,
        )?;
        single(
            &mut enc,
            "ssegate_backplane_epoch_changes",
            "Times the NATS stream was found recreated (a new identity, so a new epoch of ids): clients were told with ssegate.missed (stream_recreated)",
            C,
            self.backplane.epoch_changes() as f64,
        )?;
        if let Some(order) = self.backplane.order_stats() {
            single(
                &mut enc,
                "ssegate_backplane_late_events",
                "Events a live copy brought behind a later event of another subject (NATS interest delivery): connections already past them were told ssegate.missed (late)",
                C,
                order.late.load(std::sync::atomic::Ordering::Relaxed) as f64,
            )?;
            histogram(
                &mut enc,
                "ssegate_backplane_copy_reorder_seconds",
                "How long after a live copy with a higher sequence an earlier one arrived (NATS interest delivery; copies of one batch are sorted and not counted)",
                &order.reordered,
            )?;
        }
        single(
            &mut enc,
            "ssegate_idempotency_evicted",
            "Idempotency keys the memory backplane forgot inside their window because it held its 100,000 (a retry with one is published again)",
            C,
            self.backplane.idempotency_evicted() as f64,
        )?;
        let p = &self.presence;
        single(
            &mut enc,
            "ssegate_presence_online_users",
            "Users online in this replica's cluster view (WatchPresence; those in their grace included)",
            G,
            p.online() as f64,
        )?;
        single(&mut enc, "ssegate_presence_watchers", "Open WatchPresence calls", G, p.watchers() as f64)?;
        single(
            &mut enc,
            "ssegate_presence_replicas",
            "Replicas this one hears presence from, itself included (they share the presence webhook)",
            G,
            p.replicas().len() as f64,
        )?;
        single(
            &mut enc,
            "ssegate_presence_watchers_cut",
            "WatchPresence calls ended with RESOURCE_EXHAUSTED because the watcher did not read and its queue filled up",
            C,
            p.cut_off.load(Relaxed) as f64,
        )?;
        if let Some(out) = p.webhook() {
            let c = &out.counters;
            single(
                &mut enc,
                "ssegate_presence_webhook_sent",
                "Presence events the webhook endpoint accepted (2xx)",
                C,
                c.sent.load(Relaxed) as f64,
            )?;
            single(
                &mut enc,
                "ssegate_presence_webhook_dropped",
                "Presence events not sent: the oldest when the webhook queue was full, and batches the endpoint refused (4xx)",
                C,
                c.dropped.load(Relaxed) as f64,
            )?;
            single(
                &mut enc,
                "ssegate_presence_webhook_retries",
                "Webhook POSTs retried (failed, timed out, 408, 429 or 5xx)",
                C,
                c.retries.load(Relaxed) as f64,
            )?;
        }
        if let Some((stats, segments)) = self.backplane.data_dir_stats() {
            single(
                &mut enc,
                "ssegate_data_dir_write_failures",
                "Writes to --data-dir that failed (their publishes were answered UNAVAILABLE)",
                C,
                stats.write_failures as f64,
            )?;
            single(
                &mut enc,
                "ssegate_data_dir_syncs",
                "fdatasyncs of --data-dir's log (each covers a batch of publishes)",
                C,
                stats.syncs as f64,
            )?;
            single(&mut enc, "ssegate_data_dir_segments", "Segment files in --data-dir", G, segments as f64)?;
        }
        single(&mut enc, "ssegate_uptime_seconds", "Seconds since start", G, self.routers.uptime().as_secs_f64())
    }
}
