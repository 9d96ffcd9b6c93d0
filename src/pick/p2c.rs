//! Least connections by the power of two choices (Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 2001; the policy behind tower's `p2c` and Envoy's
//! `LEAST_REQUEST`).
//!
//! Two *distinct* endpoints are drawn uniformly and the one with fewer requests in flight per
//! unit of weight wins. Scanning all endpoints for the global minimum would cost `O(n)` and
//! send every concurrent caller to the same idle endpoint (herding); two random candidates
//! cost `O(1)` and spread ties, because a tie keeps the first candidate, which is itself
//! random. With weights, `(in_flight + 1) / weight` is compared, so an idle heavy endpoint
//! beats an idle light one and load follows weight.
#![deny(unsafe_code)]

use crate::sync::arena::in_flight;
use crate::sync::atomic::Ordering;
use crate::sync::random_below;
use crate::table::Members;
use crate::table::estimate::b_is_cheaper;

/// The power of two choices over `view` (`len >= 1`): two distinct entries drawn uniformly,
/// and `b` of them if `b_wins(a, b)`, else `a` (so ties keep the first, which is itself
/// random).
#[inline]
fn choose_two(view: &Members, b_wins: impl FnOnce(usize, usize) -> bool) -> usize {
    let n = view.len();
    if n == 1 {
        return 0;
    }
    let a = random_below(n);
    let mut b = random_below(n - 1);
    if b >= a {
        b += 1;
    }
    debug_assert_ne!(a, b, "p2c candidates must differ");
    if b_wins(a, b) { b } else { a }
}

/// Whether `b` has fewer requests in flight than `a` per unit of weight:
/// `(lb + 1) / wb < (la + 1) / wa`, in integers (weights <= 1e8, loads < 2^24; u128 keeps
/// it exact regardless).
#[inline]
fn fewer_in_flight(la: u64, wa: u32, lb: u64, wb: u32) -> bool {
    u128::from(lb + 1) * u128::from(wa) < u128::from(la + 1) * u128::from(wb)
}

/// Requests in flight on entry `i` in `shard`. `Relaxed`: a load signal, stale by at most
/// the requests racing with this read.
#[inline]
fn load(view: &Members, i: usize, shard: usize) -> u64 {
    in_flight(view.load(i, shard).load(Ordering::Relaxed))
}

/// As [`index`], comparing each candidate's Peak-EWMA cost per unit of weight: its latency
/// estimate times one more than its requests in flight (see
/// [`estimate`](crate::table::estimate)).
#[inline]
pub(crate) fn index_by_cost(view: &Members, shard: usize, weighted: bool) -> usize {
    let Some(decay) = view.context().decay else {
        return index(view, shard, weighted); // not a Peak-EWMA table (not reached)
    };
    choose_two(view, |a, b| {
        let entries = view.entries();
        let (wa, wb) = if weighted {
            (entries[a].payload.weight(), entries[b].payload.weight())
        } else {
            (1, 1)
        };
        let ea = view.aux(a, shard).load(Ordering::Relaxed);
        let eb = view.aux(b, shard).load(Ordering::Relaxed);
        b_is_cheaper(
            (ea, load(view, a, shard), wa),
            (eb, load(view, b, shard), wb),
            decay,
        )
    })
}

/// Chooses between two distinct random entries of `view` (`len >= 1`) by the calling
/// thread's shard of counters, so the in-flight counts compared are this shard's (each shard
/// of threads balances its own requests, as each Envoy worker does; the sum over shards is
/// then balanced too, and no core reads lines another core is writing).
#[inline]
pub(crate) fn index(view: &Members, shard: usize, weighted: bool) -> usize {
    choose_two(view, |a, b| {
        let (la, lb) = (load(view, a, shard), load(view, b, shard));
        if weighted {
            let entries = view.entries();
            fewer_in_flight(la, entries[a].payload.weight(), lb, entries[b].payload.weight())
        } else {
            lb < la
        }
    })
}
