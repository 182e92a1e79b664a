//! The order in which a replica under interest delivery applies what it receives: live copies
//! of several subjects and events read from the stream, by stream sequence, each subject
//! without a gap.
//!
//! Kept apart from `follow::Task` (which owns the subscriptions, the reads and the router) so
//! that the rule is one small piece with its own tests: the chaos run found that copies of one
//! subject can reach a replica out of order after a broker stall, and a wrong rule here loses
//! or reorders events without any error.
//!
//! The rule: entries are held in sequence order and taken from the front. Each live copy names
//! the previous sequence on its subject (`Nats-Last-Sequence`). A predecessor that is neither
//! held nor within what the replica has of that subject is *missing*, and nothing after the
//! missing sequence is taken: not the copy that named it, and not the entries of other subjects
//! between the two, since applying a later event first would move the router past the missing
//! one (which could then only be announced as `late`). The caller waits for it until
//! `Blocked::until`, then reads the subject from the stream.
//!
//! Copies of *different* subjects carry nothing that shows one missing, and right after the
//! broker comes back from a stall or a restart it was seen to send them out of order (chaos
//! runs: an event's copy 10 ms behind later ones of other subjects). So the caller may also
//! give a `cutoff`: entries that arrived after it stay held, so that a late copy that arrives
//! meanwhile still takes its place (`follow::Task` holds each entry `SETTLE_HOLD` while the
//! broker is down and for `SETTLE_FOR` after it answers again).

use std::collections::BTreeMap;

use tokio::time::Instant;

/// One event in its place: `seq` in the stream, the subject it is for (`key`), and for a live
/// copy the sequence of the previous event on that subject (`None`: not checked, e.g. read
/// from the stream in order).
#[derive(Debug)]
pub struct Entry<K, T> {
    pub seq: u64,
    pub key: K,
    pub previous: Option<u64>,
    pub value: T,
}

/// The front entry waits for `missing`, the previous event on `key`'s subject; the replica has
/// that subject up to `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked<K> {
    pub key: K,
    pub after: u64,
    pub missing: u64,
    /// Until when the missing event is waited for as a live copy.
    pub until: Instant,
}

/// Entries held in sequence order, and what the front waits for.
#[derive(Debug)]
pub struct Reorder<K, T> {
    /// Each entry with when it was held.
    held: BTreeMap<u64, (Instant, Entry<K, T>)>,
    /// Predecessors named by held copies and not held themselves, with their subjects.
    expected: BTreeMap<u64, K>,
    blocked: Option<Blocked<K>>,
}

impl<K: Clone + PartialEq, T> Reorder<K, T> {
    pub fn new() -> Self {
        Self { held: BTreeMap::new(), expected: BTreeMap::new(), blocked: None }
    }

    /// Holds an entry (arrived `now`); a second one with the same sequence (a copy and a read
    /// of one event) is dropped.
    pub fn hold(&mut self, entry: Entry<K, T>, now: Instant) {
        if self.held.contains_key(&entry.seq) {
            return;
        }
        self.expected.remove(&entry.seq);
        if let Some(p) = entry.previous
            && !self.held.contains_key(&p)
        {
            self.expected.insert(p, entry.key.clone());
        }
        self.held.insert(entry.seq, (now, entry));
    }

    /// The next entry to apply, or `None`: nothing is held (and nothing is waited for any
    /// more), or the front waits for a missing predecessor (`blocked`). `last_of` gives the last
    /// sequence the replica has of a subject, or `None` if that subject's predecessors are not
    /// checked (not followed, or a read of it is in flight that covers them). A new wait ends
    /// at `deadline`; a wait for the same event keeps its end. With a `cutoff`, an entry held
    /// after it is not taken yet (`None`, not a wait).
    pub fn pop(
        &mut self,
        last_of: impl Fn(&K) -> Option<u64>,
        deadline: Instant,
        cutoff: Option<Instant>,
    ) -> Option<Entry<K, T>> {
        let Some(front) = self.held.first_entry() else {
            self.expected.clear();
            self.blocked = None;
            return None;
        };
        let seq = *front.key();
        // The lowest missing predecessor before the front stops it.
        while let Some(entry) = self.expected.first_entry()
            && *entry.key() < seq
        {
            let (p, key) = (*entry.key(), entry.get());
            match last_of(key) {
                Some(last) if p > last => {
                    if self.blocked.as_ref().is_none_or(|b| b.key != *key || b.missing != p) {
                        self.blocked = Some(Blocked { key: key.clone(), after: last, missing: p, until: deadline });
                    }
                    return None;
                }
                // Applied, read, or not checked (a read of the subject in flight covers it).
                _ => _ = entry.remove(),
            }
        }
        if cutoff.is_some_and(|c| front.get().0 > c) {
            return None;
        }
        Some(front.remove().1)
    }

    /// When the front entry was held (a `cutoff` releases it once past this).
    pub fn front_held_at(&self) -> Option<Instant> {
        self.held.first_key_value().map(|(_, (at, _))| *at)
    }

    /// What the front waits for, if anything.
    pub fn blocked(&self) -> Option<&Blocked<K>> {
        self.blocked.as_ref()
    }

    /// Ends the wait (the caller reads the subject from the stream, or starts over).
    pub fn take_blocked(&mut self) -> Option<Blocked<K>> {
        self.blocked.take()
    }

    /// The lowest sequence held.
    pub fn first(&self) -> Option<u64> {
        self.held.first_key_value().map(|(s, _)| *s)
    }

    /// Drops everything held (a recreated stream: the held sequences name the old one).
    pub fn clear(&mut self) {
        self.held.clear();
        self.expected.clear();
        self.blocked = None;
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;

    /// A replica's view: the last sequence it has per subject, updated as entries are applied.
    struct Replica {
        reorder: Reorder<&'static str, ()>,
        last: HashMap<&'static str, u64>,
        /// Subjects whose predecessors are not checked (a read in flight).
        unchecked: Vec<&'static str>,
        applied: Vec<u64>,
    }

    impl Replica {
        fn new(last: &[(&'static str, u64)]) -> Self {
            Self {
                reorder: Reorder::new(),
                last: last.iter().copied().collect(),
                unchecked: Vec::new(),
                applied: Vec::new(),
            }
        }

        fn copy(&mut self, seq: u64, key: &'static str, previous: u64) {
            self.reorder.hold(Entry { seq, key, previous: Some(previous), value: () }, Instant::now());
        }

        fn read(&mut self, seq: u64, key: &'static str) {
            self.reorder.hold(Entry { seq, key, previous: None, value: () }, Instant::now());
        }

        /// Applies what can be applied, as `follow::Task::apply_held` does.
        fn apply(&mut self, deadline: Instant) {
            loop {
                let (last, unchecked) = (&self.last, &self.unchecked);
                let of = |k: &&'static str| (!unchecked.contains(k)).then(|| last.get(k).copied().unwrap_or(0));
                let Some(e) = self.reorder.pop(of, deadline, None) else { break };
                let l = self.last.entry(e.key).or_insert(0);
                *l = (*l).max(e.seq);
                self.applied.push(e.seq);
            }
        }
    }

    #[test]
    fn copies_in_order_are_applied_in_sequence_order_across_subjects() {
        let now = Instant::now();
        let mut r = Replica::new(&[]);
        // Arrival order differs from sequence order across subjects (different channels).
        r.copy(2, "b", 0);
        r.copy(1, "a", 0);
        r.copy(3, "a", 1);
        r.apply(now);
        assert_eq!(r.applied, [1, 2, 3]);
        assert!(r.reorder.blocked().is_none());
        assert_eq!(r.reorder.first(), None);
    }

    #[test]
    fn a_copy_ahead_of_its_predecessor_waits_for_it_and_holds_everything_behind() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        // 5 arrives before 4 on subject a (seen after a broker stall); 6 on b is behind it.
        r.copy(5, "a", 4);
        r.copy(6, "b", 0);
        r.apply(now);
        assert_eq!(r.applied, Vec::<u64>::new(), "nothing may pass the missing event");
        let b = r.reorder.blocked().cloned().expect("waiting");
        assert_eq!((b.key, b.after, b.missing, b.until), ("a", 3, 4, now));
        r.copy(4, "a", 3);
        r.apply(now);
        assert_eq!(r.applied, [4, 5, 6]);
        assert!(r.reorder.blocked().is_none(), "the wait ends once everything is applied");
    }

    #[test]
    fn nothing_after_a_missing_predecessor_is_applied_on_any_subject() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        // Copy 7 of a names 5 as its predecessor; 4 and 6 (subject b) are held too. 4 may go;
        // 6 may not: applying it would move the router past 5, which could then only be
        // announced as late.
        r.copy(4, "b", 0);
        r.copy(6, "b", 4);
        r.copy(7, "a", 5);
        r.apply(now);
        assert_eq!(r.applied, [4]);
        let b = r.reorder.blocked().cloned().expect("waiting");
        assert_eq!((b.key, b.after, b.missing), ("a", 3, 5));
        r.copy(5, "a", 3);
        r.apply(now);
        assert_eq!(r.applied, [4, 5, 6, 7]);
    }

    #[test]
    fn entries_before_the_blocked_one_are_applied_first() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 1)]);
        r.copy(3, "b", 0);
        r.copy(5, "a", 4);
        r.copy(7, "b", 3);
        r.apply(now);
        assert_eq!(r.applied, [3]);
        assert_eq!(r.reorder.first(), Some(5));
    }

    #[test]
    fn the_wait_keeps_its_end_while_the_same_event_is_missing() {
        let start = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        r.copy(5, "a", 4);
        r.apply(start);
        r.copy(6, "a", 5);
        r.apply(start + Duration::from_millis(50));
        assert_eq!(r.reorder.blocked().map(|b| b.until), Some(start), "a new copy does not restart the wait");
    }

    #[test]
    fn after_the_wait_the_subject_read_from_the_stream_fills_the_gap() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        r.copy(5, "a", 4);
        r.copy(6, "b", 0);
        r.apply(now);
        // What follow::Task::read_gap does: end the wait, take the subject as complete up to
        // the missing event, and hold what the stream returned after the last one it had.
        let b = r.reorder.take_blocked().expect("waiting");
        r.last.insert(b.key, b.missing);
        r.read(4, "a");
        r.read(5, "a");
        r.apply(now);
        assert_eq!(r.applied, [4, 5, 6], "the read and the held copy of 5 are one event");
    }

    #[test]
    fn a_missing_event_gone_from_the_stream_is_skipped_after_the_wait() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        r.copy(5, "a", 4);
        r.apply(now);
        let b = r.reorder.take_blocked().expect("waiting");
        r.last.insert(b.key, b.missing);
        r.apply(now);
        assert_eq!(r.applied, [5]);
    }

    #[test]
    fn subjects_being_read_are_not_checked() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 0)]);
        r.unchecked.push("a");
        r.copy(9, "a", 8);
        r.apply(now);
        assert_eq!(r.applied, [9], "the read in flight covers 8");
        assert!(r.reorder.blocked().is_none());
    }

    #[test]
    fn a_duplicate_sequence_is_held_once() {
        let now = Instant::now();
        let mut r = Replica::new(&[]);
        r.copy(1, "a", 0);
        r.read(1, "a");
        r.apply(now);
        assert_eq!(r.applied, [1]);
    }

    #[test]
    fn with_a_cutoff_what_arrived_after_it_waits_and_a_late_copy_of_another_subject_takes_its_place() {
        let start = Instant::now();
        let later = start + Duration::from_millis(10);
        let mut r: Reorder<&str, ()> = Reorder::new();
        let none = |_: &&str| None;
        r.hold(Entry { seq: 654, key: "b", previous: None, value: () }, start);
        // Not yet past the hold: nothing taken, and nothing waited for either.
        assert!(r.pop(none, start, Some(start - Duration::from_millis(1))).is_none());
        assert!(r.blocked().is_none());
        assert_eq!(r.front_held_at(), Some(start));
        // 653, of another subject, arrives 10 ms later: it goes first once released.
        r.hold(Entry { seq: 653, key: "a", previous: None, value: () }, later);
        assert_eq!(r.pop(none, later, Some(later)).map(|e| e.seq), Some(653));
        assert_eq!(r.pop(none, later, Some(later)).map(|e| e.seq), Some(654));
    }

    #[test]
    fn clear_drops_what_is_held_and_the_wait() {
        let now = Instant::now();
        let mut r = Replica::new(&[("a", 3)]);
        r.copy(5, "a", 4);
        r.apply(now);
        r.reorder.clear();
        assert!(r.reorder.blocked().is_none());
        assert_eq!(r.reorder.first(), None);
    }
}
