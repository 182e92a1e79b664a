//! Loss and duplicate accounting for one connection, by the per-stream sequence numbers the
//! publisher embeds in every event.
//!
//! A connection follows up to four streams (its user, group, topic and broadcast); each stream
//! is published in order with sequence numbers 1, 2, 3, … Every server under test promises
//! in-order delivery per connection, so a jump is a loss, a repeat (or a step back) is a
//! duplicate, and whatever was published but never arrived by the end is a loss too.

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events received that were new and in order (or after a gap).
    pub delivered: u64,
    pub lost: u64,
    /// Repeated or out-of-order events.
    pub duplicated: u64,
    /// Events of a stream this connection does not follow, or beyond what was published:
    /// misrouting.
    pub unexpected: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
    }
}

/// One connection's view: for each followed stream, the next sequence number expected.
#[derive(Clone, Debug)]
pub struct SeqCheck {
    /// (stream id, next expected sequence number), at most a handful of entries.
    next: Vec<(u32, u64)>,
    pub counts: Counts,
}

impl SeqCheck {
    pub fn new(streams: &[u32]) -> Self {
        Self { next: streams.iter().map(|&s| (s, 1)).collect(), counts: Counts::default() }
    }

    /// Accounts one received event; returns how far the connection's progress (events
    /// delivered or known lost) advanced, for the drain check.
    pub fn observe(&mut self, stream: u32, seq: u64) -> u64 {
        let Some((_, next)) = self.next.iter_mut().find(|(s, _)| *s == stream) else {
            self.counts.unexpected += 1;
            return 0;
        };
        if seq < *next {
            self.counts.duplicated += 1;
            return 0;
        }
        let advanced = seq + 1 - *next;
        self.counts.lost += seq - *next;
        self.counts.delivered += 1;
        *next = seq + 1;
        advanced
    }

    /// Events published to the streams this connection follows, per `published[stream]`.
    pub fn expected(&self, published: &[u64]) -> u64 {
        self.next.iter().map(|(s, _)| published.get(*s as usize).copied().unwrap_or(0)).sum()
    }

    /// Progress so far (events delivered or skipped over), comparable with `expected`.
    #[cfg(test)]
    pub fn progress(&self) -> u64 {
        self.next.iter().map(|(_, n)| n - 1).sum()
    }

    /// Final counts once publishing is over: what was published but never arrived is lost;
    /// anything numbered beyond what was published is unexpected.
    pub fn finish(&self, published: &[u64]) -> Counts {
        let mut c = self.counts.clone();
        for (s, next) in &self.next {
            let p = published.get(*s as usize).copied().unwrap_or(0);
            let seen = next - 1;
            if p > seen {
                c.lost += p - seen;
            } else {
                c.unexpected += seen - p;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_clean() {
        let mut s = SeqCheck::new(&[7, 9]);
        for seq in 1..=3 {
            assert_eq!(s.observe(7, seq), 1);
        }
        s.observe(9, 1);
        let published = [0, 0, 0, 0, 0, 0, 0, 3, 0, 1];
        assert_eq!(s.expected(&published), 4);
        assert_eq!(s.progress(), 4);
        assert_eq!(s.finish(&published), Counts { delivered: 4, ..Counts::default() });
    }

    #[test]
    fn gaps_duplicates_and_tail_losses() {
        let mut s = SeqCheck::new(&[0]);
        s.observe(0, 1);
        assert_eq!(s.observe(0, 4), 3, "2 and 3 skipped");
        s.observe(0, 4);
        s.observe(0, 2);
        let c = s.finish(&[6]);
        assert_eq!(c, Counts { delivered: 2, lost: 2 + 2, duplicated: 2, unexpected: 0 });
    }

    #[test]
    fn misrouted_and_phantom_events_are_unexpected() {
        let mut s = SeqCheck::new(&[1]);
        s.observe(2, 1);
        s.observe(1, 1);
        s.observe(1, 2);
        let c = s.finish(&[0, 1]);
        assert_eq!(c, Counts { delivered: 2, lost: 0, duplicated: 0, unexpected: 2 });
    }

    #[test]
    fn counts_add_up() {
        let mut a = Counts { delivered: 1, lost: 2, duplicated: 3, unexpected: 4 };
        a.add(&a.clone());
        assert_eq!(a, Counts { delivered: 2, lost: 4, duplicated: 6, unexpected: 8 });
    }
}
