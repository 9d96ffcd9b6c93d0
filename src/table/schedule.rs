//! Smooth weighted round robin, precomputed.
//!
//! The control plane turns the routable endpoints' weights into a *schedule*: a sequence in
//! which endpoint `i` appears `w_i` times (weights divided by their greatest common divisor),
//! ordered by earliest deadline first with deadlines at the centre of each endpoint's
//! intervals, `(k + 1/2) / w_i` (ties to the lower index). Every window of the rotation holds
//! each endpoint within two picks of its exact share (weights 5:1:1 give `a a a b c a a`), so a
//! 95/5 canary split sends the canary one request in every 20, never 5 in a row. A pick is
//! one `fetch_add` on the slot's cursor and one read of the schedule, `O(1)` whatever the
//! weights; building costs `O(W log n)` for a schedule of length `W`.
//!
//! Schedules are capped at `max(2^18, 4n)` entries; weights whose reduced sum exceeds the cap
//! are scaled down proportionally (each keeps at least one entry), which bounds memory at
//! 1 MiB for ordinary services at a precision of better than 0.001 % per endpoint.
#![deny(unsafe_code)]

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

/// Schedule length cap for services with fewer than 65,536 routable endpoints.
const BASE_CAP: u64 = 1 << 18;

/// A precomputed smooth weighted rotation over the routable endpoints.
pub(crate) struct Schedule {
    order: Box<[u32]>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Deadline {
    /// Deadline `(2k + 1) / (2 w)` as a fraction.
    num: u64,
    den: u64,
    index: u32,
}

impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> Ordering {
        // Min-heap on the deadline, ties to the lower index: reverse for BinaryHeap.
        let lhs = u128::from(self.num) * u128::from(other.den);
        let rhs = u128::from(other.num) * u128::from(self.den);
        rhs.cmp(&lhs).then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Reduces weights by their gcd and scales them under the cap.
fn reduced_weights(weights: &[u32]) -> Vec<u64> {
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w))).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
    let total: u64 = reduced.iter().sum();
    let cap = BASE_CAP.max(4 * weights.len() as u64);
    if total > cap {
        for w in &mut reduced {
            *w = (*w * cap / total).max(1);
        }
    }
    reduced
}

impl Schedule {
    /// The schedule for `weights` (all >= 1), or `None` when all weights are equal (plain
    /// round robin is then the same rotation without the table).
    pub(crate) fn build(weights: &[u32]) -> Option<Schedule> {
        let first = *weights.first()?;
        if weights.iter().all(|&w| w == first) {
            return None;
        }
        let reduced = reduced_weights(weights);
        let total: u64 = reduced.iter().sum();
        let mut order = Vec::with_capacity(total as usize);
        let mut heap: BinaryHeap<Deadline> = reduced
            .iter()
            .enumerate()
            .map(|(i, &w)| Deadline {
                num: 1,
                den: 2 * w,
                index: i as u32,
            })
            .collect();
        let mut remaining = reduced.clone();
        while let Some(mut d) = heap.pop() {
            order.push(d.index);
            let left = &mut remaining[d.index as usize];
            *left -= 1;
            if *left > 0 {
                d.num += 2;
                heap.push(d);
            }
        }
        Some(Schedule {
            order: order.into_boxed_slice(),
        })
    }

    /// Routable index for `ticket`.
    #[inline]
    pub(crate) fn index(&self, ticket: usize) -> usize {
        self.order[ticket % self.order.len()] as usize
    }

    /// Length of one full rotation.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("len", &self.order.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters(s: &Schedule) -> String {
        (0..s.len()).map(|t| (b'a' + s.index(t) as u8) as char).collect()
    }

    #[test]
    fn equal_weights_need_no_schedule() {
        assert!(Schedule::build(&[3, 3, 3]).is_none());
        assert!(Schedule::build(&[]).is_none());
    }

    #[test]
    fn centred_deadlines() {
        let s = Schedule::build(&[5, 1, 1]).unwrap();
        assert_eq!(letters(&s), "aaabcaa");
    }

    /// Every window of every length holds each endpoint within two of its exact share.
    fn assert_smooth(weights: &[u32]) {
        let s = Schedule::build(weights).unwrap();
        let reduced = reduced_weights(weights);
        let total: u64 = reduced.iter().sum();
        let len = s.len();
        for window in 1..=len {
            for start in 0..len {
                let mut counts = vec![0u64; weights.len()];
                for t in start..start + window {
                    counts[s.index(t)] += 1;
                }
                for (i, &c) in counts.iter().enumerate() {
                    let exact = window as f64 * reduced[i] as f64 / total as f64;
                    assert!(
                        (c as f64 - exact).abs() <= 2.0,
                        "{weights:?} window {window}@{start}: {c} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn smooth_windows() {
        assert_smooth(&[5, 1, 1]);
        assert_smooth(&[95, 5]);
        assert_smooth(&[7, 3, 2, 1]);
        assert_smooth(&[10, 10, 1]);
    }

    #[test]
    fn canary_is_spread() {
        let s = Schedule::build(&[95, 5]).unwrap();
        assert_eq!(s.len(), 20);
        let canary: Vec<usize> = (0..20).filter(|&t| s.index(t) == 1).collect();
        assert_eq!(canary.len(), 1);
        // Exact proportions over whole rotations.
        let picks = 100_000;
        let b = (0..picks).filter(|&t| s.index(t) == 1).count();
        assert_eq!(b, 5_000);
    }

    #[test]
    fn counts_match_reduced_weights() {
        let w = [6, 4, 2, 10];
        let s = Schedule::build(&w).unwrap();
        assert_eq!(s.len(), 11);
        let mut counts = [0; 4];
        for t in 0..s.len() {
            counts[s.index(t)] += 1;
        }
        assert_eq!(counts, [3, 2, 1, 5]);
        // No endpoint appears twice in a row when another has at least its share.
        for t in 0..s.len() {
            assert!(!(s.index(t) == 1 && s.index(t + 1) == 1));
        }
    }

    #[test]
    fn huge_weights_are_capped() {
        let w = [1_000_000, 999_999, 1];
        let s = Schedule::build(&w).unwrap();
        assert!(s.len() as u64 <= BASE_CAP + 3);
        assert!((0..s.len()).any(|t| s.index(t) == 2));
    }
}
