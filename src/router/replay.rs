//! The replay log: the most recent events, with their targets, so that a connection that
//! comes back with `Last-Event-ID` gets what it missed. Bounded three ways (events, bytes,
//! age); only `Router` touches it, under its lock.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use super::mailbox::Frame;
use crate::domain::{GroupId, Target, Topic, UserId};

/// Bounds of the replay log. Whichever is reached first evicts the oldest events.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    /// Most events kept; 0 disables replay (every resume that missed something is told so).
    pub capacity: usize,
    /// Most bytes of encoded events kept.
    pub max_bytes: usize,
    /// Events older than this are evicted.
    pub max_age: Duration,
}

/// A published event as the log and the shards share it: its target and its frame.
pub struct Logged {
    /// Its sequence number (the `seq` of its id).
    pub seq: u64,
    pub target: Target,
    pub frame: Frame,
}

struct Entry {
    seq: u64,
    logged: Arc<Logged>,
}

/// What `ReplayLog::insert` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    Added,
    /// The log holds that event already.
    Present,
    /// The log keeps nothing, or evicted past it (a resume from before gets `ssegate.missed`).
    Evicted,
}

/// Why a resume could not be served from the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gap {
    /// Events after the client's id were evicted (too old, or the log was full).
    Expired,
}

pub struct ReplayLog {
    config: ReplayConfig,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The sequence number of the newest event evicted so far (0 if none): a client whose last
    /// id is older than this missed something the log no longer has.
    evicted_through: u64,
}

impl ReplayLog {
    pub fn new(config: ReplayConfig) -> Self {
        Self { config, entries: VecDeque::new(), bytes: 0, evicted_through: 0 }
    }

    /// Appends the event just published as `seq` (sequence numbers arrive in order).
    pub fn push(&mut self, seq: u64, logged: Arc<Logged>) {
        if self.config.capacity == 0 {
            self.evicted_through = seq;
            return;
        }
        self.bytes += logged.frame.bytes.len();
        self.entries.push_back(Entry { seq, logged });
        while self.entries.len() > self.config.capacity || self.bytes > self.config.max_bytes {
            self.evict_oldest();
        }
    }

    /// Puts an older event (`seq` below the newest) in its place, unless the log has it or
    /// already evicted past it: a replica with interest delivery fetches a user's events it did
    /// not follow live (a resume, a lost copy) from the broker and adds them here before the
    /// connections that need them register.
    pub fn insert(&mut self, seq: u64, logged: Arc<Logged>) -> Inserted {
        if self.config.capacity == 0 || seq <= self.evicted_through {
            return Inserted::Evicted;
        }
        let at = self.entries.partition_point(|e| e.seq < seq);
        if self.entries.get(at).is_some_and(|e| e.seq == seq) {
            return Inserted::Present;
        }
        self.bytes += logged.frame.bytes.len();
        self.entries.insert(at, Entry { seq, logged });
        while self.entries.len() > self.config.capacity || self.bytes > self.config.max_bytes {
            self.evict_oldest();
        }
        Inserted::Added
    }

    /// Forgets every event and every eviction: the ids start again (a new epoch).
    pub fn clear(&mut self) {
        *self = Self::new(self.config.clone());
    }

    /// Evicts events older than the maximum age.
    pub fn expire(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.logged.frame.published_at) > self.config.max_age)
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.logged.frame.bytes.len();
            self.evicted_through = e.seq;
        }
    }

    /// The events after `after_seq` (up to the newest) that a connection of `user` in `groups`
    /// and `topics` would have received, oldest first; or `Gap` if some of them are gone.
    /// `groups` and `topics` are sorted.
    pub fn missed<'a>(
        &'a self,
        after_seq: u64,
        user: &'a UserId,
        groups: &'a [GroupId],
        topics: &'a [Topic],
    ) -> Result<impl Iterator<Item = &'a Frame> + 'a, Gap> {
        if after_seq < self.evicted_through {
            return Err(Gap::Expired);
        }
        // Sequence numbers increase (with gaps when a broker assigns them), so a binary search
        // finds the first entry to send.
        let skip = self.entries.partition_point(|e| e.seq <= after_seq);
        Ok(self
            .entries
            .iter()
            .skip(skip)
            .filter(move |e| addresses(&e.logged.target, user, groups, topics))
            .map(|e| &e.logged.frame))
    }

    /// The events published to exactly `target` (one user: those whose list includes them)
    /// with a sequence number below `before`, newest first: at most `limit`, and whether older
    /// ones remain in the log.
    pub fn history(&self, target: &Target, before: u64, limit: usize) -> (Vec<Arc<Logged>>, bool) {
        let end = self.entries.partition_point(|e| e.seq < before);
        let mut page = Vec::new();
        for e in self.entries.range(..end).rev() {
            if is_to(&e.logged.target, target) {
                if page.len() == limit {
                    return (page, true);
                }
                page.push(e.logged.clone());
            }
        }
        (page, false)
    }

    /// Up to `limit` events published to exactly `target` with a sequence number above
    /// `after`, oldest first; and the sequence number to continue after: the last one looked
    /// at (`None` when there was nothing after `after`).
    pub fn after(&self, target: &Target, after: u64, limit: usize) -> (Vec<Arc<Logged>>, Option<u64>) {
        let start = self.entries.partition_point(|e| e.seq <= after);
        let (mut page, mut last) = (Vec::new(), None);
        for e in self.entries.range(start..) {
            if is_to(&e.logged.target, target) {
                if page.len() == limit {
                    break;
                }
                page.push(e.logged.clone());
            }
            last = Some(e.seq);
        }
        (page, last)
    }

    /// The event numbered `seq`, if the log holds it.
    pub fn get(&self, seq: u64) -> Option<&Arc<Logged>> {
        let i = self.entries.partition_point(|e| e.seq < seq);
        self.entries.get(i).filter(|e| e.seq == seq).map(|e| &e.logged)
    }

    /// When the oldest event held was published.
    pub fn oldest_published_at(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.logged.frame.published_at)
    }

    pub fn config(&self) -> &ReplayConfig {
        &self.config
    }

    /// The newest sequence number evicted so far (0 if none).
    pub fn evicted_through(&self) -> u64 {
        self.evicted_through
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The sequence number of the oldest event still held (`None` when empty).
    pub fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|e| e.seq)
    }

    /// Counts every event up to `seq` as evicted (a restart whose data dir no longer holds
    /// them): a client resuming from before it is told it missed some.
    pub fn forget_through(&mut self, seq: u64) {
        self.evicted_through = self.evicted_through.max(seq);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether `target` reaches a connection of `user` that joined `groups` and `topics` (sorted).
/// Whether an event published to `sent` was published to `asked` (one user, a group, a topic or
/// broadcast).
fn is_to(sent: &Target, asked: &Target) -> bool {
    match (sent, asked) {
        (Target::Users(users), Target::Users(one)) => one.iter().all(|u| users.binary_search(u).is_ok()),
        (Target::Group(a), Target::Group(b)) => a == b,
        (Target::Topic(a), Target::Topic(b)) => a == b,
        (Target::Broadcast, Target::Broadcast) => true,
        _ => false,
    }
}

fn addresses(target: &Target, user: &UserId, groups: &[GroupId], topics: &[Topic]) -> bool {
    match target {
        Target::Users(users) => users.binary_search(user).is_ok(),
        Target::Group(g) => groups.binary_search(g).is_ok(),
        Target::Topic(t) => topics.binary_search(t).is_ok(),
        Target::Broadcast => true,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn frame(s: &str, at: Instant) -> Frame {
        Frame { bytes: Bytes::copy_from_slice(s.as_bytes()), published_at: at, is_event: true }
    }

    impl ReplayLog {
        fn add(&mut self, seq: u64, target: Target, frame: Frame) {
            self.push(seq, Arc::new(Logged { seq, target, frame }));
        }
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn log(capacity: usize, max_bytes: usize) -> ReplayLog {
        ReplayLog::new(ReplayConfig { capacity, max_bytes, max_age: Duration::from_secs(60) })
    }

    fn seen(log: &ReplayLog, after: u64, u: &str, groups: &[GroupId], topics: &[Topic]) -> Result<Vec<String>, Gap> {
        let u = user(u);
        let v =
            log.missed(after, &u, groups, topics)?.map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect();
        Ok(v)
    }

    #[test]
    fn replays_only_what_the_subscription_would_have_received_in_order() {
        let now = Instant::now();
        let mut l = log(100, 1 << 20);
        let g = GroupId::parse("g").unwrap();
        let t = Topic::parse("t").unwrap();
        l.add(1, Target::users(vec![user("a"), user("b")]), frame("1", now));
        l.add(2, Target::Group(g.clone()), frame("2", now));
        l.add(3, Target::Topic(t.clone()), frame("3", now));
        l.add(4, Target::Broadcast, frame("4", now));
        l.add(5, Target::users(vec![user("c")]), frame("5", now));
        assert_eq!(seen(&l, 0, "b", &[], &[]).unwrap(), ["1", "4"]);
        assert_eq!(seen(&l, 1, "b", std::slice::from_ref(&g), std::slice::from_ref(&t)).unwrap(), ["2", "3", "4"]);
        assert_eq!(seen(&l, 3, "c", &[], &[]).unwrap(), ["4", "5"]);
        assert!(seen(&l, 5, "c", &[], &[]).unwrap().is_empty());
    }

    #[test]
    fn a_client_older_than_the_window_is_told_so() {
        let now = Instant::now();
        let mut l = log(2, 1 << 20);
        for seq in 1..=4 {
            l.add(seq, Target::Broadcast, frame(&seq.to_string(), now));
        }
        assert_eq!(seen(&l, 1, "a", &[], &[]), Err(Gap::Expired), "event 2 was evicted");
        assert_eq!(seen(&l, 2, "a", &[], &[]).unwrap(), ["3", "4"]);
    }

    #[test]
    fn bytes_and_age_bound_the_log_too() {
        let now = Instant::now();
        let mut l = log(100, 10);
        l.add(1, Target::Broadcast, frame("aaaaaa", now));
        l.add(2, Target::Broadcast, frame("bbbbbb", now));
        assert_eq!((l.len(), l.bytes()), (1, 6));
        let mut l = ReplayLog::new(ReplayConfig { capacity: 100, max_bytes: 100, max_age: Duration::from_secs(1) });
        l.add(1, Target::Broadcast, frame("old", now));
        l.add(2, Target::Broadcast, frame("new", now + Duration::from_secs(2)));
        l.expire(now + Duration::from_secs(2));
        assert_eq!(seen(&l, 0, "a", &[], &[]), Err(Gap::Expired));
        assert_eq!(seen(&l, 1, "a", &[], &[]).unwrap(), ["new"]);
    }

    #[test]
    fn a_disabled_log_serves_only_clients_that_missed_nothing() {
        let mut l = log(0, 0);
        l.add(1, Target::Broadcast, frame("x", Instant::now()));
        assert_eq!(seen(&l, 0, "a", &[], &[]), Err(Gap::Expired));
        assert!(seen(&l, 1, "a", &[], &[]).unwrap().is_empty());
    }
}
