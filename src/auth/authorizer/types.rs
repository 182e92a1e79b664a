//! What the authorizer speaks in: the request (`AuthorizeQuery`), a valid answer (`Verdict`)
//! and why there is none (`CallError`). Domain types only: the wire forms are `grpc::authorizer`'s.

use crate::{
    domain::{GroupId, Topic, UserId},
    telemetry::metrics::AuthorizerOutcome,
};

/// What is sent to the backend about one request.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeQuery {
    /// (name, value), in the order sent.
    pub cookies: Vec<(String, String)>,
    /// (lower-case name, values) of the configured headers the request carried.
    pub headers: Vec<(String, Vec<String>)>,
    pub user: Option<UserId>,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    /// Not part of the cache key (see `cache::key`).
    pub peer: String,
}

/// A valid answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow(Grant),
    Deny(Denial),
}

/// What an allow answer grants; applied to the request like a JWT's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: UserId,
    pub groups: Vec<GroupId>,
    /// `*` patterns.
    pub topics: Vec<String>,
    /// Unix seconds; `None`: no limit.
    pub expires_at: Option<u64>,
}

/// A deny answer: the status (400-499) and one-line reason the browser gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    pub reason: String,
}

/// Why no valid answer was had: the stream is refused with 503. The text is what the browser
/// is told (no internal detail; that is logged where the call failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the authorizer did not answer in time")]
    Timeout,
    #[error("the authorizer cannot be reached")]
    Unreachable(String),
    #[error("the authorizer failed")]
    Failed(String),
    #[error("the authorizer's answer is invalid")]
    Invalid(String),
    #[error("too many authorizations in flight")]
    Overloaded,
    #[error("the authorizer is failing; calls are paused for a few seconds")]
    BreakerOpen,
}

impl CallError {
    pub(super) fn outcome(&self) -> AuthorizerOutcome {
        match self {
            CallError::Timeout => AuthorizerOutcome::Timeout,
            CallError::Unreachable(_) | CallError::Failed(_) => AuthorizerOutcome::Error,
            CallError::Invalid(_) => AuthorizerOutcome::Invalid,
            CallError::Overloaded => AuthorizerOutcome::Overloaded,
            CallError::BreakerOpen => AuthorizerOutcome::BreakerOpen,
        }
    }

    /// What went wrong, for the log.
    pub(super) fn detail(&self) -> &str {
        match self {
            CallError::Unreachable(d) | CallError::Failed(d) | CallError::Invalid(d) => d,
            _ => "",
        }
    }

    /// Whether it says the backend is unwell (counts toward opening the breaker). Our own
    /// bound on calls in flight says nothing about it.
    pub(super) fn is_backend_failure(&self) -> bool {
        !matches!(self, CallError::Overloaded | CallError::BreakerOpen)
    }
}
