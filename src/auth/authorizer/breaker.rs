//! The authorizer's circuit breaker: after `threshold` consecutive failed calls, new calls are
//! refused at once (503) for a cool-down, then one probe call is let through; its success
//! closes the breaker, its failure opens it for another cool-down. A backend that is down is
//! then not hammered by every reconnecting browser, and browsers are told at once.

use std::time::Duration;

use tokio::time::Instant;

use super::CallError;

pub(super) struct Breaker {
    threshold: u32,
    cool_down: Duration,
    /// Failed calls since the last success.
    failures: u32,
    /// While open: when the next probe may go.
    open_until: Option<Instant>,
    /// A probe call is in flight (half-open): others are still refused.
    probing: bool,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cool_down: Duration) -> Self {
        Self { threshold: threshold.max(1), cool_down, failures: 0, open_until: None, probing: false }
    }

    /// Whether a new call may go now (open: no, except one probe once the cool-down is over).
    pub(super) fn admit(&mut self, now: Instant) -> Result<(), CallError> {
        match self.open_until {
            None => Ok(()),
            Some(until) if now < until || self.probing => Err(CallError::BreakerOpen),
            Some(_) => {
                self.probing = true;
                Ok(())
            }
        }
    }

    pub(super) fn succeeded(&mut self) {
        (self.failures, self.open_until, self.probing) = (0, None, false);
    }

    /// A failed call; true if this opened the breaker (it was closed).
    pub(super) fn failed(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let was_open = self.open_until.is_some();
        if was_open || self.failures >= self.threshold {
            self.open_until = Some(now + self.cool_down);
        }
        self.probing = false;
        !was_open && self.open_until.is_some()
    }

    /// A call that says nothing about the backend (our own bound refused it): a probe may go
    /// again.
    pub(super) fn neutral(&mut self) {
        self.probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_lets_one_probe_through() {
        let now = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(5));
        assert!(!b.failed(now));
        b.succeeded();
        assert!(!b.failed(now) && !b.failed(now));
        assert!(b.admit(now).is_ok(), "two failures in a row: still closed");
        assert!(b.failed(now), "the third opens it");
        assert_eq!(b.admit(now + Duration::from_secs(4)), Err(CallError::BreakerOpen));
        let later = now + Duration::from_secs(5);
        assert!(b.admit(later).is_ok(), "one probe after the cool-down");
        assert_eq!(b.admit(later), Err(CallError::BreakerOpen), "only one");
        assert!(!b.failed(later), "a failed probe re-opens (already open)");
        assert_eq!(b.admit(later + Duration::from_secs(1)), Err(CallError::BreakerOpen));
        let probe = later + Duration::from_secs(5);
        assert!(b.admit(probe).is_ok());
        b.succeeded();
        assert!(b.admit(probe).is_ok() && b.admit(probe).is_ok(), "closed again");
    }
}
