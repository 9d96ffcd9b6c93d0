//! Prometheus exposition through `prometheus-client`: a [`Collector`] that reads the
//! balancer's snapshot at scrape time.
#![deny(unsafe_code)]

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{HEALTHS, LATENCY_BUCKETS_SECONDS, health_label};
use crate::sync::{DataArc, DataWeak};
use crate::{CircuitLimit, IntegratedLoadBalancer, LatencyHistogram, LoadBalancerMetrics};

/// A `prometheus-client` collector for one balancer: register it in your own
/// `prometheus_client::registry::Registry`; each scrape reads
/// [`IntegratedLoadBalancer::metrics`]. Holds the balancer weakly (a dropped balancer exports
/// nothing). `prometheus-client` writes OpenMetrics text; [`encode_prometheus`] writes the
/// same families in the classic Prometheus format.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use tai_loadbalancer::*;
/// use tai_loadbalancer::prometheus_client::registry::Registry;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("svc", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await?;
/// let lb = Arc::new(IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?);
/// lb.pick("svc")?.success();
///
/// let mut metrics = Registry::default();
/// metrics.register_collector(Box::new(PrometheusCollector::new(&lb)));
/// let mut text = String::new();
/// tai_loadbalancer::prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
/// assert!(text.contains(r#"tai_lb_requests_total{service="svc",endpoint="127.0.0.1:5001",outcome="success"} 1"#));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PrometheusCollector {
    balancer: DataWeak<IntegratedLoadBalancer>,
}

impl fmt::Debug for PrometheusCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrometheusCollector").finish_non_exhaustive()
    }
}

impl PrometheusCollector {
    /// A collector for `balancer`.
    pub fn new(balancer: &DataArc<IntegratedLoadBalancer>) -> Self {
        Self {
            balancer: DataArc::downgrade(balancer),
        }
    }
}

/// The balancer's metrics in the Prometheus text exposition format 0.0.4 (what
/// `promtool check metrics` checks and every scraper reads), for services without a
/// registry of their own. The [`PrometheusCollector`] writes the same families through a
/// `prometheus-client` registry (OpenMetrics).
///
/// With the `tls` feature, services with TLS settings (given to a
/// [`BalancedChannel`](crate::BalancedChannel) or to
/// [`HealthCheckManager::set_tls`](crate::HealthCheckManager::set_tls)) add
/// `tai_lb_tls_client_certificate_expiry_timestamp_seconds` and
/// `tai_lb_tls_ca_expiry_timestamp_seconds` (alert well before them),
/// `tai_lb_tls_generation` and `tai_lb_tls_reloads_total{outcome="applied"|"refused"}`, one
/// `service` label.
pub fn encode_prometheus(balancer: &DataArc<IntegratedLoadBalancer>) -> String {
    let metrics = balancer.metrics();
    let names = endpoint_names(&metrics);
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut all = families(&metrics, &names);
    #[cfg(feature = "tls")]
    let tls = tls_rows(balancer);
    #[cfg(feature = "tls")]
    all.extend(tls_families(&tls));
    render_text(&all)
}

/// Every service with TLS settings in `balancer`'s health checker (set by its channels),
/// with their state.
#[cfg(feature = "tls")]
pub(super) fn tls_rows(balancer: &IntegratedLoadBalancer) -> Vec<(String, crate::TlsStats)> {
    balancer
        .health_checks()
        .tls_services()
        .into_iter()
        .map(|(service, tls)| (service, tls.stats()))
        .collect()
}

/// The TLS families: certificate expiry (alert on it), generation and reloads per service.
#[cfg(feature = "tls")]
pub(super) fn tls_families(rows: &[(String, crate::TlsStats)]) -> Vec<Family<'_>> {
    let secs = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    fn service(s: &str) -> Labels<'_> {
        Labels {
            service: Some(s),
            ..Labels::default()
        }
    }
    let mut out = Vec::new();
    push(
        &mut out,
        "tai_lb_tls_client_certificate_expiry_timestamp_seconds",
        "When the client certificate in use expires (Unix seconds).",
        Kind::Gauge,
        rows.iter().filter_map(|(s, t)| {
            secs(t.client_certificate_not_after).map(|v| (service(s), Sample::Gauge(v)))
        }),
    );
    push(
        &mut out,
        "tai_lb_tls_ca_expiry_timestamp_seconds",
        "When the first trusted CA certificate expires (Unix seconds).",
        Kind::Gauge,
        rows.iter()
            .filter_map(|(s, t)| secs(t.ca_not_after).map(|v| (service(s), Sample::Gauge(v)))),
    );
    push(
        &mut out,
        "tai_lb_tls_generation",
        "The generation of the TLS material in use (1 at first, +1 per applied reload).",
        Kind::Gauge,
        rows.iter().map(|(s, t)| {
            (
                service(s),
                Sample::Gauge(i64::try_from(t.generation).unwrap_or(i64::MAX)),
            )
        }),
    );
    push(
        &mut out,
        "tai_lb_tls_reloads",
        "TLS file reloads, applied or refused (the last good set kept).",
        Kind::Counter,
        rows.iter().flat_map(|(s, t)| {
            [
                (
                    Labels {
                        extra: Some(("outcome", "applied")),
                        ..service(s)
                    },
                    Sample::Counter(t.reloads),
                ),
                (
                    Labels {
                        extra: Some(("outcome", "refused")),
                        ..service(s)
                    },
                    Sample::Counter(t.failed_reloads),
                ),
            ]
        }),
    );
    out
}

/// The text exposition of a snapshot taken earlier.
pub fn encode_prometheus_snapshot(metrics: &LoadBalancerMetrics) -> String {
    let names = endpoint_names(metrics);
    render_text(&families(metrics, &names))
}

/// Every endpoint's address as text, in snapshot order (formatted once per scrape).
pub(super) fn endpoint_names(m: &LoadBalancerMetrics) -> Vec<String> {
    m.services
        .iter()
        .flat_map(|s| s.endpoints.iter().map(|e| e.address.to_string()))
        .collect()
}

/// A sample's labels, borrowed from the snapshot (no allocation per sample).
#[derive(Clone, Copy, Default)]
pub(super) struct Labels<'m> {
    service: Option<&'m str>,
    endpoint: Option<&'m str>,
    /// A discovery source's name.
    source: Option<&'m str>,
    extra: Option<(&'static str, &'static str)>,
}

impl<'m> Labels<'m> {
    pub(super) fn pairs(&self) -> impl Iterator<Item = (&'static str, &'m str)> {
        self.service
            .map(|s| ("service", s))
            .into_iter()
            .chain(self.endpoint.map(|e| ("endpoint", e)))
            .chain(self.source.map(|s| ("source", s)))
            .chain(self.extra)
    }

    /// For `prometheus-client`.
    fn owned(&self) -> Vec<(&'static str, String)> {
        self.pairs().map(|(k, v)| (k, v.to_owned())).collect()
    }
}

fn ep_labels<'m>(service: &'m str, endpoint: &'m str) -> Labels<'m> {
    Labels {
        service: Some(service),
        endpoint: Some(endpoint),
        ..Labels::default()
    }
}

fn with<'m>(labels: &Labels<'m>, key: &'static str, value: &'static str) -> Labels<'m> {
    Labels {
        extra: Some((key, value)),
        ..*labels
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

pub(super) enum Sample<'m> {
    Counter(u64),
    Gauge(i64),
    GaugeF(f64),
    Histogram(&'m LatencyHistogram),
}

/// One metric family: its base name (counters without `_total`), help, type and samples.
pub(super) struct Family<'m> {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) kind: Kind,
    pub(super) samples: Vec<(Labels<'m>, Sample<'m>)>,
}

fn gauge(b: bool) -> Sample<'static> {
    Sample::Gauge(i64::from(b))
}

/// Cumulative `(le, count)` pairs for [`LATENCY_BUCKETS_SECONDS`], then `+Inf`.
fn cumulative_buckets(h: &LatencyHistogram) -> Vec<(f64, u64)> {
    let bounds_ns = LATENCY_BUCKETS_SECONDS.map(|le| (le * 1e9).round() as u64);
    let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
        .iter()
        .copied()
        .zip(h.cumulative_counts(&bounds_ns))
        .collect();
    out.push((f64::INFINITY, h.count()));
    out
}

impl Collector for PrometheusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let Some(lb) = self.balancer.upgrade() else {
            return Ok(());
        };
        let m = lb.metrics();
        let names = endpoint_names(&m);
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut all = families(&m, &names);
        #[cfg(feature = "tls")]
        let tls = tls_rows(&lb);
        #[cfg(feature = "tls")]
        all.extend(tls_families(&tls));
        for f in all {
            let metric_type = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, metric_type)?;
            for (labels, sample) in &f.samples {
                let labels = labels.owned();
                let mut e = metric.encode_family(&labels)?;
                match sample {
                    Sample::Counter(v) => ConstCounter::new(*v).encode(e)?,
                    Sample::Gauge(v) => ConstGauge::new(*v).encode(e)?,
                    Sample::GaugeF(v) => ConstGauge::new(*v).encode(e)?,
                    Sample::Histogram(h) => {
                        // prometheus-client wants per-bucket (not cumulative) counts.
                        let mut below = 0;
                        let buckets: Vec<(f64, u64)> = cumulative_buckets(h)
                            .into_iter()
                            .map(|(le, c)| {
                                let n = c - below;
                                below = c;
                                (if le.is_infinite() { f64::MAX } else { le }, n)
                            })
                            .collect();
                        e.encode_histogram::<NoLabelSet>(h.sum().as_secs_f64(), h.count(), &buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Renders families in the Prometheus text exposition format 0.0.4.
fn render_text(families: &[Family<'_>]) -> String {
    use std::fmt::Write as _;
    fn escaped(out: &mut String, v: &str) {
        if !v.contains(['\\', '"', '\n']) {
            out.push_str(v);
            return;
        }
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    }
    /// `k="v",k="v"` without braces.
    fn label_body(out: &mut String, labels: &Labels<'_>) {
        for (n, (k, v)) in labels.pairs().enumerate() {
            if n > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escaped(out, v);
            out.push('"');
        }
    }
    fn line(out: &mut String, name: &str, suffix: &str, body: &str, value: impl itoa::Integer) {
        out.push_str(name);
        out.push_str(suffix);
        if !body.is_empty() {
            out.push('{');
            out.push_str(body);
            out.push('}');
        }
        out.push(' ');
        out.push_str(itoa::Buffer::new().format(value));
        out.push('\n');
    }
    // `,le="0.001"}` and friends, rendered once.
    let le_suffix: Vec<String> = LATENCY_BUCKETS_SECONDS
        .iter()
        .map(|le| le.to_string())
        .chain(["+Inf".to_owned()])
        .map(|le| format!("le=\"{le}\"}}"))
        .collect();
    let mut out = String::with_capacity(families.iter().map(|f| f.samples.len()).sum::<usize>() * 96);
    let mut body = String::new();
    for f in families {
        let (name, kind) = match f.kind {
            Kind::Counter => (format!("{}_total", f.name), "counter"),
            Kind::Gauge => (f.name.to_owned(), "gauge"),
            Kind::Histogram => (f.name.to_owned(), "histogram"),
        };
        let _ = writeln!(out, "# HELP {name} {}", f.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (l, sample) in &f.samples {
            body.clear();
            label_body(&mut body, l);
            match sample {
                Sample::Counter(v) => line(&mut out, &name, "", &body, *v),
                Sample::Gauge(v) => line(&mut out, &name, "", &body, *v),
                Sample::GaugeF(v) => {
                    out.push_str(&name);
                    if !body.is_empty() {
                        let _ = write!(out, "{{{body}}}");
                    }
                    let _ = writeln!(out, " {v}");
                }
                Sample::Histogram(h) => {
                    for ((_, count), le) in cumulative_buckets(h).into_iter().zip(&le_suffix) {
                        out.push_str(&name);
                        out.push_str("_bucket{");
                        if !body.is_empty() {
                            out.push_str(&body);
                            out.push(',');
                        }
                        out.push_str(le);
                        out.push(' ');
                        out.push_str(itoa::Buffer::new().format(count));
                        out.push('\n');
                    }
                    out.push_str(&name);
                    out.push_str("_sum");
                    if !body.is_empty() {
                        let _ = write!(out, "{{{body}}}");
                    }
                    let _ = writeln!(out, " {}", h.sum().as_secs_f64());
                    line(&mut out, &name, "_count", &body, h.count());
                }
            }
        }
    }
    out
}

/// Adds a family to `out`, unless it has no samples.
fn push<'m>(
    out: &mut Vec<Family<'m>>,
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: impl IntoIterator<Item = (Labels<'m>, Sample<'m>)>,
) {
    let samples: Vec<_> = samples.into_iter().collect();
    if !samples.is_empty() {
        out.push(Family {
            name,
            help,
            kind,
            samples,
        });
    }
}

/// Every family of a snapshot (families without samples are left out).
/// `endpoint_names` holds every endpoint's address as text, in snapshot order.
pub(super) fn families<'m>(m: &'m LoadBalancerMetrics, endpoint_names: &'m [String]) -> Vec<Family<'m>> {
    let mut out = Vec::new();
    let endpoints = || {
        m.services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
            .zip(endpoint_names)
            .map(|((s, e), name)| (ep_labels(&s.service, name), s, e))
    };
    push(
        &mut out,
        "tai_lb_picks",
        "Endpoints handed out by the balancer (picks and selections).",
        Kind::Counter,
        endpoints().map(|(l, _, e)| (l, Sample::Counter(e.selections))),
    );
    push(
        &mut out,
        "tai_lb_requests",
        "Request outcomes reported to the balancer.",
        Kind::Counter,
        endpoints().flat_map(|(l, _, e)| {
            [
                (with(&l, "outcome", "success"), Sample::Counter(e.successes)),
                (with(&l, "outcome", "failure"), Sample::Counter(e.failures)),
            ]
        }),
    );
    push(
        &mut out,
        "tai_lb_in_flight_requests",
        "Requests picked and not yet finished.",
        Kind::Gauge,
        endpoints().map(|(l, _, e)| (l, Sample::Gauge(e.in_flight as i64))),
    );
    push(
        &mut out,
        "tai_lb_request_duration_seconds",
        "Latency of requests reported with an outcome.",
        Kind::Histogram,
        endpoints().map(|(l, _, e)| (l, Sample::Histogram(&e.latency))),
    );
    push(
        &mut out,
        "tai_lb_endpoint_routable",
        "Whether new picks can go to the endpoint (1) or not (0).",
        Kind::Gauge,
        endpoints().map(|(l, _, e)| (l, gauge(e.routable))),
    );
    push(
        &mut out,
        "tai_lb_endpoint_health",
        "The endpoint's health as routing sees it (1 for the current state).",
        Kind::Gauge,
        endpoints().flat_map(|(l, _, e)| {
            HEALTHS.map(|h| (with(&l, "state", health_label(h)), gauge(e.health == h)))
        }),
    );
    push(
        &mut out,
        "tai_lb_endpoint_weight",
        "The endpoint's effective weight (after slow start).",
        Kind::Gauge,
        endpoints().map(|(l, _, e)| (l, Sample::Gauge(i64::from(e.effective_weight)))),
    );
    push(
        &mut out,
        "tai_lb_endpoint_consecutive_failures",
        "Failures reported in a row (outlier detection).",
        Kind::Gauge,
        endpoints().map(|(l, _, e)| (l, Sample::Gauge(e.consecutive_failures as i64))),
    );
    push(
        &mut out,
        "tai_lb_endpoint_ejections",
        "Outlier ejections of the endpoint (decays while it behaves).",
        Kind::Gauge,
        endpoints().map(|(l, _, e)| (l, Sample::Gauge(i64::from(e.ejections)))),
    );
    push(
        &mut out,
        "tai_lb_health_checks",
        "Active health checks run.",
        Kind::Counter,
        endpoints().flat_map(|(l, _, e)| {
            e.health_check.as_ref().into_iter().flat_map(move |c| {
                [
                    (
                        with(&l, "result", "success"),
                        Sample::Counter(c.checks - c.failed_checks.min(c.checks)),
                    ),
                    (with(&l, "result", "failure"), Sample::Counter(c.failed_checks)),
                ]
            })
        }),
    );
    push(
        &mut out,
        "tai_lb_health_check_duration_seconds",
        "Duration of the endpoint's last active health check.",
        Kind::Gauge,
        endpoints().filter_map(|(l, _, e)| {
            let latency = e.health_check.as_ref()?.last_latency?;
            Some((l, Sample::GaugeF(latency.as_secs_f64())))
        }),
    );
    push(
        &mut out,
        "tai_lb_endpoint_latency_estimate_seconds",
        "The endpoint's Peak-EWMA latency estimate (peak_ewma services with a sample).",
        Kind::Gauge,
        endpoints().filter_map(|(l, _, e)| Some((l, Sample::GaugeF(e.latency_estimate?.as_secs_f64())))),
    );
    push(
        &mut out,
        "tai_lb_service_endpoints",
        "Endpoints of the service: all members, and the routable ones.",
        Kind::Gauge,
        m.services.iter().flat_map(|s| {
            [
                (
                    Labels {
                        service: Some(&s.service),
                        extra: Some(("state", "total")),
                        ..Labels::default()
                    },
                    Sample::Gauge(s.endpoints_total as i64),
                ),
                (
                    Labels {
                        service: Some(&s.service),
                        extra: Some(("state", "routable")),
                        ..Labels::default()
                    },
                    Sample::Gauge(s.endpoints_routable as i64),
                ),
            ]
        }),
    );
    push(
        &mut out,
        "tai_lb_service_panic",
        "Whether the service is in panic mode (routing to all endpoints regardless of health).",
        Kind::Gauge,
        m.services.iter().map(|s| {
            (
                Labels {
                    service: Some(&s.service),
                    ..Labels::default()
                },
                gauge(s.panic),
            )
        }),
    );
    let service_labels = |s: &'m crate::ServiceMetrics| Labels {
        service: Some(&s.service),
        ..Labels::default()
    };
    push(
        &mut out,
        "tai_lb_local_picks",
        "Picks that went to an endpoint in the balancer's local zone ([locality] local_zone).",
        Kind::Counter,
        m.services
            .iter()
            .filter_map(|s| Some((service_labels(s), Sample::Counter(s.local_picks?)))),
    );
    push(
        &mut out,
        "tai_lb_local_pick_share",
        "Share of the current endpoints' picks that stayed in the local zone (0 to 1).",
        Kind::Gauge,
        m.services
            .iter()
            .filter_map(|s| Some((service_labels(s), Sample::GaugeF(s.local_pick_share?)))),
    );
    let breakers = || {
        m.services.iter().filter_map(|s| {
            s.circuit_breaker.as_ref().map(|b| {
                (
                    Labels {
                        service: Some(s.service.as_str()),
                        ..Labels::default()
                    },
                    b,
                )
            })
        })
    };
    push(
        &mut out,
        "tai_lb_circuit_open",
        "Calls a circuit breaker refused, per limit (max_connections_per_endpoint: connections not opened).",
        Kind::Counter,
        breakers().flat_map(|(l, b)| {
            CircuitLimit::ALL.map(|limit| (with(&l, "limit", limit.as_str()), Sample::Counter(b.open(limit))))
        }),
    );
    push(
        &mut out,
        "tai_lb_circuit_breaker_limit",
        "A circuit breaker's configured limits (the ones set).",
        Kind::Gauge,
        breakers().flat_map(|(l, b)| {
            CircuitLimit::ALL.into_iter().filter_map(move |limit| {
                let max = b.limits.limit(limit)?;
                Some((with(&l, "limit", limit.as_str()), Sample::Gauge(i64::from(max))))
            })
        }),
    );
    push(
        &mut out,
        "tai_lb_circuit_breaker_active",
        "What each set limit counts now: requests in flight, calls pending, retries in flight, connections.",
        Kind::Gauge,
        breakers().flat_map(|(l, b)| {
            let active = [b.requests, b.pending, b.retries, b.connections];
            CircuitLimit::ALL.into_iter().filter_map(move |limit| {
                b.limits.limit(limit)?;
                let n = i64::try_from(active[limit.index()]).unwrap_or(i64::MAX);
                Some((with(&l, "limit", limit.as_str()), Sample::Gauge(n)))
            })
        }),
    );
    let a = &m.affinity;
    push(
        &mut out,
        "tai_lb_affinity_lookups",
        "Session-affinity lookups: hits, misses, and hits whose endpoint had left (moved).",
        Kind::Counter,
        [("hit", a.hits), ("miss", a.misses), ("moved", a.moved)].map(|(r, n)| {
            (
                Labels {
                    extra: Some(("result", r)),
                    ..Labels::default()
                },
                Sample::Counter(n),
            )
        }),
    );
    push(
        &mut out,
        "tai_lb_affinity_entries",
        "Session-affinity bindings held.",
        Kind::Gauge,
        [(none(), Sample::Gauge(a.entries as i64))],
    );
    push(
        &mut out,
        "tai_lb_affinity_evictions",
        "Session-affinity bindings evicted to stay within max_entries.",
        Kind::Counter,
        [(none(), Sample::Counter(a.evictions))],
    );
    push(
        &mut out,
        "tai_lb_affinity_expirations",
        "Session-affinity bindings expired after their TTL.",
        Kind::Counter,
        [(none(), Sample::Counter(a.expirations))],
    );
    out
}

/// No labels.
fn none() -> Labels<'static> {
    Labels::default()
}

/// A connection pool's counters in the Prometheus text format (`tai_lb_pool_*`, one
/// `endpoint` label), to append to [`encode_prometheus`]'s output or serve beside it.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{ConnectionPool, PoolConfig, TcpConnector, encode_pool_prometheus};
/// let pool = ConnectionPool::new(PoolConfig::default(), TcpConnector::new()).unwrap();
/// let text = encode_pool_prometheus(&pool);
/// assert!(text.is_empty(), "no endpoint has a pool yet");
/// ```
#[cfg(feature = "runtime")]
pub fn encode_pool_prometheus<C: crate::Connector>(pool: &crate::ConnectionPool<C>) -> String {
    let stats = pool.endpoints();
    let names: Vec<String> = stats.iter().map(|(a, _)| a.to_string()).collect();
    let rows = || {
        stats.iter().zip(&names).map(|((_, s), name)| {
            (
                Labels {
                    endpoint: Some(name.as_str()),
                    ..Labels::default()
                },
                s,
            )
        })
    };
    let mut families: Vec<Family<'_>> = Vec::new();
    push(
        &mut families,
        "tai_lb_pool_connections",
        "Open pooled connections by state.",
        Kind::Gauge,
        rows().flat_map(|(l, s)| {
            [
                (with(&l, "state", "idle"), Sample::Gauge(s.idle as i64)),
                (with(&l, "state", "in_use"), Sample::Gauge(s.in_use as i64)),
                (
                    with(&l, "state", "connecting"),
                    Sample::Gauge(s.connecting as i64),
                ),
            ]
        }),
    );
    push(
        &mut families,
        "tai_lb_pool_waiters",
        "Callers waiting for a pooled connection.",
        Kind::Gauge,
        rows().map(|(l, s)| (l, Sample::Gauge(s.waiters as i64))),
    );
    for (name, help, value) in [
        (
            "tai_lb_pool_connections_created",
            "Pooled connections opened.",
            (|s: &crate::PoolStats| s.created) as fn(&crate::PoolStats) -> u64,
        ),
        (
            "tai_lb_pool_connections_closed",
            "Pooled connections closed.",
            |s| s.closed,
        ),
        (
            "tai_lb_pool_acquire_timeouts",
            "Acquires that gave up after acquire_timeout.",
            |s| s.timeouts,
        ),
        (
            "tai_lb_pool_rejected",
            "Acquires refused because max_waiters were waiting.",
            |s| s.rejected,
        ),
        (
            "tai_lb_pool_connect_errors",
            "Connects that failed or timed out.",
            |s| s.connect_errors,
        ),
    ] {
        push(
            &mut families,
            name,
            help,
            Kind::Counter,
            rows().map(|(l, s)| (l, Sample::Counter(value(s)))),
        );
    }
    render_text(&families)
}

/// A [`DiscoveryRunner`](crate::DiscoveryRunner)'s per-source health and counters in the
/// Prometheus text format (one `source` label: the source's
/// [`name`](crate::Discovery::name)), to append to [`encode_prometheus`]'s output or serve
/// beside it. Alert on `tai_lb_discovery_source_healthy == 0`: the source is degraded (its
/// services route on their last membership) or has not loaded yet.
///
/// | metric | type |
/// |---|---|
/// | `tai_lb_discovery_source_healthy` | gauge (1 healthy, 0 starting, degraded or stopped) |
/// | `tai_lb_discovery_updates_total` | counter: updates published |
/// | `tai_lb_discovery_applied_total` | counter: registry changes made from them |
/// | `tai_lb_discovery_malformed_total` | counter: records skipped as malformed |
/// | `tai_lb_discovery_rejected_total` | counter: updates the registry rejected |
/// | `tai_lb_discovery_conflicts_total` | counter: updates for a service another source owns |
/// | `tai_lb_discovery_degradations_total` | counter: changes to degraded |
/// | `tai_lb_discovery_registry_writes_total` | counter (no label): registry writes, all sources |
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tai_loadbalancer::{DiscoveryRunner, ServiceRegistry, encode_discovery_prometheus};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let runner = DiscoveryRunner::new(Arc::new(ServiceRegistry::new()));
/// let text = encode_discovery_prometheus(&runner);
/// assert!(text.contains("tai_lb_discovery_registry_writes_total 0"));
/// # });
/// ```
#[cfg(feature = "runtime")]
pub fn encode_discovery_prometheus(runner: &crate::DiscoveryRunner) -> String {
    let stats = runner.stats();
    let writes = runner.registry_writes();
    let rows = || {
        stats.iter().map(|s| {
            (
                Labels {
                    source: Some(s.name.as_str()),
                    ..Labels::default()
                },
                s,
            )
        })
    };
    let mut families: Vec<Family<'_>> = Vec::new();
    push(
        &mut families,
        "tai_lb_discovery_source_healthy",
        "Whether the discovery source is healthy (1) or starting, degraded or stopped (0).",
        Kind::Gauge,
        rows().map(|(l, s)| (l, gauge(s.health == crate::SourceHealth::Healthy))),
    );
    for (name, help, value) in [
        (
            "tai_lb_discovery_updates",
            "Membership updates published by the source.",
            (|s: &crate::SourceStats| s.updates) as fn(&crate::SourceStats) -> u64,
        ),
        (
            "tai_lb_discovery_applied",
            "Registry changes made from the source's updates (after coalescing).",
            |s| s.applied,
        ),
        (
            "tai_lb_discovery_malformed",
            "Records the source skipped as malformed.",
            |s| s.malformed,
        ),
        (
            "tai_lb_discovery_rejected",
            "Updates from the source the registry rejected.",
            |s| s.rejected,
        ),
        (
            "tai_lb_discovery_conflicts",
            "Updates skipped because another source owns the service.",
            |s| s.conflicts,
        ),
        (
            "tai_lb_discovery_degradations",
            "Times the source became degraded.",
            |s| s.degradations,
        ),
    ] {
        push(
            &mut families,
            name,
            help,
            Kind::Counter,
            rows().map(|(l, s)| (l, Sample::Counter(value(s)))),
        );
    }
    push(
        &mut families,
        "tai_lb_discovery_registry_writes",
        "Registry writes made by the discovery runner (all sources, after coalescing).",
        Kind::Counter,
        [(none(), Sample::Counter(writes))],
    );
    render_text(&families)
}
