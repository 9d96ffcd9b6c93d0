//! Latency histograms: a lock-free recorder on the request path, a plain snapshot to read.
//!
//! Owns [`AtomicHistogram`] (one per endpoint generation, shared by its per-shard pins,
//! allocated on the first latency it records) and [`LatencyHistogram`] (the sparse snapshot
//! that metrics, percentiles and the Prometheus exposition read).
//!
//! # Buckets
//!
//! Log-linear, in nanoseconds, like HdrHistogram with 64 sub-buckets per power of two: values
//! below 64 ns have exact buckets; above, each power of two `[2^e, 2^(e+1))` is cut into 64
//! equal buckets. A bucket is reported by its midpoint, so a percentile is within 1/128
//! (0.79 %) of the recorded value it stands for (tests compare against an exact sort).
//! Values of 2^36 ns (68.7 s) and more share the top bucket; the exact maximum is kept
//! separately. 1,984 buckets of 8 bytes: 15.5 KiB per endpoint that records latencies.
//!
//! # Invariants
//!
//! * Recording is one `fetch_add` on the bucket (plus a `fetch_max` only when a new maximum is
//!   seen, a `fetch_or` only the first time a range of 64 buckets is used): no lock, no
//!   allocation after the first record. The sum is estimated from the buckets at read time.
//! * A snapshot's count is the sum of its buckets: counts are never reported from a separate
//!   counter that could disagree.
#![deny(unsafe_code)]

use std::time::Duration;

use once_cell::race::OnceBox;

use crate::sync::atomic::{AtomicU64, Ordering};

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const TOP_EXP: u32 = 36;
/// Number of buckets.
pub(crate) const BUCKETS: usize = (SUB + (TOP_EXP - SUB_BITS) as u64 * SUB) as usize;

/// The bucket of `ns`.
#[inline]
fn index(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let ns = ns.min((1 << TOP_EXP) - 1);
    let e = 63 - ns.leading_zeros();
    let sub = (ns >> (e - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(e - SUB_BITS) * SUB + sub) as usize
}

/// The smallest value of bucket `i`, and its width.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let k = (i - SUB) / SUB;
    let sub = (i - SUB) % SUB;
    let e = k + u64::from(SUB_BITS);
    ((1 << e) + (sub << k), 1 << k)
}

/// The nearest rank of percentile `p` (0..=100) among `count` values, in integer arithmetic
/// (`(99.9 / 100.0) * 1000.0` is `999.0000000000001` in floating point, which would make p99.9
/// of 1,000 values the largest one).
pub(crate) fn nearest_rank(p: f64, count: u64) -> u64 {
    // p in units of 1e-6 %: exact for every percentile written with up to six decimals.
    let micro = (p * 1e6).round() as u128;
    let rank = (u128::from(count) * micro).div_ceil(100_000_000);
    (rank as u64).clamp(1, count.max(1))
}

/// The sum of the values in `chunks`, each by its bucket's midpoint (at most the maximum).
fn estimate_sum(mask: u64, chunks: &[[u64; CHUNK]], max_ns: u64) -> u64 {
    let sum: u128 = chunk_ids(mask)
        .zip(chunks)
        .flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(move |(j, n)| u128::from(representative(c * CHUNK + j).min(max_ns)) * u128::from(*n))
        })
        .sum();
    u64::try_from(sum).unwrap_or(u64::MAX)
}

/// The value bucket `i` stands for (its midpoint).
fn representative(i: usize) -> u64 {
    let (low, width) = bounds(i);
    low + width / 2
}

/// The recorder: lock-free, allocated on first use.
///
/// The buckets (8 bytes each) are allocated by the first latency recorded, not up front, so
/// an endpoint that never reports a latency costs 24 bytes here. That first record allocates
/// once and never blocks: threads racing to it each build buckets and the losers free theirs
/// (`once_cell`'s `race::OnceBox`), where a `OnceLock` would park them.
#[derive(Default)]
pub(crate) struct AtomicHistogram {
    buckets: OnceBox<[AtomicU64; BUCKETS]>,
    /// Bit `c` set: some bucket of chunk `c` (buckets `64c..64c+64`) was recorded into, so a
    /// snapshot scans only the chunks in use (latencies usually span a few powers of two).
    chunks: AtomicU64,
    max_ns: AtomicU64,
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicHistogram").finish_non_exhaustive()
    }
}

impl AtomicHistogram {
    /// Records one latency. `Relaxed`: statistics only.
    #[inline]
    pub(crate) fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let buckets = self
            .buckets
            .get_or_init(|| Box::new(core::array::from_fn(|_| AtomicU64::new(0))));
        let i = index(ns);
        let chunk = 1u64 << (i >> SUB_BITS);
        if self.chunks.load(Ordering::Relaxed) & chunk == 0 {
            self.chunks.fetch_or(chunk, Ordering::Relaxed);
        }
        buckets[i].fetch_add(1, Ordering::Relaxed);
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// A copy of what was recorded so far.
    pub(crate) fn snapshot(&self) -> LatencyHistogram {
        let Some(buckets) = self.buckets.get() else {
            return LatencyHistogram::default();
        };
        let mut mask = 0u64;
        let mut chunks = Vec::with_capacity(self.chunks.load(Ordering::Relaxed).count_ones() as usize);
        for c in chunk_ids(self.chunks.load(Ordering::Relaxed)) {
            let start = c * CHUNK;
            let mut chunk = [0u64; CHUNK];
            for (j, slot) in chunk.iter_mut().enumerate().take(BUCKETS - start) {
                *slot = buckets[start + j].load(Ordering::Relaxed);
            }
            if chunk.iter().any(|&n| n > 0) {
                mask |= 1 << c;
                chunks.push(chunk);
            }
        }
        let count = chunks.iter().flatten().sum();
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        // The sum is estimated from the buckets (each value by its bucket's midpoint, so within
        // 0.79 %), rather than kept in an atomic: one less atomic add per sample, and no sum
        // that wraps after a few hundred days of heavy traffic.
        LatencyHistogram {
            mask,
            sum_ns: estimate_sum(mask, &chunks, max_ns),
            chunks,
            count,
            max_ns,
        }
    }
}

/// Recorded latencies of an endpoint, a service or the whole balancer: a snapshot.
///
/// Percentiles, the sum and the mean are within 0.79 % of the recorded values (see the module
/// docs of the bucket layout); count and maximum are exact.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use std::time::Duration;
/// # use tai_loadbalancer::*;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("svc", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await?;
/// # let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?;
/// for ms in 1..=100 {
///     lb.pick("svc")?.record(Outcome::Success, Some(Duration::from_millis(ms)));
/// }
/// let latency = lb.metrics().latency;
/// assert_eq!(latency.count(), 100);
/// let p99 = latency.percentile(99.0).unwrap();
/// assert!(p99 >= Duration::from_micros(98_300) && p99 <= Duration::from_micros(99_800));
/// assert_eq!(latency.max(), Some(Duration::from_millis(100)));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Bit `c`: chunk `c` (buckets `64c..64c+64`) has counts, stored in `chunks` in bit order.
    mask: u64,
    chunks: Vec<[u64; CHUNK]>,
    count: u64,
    sum_ns: u64,
    max_ns: u64,
}

const CHUNK: usize = SUB as usize;

/// The chunks of `mask`, in order.
fn chunk_ids(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let c = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            c
        })
    })
}

impl LatencyHistogram {
    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sum of the recorded latencies.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }

    /// Mean latency.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.sum_ns / self.count))
    }

    /// Largest latency recorded (exact).
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// The latency below which `percent` % of the recorded ones fall (nearest rank), e.g.
    /// `percentile(99.0)`; `None` if nothing was recorded. `percent` is clamped to 0..=100.
    pub fn percentile(&self, percent: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let p = if percent.is_nan() {
            100.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        let rank = nearest_rank(p, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets() {
            seen += n;
            if seen >= rank {
                let value = representative(i).min(self.max_ns);
                return Some(Duration::from_nanos(value));
            }
        }
        self.max()
    }

    /// Median.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(50.0)
    }

    /// 95th percentile.
    pub fn p95(&self) -> Option<Duration> {
        self.percentile(95.0)
    }

    /// 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(99.0)
    }

    /// 99.9th percentile.
    pub fn p999(&self) -> Option<Duration> {
        self.percentile(99.9)
    }

    /// How many recorded latencies are at most `bound` (bucket-exact: a bucket counts when
    /// its upper end is at most `bound`). For cumulative histogram buckets (Prometheus `le`).
    pub fn count_at_most(&self, bound: Duration) -> u64 {
        let bound = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        self.cumulative_counts(&[bound])[0]
    }

    /// For each bound (ascending), how many latencies are at most it (as
    /// [`count_at_most`](Self::count_at_most)), in one pass.
    pub(crate) fn cumulative_counts(&self, bounds_ns: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds_ns.len());
        let mut buckets = self.buckets().peekable();
        let mut seen = 0;
        for &bound in bounds_ns {
            while let Some(&(i, n)) = buckets.peek() {
                if self.upper(i) <= bound {
                    seen += n;
                    buckets.next();
                } else {
                    break;
                }
            }
            out.push(seen);
        }
        out
    }

    /// Adds `other`'s latencies to these.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let mut acc = LatencyAccumulator::default();
        acc.add(self);
        acc.add(other);
        *self = acc.finish();
    }

    /// The largest value bucket `i` may hold (the top bucket holds everything up to the max).
    fn upper(&self, i: usize) -> u64 {
        let (low, width) = bounds(i);
        if i == BUCKETS - 1 {
            (low + width - 1).max(self.max_ns)
        } else {
            low + width - 1
        }
    }

    /// Non-empty buckets `(index, count)` in order.
    fn buckets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        chunk_ids(self.mask).zip(&self.chunks).flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(j, n)| (c * CHUNK + j, *n))
        })
    }
}

/// Sums many histograms in time proportional to their non-empty buckets (a dense array).
#[derive(Default)]
pub(crate) struct LatencyAccumulator {
    mask: u64,
    dense: Vec<[u64; CHUNK]>,
    count: u64,
    max_ns: u64,
}

impl LatencyAccumulator {
    pub(crate) fn add(&mut self, h: &LatencyHistogram) {
        if h.count == 0 {
            return;
        }
        if self.dense.is_empty() {
            self.dense = vec![[0; CHUNK]; BUCKETS.div_ceil(CHUNK)];
        }
        self.mask |= h.mask;
        for (c, chunk) in chunk_ids(h.mask).zip(&h.chunks) {
            for (into, n) in self.dense[c].iter_mut().zip(chunk) {
                *into += n;
            }
        }
        self.count += h.count;
        self.max_ns = self.max_ns.max(h.max_ns);
    }

    pub(crate) fn finish(self) -> LatencyHistogram {
        let chunks: Vec<[u64; CHUNK]> = chunk_ids(self.mask).map(|c| self.dense[c]).collect();
        LatencyHistogram {
            mask: self.mask,
            sum_ns: estimate_sum(self.mask, &chunks, self.max_ns),
            chunks,
            count: self.count,
            max_ns: self.max_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_in_order() {
        assert_eq!(index(0), 0);
        assert_eq!(index(63), 63);
        assert_eq!(index(64), 64);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        let mut last = 0;
        for e in 6..TOP_EXP {
            for v in [1u64 << e, (1 << e) + 1, (3 << e) / 2, (1 << (e + 1)) - 1] {
                let i = index(v);
                assert!(i >= last);
                last = i;
                let (low, width) = bounds(i);
                assert!(
                    low <= v && v < low + width,
                    "{v} in bucket {i} = [{low}, +{width})"
                );
                // Midpoint error bound: half a width over the value.
                let err = representative(i).abs_diff(v) as f64 / v as f64;
                assert!(err <= 1.0 / 128.0 + 1e-12, "{v}: {err}");
            }
        }
    }

    #[test]
    fn percentiles_are_within_one_percent_of_an_exact_sort() {
        let h = AtomicHistogram::default();
        let mut values: Vec<u64> = (0..100_000u64)
            .map(|i| {
                // A long-tailed spread from 100 ns to ~10 s.
                let x = (i.wrapping_mul(2_654_435_761) % 1_000_000) as f64 / 1_000_000.0;
                (100.0 * (1e8f64).powf(x * x)) as u64
            })
            .collect();
        for &v in &values {
            h.record(Duration::from_nanos(v));
        }
        values.sort_unstable();
        let snap = h.snapshot();
        assert_eq!(snap.count(), values.len() as u64);
        let exact_sum: u64 = values.iter().sum();
        let err = (snap.sum().as_nanos() as f64 - exact_sum as f64).abs() / exact_sum as f64;
        assert!(err <= 1.0 / 128.0, "sum within 0.79 %: {err}");
        assert_eq!(snap.max(), Some(Duration::from_nanos(*values.last().unwrap())));
        for p in [1.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0] {
            let rank = nearest_rank(p, values.len() as u64) as usize;
            let exact = values[rank - 1] as f64;
            let ours = snap.percentile(p).unwrap().as_nanos() as f64;
            assert!(
                (ours - exact).abs() / exact <= 0.01,
                "p{p}: ours {ours} exact {exact}"
            );
        }
    }

    #[test]
    fn nearest_rank_is_exact_where_floating_point_is_not() {
        assert_eq!(nearest_rank(99.9, 1_000), 999);
        assert_eq!(nearest_rank(99.9, 10_000), 9_990);
        assert_eq!(nearest_rank(7.0, 100), 7);
        assert_eq!(nearest_rank(50.0, 3), 2);
        assert_eq!(nearest_rank(0.0, 10), 1);
        assert_eq!(nearest_rank(100.0, 10), 10);
        // 999 values at 1 ms and one at 5 s: p99.9 is 1 ms.
        let h = AtomicHistogram::default();
        for _ in 0..999 {
            h.record(Duration::from_millis(1));
        }
        h.record(Duration::from_secs(5));
        let p = h.snapshot().p999().unwrap();
        assert!(p < Duration::from_micros(1_010), "{p:?}");
    }

    #[test]
    fn the_top_bucket_ends_at_the_maximum() {
        let h = AtomicHistogram::default();
        h.record(Duration::from_secs(200));
        h.record(Duration::MAX);
        let snap = h.snapshot();
        assert_eq!(snap.count_at_most(Duration::from_secs(100)), 0);
        assert_eq!(snap.count_at_most(Duration::MAX), 2);
        assert_eq!(snap.count(), 2);
    }

    #[test]
    fn merge_equals_recording_into_one() {
        let (a, b, both) = (
            AtomicHistogram::default(),
            AtomicHistogram::default(),
            AtomicHistogram::default(),
        );
        for i in 0..10_000u64 {
            let d = Duration::from_nanos(i * i % 9_999_991 + 1);
            if i % 3 == 0 { &a } else { &b }.record(d);
            both.record(d);
        }
        let mut merged = a.snapshot();
        merged.merge(&b.snapshot());
        assert_eq!(merged, both.snapshot());
        let mut acc = LatencyAccumulator::default();
        acc.add(&a.snapshot());
        acc.add(&b.snapshot());
        assert_eq!(acc.finish(), merged);
        let bounds_ns = [0, 1_000, 50_000, 1_000_000, 9_999_999, u64::MAX / 2];
        let one_pass = merged.cumulative_counts(&bounds_ns);
        for (b, n) in bounds_ns.iter().zip(one_pass) {
            assert_eq!(n, merged.count_at_most(Duration::from_nanos(*b)));
        }
        let mut empty = LatencyHistogram::default();
        empty.merge(&merged);
        assert_eq!(empty, merged);
        assert_eq!(merged.count_at_most(Duration::from_secs(100)), merged.count());
        assert_eq!(merged.count_at_most(Duration::ZERO), 0);
    }
}
