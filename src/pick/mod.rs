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
use crate::table::ring::{FALLBACK_PROBES, owner_without_ring, probe_hash, reduce};
use crate::table::{Members, Miss, ServiceSlot, ServiceTable, SlotLease, report};

// ===== the read path =====

/// Chooses an endpoint of `table` for a thread of `shard`: the view it is in (the routable
/// members, or all members for hash and primary/backup picks, which check routability
/// themselves) and its index there. `hash` routes by consistent hash; `None` uses the
/// table's strategy.
#[inline]
pub(crate) fn choose<'t>(
    table: &'t ServiceTable,
    slot: &ServiceSlot,
    hash: Option<u64>,
    shard: usize,
) -> Result<(&'t Members, usize), Miss> {
    let routable = &table.routable;
    let n = routable.len();
    if n == 0 {
        return Err(table.miss());
    }
    if let Some(h) = hash {
        return Ok(by_hash(table, h));
    }
    if let Some(order) = &table.failover {
        if let Some(i) = by_order(table, order) {
            return Ok((&table.members, i));
        }
    }
    let index = match table.strategy {
        LoadBalancingStrategy::RoundRobin => round_robin::index(slot.next_ticket(), n),
        LoadBalancingStrategy::Weighted => match &table.schedule {
            Some(schedule) => schedule.index(slot.next_ticket()),
            None => round_robin::index(slot.next_ticket(), n),
        },
        LoadBalancingStrategy::Random | LoadBalancingStrategy::ConsistentHash => random::index(n),
        LoadBalancingStrategy::LeastConnections => p2c::index(routable, shard, table.weighted),
        LoadBalancingStrategy::PeakEwma => p2c::index_by_cost(routable, shard, table.weighted),
    };
    Ok((routable, index))
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
#[inline]
fn by_hash(table: &ServiceTable, h: u64) -> (&Members, usize) {
    let members = table.members.entries();
    for probe in 0..=FALLBACK_PROBES {
        let hp = probe_hash(h, probe);
        let owner = match &table.ring {
            Some(ring) => ring.owner(ring.slot_of(hp)),
            None => ringless_owner(table, hp),
        };
        if let Some(o) = owner {
            if members[o].payload.routable() {
                return (&table.members, o);
            }
        }
    }
    let last = probe_hash(h, FALLBACK_PROBES + 1);
    (&table.routable, reduce(last, table.routable.len()))
}

/// The owner the ring would give, computed from the definition (`O(total weight)`): only
/// used until the control plane has built this service's ring.
#[cold]
fn ringless_owner(table: &ServiceTable, h: u64) -> Option<usize> {
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
        }
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
            lease.aux(),
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
