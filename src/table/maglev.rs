//! Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016): a lookup table of prime size `M` filled from each endpoint's
//! preference list.
//!
//! Each endpoint `i` derives, from XXH3 of its identity alone ([`RingId`]: its hash key or its
//! address), an `offset_i ∈ [0, M)` and a `skip_i ∈ [1, M)`; its preference list is
//! `perm_i(j) = (offset_i + j·skip_i) mod M`, a permutation of the table because `M` is prime.
//! Endpoints take turns, in identity order, each claiming the next entry of its list that is
//! still free, until the table is full. With weights, an endpoint of weight `w` takes a turn
//! in round `r` only while `w · r ≥ w_max · (turns + 1)` (the weighted population of Envoy's
//! implementation), so entries are claimed in proportion to weight.
//!
//! A key's owner is the endpoint of entry `reduce(hash, M)` (Lemire's multiply-shift, the
//! same reduction the ring's fallback uses): one multiply and a 1-, 2- or 4-byte read.
//!
//! # Against the ring
//!
//! Each endpoint gets within one entry of `M / n` (the turns guarantee it), so Maglev
//! balances better than the ring's independent draws (±1.2 %, one standard deviation, at
//! 65,536 slots and 10 endpoints). The price is disruption: when the set changes, the endpoints that stay also
//! trade a few entries among themselves (the paper's "minimal disruption" is approximate),
//! where the ring moves only the keys of the endpoint that left or to the one that joined.
//! `tests/maglev_tests.rs` measures both, and BENCHMARKS.md records the figures.
//!
//! # Invariants
//!
//! * The table is a pure function of the set of (identity, weight) pairs and `M`: no seed,
//!   registration order or process enters it (pinned by golden vectors in
//!   `tests/hash_golden.rs`).
//! * `M` is prime (validated by the config), so every preference list visits every entry and
//!   the build ends.
#![deny(unsafe_code)]

use std::fmt;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::ring::{Owners, RingId, id_bytes, reduce};
use crate::config::is_prime;
#[cfg(test)]
use crate::config::{DEFAULT_MAGLEV_TABLE_SIZE, MAX_MAGLEV_TABLE_SIZE, MIN_MAGLEV_TABLE_SIZE};

/// Seeds of the offset and skip hashes. Part of the mapping: never change them.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_2d6f; // "maglev-o"
const SKIP_SEED: u64 = 0x6d61_676c_6576_2d73; // "maglev-s"

/// One endpoint's preference list.
#[derive(Clone, Copy, Debug)]
struct Preference {
    offset: u64,
    skip: u64,
    /// Position in its list of the next entry to try.
    next: u64,
    weight: u64,
    turns: u64,
    /// Index in the caller's member list.
    owner: u32,
}

impl Preference {
    fn of(id: RingId<'_>, weight: u32, owner: u32, size: u64) -> Preference {
        let mut bytes = [0u8; 4 + super::ring::MAX_KEY_BYTES];
        let len = id_bytes(id, &mut bytes);
        let bytes = &bytes[..len];
        Preference {
            offset: xxh3_64_with_seed(bytes, OFFSET_SEED) % size,
            skip: xxh3_64_with_seed(bytes, SKIP_SEED) % (size - 1) + 1,
            next: 0,
            weight: u64::from(weight.max(1)),
            turns: 0,
            owner,
        }
    }

    #[inline]
    fn entry(&self, size: u64) -> usize {
        ((self.offset + self.next * self.skip) % size) as usize
    }
}

/// A Maglev lookup table over one service's members.
pub(crate) struct MaglevTable {
    size: u32,
    owners: Owners,
}

impl MaglevTable {
    /// Builds the table for `members` (the table's member order, each with its identity and
    /// weight; identities distinct) with `size` entries (a prime). Owners are indices into
    /// `members`. Costs `O(M log M)` on average (`O(M · n)` at worst, when the last free
    /// entries sit late in every list).
    pub(crate) fn build(members: &[(RingId<'_>, u32)], size: u32) -> MaglevTable {
        debug_assert!(is_prime(size), "{size} is not prime");
        let m = u64::from(size);
        let mut table = vec![super::ring::EMPTY; size as usize].into_boxed_slice();
        if !members.is_empty() {
            let mut order: Vec<usize> = (0..members.len()).collect();
            order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0));
            let mut prefs: Vec<Preference> = order
                .iter()
                .map(|&i| Preference::of(members[i].0, members[i].1, i as u32, m))
                .collect();
            let max_weight = prefs.iter().map(|p| p.weight).max().unwrap_or(1);
            let mut filled = 0u64;
            let mut round = 1u64;
            'fill: loop {
                for p in prefs.iter_mut() {
                    // Weighted population: a turn in this round only while the endpoint's
                    // claims stay at or below its share (the heaviest claims every round).
                    if p.weight * round < max_weight * (p.turns + 1) {
                        continue;
                    }
                    p.turns += 1;
                    let mut entry = p.entry(m);
                    while table[entry] != super::ring::EMPTY {
                        p.next += 1;
                        entry = p.entry(m);
                    }
                    table[entry] = p.owner;
                    p.next += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
                round += 1;
            }
        }
        MaglevTable {
            size,
            owners: Owners::from_wide(table, members.len()),
        }
    }

    /// Member index owning hash `h`, `None` for an empty table.
    #[cfg(any(test, fuzzing))]
    #[inline]
    pub(crate) fn owner(&self, h: u64) -> Option<usize> {
        self.owners.get(reduce(h, self.size as usize))
    }

    /// The owner of entry `e` (for the bounded-load walk).
    #[inline]
    pub(crate) fn owner_of_entry(&self, e: usize) -> Option<usize> {
        self.owners.get(e)
    }

    /// The entry of hash `h`.
    #[inline]
    pub(crate) fn entry_of(&self, h: u64) -> usize {
        reduce(h, self.size as usize)
    }

    /// Number of entries (`M`).
    #[inline]
    pub(crate) fn size(&self) -> usize {
        self.size as usize
    }

    /// How many entries each member owns.
    #[cfg(test)]
    pub(crate) fn shares(&self, members: usize) -> Vec<usize> {
        let mut counts = vec![0; members];
        for e in 0..self.size() {
            if let Some(o) = self.owners.get(e) {
                counts[o] += 1;
            }
        }
        counts
    }
}

impl fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaglevTable").field("size", &self.size).finish()
    }
}

/// Fuzzing access to the table builder (built only under `cfg(fuzzing)`).
#[cfg(fuzzing)]
#[derive(Debug)]
pub struct FuzzMaglev(MaglevTable);

#[cfg(fuzzing)]
impl FuzzMaglev {
    /// Builds a table over `members` (distinct addresses) with `size` entries (a prime).
    pub fn build(members: &[(std::net::SocketAddr, u32)], size: u32) -> Self {
        let ids: Vec<(RingId<'_>, u32)> = members.iter().map(|&(a, w)| (RingId::Address(a), w)).collect();
        Self(MaglevTable::build(&ids, size))
    }

    /// The member index owning entry `e`.
    pub fn owner_of_entry(&self, e: usize) -> Option<usize> {
        self.0.owner_of_entry(e)
    }

    /// The preference list entry `j` of a member, as the builder computes it.
    pub fn preference(member: std::net::SocketAddr, size: u32, j: u64) -> usize {
        let mut p = Preference::of(RingId::Address(member), 1, 0, u64::from(size));
        p.next = j;
        p.entry(u64::from(size))
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn members(n: usize) -> Vec<(RingId<'static>, u32)> {
        (0..n)
            .map(|i| {
                let a: SocketAddr = format!("127.0.{}.{}:{}", i / 250, i % 250 + 1, 9000 + i % 7)
                    .parse()
                    .unwrap();
                (RingId::Address(a), 1)
            })
            .collect()
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(is_prime(MIN_MAGLEV_TABLE_SIZE));
        assert!(is_prime(MAX_MAGLEV_TABLE_SIZE));
        assert!(!is_prime(65_536));
    }

    #[test]
    fn every_entry_is_owned_and_shares_are_within_one_entry() {
        for n in [1usize, 2, 3, 10, 97] {
            let m = members(n);
            let table = MaglevTable::build(&m, 65_537);
            let shares = table.shares(n);
            assert_eq!(shares.iter().sum::<usize>(), 65_537);
            let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(hi - lo <= 1, "n={n}: {lo}..{hi}");
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut m = members(4);
        for (i, e) in m.iter_mut().enumerate() {
            e.1 = 1 + i as u32; // 1:2:3:4
        }
        let table = MaglevTable::build(&m, 65_537);
        let shares = table.shares(4);
        for (i, &s) in shares.iter().enumerate() {
            let expected = 65_537.0 * (1 + i) as f64 / 10.0;
            assert!(
                (s as f64 / expected - 1.0).abs() < 0.01,
                "member {i}: {s} vs {expected}"
            );
        }
    }

    #[test]
    fn the_table_does_not_depend_on_member_order() {
        let m = members(12);
        let a = MaglevTable::build(&m, 4_099);
        let mut reversed = m.clone();
        reversed.reverse();
        let b = MaglevTable::build(&reversed, 4_099);
        for e in 0..4_099 {
            let (oa, ob) = (a.owner_of_entry(e).unwrap(), b.owner_of_entry(e).unwrap());
            assert_eq!(m[oa].0, reversed[ob].0, "entry {e}");
        }
    }

    #[test]
    fn an_empty_table_has_no_owner() {
        let table = MaglevTable::build(&[], 251);
        assert_eq!(table.owner(42), None);
    }
}
