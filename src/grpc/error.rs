//! Errors of the gRPC API and their one mapping to `tonic::Status`.

use tonic::{Code, Status};

use crate::{backplane::BackplaneError, domain::InvalidText, router::PublishError, telemetry::metrics::PublishFailure};

/// Why a request was refused. The message is shown to the caller as is: one line, naming the
/// field and the rule, never internal detail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field} {reason}")]
    Invalid { field: String, reason: InvalidText },
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} has {count} entries, over the limit of {max} (--max-ids-per-request)")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("event is {len} bytes (name + data), over the limit of {max} bytes (--max-event-bytes)")]
    EventTooLarge { len: usize, max: usize },
    /// A field over a fixed bound of the API (not a configurable limit).
    #[error("{field} is {value}, over the limit of {max}")]
    OverBound { field: &'static str, value: String, max: usize },
    /// Two fields that cannot go together.
    #[error("{0}")]
    Conflict(&'static str),
    #[error("request message is {len} bytes, over the limit of {max} bytes (--grpc-max-message-bytes)")]
    MessageTooLarge { len: usize, max: usize },
    #[error(transparent)]
    Router(#[from] PublishError),
    #[error("{0}")]
    Unavailable(String),
    /// The publish was sent but not acknowledged in time: it may have been applied.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The publish was sent, then the connection to the broker failed: it may have been applied.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// A field that does not parse (other than an id or a name: `Invalid`).
    #[error("{field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    /// A request that refers to state the server no longer has (an id of an earlier process).
    #[error("{0}")]
    Stale(String),
    /// A `WatchPresence` watcher did not read and its queue filled up.
    #[error("watcher fell behind; reconnect for a fresh snapshot (--presence-watcher-queue is {queue})")]
    WatcherFellBehind { queue: usize },
}

impl From<BackplaneError> for ApiError {
    fn from(e: BackplaneError) -> Self {
        match e {
            BackplaneError::Router(r) => ApiError::Router(r),
            BackplaneError::Unavailable(_) | BackplaneError::Refused(_) => ApiError::Unavailable(e.to_string()),
            BackplaneError::NoAck { .. } => ApiError::DeadlineExceeded(e.to_string()),
            BackplaneError::Lost(_) | BackplaneError::Partial { .. } => ApiError::OutcomeUnknown(e.to_string()),
        }
    }
}

impl ApiError {
    /// The outcome label of a failed publish (`ssegate_events_published_total{outcome}`): the
    /// same three classes the status code tells the caller (not applied because of the
    /// request, not applied for now, outcome unknown).
    pub fn failure(&self) -> PublishFailure {
        match self.code() {
            Code::Unavailable | Code::ResourceExhausted => PublishFailure::Unavailable,
            Code::DeadlineExceeded | Code::Unknown => PublishFailure::Unknown,
            _ => PublishFailure::Invalid,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid { .. }
            | ApiError::Missing(_)
            | ApiError::TooMany { .. }
            | ApiError::EventTooLarge { .. }
            | ApiError::OverBound { .. }
            | ApiError::Malformed { .. }
            | ApiError::Conflict(_) => Code::InvalidArgument,
            ApiError::Router(PublishError::ShuttingDown | PublishError::NotStored(_)) | ApiError::Unavailable(_) => {
                Code::Unavailable
            }
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::OutcomeUnknown(_) => Code::Unknown,
            ApiError::Stale(_) => Code::FailedPrecondition,
            ApiError::Router(PublishError::RetainedFull(_))
            | ApiError::MessageTooLarge { .. }
            | ApiError::WatcherFellBehind { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
