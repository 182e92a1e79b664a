//! The backplane's long-running tasks: the broker probe and the stream consumer, and the
//! resynchronisation with a recreated stream that the consumer carries out.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    HEALTH_EVERY, HEALTH_TIMEOUT, NatsBackplane, NatsError,
    identity::{self, Source},
};
use crate::{backplane::wire, router::Router};

/// The probe runs at most this often when asked to run early (a publish found no stream, or a
/// client resumed after an id this replica has not received).
const EARLY_PROBE_GAP: Duration = Duration::from_millis(100);

/// How the consumer stopped without an error.
enum Ended {
    /// The messages ran out, or the connection came back: restart where it was.
    Restart,
    /// The stream's identity changed, or the client recreated the consumer on its own (after
    /// which it may read another stream of the same name): restart at once, with the identity
    /// read again.
    Check,
}

#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    #[error("the stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Nats(async_nats::Error),
    #[error(transparent)]
    Resync(#[from] NatsError),
}

fn nats(e: impl Into<async_nats::Error>) -> ConsumeError {
    ConsumeError::Nats(e.into())
}

impl NatsBackplane {
    /// Probes the broker until `stop`: see `HEALTH_EVERY`. Also runs early when asked (at most
    /// every `EARLY_PROBE_GAP`).
    pub(super) async fn probe(self: Arc<Self>, router: Arc<Router>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        let mut down_since = None::<Instant>;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                () = self.kick.notified() => {}
                () = router.unsettled() => {}
            }
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = async {
                    tokio::time::sleep_until(last + EARLY_PROBE_GAP).await;
                    last = tokio::time::Instant::now();
                    self.check(&router).await
                } => r,
            };
            match result {
                Ok(()) => {
                    if !self.probe_ok.swap(true, Relaxed) {
                        let after_ms = down_since.take().map(|t| t.elapsed().as_millis() as u64);
                        tracing::info!(after_ms, "NATS JetStream answers again: publishing resumes");
                    }
                }
                Err(reason) => {
                    if self.probe_ok.swap(false, Relaxed) {
                        down_since = Some(Instant::now());
                        tracing::warn!(%reason, "NATS JetStream is not answering: publishes are refused until it does");
                    }
                }
            }
            self.refresh_up();
        }
    }

    /// One round trip to JetStream (the stream's info, creating the stream if it is missing),
    /// bounded by `HEALTH_TIMEOUT`: records the stream's identity and settles the clients that
    /// resumed ahead of this replica.
    async fn check(&self, router: &Router) -> Result<(), String> {
        if !self.is_connected() {
            return Err("not connected".to_owned());
        }
        // Read before asking: every connection up to it registered before the answer was made.
        let mark = router.ahead_mark();
        let stream = self.stream_now(Source::Probe).await?;
        let info = stream.cached_info();
        router.settle_ahead(identity::epoch_of(info), info.state.last_sequence, mark);
        Ok(())
    }

    /// The stream now (created if missing, bounded by `HEALTH_TIMEOUT`), its identity recorded:
    /// a change starts a resynchronisation (publishes refused from now on).
    pub(super) async fn stream_now(&self, source: Source) -> Result<jetstream::stream::Stream, String> {
        let stream = match tokio::time::timeout(HEALTH_TIMEOUT, identity::ensure(&self.js, &self.stream_config)).await {
            Ok(r) => r?,
            Err(_) => return Err(format!("no answer within {HEALTH_TIMEOUT:?}")),
        };
        if self.identity.observe(identity::epoch_of(stream.cached_info()), source) {
            self.refresh_up();
        }
        Ok(stream)
    }

    /// The stream's identity now (see `stream_now`).
    pub(super) async fn stream_identity(&self, source: Source) -> Result<u64, String> {
        Ok(identity::epoch_of(self.stream_now(source).await?.cached_info()))
    }

    /// Consumes forever: an ordered consumer from `from`, recreated from the router's last
    /// sequence whenever it fails (broker restart, network), and from the first event of a
    /// recreated stream after a resynchronisation.
    pub(super) async fn consume(self: Arc<Self>, router: Arc<Router>, mut from: u64, progress: watch::Sender<u64>) {
        loop {
            let pause = match self.consume_once(&router, from, &progress).await {
                Ok(Ended::Restart) => {
                    tracing::debug!(from = router.last_seq() + 1, "NATS consumer ended; restarting it");
                    true
                }
                Ok(Ended::Check) => false,
                Err(e) => {
                    tracing::warn!(error = %e, from = router.last_seq() + 1, "NATS consumer failed; restarting it");
                    true
                }
            };
            from = router.last_seq() + 1;
            if pause {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn consume_once(
        &self,
        router: &Router,
        from: u64,
        progress: &watch::Sender<u64>,
    ) -> Result<Ended, ConsumeError> {
        let stream = self.stream_now(Source::Consumer).await.map_err(ConsumeError::Stream)?;
        let info = stream.cached_info();
        let epoch = identity::epoch_of(info);
        // Read with the identity: the resynchronisation is over once the consumer is there.
        let target = info.state.last_sequence;
        let from = if epoch == router.epoch() {
            from
        } else {
            self.resync(router, epoch).await?;
            // The wait at start (for the old stream's position) is over: this one is followed
            // by the resynchronisation state instead.
            progress.send_replace(u64::MAX);
            1
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                // Every subject of the stream: `<subject>`, and `<subject>.to.>` on a stream
                // made for interest delivery by another replica.
                filter_subject: String::new(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        // The client recreates an ordered consumer on its own (after missed heartbeats, or when
        // the server deleted it) under this name with a suffix, possibly on a new stream of the
        // same name: a message from any other name sends us through the identity check.
        let name = consumer.cached_info().name.clone();
        let mut syncing = self.identity.is_syncing();
        if syncing && (consumer.cached_info().num_pending == 0 || router.last_seq() >= target) {
            self.caught_up(router, epoch);
            syncing = false;
        }
        let mut observed = self.identity.watch();
        if *observed.borrow_and_update() != epoch {
            // Seen changed again since this consumer read it.
            return Ok(Ended::Check);
        }
        let mut messages = consumer.messages().await.map_err(nats)?;
        loop {
            let msg = tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => msg.map_err(nats)?,
                    None => return Ok(Ended::Restart),
                },
                () = self.reconnected.notified() => {
                    tracing::info!(from = router.last_seq() + 1, "NATS reconnected: resuming the consumer");
                    return Ok(Ended::Restart);
                }
                changed = observed.changed() => {
                    if changed.is_ok() && *observed.borrow_and_update() != epoch {
                        return Ok(Ended::Check);
                    }
                    continue;
                }
            };
            let info = msg.info().map_err(nats)?;
            if info.consumer != name {
                tracing::info!(
                    consumer = info.consumer,
                    from = router.last_seq() + 1,
                    "the NATS client recreated the consumer: restarting it after checking the stream's identity"
                );
                return Ok(Ended::Check);
            }
            let (seq, pending) = (info.stream_sequence, info.pending);
            match wire::decode(&msg.payload) {
                Ok(d) => {
                    router.publish_sequenced(seq, d.target, &d.event, d.retain);
                }
                Err(e) => {
                    // Still advance: skipping it must not stall every later event.
                    tracing::error!(seq, error = %e, "undecodable message in the stream skipped");
                    router.skip_to(seq);
                }
            }
            self.identity.saw(epoch, seq);
            progress.send_replace(seq);
            if syncing && (pending == 0 || seq >= target) {
                self.caught_up(router, epoch);
                syncing = false;
            }
        }
    }

    /// Switches the router to the recreated stream `epoch`: publishes are refused (if a probe
    /// did not already see it), the retained-values bucket is opened again (created if it is
    /// gone) and read, and the router rebases on the new epoch with those values, telling every
    /// connection. An error leaves the router as it was; the next consumer start tries again.
    pub(super) async fn resync(&self, router: &Router, epoch: u64) -> Result<(), NatsError> {
        self.identity.begin(epoch, Source::Consumer);
        self.refresh_up();
        self.retained.reopen(&self.js, epoch).await?;
        let loaded = self.retained.load().await?;
        let values = loaded.values.len();
        let told = router.rebase(epoch, loaded.values).unwrap_or(0);
        tracing::info!(stream = %self.settings.stream, epoch = format_args!("{epoch:x}"), connections = told,
            retained = values, "rebased on the recreated stream: clients told (ssegate.missed, stream_recreated); \
             consuming it from its first event");
        Ok(())
    }

    /// The router follows stream `epoch` up to where it was when the consumer started: publishes
    /// are taken again.
    pub(super) fn caught_up(&self, router: &Router, epoch: u64) {
        if self.identity.synced(epoch) {
            self.refresh_up();
            tracing::info!(stream = %self.settings.stream, epoch = format_args!("{epoch:x}"), last_seq = router.last_seq(),
                "caught up with the recreated stream: publishing resumes");
        }
    }
}
