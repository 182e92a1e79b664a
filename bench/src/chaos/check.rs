//! The end-of-run check of one client (a browser tab across all its reconnections) against
//! the ledger of publishes.
//!
//! - Expected: every acknowledged publish that addresses the client's identity, with a stream
//!   sequence above the client's first cursor (the `id:` line its first stream opened with)
//!   and up to the end barrier, except those a `ssegate.missed` excuses: a stream that resumed
//!   from `L` and opened with `ssegate.missed` and then the cursor `C` excuses `(L, C]`.
//! - Lost: expected and never received.
//! - Duplicated: a publish (by its key, whatever id it came under) received more than once;
//!   split into those that followed a `ssegate.missed` since the first copy, and the others.
//! - Out of order: an event whose id is not above the previous event's id (duplicates aside).
//! - Misrouted: received but not addressed to this client; phantom: not in the ledger at all;
//!   id mismatch: received under another id than the one its publisher was told.
//! - Unacknowledged publishes that arrive once are fine (the publisher could not know).

use serde::{Deserialize, Serialize};

use super::layout::{Identity, Layout, Record, Target};

/// One received event: its stream sequence, publish number and latency (first publish attempt
/// to receipt, µs). 12 bytes: the full run keeps ~10 million of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rec {
    pub seq: u32,
    pub n: u32,
    pub latency_us: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    Expired,
    Unknown,
    OtherEpoch,
    Other,
}

impl Miss {
    pub fn from_data(data: &[u8]) -> Miss {
        let has = |r: &[u8]| memchr::memmem::find(data, r).is_some();
        if has(br#""reason":"expired""#) {
            Miss::Expired
        } else if has(br#""reason":"unknown""#) {
            Miss::Unknown
        } else if has(br#""reason":"other_epoch""#) {
            Miss::OtherEpoch
        } else {
            Miss::Other
        }
    }
}

/// One stream of a client: from the request to its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub replica: u8,
    pub opened_ns: u64,
    pub closed_ns: u64,
    /// The `Last-Event-ID` sent (its sequence).
    pub resume: Option<u64>,
    /// The first id-only block (the server's cursor).
    pub cursor: Option<u64>,
    pub missed: Option<Miss>,
    /// Index of this segment's first event in `ClientLog::recs`.
    pub first_rec: usize,
    pub end: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    pub recs: Vec<Rec>,
    pub segs: Vec<Segment>,
    /// Events we could not read as ours (other names or data), and events without an id.
    pub foreign: u64,
    pub no_id: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub clients: u64,
    pub never_connected: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub duplicated_after_missed: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    pub phantom: u64,
    pub id_mismatch: u64,
    pub unacked_delivered: u64,
    pub excused: u64,
    pub missed_expired: u64,
    pub missed_unknown: u64,
    pub missed_other_epoch: u64,
    pub missed_other: u64,
    pub foreign: u64,
    pub no_id: u64,
    pub segments: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += o.$f;)* };
        }
        sum!(
            clients,
            never_connected,
            expected,
            received,
            lost,
            duplicated,
            duplicated_after_missed,
            out_of_order,
            misrouted,
            phantom,
            id_mismatch,
            unacked_delivered,
            excused,
            missed_expired,
            missed_unknown,
            missed_other_epoch,
            missed_other,
            foreign,
            no_id,
            segments
        );
    }

    pub fn missed(&self) -> u64 {
        self.missed_expired + self.missed_unknown + self.missed_other_epoch + self.missed_other
    }
}

/// The acknowledged publishes indexed by what they address, each list in sequence order.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By publish number: the acknowledged sequence (if any) and the target.
    by_n: Vec<Option<(Option<u64>, Target)>>,
    /// By publish number: attempts it took.
    attempts: Vec<u32>,
    users: Vec<Vec<(u64, u64)>>,
    groups: Vec<Vec<(u64, u64)>>,
    topics: Vec<Vec<(u64, u64)>>,
    broadcast: Vec<(u64, u64)>,
}

impl Ledger {
    pub fn build(layout: &Layout, records: Vec<Record>) -> Ledger {
        let mut l = Ledger {
            users: vec![Vec::new(); layout.users as usize],
            groups: vec![Vec::new(); layout.groups as usize],
            topics: vec![Vec::new(); layout.topics as usize],
            ..Ledger::default()
        };
        for r in records {
            let n = r.n as usize;
            if l.by_n.len() <= n {
                l.by_n.resize(n + 1, None);
                l.attempts.resize(n + 1, 0);
            }
            l.attempts[n] = r.attempts;
            if let Some(seq) = r.seq {
                let e = (seq, r.n);
                let slot = |v: &mut Vec<Vec<(u64, u64)>>, i: u32| {
                    if let Some(list) = v.get_mut(i as usize) {
                        list.push(e);
                    }
                };
                match &r.target {
                    Target::Users(us) => us.iter().for_each(|u| slot(&mut l.users, *u)),
                    Target::Group(g) => slot(&mut l.groups, *g),
                    Target::Topic(t) => slot(&mut l.topics, *t),
                    Target::Broadcast => l.broadcast.push(e),
                }
            }
            l.by_n[n] = Some((r.seq, r.target));
        }
        for v in l.users.iter_mut().chain(l.groups.iter_mut()).chain(l.topics.iter_mut()) {
            v.sort_unstable();
        }
        l.broadcast.sort_unstable();
        l
    }

    /// How many attempts publish `n` took (0 if unknown).
    pub fn attempts(&self, n: u32) -> u32 {
        self.attempts.get(n as usize).copied().unwrap_or(0)
    }

    /// Acknowledged publishes addressed to `id`, as `(seq, n)`, in sequence order.
    fn addressed(&self, id: &Identity) -> Vec<(u64, u64)> {
        let empty = Vec::new();
        let get = |v: &[Vec<(u64, u64)>], i: u32| v.get(i as usize).unwrap_or(&empty).clone();
        let mut all = get(&self.users, id.user);
        all.extend(get(&self.groups, id.group));
        all.extend(get(&self.topics, id.topic));
        all.extend_from_slice(&self.broadcast);
        all.sort_unstable();
        all
    }
}

/// Checks one client. Returns its counts and, for the report, up to `max_notes` descriptions
/// of what went wrong.
pub fn check(log: &ClientLog, id: &Identity, ledger: &Ledger, end_seq: u64, max_notes: usize) -> (Counts, Vec<String>) {
    let mut c = Counts {
        clients: 1,
        foreign: log.foreign,
        no_id: log.no_id,
        segments: log.segs.len() as u64,
        ..Counts::default()
    };
    let mut notes = Vec::new();
    let mut note = |s: String| {
        if notes.len() < max_notes {
            notes.push(s);
        }
    };
    for s in &log.segs {
        match s.missed {
            Some(Miss::Expired) => c.missed_expired += 1,
            Some(Miss::Unknown) => c.missed_unknown += 1,
            Some(Miss::OtherEpoch) => c.missed_other_epoch += 1,
            Some(Miss::Other) => c.missed_other += 1,
            None => {}
        }
    }
    let Some(first_cursor) = log.segs.iter().find_map(|s| s.cursor) else {
        c.never_connected = 1;
        c.received = log.recs.len() as u64;
        return (c, notes);
    };
    let excused: Vec<(u64, u64)> = log
        .segs
        .iter()
        .filter(|s| s.missed.is_some())
        .filter_map(|s| Some((s.resume?, s.cursor?)))
        .filter(|(l, c)| c > l)
        .collect();

    // What arrived, by publish number.
    c.received = log.recs.len() as u64;
    let mut seen: std::collections::HashMap<u64, usize> = std::collections::HashMap::with_capacity(log.recs.len());
    let mut prev_seq = 0;
    for (i, r) in log.recs.iter().enumerate() {
        let (n, seq) = (u64::from(r.n), u64::from(r.seq));
        if let Some(&first) = seen.get(&n) {
            c.duplicated += 1;
            let missed_between = log.segs.iter().any(|s| s.missed.is_some() && s.first_rec > first && s.first_rec <= i);
            if missed_between {
                c.duplicated_after_missed += 1;
            }
            note(format!(
                "duplicate n={n} seq={seq} (first copy seq={}){}",
                log.recs[first].seq,
                if missed_between { " after ssegate.missed" } else { "" }
            ));
        } else {
            seen.insert(n, i);
            if seq <= prev_seq && i > 0 {
                c.out_of_order += 1;
                note(format!("out of order: seq={seq} after seq={prev_seq}"));
            }
            prev_seq = seq;
        }
        match ledger.by_n.get(n as usize).and_then(Option::as_ref) {
            None => {
                c.phantom += 1;
                note(format!("phantom n={n} seq={seq}"));
            }
            Some((acked, target)) => {
                if !target.addresses(id) {
                    c.misrouted += 1;
                    note(format!("misrouted n={n} ({target:?}) seq={seq}"));
                }
                match acked {
                    None => c.unacked_delivered += u64::from(seen.get(&n) == Some(&i)),
                    Some(s) if *s != seq => {
                        c.id_mismatch += 1;
                        note(format!("n={n} acknowledged as seq={s}, received as seq={seq}"));
                    }
                    Some(_) => {}
                }
            }
        }
    }

    for (seq, n) in ledger.addressed(id) {
        if seq <= first_cursor || seq > end_seq {
            continue;
        }
        if excused.iter().any(|(l, c)| seq > *l && seq <= *c) {
            c.excused += 1;
            continue;
        }
        c.expected += 1;
        if !seen.contains_key(&n) {
            c.lost += 1;
            let seg = log.segs.iter().rposition(|s| s.opened_ns != 0 && s.cursor.is_some_and(|cur| cur < seq));
            note(format!("lost n={n} seq={seq} (last stream that opened below it: #{seg:?})"));
        }
    }
    (c, notes)
}

/// One line describing a client's streams, for the failure file.
pub fn describe(log: &ClientLog) -> String {
    let mut s = String::new();
    for (i, g) in log.segs.iter().enumerate() {
        use std::fmt::Write;
        let _ = write!(
            s,
            "[#{i} r{} open={} close={} resume={:?} cursor={:?} missed={:?} first_rec={} end={}] ",
            g.replica, g.opened_ns, g.closed_ns, g.resume, g.cursor, g.missed, g.first_rec, g.end
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout { clients: 6, users: 2, groups: 2, topics: 2 };
    const ME: Identity = Identity { user: 0, group: 1, topic: 0 };

    fn rec(n: u64, seq: Option<u64>, target: Target) -> Record {
        Record { n, target, seq, attempts: 1, sent_ns: 0, acked_ns: 0 }
    }

    fn ledger() -> Ledger {
        Ledger::build(
            &L,
            vec![
                rec(1, Some(10), Target::Broadcast),
                rec(2, Some(11), Target::Users(vec![1])),
                rec(3, Some(12), Target::Group(1)),
                rec(4, None, Target::Topic(0)),
                rec(5, Some(14), Target::Users(vec![0, 1])),
                rec(6, Some(15), Target::Topic(1)),
                rec(7, Some(16), Target::Broadcast),
            ],
        )
    }

    fn seg(resume: Option<u64>, cursor: u64, missed: Option<Miss>, first_rec: usize) -> Segment {
        Segment { replica: 0, opened_ns: 1, closed_ns: 2, resume, cursor: Some(cursor), missed, first_rec, end: "eof" }
    }

    fn r(seq: u32, n: u32) -> Rec {
        Rec { seq, n, latency_us: 0 }
    }

    #[test]
    fn a_clean_client_across_a_resume() {
        let log = ClientLog {
            recs: vec![r(10, 1), r(12, 3), r(13, 4), r(14, 5), r(16, 7)],
            segs: vec![seg(None, 9, None, 0), seg(Some(12), 12, None, 2)],
            ..ClientLog::default()
        };
        let (c, notes) = check(&log, &ME, &ledger(), 16, 10);
        assert_eq!((c.expected, c.received, c.lost, c.duplicated, c.unacked_delivered), (4, 5, 0, 0, 1), "{notes:?}");
        assert!(notes.is_empty());
    }

    #[test]
    fn losses_start_after_the_first_cursor_and_end_at_the_barrier() {
        let log = ClientLog { recs: vec![r(14, 5)], segs: vec![seg(None, 10, None, 0)], ..ClientLog::default() };
        let (c, _) = check(&log, &ME, &ledger(), 15, 10);
        assert_eq!((c.expected, c.lost), (2, 1), "12 lost; 10 before the cursor; 16 after the end");
    }

    #[test]
    fn a_missed_signal_excuses_its_gap_only() {
        let log = ClientLog {
            recs: vec![r(10, 1), r(16, 7)],
            segs: vec![seg(None, 9, None, 0), seg(Some(10), 14, Some(Miss::Expired), 1)],
            ..ClientLog::default()
        };
        let (c, _) = check(&log, &ME, &ledger(), 16, 10);
        assert_eq!((c.expected, c.excused, c.lost, c.missed_expired), (2, 2, 0, 1));
    }

    #[test]
    fn duplicates_disorder_and_misrouting() {
        let log = ClientLog {
            recs: vec![r(10, 1), r(12, 3), r(10, 1), r(11, 2), r(17, 7), r(99, 50)],
            segs: vec![seg(None, 9, None, 0), seg(Some(12), 9, Some(Miss::Unknown), 2)],
            ..ClientLog::default()
        };
        let (c, notes) = check(&log, &ME, &ledger(), 16, 10);
        assert_eq!(
            (c.duplicated, c.duplicated_after_missed, c.out_of_order, c.misrouted, c.phantom, c.id_mismatch),
            (1, 1, 1, 1, 1, 1),
            "{notes:?}"
        );
        assert_eq!(c.lost, 1, "14 never came");
    }

    #[test]
    fn never_connected() {
        let log = ClientLog::default();
        let (c, _) = check(&log, &ME, &ledger(), 16, 10);
        assert_eq!((c.never_connected, c.expected), (1, 0));
    }
}
