//! Routing snapshots: the immutable tables the data plane reads, over the dense per-endpoint
//! counters beside them.
//!
//! This module owns:
//!
//! * [`SlotRecord`] and [`ServiceContext`]: what an endpoint generation's slot in its service's
//!   counter arena ([`crate::sync::arena`]) holds besides counters (its endpoint, its latency
//!   histogram, its run of failures), and what the service's views and leases share (its name,
//!   where failure runs are reported, its Peak-EWMA time constant).
//! * [`Target`]: the 12 bytes a pick needs of an endpoint (address, weight, routability),
//!   stored beside the endpoint's slot in a table's views, so a pick over 65,536 endpoints
//!   touches one dense array of 16-byte entries and one of 8-byte loads.
//! * [`ServiceTable`]: one immutable, versioned snapshot of a service: its members in address
//!   order and the routable ones (two views of the arena), each member's health and weights,
//!   and the strategy's precomputed structures (weighted [`schedule`], consistent-hash
//!   [`ring`]). Built by [`build`] on the control plane.
//! * [`ServiceSlot`] and [`Directory`]: the stable home of a service on the data plane (its
//!   current table, its round-robin cursor) and the map from names to them.
//! * The strategies' per-endpoint state: [`estimate`] (Peak-EWMA).
//!
//! # Invariants
//!
//! * A table is published whole by one `store`: membership, routability and the strategy
//!   structures a pick reads always belong to the same version (no torn view, unlike two cells
//!   that must agree).
//! * `routable` lists, in address order, the members whose target is routable; its entries
//!   are copies of theirs (same slot, same target).
//! * `schedule` entries index `routable`; ring owners index `members`.
//! * `version` strictly increases for a given slot.
//! * Slots outlive tables: counters survive republication (a health flap keeps every
//!   endpoint's in-flight count), and a slot is recycled only once no table contains it and
//!   nothing is in flight on it (see [`crate::sync::arena`]).
#![deny(unsafe_code)]

pub(crate) mod build;
pub(crate) mod estimate;
pub(crate) mod maglev;
pub(crate) mod plan;
pub(crate) mod ring;
pub(crate) mod schedule;
pub(crate) mod subsets;
pub(crate) mod subsetting;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
pub(crate) use crate::handoff::OutlierSink;
use crate::histogram::AtomicHistogram;
pub(crate) use crate::stats::EndpointHealth as MemberHealth;
use crate::sync::arena::{ArenaOwner, Lease, View};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Arc, CachePadded, DataArc, DataWeak, SnapshotCell};
use estimate::Decay;
use maglev::MaglevTable;
use ring::HashRing;
use schedule::Schedule;

// ===== slot records =====

/// What an endpoint generation's slot holds besides its counters.
pub(crate) struct SlotRecord {
    /// The endpoint as registered (a metadata change makes a new generation, in a new slot).
    pub(crate) endpoint: Endpoint,
    /// Reported latencies (buckets allocated by the first one).
    pub(crate) latency: AtomicHistogram,
    /// Failures reported in a row, for outlier detection, in the low 63 bits; the top bit
    /// is set once the current run was reported to the control plane.
    failures: AtomicU64,
}

/// The "reported" bit of [`SlotRecord`]'s failure word.
const REPORTED: u64 = 1 << 63;

impl SlotRecord {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            latency: AtomicHistogram::default(),
            failures: AtomicU64::new(0),
        }
    }

    /// Failures reported in a row.
    pub(crate) fn consecutive_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed) & !REPORTED
    }

    /// Starts a new run of failures (after an ejection, or a refused one). Relaxed: a
    /// heuristic counter.
    pub(crate) fn reset_failures(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

impl fmt::Debug for SlotRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotRecord")
            .field("address", &self.endpoint.address)
            .finish_non_exhaustive()
    }
}

/// Where and when a run of consecutive failures is reported.
pub(crate) struct OutlierReport {
    pub(crate) sink: DataWeak<dyn OutlierSink>,
    pub(crate) threshold: u64,
}

/// What every view and lease of one service shares.
pub(crate) struct ServiceContext {
    pub(crate) service: DataArc<str>,
    /// Outlier detection, when on.
    pub(crate) outlier: Option<OutlierReport>,
    /// Peak-EWMA's τ, for services routed by it.
    pub(crate) decay: Option<Decay>,
    /// Circuit breakers, when a limit is set for the service.
    pub(crate) breaker: Option<DataArc<crate::breaker::Breaker>>,
}

impl fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceContext")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A service's counter arena.
pub(crate) type Arena = ArenaOwner<SlotRecord, ServiceContext>;
/// An array of a service's slots with their targets, as a table holds it.
pub(crate) type Members = View<SlotRecord, ServiceContext, Target>;
/// One request in flight on one endpoint generation.
pub(crate) type SlotLease = Lease<SlotRecord, ServiceContext>;

/// Records a request's outcome on its endpoint generation: the shard's outcome counter (by
/// `count`), the latency histogram, the shard's Peak-EWMA estimate (`aux`, asked for only
/// by services that keep one), and the run of failures (reporting the endpoint once it
/// reaches the outlier threshold).
#[inline]
pub(crate) fn report<'a>(
    record: &SlotRecord,
    context: &ServiceContext,
    aux: impl FnOnce() -> &'a AtomicU64,
    count: impl FnOnce(bool),
    success: bool,
    latency: Option<Duration>,
) {
    count(success);
    if let Some(latency) = latency {
        record.latency.record(latency);
    }
    if let Some(decay) = context.decay {
        estimate::observe(aux(), decay, latency, success, estimate::now_ns());
    }
    let Some(outlier) = &context.outlier else { return };
    // Relaxed throughout: a heuristic counter, re-armed by `reset_failures`. A success only
    // reads it (and writes only when it was non-zero), so in the healthy steady state no
    // core writes its line.
    if success {
        if record.failures.load(Ordering::Relaxed) != 0 {
            record.failures.store(0, Ordering::Relaxed);
        }
        return;
    }
    let before = record.failures.fetch_add(1, Ordering::Relaxed);
    let n = (before & !REPORTED) + 1;
    if n >= outlier.threshold
        && before & REPORTED == 0
        && record.failures.fetch_or(REPORTED, Ordering::Relaxed) & REPORTED == 0
    {
        if let Some(sink) = outlier.sink.upgrade() {
            sink.consecutive_failures(&context.service, record.endpoint.address);
        }
    }
}

// ===== targets =====

/// What a pick needs of an endpoint, beside its slot: where it is, its weight, whether it may
/// be picked. 12 bytes, so an entry of a view is 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// IPv4 address bits, or the index of an IPv6 address in the table's `v6` list.
    ip: u32,
    port: u16,
    flags: u16,
    /// Effective weight (what weighted strategies compare).
    weight: u32,
}

const V6: u16 = 1;
const ROUTABLE: u16 = 2;
const HEALTHY: u16 = 4;
const METADATA: u16 = 8;

impl Target {
    /// The target of `address`; an IPv6 address is stored in `v6` and referred to by index.
    pub(crate) fn new(
        address: SocketAddr,
        v6: &mut Vec<SocketAddr>,
        weight: u32,
        routable: bool,
        healthy: bool,
        has_metadata: bool,
    ) -> Self {
        let mut flags = 0;
        let ip = match address {
            SocketAddr::V4(a) => u32::from(*a.ip()),
            SocketAddr::V6(_) => {
                flags |= V6;
                v6.push(address);
                (v6.len() - 1) as u32
            }
        };
        for (on, flag) in [(routable, ROUTABLE), (healthy, HEALTHY), (has_metadata, METADATA)] {
            if on {
                flags |= flag;
            }
        }
        Target {
            ip,
            port: address.port(),
            flags,
            weight,
        }
    }

    /// The address, given the table's IPv6 list.
    #[inline]
    pub(crate) fn address(&self, v6: &[SocketAddr]) -> SocketAddr {
        if self.flags & V6 == 0 {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(self.ip), self.port))
        } else {
            v6[self.ip as usize]
        }
    }

    /// Picks may return it.
    #[inline]
    pub(crate) fn routable(&self) -> bool {
        self.flags & ROUTABLE != 0
    }

    /// Passing its checks, not ejected, not taken out by an operator.
    #[inline]
    pub(crate) fn healthy(&self) -> bool {
        self.flags & HEALTHY != 0
    }

    /// Registered with metadata (an unguarded selection must then clone the record's
    /// endpoint; without, it rebuilds the endpoint from the address alone).
    #[inline]
    pub(crate) fn has_metadata(&self) -> bool {
        self.flags & METADATA != 0
    }

    /// The effective weight.
    #[inline]
    pub(crate) fn weight(&self) -> u32 {
        self.weight
    }
}

// ===== impl ServiceTable =====

/// The cold part of a member: what metrics and the control plane read, never a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemberInfo {
    pub(crate) health: MemberHealth,
    /// Registered weight (what the consistent-hash ring is built from).
    pub(crate) weight: u32,
    /// Weight the weighted and least-connections strategies use (slow start ramps it).
    pub(crate) effective_weight: u32,
    /// Ejections by outlier detection (decaying).
    pub(crate) ejections: u32,
}

/// Why a table could not produce a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// The service has no members.
    NoEndpoints,
    /// Members exist, none routable.
    NoHealthy,
    /// The balancer was stopped.
    Stopped,
    /// The service was removed from the registry.
    Removed,
}

/// One immutable routing snapshot of one service.
pub(crate) struct ServiceTable {
    pub(crate) service: DataArc<str>,
    /// Publication number within the slot, strictly increasing.
    pub(crate) version: u64,
    /// Registry version of the membership this table was built from.
    pub(crate) membership_version: u64,
    pub(crate) strategy: LoadBalancingStrategy,
    /// All members, in address order.
    pub(crate) members: Members,
    /// The routable members, in address order.
    pub(crate) routable: Members,
    /// Per member (same order as `members`): health and weights.
    pub(crate) info: Box<[MemberInfo]>,
    /// IPv6 addresses, by the index their targets carry.
    pub(crate) v6: Box<[SocketAddr]>,
    /// Whether the routable members' effective weights differ.
    pub(crate) weighted: bool,
    /// Smooth weighted schedule over `routable` (weighted strategy with unequal weights).
    pub(crate) schedule: Option<Schedule>,
    /// Consistent-hash structure (ring or Maglev table) over `members`.
    pub(crate) ring: Option<DataArc<Hashing>>,
    /// The configured algorithm (how hash picks are answered before `ring` is built).
    pub(crate) hash_algorithm: crate::config::HashAlgorithm,
    /// Bounded loads: hash picks skip owners at `ceil(c × average in flight)`.
    pub(crate) balance_factor: Option<f64>,
    /// `c / routable.len()` (0 without bounded loads): the cap is
    /// `ceil(cap_scale × (total in flight + 1))`.
    pub(crate) cap_scale: f64,
    /// Configured ring size (used to answer hash picks before `ring` is built).
    pub(crate) hash_slots: u32,
    /// Set when the table is a tombstone (stopped balancer or removed service).
    pub(crate) miss: Option<Miss>,
    /// Too few members are healthy: picks go to every member not marked down or draining.
    pub(crate) panic: bool,
    /// Primary/backup order (member indices): picks go to the first healthy one.
    pub(crate) failover: Option<Box<[u32]>>,
    /// Priority levels and locality: the groups strategy picks draw from (`None`: all of
    /// `routable`).
    pub(crate) plan: Option<Box<plan::RoutingPlan>>,
    /// Metadata subsets, when `[subsets]` has selectors.
    pub(crate) subsets: Option<Box<subsets::SubsetIndex>>,
}

impl ServiceTable {
    /// An empty table: a service with no endpoints, or a tombstone when `miss` is set.
    pub(crate) fn empty(
        arena: &Arena,
        service: DataArc<str>,
        version: u64,
        strategy: LoadBalancingStrategy,
        hash_slots: u32,
        miss: Option<Miss>,
    ) -> Self {
        Self {
            service,
            version,
            membership_version: 0,
            strategy,
            members: arena.view(Vec::new()),
            routable: arena.view(Vec::new()),
            info: Box::new([]),
            v6: Box::new([]),
            weighted: false,
            schedule: None,
            ring: None,
            hash_algorithm: crate::config::HashAlgorithm::Ring,
            balance_factor: None,
            cap_scale: 0.0,
            hash_slots,
            miss,
            panic: false,
            failover: None,
            plan: None,
            subsets: None,
        }
    }

    /// Number of routable members.
    #[inline]
    pub(crate) fn routable_len(&self) -> usize {
        self.routable.len()
    }

    /// The address of `target`.
    #[inline]
    pub(crate) fn address(&self, target: &Target) -> SocketAddr {
        target.address(&self.v6)
    }

    /// The address of member `i`.
    pub(crate) fn member_address(&self, i: usize) -> SocketAddr {
        self.address(&self.members.entries()[i].payload)
    }

    /// The index of member `address`, by binary search over the address-ordered members.
    pub(crate) fn member_index(&self, address: SocketAddr) -> Option<usize> {
        self.members
            .entries()
            .binary_search_by(|e| self.address(&e.payload).cmp(&address))
            .ok()
    }

    /// The endpoint of entry `i` of `view` (a view of this table): rebuilt from the target
    /// when it has no metadata (no record access, no shared reference count), cloned from
    /// the record otherwise.
    #[inline]
    pub(crate) fn endpoint(&self, view: &Members, i: usize) -> Endpoint {
        let target = &view.entries()[i].payload;
        if target.has_metadata() {
            view.record(i).endpoint.clone()
        } else {
            Endpoint::new(self.address(target), None)
        }
    }

    /// What the consistent-hash ring is a function of, for member `i`: its identity (its
    /// hash key if it carries one, else its address) and registered weight.
    pub(crate) fn ring_key(&self, i: usize) -> (ring::RingId<'_>, u32) {
        let endpoint = &self.members.record(i).endpoint;
        let id = match endpoint.tag(crate::endpoint::HASH_KEY_TAG) {
            Some(key) => ring::RingId::Key(key),
            None => ring::RingId::Address(endpoint.address),
        };
        (id, self.info[i].weight)
    }

    /// Why nothing can be picked, when nothing is routable.
    #[cold]
    pub(crate) fn miss(&self) -> Miss {
        match self.miss {
            Some(m) => m,
            None if self.members.len() == 0 => Miss::NoEndpoints,
            None => Miss::NoHealthy,
        }
    }
}

impl fmt::Debug for ServiceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceTable")
            .field("service", &self.service)
            .field("version", &self.version)
            .field("strategy", &self.strategy)
            .field("members", &self.members.len())
            .field("routable", &self.routable_len())
            .field("ring", &self.ring.is_some())
            .field("miss", &self.miss)
            .finish()
    }
}

// ===== impl Hashing =====

/// The consistent-hash structure a table carries: the ring or a Maglev table. Both map a key
/// hash to a *position* (a ring slot, a table entry) owned by a member; bounded loads walk
/// positions from the key's.
pub(crate) enum Hashing {
    Ring(HashRing),
    Maglev(MaglevTable),
}

impl Hashing {
    /// The position of hash `h`.
    #[inline]
    pub(crate) fn position(&self, h: u64) -> usize {
        match self {
            Hashing::Ring(r) => r.slot_of(h),
            Hashing::Maglev(m) => m.entry_of(h),
        }
    }

    /// The member owning position `p` (`< len`), `None` for an empty structure.
    #[inline]
    pub(crate) fn owner_at(&self, p: usize) -> Option<usize> {
        match self {
            Hashing::Ring(r) => r.owner(p),
            Hashing::Maglev(m) => m.owner_of_entry(p),
        }
    }

    /// The member owning hash `h`.
    #[inline]
    pub(crate) fn owner(&self, h: u64) -> Option<usize> {
        self.owner_at(self.position(h))
    }

    /// Number of positions.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        match self {
            Hashing::Ring(r) => r.slots(),
            Hashing::Maglev(m) => m.size(),
        }
    }
}

impl fmt::Debug for Hashing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hashing::Ring(r) => r.fmt(f),
            Hashing::Maglev(m) => m.fmt(f),
        }
    }
}

// ===== impl ServiceSlot =====

/// The data-plane home of one service: its current table and the strategy cursor.
pub(crate) struct ServiceSlot {
    pub(crate) table: SnapshotCell<ServiceTable>,
    /// Round-robin / weighted-schedule position. Padded: every round-robin pick writes it.
    pub(crate) cursor: CachePadded<AtomicUsize>,
    /// Set once a hash-keyed pick wanted a ring that this service's tables do not carry;
    /// the control plane then builds rings for it.
    pub(crate) hash_wanted: AtomicBool,
}

impl ServiceSlot {
    pub(crate) fn new(table: ServiceTable, hash_wanted: bool) -> Self {
        Self {
            table: SnapshotCell::new(Arc::new(table)),
            cursor: CachePadded::new(AtomicUsize::new(0)),
            hash_wanted: AtomicBool::new(hash_wanted),
        }
    }

    /// Next cursor position. `Relaxed`: a ticket counter; no data is published through it.
    #[inline]
    pub(crate) fn next_ticket(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }
}

impl fmt::Debug for ServiceSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSlot")
            .field("table", &*self.table.load())
            .finish_non_exhaustive()
    }
}

// ===== impl Directory =====

/// The data plane's map from service name to slot, published whole like a table.
pub(crate) struct Directory {
    pub(crate) services: std::collections::HashMap<DataArc<str>, DataArc<ServiceSlot>, ahash::RandomState>,
    pub(crate) stopped: bool,
}

impl Directory {
    pub(crate) fn empty() -> Self {
        Self {
            services: Default::default(),
            stopped: false,
        }
    }

    #[inline]
    pub(crate) fn get(&self, service: &str) -> Option<&DataArc<ServiceSlot>> {
        self.services.get(service)
    }
}

/// Where the current [`Directory`] is published, with a version that changes with it: a
/// reader that cached a name lookup under a version knows it is still good while the version
/// is unchanged (see `crate::sync::name_cache`).
pub(crate) struct DirectoryCell {
    cell: SnapshotCell<Directory>,
    version: AtomicU64,
}

impl DirectoryCell {
    pub(crate) fn new() -> Self {
        Self {
            cell: SnapshotCell::new(Arc::new(Directory::empty())),
            version: AtomicU64::new(0),
        }
    }

    /// The current directory (one wait-free snapshot load).
    #[inline]
    pub(crate) fn load(&self) -> crate::sync::Snap<Directory> {
        self.cell.load()
    }

    /// The version of the current directory. Read it *before* loading the directory whose
    /// lookups are cached under it: a lookup is then never cached under a version newer than
    /// the directory it came from.
    #[inline]
    pub(crate) fn version(&self) -> u64 {
        // Acquire pairs with the Release in `publish`: a reader that sees the new version
        // loads the new directory (or a newer one).
        self.version.load(Ordering::Acquire)
    }

    /// Publishes `directory`, then bumps the version.
    pub(crate) fn publish(&self, directory: Directory) {
        self.cell.store(Arc::new(directory));
        self.version.fetch_add(1, Ordering::Release);
    }
}

impl fmt::Debug for DirectoryCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectoryCell")
            .field("directory", &*self.load())
            .field("version", &self.version())
            .finish()
    }
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("services", &self.services.len())
            .field("stopped", &self.stopped)
            .finish()
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_addresses_and_flags() {
        let mut v6 = Vec::new();
        let a: SocketAddr = "127.0.0.9:8080".parse().unwrap();
        let b: SocketAddr = "[::1]:9090".parse().unwrap();
        let ta = Target::new(a, &mut v6, 7, true, false, true);
        let tb = Target::new(b, &mut v6, 1, false, true, false);
        assert_eq!(std::mem::size_of::<Target>(), 12);
        assert_eq!(ta.address(&v6), a);
        assert_eq!(tb.address(&v6), b);
        assert!(ta.routable() && !ta.healthy() && ta.has_metadata() && ta.weight() == 7);
        assert!(!tb.routable() && tb.healthy() && !tb.has_metadata());
        assert_eq!(v6, vec![b]);
    }
}
