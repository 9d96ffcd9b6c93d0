//! Selection: the strategies, the read path over one table, and the [`Pick`] guard.
//!
//! This module owns the data plane's decision. Given one loaded [`ServiceTable`] it returns one
//! of its routable endpoints without taking a lock, allocating, or looping over the endpoints:
//!
//! | strategy | cost per pick | state written |
//! |---|---|---|
//! | [`RoundRobin`](LoadBalancingStrategy::RoundRobin) | `fetch_add` + `%` | the slot's cursor |
//! | [`Random`](LoadBalancingStrategy::Random) | thread-local RNG | none |
//! | [`LeastConnections`](LoadBalancingStrategy::LeastConnections) | 2 RNG draws + 2 loads | none |
//! | [`Weighted`](LoadBalancingStrategy::Weighted) | `fetch_add` + schedule read | the slot's cursor |
//! | [`ConsistentHash`](LoadBalancingStrategy::ConsistentHash) | hash + shift + 2-byte read | none |
//! | [`PeakEwma`](LoadBalancingStrategy::PeakEwma) | 2 RNG draws + 2 loads + 2 estimates + one `exp` | none (reports write the shard's estimate) |
//!
//! A decision reads the table's dense views (16 bytes per endpoint: its slot, address and
//! weight) and the counters of the calling thread's shard (8 bytes per endpoint), so its
//! cost does not grow with the number of endpoints until those arrays leave the core's cache
//! (65,536 endpoints take 1.5 MiB). A guarded [`Pick`] adds one `fetch_add` on the chosen
//! endpoint's load word (one more selection, one more request in flight) and one
//! `fetch_sub` when it is dropped; an unguarded selection adds the `fetch_add` alone.
//!
//! # Invariants
//!
//! * A decision reads exactly one table version (the caller loads it once).
//! * Only routable endpoints are returned by the strategies; an empty routable set is a
//!   typed miss. (Session affinity may keep a draining endpoint's sticky keys on it while
//!   its keys move off, by the rebalance strategy; see `crate::affinity`.)
//! * Every [`Pick`] holds one request in flight on its endpoint's slot from its creation to
//!   its drop, whatever happens to the tables meanwhile: the slot is not reused while it does
//!   (see [`crate::sync::arena`]).

#![deny(unsafe_code)]

pub(crate) mod jump;
mod p2c;
mod random;
mod round_robin;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::table::plan::PlanGroup;
use crate::table::ring::{FALLBACK_PROBES, owner_without_ring, probe_hash, reduce};
use crate::table::schedule::Schedule;
use crate::table::subsets::SubsetMiss;
use crate::table::{Members, Miss, ServiceSlot, ServiceTable, SlotLease, report};

// ===== the read path =====

/// Chooses an endpoint of `table` for a thread of `shard`: the view it is in (the routable
/// members, or all members for hash and primary/backup picks, which check routability
/// themselves) and its index there. `hash` routes by consistent hash; `None` uses the
/// table's strategy.
///
/// `hold` says the caller will hold the pick in flight (a [`Pick`]): a bounded-load hash
/// pick then takes the lease as it checks the cap and returns it in [`Chosen::held`].
#[inline]
pub(crate) fn choose<'t>(
    table: &'t ServiceTable,
    slot: &ServiceSlot,
    hash: Option<u64>,
    shard: usize,
    hold: bool,
) -> Result<Chosen<'t>, Miss> {
    let routable = &table.routable;
    let n = routable.len();
    if n == 0 {
        return Err(table.miss());
    }
    if let Some(h) = hash {
        return Ok(match table.balance_factor {
            Some(_) => by_hash_bounded(table, h, shard, hold),
            None => Chosen::at(by_hash(table, h)),
        });
    }
    if let Some(order) = &table.failover {
        if let Some(i) = by_order(table, order) {
            return Ok(Chosen::at((&table.members, i)));
        }
    }
    let pool = match &table.plan {
        // Priority levels and locality: a group by the plan's shares, then the strategy
        // inside it.
        Some(plan) => Pool::of(plan.group((crate::sync::random_u64() >> 32) as u32)),
        None => Pool {
            view: routable,
            schedule: table.schedule.as_ref(),
            weighted: table.weighted,
        },
    };
    Ok(Chosen::at((pool.view, pool.index(table.strategy, slot, shard))))
}

/// The members a strategy picks among: the routable ones, a plan's group or a subset, with
/// the weighted schedule over them.
#[derive(Clone, Copy)]
pub(crate) struct Pool<'t> {
    pub(crate) view: &'t Members,
    pub(crate) schedule: Option<&'t Schedule>,
    pub(crate) weighted: bool,
}

impl<'t> Pool<'t> {
    #[inline]
    fn of(group: &'t PlanGroup) -> Self {
        Pool {
            view: &group.view,
            schedule: group.schedule.as_ref(),
            weighted: group.weighted,
        }
    }

    /// The strategy's pick among the pool's members (at least one).
    #[inline]
    pub(crate) fn index(&self, strategy: LoadBalancingStrategy, slot: &ServiceSlot, shard: usize) -> usize {
        let n = self.view.len();
        match strategy {
            LoadBalancingStrategy::RoundRobin => round_robin::index(slot.next_ticket(), n),
            LoadBalancingStrategy::Weighted => match self.schedule {
                Some(schedule) => schedule.index(slot.next_ticket()),
                None => round_robin::index(slot.next_ticket(), n),
            },
            LoadBalancingStrategy::Random | LoadBalancingStrategy::ConsistentHash => random::index(n),
            LoadBalancingStrategy::LeastConnections => p2c::index(self.view, shard, self.weighted),
            LoadBalancingStrategy::PeakEwma => p2c::index_by_cost(self.view, shard, self.weighted),
        }
    }
}

/// A pick restricted to the metadata subset `pairs` names (see
/// [`subsets`](crate::table::subsets)): the strategy over the subset's members, or over every
/// routable member when the fallback says so.
#[inline]
pub(crate) fn choose_subset<'t>(
    table: &'t ServiceTable,
    slot: &ServiceSlot,
    pairs: &[(&str, &str)],
    shard: usize,
) -> Result<Chosen<'t>, SubsetChoice> {
    if table.routable.len() == 0 {
        return Err(SubsetChoice::Miss(table.miss()));
    }
    let Some(index) = &table.subsets else {
        return Err(SubsetChoice::Subset(SubsetMiss::UnknownSelector));
    };
    match index.resolve(pairs) {
        Ok(subset) => {
            let pool = Pool {
                view: &subset.view,
                schedule: subset.schedule.as_ref(),
                weighted: subset.weighted,
            };
            Ok(Chosen::at((pool.view, pool.index(table.strategy, slot, shard))))
        }
        Err(SubsetMiss::AnyEndpoint) => choose(table, slot, None, shard, false).map_err(SubsetChoice::Miss),
        Err(miss) => Err(SubsetChoice::Subset(miss)),
    }
}

/// Why a subset pick has no endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubsetChoice {
    /// The service has no routable endpoint at all.
    Miss(Miss),
    /// The subset is unknown or empty (after the fallback).
    Subset(SubsetMiss),
}

/// A decision: entry `index` of `view`, and the lease on it if the decision already took one
/// (a guarded bounded-load pick checks the cap by taking the lease).
#[derive(Debug)]
pub(crate) struct Chosen<'t> {
    pub(crate) view: &'t Members,
    pub(crate) index: usize,
    pub(crate) held: Option<SlotLease>,
}

impl<'t> Chosen<'t> {
    #[inline]
    pub(crate) fn at((view, index): (&'t Members, usize)) -> Self {
        Chosen {
            view,
            index,
            held: None,
        }
    }

    /// The guarded pick of this decision: its lease, or a new one. `admitted`: the pick holds
    /// one of the service's `max_requests` places (see [`Pick`]'s `Drop`).
    #[inline]
    pub(crate) fn into_pick(self, table: &ServiceTable, shard: usize, admitted: bool) -> Pick {
        match self.held {
            Some(lease) => Pick::held(table, self.view, self.index, lease),
            None => Pick::new(table, self.view, self.index, shard),
        }
        .with_admission(admitted)
    }

    /// The chosen endpoint's address.
    #[cfg(feature = "grpc")]
    #[inline]
    pub(crate) fn address(&self, table: &ServiceTable) -> SocketAddr {
        table.address(&self.view.entries()[self.index].payload)
    }
}

/// Primary/backup pick: the first healthy member of `order`; if none is healthy (panic), the
/// first routable one; `None` if the order holds no routable member.
#[inline]
fn by_order(table: &ServiceTable, order: &[u32]) -> Option<usize> {
    let entries = table.members.entries();
    let first = |ok: fn(&crate::table::Target) -> bool| {
        order
            .iter()
            .map(|&i| i as usize)
            .find(|&i| ok(&entries[i].payload))
    };
    first(|t| t.healthy() && t.routable()).or_else(|| first(|t| t.routable()))
}

/// Consistent-hash pick with the deterministic health fallback (see
/// [`ring`](crate::table::ring)). At least one member is routable. Returns a member index,
/// or a routable index for the final fallback.
///
/// With priority levels, the key's level comes first (by its hash against the levels'
/// shares, [`RoutingPlan::level_of_hash`](crate::table::plan::RoutingPlan::level_of_hash)) and only owners at that level count; the final
/// fallback is then a reduction over a group of that level.
#[inline]
fn by_hash(table: &ServiceTable, h: u64) -> (&Members, usize) {
    let members = table.members.entries();
    let level = table
        .plan
        .as_ref()
        .and_then(|plan| Some((plan, plan.level_of_hash(h)?)));
    for probe in 0..=FALLBACK_PROBES {
        let hp = probe_hash(h, probe);
        let owner = match &table.ring {
            Some(ring) => ring.owner(hp),
            None => ringless_owner(table, hp),
        };
        if let Some(o) = owner {
            let at_level = level.is_none_or(|(plan, l)| plan.member_level(o) == l);
            if members[o].payload.routable() && at_level {
                return (&table.members, o);
            }
        }
    }
    let last = probe_hash(h, FALLBACK_PROBES + 1);
    if let Some((plan, l)) = level {
        if let Some(group) = plan.groups().iter().find(|g| g.level == l) {
            return (&group.view, reduce(last, group.view.len()));
        }
    }
    (&table.routable, reduce(last, table.routable.len()))
}

/// Positions a bounded-load hash pick visits before settling for the least loaded one seen.
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub const MAX_BOUNDED_WALK: usize = 64;

/// The cap of bounded loads: `ceil(c × (total in flight + 1) / routable)`, the new request
/// counted (Mirrokni et al.; Envoy's `hash_balance_factor`), from the table's
/// `cap_scale = c / routable`. At least 1. Computed in `f64` with a relative tolerance of
/// 10⁻¹² below each integer, so that a cap that is an integer in exact arithmetic
/// (`1.25 × 32 / 10 = 4`) is not rounded past it by the binary representation of `c`.
#[inline]
pub(crate) fn load_cap(cap_scale: f64, total_in_flight: u64) -> u64 {
    let x = (total_in_flight as f64 + 1.0) * cap_scale;
    ((x - x * 1e-12).ceil() as u64).max(1)
}

/// A bounded-load table's cap, computed on first use: an idle endpoint has room whatever
/// the cap (it is at least 1), so a pick whose owner is idle reads neither the service's
/// total nor does the arithmetic.
struct LazyCap<'t> {
    table: &'t ServiceTable,
    /// 0 until computed (a cap is at least 1).
    cap: core::cell::Cell<u64>,
}

impl<'t> LazyCap<'t> {
    #[inline]
    fn new(table: &'t ServiceTable) -> Self {
        LazyCap {
            table,
            cap: core::cell::Cell::new(0),
        }
    }

    #[inline]
    fn get(&self) -> u64 {
        match self.cap.get() {
            0 => {
                // A bounded-load table's arena keeps totals (`ServiceControl::new`); if one
                // did not, no endpoint would ever be at the cap.
                let cap = match self.table.members.total_in_flight() {
                    Some(total) => load_cap(self.table.cap_scale, total),
                    None => u64::MAX,
                };
                self.cap.set(cap);
                cap
            }
            cap => cap,
        }
    }
}

/// Consistent hash with bounded loads: the key's owner if it is routable and has fewer
/// requests in flight than the cap ([`load_cap`]), else the next position's owner along the
/// ring (or Maglev table) that does, visiting at most [`MAX_BOUNDED_WALK`] positions; if all
/// of them are full, the least loaded routable owner seen, and if none was routable, the
/// health fallback of [`by_hash`]. Allocation-free and bounded: at most
/// [`MAX_BOUNDED_WALK`] owner reads and load reads (and, for a guarded pick, at most
/// `TRY_LEASE_ATTEMPTS` compare-and-swaps per position).
///
/// A guarded pick (`hold`) checks the cap and takes its place in one compare-and-swap on the
/// endpoint's load word, and a bounded-load service keeps its counters in one shard (see
/// `ServiceControl::new`): two threads that both see the last place under the cap cannot
/// both take it. The cap can still be passed in two ways, both documented in
/// `docs/consistent_hashing.md`: the walk finds no room in its window (the least loaded
/// endpoint seen takes the request), or requests end elsewhere and lower the average under
/// an endpoint's standing load (the cap binds new requests only; nothing is moved).
#[inline]
fn by_hash_bounded(table: &ServiceTable, h: u64, shard: usize, hold: bool) -> Chosen<'_> {
    let Some(hashing) = &table.ring else {
        return Chosen::at(by_hash(table, h));
    };
    let cap = LazyCap::new(table);
    let members = &table.members;
    let entries = members.entries();
    let level = table
        .plan
        .as_ref()
        .and_then(|plan| Some((plan, plan.level_of_hash(h)?)));
    let walked = bounded_walk(
        hashing.len(),
        hashing.position(h),
        |p| hashing.owner_at(p),
        |o| entries[o].payload.routable() && level.is_none_or(|(plan, l)| plan.member_level(o) == l),
        |o| take_below(members, o, shard, &cap, hold),
    );
    match walked {
        Some(Ok((o, held))) => Chosen {
            view: members,
            index: o,
            held,
        },
        Some(Err(least)) => Chosen::at((members, least)),
        None => Chosen::at(by_hash(table, h)),
    }
}

/// Member `o` if it has fewer than `cap` requests in flight: with its lease if `hold`.
/// Otherwise the load seen.
#[inline]
fn take_below(
    members: &Members,
    o: usize,
    shard: usize,
    cap: &LazyCap<'_>,
    hold: bool,
) -> Result<Option<SlotLease>, u64> {
    if hold {
        members.try_lease(o, shard, || cap.get()).map(Some)
    } else {
        let load = members.in_flight_everywhere(o);
        if load == 0 || load < cap.get() {
            Ok(None)
        } else {
            Err(load)
        }
    }
}

/// The bounded-load walk over positions `start, start + 1, ...` (modulo `len`), at most
/// [`MAX_BOUNDED_WALK`] of them. At each position with a routable owner `o`, `take(o)` either
/// takes it (`Ok`, the walk ends with `Ok((o, taken))`) or reports its load (`Err`, the
/// owner is at the cap). If no owner was taken: `Err` of the least loaded routable owner seen
/// (the earliest on ties); `None` if no position had a routable owner.
#[inline]
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub fn bounded_walk<T>(
    len: usize,
    start: usize,
    owner_at: impl Fn(usize) -> Option<usize>,
    routable: impl Fn(usize) -> bool,
    mut take: impl FnMut(usize) -> Result<T, u64>,
) -> Option<Result<(usize, T), usize>> {
    let mut least: Option<(u64, usize)> = None;
    for k in 0..MAX_BOUNDED_WALK.min(len) {
        let Some(o) = owner_at((start + k) % len) else {
            return None; // an empty structure
        };
        if !routable(o) {
            continue;
        }
        match take(o) {
            Ok(taken) => return Some(Ok((o, taken))),
            Err(load) => {
                if least.is_none_or(|(best, _)| load < best) {
                    least = Some((load, o));
                }
            }
        }
    }
    least.map(|(_, o)| Err(o))
}

/// The key's owner by consistent hash with the health fallback, ignoring loads (what a
/// session key is bound to). At least one member is routable.
#[inline]
pub(crate) fn hash_owner(table: &ServiceTable, h: u64) -> (&Members, usize) {
    by_hash(table, h)
}

/// For a key bound to member `i` by session affinity: `Ok` if bounded loads are off or `i` is
/// under the cap (with its lease if `hold`), `Err` if it is at the cap (the request spills).
#[inline]
pub(crate) fn bound_under_cap(
    table: &ServiceTable,
    i: usize,
    shard: usize,
    hold: bool,
) -> Result<Option<SlotLease>, u64> {
    match table.balance_factor {
        Some(_) => take_below(&table.members, i, shard, &LazyCap::new(table), hold),
        None => Ok(None),
    }
}

/// The owner the ring would give, computed from the definition (`O(total weight)`): only
/// used until the control plane has built this service's ring. A Maglev table has no
/// per-key definition: until it exists, hash picks take the final fallback (a plain
/// reduction over the routable members).
#[cold]
fn ringless_owner(table: &ServiceTable, h: u64) -> Option<usize> {
    if table.hash_algorithm == crate::config::HashAlgorithm::Maglev {
        return None;
    }
    let slots = table.hash_slots;
    let slot = (h >> (64 - slots.trailing_zeros())) as u32;
    owner_without_ring(table.members.len(), |i| table.ring_key(i), slots, slot)
}

/// The result of a request, as reported on a [`Pick`] or to
/// [`IntegratedLoadBalancer::record_result`](crate::IntegratedLoadBalancer::record_result).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request succeeded.
    Success,
    /// The request failed.
    Failure,
}

// ===== impl Pick =====

/// A selected endpoint with one request in flight on it: an RAII guard.
///
/// The endpoint's in-flight count (the load signal of
/// [`LeastConnections`](LoadBalancingStrategy::LeastConnections), and what a drain waits for)
/// is incremented when the pick is made and decremented when the guard is dropped, even if the
/// endpoint was removed meanwhile. Report how the request went with [`Pick::record`] (or
/// [`success`](Pick::success)/[`failure`](Pick::failure)); a guard dropped without a report
/// counts as neither.
///
/// A `Pick` does not borrow the routing table: hold it across I/O freely. It is `Send`, so
/// it can move between threads with its task.
///
/// A pick cannot be duplicated: each one accounts for exactly one request. `clone()` on a
/// pick reaches its [`Endpoint`] (through `Deref`), never a second guard:
///
/// ```compile_fail,E0308
/// # #[allow(dead_code)]
/// # fn f(pick: tai_loadbalancer::Pick) {
/// let second: tai_loadbalancer::Pick = pick.clone(); // error: expected `Pick`, found `Endpoint`
/// # }
/// ```
///
/// ```
/// # #[allow(dead_code)]
/// # fn f(pick: tai_loadbalancer::Pick) {
/// let endpoint: tai_loadbalancer::Endpoint = pick.clone(); // the endpoint, not a guard
/// # let _ = endpoint;
/// # }
/// ```
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use tai_loadbalancer::*;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("api", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await.unwrap();
/// let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::LeastConnections, Default::default()).await?;
/// let pick = lb.pick("api")?;
/// assert_eq!(pick.in_flight(), 1);
/// // ... send the request to pick.address() ...
/// pick.record(Outcome::Success, Some(std::time::Duration::from_millis(3)));
/// assert_eq!(lb.metrics().successful_requests, 1);
/// # Ok::<_, Error>(())
/// # }).unwrap();
/// ```
#[must_use = "dropping a Pick ends the request it accounts for"]
pub struct Pick {
    lease: SlotLease,
    address: SocketAddr,
    version: u64,
    /// Holds one of the service's circuit-breaker `max_requests` places, released on drop.
    admitted: bool,
}

impl Pick {
    /// Takes a guarded pick of entry `i` of `view` (a view of `table`) for a thread of
    /// `shard`.
    #[inline]
    pub(crate) fn new(table: &ServiceTable, view: &Members, i: usize, shard: usize) -> Pick {
        let address = table.address(&view.entries()[i].payload);
        Pick {
            lease: view.lease(i, shard),
            address,
            version: table.version,
            admitted: false,
        }
    }

    /// A guarded pick of entry `i` of `view` on a lease already taken.
    #[inline]
    pub(crate) fn held(table: &ServiceTable, view: &Members, i: usize, lease: SlotLease) -> Pick {
        Pick {
            address: table.address(&view.entries()[i].payload),
            lease,
            version: table.version,
            admitted: false,
        }
    }

    /// This pick, holding one of the service's `max_requests` places if `admitted`.
    #[inline]
    pub(crate) fn with_admission(mut self, admitted: bool) -> Pick {
        self.admitted = admitted;
        self
    }

    /// The service's circuit breakers, if it has any.
    #[cfg(feature = "grpc")]
    #[inline]
    pub(crate) fn breaker(&self) -> Option<&crate::sync::DataArc<crate::breaker::Breaker>> {
        self.lease.context().breaker.as_ref()
    }

    /// The version of the service's routing table this pick was made from (see
    /// [`RoutingUpdate::version`](crate::RoutingUpdate::version)).
    pub fn table_version(&self) -> u64 {
        self.version
    }

    /// The endpoint's address.
    #[inline]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The endpoint (address and metadata, as registered when it was picked).
    pub fn endpoint(&self) -> &Endpoint {
        &self.lease.record().endpoint
    }

    /// Requests in flight on this endpoint that were picked by threads of the same counter
    /// shard as this one, this one included (the load signal least-connections compares).
    pub fn in_flight(&self) -> u64 {
        self.lease.in_flight()
    }

    /// Reports the outcome (and optionally the latency) and ends the request.
    pub fn record(self, outcome: Outcome, latency: Option<Duration>) {
        let lease = &self.lease;
        report(
            lease.record(),
            lease.context(),
            || lease.aux(),
            |success| lease.count(success),
            outcome == Outcome::Success,
            latency,
        );
    }

    /// Reports success and ends the request.
    pub fn success(self) {
        self.record(Outcome::Success, None);
    }

    /// Reports failure and ends the request.
    pub fn failure(self) {
        self.record(Outcome::Failure, None);
    }
}

impl Drop for Pick {
    #[inline]
    fn drop(&mut self) {
        // Before the lease's own drop, which is its last touch of the arena (and so of the
        // context the breaker lives in).
        if self.admitted {
            if let Some(breaker) = &self.lease.context().breaker {
                breaker.release(crate::error::CircuitLimit::MaxRequests);
            }
        }
    }
}

impl std::ops::Deref for Pick {
    type Target = Endpoint;

    /// A `Pick` reads as its [`Endpoint`]: `pick.address`, `&*pick` where an `&Endpoint` is
    /// wanted.
    fn deref(&self) -> &Endpoint {
        self.endpoint()
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick").field("address", &self.address()).finish()
    }
}
