//! `Ticket`: the future an append returns, completed when its batch is durable (or failed).
//!
//! Every append of one batch shares one `Batch` (one allocation per batch, not per append):
//! the committer sets its outcome once and wakes every waiting task and thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use super::{Shared, StoreError};

/// The appends handed to the committer together, and how their write ended.
pub(super) struct Batch {
    state: Mutex<BatchState>,
    /// For `Ticket::wait` (threads without a runtime).
    done: Condvar,
    /// To wake an idle committer when a ticket is first polled or dropped (`Shared::kick`).
    /// Weak: the store's state holds the current batch.
    shared: Weak<Shared>,
}

#[derive(Default)]
struct BatchState {
    outcome: Option<Result<(), StoreError>>,
    /// One slot per ticket that polled (`Ticket::slot`), so polling again replaces its waker.
    wakers: Vec<Waker>,
}

impl Batch {
    pub(super) fn new(shared: Weak<Shared>) -> Arc<Self> {
        Arc::new(Batch { state: Mutex::new(BatchState::default()), done: Condvar::new(), shared })
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the outcome (the first one only) and wakes every waiter.
    pub(super) fn complete(&self, outcome: Result<(), StoreError>) {
        let wakers = {
            let mut state = self.lock();
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        self.done.notify_all();
        for waker in wakers {
            waker.wake();
        }
    }

    fn kick(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.kick();
        }
    }
}

/// Completes `batch` with an error if dropped before it was completed: a committer that
/// unwinds (a bug) fails its tickets instead of leaving them waiting forever.
pub(super) struct Completion(pub(super) Arc<Batch>);

impl Completion {
    pub(super) fn complete(self, outcome: Result<(), StoreError>) {
        self.0.complete(outcome);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.0.lock().outcome.is_some() {
            return;
        }
        let dir = self.0.shared.upgrade().map(|s| s.dir.clone()).unwrap_or_default();
        self.0.complete(Err(StoreError::Failed { dir, cause: "the log's writer thread stopped".into() }));
    }
}

/// Resolves when the record is durable as the store's `SyncPolicy` says, or with the error
/// that kept it from being stored (then it is not on disk). The record reaches the writer
/// when the ticket is first polled (or waited on, or dropped), so `append` itself makes no
/// system call; a ticket must not be kept unpolled.
#[must_use = "a record is written once its ticket is polled or dropped"]
pub struct Ticket {
    batch: Arc<Batch>,
    /// This ticket's place in the batch's wakers, once it has polled.
    slot: Option<usize>,
    kicked: bool,
}

impl Ticket {
    pub(super) fn new(batch: Arc<Batch>) -> Self {
        Ticket { batch, slot: None, kicked: false }
    }

    fn kick_once(&mut self) {
        if !self.kicked {
            self.kicked = true;
            self.batch.kick();
        }
    }

    /// Another ticket on the same write, for a second waiter (a retry of a publish whose write
    /// is under way).
    pub fn follow(&self) -> Ticket {
        Ticket::new(self.batch.clone())
    }

    /// Blocks the thread until the outcome is known (for code without a runtime).
    pub fn wait(mut self) -> Result<(), StoreError> {
        self.kick_once();
        let mut state = self.batch.lock();
        loop {
            if let Some(outcome) = &state.outcome {
                return outcome.clone();
            }
            state = self.batch.done.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Future for Ticket {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.kick_once();
        let mut state = this.batch.lock();
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(outcome.clone());
        }
        match this.slot.and_then(|i| state.wakers.get_mut(i)) {
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                this.slot = Some(state.wakers.len());
                state.wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.kick_once();
    }
}
