//! The backplane's long-running tasks: the broker probe and the stream consumer.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{HEALTH_EVERY, HEALTH_TIMEOUT, NatsBackplane};
use crate::{backplane::wire, router::Router};

impl NatsBackplane {
    /// Probes the broker until `stop`: see `HEALTH_EVERY`.
    pub(super) async fn probe(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = async {
                    tick.tick().await;
                    self.check().await
                } => r,
            };
            match result {
                Ok(()) => {
                    if self.up.send_if_modified(|up| !std::mem::replace(up, true)) {
                        tracing::info!(after = ?started.elapsed(), "NATS JetStream answers again: publishing resumes");
                    }
                }
                Err(reason) => {
                    if self.up.send_replace(false) {
                        tracing::warn!(%reason, "NATS JetStream is not answering: publishes are refused until it does");
                    }
                }
            }
        }
    }

    /// One round trip to JetStream (the stream's info), bounded by `HEALTH_TIMEOUT`.
    async fn check(&self) -> Result<(), String> {
        if !self.is_connected() {
            return Err("not connected".to_owned());
        }
        match tokio::time::timeout(HEALTH_TIMEOUT, self.js.get_stream(&self.settings.stream)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {HEALTH_TIMEOUT:?}")),
        }
    }

    /// Consumes forever: an ordered consumer from `from`, recreated from the router's last
    /// sequence whenever it fails (broker restart, network).
    pub(super) async fn consume(self: Arc<Self>, router: Arc<Router>, mut from: u64, progress: watch::Sender<u64>) {
        loop {
            match self.consume_once(&router, from, &progress).await {
                Ok(()) => tracing::debug!(from = router.last_seq() + 1, "NATS consumer ended; restarting it"),
                Err(e) => {
                    tracing::warn!(error = %e, from = router.last_seq() + 1, "NATS consumer failed; restarting it")
                }
            }
            from = router.last_seq() + 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn consume_once(
        &self,
        router: &Router,
        from: u64,
        progress: &watch::Sender<u64>,
    ) -> Result<(), async_nats::Error> {
        let stream = self.js.get_stream(&self.settings.stream).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.settings.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let msg = tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => msg?,
                    None => return Ok(()),
                },
                () = self.reconnected.notified() => {
                    tracing::info!(from = router.last_seq() + 1, "NATS reconnected: resuming the consumer");
                    return Ok(());
                }
            };
            let seq = msg.info()?.stream_sequence;
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
            progress.send_replace(seq);
        }
    }
}
