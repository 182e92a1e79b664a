//! A log-linear latency histogram (HdrHistogram's bucket layout, 1.6 % precision), small
//! enough to merge across worker processes as text.
//!
//! Values below 128 are exact; above, each power of two is split into 64 equal sub-buckets,
//! so a reported percentile is at most 1/64 above the true value (we report a bucket's highest
//! value, as HdrHistogram's "highest equivalent value" does, so errors are never optimistic).

/// Exact buckets below this value.
const EXACT: u64 = 128;
/// Sub-buckets per power of two above `EXACT`.
const SUB: u64 = 64;
/// Buckets for every `u64`: 128 exact, then 64 per exponent 7..=63.
const BUCKETS: usize = (EXACT + (64 - 7) * SUB) as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    /// Exact extremes, so `max` is never rounded.
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], count: 0, min: u64::MAX, max: 0 }
    }
}

fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let exp = 63 - u64::from(v.leading_zeros()); // >= 7
    let shift = exp - 6;
    let mantissa = v >> shift; // in 64..=127
    (EXACT + (exp - 7) * SUB + (mantissa - SUB)) as usize
}

/// The highest value that falls into bucket `i`.
fn highest(i: usize) -> u64 {
    let i = i as u64;
    if i < EXACT {
        return i;
    }
    let exp = (i - EXACT) / SUB + 7;
    let mantissa = (i - EXACT) % SUB + SUB;
    let shift = exp - 6;
    (((mantissa + 1) as u128) << shift).saturating_sub(1).min(u128::from(u64::MAX)) as u64
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0 < q <= 1): the smallest recorded bucket whose cumulative
    /// count reaches `ceil(q * count)`, reported as that bucket's highest value (capped at the
    /// exact maximum). 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Text form for the worker → coordinator protocol: `min,max,i:c;i:c;…` (non-empty buckets).
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let mut s = format!("{},{},", if self.count == 0 { 0 } else { self.min }, self.max);
        for (i, c) in self.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            let _ = write!(s, "{i}:{c};");
        }
        s
    }

    pub fn decode(s: &str) -> Result<Self, String> {
        let bad = || format!("malformed histogram {s:?}");
        let mut parts = s.splitn(3, ',');
        let (min, max, buckets) = (parts.next(), parts.next(), parts.next());
        let (Some(min), Some(max), Some(buckets)) = (min, max, buckets) else { return Err(bad()) };
        let mut h = Histogram::default();
        for pair in buckets.split(';').filter(|p| !p.is_empty()) {
            let (i, c) = pair.split_once(':').ok_or_else(bad)?;
            let i: usize = i.parse().map_err(|_| bad())?;
            let c: u64 = c.parse().map_err(|_| bad())?;
            *h.counts.get_mut(i).ok_or_else(bad)? += c;
            h.count += c;
        }
        if h.count > 0 {
            h.min = min.parse().map_err(|_| bad())?;
            h.max = max.parse().map_err(|_| bad())?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_u64() {
        let mut last = 0;
        for v in (0..5000).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(i >= last, "{v}");
            assert!(highest(i) >= v, "bucket of {v} ends at {} below it", highest(i));
            last = i;
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(highest(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn relative_error_is_under_two_percent() {
        for v in [128u64, 129, 1000, 12_345, 999_999, 50_000_000, 1 << 40] {
            let h = highest(index(v));
            assert!(h >= v && (h - v) as f64 / v as f64 <= 1.0 / 64.0, "{v} -> {h}");
        }
    }

    #[test]
    fn quantiles_of_1_to_1000() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.quantile(0.001), 1);
        let p50 = h.quantile(0.5);
        assert!((500..=508).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000, "the maximum is exact");
    }

    #[test]
    fn small_values_are_exact_and_empty_is_zero() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in [3, 3, 7, 100] {
            h.record(v);
        }
        assert_eq!((h.quantile(0.5), h.quantile(0.75), h.quantile(1.0)), (3, 7, 100));
    }

    #[test]
    fn merge_and_text_round_trip() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(5);
        a.record(1_000_000);
        b.record(70_000);
        let back = Histogram::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        a.merge(&b);
        assert_eq!((a.count(), a.max(), a.quantile(0.0)), (3, 1_000_000, 5));
        assert_eq!(Histogram::decode(&Histogram::default().encode()).unwrap(), Histogram::default());
        assert!(Histogram::decode("1,2,x:1;").is_err());
        assert!(Histogram::decode("1,2,999999:1;").is_err());
    }
}
