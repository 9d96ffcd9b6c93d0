//! Peak-EWMA latency estimates (Finagle's and tower's `PeakEwma`), lock-free.
//!
//! Each pin (one endpoint, one shard of threads) of a
//! [`PeakEwma`](super::LoadBalancingStrategy::PeakEwma) service holds an [`RttEstimate`]
//! beside its in-flight count, updated by the requests picked through it that report a
//! latency: each shard of threads balances on its own view, as it does with in-flight counts
//! (and as each Envoy worker does), and no core writes a line another shard reads. A pick
//! compares two random candidates by `estimate × (in-flight + 1) / weight`, the power of two
//! choices over a latency-aware load, without reading a clock ([`b_is_cheaper`]).
//!
//! # The estimate
//!
//! * A sample slower than the current estimate **replaces** it at once (the peak: one slow
//!   response makes the endpoint expensive immediately).
//! * A faster sample pulls it down as an exponentially weighted moving average whose weight
//!   depends on the time since the last update: `e' = e·w + s·(1 − w)`, `w = exp(−Δt/τ)`,
//!   where `e` is the estimate now (already faded, below) and τ is
//!   [`PeakEwmaConfig::decay`](crate::PeakEwmaConfig::decay).
//! * Between samples the estimate **decays toward zero** with the same τ, so an endpoint that
//!   stopped receiving traffic after a slow spell is tried again after a while instead of
//!   being avoided for ever. Picks compare decayed values; they write nothing.
//! * An endpoint with no sample yet costs 0 while idle and a prohibitive penalty plus its
//!   requests in flight while busy (Finagle's rule): a new endpoint gets one probe request,
//!   then traffic once the probe has measured it; among busy unmeasured endpoints the less
//!   loaded wins, as in least connections.
//! * A failure (with or without a latency) never makes an endpoint look faster: it restores
//!   the last measured estimate (undoing any fade, so an endpoint that fails fast does not
//!   become the cheapest) or raises it to the failure's latency if that is slower; a failure
//!   before any success counts as [`FAILED_PROBE_ESTIMATE`] (then fades like any estimate,
//!   so the endpoint is tried again). Ejecting failing endpoints is outlier detection's job.
//! * Latencies are what requests report. [`Pick::record`](crate::Pick::record) reports into
//!   the pin (shard) the pick came from; `record_result` by address reports into the calling
//!   thread's shard. [`BalancedChannel`](crate::BalancedChannel) reports each call's duration
//!   to the end of its response: right for unary calls; a long-lived stream's duration is
//!   not a latency, so route streaming services with another strategy.
//!
//! # Invariants
//!
//! * Lock-free and allocation-free: two relaxed atomics per estimate; a pick reads them (and
//!   computes one `exp`), a report writes them. Concurrent reports may lose one another's
//!   update (last writer wins), and a pick may read an estimate with the previous update's
//!   timestamp: both only blur a heuristic, never corrupt it (every stored value is a
//!   finite, non-negative `f64`).
#![deny(unsafe_code)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::sync::atomic::{AtomicU64, Ordering};

/// The cost of an endpoint with no estimate yet and a request in flight, before its
/// requests in flight are added: 2^47 ns (39 hours), far above any measured cost, and small
/// enough that adding an in-flight count to it still changes the `f64`.
pub(crate) const UNMEASURED_BUSY_COST: f64 = (1u64 << 47) as f64;

/// The estimate an endpoint gets when a request fails before any has succeeded on it.
pub const FAILED_PROBE_ESTIMATE: Duration = Duration::from_secs(1);

/// Nanoseconds on a monotonic clock with a process-wide origin.
#[inline]
pub(crate) fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One pin's round-trip estimate: one endpoint generation as one shard of threads sees it
/// (see the module docs).
#[derive(Debug)]
pub(crate) struct RttEstimate {
    /// The estimate in nanoseconds, as `f64` bits; 0 before the first sample.
    rtt_ns: AtomicU64,
    /// When it was last updated ([`now_ns`]).
    at_ns: AtomicU64,
    /// τ in nanoseconds (positive).
    decay_ns: f64,
}

impl RttEstimate {
    /// An estimate without samples, decaying with time constant `decay` (positive).
    pub(crate) fn new(decay: Duration) -> Self {
        Self {
            rtt_ns: AtomicU64::new(0f64.to_bits()),
            at_ns: AtomicU64::new(now_ns()),
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    /// `exp(−elapsed/τ)` from the last update to `now`.
    #[inline]
    fn weight(&self, at: u64, now: u64) -> f64 {
        let elapsed = now.saturating_sub(at) as f64;
        (-elapsed / self.decay_ns).exp()
    }

    /// The estimate at `now` (decayed since the last update); 0 before the first sample.
    #[inline]
    pub(crate) fn estimate_ns(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if rtt == 0.0 {
            return 0.0;
        }
        rtt * self.weight(self.at_ns.load(Ordering::Relaxed), now)
    }

    /// The load of an endpoint with `in_flight` requests at `now`.
    #[cfg(test)]
    pub(crate) fn cost(&self, in_flight: u64, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if rtt == 0.0 {
            return unmeasured_cost(in_flight);
        }
        rtt * self.weight(self.at_ns.load(Ordering::Relaxed), now) * (in_flight as f64 + 1.0)
    }

    /// Takes in a failed request that reported no latency.
    pub(crate) fn observe_failure(&self, now: u64) {
        self.observe(Duration::ZERO, false, now);
    }

    /// Takes in one request's latency; a failure (`success: false`) restores or raises the
    /// estimate, never lowers it (see the module docs).
    pub(crate) fn observe(&self, latency: Duration, success: bool, now: u64) {
        let sample = (latency.as_nanos() as f64).max(1.0);
        let stored = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let w = self.weight(self.at_ns.load(Ordering::Relaxed), now);
        let current = stored * w;
        let next = if !success {
            // A failure says nothing good about the endpoint: back to its last measure (not
            // the faded value, which a fast-failing endpoint would otherwise keep winning
            // with), or the failed-probe estimate if it has none, or slower.
            let floor = if stored == 0.0 {
                FAILED_PROBE_ESTIMATE.as_nanos() as f64
            } else {
                stored
            };
            floor.max(sample)
        } else if sample > current {
            sample
        } else {
            current * w + sample * (1.0 - w)
        };
        if next.is_finite() {
            self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
            self.at_ns.store(now, Ordering::Relaxed);
        }
    }
}

/// Whether candidate `b` costs less per unit of weight than `a`, each given as (estimate,
/// requests in flight, weight): `cost(b)/w_b < cost(a)/w_a` with
/// `cost = estimate decayed to now × (in flight + 1)`.
///
/// Both estimates decay toward zero at the same rate, so "now" cancels out of the
/// comparison: `e_b·exp(−(now−t_b)/τ) / e_a·exp(−(now−t_a)/τ) = (e_b/e_a)·exp((t_b−t_a)/τ)`.
/// The pick reads no clock and computes one `exp`. An unmeasured candidate costs 0 idle and
/// [`UNMEASURED_BUSY_COST`] busy, as in [`RttEstimate`]'s rules. Ties keep `a`.
#[inline]
pub(crate) fn b_is_cheaper(a: (&RttEstimate, u64, u32), b: (&RttEstimate, u64, u32)) -> bool {
    let (ea, ia, wa) = a;
    let (eb, ib, wb) = b;
    let ra = f64::from_bits(ea.rtt_ns.load(Ordering::Relaxed));
    let rb = f64::from_bits(eb.rtt_ns.load(Ordering::Relaxed));
    let (wa, wb) = (f64::from(wa), f64::from(wb));
    if ra == 0.0 || rb == 0.0 {
        // At most one measured: its cost is far below the penalty whatever "now" is, so
        // comparing it undecayed gives the same answer.
        let ca = if ra == 0.0 {
            unmeasured_cost(ia)
        } else {
            ra * (ia as f64 + 1.0)
        };
        let cb = if rb == 0.0 {
            unmeasured_cost(ib)
        } else {
            rb * (ib as f64 + 1.0)
        };
        return cb * wa < ca * wb;
    }
    let (ta, tb) = (ea.at_ns.load(Ordering::Relaxed), eb.at_ns.load(Ordering::Relaxed));
    // exp((t_b − t_a)/τ), from the signed difference (both estimates share τ per service).
    let dt = if tb >= ta {
        (tb - ta) as f64
    } else {
        -((ta - tb) as f64)
    };
    let relative = (dt / ea.decay_ns).exp();
    rb * (ib as f64 + 1.0) * relative * wa < ra * (ia as f64 + 1.0) * wb
}

/// The cost of an endpoint without an estimate: 0 idle (it gets a probe), else the penalty
/// plus its requests in flight (busy ones compare as in least connections).
#[inline]
fn unmeasured_cost(in_flight: u64) -> f64 {
    if in_flight == 0 {
        0.0
    } else {
        UNMEASURED_BUSY_COST + in_flight as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn unmeasured_endpoints_get_one_probe() {
        let e = RttEstimate::new(Duration::from_secs(10));
        let now = now_ns();
        assert_eq!(e.estimate_ns(now), 0.0);
        assert_eq!(e.cost(0, now), 0.0);
        assert_eq!(e.cost(1, now), UNMEASURED_BUSY_COST + 1.0);
        // Busy unmeasured endpoints compare by requests in flight.
        let f = RttEstimate::new(Duration::from_secs(10));
        assert!(b_is_cheaper((&e, 5, 1), (&f, 1, 1)));
        assert!(!b_is_cheaper((&e, 1, 1), (&f, 5, 1)));
        // A measured one, however slow and loaded, beats a busy unmeasured one.
        f.observe(Duration::from_secs(30), true, now);
        assert!(b_is_cheaper((&e, 1, 1), (&f, 100, 1)));
    }

    #[test]
    fn a_slower_sample_is_the_new_peak_and_faster_ones_pull_it_down_over_time() {
        let e = RttEstimate::new(Duration::from_millis(100));
        let t0 = now_ns();
        e.observe(Duration::from_millis(2), true, t0);
        assert_eq!(e.estimate_ns(t0), 2.0 * MS as f64);
        // A peak replaces the estimate at once.
        e.observe(Duration::from_millis(50), true, t0 + MS);
        assert_eq!(e.estimate_ns(t0 + MS), 50.0 * MS as f64);
        // A fast sample right after barely moves it; one τ later it moves it most of the way
        // (and the estimate itself decayed meanwhile).
        e.observe(Duration::from_millis(1), true, t0 + MS);
        assert!(e.estimate_ns(t0 + MS) > 49.0 * MS as f64);
        e.observe(Duration::from_millis(1), true, t0 + 101 * MS);
        let after = e.estimate_ns(t0 + 101 * MS);
        assert!(after < 10.0 * MS as f64 && after > 1.0 * MS as f64, "{after}");
    }

    #[test]
    fn the_estimate_decays_toward_zero_while_idle() {
        let e = RttEstimate::new(Duration::from_millis(100));
        let t0 = now_ns();
        e.observe(Duration::from_millis(40), true, t0);
        let one_tau = e.estimate_ns(t0 + 100 * MS);
        assert!(
            (one_tau / (40.0 * MS as f64) - (-1.0f64).exp()).abs() < 1e-9,
            "{one_tau}"
        );
        assert!(e.estimate_ns(t0 + 2_000 * MS) < 0.001 * MS as f64);
        // Cost grows with the requests in flight.
        assert_eq!(e.cost(3, t0), 4.0 * 40.0 * MS as f64);
    }

    #[test]
    fn failures_restore_or_raise_the_estimate() {
        let e = RttEstimate::new(Duration::from_secs(10));
        let t0 = now_ns();
        e.observe(Duration::from_millis(20), true, t0);
        // Long idle: the estimate faded to almost nothing; a fast failure restores it.
        assert!(e.estimate_ns(t0 + 100_000 * MS) < 0.001 * MS as f64);
        e.observe(Duration::from_micros(10), false, t0 + 100_000 * MS);
        assert_eq!(
            e.estimate_ns(t0 + 100_000 * MS),
            20.0 * MS as f64,
            "a fast failure restored the last measure"
        );
        // A failure without a latency does the same.
        e.observe_failure(t0 + 200_000 * MS);
        assert_eq!(e.estimate_ns(t0 + 200_000 * MS), 20.0 * MS as f64);
        // A failure before any success: the failed-probe estimate.
        let fresh = RttEstimate::new(Duration::from_secs(10));
        fresh.observe_failure(t0);
        assert_eq!(fresh.estimate_ns(t0), FAILED_PROBE_ESTIMATE.as_nanos() as f64);
        // A slower failure raises it.
        e.observe(Duration::from_millis(80), false, t0 + 200_002 * MS);
        assert_eq!(
            e.estimate_ns(t0 + 200_002 * MS),
            80.0 * MS as f64,
            "a slow failure is a peak"
        );
    }

    #[test]
    fn the_clockless_comparison_agrees_with_the_costs_at_any_time() {
        let tau = Duration::from_millis(100);
        let t0 = now_ns();
        let a = RttEstimate::new(tau);
        let b = RttEstimate::new(tau);
        // Idle unmeasured beats measured; busy unmeasured loses.
        a.observe(Duration::from_millis(5), true, t0);
        assert!(b_is_cheaper((&a, 0, 1), (&b, 0, 1)));
        assert!(!b_is_cheaper((&a, 0, 1), (&b, 1, 1)));
        // Both measured, updated at different times: the decision matches the costs computed
        // at several later instants (it does not depend on the instant).
        b.observe(Duration::from_millis(3), true, t0 + 150 * MS);
        for (ia, ib, wa, wb) in [
            (0, 0, 1, 1),
            (0, 1, 1, 1),
            (2, 0, 1, 1),
            (0, 0, 3, 1),
            (1, 4, 1, 5),
        ] {
            for later in [150, 400, 2_000] {
                let now = t0 + later * MS;
                let by_cost = b.cost(ib, now) * f64::from(wa) < a.cost(ia, now) * f64::from(wb);
                assert_eq!(
                    b_is_cheaper((&a, ia, wa), (&b, ib, wb)),
                    by_cost,
                    "in flight {ia}/{ib}, weights {wa}/{wb}, at +{later} ms"
                );
            }
        }
        // Far apart in time: no overflow into a wrong answer.
        let old = RttEstimate::new(tau);
        old.observe(Duration::from_millis(1), true, 0);
        let fresh = RttEstimate::new(tau);
        fresh.observe(Duration::from_secs(1), true, u64::MAX / 2);
        assert!(
            !b_is_cheaper((&old, 0, 1), (&fresh, 0, 1)),
            "the long-idle one costs ~0"
        );
        assert!(b_is_cheaper((&fresh, 0, 1), (&old, 0, 1)));
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let e = RttEstimate::new(Duration::from_nanos(1));
        e.observe(Duration::MAX, true, now_ns());
        assert!(e.estimate_ns(now_ns()).is_finite());
        e.observe(Duration::ZERO, true, u64::MAX);
        assert!(e.cost(u64::MAX, u64::MAX).is_finite());
        let idle = RttEstimate::new(Duration::from_secs(3600));
        idle.observe(Duration::ZERO, true, 0);
        assert!(idle.estimate_ns(now_ns()) >= 0.0);
    }
}
