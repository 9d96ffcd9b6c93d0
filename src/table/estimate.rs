//! Peak-EWMA latency estimates, one 64-bit word per endpoint and shard.
//!
//! Each shard of a [`PeakEwma`](crate::LoadBalancingStrategy::PeakEwma) service keeps, per
//! endpoint, an estimate beside the endpoint's in-flight count (the arena's `aux` word),
//! updated by the requests picked through that shard that report a latency: each shard of
//! threads balances on its own view, as it does with in-flight counts (and as each Envoy
//! worker does), and no core writes a line another shard reads. A pick compares two random
//! candidates by `estimate × (in-flight + 1) / weight`, the power of two choices over a
//! latency-aware load, without reading a clock ([`b_is_cheaper`]).
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
//!   the shard the pick came from; `record_result` by address reports into the calling
//!   thread's shard. [`BalancedChannel`](crate::BalancedChannel) reports each call's duration
//!   to the end of its response: right for unary calls; a long-lived stream's duration is
//!   not a latency, so route streaming services with another strategy.
//!
//! # The word
//!
//! The estimate in nanoseconds as an `f32` (24 bits of precision: far finer than latencies
//! vary) in the high half, and the time of its last update in the low half, in units of
//! 2^16 ns (65.5 µs) on a process-wide monotonic clock, wrapping every 78 hours. One load
//! reads a consistent pair. Times are compared as wrapping differences, which are exact
//! while the two updates are less than 39 hours apart. So that no pair is ever further apart,
//! the control thread clears estimates older than 12 hours once a minute ([`expire`]): under
//! any accepted τ (at most an hour) they have decayed to `e^-12` of their value, and a
//! cleared estimate costs nothing idle, which is what a fully decayed one costs. Between two
//! clears, differences beyond 19.5 hours also count the older estimate as decayed.
//!
//! # Invariants
//!
//! * Lock-free and allocation-free: one relaxed atomic word per estimate; a pick reads it (and
//!   computes one `exp`), a report writes it. Concurrent reports may lose one another's
//!   update (last writer wins): that only blurs a heuristic, never corrupts it (every stored
//!   estimate is a finite, non-negative `f32`).
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

/// Nanoseconds per time unit of the word (2^16).
const UNIT_SHIFT: u32 = 16;

/// Beyond this many units apart (2^30, about 19.5 hours), the older of two estimates counts as
/// fully decayed: within the 39-hour window where wrapping differences are exact, and far
/// past any accepted τ.
const STALE_UNITS: i64 = 1 << 30;

/// Nanoseconds on a monotonic clock with a process-wide origin.
#[inline]
pub(crate) fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The word's clock at `ns` nanoseconds (wrapping).
#[inline]
fn units(ns: u64) -> u32 {
    (ns >> UNIT_SHIFT) as u32
}

/// τ of one service, in the word's time units (positive).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Decay(f64);

impl Decay {
    pub(crate) fn new(tau: Duration) -> Decay {
        Decay((tau.as_nanos() as f64 / f64::from(1u32 << UNIT_SHIFT)).max(1e-3))
    }

    /// `exp(−elapsed/τ)` for `elapsed` units (saturating at 0 for very old estimates).
    #[inline]
    fn weight(self, elapsed: i64) -> f64 {
        if elapsed >= STALE_UNITS {
            return 0.0;
        }
        (-(elapsed.max(0) as f64) / self.0).exp()
    }
}

#[inline]
fn unpack(word: u64) -> (f64, u32) {
    (f64::from(f32::from_bits((word >> 32) as u32)), word as u32)
}

#[inline]
fn pack(rtt_ns: f64, at: u32) -> u64 {
    (u64::from((rtt_ns as f32).to_bits()) << 32) | u64::from(at)
}

/// Units from `from` to `to`, from their wrapping difference.
#[inline]
fn elapsed(from: u32, to: u32) -> i64 {
    i64::from(to.wrapping_sub(from) as i32)
}

/// The estimate in `word` at `now_ns` (decayed since its last update); 0 before the first
/// sample.
pub(crate) fn estimate_ns(word: &AtomicU64, decay: Decay, now_ns: u64) -> f64 {
    let (rtt, at) = unpack(word.load(Ordering::Relaxed));
    if rtt == 0.0 {
        return 0.0;
    }
    rtt * decay.weight(elapsed(at, units(now_ns)))
}

/// Takes in one request's latency (`None`: a failure that reported none); a failure
/// (`success: false`) restores or raises the estimate, never lowers it (see the module docs).
pub(crate) fn observe(word: &AtomicU64, decay: Decay, latency: Option<Duration>, success: bool, now_ns: u64) {
    if latency.is_none() && success {
        return;
    }
    let sample = latency.map_or(0.0, |l| (l.as_nanos() as f64).max(1.0));
    let now = units(now_ns);
    let (stored, at) = unpack(word.load(Ordering::Relaxed));
    let w = decay.weight(elapsed(at, now));
    let current = stored * w;
    let next = if !success {
        // A failure says nothing good about the endpoint: back to its last measure (not the
        // faded value, which a fast-failing endpoint would otherwise keep winning with), or
        // the failed-probe estimate if it has none, or slower.
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
    let next = next.min(f64::from(f32::MAX));
    if next.is_finite() && next > 0.0 {
        word.store(pack(next, now), Ordering::Relaxed);
    }
}

/// Clears the estimate in `word` if its last update is more than 12 hours before `now_ns`
/// (it has decayed to nothing; see the module docs). Returns whether it did.
pub(crate) fn expire(word: &AtomicU64, now_ns: u64) -> bool {
    const OLD: i64 = (12 * 3_600 * 1_000_000_000) >> UNIT_SHIFT;
    let current = word.load(Ordering::Relaxed);
    let (rtt, at) = unpack(current);
    if rtt == 0.0 || elapsed(at, units(now_ns)) <= OLD {
        return false;
    }
    // A report racing this wins or loses as any two racing reports do.
    word.compare_exchange(current, 0, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Whether candidate `b` costs less per unit of weight than `a`, each given as (estimate
/// word, requests in flight, weight): `cost(b)/w_b < cost(a)/w_a` with
/// `cost = estimate decayed to now × (in flight + 1)`.
///
/// Both estimates decay toward zero at the same rate, so "now" cancels out of the
/// comparison: `e_b·exp(−(now−t_b)/τ) / e_a·exp(−(now−t_a)/τ) = (e_b/e_a)·exp((t_b−t_a)/τ)`.
/// The pick reads no clock and computes one `exp`. An unmeasured candidate costs 0 idle and
/// [`UNMEASURED_BUSY_COST`] busy. Ties keep `a`.
#[inline]
pub(crate) fn b_is_cheaper(a: (u64, u64, u32), b: (u64, u64, u32), decay: Decay) -> bool {
    let ((ra, ta), ia, wa) = (unpack(a.0), a.1, f64::from(a.2));
    let ((rb, tb), ib, wb) = (unpack(b.0), b.1, f64::from(b.2));
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
    // exp((t_b − t_a)/τ), from the signed difference (both share τ per service). A very old
    // estimate has decayed to nothing: it wins against any recent one.
    let dt = elapsed(ta, tb);
    if dt >= STALE_UNITS {
        return false; // a is stale: a costs ~0
    }
    if dt <= -STALE_UNITS {
        return true; // b is stale
    }
    let relative = (dt as f64 / decay.0).exp();
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

    fn cost(word: &AtomicU64, decay: Decay, in_flight: u64, now: u64) -> f64 {
        let e = estimate_ns(word, decay, now);
        if unpack(word.load(Ordering::Relaxed)).0 == 0.0 {
            return unmeasured_cost(in_flight);
        }
        e * (in_flight as f64 + 1.0)
    }

    fn fresh() -> AtomicU64 {
        AtomicU64::new(0)
    }

    fn word(w: &AtomicU64) -> u64 {
        w.load(Ordering::Relaxed)
    }

    /// Relative difference under `f32` rounding.
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn unmeasured_endpoints_get_one_probe() {
        let d = Decay::new(Duration::from_secs(10));
        let (e, f) = (fresh(), fresh());
        let now = now_ns();
        assert_eq!(estimate_ns(&e, d, now), 0.0);
        assert_eq!(cost(&e, d, 0, now), 0.0);
        assert_eq!(cost(&e, d, 1, now), UNMEASURED_BUSY_COST + 1.0);
        // Busy unmeasured endpoints compare by requests in flight.
        assert!(b_is_cheaper((word(&e), 5, 1), (word(&f), 1, 1), d));
        assert!(!b_is_cheaper((word(&e), 1, 1), (word(&f), 5, 1), d));
        // A measured one, however slow and loaded, beats a busy unmeasured one.
        observe(&f, d, Some(Duration::from_secs(30)), true, now);
        assert!(b_is_cheaper((word(&e), 1, 1), (word(&f), 100, 1), d));
    }

    #[test]
    fn a_slower_sample_is_the_new_peak_and_faster_ones_pull_it_down_over_time() {
        let d = Decay::new(Duration::from_millis(100));
        let e = fresh();
        let t0 = now_ns();
        observe(&e, d, Some(Duration::from_millis(2)), true, t0);
        assert!(close(estimate_ns(&e, d, t0), 2.0 * MS as f64));
        // A peak replaces the estimate at once.
        observe(&e, d, Some(Duration::from_millis(50)), true, t0 + MS);
        assert!(close(estimate_ns(&e, d, t0 + MS), 50.0 * MS as f64));
        // A fast sample right after barely moves it; one τ later it moves it most of the way
        // (and the estimate itself decayed meanwhile).
        observe(&e, d, Some(Duration::from_millis(1)), true, t0 + MS);
        assert!(estimate_ns(&e, d, t0 + MS) > 49.0 * MS as f64);
        observe(&e, d, Some(Duration::from_millis(1)), true, t0 + 101 * MS);
        let after = estimate_ns(&e, d, t0 + 101 * MS);
        assert!(after < 10.0 * MS as f64 && after > 1.0 * MS as f64, "{after}");
    }

    #[test]
    fn the_estimate_decays_toward_zero_while_idle() {
        let d = Decay::new(Duration::from_millis(100));
        let e = fresh();
        let t0 = now_ns();
        observe(&e, d, Some(Duration::from_millis(40)), true, t0);
        let one_tau = estimate_ns(&e, d, t0 + 100 * MS);
        // Within the clock's 65.5 µs resolution of one τ.
        assert!(
            (one_tau / (40.0 * MS as f64) - (-1.0f64).exp()).abs() < 1e-3,
            "{one_tau}"
        );
        assert!(estimate_ns(&e, d, t0 + 2_000 * MS) < 0.001 * MS as f64);
        // Cost grows with the requests in flight.
        assert!(close(cost(&e, d, 3, t0), 4.0 * 40.0 * MS as f64));
    }

    #[test]
    fn failures_restore_or_raise_the_estimate() {
        let d = Decay::new(Duration::from_secs(10));
        let e = fresh();
        let t0 = now_ns();
        observe(&e, d, Some(Duration::from_millis(20)), true, t0);
        // Long idle: the estimate faded to almost nothing; a fast failure restores it.
        assert!(estimate_ns(&e, d, t0 + 100_000 * MS) < 0.001 * MS as f64);
        observe(&e, d, Some(Duration::from_micros(10)), false, t0 + 100_000 * MS);
        assert!(close(estimate_ns(&e, d, t0 + 100_000 * MS), 20.0 * MS as f64));
        // A failure without a latency does the same.
        observe(&e, d, None, false, t0 + 200_000 * MS);
        assert!(close(estimate_ns(&e, d, t0 + 200_000 * MS), 20.0 * MS as f64));
        // A failure before any success: the failed-probe estimate.
        let probe = fresh();
        observe(&probe, d, None, false, t0);
        assert!(close(
            estimate_ns(&probe, d, t0),
            FAILED_PROBE_ESTIMATE.as_nanos() as f64
        ));
        // A slower failure raises it.
        observe(&e, d, Some(Duration::from_millis(80)), false, t0 + 200_002 * MS);
        assert!(close(estimate_ns(&e, d, t0 + 200_002 * MS), 80.0 * MS as f64));
        // A success without a latency changes nothing.
        let before = word(&e);
        observe(&e, d, None, true, t0 + 300_000 * MS);
        assert_eq!(word(&e), before);
    }

    #[test]
    fn the_clockless_comparison_agrees_with_the_costs_at_any_time() {
        let d = Decay::new(Duration::from_millis(100));
        let t0 = now_ns();
        let (a, b) = (fresh(), fresh());
        // Idle unmeasured beats measured; busy unmeasured loses.
        observe(&a, d, Some(Duration::from_millis(5)), true, t0);
        assert!(b_is_cheaper((word(&a), 0, 1), (word(&b), 0, 1), d));
        assert!(!b_is_cheaper((word(&a), 0, 1), (word(&b), 1, 1), d));
        // Both measured, updated at different times: the decision matches the costs computed
        // at several later instants (it does not depend on the instant).
        observe(&b, d, Some(Duration::from_millis(3)), true, t0 + 150 * MS);
        for (ia, ib, wa, wb) in [
            (0, 0, 1, 1),
            (0, 1, 1, 1),
            (2, 0, 1, 1),
            (0, 0, 3, 1),
            (1, 4, 1, 5),
        ] {
            for later in [150, 400, 2_000] {
                let now = t0 + later * MS;
                let by_cost = cost(&b, d, ib, now) * f64::from(wa) < cost(&a, d, ia, now) * f64::from(wb);
                assert_eq!(
                    b_is_cheaper((word(&a), ia, wa), (word(&b), ib, wb), d),
                    by_cost,
                    "in flight {ia}/{ib}, weights {wa}/{wb}, at +{later} ms"
                );
            }
        }
    }

    #[test]
    fn a_day_old_estimate_counts_as_decayed_even_across_the_clock_wrap() {
        let d = Decay::new(Duration::from_secs(3600));
        let (old, recent) = (fresh(), fresh());
        let t0 = now_ns();
        observe(&old, d, Some(Duration::from_secs(1)), true, t0);
        // 20 hours later (past the stale bound), and again 100 hours later (the 32-bit clock
        // wrapped once): the old one costs ~0 and wins.
        for later_hours in [20u64, 100] {
            let later = t0 + later_hours * 3_600 * 1_000_000_000;
            observe(&recent, d, Some(Duration::from_millis(1)), true, later);
            assert!(
                !b_is_cheaper((word(&old), 0, 1), (word(&recent), 0, 1), d),
                "{later_hours} h: the stale estimate must win"
            );
            assert!(b_is_cheaper((word(&recent), 0, 1), (word(&old), 0, 1), d));
        }
    }

    #[test]
    fn estimates_older_than_twelve_hours_are_cleared() {
        let d = Decay::new(Duration::from_secs(3600));
        let e = fresh();
        let t0 = now_ns();
        observe(&e, d, Some(Duration::from_millis(5)), true, t0);
        assert!(!expire(&e, t0 + 11 * 3_600 * 1_000_000_000));
        assert!(expire(&e, t0 + 13 * 3_600 * 1_000_000_000));
        assert_eq!(word(&e), 0);
        assert!(
            !expire(&e, t0 + 14 * 3_600 * 1_000_000_000),
            "nothing left to clear"
        );
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let d = Decay::new(Duration::from_nanos(1));
        let e = fresh();
        observe(&e, d, Some(Duration::MAX), true, now_ns());
        assert!(estimate_ns(&e, d, now_ns()).is_finite());
        observe(&e, d, Some(Duration::ZERO), true, u64::MAX);
        assert!(cost(&e, d, u64::MAX, u64::MAX).is_finite());
        let idle = fresh();
        let d = Decay::new(Duration::from_secs(3600));
        observe(&idle, d, Some(Duration::ZERO), true, 0);
        assert!(estimate_ns(&idle, d, now_ns()) >= 0.0);
    }
}
