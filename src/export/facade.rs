//! Export to the [`metrics`] facade: any `metrics` exporter (Prometheus, StatsD, OTLP via
//! `metrics-exporter-otlp` or an OpenTelemetry bridge) receives the balancer's figures.
#![deny(unsafe_code)]

use super::{HEALTHS, MetricsExporter, health_label};
use crate::LoadBalancerMetrics;

/// Writes each snapshot into the `metrics` facade's current recorder (the one the
/// application installed; this crate never installs one): counters as absolute values,
/// gauges as set values, and latency percentiles as gauges
/// `tai_lb_request_duration_seconds{quantile=...}` (the facade has no pre-aggregated
/// histograms). Same names and labels as the Prometheus collector.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use std::time::Duration;
/// # use tai_loadbalancer::*;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("svc", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await?;
/// let lb = Arc::new(IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?);
/// // Export every 10 s to whatever recorder the application installed.
/// let task = lb.spawn_exporter(Duration::from_secs(10), MetricsFacadeExporter::new())?;
/// # task.abort();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct MetricsFacadeExporter {
    _private: (),
}

impl MetricsFacadeExporter {
    /// An exporter to the current `metrics` recorder.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MetricsExporter for MetricsFacadeExporter {
    fn export(&mut self, m: &LoadBalancerMetrics) {
        for s in &m.services {
            let service = s.service.clone();
            for e in &s.endpoints {
                let endpoint = e.address.to_string();
                let labels = [("service", service.clone()), ("endpoint", endpoint.clone())];
                metrics::counter!("tai_lb_picks_total", &labels).absolute(e.selections);
                let outcome = |o: &'static str| {
                    [
                        ("service", service.clone()),
                        ("endpoint", endpoint.clone()),
                        ("outcome", o.to_owned()),
                    ]
                };
                metrics::counter!("tai_lb_requests_total", &outcome("success")).absolute(e.successes);
                metrics::counter!("tai_lb_requests_total", &outcome("failure")).absolute(e.failures);
                metrics::gauge!("tai_lb_in_flight_requests", &labels).set(e.in_flight as f64);
                metrics::gauge!("tai_lb_endpoint_routable", &labels).set(f64::from(u8::from(e.routable)));
                metrics::gauge!("tai_lb_endpoint_weight", &labels).set(f64::from(e.effective_weight));
                metrics::gauge!("tai_lb_endpoint_consecutive_failures", &labels)
                    .set(e.consecutive_failures as f64);
                metrics::gauge!("tai_lb_endpoint_ejections", &labels).set(f64::from(e.ejections));
                if let Some(estimate) = e.latency_estimate {
                    metrics::gauge!("tai_lb_endpoint_latency_estimate_seconds", &labels)
                        .set(estimate.as_secs_f64());
                }
                for h in HEALTHS {
                    let state = [
                        ("service", service.clone()),
                        ("endpoint", endpoint.clone()),
                        ("state", health_label(h).to_owned()),
                    ];
                    metrics::gauge!("tai_lb_endpoint_health", &state).set(f64::from(u8::from(e.health == h)));
                }
                for (q, v) in [
                    ("0.5", e.latency.p50()),
                    ("0.95", e.latency.p95()),
                    ("0.99", e.latency.p99()),
                    ("0.999", e.latency.p999()),
                ] {
                    if let Some(v) = v {
                        let ql = [
                            ("service", service.clone()),
                            ("endpoint", endpoint.clone()),
                            ("quantile", q.to_owned()),
                        ];
                        metrics::gauge!("tai_lb_request_duration_seconds", &ql).set(v.as_secs_f64());
                    }
                }
            }
            let svc = [("service", service.clone())];
            metrics::gauge!("tai_lb_service_panic", &svc).set(f64::from(u8::from(s.panic)));
            if let Some(b) = &s.circuit_breaker {
                for limit in crate::CircuitLimit::ALL {
                    let labels = [("service", service.clone()), ("limit", limit.as_str().to_owned())];
                    metrics::counter!("tai_lb_circuit_open_total", &labels).absolute(b.open(limit));
                }
            }
        }
        let a = &m.affinity;
        metrics::counter!("tai_lb_affinity_lookups_total", "result" => "hit").absolute(a.hits);
        metrics::counter!("tai_lb_affinity_lookups_total", "result" => "miss").absolute(a.misses);
        metrics::counter!("tai_lb_affinity_lookups_total", "result" => "moved").absolute(a.moved);
        metrics::gauge!("tai_lb_affinity_entries").set(a.entries as f64);
    }
}
