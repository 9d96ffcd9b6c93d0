//! The consistent-hash ring: keys to slots to endpoints.
//!
//! The design (why not plain jump hash, the slot ring owned by rendezvous over permutations,
//! how it is built in `O(S ln S)`, the health fallback, the limits) is written up for users in
//! [`crate::docs::consistent_hashing`]; this module implements it:
//!
//! * [`hash_key`]: XXH3-64 of the key bytes (seed 0), part of the compatibility promise;
//! * [`HashRing::build`]: the rounds construction, finished by the definition;
//! * [`owner_without_ring`]: the definition itself, used before a ring exists and by tests;
//! * [`probe_hash`], [`reduce`]: the deterministic fallback when an owner is not routable.
#![deny(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Probes after the owner before the final fallback.
pub const FALLBACK_PROBES: u32 = 8;

/// Largest total of virtual members (sum of weights) in one ring.
pub const MAX_VIRTUAL_MEMBERS: u64 = 1 << 20;

/// Seed for virtual-member permutations. Part of the mapping: never change it.
const MEMBER_SEED: u64 = 0x7461_692d_6c62_2d31; // "tai-lb-1"

/// Rings over at most this many virtual members are filled directly (cheaper than rounds).
const DIRECT_FILL_MEMBERS: usize = 12;

const EMPTY: u32 = u32::MAX;

/// Hashes a consistent-hash key: XXH3-64 with seed 0.
///
/// This is the mapping's entry point and part of its compatibility promise: the same bytes
/// give the same value on every platform, process and version of this crate.
///
/// ```
/// assert_eq!(tai_loadbalancer::hash_key(b"user-123"), tai_loadbalancer::hash_key("user-123"));
/// ```
#[inline]
pub fn hash_key(key: impl AsRef<[u8]>) -> u64 {
    xxh3_64(key.as_ref())
}

/// SplitMix64 finaliser: a fixed bijective mixer for deriving probe hashes from a key hash.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash used by probe `i` (0 = the key hash itself).
#[inline]
pub(crate) fn probe_hash(h: u64, i: u32) -> u64 {
    if i == 0 {
        h
    } else {
        mix64(h.wrapping_add(u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }
}

/// Maps a hash uniformly onto `0..n` (Lemire's multiply-shift; `n` > 0).
#[inline]
pub(crate) fn reduce(h: u64, n: usize) -> usize {
    ((u128::from(h) * n as u128) >> 64) as usize
}

/// The bytes that identify an address on the ring: IP octets then big-endian port.
fn address_bytes(addr: SocketAddr, buf: &mut [u8; 22]) -> usize {
    let n = match addr.ip() {
        IpAddr::V4(ip) => {
            buf[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            buf[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    n + 2
}

/// One virtual member's permutation parameters.
#[derive(Clone, Copy, Debug)]
struct Perm {
    offset: u32,
    skip: u32,
}

impl Perm {
    fn of(addr: SocketAddr, v: u32, mask: u32) -> Perm {
        let mut buf = [0u8; 22];
        let len = address_bytes(addr, &mut buf);
        let mut id = [0u8; 26];
        id[..len].copy_from_slice(&buf[..len]);
        id[len..len + 4].copy_from_slice(&v.to_le_bytes());
        let h = xxh3_64_with_seed(&id[..len + 4], MEMBER_SEED);
        Perm {
            offset: (h as u32) & mask,
            skip: ((h >> 32) as u32 & mask) | 1,
        }
    }

    /// Position of `slot` in this permutation.
    #[inline]
    fn position(self, slot: u32, inverse_skip: u32, mask: u32) -> u32 {
        slot.wrapping_sub(self.offset).wrapping_mul(inverse_skip) & mask
    }
}

/// Inverse of an odd number modulo 2^32 (Newton's iteration doubles the correct bits).
fn inverse_odd(a: u32) -> u32 {
    debug_assert!(a & 1 == 1);
    let mut x = a; // correct to 3 bits
    for _ in 0..5 {
        x = x.wrapping_mul(2u32.wrapping_sub(a.wrapping_mul(x)));
    }
    x
}

/// Virtual members for an endpoint of weight `w` in a ring whose weights sum to `total`
/// (scaled down when the sum is above the cap; every endpoint keeps at least one).
fn virtual_count(w: u32, total: u64) -> u32 {
    if total <= MAX_VIRTUAL_MEMBERS {
        w
    } else {
        (u64::from(w) * MAX_VIRTUAL_MEMBERS / total).max(1) as u32
    }
}

/// The virtual members of a ring, in tie-break order: by member (address order), then `v`.
struct VirtualMembers {
    perms: Vec<Perm>,
    inverses: Vec<u32>,
    owners: Vec<u32>,
}

impl VirtualMembers {
    fn new(members: &[(SocketAddr, u32)], mask: u32) -> Self {
        let weight_sum: u64 = members.iter().map(|&(_, w)| u64::from(w)).sum();
        let total = weight_sum.min(MAX_VIRTUAL_MEMBERS + members.len() as u64) as usize;
        let mut vm = VirtualMembers {
            perms: Vec::with_capacity(total),
            inverses: Vec::with_capacity(total),
            owners: Vec::with_capacity(total),
        };
        for (index, &(addr, weight)) in members.iter().enumerate() {
            for v in 0..virtual_count(weight, weight_sum) {
                let perm = Perm::of(addr, v, mask);
                vm.perms.push(perm);
                vm.inverses.push(inverse_odd(perm.skip));
                vm.owners.push(index as u32);
            }
        }
        vm
    }

    /// The definition: the member listing `slot` earliest (first in order on ties).
    fn owner_of(&self, slot: u32, mask: u32) -> u32 {
        let mut best = (u32::MAX, EMPTY);
        for ((perm, &inv), &owner) in self.perms.iter().zip(&self.inverses).zip(&self.owners) {
            let pos = perm.position(slot, inv, mask);
            if pos < best.0 {
                best = (pos, owner);
            }
        }
        best.1
    }
}

/// Slot-to-member table of one service. Members are indexed in address order, as in the
/// table that carries the ring.
pub(crate) struct HashRing {
    shift: u32,
    owners: Owners,
}

/// Owners by slot: 2 bytes each while member indices fit (fewer than 65,535 members), which
/// halves the ring's memory and cache footprint; 4 bytes beyond.
enum Owners {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Owners {
    fn from_wide(owners: Box<[u32]>, members: usize) -> Owners {
        if members < usize::from(u16::MAX) {
            Owners::Narrow(
                owners
                    .iter()
                    .map(|&o| if o == EMPTY { u16::MAX } else { o as u16 })
                    .collect(),
            )
        } else {
            Owners::Wide(owners)
        }
    }

    fn len(&self) -> usize {
        match self {
            Owners::Narrow(o) => o.len(),
            Owners::Wide(o) => o.len(),
        }
    }

    #[inline]
    fn get(&self, slot: usize) -> Option<usize> {
        match self {
            Owners::Narrow(o) => match o[slot] {
                u16::MAX => None,
                x => Some(usize::from(x)),
            },
            Owners::Wide(o) => match o[slot] {
                EMPTY => None,
                x => Some(x as usize),
            },
        }
    }
}

impl HashRing {
    /// Builds the ring for `members` (address order, with weights) over `slots` slots
    /// (a power of two, validated by the config).
    pub(crate) fn build(members: &[(SocketAddr, u32)], slots: u32) -> HashRing {
        debug_assert!(slots.is_power_of_two() && slots >= 2);
        debug_assert!(
            members.windows(2).all(|w| w[0].0 < w[1].0),
            "members must be sorted"
        );
        let mask = slots - 1;
        let shift = 64 - slots.trailing_zeros();
        let mut owners = vec![EMPTY; slots as usize].into_boxed_slice();
        let ring = |owners| HashRing {
            shift,
            owners: Owners::from_wide(owners, members.len()),
        };
        if members.is_empty() {
            return ring(owners);
        }
        let vm = VirtualMembers::new(members, mask);
        let total = vm.perms.len();
        if total <= DIRECT_FILL_MEMBERS {
            for (slot, owner) in owners.iter_mut().enumerate() {
                *owner = vm.owner_of(slot as u32, mask);
            }
            return ring(owners);
        }
        // Rounds: round j, every member in tie-break order claims perm(j) if it is free, which
        // gives each slot to its earliest lister. Stop once so few slots are left that the
        // definition is cheaper than more rounds.
        let mut cursor: Vec<u32> = vm.perms.iter().map(|p| p.offset).collect();
        let mut free = slots as usize;
        let stop_at = (slots as usize / total).max(1);
        while free > stop_at {
            for ((cur, perm), &owner) in cursor.iter_mut().zip(&vm.perms).zip(&vm.owners) {
                let slot = *cur as usize;
                *cur = cur.wrapping_add(perm.skip) & mask;
                if owners[slot] == EMPTY {
                    owners[slot] = owner;
                    free -= 1;
                }
            }
        }
        if free > 0 {
            for (slot, owner) in owners.iter_mut().enumerate() {
                if *owner == EMPTY {
                    *owner = vm.owner_of(slot as u32, mask);
                }
            }
        }
        ring(owners)
    }

    /// Number of slots.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.owners.len()
    }

    /// The slot of hash `h`.
    #[inline]
    pub(crate) fn slot_of(&self, h: u64) -> usize {
        (h >> self.shift) as usize
    }

    /// Member index owning `slot`, `None` for an empty ring.
    #[inline]
    pub(crate) fn owner(&self, slot: usize) -> Option<usize> {
        self.owners.get(slot)
    }

    /// How many slots each member owns.
    #[cfg(test)]
    pub(crate) fn shares(&self, members: usize) -> Vec<usize> {
        let mut counts = vec![0; members];
        for slot in 0..self.owners.len() {
            if let Some(c) = self.owner(slot).and_then(|o| counts.get_mut(o)) {
                *c += 1;
            }
        }
        counts
    }
}

/// Owner of `slot` computed from the definition in `O(total weight)`, without a ring and
/// without allocating. `key(i)` gives member `i`'s address and weight (`i < len`, address
/// order).
///
/// Used on the data plane for a hash-keyed pick before the control plane has built the
/// service's ring; it returns exactly what the ring would.
pub(crate) fn owner_without_ring(
    len: usize,
    key: impl Fn(usize) -> (SocketAddr, u32),
    slots: u32,
    slot: u32,
) -> Option<usize> {
    let mask = slots - 1;
    let total: u64 = (0..len).map(|i| u64::from(key(i).1)).sum();
    let mut best = (u32::MAX, None);
    for index in 0..len {
        let (addr, weight) = key(index);
        for v in 0..virtual_count(weight, total) {
            let perm = Perm::of(addr, v, mask);
            let pos = perm.position(slot, inverse_odd(perm.skip), mask);
            if pos < best.0 {
                best = (pos, Some(index));
            }
        }
    }
    best.1
}

impl fmt::Debug for HashRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashRing")
            .field("slots", &self.owners.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<(SocketAddr, u32)> {
        let mut v: Vec<(SocketAddr, u32)> = (0..n)
            .map(|i| {
                (
                    format!("127.0.{}.{}:{}", i / 250, i % 250 + 1, 8000 + i % 7)
                        .parse()
                        .unwrap(),
                    1,
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn inverse_is_an_inverse() {
        for a in [1u32, 3, 5, 0xffff_ffff, 0x1234_5679, 65_535] {
            assert_eq!(a.wrapping_mul(inverse_odd(a)), 1);
        }
    }

    #[test]
    fn permutation_positions_invert() {
        let mask = (1 << 12) - 1;
        let p = Perm::of("127.0.0.1:80".parse().unwrap(), 3, mask);
        let inv = inverse_odd(p.skip);
        for j in [0u32, 1, 2, 77, 4095] {
            let slot = p.offset.wrapping_add(j.wrapping_mul(p.skip)) & mask;
            assert_eq!(p.position(slot, inv, mask), j);
        }
    }

    #[test]
    fn rounds_match_the_definition() {
        for n in [1, 2, 5, 13, 40] {
            let m = members(n);
            let ring = HashRing::build(&m, 1 << 12);
            let vm = VirtualMembers::new(&m, (1 << 12) - 1);
            for slot in 0..(1u32 << 12) {
                assert_eq!(
                    ring.owner(slot as usize),
                    Some(vm.owner_of(slot, (1 << 12) - 1) as usize),
                    "n={n} slot={slot}"
                );
            }
            assert_eq!(owner_without_ring(m.len(), |i| m[i], 1 << 12, 99), ring.owner(99));
        }
    }

    #[test]
    fn weighted_members_match_the_definition() {
        let mut m = members(6);
        for (i, e) in m.iter_mut().enumerate() {
            e.1 = 1 + i as u32 * 3;
        }
        let ring = HashRing::build(&m, 1 << 12);
        for slot in (0..(1u32 << 12)).step_by(7) {
            assert_eq!(
                ring.owner(slot as usize),
                owner_without_ring(m.len(), |i| m[i], 1 << 12, slot)
            );
        }
        // Shares follow weights.
        let shares = ring.shares(m.len());
        let total_w: u32 = m.iter().map(|e| e.1).sum();
        for (i, e) in m.iter().enumerate() {
            let expected = f64::from(e.1) / f64::from(total_w);
            let got = shares[i] as f64 / 4096.0;
            assert!((got - expected).abs() < 0.03, "member {i}: {got} vs {expected}");
        }
    }

    #[test]
    fn balanced_shares() {
        let m = members(10);
        let ring = HashRing::build(&m, 1 << 16);
        for share in ring.shares(10) {
            let rel = share as f64 / 6553.6;
            assert!((0.93..1.07).contains(&rel), "share {rel}");
        }
    }

    #[test]
    fn removal_moves_only_the_removed_members_slots() {
        let m = members(12);
        let ring = HashRing::build(&m, 1 << 14);
        let gone = 5;
        let rest: Vec<_> = m
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, e)| *e)
            .collect();
        let after = HashRing::build(&rest, 1 << 14);
        for slot in 0..ring.slots() {
            let before = ring.owner(slot).unwrap();
            let now = after.owner(slot).unwrap();
            let now_in_old = if now >= gone { now + 1 } else { now };
            if before != gone {
                assert_eq!(before, now_in_old, "slot {slot} moved between survivors");
            }
        }
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = HashRing::build(&[], 1 << 10);
        assert_eq!(ring.owner(3), None);
        let none: &[(SocketAddr, u32)] = &[];
        assert_eq!(owner_without_ring(none.len(), |i| none[i], 1 << 10, 3), None);
    }

    #[test]
    fn virtual_counts_are_capped() {
        let total = 2_000_001;
        let counts = [1_000_000, 1_000_000, 1].map(|w| virtual_count(w, total));
        assert!(counts.iter().map(|&c| u64::from(c)).sum::<u64>() <= MAX_VIRTUAL_MEMBERS + 3);
        assert_eq!(counts[2], 1);
        assert_eq!(virtual_count(7, 100), 7);
    }
}

/// Fuzzing access to the ring and its definition (built only under `cfg(fuzzing)`).
#[cfg(fuzzing)]
#[derive(Debug)]
pub struct FuzzRing(HashRing);

#[cfg(fuzzing)]
impl FuzzRing {
    /// Builds a ring over `members` (sorted, distinct addresses) with `slots` slots.
    pub fn build(members: &[(SocketAddr, u32)], slots: u32) -> Self {
        Self(HashRing::build(members, slots))
    }

    /// The member index owning `slot`.
    pub fn owner(&self, slot: usize) -> Option<usize> {
        self.0.owner(slot)
    }

    /// The owner by the definition, without a ring.
    pub fn definition(members: &[(SocketAddr, u32)], slots: u32, slot: u32) -> Option<usize> {
        owner_without_ring(members.len(), |i| members[i], slots, slot)
    }
}
