//! A fixed-bucket latency histogram with lock-free recording.
//!
//! Hand-written because it sits on the per-write path of every connection: prometheus-client's
//! `Histogram` takes a write lock on each observation, this one does three relaxed atomic adds.
//! It is rendered through prometheus-client's encoder at scrape time.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Upper bounds of latency buckets, in seconds (the last, +Inf, is implicit).
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds of queue-depth buckets, in frames.
pub const DEPTH_BUCKETS: [f64; 12] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 16384.0];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket counts, not cumulative; one more than `bounds` for +Inf.
    counts: Vec<AtomicU64>,
    /// The sum of observations in units of 1/`scale` (nanoseconds for latencies).
    sum: AtomicU64,
    scale: f64,
}

impl Histogram {
    /// A histogram of durations (sum kept in nanoseconds).
    pub fn latency() -> Self {
        Self::new(&LATENCY_BUCKETS, 1e9)
    }

    /// A histogram of counts (sum kept exactly).
    pub fn depth() -> Self {
        Self::new(&DEPTH_BUCKETS, 1.0)
    }

    pub fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0), scale }
    }

    pub fn observe(&self, d: Duration) {
        self.observe_value(d.as_secs_f64());
    }

    pub fn observe_value(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum.fetch_add((v * self.scale) as u64, Relaxed);
    }

    /// (sum, count, cumulative buckets) in the form prometheus-client's encoder takes.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        (self.sum.load(Relaxed) as f64 / self.scale, cumulative, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inclusive_of_their_bound() {
        static B: [f64; 2] = [0.001, 0.01];
        let h = Histogram::new(&B, 1e9);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert_eq!(buckets, vec![(0.001, 2), (0.01, 3), (f64::INFINITY, 4)]);
        assert!((sum - 1.0065).abs() < 1e-9);
    }
}
