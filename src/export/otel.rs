//! OpenTelemetry metrics (feature `opentelemetry`): [`OtelMetrics`] publishes
//! [`IntegratedLoadBalancer::metrics`] through observable instruments of an OpenTelemetry
//! `Meter`, so any OpenTelemetry exporter (OTLP, ...) carries them.
//!
//! Names and units: see [`OtelMetrics`].
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, ObservableCounter, ObservableGauge};

use super::prometheus::{Family, Kind, Sample, endpoint_names, families};
use crate::sync::{DataArc, DataWeak, Mutex};
use crate::{EndpointHealth, EndpointMetrics, HealthStatus, IntegratedLoadBalancer, LoadBalancerMetrics};

/// How long one snapshot serves the instruments' callbacks (one collection reads one
/// snapshot, not one per instrument).
const SNAPSHOT_REUSE: Duration = Duration::from_millis(100);

/// One observed value with its attributes.
#[derive(Clone, Debug)]
enum Observed {
    U64(u64),
    I64(i64),
    F64(f64),
}

type Observations = HashMap<String, Vec<(Vec<KeyValue>, Observed)>>;

/// The latest snapshot as observations per instrument name.
struct Cache {
    balancer: DataWeak<IntegratedLoadBalancer>,
    latest: Mutex<Option<(Instant, DataArc<Observations>)>>,
}

impl Cache {
    fn observations(&self) -> Option<DataArc<Observations>> {
        let mut latest = self.latest.lock();
        if let Some((at, observations)) = &*latest {
            if at.elapsed() < SNAPSHOT_REUSE {
                return Some(observations.clone());
            }
        }
        let lb = self.balancer.upgrade()?;
        #[cfg(feature = "tls")]
        let tls = super::prometheus::tls_rows(&lb);
        #[cfg(not(feature = "tls"))]
        let tls = ();
        let observations = DataArc::new(observe(&lb.metrics(), &tls));
        *latest = Some((Instant::now(), observations.clone()));
        Some(observations)
    }
}

/// The instrument name of a family's samples (counters take `_total`).
fn instrument_name(family: &str, kind: Kind) -> String {
    match kind {
        Kind::Counter => format!("{family}_total"),
        Kind::Gauge | Kind::Histogram => family.to_owned(),
    }
}

fn unit_of(name: &str) -> &'static str {
    if name.ends_with("_seconds") || name.ends_with("_seconds_sum") {
        "s"
    } else {
        ""
    }
}

/// TLS rows of the exposition (feature `tls`), nothing otherwise.
#[cfg(feature = "tls")]
type TlsRows = Vec<(String, crate::TlsStats)>;
#[cfg(not(feature = "tls"))]
type TlsRows = ();

/// Every family of the exposition for `m` (and `tls`).
#[cfg_attr(
    not(feature = "tls"),
    allow(clippy::let_and_return, unused_mut, unused_variables)
)]
fn all_families<'m>(m: &'m LoadBalancerMetrics, names: &'m [String], tls: &'m TlsRows) -> Vec<Family<'m>> {
    let mut all = families(m, names);
    #[cfg(feature = "tls")]
    all.extend(super::prometheus::tls_families(tls));
    all
}

/// Every sample of `m` (and `tls`), by instrument name.
fn observe(m: &LoadBalancerMetrics, tls: &TlsRows) -> Observations {
    let names = endpoint_names(m);
    let mut out = Observations::new();
    for family in all_families(m, &names, tls) {
        let name = instrument_name(family.name, family.kind);
        for (labels, sample) in &family.samples {
            let attributes: Vec<KeyValue> = labels
                .pairs()
                .map(|(k, v)| KeyValue::new(k, v.to_owned()))
                .collect();
            match sample {
                Sample::Counter(v) => out
                    .entry(name.clone())
                    .or_default()
                    .push((attributes, Observed::U64(*v))),
                Sample::Gauge(v) => out
                    .entry(name.clone())
                    .or_default()
                    .push((attributes, Observed::I64(*v))),
                Sample::GaugeF(v) => out
                    .entry(name.clone())
                    .or_default()
                    .push((attributes, Observed::F64(*v))),
                Sample::Histogram(h) => {
                    out.entry(format!("{name}_count"))
                        .or_default()
                        .push((attributes.clone(), Observed::U64(h.count())));
                    out.entry(format!("{name}_sum"))
                        .or_default()
                        .push((attributes, Observed::F64(h.sum().as_secs_f64())));
                }
            }
        }
    }
    out
}

/// The shape of every instrument: `(name, help, value type)`, learnt from a snapshot in
/// which every family has samples, so that the list follows the exposition's code.
fn catalogue() -> Vec<(String, &'static str, Observed)> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let mut check = HealthStatus::new();
    check.last_latency = Some(Duration::from_millis(1));
    let endpoint = EndpointMetrics {
        address,
        weight: 1,
        effective_weight: 1,
        routable: true,
        health: EndpointHealth::Healthy,
        ejections: 0,
        ejection_remaining: None,
        consecutive_failures: 0,
        health_check: Some(check),
        selections: 0,
        successes: 0,
        failures: 0,
        in_flight: 0,
        mean_latency: None,
        latency: Default::default(),
        latency_estimate: Some(Duration::from_millis(1)),
    };
    let mut m = LoadBalancerMetrics::default();
    m.services.push(crate::ServiceMetrics {
        service: "s".into(),
        endpoints: vec![endpoint],
        local_picks: Some(0),
        local_pick_share: Some(0.0),
        ..Default::default()
    });
    #[cfg(feature = "tls")]
    let tls = vec![(
        "s".to_owned(),
        crate::TlsStats {
            generation: 1,
            loaded_at: std::time::SystemTime::UNIX_EPOCH,
            reloads: 0,
            failed_reloads: 0,
            last_error: None,
            client_certificate_not_after: Some(std::time::SystemTime::UNIX_EPOCH),
            ca_not_after: Some(std::time::SystemTime::UNIX_EPOCH),
            watching: None,
        },
    )];
    #[cfg(not(feature = "tls"))]
    let tls = ();
    let names = endpoint_names(&m);
    let mut out = Vec::new();
    for family in all_families(&m, &names, &tls) {
        let name = instrument_name(family.name, family.kind);
        match family.samples.first().map(|(_, s)| s) {
            Some(Sample::Counter(_)) => out.push((name, family.help, Observed::U64(0))),
            Some(Sample::Gauge(_)) => out.push((name, family.help, Observed::I64(0))),
            Some(Sample::GaugeF(_)) => out.push((name, family.help, Observed::F64(0.0))),
            Some(Sample::Histogram(_)) => {
                out.push((format!("{name}_count"), family.help, Observed::U64(0)));
                out.push((format!("{name}_sum"), family.help, Observed::F64(0.0)));
            }
            None => {}
        }
    }
    out
}

/// Publishes a balancer's metrics through OpenTelemetry observable instruments. Each collection by the meter's reader reads one
/// [`metrics`](IntegratedLoadBalancer::metrics) snapshot. Holds the balancer weakly (a
/// dropped balancer publishes nothing); the instruments stay registered while this value
/// lives. An OTLP set-up: [`docs::observability`](crate::docs::observability).
///
/// # Names and units
///
/// The instruments are the families of the Prometheus exposition ([`encode_prometheus`](crate::encode_prometheus)),
/// with the exposition's names, labels (as attributes) and values, read from the same
/// snapshot code:
///
/// * counters are `u64` observable counters named as exposed, `_total` included
///   (`tai_lb_requests_total`): an OpenTelemetry-to-Prometheus pipeline adds `_total` only
///   where it is missing, so the names come out unchanged;
/// * gauges are `i64` observable gauges (`f64` for durations in seconds and shares);
/// * the request-duration histogram has no observable form in OpenTelemetry: it is published
///   as its `tai_lb_request_duration_seconds_count` (counter) and
///   `tai_lb_request_duration_seconds_sum` (`f64` counter, seconds) series;
/// * units: `s` for the `_seconds` families, none for the others (counts; a unit of `1`
///   would make a Prometheus exporter append `_ratio`).
///
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use tai_loadbalancer::*;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("api", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await?;
/// let lb = Arc::new(IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?);
/// // The application's meter (here a global one; an OTLP pipeline in production).
/// let meter = opentelemetry::global::meter("my-service");
/// let _published = OtelMetrics::register(&lb, &meter);
/// # Ok(())
/// # }
/// ```
pub struct OtelMetrics {
    _counters: Vec<ObservableCounter<u64>>,
    _float_counters: Vec<ObservableCounter<f64>>,
    _gauges: Vec<ObservableGauge<i64>>,
    _float_gauges: Vec<ObservableGauge<f64>>,
    names: Vec<String>,
}

impl OtelMetrics {
    /// Registers one observable instrument per exposition family on `meter`.
    pub fn register(balancer: &DataArc<IntegratedLoadBalancer>, meter: &Meter) -> Self {
        let cache = DataArc::new(Cache {
            balancer: DataArc::downgrade(balancer),
            latest: Mutex::new(None),
        });
        let mut out = OtelMetrics {
            _counters: Vec::new(),
            _float_counters: Vec::new(),
            _gauges: Vec::new(),
            _float_gauges: Vec::new(),
            names: Vec::new(),
        };
        for (name, help, shape) in catalogue() {
            let unit = unit_of(&name);
            let (cache, key) = (cache.clone(), name.clone());
            let each = move |f: &mut dyn FnMut(&Observed, &[KeyValue])| {
                if let Some(observations) = cache.observations() {
                    for (attributes, value) in observations.get(&key).into_iter().flatten() {
                        f(value, attributes);
                    }
                }
            };
            out.names.push(name.clone());
            // One observable instrument of the family's kind; its callback reports the
            // family's samples of that kind from the shared snapshot.
            macro_rules! observable {
                ($builder:ident, $kind:ident) => {
                    meter
                        .$builder(name)
                        .with_description(help)
                        .with_unit(unit)
                        .with_callback(move |o| {
                            each(&mut |v, a| {
                                if let Observed::$kind(v) = v {
                                    o.observe(*v, a);
                                }
                            })
                        })
                        .build()
                };
            }
            match shape {
                Observed::U64(_) => out._counters.push(observable!(u64_observable_counter, U64)),
                Observed::F64(_) if name.ends_with("_sum") => {
                    out._float_counters.push(observable!(f64_observable_counter, F64))
                }
                Observed::F64(_) => out._float_gauges.push(observable!(f64_observable_gauge, F64)),
                Observed::I64(_) => out._gauges.push(observable!(i64_observable_gauge, I64)),
            }
        }
        out
    }

    /// The names of the instruments registered, in exposition order.
    pub fn instrument_names(&self) -> &[String] {
        &self.names
    }
}

impl fmt::Debug for OtelMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelMetrics")
            .field("instruments", &self.names.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_covers_every_family_of_the_exposition() {
        let names: Vec<String> = catalogue().into_iter().map(|(n, _, _)| n).collect();
        for family in [
            "tai_lb_picks_total",
            "tai_lb_requests_total",
            "tai_lb_in_flight_requests",
            "tai_lb_request_duration_seconds_count",
            "tai_lb_request_duration_seconds_sum",
            "tai_lb_endpoint_routable",
            "tai_lb_endpoint_health",
            "tai_lb_endpoint_weight",
            "tai_lb_endpoint_consecutive_failures",
            "tai_lb_endpoint_ejections",
            "tai_lb_health_checks_total",
            "tai_lb_health_check_duration_seconds",
            "tai_lb_endpoint_latency_estimate_seconds",
            "tai_lb_service_endpoints",
            "tai_lb_service_panic",
            "tai_lb_local_picks_total",
            "tai_lb_local_pick_share",
            "tai_lb_affinity_lookups_total",
            "tai_lb_affinity_entries",
            "tai_lb_affinity_evictions_total",
            "tai_lb_affinity_expirations_total",
        ] {
            assert!(
                names.iter().any(|n| n == family),
                "{family} missing from {names:?}"
            );
        }
        #[cfg(feature = "tls")]
        for family in [
            "tai_lb_tls_client_certificate_expiry_timestamp_seconds",
            "tai_lb_tls_ca_expiry_timestamp_seconds",
            "tai_lb_tls_generation",
            "tai_lb_tls_reloads_total",
        ] {
            assert!(
                names.iter().any(|n| n == family),
                "{family} missing from {names:?}"
            );
        }
        let tls = if cfg!(feature = "tls") { 4 } else { 0 };
        assert_eq!(names.len(), 21 + tls, "{names:?}");
        assert_eq!(unit_of("tai_lb_request_duration_seconds_sum"), "s");
        assert_eq!(unit_of("tai_lb_request_duration_seconds_count"), "");
        assert_eq!(unit_of("tai_lb_picks_total"), "");
    }
}
