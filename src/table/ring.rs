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

use crate::sync::DataArc;

/// Probes after the owner before the final fallback.
pub const FALLBACK_PROBES: u32 = 8;

/// Largest total of virtual members (sum of weights) in one ring.
pub const MAX_VIRTUAL_MEMBERS: u64 = 1 << 20;

/// Seed for virtual-member permutations. Part of the mapping: never change it.
const MEMBER_SEED: u64 = 0x7461_692d_6c62_2d31; // "tai-lb-1"

/// Rings over at most this many virtual members are filled directly (cheaper than rounds).
const DIRECT_FILL_MEMBERS: usize = 12;

pub(super) const EMPTY: u32 = u32::MAX;

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

/// How a member is placed on the ring: by its address, or by the stable hash key it carries
/// (the metadata tag [`HASH_KEY_TAG`](crate::HASH_KEY_TAG), gRPC A76), so that an instance
/// whose address changes on restart keeps its keys.
///
/// Ordered for tie-breaks: addresses by `SocketAddr` order, before every hash key; hash keys
/// by their bytes. Only identities enter the mapping, never positions in a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RingId<'a> {
    Address(SocketAddr),
    Key(&'a str),
}

impl Ord for RingId<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (RingId::Address(a), RingId::Address(b)) => a.cmp(b),
            (RingId::Key(a), RingId::Key(b)) => a.as_bytes().cmp(b.as_bytes()),
            (RingId::Address(_), RingId::Key(_)) => std::cmp::Ordering::Less,
            (RingId::Key(_), RingId::Address(_)) => std::cmp::Ordering::Greater,
        }
    }
}

impl PartialOrd for RingId<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// An owned [`RingId`], as the control plane keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum OwnedRingId {
    Address(SocketAddr),
    Key(DataArc<str>),
}

impl OwnedRingId {
    pub(crate) fn as_id(&self) -> RingId<'_> {
        match self {
            OwnedRingId::Address(a) => RingId::Address(*a),
            OwnedRingId::Key(k) => RingId::Key(k),
        }
    }
}

/// Longest hash key hashed from the stack (longer ones are refused at registration).
pub(crate) const MAX_KEY_BYTES: usize = 255;

/// Writes the bytes that identify `id` into `buf` and returns their length: IP octets then
/// big-endian port for an address (what every mapping before hash keys used, unchanged), and
/// `key:` then the key's bytes for a hash key (a prefix no address identity has).
pub(crate) fn id_bytes(id: RingId<'_>, buf: &mut [u8; 4 + MAX_KEY_BYTES]) -> usize {
    match id {
        RingId::Address(addr) => {
            let mut a = [0u8; 22];
            let n = address_bytes(addr, &mut a);
            buf[..n].copy_from_slice(&a[..n]);
            n
        }
        RingId::Key(key) => {
            let key = &key.as_bytes()[..key.len().min(MAX_KEY_BYTES)];
            buf[..4].copy_from_slice(b"key:");
            buf[4..4 + key.len()].copy_from_slice(key);
            4 + key.len()
        }
    }
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
    fn of(member: RingId<'_>, v: u32, mask: u32) -> Perm {
        let mut id = [0u8; 4 + MAX_KEY_BYTES + 4];
        let mut bytes = [0u8; 4 + MAX_KEY_BYTES];
        let len = id_bytes(member, &mut bytes);
        id[..len].copy_from_slice(&bytes[..len]);
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

/// The virtual members of a ring, in tie-break order: by member identity ([`RingId`]'s
/// order), then `v`. Owners are the members' indices in the caller's list.
struct VirtualMembers {
    perms: Vec<Perm>,
    inverses: Vec<u32>,
    owners: Vec<u32>,
}

impl VirtualMembers {
    fn new(members: &[(RingId<'_>, u32)], mask: u32) -> Self {
        let weight_sum: u64 = members.iter().map(|&(_, w)| u64::from(w)).sum();
        let total = weight_sum.min(MAX_VIRTUAL_MEMBERS + members.len() as u64) as usize;
        let mut vm = VirtualMembers {
            perms: Vec::with_capacity(total),
            inverses: Vec::with_capacity(total),
            owners: Vec::with_capacity(total),
        };
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0));
        for index in order {
            let (id, weight) = members[index];
            for v in 0..virtual_count(weight, weight_sum) {
                let perm = Perm::of(id, v, mask);
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

/// Owners by slot, in the narrowest integer that holds a member index: 1 byte below 255
/// members, 2 below 65,535, 4 beyond. A service of 100 endpoints keeps its 65,536-slot ring
/// in 64 KiB instead of 256 KiB.
pub(super) enum Owners {
    Tiny(Box<[u8]>),
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Owners {
    pub(super) fn from_wide(owners: Box<[u32]>, members: usize) -> Owners {
        if members < usize::from(u8::MAX) {
            Owners::Tiny(
                owners
                    .iter()
                    .map(|&o| if o == EMPTY { u8::MAX } else { o as u8 })
                    .collect(),
            )
        } else if members < usize::from(u16::MAX) {
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
            Owners::Tiny(o) => o.len(),
            Owners::Narrow(o) => o.len(),
            Owners::Wide(o) => o.len(),
        }
    }

    #[inline]
    pub(super) fn get(&self, slot: usize) -> Option<usize> {
        match self {
            Owners::Tiny(o) => match o[slot] {
                u8::MAX => None,
                x => Some(usize::from(x)),
            },
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
    /// Builds the ring for `members` (the table's member order, each with its identity and
    /// weight; identities distinct) over `slots` slots (a power of two, validated by the
    /// config). Owners are indices into `members`.
    pub(crate) fn build(members: &[(RingId<'_>, u32)], slots: u32) -> HashRing {
        debug_assert!(slots.is_power_of_two() && slots >= 2);
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
    #[inline]
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
/// without allocating. `key(i)` gives member `i`'s identity and weight (`i < len`).
///
/// Used on the data plane for a hash-keyed pick before the control plane has built the
/// service's ring; it returns exactly what the ring would (ties go to the smaller identity,
/// then the smaller `v`, as in the ring).
pub(crate) fn owner_without_ring<'a>(
    len: usize,
    key: impl Fn(usize) -> (RingId<'a>, u32),
    slots: u32,
    slot: u32,
) -> Option<usize> {
    let mask = slots - 1;
    let total: u64 = (0..len).map(|i| u64::from(key(i).1)).sum();
    let mut best: Option<(u32, RingId<'a>, usize)> = None;
    for index in 0..len {
        let (id, weight) = key(index);
        for v in 0..virtual_count(weight, total) {
            let perm = Perm::of(id, v, mask);
            let pos = perm.position(slot, inverse_odd(perm.skip), mask);
            // Earliest position wins; on a tie the smaller identity (its `v` are tried in
            // increasing order, so the first one kept is the smaller `v`).
            if best.is_none_or(|(p, b, _)| pos < p || (pos == p && id < b)) {
                best = Some((pos, id, index));
            }
        }
    }
    best.map(|(_, _, index)| index)
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

    fn ids(m: &[(SocketAddr, u32)]) -> Vec<(RingId<'static>, u32)> {
        m.iter().map(|&(a, w)| (RingId::Address(a), w)).collect()
    }

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
        let p = Perm::of(RingId::Address("127.0.0.1:80".parse().unwrap()), 3, mask);
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
            let ring = HashRing::build(&ids(&m), 1 << 12);
            let vm = VirtualMembers::new(&ids(&m), (1 << 12) - 1);
            for slot in 0..(1u32 << 12) {
                assert_eq!(
                    ring.owner(slot as usize),
                    Some(vm.owner_of(slot, (1 << 12) - 1) as usize),
                    "n={n} slot={slot}"
                );
            }
            assert_eq!(
                owner_without_ring(m.len(), |i| ids(&m)[i], 1 << 12, 99),
                ring.owner(99)
            );
        }
    }

    #[test]
    fn weighted_members_match_the_definition() {
        let mut m = members(6);
        for (i, e) in m.iter_mut().enumerate() {
            e.1 = 1 + i as u32 * 3;
        }
        let ring = HashRing::build(&ids(&m), 1 << 12);
        let id = ids(&m);
        for slot in (0..(1u32 << 12)).step_by(7) {
            assert_eq!(
                ring.owner(slot as usize),
                owner_without_ring(m.len(), |i| id[i], 1 << 12, slot)
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
        let ring = HashRing::build(&ids(&m), 1 << 16);
        for share in ring.shares(10) {
            let rel = share as f64 / 6553.6;
            assert!((0.93..1.07).contains(&rel), "share {rel}");
        }
    }

    #[test]
    fn removal_moves_only_the_removed_members_slots() {
        let m = members(12);
        let ring = HashRing::build(&ids(&m), 1 << 14);
        let gone = 5;
        let rest: Vec<_> = m
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, e)| *e)
            .collect();
        let after = HashRing::build(&ids(&rest), 1 << 14);
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
        let none: &[(RingId<'_>, u32)] = &[];
        assert_eq!(owner_without_ring(none.len(), |i| none[i], 1 << 10, 3), None);
    }

    #[test]
    fn owners_take_the_narrowest_width_and_keep_their_values() {
        for members in [1usize, 254, 255, 300, 65_534, 65_535, 70_000] {
            let wide: Box<[u32]> = (0..1024u32)
                .map(|i| if i == 7 { EMPTY } else { i % members as u32 })
                .collect();
            let owners = Owners::from_wide(wide.clone(), members);
            let width = match owners {
                Owners::Tiny(_) => 1,
                Owners::Narrow(_) => 2,
                Owners::Wide(_) => 4,
            };
            let expected = if members < 255 {
                1
            } else if members < 65_535 {
                2
            } else {
                4
            };
            assert_eq!(width, expected, "{members} members");
            for (slot, &o) in wide.iter().enumerate() {
                let want = (o != EMPTY).then_some(o as usize);
                assert_eq!(owners.get(slot), want, "{members} members, slot {slot}");
            }
        }
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
        let ids: Vec<(RingId<'_>, u32)> = members.iter().map(|&(a, w)| (RingId::Address(a), w)).collect();
        Self(HashRing::build(&ids, slots))
    }

    /// The member index owning `slot`.
    pub fn owner(&self, slot: usize) -> Option<usize> {
        self.0.owner(slot)
    }

    /// The owner by the definition, without a ring.
    pub fn definition(members: &[(SocketAddr, u32)], slots: u32, slot: u32) -> Option<usize> {
        owner_without_ring(
            members.len(),
            |i| (RingId::Address(members[i].0), members[i].1),
            slots,
            slot,
        )
    }
}
