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

use super::peak_ewma::b_is_cheaper;
use crate::sync::{Arc, random_below};
use crate::table::Pin;

/// The power of two choices over `routable` (`len >= 1`): two distinct members drawn
/// uniformly, and `b` of them if `b_wins(a, b)`, else `a` (so ties keep the first, which is
/// itself random).
#[inline]
fn choose_two(routable: &[Arc<Pin>], b_wins: impl FnOnce(usize, usize) -> bool) -> usize {
    let n = routable.len();
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
/// `(lb + 1) / wb < (la + 1) / wa`, in integers (weights <= 1e6, loads < 2^40 in practice;
/// u128 keeps it exact regardless).
#[inline]
fn fewer_in_flight(la: u64, wa: u32, lb: u64, wb: u32) -> bool {
    u128::from(lb + 1) * u128::from(wa) < u128::from(la + 1) * u128::from(wb)
}

/// As [`index`], comparing each candidate's Peak-EWMA cost per unit of weight: its latency
/// estimate times one more than its requests in flight (see
/// [`peak_ewma`](super::peak_ewma)); a pin without an estimate counts its in-flight requests.
#[inline]
pub(crate) fn index_by_cost(routable: &[Arc<Pin>], weights: Option<&[u32]>) -> usize {
    choose_two(routable, |a, b| {
        let (pa, pb) = (&routable[a], &routable[b]);
        let (wa, wb) = weights.map_or((1, 1), |w| (w[a], w[b]));
        match (pa.rtt(), pb.rtt()) {
            (Some(ra), Some(rb)) => b_is_cheaper((ra, pa.in_flight(), wa), (rb, pb.in_flight(), wb)),
            // Not a Peak-EWMA table (not reached): least connections.
            _ => fewer_in_flight(pa.in_flight(), wa, pb.in_flight(), wb),
        }
    })
}

/// Chooses between two distinct random members of `routable` (`len >= 1`): the calling
/// thread's shard of pins, so the in-flight counts compared are this shard's (each shard of
/// threads balances its own requests, as each Envoy worker does; the sum over shards is
/// then balanced too, and no core reads lines another core is writing).
#[inline]
pub(crate) fn index(routable: &[Arc<Pin>], weights: Option<&[u32]>) -> usize {
    choose_two(routable, |a, b| {
        let (la, lb) = (routable[a].in_flight(), routable[b].in_flight());
        match weights {
            None => lb < la,
            Some(w) => fewer_in_flight(la, w[a], lb, w[b]),
        }
    })
}
