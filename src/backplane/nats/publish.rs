//! Publishing one event: stored in the stream, acknowledged, its retained value written.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{PublishAckFuture, PublishErrorKind},
    message::PublishMessage,
};

use super::{NatsBackplane, identity::Source};
use crate::{
    backplane::{BackplaneError, wire},
    domain::{Event, EventId, IdempotencyKey, Retain, Target},
};

/// A publish handed to the connection (`NatsBackplane::hand_over`): its place in the stream's
/// order is taken; `NatsBackplane::finish` waits for JetStream's acknowledgement.
pub struct HandedOver {
    ack: PublishAckFuture,
    deadline: tokio::time::Instant,
    /// The stream the id will name, and the highest sequence this replica had seen of it, as the
    /// message was handed over (unless the acknowledgement shows another stream).
    epoch: u64,
    seen: u64,
    /// For the retained value's write, after the acknowledgement.
    retained: Option<(Target, Event, Retain)>,
}

impl NatsBackplane {
    /// Stores one event; returns its id: the stream's identity and its sequence number.
    ///
    /// Errors say whether the event may have been stored: `Unavailable` and `Refused` only when
    /// nothing was handed to the connection or JetStream answered that it did not store it;
    /// `NoAck` and `Lost` once it was handed over without an acknowledgement (it may still be
    /// stored, and then delivered: the caller must retry with the same idempotency key).
    pub async fn publish(
        &self,
        target: Target,
        event: Event,
        retain: Retain,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<EventId, BackplaneError> {
        let handed = self.hand_over(target, event, retain, idempotency_key).await?;
        self.finish(handed).await
    }

    /// The first half of `publish`: hands the event to the connection, which fixes its place
    /// in the stream relative to every publish handed over before it (a caller that hands over
    /// in order gets sequences in that order), and returns without waiting for the
    /// acknowledgement, so that many publishes can wait for theirs at once. Fails only with
    /// nothing sent.
    pub async fn hand_over(
        &self,
        target: Target,
        event: Event,
        retain: Retain,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<HandedOver, BackplaneError> {
        if !self.is_connected() {
            return Err(BackplaneError::Unavailable("not connected to NATS".into()));
        }
        if self.identity.is_syncing() {
            return Err(BackplaneError::Unavailable(format!(
                "the JetStream stream `{}` was recreated and this replica is catching up with it",
                self.settings.stream
            )));
        }
        if !self.is_up() {
            return Err(BackplaneError::Unavailable("NATS JetStream is not answering".into()));
        }
        let subject = self.publish_subject(&target, retain);
        let mut msg = PublishMessage::build().payload(wire::encode(&target, &event, retain).into());
        if let Some(key) = idempotency_key {
            msg = msg.message_id(key.as_str());
        }
        let deadline = tokio::time::Instant::now() + self.settings.publish_timeout;
        let (epoch, seen) = self.identity.position();
        // Handing the message to the connection: until this completes nothing was sent (a
        // cancelled channel send sends nothing), so every failure here is a plain refusal.
        let ack = match tokio::time::timeout_at(deadline, self.js.send_publish(subject, msg)).await {
            Err(_) => return Err(BackplaneError::Unavailable("the NATS connection is not taking messages".into())),
            Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                return Err(BackplaneError::Refused(format!("the broker refused the size: {e}")));
            }
            Ok(Err(e)) => return Err(BackplaneError::Unavailable(e.to_string())),
            Ok(Ok(ack)) => ack,
        };
        let retained = (retain != Retain::No).then_some((target, event, retain));
        Ok(HandedOver { ack, deadline, epoch, seen, retained })
    }

    /// The second half of `publish`: waits for the acknowledgement (within the publish timeout,
    /// counted from the hand-over), then writes the retained value.
    pub async fn finish(&self, handed: HandedOver) -> Result<EventId, BackplaneError> {
        let HandedOver { ack, deadline, epoch, seen, retained } = handed;
        let timeout = self.settings.publish_timeout;
        // From here on the event may be stored even if no acknowledgement arrives.
        let ack = match tokio::time::timeout_at(deadline, ack).await {
            Err(_) => return Err(BackplaneError::NoAck { timeout }),
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    // The stream is gone: the probe recreates it now rather than within a second.
                    self.kick.notify_one();
                }
                return Err(classify_ack_error(&e, timeout));
            }
        };
        if ack.duplicate {
            tracing::debug!(seq = ack.sequence, "publish was a duplicate of an earlier one (same idempotency key)");
        }
        let epoch = if !ack.duplicate && ack.sequence <= seen {
            // A new event never gets a sequence its stream had used before it was handed over:
            // this is another stream, one recreated since the identity was last read. Its
            // identity names the event.
            self.stream_identity(Source::Publish).await.map_err(|reason| {
                BackplaneError::Lost(format!(
                    "stored as sequence {} of a recreated stream whose identity could not be read: {reason}",
                    ack.sequence
                ))
            })?
        } else {
            self.identity.saw(epoch, ack.sequence);
            epoch
        };
        // Also after a duplicate: a retry heals a write that failed the first time.
        if let Some((target, event, retain)) = retained {
            self.retained.persist(epoch, ack.sequence, &target, &event, retain).await;
        }
        Ok(EventId { epoch, seq: ack.sequence })
    }
}

/// What an acknowledgement that failed says about the event.
fn classify_ack_error(e: &jetstream::context::PublishError, timeout: Duration) -> BackplaneError {
    match e.kind() {
        // No stream listens on the subject: nothing stored it.
        PublishErrorKind::StreamNotFound => BackplaneError::Unavailable(format!("JetStream: {e}")),
        PublishErrorKind::TimedOut => BackplaneError::NoAck { timeout },
        // JetStream answered with an error: it did not store the event.
        _ if std::error::Error::source(e).is_some_and(|s| s.is::<jetstream::Error>()) => {
            BackplaneError::Refused(format!("JetStream refused the event: {e}"))
        }
        // The connection went away, or the answer was unreadable.
        _ => BackplaneError::Lost(e.to_string()),
    }
}
