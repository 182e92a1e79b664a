//! One ordered flow out of many core NATS subscriptions: the live copies of the subjects a
//! replica follows (`live.all` and one per followed user), merged back into stream order.
//!
//! async-nats gives each subscription its own channel, so copies of different subjects arrive
//! on different receivers. But one task per NATS connection reads the socket and hands each
//! message to its subscription's channel in the order the server sent it (for one stream
//! leader, sequence order), and a channel wakes its receiver within that hand-over. So the
//! merge keeps a readiness queue: each subscription is polled with its own waker, which pushes
//! its slot on the queue. `poll_batch` drains every woken subscription until the queue is
//! empty and returns what it took: everything with a lower sequence than the highest copy
//! taken was handed over before it, so it is in this batch or an earlier one, and the caller
//! applies the batch sorted by sequence without ever skipping back. Idle subscriptions are
//! never polled, so thousands of them cost nothing per message.
//!
//! Written here because no crate does this: `futures::stream::SelectAll` polls round-robin
//! and yields after a budget with messages still queued, which would break the argument
//! above. The batch is polled under `tokio::task::unconstrained` for the same reason (tokio's
//! cooperative budget would make a ready channel answer "pending").

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Wake, Waker},
};

use async_nats::{Message, Subscriber};
use futures_util::{Stream, task::AtomicWaker};

/// Slots that were woken, and the task waiting for any of them.
#[derive(Default)]
struct Ready {
    queue: Mutex<VecDeque<usize>>,
    parent: AtomicWaker,
}

/// The waker of one slot: queues it and wakes the merging task.
struct SlotWaker {
    slot: usize,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(self.slot);
        self.ready.parent.wake();
    }
}

struct Slot<K> {
    key: K,
    sub: Subscriber,
    waker: Waker,
}

/// The subscriptions being merged, each under a key `K` (what the copies are for).
pub struct Merge<K> {
    slots: Vec<Option<Slot<K>>>,
    free: Vec<usize>,
    ready: Arc<Ready>,
}

/// What a batch holds: each copy with its subscription's key. A subscription whose channel
/// closed (the connection is gone for good) is removed and reported in `closed`.
pub struct Batch<K> {
    pub copies: Vec<(K, Message)>,
    pub closed: Vec<K>,
}

impl<K> Default for Batch<K> {
    fn default() -> Self {
        Self { copies: Vec::new(), closed: Vec::new() }
    }
}

impl<K: Clone> Merge<K> {
    pub fn new() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), ready: Arc::new(Ready::default()) }
    }

    /// Adds a subscription; returns its slot (for `remove`). It is polled in the next batch.
    pub fn add(&mut self, key: K, sub: Subscriber) -> usize {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let waker = Waker::from(Arc::new(SlotWaker { slot, ready: self.ready.clone() }));
        self.slots[slot] = Some(Slot { key, sub, waker: waker.clone() });
        waker.wake();
        slot
    }

    /// Drops a subscription (async-nats unsubscribes it). Copies it still had are discarded.
    pub fn remove(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot).and_then(Option::take) {
            drop(s);
            self.free.push(slot);
        }
    }

    /// Waits for at least one copy, then takes every copy already handed over.
    pub async fn next_batch(&mut self) -> Batch<K> {
        tokio::task::unconstrained(std::future::poll_fn(|cx| self.poll_batch(cx))).await
    }

    /// Takes every copy already handed over, without waiting (possibly none).
    pub fn drain_now(&mut self) -> Batch<K> {
        let take = std::future::poll_fn(|_| {
            let mut batch = Batch::default();
            self.take_ready(&mut batch);
            Poll::Ready(batch)
        });
        futures_util::FutureExt::now_or_never(tokio::task::unconstrained(take)).unwrap_or_default()
    }

    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Batch<K>> {
        self.ready.parent.register(cx.waker());
        let mut batch = Batch::default();
        self.take_ready(&mut batch);
        if batch.copies.is_empty() && batch.closed.is_empty() { Poll::Pending } else { Poll::Ready(batch) }
    }

    fn take_ready(&mut self, batch: &mut Batch<K>) {
        loop {
            let next = self.ready.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            let Some(i) = next else { return };
            let Some(Some(slot)) = self.slots.get_mut(i) else { continue };
            let waker = slot.waker.clone();
            let mut cx = Context::from_waker(&waker);
            loop {
                match Pin::new(&mut slot.sub).poll_next(&mut cx) {
                    Poll::Ready(Some(msg)) => batch.copies.push((slot.key.clone(), msg)),
                    Poll::Ready(None) => {
                        batch.closed.push(slot.key.clone());
                        self.remove(i);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
    }
}
