//! Pull-model statistics: a plain snapshot of the balancer's counters.
//!
//! This module owns [`LoadBalancerMetrics`] and its per-service and per-endpoint parts. The
//! counters themselves are per-endpoint atomics on the data plane (no shared hot cache line);
//! [`IntegratedLoadBalancer::metrics`](crate::IntegratedLoadBalancer::metrics) sums them on
//! demand. Counters of removed endpoints stay in their service's totals; the endpoints
//! themselves leave the per-endpoint list, so it does not grow without bound.
//!
//! # Meaning of the counters
//!
//! * `total_requests`: selections handed out: every [`Pick`](crate::Pick), every
//!   `select`/`next_endpoint*` result.
//! * `successful_requests`, `failed_requests`: outcomes reported on a pick or through
//!   [`IntegratedLoadBalancer::record_result`](crate::IntegratedLoadBalancer::record_result).
//!   A selection without a report counts in neither, so
//!   `successful + failed <= total` (up to requests racing with the snapshot).
//! * `in_flight`: picks not yet dropped.
//!
//! Each counter is read on its own without stopping traffic, so a snapshot taken under load
//! can be skewed by the requests in progress while it was taken.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use std::time::SystemTime;

use crate::config::circuit_breakers::CircuitBreakerConfig;
use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::error::CircuitLimit;
use crate::histogram::LatencyHistogram;
use crate::sync::DataArc;

/// A snapshot of the balancer's request counters.
///
/// # Examples
///
/// The seed README computes `100.0 * metrics.successful_requests / metrics.total_requests`,
/// which does not compile (`f64 * u64`); use [`success_rate`](Self::success_rate) or cast:
///
/// ```
/// # use tai_loadbalancer::LoadBalancerMetrics;
/// let metrics = LoadBalancerMetrics { total_requests: 4, successful_requests: 3, failed_requests: 1, ..Default::default() };
/// println!("Success: {}%", 100.0 * metrics.successful_requests as f64 / metrics.total_requests as f64);
/// assert_eq!(metrics.success_rate(), Some(0.75));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadBalancerMetrics {
    /// Selections handed out.
    pub total_requests: u64,
    /// Outcomes reported as success.
    pub successful_requests: u64,
    /// Outcomes reported as failure.
    pub failed_requests: u64,
    /// Requests in flight (picks not yet dropped).
    pub in_flight: u64,
    /// Latencies reported with outcomes, all services together (p50/p95/p99/p999, max).
    pub latency: LatencyHistogram,
    /// Selections per second over the recent window: since the oldest earlier snapshot taken
    /// within the last 60 s (at least 1 s ago); `None` until there is one.
    pub requests_per_second: Option<f64>,
    /// The session-affinity table's counters.
    pub affinity: crate::AffinityStats,
    /// Per service, sorted by name.
    pub services: Vec<ServiceMetrics>,
}

/// Counters of one service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceMetrics {
    /// The service name.
    pub service: String,
    /// The strategy routing it.
    pub strategy: LoadBalancingStrategy,
    /// Version of the routing table currently published.
    pub table_version: u64,
    /// Registry version of the membership that table was built from
    /// ([`ServiceRegistry::version`](crate::ServiceRegistry::version) at that change).
    pub registry_version: u64,
    /// Registered endpoints.
    pub endpoints_total: usize,
    /// Endpoints picks can currently go to.
    pub endpoints_routable: usize,
    /// Too few endpoints are healthy (below `panic_threshold_percent`): picks go to all of
    /// them regardless of health, rather than overload the few healthy ones.
    pub panic: bool,
    /// Selections handed out (including to endpoints since removed).
    pub total_requests: u64,
    /// Outcomes reported as success.
    pub successful_requests: u64,
    /// Outcomes reported as failure.
    pub failed_requests: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Latencies reported with outcomes (current and removed endpoints together).
    pub latency: LatencyHistogram,
    /// Selections of the current endpoints that are in the balancer's local zone
    /// (`[locality] local_zone`), `None` when no local zone is configured.
    pub local_picks: Option<u64>,
    /// `local_picks` over the selections of all current endpoints: the share of picks that
    /// stayed in the local zone (`None` without a local zone or before any pick).
    pub local_pick_share: Option<f64>,
    /// Current endpoints, in address order.
    pub endpoints: Vec<EndpointMetrics>,
    /// Its circuit breakers, when a limit is set for it.
    pub circuit_breaker: Option<CircuitBreakerMetrics>,
}

/// A service's circuit breakers: the limits in force, what each holds now, and how many
/// calls each refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitBreakerMetrics {
    /// The limits in force (the top-level ones with the service's own in their place).
    pub limits: CircuitBreakerConfig,
    /// Guarded picks in flight (counted while `max_requests` is set).
    pub requests: u64,
    /// Channel calls waiting for a connection or a stream (counted while `max_pending` is
    /// set).
    pub pending: u64,
    /// Retries in flight (counted while `max_retries` is set).
    pub retries: u64,
    /// Connections the balancer's channels hold to the service's endpoints.
    pub connections: u64,
    /// Calls refused by each limit, by [`CircuitLimit::index`]; see [`open`](Self::open).
    pub refused: [u64; 4],
}

impl CircuitBreakerMetrics {
    /// Calls refused because `limit` was reached (for `max_connections_per_endpoint`:
    /// connections not opened, the call sharing an open one or failing).
    pub fn open(&self, limit: CircuitLimit) -> u64 {
        self.refused[limit.index()]
    }

    /// Calls refused by any limit.
    pub fn open_total(&self) -> u64 {
        self.refused.iter().sum()
    }
}

/// Counters of one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointMetrics {
    /// The endpoint.
    pub address: SocketAddr,
    /// Its registered weight.
    pub weight: u32,
    /// The weight the weighted and least-connections strategies use now, relative to the
    /// other endpoints' (lower than `weight` during slow start; scaled by 100 when slow
    /// start is configured).
    pub effective_weight: u32,
    /// Whether picks can currently go to it.
    pub routable: bool,
    /// Its health.
    pub health: EndpointHealth,
    /// How many times outlier detection ejected it (decays while it behaves).
    pub ejections: u32,
    /// While it is ejected: how long until the ejection ends.
    pub ejection_remaining: Option<Duration>,
    /// Failures reported in a row (outlier detection's counter; 0 when it is off).
    pub consecutive_failures: u64,
    /// Active health-check status, when checks run.
    pub health_check: Option<HealthStatus>,
    /// Selections handed out.
    pub selections: u64,
    /// Outcomes reported as success.
    pub successes: u64,
    /// Outcomes reported as failure.
    pub failures: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Mean of the latencies reported with outcomes, if any were.
    pub mean_latency: Option<Duration>,
    /// Latencies reported with outcomes (p50/p95/p99/p999, max).
    pub latency: LatencyHistogram,
    /// The Peak-EWMA latency estimate now (decayed since its last sample): for services
    /// routed by [`PeakEwma`](crate::LoadBalancingStrategy::PeakEwma), once a latency was
    /// reported; `None` otherwise.
    pub latency_estimate: Option<Duration>,
}

fn rate(successes: u64, failures: u64) -> Option<f64> {
    let reported = successes + failures;
    (reported > 0).then(|| successes as f64 / reported as f64)
}

impl LoadBalancerMetrics {
    /// Successes over reported outcomes, `None` before any outcome was reported.
    pub fn success_rate(&self) -> Option<f64> {
        rate(self.successful_requests, self.failed_requests)
    }

    /// The metrics of `service`, if it is routed by this balancer.
    pub fn service(&self, service: &str) -> Option<&ServiceMetrics> {
        self.services.iter().find(|s| s.service == service)
    }

    /// Calls refused by `limit` of a circuit breaker, every service together.
    pub fn circuit_open(&self, limit: CircuitLimit) -> u64 {
        self.services
            .iter()
            .filter_map(|s| s.circuit_breaker.as_ref())
            .map(|b| b.open(limit))
            .sum()
    }

    pub(crate) fn from_counters(services: Vec<ServiceCounters>, local_zone: Option<&str>) -> Self {
        let mut m = LoadBalancerMetrics::default();
        for sc in services {
            let mut totals = sc.removed;
            let mut latency = crate::histogram::LatencyAccumulator::default();
            latency.add(&totals.latency);
            let mut endpoints = Vec::with_capacity(sc.endpoints.len());
            let mut routable = 0;
            let (mut local, mut current) = (0u64, 0u64);
            for e in sc.endpoints {
                totals.add_counts(&e.counters);
                latency.add(&e.counters.latency);
                routable += usize::from(e.routable);
                current += e.counters.selections;
                if local_zone.is_some() && e.endpoint.zone() == local_zone {
                    local += e.counters.selections;
                }
                endpoints.push(EndpointMetrics::new(e));
            }
            let local_picks = local_zone.map(|_| local);
            let local_pick_share = local_picks
                .filter(|_| current > 0)
                .map(|l| l as f64 / current as f64);
            let service = ServiceMetrics {
                service: sc.name.to_string(),
                strategy: sc.strategy,
                table_version: sc.table_version,
                registry_version: sc.membership_version,
                endpoints_total: endpoints.len(),
                endpoints_routable: routable,
                panic: sc.panic,
                total_requests: totals.selections,
                successful_requests: totals.successes,
                failed_requests: totals.failures,
                in_flight: totals.in_flight,
                latency: latency.finish(),
                local_picks,
                local_pick_share,
                endpoints,
                circuit_breaker: sc.circuit_breaker,
            };
            m.total_requests += service.total_requests;
            m.successful_requests += service.successful_requests;
            m.failed_requests += service.failed_requests;
            m.in_flight += service.in_flight;
            m.latency.merge(&service.latency);
            m.services.push(service);
        }
        m
    }
}

impl ServiceMetrics {
    /// Successes over reported outcomes, `None` before any outcome was reported.
    pub fn success_rate(&self) -> Option<f64> {
        rate(self.successful_requests, self.failed_requests)
    }

    /// The metrics of the endpoint at `address`, if it is a current member.
    pub fn endpoint(&self, address: SocketAddr) -> Option<&EndpointMetrics> {
        self.endpoints.iter().find(|e| e.address == address)
    }
}

impl EndpointMetrics {
    fn new(e: EndpointCounters) -> Self {
        let c = e.counters;
        Self {
            address: e.endpoint.address,
            weight: e.endpoint.weight(),
            effective_weight: e.effective_weight,
            routable: e.routable,
            health: e.health,
            ejections: e.ejections,
            ejection_remaining: e.ejection_remaining,
            consecutive_failures: e.consecutive_failures,
            health_check: e.check,
            selections: c.selections,
            successes: c.successes,
            failures: c.failures,
            in_flight: c.in_flight,
            mean_latency: c.latency.mean(),
            latency: c.latency,
            latency_estimate: e.latency_estimate,
        }
    }

    /// Successes over reported outcomes, `None` before any outcome was reported.
    pub fn success_rate(&self) -> Option<f64> {
        rate(self.successes, self.failures)
    }
}

/// The health of an endpoint as the balancer routes by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointHealth {
    /// Passing its checks (or unchecked) and not ejected.
    Healthy,
    /// Failing its active health checks.
    Unhealthy,
    /// Ejected by outlier detection after consecutive failures; back when the ejection ends.
    Ejected,
    /// Marked down by an operator ([`IntegratedLoadBalancer::mark_down`](crate::IntegratedLoadBalancer::mark_down)).
    Down,
    /// Being drained ([`IntegratedLoadBalancer::drain`](crate::IntegratedLoadBalancer::drain)):
    /// no new picks, requests in flight finish.
    Draining,
}

impl EndpointHealth {
    /// Out of routing by an operator's decision (marked down or draining): such an endpoint
    /// is never routable, panic mode included, and does not count towards the panic
    /// threshold.
    pub(crate) fn is_operator_decision(self) -> bool {
        matches!(self, EndpointHealth::Down | EndpointHealth::Draining)
    }
}

/// One routing-table publication, as delivered to
/// [`IntegratedLoadBalancer::routing_updates`](crate::IntegratedLoadBalancer::routing_updates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingUpdate {
    /// The service.
    pub service: String,
    /// The table's version (increases by one per publication of this service).
    pub version: u64,
    /// Every member with its health, in address order.
    pub endpoints: Vec<(SocketAddr, EndpointHealth)>,
    /// The members picks can go to in this version, in address order.
    pub routable: Vec<SocketAddr>,
    /// Whether the service is in panic mode in this version.
    pub panic: bool,
    /// The service was removed (or the balancer stopped): nothing is routable any more.
    pub removed: bool,
}

/// Recent `(time, total selections)` samples, one per metrics snapshot, for a requests-per-
/// second figure without a timer thread.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    samples: crate::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

impl RateWindow {
    const WINDOW: Duration = Duration::from_secs(60);
    const MIN_SPAN: Duration = Duration::from_secs(1);

    /// Records `total` now; returns the rate since the oldest sample of the last 60 s taken
    /// at least 1 s ago.
    pub(crate) fn sample(&self, total: u64) -> Option<f64> {
        let now = std::time::Instant::now();
        let mut samples = self.samples.lock();
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            samples.pop_front();
        }
        let rate = samples
            .iter()
            .find(|(t, _)| now.duration_since(*t) >= Self::MIN_SPAN)
            .map(|(t, n)| total.saturating_sub(*n) as f64 / now.duration_since(*t).as_secs_f64());
        // Keep at most one sample per 100 ms so a hot scrape loop stays bounded.
        if samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(100))
        {
            samples.push_back((now, total));
        }
        rate
    }
}

/// Hit, miss, insert, eviction and expiry counts of an [`AffinityManager`](crate::AffinityManager).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityStats {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing (or an expired entry).
    pub misses: u64,
    /// Hits whose endpoint had left routing (deregistered, unhealthy or draining), so the key
    /// was bound to a live endpoint instead (also counted in `hits`).
    pub moved: u64,
    /// Entries dropped because they expired.
    pub expirations: u64,
    /// Entries dropped to stay within `max_entries`.
    pub evictions: u64,
    /// Entries currently held.
    pub entries: usize,
}

// ===== rebalancing events =====

/// What started a rebalance event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RebalanceTrigger {
    /// A new routing table: membership or health changed.
    Topology,
    /// [`RebalanceManager::rebalance_service`](crate::RebalanceManager::rebalance_service).
    Manual,
    /// A drain (or a batch of its keys moving).
    Drain,
    /// An endpoint that left was released by the control plane.
    Release,
}

/// An endpoint whose requests in flight are finished (or abandoned at the drain timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasedEndpoint {
    /// The endpoint.
    pub address: SocketAddr,
    /// Requests still in flight when it was released (0 unless it timed out).
    pub in_flight_abandoned: u64,
    /// Whether the drain timeout expired first.
    pub timed_out: bool,
}

/// What changed in a service, and what the rebalancer did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalanceEvent {
    /// The service.
    pub service: String,
    /// What started it.
    pub trigger: RebalanceTrigger,
    /// The routing-table version it refers to (0 when none).
    pub version: u64,
    /// Endpoints that joined.
    pub added: Vec<SocketAddr>,
    /// Endpoints that left (deregistered).
    pub removed: Vec<SocketAddr>,
    /// Endpoints whose health changed, with the new health.
    pub health_changed: Vec<(SocketAddr, EndpointHealth)>,
    /// Endpoints released after draining or removal.
    pub released: Vec<ReleasedEndpoint>,
    /// Affinity keys moved off endpoints (unbound, to be re-bound on their next request).
    pub affinity_keys_moved: usize,
    /// Affinity keys still bound to a draining endpoint (gradual progress).
    pub affinity_keys_pending: usize,
}

impl RebalanceEvent {
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn new(service: impl Into<String>, trigger: RebalanceTrigger, version: u64) -> Self {
        Self {
            service: service.into(),
            trigger,
            version,
            added: Vec::new(),
            removed: Vec::new(),
            health_changed: Vec::new(),
            released: Vec::new(),
            affinity_keys_moved: 0,
            affinity_keys_pending: 0,
        }
    }

    /// Whether anything changed or moved.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.health_changed.is_empty()
            && self.released.is_empty()
            && self.affinity_keys_moved == 0
    }
}

/// The outcome of a drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// The endpoint.
    pub address: SocketAddr,
    /// Requests in flight when the drain started.
    pub in_flight_at_start: u64,
    /// Requests still in flight when it ended (0 unless it timed out).
    pub in_flight_at_end: u64,
    /// Whether the drain timeout expired first.
    pub timed_out: bool,
    /// Affinity keys moved off the endpoint.
    pub affinity_keys_moved: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

// ===== active health =====

/// Whether active checks consider an endpoint healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Routable (new endpoints start here).
    Healthy,
    /// Failed `unhealthy_threshold` checks in a row (outside its grace period); out of
    /// routing until `healthy_threshold` checks in a row pass.
    Unhealthy,
}

/// The active-check status of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// Current verdict.
    pub state: HealthState,
    /// Checks passed in a row.
    pub consecutive_successes: u32,
    /// Checks failed in a row (failures during the grace period are not counted).
    pub consecutive_failures: u32,
    /// Checks completed.
    pub checks: u64,
    /// Checks that failed.
    pub failed_checks: u64,
    /// When the last check completed.
    pub last_check: Option<SystemTime>,
    /// How long the last check took.
    pub last_latency: Option<Duration>,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
    /// When `state` last changed (or the endpoint was first seen).
    pub since: SystemTime,
    /// Whether the endpoint is still in its grace period.
    pub in_grace_period: bool,
}

impl HealthStatus {
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn new() -> Self {
        Self {
            state: HealthState::Healthy,
            consecutive_successes: 0,
            consecutive_failures: 0,
            checks: 0,
            failed_checks: 0,
            last_check: None,
            last_latency: None,
            last_error: None,
            since: SystemTime::now(),
            in_grace_period: false,
        }
    }

    /// Whether the endpoint is healthy.
    pub fn is_healthy(&self) -> bool {
        self.state == HealthState::Healthy
    }
}

// ===== counters, as the control plane reads them =====

/// A point-in-time sum of counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CounterValues {
    pub(crate) in_flight: u64,
    pub(crate) selections: u64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) latency: LatencyHistogram,
}

impl CounterValues {
    pub(crate) fn add(&mut self, other: &CounterValues) {
        self.in_flight += other.in_flight;
        self.selections += other.selections;
        self.successes += other.successes;
        self.failures += other.failures;
        self.latency.merge(&other.latency);
    }

    /// As [`add`](Self::add) without the latency histogram (summed separately).
    pub(crate) fn add_counts(&mut self, other: &CounterValues) {
        self.in_flight += other.in_flight;
        self.selections += other.selections;
        self.successes += other.successes;
        self.failures += other.failures;
    }
}

/// What one endpoint looks like to metrics, read under the control lock.
#[derive(Debug)]
pub(crate) struct EndpointCounters {
    pub(crate) endpoint: Endpoint,
    pub(crate) routable: bool,
    pub(crate) health: EndpointHealth,
    pub(crate) effective_weight: u32,
    pub(crate) ejections: u32,
    pub(crate) ejection_remaining: Option<Duration>,
    pub(crate) consecutive_failures: u64,
    pub(crate) counters: CounterValues,
    pub(crate) check: Option<HealthStatus>,
    pub(crate) latency_estimate: Option<Duration>,
}

/// Counters of one service, read under the control lock.
#[derive(Debug)]
pub(crate) struct ServiceCounters {
    pub(crate) name: DataArc<str>,
    pub(crate) strategy: LoadBalancingStrategy,
    pub(crate) table_version: u64,
    pub(crate) membership_version: u64,
    pub(crate) panic: bool,
    pub(crate) endpoints: Vec<EndpointCounters>,
    /// Removed endpoints (retiring and retired) together.
    pub(crate) removed: CounterValues,
    pub(crate) circuit_breaker: Option<CircuitBreakerMetrics>,
}
