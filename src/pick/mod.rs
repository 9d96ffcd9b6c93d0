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
//! | [`ConsistentHash`](LoadBalancingStrategy::ConsistentHash) | hash + shift + 4-byte read | none |
//! | [`PeakEwma`](LoadBalancingStrategy::PeakEwma) | 2 RNG draws + 2 loads + 2 estimates + one `exp` | none (reports write the shard's estimate) |
//!
//! (A guarded [`Pick`] adds its in-flight increment and decrement.)
//!
//! # Invariants
//!
//! * A decision reads exactly one table version (the caller loads it once).
//! * Only routable endpoints are returned; an empty routable set is a typed miss.
//! * Every [`Pick`] increments its endpoint's in-flight count once and its `Drop` decrements
//!   it once, whatever happens to the tables meanwhile.
#![deny(unsafe_code)]

pub(crate) mod consistent;
pub(crate) mod jump;
mod p2c;
pub(crate) mod peak_ewma;
mod random;
mod round_robin;
pub(crate) mod weighted;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::sync::Arc;
use crate::table::{Member, MemberHealth, Miss, Pin, ServiceSlot, ServiceTable};
use consistent::{FALLBACK_PROBES, owner_without_ring, probe_hash, reduce};

/// The result of a request, as reported on a [`Pick`] or to
/// [`IntegratedLoadBalancer::record_result`](crate::IntegratedLoadBalancer::record_result).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request succeeded.
    Success,
    /// The request failed.
    Failure,
}

// ===== the read path =====

/// Chooses a routable endpoint of `table` and returns the calling thread's pin of it.
/// `hash` routes by consistent hash; `None` uses the table's strategy.
#[inline]
pub(crate) fn choose<'t>(
    table: &'t ServiceTable,
    slot: &ServiceSlot,
    hash: Option<u64>,
) -> Result<&'t Arc<Pin>, Miss> {
    let view = table.local();
    let routable = &view.routable;
    let n = routable.len();
    if n == 0 {
        return Err(table.miss());
    }
    if let Some(h) = hash {
        return Ok(by_hash(table, h));
    }
    if let Some(order) = &table.failover {
        if let Some(pin) = by_order(table, order) {
            return Ok(pin);
        }
    }
    let index = match table.strategy {
        LoadBalancingStrategy::RoundRobin => round_robin::index(slot.next_ticket(), n),
        LoadBalancingStrategy::Weighted => match &table.schedule {
            Some(schedule) => schedule.index(slot.next_ticket()),
            None => round_robin::index(slot.next_ticket(), n),
        },
        LoadBalancingStrategy::Random | LoadBalancingStrategy::ConsistentHash => random::index(n),
        LoadBalancingStrategy::LeastConnections => p2c::index(routable, table.routable_weights.as_deref()),
        LoadBalancingStrategy::PeakEwma => p2c::index_by_cost(routable, table.routable_weights.as_deref()),
    };
    Ok(&routable[index])
}

/// Primary/backup pick: the first healthy member of `order`; if none is healthy (panic), the
/// first routable one; `None` if the order holds no routable member.
#[inline]
fn by_order<'t>(table: &'t ServiceTable, order: &[u32]) -> Option<&'t Arc<Pin>> {
    let members = &table.members;
    let view = table.local();
    let first = |ok: &dyn Fn(&Member) -> bool| order.iter().map(|&i| i as usize).find(|&i| ok(&members[i]));
    first(&|m| m.health == MemberHealth::Healthy)
        .or_else(|| first(&|m| m.routable))
        .map(|i| &view.members[i])
}

/// Consistent-hash pick with the deterministic health fallback (see
/// [`consistent`](self::consistent)). At least one member is routable.
#[inline]
fn by_hash(table: &ServiceTable, h: u64) -> &Arc<Pin> {
    let members = &table.members;
    let view = table.local();
    for probe in 0..=FALLBACK_PROBES {
        let hp = probe_hash(h, probe);
        let owner = match &table.ring {
            Some(ring) => ring.owner(ring.slot_of(hp)),
            None => ringless_owner(table, hp),
        };
        if let Some(o) = owner {
            if members[o].routable {
                return &view.members[o];
            }
        }
    }
    let last = probe_hash(h, FALLBACK_PROBES + 1);
    &view.routable[reduce(last, view.routable.len())]
}

/// The owner the ring would give, computed from the definition (`O(total weight)`): only
/// used until the control plane has built this service's ring.
#[cold]
fn ringless_owner(table: &ServiceTable, h: u64) -> Option<usize> {
    let slots = table.hash_slots;
    let slot = (h >> (64 - slots.trailing_zeros())) as u32;
    owner_without_ring(&table.members, Member::ring_key, slots, slot)
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
    pin: Arc<Pin>,
    version: u64,
}

impl Pick {
    /// Takes a guarded pick of `pin` from table `version`.
    #[inline]
    pub(crate) fn new(pin: &Arc<Pin>, version: u64) -> Pick {
        pin.acquire();
        Pick {
            pin: pin.clone(),
            version,
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
        self.pin.address()
    }

    /// The endpoint (address and metadata, as registered when it was picked).
    pub fn endpoint(&self) -> &Endpoint {
        self.pin.endpoint()
    }

    /// Requests in flight on this endpoint that were picked by threads of the same counter
    /// shard as this one, this one included (the load signal least-connections compares).
    pub fn in_flight(&self) -> u64 {
        self.pin.in_flight()
    }

    /// Reports the outcome (and optionally the latency) and ends the request.
    pub fn record(self, outcome: Outcome, latency: Option<Duration>) {
        self.pin.record(outcome == Outcome::Success, latency);
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
        self.pin.release();
    }
}

impl std::ops::Deref for Pick {
    type Target = Endpoint;

    /// A `Pick` reads as its [`Endpoint`]: `pick.address`, `&*pick` where an `&Endpoint` is
    /// wanted.
    fn deref(&self) -> &Endpoint {
        self.pin.endpoint()
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick").field("address", &self.address()).finish()
    }
}
