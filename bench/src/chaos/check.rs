//! The end-of-run check of one client (a browser tab across all its reconnections) against
//! the ledger of publishes. Ids are compared as `Pos` (the broker stream's epoch, then the
//! sequence), so the ids of a stream recreated after the broker lost its store sort after the
//! lost stream's.
//!
//! - Expected: every acknowledged publish that addresses the client's identity, with an id
//!   above the client's first cursor (the `ssegate.position` its first stream opened with) and
//!   up to the end barrier, except those a `ssegate.missed` excuses: one that arrived when the
//!   client's last event id was `L` (for a stream that opened with it, the `Last-Event-ID` it
//!   sent) and was followed by the id `C` (the cursor, or the next event's) excuses `(L, C]`:
//!   an event missing from a client is excused only by a signal the client received after
//!   the last event it had before the gap. Any reason counts.
//! - Lost: expected and never received.
//! - Duplicated: a publish (by its key, whatever id it came under) received more than once;
//!   split into those that followed a `ssegate.missed` since the first copy, and the others.
//!   Not counted as duplicated: two copies from two epochs of a publish that was retried
//!   (its first attempt was stored in a stream the broker then lost, with the stream's
//!   duplicate window; the retry was stored again in the new one): `duplicated_across_epochs`.
//! - Out of order: an event whose id is not above the previous event's id (duplicates aside).
//! - Misrouted: received but not addressed to this client; phantom: not in the ledger at all;
//!   id mismatch: received under another id than the one its publisher was told (except a
//!   copy, from an earlier epoch, of a retried publish acknowledged in a later one:
//!   `lost_stream_copies`).
//! - Unacknowledged publishes that arrive once are fine (the publisher could not know).

use serde::{Deserialize, Serialize};

use super::layout::{Identity, Layout, Pos, Record, Target};

/// One received event: its stream sequence, publish number and latency (first publish attempt
/// to receipt, µs). 12 bytes: the full run keeps ~10 million of them; the epoch of each is
/// kept per run of events (`ClientLog::epochs`), as it changes at most once or twice a run.
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
    StreamRecreated,
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
        } else if has(br#""reason":"stream_recreated""#) {
            Miss::StreamRecreated
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
    /// The `Last-Event-ID` sent.
    pub resume: Option<Pos>,
    /// The id of the stream's first `ssegate.position` (the server's cursor).
    pub cursor: Option<Pos>,
    /// Index of this segment's first event in `ClientLog::recs`.
    pub first_rec: usize,
    pub end: &'static str,
}

/// One `ssegate.missed` a client received, at a stream's start or in the middle of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missed {
    pub reason: Miss,
    /// The client's last event id when it arrived (at a stream's start: the `Last-Event-ID`
    /// that stream sent); `None` before the client had any.
    pub from: Option<Pos>,
    /// The first id that came after it (the cursor, or an event's id); `None` if none did.
    pub to: Option<Pos>,
    /// `to` is an event's (received, so not excused), not a cursor's.
    pub to_event: bool,
    /// `recs.len()` when it arrived: the events before it are `recs[..at_rec]`.
    pub at_rec: usize,
    /// The segment it arrived on.
    pub seg: usize,
    pub ns: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    pub recs: Vec<Rec>,
    /// `(index of the first event of that epoch in recs, epoch)`, in order: the epoch of
    /// `recs[i]` is that of the last entry at or before `i`.
    pub epochs: Vec<(usize, u64)>,
    pub segs: Vec<Segment>,
    pub misses: Vec<Missed>,
    /// Events we could not read as ours (other names or data), and events without an id.
    pub foreign: u64,
    pub no_id: u64,
}

impl ClientLog {
    /// Logs a received event; `false` (nothing logged) if it does not fit a `Rec`.
    pub fn push(&mut self, id: Pos, n: u64, latency_us: u32) -> bool {
        let (Ok(seq), Ok(n)) = (u32::try_from(id.seq), u32::try_from(n)) else { return false };
        if self.epochs.last().is_none_or(|&(_, e)| e != id.epoch) {
            self.epochs.push((self.recs.len(), id.epoch));
        }
        self.recs.push(Rec { seq, n, latency_us });
        true
    }

    /// The id of every received event, in order.
    pub fn ids(&self) -> impl Iterator<Item = Pos> + '_ {
        let mut run = 0;
        self.recs.iter().enumerate().map(move |(i, r)| {
            while self.epochs.get(run + 1).is_some_and(|&(first, _)| first <= i) {
                run += 1;
            }
            Pos { epoch: self.epochs.get(run).map_or(0, |&(_, e)| e), seq: u64::from(r.seq) }
        })
    }

    /// Notes a `ssegate.missed` (its `to` is filled by `saw_id`).
    pub fn missed(&mut self, reason: Miss, from: Option<Pos>, ns: u64) {
        let seg = self.segs.len().saturating_sub(1);
        self.misses.push(Missed { reason, from, to: None, to_event: false, at_rec: self.recs.len(), seg, ns });
    }

    /// An id arrived (a cursor's, or an event's): it ends the gap of a `ssegate.missed` still
    /// open.
    pub fn saw_id(&mut self, id: Pos, event: bool) {
        if let Some(m) = self.misses.last_mut().filter(|m| m.to.is_none()) {
            m.to = Some(id);
            m.to_event = event;
        }
    }

    /// Whether a `ssegate.missed` excuses the event `pos`: it lies after the client's last id
    /// when the signal came, and up to the id that followed (a cursor's, included; an event's,
    /// which arrived, excluded).
    fn excused(&self, pos: Pos) -> bool {
        self.misses.iter().any(|m| match (m.from, m.to) {
            (Some(from), Some(to)) => pos > from && (pos < to || (pos == to && !m.to_event)),
            _ => false,
        })
    }
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
    #[serde(default)]
    pub duplicated_across_epochs: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    pub phantom: u64,
    pub id_mismatch: u64,
    #[serde(default)]
    pub lost_stream_copies: u64,
    pub unacked_delivered: u64,
    pub excused: u64,
    pub missed_expired: u64,
    pub missed_unknown: u64,
    pub missed_other_epoch: u64,
    #[serde(default)]
    pub missed_stream_recreated: u64,
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
            duplicated_across_epochs,
            out_of_order,
            misrouted,
            phantom,
            id_mismatch,
            lost_stream_copies,
            unacked_delivered,
            excused,
            missed_expired,
            missed_unknown,
            missed_other_epoch,
            missed_stream_recreated,
            missed_other,
            foreign,
            no_id,
            segments
        );
    }

    pub fn missed(&self) -> u64 {
        self.missed_expired
            + self.missed_unknown
            + self.missed_other_epoch
            + self.missed_stream_recreated
            + self.missed_other
    }
}

/// The acknowledged publishes indexed by what they address, each list in id order. With
/// partitioned streams a publish stored in several partitions is listed under each of its
/// ids; a client sees the one of its own partition, told apart by its epoch.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By publish number: the acknowledged ids (none if unacknowledged; several if stored in
    /// several partitions) and the target.
    by_n: Vec<Option<(Vec<Pos>, Target)>>,
    /// By publish number: attempts it took.
    attempts: Vec<u32>,
    users: Vec<Vec<(Pos, u64)>>,
    groups: Vec<Vec<(Pos, u64)>>,
    topics: Vec<Vec<(Pos, u64)>>,
    broadcast: Vec<(Pos, u64)>,
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
            for id in r.ids() {
                let e = (id, r.n);
                let slot = |v: &mut Vec<Vec<(Pos, u64)>>, i: u32| {
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
            l.by_n[n] = Some((r.ids().collect(), r.target));
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

    /// Whether publish `n` was stored in several partitions.
    fn partitioned(&self, n: u64) -> bool {
        self.by_n.get(n as usize).and_then(Option::as_ref).is_some_and(|(ids, _)| ids.len() > 1)
    }

    /// Acknowledged publishes addressed to `id`, as `(id, n)`, in id order (a publish stored in
    /// several partitions once per partition).
    fn addressed(&self, id: &Identity) -> Vec<(Pos, u64)> {
        let empty = Vec::new();
        let get = |v: &[Vec<(Pos, u64)>], i: u32| v.get(i as usize).unwrap_or(&empty).clone();
        let mut all = get(&self.users, id.user);
        all.extend(get(&self.groups, id.group));
        all.extend(get(&self.topics, id.topic));
        all.extend_from_slice(&self.broadcast);
        all.sort_unstable();
        all
    }
}

/// Whether a client whose last id is `last` reached the end barrier: `ends` has the highest
/// acknowledged id of each partition's newest stream (one entry without partitions).
pub fn reached(last: Pos, ends: &[Pos]) -> bool {
    match ends {
        [end] => last >= *end,
        _ => ends.iter().any(|e| e.epoch == last.epoch && last >= *e),
    }
}

/// Checks one client. Returns its counts and, for the report, up to `max_notes` descriptions
/// of what went wrong. `ends`: as for `reached`; an id above the end of its epoch is after
/// the barrier.
pub fn check(log: &ClientLog, id: &Identity, ledger: &Ledger, ends: &[Pos], max_notes: usize) -> (Counts, Vec<String>) {
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
    for m in &log.misses {
        match m.reason {
            Miss::Expired => c.missed_expired += 1,
            Miss::Unknown => c.missed_unknown += 1,
            Miss::OtherEpoch => c.missed_other_epoch += 1,
            Miss::StreamRecreated => c.missed_stream_recreated += 1,
            Miss::Other => c.missed_other += 1,
        }
    }
    let Some(first_cursor) = log.segs.iter().find_map(|s| s.cursor) else {
        c.never_connected = 1;
        c.received = log.recs.len() as u64;
        return (c, notes);
    };

    // What arrived, by publish number.
    c.received = log.recs.len() as u64;
    let mut seen: std::collections::HashMap<u64, (usize, Pos)> =
        std::collections::HashMap::with_capacity(log.recs.len());
    let mut prev = None;
    for (i, (r, pos)) in log.recs.iter().zip(log.ids()).enumerate() {
        let n = u64::from(r.n);
        let retried = ledger.attempts(r.n) > 1;
        if let Some(&(first, first_pos)) = seen.get(&n) {
            if first_pos.epoch != pos.epoch && retried {
                c.duplicated_across_epochs += 1;
            } else {
                c.duplicated += 1;
                let missed_between = log.misses.iter().any(|m| m.at_rec > first && m.at_rec <= i);
                if missed_between {
                    c.duplicated_after_missed += 1;
                }
                note(format!(
                    "duplicate n={n} id={pos} (first copy id={first_pos}){}",
                    if missed_between { " after ssegate.missed" } else { "" }
                ));
            }
        } else {
            seen.insert(n, (i, pos));
            if prev.is_some_and(|p| pos <= p) {
                c.out_of_order += 1;
                note(format!("out of order: id={pos} after id={}", prev.unwrap_or_default()));
            }
            prev = Some(pos);
        }
        match ledger.by_n.get(n as usize).and_then(Option::as_ref) {
            None => {
                c.phantom += 1;
                note(format!("phantom n={n} id={pos}"));
            }
            Some((acked, target)) => {
                if !target.addresses(id) {
                    c.misrouted += 1;
                    note(format!("misrouted n={n} ({target:?}) id={pos}"));
                }
                match acked.as_slice() {
                    [] => c.unacked_delivered += u64::from(seen.get(&n).is_some_and(|s| s.0 == i)),
                    ids if ids.contains(&pos) => {}
                    ids if ids.iter().any(|a| a.epoch > pos.epoch) && retried => c.lost_stream_copies += 1,
                    [a, ..] => {
                        c.id_mismatch += 1;
                        note(format!("n={n} acknowledged as id={a}, received as id={pos}"));
                    }
                }
            }
        }
    }

    // The epochs this client's partition had while it was there: of a publish stored in
    // several partitions, the client is expected to see the id of one of these.
    let mut epochs: std::collections::HashSet<u64> = log.epochs.iter().map(|&(_, e)| e).collect();
    epochs.extend(log.segs.iter().flat_map(|s| [s.cursor, s.resume]).flatten().map(|p| p.epoch));
    let after_end = |pos: Pos| match ends {
        [end] => pos > *end,
        _ => ends.iter().any(|e| e.epoch == pos.epoch && pos > *e),
    };
    for (pos, n) in ledger.addressed(id) {
        if ledger.partitioned(n) && !epochs.contains(&pos.epoch) {
            continue;
        }
        if pos <= first_cursor || after_end(pos) {
            continue;
        }
        if log.excused(pos) {
            c.excused += 1;
            continue;
        }
        c.expected += 1;
        if !seen.contains_key(&n) {
            c.lost += 1;
            let seg = log.segs.iter().rposition(|s| s.opened_ns != 0 && s.cursor.is_some_and(|cur| cur < pos));
            note(format!("lost n={n} id={pos} (last stream that opened below it: #{seg:?})"));
        }
    }
    (c, notes)
}

/// One line describing a client's streams and `ssegate.missed` signals, for the failure file.
pub fn describe(log: &ClientLog) -> String {
    use std::fmt::Write;
    let show = |p: Option<Pos>| p.map_or("-".to_string(), |p| p.to_string());
    let mut s = String::new();
    for (i, g) in log.segs.iter().enumerate() {
        let _ = write!(
            s,
            "[#{i} r{} open={} close={} resume={} cursor={} first_rec={} end={}] ",
            g.replica,
            g.opened_ns,
            g.closed_ns,
            show(g.resume),
            show(g.cursor),
            g.first_rec,
            g.end
        );
    }
    for m in &log.misses {
        let _ = write!(
            s,
            "[missed {:?} on #{} at={} from={} to={} at_rec={}] ",
            m.reason,
            m.seg,
            m.ns,
            show(m.from),
            show(m.to),
            m.at_rec
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout { clients: 6, users: 2, groups: 2, topics: 2 };
    const ME: Identity = Identity { user: 0, group: 1, topic: 0 };
    /// The stream's epoch, and that of the stream recreated after the broker lost its store.
    const E1: u64 = 0x100;
    const E2: u64 = 0x200;

    fn p(epoch: u64, seq: u64) -> Pos {
        Pos { epoch, seq }
    }

    fn rec(n: u64, seq: Option<u64>, target: Target) -> Record {
        Record { n, target, id: seq.map(|s| p(E1, s)), others: Vec::new(), attempts: 1, sent_ns: 0, acked_ns: 0 }
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

    fn seg(resume: Option<u64>, cursor: u64, first_rec: usize) -> Segment {
        Segment {
            replica: 0,
            opened_ns: 1,
            closed_ns: 2,
            resume: resume.map(|s| p(E1, s)),
            cursor: Some(p(E1, cursor)),
            first_rec,
            end: "eof",
        }
    }

    /// A client's log from `(epoch, seq, n)` receipts.
    fn log(got: &[(u64, u64, u64)], segs: Vec<Segment>) -> ClientLog {
        let mut l = ClientLog { segs, ..ClientLog::default() };
        for &(epoch, seq, n) in got {
            assert!(l.push(p(epoch, seq), n, 0));
        }
        l
    }

    fn missed(reason: Miss, from: Pos, to: Pos, at_rec: usize) -> Missed {
        Missed { reason, from: Some(from), to: Some(to), to_event: false, at_rec, seg: 1, ns: 0 }
    }

    #[test]
    fn a_clean_client_across_a_resume() {
        let l = log(
            &[(E1, 10, 1), (E1, 12, 3), (E1, 13, 4), (E1, 14, 5), (E1, 16, 7)],
            vec![seg(None, 9, 0), seg(Some(12), 12, 2)],
        );
        let (c, notes) = check(&l, &ME, &ledger(), &[p(E1, 16)], 10);
        assert_eq!((c.expected, c.received, c.lost, c.duplicated, c.unacked_delivered), (4, 5, 0, 0, 1), "{notes:?}");
        assert!(notes.is_empty());
    }

    #[test]
    fn losses_start_after_the_first_cursor_and_end_at_the_barrier() {
        let l = log(&[(E1, 14, 5)], vec![seg(None, 10, 0)]);
        let (c, _) = check(&l, &ME, &ledger(), &[p(E1, 15)], 10);
        assert_eq!((c.expected, c.lost), (2, 1), "12 lost; 10 before the cursor; 16 after the end");
    }

    #[test]
    fn a_missed_signal_excuses_its_gap_only() {
        let mut l = log(&[(E1, 10, 1), (E1, 16, 7)], vec![seg(None, 9, 0), seg(Some(10), 14, 1)]);
        l.misses.push(missed(Miss::Expired, p(E1, 10), p(E1, 14), 1));
        let (c, _) = check(&l, &ME, &ledger(), &[p(E1, 16)], 10);
        assert_eq!((c.expected, c.excused, c.lost, c.missed_expired), (2, 2, 0, 1));
    }

    #[test]
    fn duplicates_disorder_and_misrouting() {
        let mut l = log(
            &[(E1, 10, 1), (E1, 12, 3), (E1, 10, 1), (E1, 11, 2), (E1, 17, 7), (E1, 99, 50)],
            vec![seg(None, 9, 0), seg(Some(12), 9, 2)],
        );
        l.misses.push(missed(Miss::Unknown, p(E1, 12), p(E1, 9), 2));
        let (c, notes) = check(&l, &ME, &ledger(), &[p(E1, 16)], 10);
        assert_eq!(
            (c.duplicated, c.duplicated_after_missed, c.out_of_order, c.misrouted, c.phantom, c.id_mismatch),
            (1, 1, 1, 1, 1, 1),
            "{notes:?}"
        );
        assert_eq!(c.lost, 1, "14 never came");
    }

    #[test]
    fn never_connected() {
        let l = ClientLog::default();
        let (c, _) = check(&l, &ME, &ledger(), &[p(E1, 16)], 10);
        assert_eq!((c.never_connected, c.expected), (1, 0));
    }

    /// The broker lost its store: the stream was recreated (epoch E2, sequences from 1 again).
    /// The lost stream's events 11 and 12 never reached this client.
    fn recreated() -> Ledger {
        let b = |n, id| Record {
            n,
            target: Target::Broadcast,
            id: Some(id),
            others: Vec::new(),
            attempts: 1,
            sent_ns: 0,
            acked_ns: 0,
        };
        Ledger::build(&L, vec![b(1, p(E1, 10)), b(2, p(E1, 11)), b(3, p(E1, 12)), b(4, p(E2, 1)), b(5, p(E2, 2))])
    }

    #[test]
    fn what_a_lost_stream_held_past_a_client_is_excused_by_a_missed_it_received_after() {
        // Mid-stream: the replica noticed the new stream and told its connection.
        let mut l = log(&[(E1, 10, 1), (E2, 1, 4), (E2, 2, 5)], vec![seg(None, 9, 0)]);
        l.misses.push(Missed { seg: 0, to_event: true, ..missed(Miss::StreamRecreated, p(E1, 10), p(E2, 1), 1) });
        let (c, notes) = check(&l, &ME, &recreated(), &[p(E2, 2)], 10);
        assert_eq!(
            (c.lost, c.excused, c.expected, c.out_of_order, c.missed_stream_recreated),
            (0, 2, 3, 0, 1),
            "{notes:?}"
        );
        // Or at a reconnection: resumed with the lost stream's id, told `other_epoch`.
        let mut l = log(
            &[(E1, 10, 1), (E2, 1, 4), (E2, 2, 5)],
            vec![seg(None, 9, 0), Segment { cursor: Some(p(E2, 0)), ..seg(Some(10), 0, 1) }],
        );
        l.misses.push(missed(Miss::OtherEpoch, p(E1, 10), p(E2, 0), 1));
        let (c, notes) = check(&l, &ME, &recreated(), &[p(E2, 2)], 10);
        assert_eq!((c.lost, c.excused, c.expected), (0, 2, 3), "{notes:?}");
    }

    #[test]
    fn what_a_lost_stream_held_is_lost_without_a_missed_or_with_one_received_before_it() {
        let l = log(&[(E1, 10, 1), (E2, 1, 4), (E2, 2, 5)], vec![seg(None, 9, 0)]);
        let (c, notes) = check(&l, &ME, &recreated(), &[p(E2, 2)], 10);
        assert_eq!((c.lost, c.excused), (2, 0), "{notes:?}");
        // The signal came while the client was at 12: it excuses nothing before 12, and 11
        // (never received) stays lost.
        let mut l = log(&[(E1, 10, 1), (E1, 12, 3), (E2, 1, 4), (E2, 2, 5)], vec![seg(None, 9, 0)]);
        l.misses.push(Missed { seg: 0, to_event: true, ..missed(Miss::StreamRecreated, p(E1, 12), p(E2, 1), 2) });
        let (c, notes) = check(&l, &ME, &recreated(), &[p(E2, 2)], 10);
        assert_eq!((c.lost, c.excused, c.out_of_order), (1, 0, 0), "{notes:?}");
        assert!(notes[0].contains("lost n=2"), "{notes:?}");
    }

    #[test]
    fn a_retried_publish_stored_in_both_epochs_is_not_a_duplicate_but_a_repeat_in_one_is() {
        // n=3's first attempt was stored in the lost stream (E1 12) and its answer lost; the
        // retry was stored in the new stream and acknowledged as E2 1.
        let mut records = vec![
            Record {
                n: 1,
                target: Target::Broadcast,
                id: Some(p(E1, 10)),
                others: Vec::new(),
                attempts: 1,
                sent_ns: 0,
                acked_ns: 0,
            },
            Record {
                n: 3,
                target: Target::Broadcast,
                id: Some(p(E2, 1)),
                others: Vec::new(),
                attempts: 2,
                sent_ns: 0,
                acked_ns: 0,
            },
        ];
        let l = log(&[(E1, 10, 1), (E1, 12, 3), (E2, 1, 3)], vec![seg(None, 9, 0)]);
        let (c, notes) = check(&l, &ME, &Ledger::build(&L, records.clone()), &[p(E2, 1)], 10);
        assert_eq!(
            (c.duplicated, c.duplicated_across_epochs, c.lost_stream_copies, c.id_mismatch, c.lost),
            (0, 1, 1, 0, 0),
            "{notes:?}"
        );
        // Acknowledged at the first attempt, it cannot have been stored twice: a bug.
        records[1].attempts = 1;
        let (c, notes) = check(&l, &ME, &Ledger::build(&L, records), &[p(E2, 1)], 10);
        assert_eq!((c.duplicated, c.duplicated_across_epochs, c.id_mismatch), (1, 0, 1), "{notes:?}");
    }

    #[test]
    fn epochs_follow_the_events() {
        let l = log(&[(E1, 1, 1), (E1, 2, 2), (E2, 1, 3), (E2, 2, 4)], vec![]);
        assert_eq!(l.epochs, [(0, E1), (2, E2)]);
        assert_eq!(l.ids().collect::<Vec<_>>(), [p(E1, 1), p(E1, 2), p(E2, 1), p(E2, 2)]);
        let mut l = ClientLog::default();
        assert!(!l.push(p(E1, u64::from(u32::MAX) + 1), 1, 0), "does not fit");
        l.missed(Miss::Other, Some(p(E1, 3)), 0);
        l.saw_id(p(E2, 5), true);
        l.saw_id(p(E2, 6), false);
        assert_eq!((l.misses[0].to, l.misses[0].to_event, l.misses[0].at_rec), (Some(p(E2, 5)), true, 0));
    }

    #[test]
    fn with_partitions_a_client_is_held_to_the_ids_of_its_own_partition() {
        // Partition 0's stream has epoch E1, the client's partition E3: a broadcast is stored in
        // both, a message to the client's user in its partition only.
        const E3: u64 = 0x300;
        let both = |n, s0, s3| Record {
            n,
            target: Target::Broadcast,
            id: Some(p(E1, s0)),
            others: vec![p(E3, s3)],
            attempts: 1,
            sent_ns: 0,
            acked_ns: 0,
        };
        let mine =
            |n, s3| Record { target: Target::Users(vec![0]), id: Some(p(E3, s3)), others: Vec::new(), ..both(n, 0, 0) };
        let records = vec![both(1, 10, 4), mine(2, 5), both(3, 11, 6), both(4, 12, 7)];
        let ends = [p(E1, 12), p(E3, 7)];
        let clean = log(&[(E3, 4, 1), (E3, 5, 2), (E3, 6, 3), (E3, 7, 4)], vec![seg(None, 3, 0)]);
        let mut clean = clean;
        clean.segs[0].cursor = Some(p(E3, 3));
        let (c, notes) = check(&clean, &ME, &Ledger::build(&L, records.clone()), &ends, 10);
        assert_eq!((c.expected, c.lost, c.id_mismatch, c.out_of_order), (4, 0, 0, 0), "{notes:?}");
        assert!(reached(p(E3, 7), &ends) && !reached(p(E3, 6), &ends) && !reached(p(E1, 11), &ends));

        let mut gap = log(&[(E3, 4, 1), (E3, 5, 2), (E3, 7, 4)], vec![seg(None, 3, 0)]);
        gap.segs[0].cursor = Some(p(E3, 3));
        let (c, notes) = check(&gap, &ME, &Ledger::build(&L, records), &ends, 10);
        assert_eq!((c.expected, c.lost), (4, 1), "the broadcast missing in its partition is lost: {notes:?}");
    }
}
