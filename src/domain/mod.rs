//! The vocabulary of ssegate, free of any transport: identifiers, events, ids and targets.

mod event;
mod ids;

pub use event::{Event, EventId, MalformedEventId, Retain, Scope, Target};
pub use ids::{
    EventName, GroupId, IdempotencyKey, InvalidText, MAX_EVENT_NAME_BYTES, MAX_ID_BYTES, MAX_IDEMPOTENCY_KEY_BYTES,
    RESERVED_EVENT_PREFIX, Topic, UserId,
};
