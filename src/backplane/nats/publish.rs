//! Publishing one event: stored in the stream, acknowledged, its retained value written.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};

use super::{NatsBackplane, identity::Source};
use crate::{
    backplane::{BackplaneError, wire},
    domain::{Event, EventId, IdempotencyKey, Retain, Target},
};

impl NatsBackplane {
    /// Stores one event; returns its id: the stream's identity and its sequence number.
    ///
    /// Errors say whether the event may have been stored: `Unavailable` and `Refused` only when
    /// nothing was handed to the connection or JetStream answered that it did not store it;
    /// `NoAck` and `Lost` once it was handed over without an acknowledgement (it may still be
    /// stored, and then delivered: the caller must retry with the same idempotency key).
    pub async fn publish(
        &self,
        target: &Target,
        event: &Event,
        retain: Retain,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<EventId, BackplaneError> {
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
        let mut msg = PublishMessage::build().payload(wire::encode(target, event, retain).into());
        if let Some(key) = idempotency_key {
            msg = msg.message_id(key.as_str());
        }
        let timeout = self.settings.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // The stream the id will name, unless the acknowledgement shows it is another one.
        let (epoch, seen) = self.identity.position();
        // Handing the message to the connection: until this completes nothing was sent (a
        // cancelled channel send sends nothing), so every failure here is a plain refusal.
        let ack =
            match tokio::time::timeout_at(deadline, self.js.send_publish(self.settings.subject.clone(), msg)).await {
                Err(_) => return Err(BackplaneError::Unavailable("the NATS connection is not taking messages".into())),
                Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(BackplaneError::Refused(format!("the broker refused the size: {e}")));
                }
                Ok(Err(e)) => return Err(BackplaneError::Unavailable(e.to_string())),
                Ok(Ok(ack)) => ack,
            };
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
            // A new event never gets a sequence its stream has used: this is another stream, one
            // recreated since the identity was last read. Its identity names the event.
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
        if retain != Retain::No {
            self.retained.persist(epoch, ack.sequence, target, event, retain).await;
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
