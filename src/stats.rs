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

use crate::control::{EndpointCounters, ServiceCounters};
use crate::table::MemberHealth;
use crate::{HealthStatus, LatencyHistogram, LoadBalancingStrategy};

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
    /// Current endpoints, in address order.
    pub endpoints: Vec<EndpointMetrics>,
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

    pub(crate) fn from_counters(services: Vec<ServiceCounters>) -> Self {
        let mut m = LoadBalancerMetrics::default();
        for sc in services {
            let mut totals = sc.removed;
            let mut latency = crate::histogram::LatencyAccumulator::default();
            latency.add(&totals.latency);
            let mut endpoints = Vec::with_capacity(sc.endpoints.len());
            let mut routable = 0;
            for e in sc.endpoints {
                totals.add_counts(&e.counters);
                latency.add(&e.counters.latency);
                routable += usize::from(e.routable);
                endpoints.push(EndpointMetrics::new(e));
            }
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
                endpoints,
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

impl From<MemberHealth> for EndpointHealth {
    fn from(h: MemberHealth) -> Self {
        match h {
            MemberHealth::Healthy => Self::Healthy,
            MemberHealth::Unhealthy => Self::Unhealthy,
            MemberHealth::Ejected => Self::Ejected,
            MemberHealth::Down => Self::Down,
            MemberHealth::Draining => Self::Draining,
        }
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
