//! Routing snapshots: the immutable tables the data plane reads, and the per-endpoint atomics
//! beside them.
//!
//! This module owns four types:
//!
//! * [`Pin`]: one endpoint's counters *for one shard of threads*, plus that shard's copy of the
//!   endpoint. A pick touches only the pin of its own shard: it clones the pin's `Arc` and
//!   bumps its in-flight and selection counts, all on lines no other shard writes. Writes
//!   shared by every thread (one reference count, one in-flight counter per endpoint) make
//!   each pick migrate cache lines between cores; we measured two-thread throughput fall to
//!   0.5–1.7x of one thread that way on the project machine, against ~1.9x for read-only
//!   work (`BENCHMARKS.md`).
//! * [`EndpointState`]: one per registered generation of an address (a metadata change makes
//!   a new generation), holding its pins. Shared by every table version that contains it, so
//!   counters survive republication; the control plane sums the pins for metrics.
//! * [`ServiceTable`]: one immutable, versioned snapshot of a service: its members in address
//!   order, which of them are routable, per-shard arrays of their pins, and the strategy's
//!   precomputed structures (weighted schedule, consistent-hash ring). Built by [`build`] on
//!   the control plane.
//! * [`ServiceSlot`]: the stable home of a service on the data plane: a
//!   [`SnapshotCell`] holding the current table plus the strategy cursor, which must outlive
//!   table versions (a round-robin rotation does not restart on every health flap).
//!
//! # Invariants
//!
//! * A table is published whole by one `store`: membership, routability and the strategy
//!   structures a pick reads always belong to the same version (no torn view, unlike two cells
//!   that must agree).
//! * `shards[s].routable` lists, in address order, shard `s`'s pins of the members with
//!   `routable == true`; `shards[s].members[i]` is shard `s`'s pin of `members[i]`.
//! * `schedule` entries index the routable list; ring owners index `members`.
//! * `version` strictly increases for a given slot.
//! * A pin's in-flight count is incremented by a pick holding an `Arc` to that pin and
//!   decremented by the same guard's `Drop`, so it never underflows and reaches 0 exactly when
//!   no guard of that shard is outstanding.
#![deny(unsafe_code)]

pub(crate) mod build;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
pub(crate) use crate::handoff::OutlierSink;
use crate::histogram::{AtomicHistogram, LatencyHistogram};
use crate::pick::consistent::HashRing;
use crate::pick::peak_ewma::{RttEstimate, now_ns};
use crate::pick::weighted::Schedule;
pub(crate) use crate::stats::CounterValues;
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use crate::sync::{Arc, CachePadded, DataArc, DataWeak, SnapshotCell};

// ===== impl Pin =====

/// Outcome counters of a pin: written when a request reports, not when it is picked, so they
/// sit on their own line.
#[derive(Debug)]
#[repr(C, align(64))]
struct Outcomes {
    successes: AtomicU64,
    failures: AtomicU64,
    /// The generation's latency histogram (shared by its pins, allocated on first use).
    latency: DataArc<AtomicHistogram>,
    /// This shard's Peak-EWMA latency estimate, for services routed by
    /// [`PeakEwma`](crate::LoadBalancingStrategy::PeakEwma): on the line next to the
    /// in-flight count a pick reads, written by this shard's reports.
    rtt: Option<RttEstimate>,
}

/// One endpoint's counters for one shard of threads.
///
/// Layout: the first 64-byte line holds everything a pick touches (in-flight, selections,
/// the endpoint it returns); outcome counters follow on the second line. The `Arc` header
/// that precedes it is written by guards of this shard only.
#[repr(C, align(64))]
pub(crate) struct Pin {
    in_flight: AtomicU64,
    selections: AtomicU64,
    /// This shard's copy of the endpoint: its metadata `Arc` is not shared with other shards,
    /// so cloning the endpoint on the pick path writes no line another shard writes.
    endpoint: Endpoint,
    /// The generation's passive-health bookkeeping (shared by all its pins; read on success,
    /// written only on failure).
    failures: Arc<Failures>,
    outcomes: Outcomes,
}

// ===== impl Failures =====

/// Whom to tell when the threshold is reached.
pub(crate) struct OutlierReport {
    pub(crate) sink: DataWeak<dyn OutlierSink>,
    pub(crate) service: DataArc<str>,
    pub(crate) threshold: u64,
}

/// Consecutive reported failures of one endpoint generation, for outlier detection.
///
/// Shared by the generation's pins on its own cache line. A success only *reads* it (and
/// writes only when it was non-zero), so in the healthy steady state no core writes it;
/// failures are the exception and may share the line.
pub(crate) struct Failures {
    consecutive: CachePadded<AtomicU64>,
    reported: AtomicBool,
    report: Option<OutlierReport>,
}

impl Failures {
    pub(crate) fn new(report: Option<OutlierReport>) -> Self {
        Self {
            consecutive: CachePadded::new(AtomicU64::new(0)),
            reported: AtomicBool::new(false),
            report,
        }
    }

    /// Counts an outcome; reports the endpoint once when failures reach the threshold.
    /// `Relaxed` throughout: a heuristic counter, re-armed by [`Failures::reset`].
    #[inline]
    fn note(&self, success: bool, address: SocketAddr) {
        let Some(report) = &self.report else { return };
        if success {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= report.threshold && !self.reported.swap(true, Ordering::Relaxed) {
            if let Some(sink) = report.sink.upgrade() {
                sink.consecutive_failures(&report.service, address);
            }
        }
    }

    /// Starts a new run (after an ejection, or a refused one).
    pub(crate) fn reset(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.reported.store(false, Ordering::Relaxed);
    }

    pub(crate) fn consecutive(&self) -> u64 {
        self.consecutive.load(Ordering::Relaxed)
    }
}

impl Pin {
    fn new(
        endpoint: Endpoint,
        failures: Arc<Failures>,
        rtt: Option<RttEstimate>,
        latency: DataArc<AtomicHistogram>,
    ) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            selections: AtomicU64::new(0),
            endpoint,
            failures,
            outcomes: Outcomes {
                successes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                latency,
                rtt,
            },
        }
    }

    #[inline]
    pub(crate) fn address(&self) -> SocketAddr {
        self.endpoint.address
    }

    #[inline]
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// This shard's requests in flight. `Relaxed`: a load signal for least-connections,
    /// stale by at most the requests racing with this read.
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a selection handed out without a guard. `Relaxed`: statistics only.
    #[inline]
    pub(crate) fn note_selection(&self) {
        self.selections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a selection and one more request in flight. `Relaxed`: the increment publishes
    /// nothing; the guard that undoes it holds an `Arc` to this pin.
    #[inline]
    pub(crate) fn acquire(&self) {
        self.selections.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends one in-flight request. `Release`: whoever later reads the count with `Acquire`
    /// (a drain waiting for 0) also sees the outcome this request recorded.
    #[inline]
    pub(crate) fn release(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::Release);
        debug_assert!(before > 0, "in-flight underflow on {}", self.endpoint.address);
    }

    /// Records an outcome. `Relaxed`: statistics only.
    #[inline]
    pub(crate) fn record(&self, success: bool, latency: Option<Duration>) {
        let o = &self.outcomes;
        if success {
            o.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            o.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(latency) = latency {
            o.latency.record(latency);
        }
        if let Some(rtt) = &o.rtt {
            match latency {
                Some(latency) => rtt.observe(latency, success, now_ns()),
                None if !success => rtt.observe_failure(now_ns()),
                None => {}
            }
        }
        self.failures.note(success, self.endpoint.address);
    }

    /// This shard's Peak-EWMA estimate, if the service is routed by it.
    #[inline]
    pub(crate) fn rtt(&self) -> Option<&RttEstimate> {
        self.outcomes.rtt.as_ref()
    }

    fn counters(&self) -> CounterValues {
        let o = &self.outcomes;
        CounterValues {
            // Acquire pairs with `release`: a sum of 0 means every finished request's
            // outcome is visible.
            in_flight: self.in_flight.load(Ordering::Acquire),
            selections: self.selections.load(Ordering::Relaxed),
            successes: o.successes.load(Ordering::Relaxed),
            failures: o.failures.load(Ordering::Relaxed),
            latency: LatencyHistogram::default(),
        }
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin")
            .field("address", &self.endpoint.address)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

// ===== impl EndpointState =====

/// One generation of one endpoint of a service: its registered form and its pins.
pub(crate) struct EndpointState {
    endpoint: Endpoint,
    pins: Box<[Arc<Pin>]>,
    failures: Arc<Failures>,
    latency: DataArc<AtomicHistogram>,
}

impl EndpointState {
    /// A state with `shards` pins, each with its own copy of the endpoint's metadata, and a
    /// Peak-EWMA estimate decaying over `rtt_decay` if given.
    pub(crate) fn new(
        endpoint: Endpoint,
        shards: usize,
        report: Option<OutlierReport>,
        rtt_decay: Option<Duration>,
    ) -> Self {
        let failures = Arc::new(Failures::new(report));
        let latency = DataArc::new(AtomicHistogram::default());
        let pins = (0..shards.max(1))
            .map(|_| {
                Arc::new(Pin::new(
                    endpoint.detached(),
                    failures.clone(),
                    rtt_decay.map(RttEstimate::new),
                    latency.clone(),
                ))
            })
            .collect();
        Self {
            endpoint,
            pins,
            failures,
            latency,
        }
    }

    /// The generation's consecutive-failure tracking.
    pub(crate) fn failures(&self) -> &Failures {
        &self.failures
    }

    /// The Peak-EWMA estimate now, if this generation has one with a sample.
    pub(crate) fn latency_estimate(&self) -> Option<Duration> {
        // Each shard keeps its own estimate: report the mean of those that have samples.
        let now = now_ns();
        let (sum, n) = self
            .pins
            .iter()
            .filter_map(|pin| pin.rtt()?.estimate_ns(now).into())
            .filter(|&ns: &f64| ns > 0.0)
            .fold((0.0, 0u32), |(sum, n), ns| (sum + ns, n + 1));
        (n > 0).then(|| Duration::from_nanos((sum / f64::from(n)).min(u64::MAX as f64) as u64))
    }

    #[inline]
    pub(crate) fn address(&self) -> SocketAddr {
        self.endpoint.address
    }

    /// The registered form of this generation.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The pin of shard `shard` (`< shards`).
    #[inline]
    pub(crate) fn pin(&self, shard: usize) -> &Arc<Pin> {
        &self.pins[shard]
    }

    /// The pin of the calling thread's shard.
    #[inline]
    #[allow(dead_code)]
    pub(crate) fn local_pin(&self) -> &Arc<Pin> {
        &self.pins[crate::sync::thread_ordinal() & (self.pins.len() - 1)]
    }

    /// Sum of all shards' counters. Each shard is read on its own; the sum may be skewed by
    /// requests racing with the read.
    pub(crate) fn counters(&self) -> CounterValues {
        let mut total = CounterValues::default();
        for pin in self.pins.iter() {
            total.add(&pin.counters());
        }
        total.latency = self.latency.snapshot();
        total
    }

    /// Whether anything besides the control plane (a table, a guard) still refers to this
    /// generation. When it returns `false`, nothing can reach the state any more, and every
    /// counter update made through a dropped table or guard is visible to the caller.
    pub(crate) fn is_referenced(this: &Arc<EndpointState>) -> bool {
        if Arc::strong_count(this) > 1 || this.pins.iter().any(|p| Arc::strong_count(p) > 1) {
            return true;
        }
        // Acquire fence, as in `Arc::drop`: the counts were read `Relaxed`; this orders the
        // `Release` decrements of the dropped tables and guards (and so every counter update
        // made before them) before our reads of the counters.
        fence(Ordering::Acquire);
        false
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("address", &self.endpoint.address)
            .field("shards", &self.pins.len())
            .finish_non_exhaustive()
    }
}

// ===== impl ServiceTable =====

/// One member of a service in a table.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) state: Arc<EndpointState>,
    /// Registered weight (what the consistent-hash ring is built from).
    pub(crate) weight: u32,
    /// Weight the weighted and least-connections strategies use (slow start ramps it).
    pub(crate) effective_weight: u32,
    pub(crate) health: MemberHealth,
    /// Picks may return it: healthy, or (while the service is in panic) any member not
    /// marked down or draining.
    pub(crate) routable: bool,
}

pub(crate) use crate::stats::EndpointHealth as MemberHealth;

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
    /// Per shard of threads: pins of the routable members and of all members.
    pub(crate) shards: Box<[ShardView]>,
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
    /// Too few members are healthy: picks go to all members regardless of health.
    pub(crate) panic: bool,
    /// Primary/backup order (member indices): picks go to the first healthy one.
    pub(crate) failover: Option<Box<[u32]>>,
}

/// One shard's view of a table: the pins its threads touch.
#[derive(Debug, Default)]
pub(crate) struct ShardView {
    /// Pins of routable members, in address order.
    pub(crate) routable: Box<[Arc<Pin>]>,
    /// Pins of all members, in address order (`members[i]`).
    pub(crate) members: Box<[Arc<Pin>]>,
}

impl ServiceTable {
    /// The calling thread's view. Tables always have a power-of-two number of shards.
    #[inline]
    pub(crate) fn local(&self) -> &ShardView {
        &self.shards[crate::sync::thread_ordinal() & (self.shards.len() - 1)]
    }

    /// Number of routable members.
    #[inline]
    pub(crate) fn routable_len(&self) -> usize {
        self.shards[0].routable.len()
    }

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
            shards: Box::new([ShardView::default()]),
            routable_weights: None,
            schedule: None,
            ring: None,
            hash_slots,
            miss,
            panic: false,
            failover: None,
        }
    }

    /// Why nothing can be picked, when nothing is routable.
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
            .field("routable", &self.routable_len())
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
