//! The NATS JetStream backplane.
//!
//! - Publish: the event (target inside the payload) goes to one subject of one stream; the
//!   call returns when JetStream acknowledged storing it, with the stream sequence number as
//!   the event's sequence. `Nats-Msg-Id` carries the idempotency key (JetStream duplicate
//!   detection), and a duplicate's ack carries the first one's sequence.
//! - Consume: each replica reads the whole stream with an ordered consumer (in order, no gaps;
//!   it recreates itself from the last sequence after a disconnect) and feeds its router, which
//!   ignores any sequence it has seen (redeliveries never reach a browser twice).
//! - Replay: served by each replica's local log. At start the consumer begins far enough back
//!   to fill the log with the last `replay_capacity` events, and the server reports ready only
//!   once it has caught up, so a client resuming on a fresh replica finds its events.
//! - Epoch: the stream's creation time, so ids are the same on every replica and change only if
//!   the stream is recreated (clients are then told with `ssegate.missed` / `other_epoch`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::{
    Client, ConnectOptions,
    connection::State,
    jetstream::{
        self, Context,
        consumer::{DeliverPolicy, pull},
        context::PublishErrorKind,
        message::PublishMessage,
        stream::{Config, DiscardPolicy, StorageType},
    },
};
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};

use super::{BackplaneError, cluster::Cluster, wire};
use crate::{
    domain::{Event, Target},
    router::Router,
};

/// The `--nats-*` flags.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    pub urls: Vec<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub stream: String,
    pub subject: String,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    /// Longest wait for JetStream's acknowledgement of a publish.
    pub publish_timeout: Duration,
    /// Longest wait for every replica's answer to a cluster-wide query.
    pub cluster_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("JetStream stream `{stream}`: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "the stream `{stream}` exists with subjects {found:?}, not [{expected:?}]: use another --nats-stream or fix it"
    )]
    Conflict { stream: String, found: Vec<String>, expected: String },
    #[error("timed out catching up with the stream (at {at} of {target})")]
    CatchUp { at: u64, target: u64 },
}

pub struct NatsBackplane {
    client: Client,
    js: Context,
    settings: NatsSettings,
    /// Stream sequence at start, and the epoch derived from the stream.
    pub last_seq_at_start: u64,
    pub epoch: u64,
    /// Signalled on every (re)connection: the consumer is then recreated from the last
    /// sequence seen instead of waiting for its heartbeats to time out.
    reconnected: Arc<Notify>,
    /// Cluster-wide Presence, Stats and Disconnect.
    pub cluster: Arc<Cluster>,
}

impl NatsBackplane {
    /// Connects, and creates the stream or checks that the existing one fits.
    pub async fn connect(settings: NatsSettings) -> Result<Self, NatsError> {
        let urls = settings.urls.join(",");
        let connect_err = |reason: String| NatsError::Connect { urls: urls.clone(), reason };
        let reconnected = Arc::new(Notify::new());
        let notify = reconnected.clone();
        let mut options = ConnectOptions::new().name("ssegate").max_reconnects(None).event_callback(move |event| {
            let notify = notify.clone();
            async move {
                tracing::info!(%event, "NATS connection event");
                if matches!(event, async_nats::Event::Connected) {
                    notify.notify_waiters();
                }
            }
        });
        if let Some(creds) = &settings.creds_file {
            options = options.credentials_file(creds).await.map_err(|e| connect_err(e.to_string()))?;
        }
        if let Some(ca) = &settings.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs = settings
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| connect_err(e.to_string()))?;
        let client = options.connect(addrs).await.map_err(|e| connect_err(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let stream_err = |reason: String| NatsError::Stream { stream: settings.stream.clone(), reason };
        let mut stream = js
            .get_or_create_stream(Config {
                name: settings.stream.clone(),
                subjects: vec![settings.subject.clone()],
                max_age: settings.max_age,
                max_bytes: settings.max_bytes,
                duplicate_window: settings.duplicate_window,
                storage: StorageType::File,
                discard: DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let info = stream.info().await.map_err(|e| stream_err(e.to_string()))?;
        if !info.config.subjects.contains(&settings.subject) {
            return Err(NatsError::Conflict {
                stream: settings.stream.clone(),
                found: info.config.subjects.clone(),
                expected: settings.subject.clone(),
            });
        }
        let created = info.created.unix_timestamp_nanos();
        // Never 0, so that an id can never look like "no epoch".
        let epoch = (created as u64).max(1);
        let last_seq_at_start = info.state.last_sequence;
        tracing::info!(stream = %settings.stream, subject = %settings.subject, last_seq = last_seq_at_start,
            "NATS JetStream backplane connected");
        let cluster = Cluster::new(client.clone(), &settings.subject, settings.cluster_wait);
        Ok(Self { client, js, settings, last_seq_at_start, epoch, reconnected, cluster })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Stores one event; returns its stream sequence number.
    pub async fn publish(&self, target: &Target, event: &Event, idempotency_key: &str) -> Result<u64, BackplaneError> {
        if !self.is_connected() {
            return Err(BackplaneError::Unavailable("not connected to NATS".into()));
        }
        let mut msg = PublishMessage::build().payload(wire::encode(target, event).into());
        if !idempotency_key.is_empty() {
            msg = msg.message_id(idempotency_key);
        }
        let unavailable = |e: String| BackplaneError::Unavailable(e);
        let ack = tokio::time::timeout(self.settings.publish_timeout, async {
            let ack = self.js.send_publish(self.settings.subject.clone(), msg).await.map_err(|e| match e.kind() {
                PublishErrorKind::MaxPayloadExceeded => unavailable(format!("the broker refused the size: {e}")),
                _ => unavailable(e.to_string()),
            })?;
            ack.await.map_err(|e| unavailable(e.to_string()))
        })
        .await
        .map_err(|_| unavailable("no acknowledgement from JetStream in time".into()))??;
        Ok(ack.sequence)
    }

    /// Starts feeding `router` from the stream (in a task that lives until the process ends),
    /// beginning early enough to fill the replay log, and waits until it has caught up with
    /// the stream as it was at connect time.
    pub async fn start_consumer(
        self: &Arc<Self>,
        router: Arc<Router>,
        replay_capacity: u64,
        catch_up: Duration,
    ) -> Result<(), NatsError> {
        self.cluster.start(router.clone()).await.map_err(|e| NatsError::Stream {
            stream: self.settings.stream.clone(),
            reason: format!("cannot subscribe to the control subjects: {e}"),
        })?;
        let target = self.last_seq_at_start;
        let first = target.saturating_sub(replay_capacity) + 1;
        let (progress_tx, mut progress) = watch::channel(0u64);
        let this = self.clone();
        tokio::spawn(async move { this.consume(router, first, progress_tx).await });
        let caught_up = tokio::time::timeout(catch_up, async {
            while *progress.borrow_and_update() < target {
                if progress.changed().await.is_err() {
                    break;
                }
            }
        });
        if caught_up.await.is_err() {
            return Err(NatsError::CatchUp { at: *progress.borrow(), target });
        }
        Ok(())
    }

    /// Consumes forever: an ordered consumer from `from`, recreated from the router's last
    /// sequence whenever it fails (broker restart, network).
    async fn consume(self: Arc<Self>, router: Arc<Router>, mut from: u64, progress: watch::Sender<u64>) {
        loop {
            match self.consume_once(&router, from, &progress).await {
                Ok(()) => tracing::debug!("NATS consumer ended; restarting it"),
                Err(e) => tracing::warn!(error = %e, "NATS consumer failed; restarting it"),
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
                Ok((target, event)) => {
                    router.publish_sequenced(seq, target, &event);
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
