//! Identifiers that enter from outside (users, groups, topics, event names), each validated once
//! where it is parsed so the rest of the code can trust it.

use std::{borrow::Borrow, fmt, sync::Arc};

/// Longest identifier accepted, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 256;
/// Longest event name accepted, in bytes of UTF-8.
pub const MAX_EVENT_NAME_BYTES: usize = 128;
/// Event names with this prefix are sent by the server itself (for example
/// `ssegate.disconnect`); publishers may not use them, so they cannot forge control events.
pub const RESERVED_EVENT_PREFIX: &str = "ssegate.";

/// Why a piece of text was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidText {
    #[error("must not be empty")]
    Empty,
    #[error("must not be blank (only whitespace)")]
    Blank,
    #[error("must not start or end with whitespace")]
    Padded,
    #[error("is {len} bytes, longer than the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("contains the control character U+{0:04X}")]
    Control(u32),
    #[error("starts with the reserved prefix `{RESERVED_EVENT_PREFIX}`")]
    Reserved,
}

/// Checks the rules shared by every identifier: 1..=`max` bytes, no control characters.
/// Control characters are refused because ids end up in logs, metrics labels, headers and
/// (for event names) on the SSE wire, where CR and LF would be field separators.
fn check(s: &str, max: usize) -> Result<(), InvalidText> {
    if s.is_empty() {
        return Err(InvalidText::Empty);
    }
    if s.len() > max {
        return Err(InvalidText::TooLong { len: s.len(), max });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(InvalidText::Control(c as u32));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` (1 to 256 bytes, no control characters).
            pub fn parse(s: &str) -> Result<Self, InvalidText> {
                check(s, MAX_ID_BYTES)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The user a connection belongs to; `Publish` targets every connection of a user.
    UserId
);
id_type!(
    /// A group a connection joined; `PublishGroup` targets every member connection.
    GroupId
);
id_type!(
    /// A named topic a connection subscribed to; `PublishTopic` targets every subscriber.
    Topic
);

/// Longest idempotency key accepted, in bytes of UTF-8.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// A publisher's idempotency key: publishes with the same key within the duplicate window are
/// stored once. 1 to 256 bytes, not only whitespace (a blank key is a client bug, not a key),
/// no control characters. One rule for every backplane, checked here rather than by each: the
/// NATS backplane sends the key as the `Nats-Msg-Id` header, where CR or LF would end the
/// header (the NATS client refuses such a value by panicking), and the memory backplane must
/// accept exactly the keys NATS does, so that moving to a cluster changes no answer.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Validates a key given by a publisher (see the type).
    pub fn parse(s: &str) -> Result<Self, InvalidText> {
        check(s, MAX_IDEMPOTENCY_KEY_BYTES)?;
        if s.chars().all(char::is_whitespace) {
            return Err(InvalidText::Blank);
        }
        // NATS header values lose surrounding whitespace: `" a"` and `"a"` would be one key there
        // and two in memory. Refused, so that a key means the same on every backplane.
        if s.trim() != s {
            return Err(InvalidText::Padded);
        }
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for IdempotencyKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// An SSE event name other than the default `message`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EventName(Arc<str>);

impl EventName {
    /// Validates a name given by a publisher: 1 to 128 bytes, no control characters (so no CR
    /// or LF, which would end the `event:` line), not in the reserved `ssegate.` namespace.
    pub fn parse(s: &str) -> Result<Self, InvalidText> {
        check(s, MAX_EVENT_NAME_BYTES)?;
        if s.starts_with(RESERVED_EVENT_PREFIX) {
            return Err(InvalidText::Reserved);
        }
        Ok(Self(Arc::from(s)))
    }

    /// A name in the reserved namespace, for events the server sends itself.
    pub(crate) fn reserved(suffix: &str) -> Self {
        Self(Arc::from(format!("{RESERVED_EVENT_PREFIX}{suffix}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unicode_spaces_dots_and_wildcards() {
        for s in ["alice", "ünïcødé 用户", "a.b.c", "*", ">", "with space", "x".repeat(256).as_str()] {
            assert!(UserId::parse(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn refuses_empty_long_and_control() {
        assert_eq!(UserId::parse("").unwrap_err(), InvalidText::Empty);
        assert_eq!(Topic::parse(&"x".repeat(257)).unwrap_err(), InvalidText::TooLong { len: 257, max: 256 });
        assert_eq!(GroupId::parse("a\nb").unwrap_err(), InvalidText::Control(0x0a));
        assert_eq!(GroupId::parse("a\rb").unwrap_err(), InvalidText::Control(0x0d));
        assert_eq!(GroupId::parse("a\u{85}b").unwrap_err(), InvalidText::Control(0x85));
    }

    #[test]
    fn idempotency_keys_refuse_blank_control_and_long() {
        for ok in ["k", "order-42 shipped", "ünïcødé", &"k".repeat(256)] {
            assert_eq!(IdempotencyKey::parse(ok).map(|k| k.as_str().to_owned()), Ok(ok.to_owned()));
        }
        assert_eq!(IdempotencyKey::parse("").unwrap_err(), InvalidText::Empty);
        assert_eq!(IdempotencyKey::parse(" ").unwrap_err(), InvalidText::Blank);
        assert_eq!(IdempotencyKey::parse("\u{3000} \u{a0}").unwrap_err(), InvalidText::Blank);
        assert_eq!(IdempotencyKey::parse(" a").unwrap_err(), InvalidText::Padded);
        assert_eq!(IdempotencyKey::parse("a\u{a0}").unwrap_err(), InvalidText::Padded);
        assert_eq!(IdempotencyKey::parse("a\r\nb").unwrap_err(), InvalidText::Control(0x0d));
        assert_eq!(IdempotencyKey::parse("a\nb").unwrap_err(), InvalidText::Control(0x0a));
        assert_eq!(IdempotencyKey::parse("\t").unwrap_err(), InvalidText::Control(0x09));
        assert_eq!(IdempotencyKey::parse("a\0").unwrap_err(), InvalidText::Control(0));
        let long = "é".repeat(129);
        assert_eq!(IdempotencyKey::parse(&long).unwrap_err(), InvalidText::TooLong { len: 258, max: 256 });
    }

    #[test]
    fn event_names_refuse_reserved_prefix_and_newlines() {
        assert!(EventName::parse("chat.message").is_ok());
        assert_eq!(EventName::parse("ssegate.missed").unwrap_err(), InvalidText::Reserved);
        assert_eq!(EventName::parse("x\r\nid: 9").unwrap_err(), InvalidText::Control(0x0d));
        assert!(EventName::parse(&"n".repeat(129)).is_err());
    }
}
