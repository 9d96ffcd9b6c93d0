//! Metric export: Prometheus exposition, the `metrics` facade, and custom exporters.
//!
//! Owns the integrations that *read* [`LoadBalancerMetrics`] snapshots and hand them to a
//! monitoring system. Nothing here touches the data plane: every exporter reads the same
//! pull-model snapshot ([`IntegratedLoadBalancer::metrics`]) at scrape or export time, and the
//! library never installs a global registry or recorder.
//!
//! # Names
//!
//! Every metric is prefixed `tai_lb_`, follows Prometheus conventions (base units: seconds;
//! `_total` for counters) and carries `service` and `endpoint` labels where they apply. The
//! request-duration histogram mirrors gRPC's OpenTelemetry `grpc.client.attempt.duration`
//! (seconds, the same bucket boundaries up to 10 s).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tai_lb_picks_total` | counter | service, endpoint |
//! | `tai_lb_requests_total` | counter | service, endpoint, outcome (`success`/`failure`) |
//! | `tai_lb_in_flight_requests` | gauge | service, endpoint |
//! | `tai_lb_request_duration_seconds` | histogram | service, endpoint |
//! | `tai_lb_endpoint_routable` | gauge (0/1) | service, endpoint |
//! | `tai_lb_endpoint_health` | gauge (state set) | service, endpoint, state |
//! | `tai_lb_endpoint_weight` | gauge | service, endpoint |
//! | `tai_lb_endpoint_consecutive_failures` | gauge | service, endpoint |
//! | `tai_lb_endpoint_ejections` | gauge | service, endpoint |
//! | `tai_lb_health_checks_total` | counter | service, endpoint, result (`success`/`failure`) |
//! | `tai_lb_health_check_duration_seconds` | gauge (last check) | service, endpoint |
//! | `tai_lb_endpoint_latency_estimate_seconds` | gauge (`peak_ewma` services) | service, endpoint |
//! | `tai_lb_service_endpoints` | gauge | service, state (`total`/`routable`) |
//! | `tai_lb_service_panic` | gauge (0/1) | service |
//! | `tai_lb_affinity_lookups_total` | counter | result (`hit`/`miss`/`moved`) |
//! | `tai_lb_affinity_entries` | gauge | |
//! | `tai_lb_affinity_evictions_total`, `tai_lb_affinity_expirations_total` | counter | |
//!
//! Discovery sources ([`encode_discovery_prometheus`], with `prometheus` and `runtime`):
//! `tai_lb_discovery_source_healthy` (gauge, 0/1) and the counters
//! `tai_lb_discovery_{updates,applied,malformed,rejected,conflicts,degradations}_total`, each
//! with a `source` label, plus `tai_lb_discovery_registry_writes_total`.
//!
//! Endpoints that leave a service leave the exposition with it (their counts stay in the
//! service's totals in [`LoadBalancerMetrics`]), so label sets do not grow without bound.
#![deny(unsafe_code)]

#[cfg(feature = "metrics")]
mod facade;
#[cfg(feature = "opentelemetry")]
mod otel;
#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "metrics-server")]
mod server;

#[cfg(feature = "metrics")]
pub use facade::MetricsFacadeExporter;
#[cfg(feature = "opentelemetry")]
pub use otel::OtelMetrics;
#[cfg(feature = "prometheus")]
pub use prometheus::{PrometheusCollector, encode_prometheus, encode_prometheus_snapshot};
#[cfg(all(feature = "prometheus", feature = "runtime"))]
pub use prometheus::{encode_discovery_prometheus, encode_pool_prometheus};
#[cfg(feature = "metrics-server")]
pub use server::{MetricsServer, serve_metrics};

use crate::{EndpointHealth, LoadBalancerMetrics};

/// Request-duration histogram bucket boundaries, in seconds (gRPC OpenTelemetry's, to 10 s).
pub const LATENCY_BUCKETS_SECONDS: [f64; 22] = [
    0.0001, 0.0003, 0.0006, 0.001, 0.002, 0.004, 0.006, 0.01, 0.016, 0.025, 0.04, 0.065, 0.1, 0.16, 0.25,
    0.4, 0.65, 1.0, 2.0, 5.0, 10.0, 20.0,
];

/// A destination for metric snapshots: implement it to export to any system.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{LoadBalancerMetrics, MetricsExporter};
///
/// struct Log;
///
/// impl MetricsExporter for Log {
///     fn export(&mut self, metrics: &LoadBalancerMetrics) {
///         for s in &metrics.services {
///             println!("{}: {} requests, p99 {:?}", s.service, s.total_requests, s.latency.p99());
///         }
///     }
/// }
/// # let mut log = Log;
/// # log.export(&LoadBalancerMetrics::default());
/// ```
///
/// Run one periodically with [`IntegratedLoadBalancer::spawn_exporter`](crate::IntegratedLoadBalancer::spawn_exporter).
pub trait MetricsExporter: Send + 'static {
    /// Receives one snapshot.
    fn export(&mut self, metrics: &LoadBalancerMetrics);
}

/// The `state` label value of a health.
#[cfg_attr(not(any(feature = "prometheus", feature = "metrics")), allow(dead_code))]
pub(crate) fn health_label(h: EndpointHealth) -> &'static str {
    match h {
        EndpointHealth::Healthy => "healthy",
        EndpointHealth::Unhealthy => "unhealthy",
        EndpointHealth::Ejected => "ejected",
        EndpointHealth::Down => "down",
        EndpointHealth::Draining => "draining",
    }
}

/// Every health, for state-set gauges.
#[cfg_attr(not(any(feature = "prometheus", feature = "metrics")), allow(dead_code))]
pub(crate) const HEALTHS: [EndpointHealth; 5] = [
    EndpointHealth::Healthy,
    EndpointHealth::Unhealthy,
    EndpointHealth::Ejected,
    EndpointHealth::Down,
    EndpointHealth::Draining,
];

#[cfg(feature = "runtime")]
impl crate::IntegratedLoadBalancer {
    /// Hands a snapshot to `exporter` every `interval` (at least 10 ms) on the current tokio
    /// runtime, until the balancer is dropped (the task holds it weakly) or the returned handle
    /// is aborted.
    ///
    /// # Errors
    ///
    /// [`Error::Runtime`](crate::Error::Runtime) outside a tokio runtime.
    pub fn spawn_exporter<E: MetricsExporter>(
        self: &crate::sync::DataArc<Self>,
        interval: std::time::Duration,
        mut exporter: E,
    ) -> Result<tokio::task::JoinHandle<()>, crate::Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| crate::Error::Runtime {
            message: format!("spawn_exporter needs a tokio runtime: {e}"),
        })?;
        let balancer = crate::sync::DataArc::downgrade(self);
        let interval = interval.max(std::time::Duration::from_millis(10));
        Ok(runtime.spawn(async move {
            loop {
                let Some(lb) = balancer.upgrade() else { return };
                let metrics = lb.metrics();
                drop(lb);
                exporter.export(&metrics);
                tokio::time::sleep(interval).await;
            }
        }))
    }
}
