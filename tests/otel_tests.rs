//! Traces and OpenTelemetry (feature `opentelemetry`), against the OpenTelemetry SDK's
//! in-memory exporters, tonic greeter servers and a grpc-core server (Python `grpcio`):
//!
//! * a call retried once is one `Sent.` call span with two `Attempt.` spans, each naming its
//!   endpoint, the second its retry reason, both under the caller's span;
//! * the grpc-core server reads the W3C `traceparent` it received from its invocation
//!   metadata: it carries the caller's trace id and the attempt span's id, and a remote
//!   caller's `tracestate` comes through (nothing is injected without an OpenTelemetry layer);
//! * `OtelMetrics` publishes names, units and values equal to `lb.metrics()` and to the
//!   Prometheus exposition.
//!
//! The grpcio interpreter is `TAI_LB_PYTHON`, else the venv `target/grpcio-venv` that
//! `.ci/run` creates; without one the grpcio test is skipped with a notice, unless
//! `TAI_LB_REQUIRE_GRPCIO=1` (as in CI) makes that a failure.
#![cfg(feature = "opentelemetry")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest};
use tai_loadbalancer::{
    BalancedChannel, Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, LocalityMode, OtelMetrics, ServiceRegistry, encode_prometheus,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Spans go to an in-memory exporter, through `tracing-opentelemetry`, on this thread (the
/// tests run on a current-thread runtime, so every task of the client runs here).
fn trace_to_memory() -> (
    InMemorySpanExporter,
    SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel-tests")));
    let guard = tracing::subscriber::set_default(subscriber);
    (exporter, provider, guard)
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

fn attr_i64(span: &SpanData, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::I64(v) => Some(*v),
        other => other.as_str().parse().ok(),
    }
}

async fn balancer(addresses: &[SocketAddr]) -> Arc<IntegratedLoadBalancer> {
    balancer_with(addresses, LoadBalancerConfig::default()).await
}

/// Every endpoint in zone `a`.
async fn balancer_with(addresses: &[SocketAddr], config: LoadBalancerConfig) -> Arc<IntegratedLoadBalancer> {
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch(
            "greeter",
            addresses
                .iter()
                .map(|a| Endpoint::new(*a, Some(EndpointMetadata::new().with_zone("a"))))
                .collect(),
        )
        .await
        .unwrap();
    let lb = Arc::new(
        IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
            .await
            .unwrap(),
    );
    lb.start().await.unwrap();
    lb
}

/// One call whose first attempt meets a server answering `UNAVAILABLE`: one call span, two
/// attempt spans under it (first on the refusing endpoint, with its status; second on the
/// other, with the retry reason), all in the caller's trace.
#[tokio::test(flavor = "current_thread")]
async fn a_call_retried_once_is_one_call_span_with_two_attempt_spans() {
    let (exporter, provider, _guard) = trace_to_memory();
    let refusing = GreeterServer::start("refusing").unwrap();
    refusing.state().refuse.store(true, Ordering::Relaxed);
    let serving = GreeterServer::start("serving").unwrap();
    let lb = balancer(&[refusing.address(), serving.address()]).await;
    // Every first attempt goes to the refusing server (while it counts as healthy).
    lb.set_failover_group(
        "greeter",
        Endpoint::new(refusing.address(), None),
        vec![Endpoint::new(serving.address(), None)],
    )
    .await
    .unwrap();
    let channel = BalancedChannel::builder(lb.clone(), "greeter").build().unwrap();
    let mut client = GreeterClient::new(channel);
    let caller = tracing::info_span!("caller");
    let reply = client
        .say_hello(HelloRequest {
            name: "ada".into(),
            ..Default::default()
        })
        .instrument(caller.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.server, "serving");
    let caller_trace = caller.context().span().span_context().trace_id();
    drop(caller);
    drop(client);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let calls: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "Sent.greeter.v1.Greeter/SayHello")
        .collect();
    assert_eq!(calls.len(), 1, "{spans:#?}");
    let call = calls[0];
    let mut attempts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "Attempt.greeter.v1.Greeter/SayHello")
        .collect();
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    attempts.sort_by_key(|s| attr_i64(s, "attempt"));
    for attempt in &attempts {
        assert_eq!(
            attempt.parent_span_id,
            call.span_context.span_id(),
            "an attempt is a child of its call"
        );
        assert_eq!(attempt.span_context.trace_id(), caller_trace);
        assert_eq!(attr_str(attempt, "rpc.method").as_deref(), Some("SayHello"));
        assert_eq!(
            attr_str(attempt, "rpc.service").as_deref(),
            Some("greeter.v1.Greeter")
        );
        assert!(attr(attempt, "latency_ms").is_some());
    }
    assert_eq!(
        call.span_context.trace_id(),
        caller_trace,
        "the call joins the caller's trace"
    );
    let caller_span = spans.iter().find(|s| s.name == "caller").unwrap();
    assert_eq!(call.parent_span_id, caller_span.span_context.span_id());

    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(attr_i64(first, "attempt"), Some(1));
    assert_eq!(attr_str(first, "endpoint"), Some(refusing.address().to_string()));
    assert_eq!(attr_str(first, "grpc.status").as_deref(), Some("UNAVAILABLE"));
    assert_eq!(attr_i64(first, "rpc.grpc.status_code"), Some(14));
    assert_eq!(attr(first, "retry_reason"), None, "the first attempt is no retry");
    assert_eq!(attr_i64(second, "attempt"), Some(2));
    assert_eq!(attr_str(second, "endpoint"), Some(serving.address().to_string()));
    assert_eq!(attr_str(second, "retry_reason").as_deref(), Some("UNAVAILABLE"));
    assert_eq!(attr_str(second, "grpc.status").as_deref(), Some("OK"));

    assert_eq!(attr_str(call, "lb.service").as_deref(), Some("greeter"));
    assert_eq!(attr_str(call, "rpc.method").as_deref(), Some("SayHello"));
    assert_eq!(attr_i64(call, "attempts"), Some(2), "{call:#?}");
    assert_eq!(attr_str(call, "grpc.status").as_deref(), Some("OK"));
    assert!(attr(call, "latency_ms").is_some());
    assert!(
        call.end_time >= attempts[1].end_time,
        "the call ends after its last attempt: {:?} {:?} {:?}",
        call.end_time,
        attempts[1].end_time,
        attempts[0].end_time
    );
    lb.stop().await.unwrap();
}

// ===== grpc-core (Python grpcio) =====

fn grpcio_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("TAI_LB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/grpcio-venv/bin/python"));
    let works = Command::new(&candidate)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(candidate);
    }
    let help = format!(
        "no Python with grpcio at {} (set TAI_LB_PYTHON, or run: python3 -m venv target/grpcio-venv && \
         target/grpcio-venv/bin/pip install grpcio grpcio-health-checking)",
        candidate.display()
    );
    assert!(
        std::env::var("TAI_LB_REQUIRE_GRPCIO").as_deref() != Ok("1"),
        "TAI_LB_REQUIRE_GRPCIO=1 but {help}"
    );
    eprintln!("SKIPPED (grpcio interop): {help}");
    None
}

/// `tests/otel_support/grpcio_traceparent.py` on 127.0.0.1, killed on drop.
struct GrpcioServer {
    address: SocketAddr,
    child: Child,
    _stdin: ChildStdin,
}

impl GrpcioServer {
    fn start(python: &Path) -> GrpcioServer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otel_support/grpcio_traceparent.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg("grpcio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        let port: u16 = ready
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line from the grpcio server: {ready:?}"));
        GrpcioServer {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for GrpcioServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `traceparent=...;tracestate=...` as the server reported it.
fn reported(message: &str) -> (String, String) {
    let (parent, state) = message.split_once(';').unwrap();
    (
        parent.strip_prefix("traceparent=").unwrap().to_owned(),
        state.strip_prefix("tracestate=").unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_grpcio_server_receives_the_callers_trace_in_its_metadata() {
    let Some(python) = grpcio_python() else { return };
    let server = GrpcioServer::start(&python);
    let (exporter, provider, guard) = trace_to_memory();
    let lb = balancer(&[server.address]).await;
    let channel = BalancedChannel::builder(lb.clone(), "greeter").build().unwrap();
    let mut client = GreeterClient::new(channel.clone());
    let caller = tracing::info_span!("caller");
    let reply = client
        .say_hello(HelloRequest {
            name: "ada".into(),
            ..Default::default()
        })
        .instrument(caller.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.server, "grpcio");
    let caller_trace = caller.context().span().span_context().trace_id();
    drop(caller);
    let (traceparent, tracestate) = reported(&reply.message);
    // W3C: version-traceid-parentid-flags.
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00");
    assert_eq!(
        fields[1],
        caller_trace.to_string(),
        "the server joins the caller's trace"
    );
    assert_eq!(fields[3], "01", "sampled");
    assert_eq!(tracestate, "-", "no trace state was set ({traceparent})");
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let attempt = spans
        .iter()
        .find(|s| s.name == "Attempt.greeter.v1.Greeter/SayHello")
        .expect("an attempt span");
    assert_eq!(
        SpanId::from_hex(fields[2]).unwrap(),
        attempt.span_context.span_id(),
        "the server's parent is the attempt's span"
    );

    // A caller continuing a remote trace with a trace state: the server gets that trace and
    // that state.
    let remote = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "abc")]).unwrap(),
    );
    let caller = tracing::info_span!("continuing");
    caller
        .set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
        .unwrap();
    let reply = client
        .say_hello(HelloRequest::default())
        .instrument(caller)
        .await
        .unwrap()
        .into_inner();
    let (traceparent, tracestate) = reported(&reply.message);
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the parent is our attempt, not the remote span"
    );
    assert_eq!(tracestate, "vendor=abc");

    // Without an OpenTelemetry layer nothing is injected.
    drop(guard);
    let reply = GreeterClient::new(channel)
        .say_hello(HelloRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reported(&reply.message), ("-".to_owned(), "-".to_owned()));
    lb.stop().await.unwrap();
}

// ===== OTLP metrics =====

/// A data point's name and sorted attributes.
type PointKey = (String, Vec<(String, String)>);

/// Every exported data point: `(name, sorted attributes) -> (unit, value as f64)`.
fn exported(exporter: &InMemoryMetricExporter) -> BTreeMap<PointKey, (String, f64)> {
    fn key(name: &str, attributes: impl Iterator<Item = KeyValue>) -> PointKey {
        let mut attributes: Vec<(String, String)> = attributes
            .map(|kv| (kv.key.to_string(), kv.value.as_str().into_owned()))
            .collect();
        attributes.sort();
        (name.to_owned(), attributes)
    }
    let mut out = BTreeMap::new();
    let resources = exporter.get_finished_metrics().unwrap();
    let latest = resources.last().expect("one collection");
    for scope in latest.scope_metrics() {
        for metric in scope.metrics() {
            let (name, unit) = (metric.name(), metric.unit().to_owned());
            let mut put = |attributes: Vec<KeyValue>, value: f64| {
                let previous = out.insert(key(name, attributes.into_iter()), (unit.clone(), value));
                assert!(previous.is_none(), "{name} observed twice");
            };
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    assert!(sum.is_monotonic(), "{name}");
                    for p in sum.data_points() {
                        put(p.attributes().cloned().collect(), p.value() as f64);
                    }
                }
                AggregatedMetrics::F64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        put(p.attributes().cloned().collect(), p.value());
                    }
                }
                AggregatedMetrics::I64(MetricData::Gauge(g)) => {
                    for p in g.data_points() {
                        put(p.attributes().cloned().collect(), p.value() as f64);
                    }
                }
                AggregatedMetrics::F64(MetricData::Gauge(g)) => {
                    for p in g.data_points() {
                        put(p.attributes().cloned().collect(), p.value());
                    }
                }
                other => panic!("{name}: unexpected data {other:?}"),
            }
        }
    }
    out
}

/// The same names, units and values as `lb.metrics()` (each family read from the snapshot
/// here, independently of the exporter) and as the Prometheus exposition, sample by sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_metrics_equal_the_snapshot_and_the_exposition() {
    let a = GreeterServer::start("a").unwrap();
    let b = GreeterServer::start("b").unwrap();
    // Zones on, so the local-pick families have samples too.
    let mut config = LoadBalancerConfig::default();
    config.locality.mode = LocalityMode::PreferLocal;
    config.locality.local_zone = Some("a".into());
    let lb = balancer_with(&[a.address(), b.address()], config).await;
    let channel = BalancedChannel::builder(lb.clone(), "greeter").build().unwrap();
    let mut client = GreeterClient::new(channel);
    for i in 0..20 {
        let request = HelloRequest {
            name: format!("call-{i}"),
            fail_with: if i % 5 == 0 { 13 } else { 0 }, // INTERNAL: counted as a failure
            ..Default::default()
        };
        let _ = client.say_hello(request).await;
    }
    lb.affinity_lookup_warmup();
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(exporter.clone())
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "tai-lb-test");
    let published = OtelMetrics::register(&lb, &meter);
    let snapshot = lb.metrics();
    let exposition = encode_prometheus(&lb);
    provider.force_flush().unwrap();
    let got = exported(&exporter);

    // From the snapshot, family by family.
    let service = snapshot.service("greeter").unwrap();
    let labels = |e: &SocketAddr, extra: Option<(&str, &str)>| {
        let mut l = vec![
            ("endpoint".to_owned(), e.to_string()),
            ("service".to_owned(), "greeter".to_owned()),
        ];
        if let Some((k, v)) = extra {
            l.push((k.to_owned(), v.to_owned()));
        }
        l.sort();
        l
    };
    let value = |name: &str, l: Vec<(String, String)>| -> (String, f64) {
        got.get(&(name.to_owned(), l.clone()))
            .cloned()
            .unwrap_or_else(|| panic!("{name} {l:?} not exported; got {:#?}", got.keys()))
    };
    let mut checked = 0;
    for e in &service.endpoints {
        let a = e.address;
        assert_eq!(
            value("tai_lb_picks_total", labels(&a, None)),
            (String::new(), e.selections as f64)
        );
        assert_eq!(
            value("tai_lb_requests_total", labels(&a, Some(("outcome", "success")))).1,
            e.successes as f64
        );
        assert_eq!(
            value("tai_lb_requests_total", labels(&a, Some(("outcome", "failure")))).1,
            e.failures as f64
        );
        assert!(e.failures > 0 && e.successes > 0, "{e:?}");
        assert_eq!(
            value("tai_lb_in_flight_requests", labels(&a, None)).1,
            e.in_flight as f64
        );
        assert_eq!(
            value("tai_lb_request_duration_seconds_count", labels(&a, None)),
            (String::new(), e.latency.count() as f64)
        );
        assert_eq!(
            value("tai_lb_request_duration_seconds_sum", labels(&a, None)),
            ("s".to_owned(), e.latency.sum().as_secs_f64())
        );
        assert_eq!(value("tai_lb_endpoint_routable", labels(&a, None)).1, 1.0);
        assert_eq!(
            value("tai_lb_endpoint_health", labels(&a, Some(("state", "healthy")))).1,
            1.0
        );
        assert_eq!(
            value("tai_lb_endpoint_health", labels(&a, Some(("state", "ejected")))).1,
            0.0
        );
        assert_eq!(
            value("tai_lb_endpoint_weight", labels(&a, None)).1,
            f64::from(e.effective_weight)
        );
        assert_eq!(
            value("tai_lb_endpoint_consecutive_failures", labels(&a, None)).1,
            e.consecutive_failures as f64
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
    let service_labels = |state: &str| {
        vec![
            ("service".to_owned(), "greeter".to_owned()),
            ("state".to_owned(), state.to_owned()),
        ]
    };
    assert_eq!(
        value("tai_lb_service_endpoints", service_labels("routable")).1,
        2.0
    );
    assert_eq!(
        value(
            "tai_lb_service_panic",
            vec![("service".to_owned(), "greeter".to_owned())]
        )
        .1,
        0.0
    );
    let service_label = vec![("service".to_owned(), "greeter".to_owned())];
    let selections: u64 = service.endpoints.iter().map(|e| e.selections).sum();
    assert!(selections >= 20);
    assert_eq!(
        value("tai_lb_local_picks_total", service_label.clone()).1,
        selections as f64,
        "every endpoint is local"
    );
    assert_eq!(value("tai_lb_local_pick_share", service_label).1, 1.0);
    assert_eq!(
        value("tai_lb_affinity_entries", Vec::new()).1,
        snapshot.affinity.entries as f64
    );

    // Against the exposition: every sample line (histogram buckets aside) is an exported
    // point with the same name, labels and value, and nothing else is exported.
    let mut lines = 0;
    for line in exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
    {
        let (series, number) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let mut l: Vec<(String, String)> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                l.sort();
                (name, l)
            }
            None => (series, Vec::new()),
        };
        let (unit, v) = value(name, labels);
        let expected: f64 = number.parse().unwrap();
        assert!(
            (v - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{line}: exported {v}"
        );
        assert_eq!(
            unit,
            if name.contains("_seconds") && !name.ends_with("_count") {
                "s"
            } else {
                ""
            },
            "{name}"
        );
        lines += 1;
    }
    assert_eq!(
        lines,
        got.len(),
        "the exposition and the export hold the same samples"
    );
    assert!(published.instrument_names().len() >= 19);
    drop(published);
    lb.stop().await.unwrap();
}

trait Warmup {
    fn affinity_lookup_warmup(&self);
}

impl Warmup for IntegratedLoadBalancer {
    /// A few affinity lookups, so the affinity counters are not all zero.
    fn affinity_lookup_warmup(&self) {
        for key in ["u1", "u2", "u1"] {
            self.select_with_affinity("greeter", key).unwrap();
        }
    }
}
