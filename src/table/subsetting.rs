//! Deterministic subsetting (Site Reliability Engineering, ch. 20, "Load Balancing in the
//! Datacenter"): in a fleet of clients numbered `0, 1, 2, ...`, each client routes to a
//! subset of `k` of a service's `n` endpoints, and the fleet covers every endpoint evenly.
//!
//! The endpoints are split into `c = ceil(n / k)` subsets of (nearly) equal size. Clients
//! come in *rounds* of `c`: client `id` is in round `id / c` and takes subset `id % c` of that
//! round's order of the endpoints. So within a round every endpoint is in exactly one
//! subset, and each round's clients load all endpoints alike. Rounds differ in order so that
//! the remainders of uneven splits, and the endpoints that subsets share, vary.
//!
//! Two choices differ from the book's listing, both for stability across a fleet and across
//! changes:
//!
//! * The round's order is not a seeded shuffle (which depends on the RNG's algorithm and
//!   moves every endpoint when one leaves) but the endpoints sorted by XXH3 of their identity
//!   (hash key or address) seeded by the round: a pure function of the set, the same in every
//!   process and version, in which removing an endpoint keeps the others' relative order.
//! * `c = ceil(n / k)` with subsets cut at `floor(i × n / c)` (sizes differ by at most one),
//!   not `floor(n / k)` with a remainder left out: removing one endpoint then changes `c` only
//!   when `n` crosses a multiple of `k`, instead of reshuffling every round at each such step.
//!
//! `tests/locality_tests.rs` simulates 1,000 clients over 300 endpoints with `k = 20` and
//! asserts the spread and the churn of one removal (numbers in
//! `docs::locality_and_priority`).
#![deny(unsafe_code)]

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Which of `identities` (one per member, any order; distinct) client `client_id` routes to
/// with subsets of `k`: a mask in the same order. Everything when `n <= k` or `k == 0`.
pub(crate) fn subset_mask(identities: &[&[u8]], client_id: u64, k: u32) -> Vec<bool> {
    let n = identities.len();
    let k = k as usize;
    if k == 0 || n <= k {
        return vec![true; n];
    }
    let count = n.div_ceil(k) as u64;
    let round = client_id / count;
    let index = (client_id % count) as usize;
    let mut order: Vec<(u64, usize)> = identities
        .iter()
        .enumerate()
        .map(|(i, id)| (xxh3_64_with_seed(id, round), i))
        .collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| identities[a.1].cmp(identities[b.1])));
    let count = count as usize;
    let start = index * n / count;
    let end = (index + 1) * n / count;
    let mut mask = vec![false; n];
    for &(_, i) in &order[start..end] {
        mask[i] = true;
    }
    mask
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("backend-{i}").into_bytes()).collect()
    }

    #[test]
    fn a_round_covers_every_endpoint_once() {
        let ids = ids(300);
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let mut seen = vec![0u32; 300];
        for client in 0..15 {
            let mask = subset_mask(&refs, client, 20);
            assert_eq!(mask.iter().filter(|&&m| m).count(), 20);
            for (i, &m) in mask.iter().enumerate() {
                seen[i] += u32::from(m);
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
    }

    #[test]
    fn small_services_are_used_whole_and_order_does_not_matter() {
        let ids = ids(10);
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        assert_eq!(subset_mask(&refs, 3, 20), vec![true; 10]);
        assert_eq!(subset_mask(&refs, 3, 0), vec![true; 10]);
        let ids = self::ids(50);
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let mut reversed = refs.clone();
        reversed.reverse();
        let a = subset_mask(&refs, 7, 8);
        let mut b = subset_mask(&reversed, 7, 8);
        b.reverse();
        assert_eq!(a, b, "a function of the set, not of its order");
    }
}
