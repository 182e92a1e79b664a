//! The line protocol between `run` and its worker processes (over the workers' stdin and
//! stdout): `ready …` when the connections are open, `end …` from `run` when publishing is
//! over, `result …` with the worker's counts and latency histogram.

use std::collections::HashMap;

use crate::{histogram::Histogram, seqcheck::Counts};

/// Worker → run: its connections are open (or failed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ready {
    /// Answered 200: admitted.
    pub established: u64,
    /// Not admitted, in all; of those, by how: the connection refused, accepted and then
    /// closed (or reset) before any response head, answered with another status, no response
    /// head within the open timeout (the rest failed otherwise, e.g. no local port).
    pub failed: u64,
    pub refused: u64,
    pub closed: u64,
    pub non_200: u64,
    pub timed_out: u64,
    /// The first failure, for the report (spaces replaced, so it stays one field).
    pub first_error: String,
}

/// Run → worker: publishing is over; wait up to `drain_ms` for `published[stream]` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub drain_ms: u64,
    pub published: Vec<u64>,
}

/// Worker → run: what its connections received.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerResult {
    pub counts: Counts,
    /// Connections that ended before the run did (server closed them, or an error).
    pub closed_early: u64,
    pub heartbeats: u64,
    /// Receive time (ns since the Unix epoch) of the first and last event.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Publish → receive latency, ns.
    pub latency: Histogram,
}

fn fields(line: &str, tag: &str) -> Result<HashMap<String, String>, String> {
    let rest =
        line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')).ok_or_else(|| format!("expected {tag}: {line:?}"))?;
    Ok(rest.split(' ').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn num(f: &HashMap<String, String>, key: &str) -> Result<u64, String> {
    f.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| format!("missing or bad field {key}"))
}

impl Ready {
    pub fn encode(&self) -> String {
        let err =
            if self.first_error.is_empty() { "-".to_string() } else { self.first_error.replace([' ', '\n'], "_") };
        format!(
            "ready established={} failed={} refused={} closed={} non_200={} timed_out={} first_error={err}",
            self.established, self.failed, self.refused, self.closed, self.non_200, self.timed_out
        )
    }

    pub fn decode(line: &str) -> Result<Self, String> {
        let f = fields(line, "ready")?;
        let first_error = f.get("first_error").filter(|e| *e != "-").cloned().unwrap_or_default();
        Ok(Ready {
            established: num(&f, "established")?,
            failed: num(&f, "failed")?,
            refused: num(&f, "refused")?,
            closed: num(&f, "closed")?,
            non_200: num(&f, "non_200")?,
            timed_out: num(&f, "timed_out")?,
            first_error,
        })
    }
}

impl End {
    pub fn encode(&self) -> String {
        let counts: Vec<String> = self.published.iter().map(u64::to_string).collect();
        format!("end drain_ms={} published={}", self.drain_ms, counts.join(","))
    }

    pub fn decode(line: &str) -> Result<Self, String> {
        let f = fields(line.trim_end(), "end")?;
        let published = f
            .get("published")
            .ok_or("missing published")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| format!("bad count {s:?}")))
            .collect::<Result<_, _>>()?;
        Ok(End { drain_ms: num(&f, "drain_ms")?, published })
    }
}

impl WorkerResult {
    pub fn encode(&self) -> String {
        let c = &self.counts;
        format!(
            "result delivered={} lost={} duplicated={} unexpected={} closed_early={} heartbeats={} first_ns={} last_ns={} latency={}",
            c.delivered,
            c.lost,
            c.duplicated,
            c.unexpected,
            self.closed_early,
            self.heartbeats,
            self.first_ns,
            self.last_ns,
            self.latency.encode()
        )
    }

    pub fn decode(line: &str) -> Result<Self, String> {
        let f = fields(line, "result")?;
        Ok(WorkerResult {
            counts: Counts {
                delivered: num(&f, "delivered")?,
                lost: num(&f, "lost")?,
                duplicated: num(&f, "duplicated")?,
                unexpected: num(&f, "unexpected")?,
            },
            closed_early: num(&f, "closed_early")?,
            heartbeats: num(&f, "heartbeats")?,
            first_ns: num(&f, "first_ns")?,
            last_ns: num(&f, "last_ns")?,
            latency: Histogram::decode(f.get("latency").ok_or("missing latency")?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let r = Ready {
            established: 9,
            failed: 10,
            refused: 1,
            closed: 5,
            non_200: 2,
            timed_out: 1,
            first_error: "connect: refused by peer".into(),
        };
        let back = Ready::decode(&r.encode()).unwrap();
        assert_eq!(back, Ready { first_error: "connect:_refused_by_peer".into(), ..r });
        let e = End { drain_ms: 5000, published: vec![3, 0, 7] };
        assert_eq!(End::decode(&(e.encode() + "\n")).unwrap(), e);
        let mut latency = Histogram::default();
        latency.record(1234);
        let w = WorkerResult {
            counts: Counts { delivered: 5, lost: 1, duplicated: 2, unexpected: 0 },
            closed_early: 1,
            heartbeats: 40,
            first_ns: 10,
            last_ns: 20,
            latency,
        };
        assert_eq!(WorkerResult::decode(&w.encode()).unwrap(), w);
        assert!(WorkerResult::decode("ready established=1").is_err());
        assert!(End::decode("end drain_ms=1 published=1,x").is_err());
    }
}
