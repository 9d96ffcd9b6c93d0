//! Routing snapshots: the immutable tables the data plane reads, and the per-endpoint atomics
//! beside them.
//!
//! This module owns three types:
//!
//! * [`EndpointState`]: one per registered address of a service, shared (`Arc`) by every
//!   table version that contains the address and by every outstanding [`Pick`](crate::Pick).
//!   It holds the counters that change per request (in-flight, selections, outcomes), so they
//!   survive republication.
//! * [`ServiceTable`]: one immutable, versioned snapshot of a service: its members in address
//!   order, which of them are routable, and the strategy's precomputed structures (weighted
//!   schedule, consistent-hash ring). Built by [`build`] on the control plane.
//! * [`ServiceSlot`]: the stable home of a service on the data plane: a
//!   [`SnapshotCell`] holding the current table plus the strategy cursor, which must outlive
//!   table versions (a round-robin rotation does not restart on every health flap).
//!
//! # Invariants
//!
//! * A table is published whole by one `store`: membership, routability and the strategy
//!   structures a pick reads always belong to the same version (no torn view, unlike two cells
//!   that must agree).
//! * `routable` is the subsequence of `members` with `routable == true`, in address order.
//! * `schedule` entries index `routable`; ring owners index `members`.
//! * `version` strictly increases for a given slot.
#![deny(unsafe_code)]

pub(crate) mod build;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::pick::consistent::HashRing;
use crate::pick::weighted::Schedule;
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Arc, CachePadded, DataArc, SnapshotCell};

// ===== impl EndpointState =====

/// Per-request counters of one endpoint. Kept together on one cache-padded line: a pick
/// touches only this line of the endpoint (plus the `Arc` header).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Picks holding this endpoint right now (guards not yet dropped).
    pub(crate) in_flight: AtomicU64,
    /// Every selection handed out (guarded or not).
    pub(crate) selections: AtomicU64,
    /// Outcomes recorded as success.
    pub(crate) successes: AtomicU64,
    /// Outcomes recorded as failure.
    pub(crate) failures: AtomicU64,
    /// Sum of recorded latencies, in microseconds.
    pub(crate) latency_sum_us: AtomicU64,
    /// Number of recorded latencies.
    pub(crate) latency_count: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CounterValues {
    pub(crate) in_flight: u64,
    pub(crate) selections: u64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) latency_sum_us: u64,
    pub(crate) latency_count: u64,
}

impl CounterValues {
    pub(crate) fn add(&mut self, other: &CounterValues) {
        self.in_flight += other.in_flight;
        self.selections += other.selections;
        self.successes += other.successes;
        self.failures += other.failures;
        self.latency_sum_us += other.latency_sum_us;
        self.latency_count += other.latency_count;
    }
}

/// The mutable side of one endpoint of one service.
pub(crate) struct EndpointState {
    counters: CachePadded<Counters>,
    address: SocketAddr,
    /// The registered form (metadata can be updated in place: same address, same counters).
    endpoint: SnapshotCell<Endpoint>,
}

impl EndpointState {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            counters: CachePadded::new(Counters::default()),
            address: endpoint.address,
            endpoint: SnapshotCell::new(Arc::new(endpoint)),
        }
    }

    #[inline]
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The current registered form of the endpoint.
    pub(crate) fn endpoint(&self) -> Endpoint {
        (*self.endpoint.load()).clone()
    }

    /// Whether the registered form equals `endpoint` (no clone).
    pub(crate) fn endpoint_is(&self, endpoint: &Endpoint) -> bool {
        *self.endpoint.load() == *endpoint
    }

    /// Replaces the metadata (control plane only; the address never changes).
    pub(crate) fn set_endpoint(&self, endpoint: Endpoint) {
        debug_assert_eq!(endpoint.address, self.address);
        self.endpoint.store(Arc::new(endpoint));
    }

    /// Requests in flight. `Relaxed`: a load signal for least-connections, stale by at most
    /// the requests racing with this read.
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        self.counters.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a selection handed out without a guard. `Relaxed`: statistics only.
    #[inline]
    pub(crate) fn note_selection(&self) {
        self.counters.selections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a selection and one more request in flight. `Relaxed`: the increment publishes
    /// nothing; the guard that undoes it holds its own `Arc` to this state.
    #[inline]
    pub(crate) fn acquire(&self) {
        self.counters.selections.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends one in-flight request. `Release`: whoever later reads the count with `Acquire`
    /// (a drain waiting for 0) also sees the outcome this request recorded.
    #[inline]
    pub(crate) fn release(&self) {
        let before = self.counters.in_flight.fetch_sub(1, Ordering::Release);
        debug_assert!(before > 0, "in-flight underflow on {}", self.address);
    }

    /// Records an outcome. `Relaxed`: statistics only.
    #[inline]
    pub(crate) fn record(&self, success: bool, latency: Option<Duration>) {
        let c = &self.counters;
        if success {
            c.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(latency) = latency {
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            c.latency_sum_us.fetch_add(us, Ordering::Relaxed);
            c.latency_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A copy of the counters. Each field is read `Relaxed` on its own; fields may be skewed
    /// by requests racing with the read.
    pub(crate) fn counters(&self) -> CounterValues {
        let c = &self.counters;
        CounterValues {
            in_flight: c.in_flight.load(Ordering::Relaxed),
            selections: c.selections.load(Ordering::Relaxed),
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            latency_sum_us: c.latency_sum_us.load(Ordering::Relaxed),
            latency_count: c.latency_count.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("address", &self.address)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

// ===== impl ServiceTable =====

/// One member of a service in a table.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) state: Arc<EndpointState>,
    pub(crate) weight: u32,
    pub(crate) routable: bool,
}

impl Member {
    /// What the consistent-hash ring is a function of: address and weight.
    pub(crate) fn ring_key(&self) -> (SocketAddr, u32) {
        (self.state.address(), self.weight)
    }
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
    pub(crate) members: Box<[Member]>,
    /// Routable members' states, in address order.
    pub(crate) routable: Box<[Arc<EndpointState>]>,
    /// Weights of `routable`, same order; `None` when all weights are equal.
    pub(crate) routable_weights: Option<Box<[u32]>>,
    /// Smooth weighted schedule over `routable` (weighted strategy with unequal weights).
    pub(crate) schedule: Option<Schedule>,
    /// Consistent-hash ring over `members`.
    pub(crate) ring: Option<DataArc<HashRing>>,
    /// Configured ring size (used to answer hash picks before `ring` is built).
    pub(crate) hash_slots: u32,
    /// Set when the table is a tombstone (stopped balancer or removed service).
    pub(crate) miss: Option<Miss>,
}

impl ServiceTable {
    /// An empty table: a service with no endpoints, or a tombstone when `miss` is set.
    pub(crate) fn empty(
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
            members: Box::new([]),
            routable: Box::new([]),
            routable_weights: None,
            schedule: None,
            ring: None,
            hash_slots,
            miss,
        }
    }

    /// Why nothing can be picked, when `routable` is empty.
    #[cold]
    pub(crate) fn miss(&self) -> Miss {
        match self.miss {
            Some(m) => m,
            None if self.members.is_empty() => Miss::NoEndpoints,
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
            .field("routable", &self.routable.len())
            .field("ring", &self.ring.is_some())
            .field("miss", &self.miss)
            .finish()
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

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("services", &self.services.len())
            .field("stopped", &self.stopped)
            .finish()
    }
}
