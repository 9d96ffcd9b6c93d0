//! Observability: exact counts under concurrency, percentiles against an exact sort, stats
//! across republication, bounded label sets, the Prometheus exposition checked by a real
//! `promtool`, the `metrics` facade and the `/metrics` server.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tai_loadbalancer::{
    Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, Outcome, ServiceRegistry,
};

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 31_000 + i))
}

async fn lb_with(n: u16, config: LoadBalancerConfig) -> (Arc<ServiceRegistry>, Arc<IntegratedLoadBalancer>) {
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..n).map(|i| Endpoint::new(addr(i), None)).collect())
        .await
        .unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    (registry, Arc::new(lb))
}

#[test]
fn counts_are_exact_under_two_thread_load() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_registry, lb) = rt.block_on(lb_with(8, LoadBalancerConfig::default()));
    rt.block_on(lb.start()).unwrap();
    const PER_THREAD: u64 = 50_000;
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let lb = &lb;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let pick = lb.pick("svc").unwrap();
                    let outcome = if (i + t) % 4 == 0 {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    pick.record(outcome, Some(Duration::from_micros(1 + i % 1_000)));
                }
            });
        }
    });
    let m = lb.metrics();
    assert_eq!(m.total_requests, 2 * PER_THREAD);
    assert_eq!(m.successful_requests + m.failed_requests, 2 * PER_THREAD);
    assert_eq!(m.failed_requests, 2 * PER_THREAD / 4);
    assert_eq!(m.latency.count(), 2 * PER_THREAD);
    assert_eq!(m.in_flight, 0);
    let per_endpoint: u64 = m.services[0].endpoints.iter().map(|e| e.latency.count()).sum();
    assert_eq!(per_endpoint, 2 * PER_THREAD);
    rt.block_on(lb.stop()).unwrap();
}

#[tokio::test]
async fn percentiles_are_within_one_percent_of_an_exact_sort() {
    let (_registry, lb) = lb_with(4, LoadBalancerConfig::default()).await;
    let mut recorded = Vec::new();
    for i in 0..20_000u64 {
        // Log-uniform from 50 µs to 5 s.
        let x = (i.wrapping_mul(0x9E37_79B9) % 10_000) as f64 / 10_000.0;
        let ns = (50_000.0 * 100_000f64.powf(x)) as u64;
        recorded.push(ns);
        lb.record_result(
            "svc",
            &Endpoint::new(addr((i % 4) as u16), None),
            Outcome::Success,
            Some(Duration::from_nanos(ns)),
        )
        .unwrap();
    }
    recorded.sort_unstable();
    let m = lb.metrics();
    for (p, ours) in [
        (50.0, m.latency.p50()),
        (95.0, m.latency.p95()),
        (99.0, m.latency.p99()),
        (99.9, m.latency.p999()),
    ] {
        let rank = ((p / 100.0) * recorded.len() as f64).ceil() as usize;
        let exact = recorded[rank - 1] as f64;
        let ours = ours.unwrap().as_nanos() as f64;
        assert!(
            (ours - exact).abs() / exact <= 0.01,
            "p{p}: {ours} vs exact {exact}"
        );
    }
    assert_eq!(
        m.latency.max().unwrap().as_nanos() as u64,
        *recorded.last().unwrap()
    );
    // The service's histogram is the merge of its endpoints'.
    let s = m.service("svc").unwrap();
    assert_eq!(s.latency, m.latency);
    assert_eq!(s.endpoints.iter().map(|e| e.latency.count()).sum::<u64>(), 20_000);
}

#[tokio::test]
async fn endpoint_stats_survive_republication_and_removed_series_are_dropped() {
    let (registry, lb) = lb_with(3, LoadBalancerConfig::default()).await;
    for _ in 0..30 {
        lb.pick("svc")
            .unwrap()
            .record(Outcome::Success, Some(Duration::from_millis(2)));
    }
    let before = lb
        .metrics()
        .service("svc")
        .unwrap()
        .endpoint(addr(1))
        .unwrap()
        .clone();
    assert_eq!((before.successes, before.latency.count()), (10, 10));
    // Republish several times: a new member, an operator mark-down and mark-up.
    registry
        .register("svc", Endpoint::new(addr(9), None))
        .await
        .unwrap();
    lb.mark_down("svc", &Endpoint::new(addr(0), None)).await.unwrap();
    lb.mark_up("svc", &Endpoint::new(addr(0), None)).await.unwrap();
    let after = lb
        .metrics()
        .service("svc")
        .unwrap()
        .endpoint(addr(1))
        .unwrap()
        .clone();
    assert_eq!(
        (after.successes, after.selections),
        (before.successes, before.selections)
    );
    assert_eq!(after.latency, before.latency);

    // Removing an endpoint removes its series, but not its counts from the service.
    registry
        .deregister("svc", &Endpoint::new(addr(1), None))
        .await
        .unwrap();
    let m = lb.metrics();
    let s = m.service("svc").unwrap();
    assert!(s.endpoint(addr(1)).is_none());
    assert_eq!(s.successful_requests, 30);
    assert_eq!(s.latency.count(), 30);
    #[cfg(feature = "prometheus")]
    {
        let text = tai_loadbalancer::encode_prometheus(&lb);
        assert!(
            !text.contains(&addr(1).to_string()),
            "removed endpoint still exported"
        );
        assert!(text.contains(&addr(2).to_string()));
    }
}

#[tokio::test]
async fn requests_per_second_over_the_recent_window() {
    let (_registry, lb) = lb_with(2, LoadBalancerConfig::default()).await;
    assert_eq!(lb.metrics().requests_per_second, None, "no earlier snapshot");
    for _ in 0..500 {
        lb.pick("svc").unwrap().success();
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..500 {
        lb.pick("svc").unwrap().success();
    }
    let rps = lb.metrics().requests_per_second.unwrap();
    // 1,000 picks since the first snapshot, 1.1 s (plus scheduling) ago.
    assert!(rps > 100.0 && rps <= 1_000.0 / 1.1 + 1.0, "{rps}");
}

#[cfg(feature = "prometheus")]
mod prometheus {
    use super::*;
    use tai_loadbalancer::{AffinityConfig, HealthCheckConfig, HealthCheckKind};

    /// Traffic, failures, latencies, affinity, and active health checks (one endpoint
    /// listening, one not): then the exposition.
    async fn exposition_with_everything() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let registry = Arc::new(ServiceRegistry::new());
        registry
            .register_batch("api", vec![Endpoint::new(up, None), Endpoint::new(dead, None)])
            .await
            .unwrap();
        registry
            .register("cache", Endpoint::new(addr(5), None))
            .await
            .unwrap();
        let config = LoadBalancerConfig {
            health_check: HealthCheckConfig {
                enabled: true,
                interval: Duration::from_millis(50),
                timeout: Duration::from_millis(40),
                unhealthy_threshold: 1,
                healthy_threshold: 1,
                grace_period: Duration::ZERO,
                jitter: Duration::ZERO,
                check: HealthCheckKind::Tcp,
                ..Default::default()
            },
            affinity: AffinityConfig::default(),
            ..Default::default()
        };
        let lb = Arc::new(
            IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::LeastConnections, config)
                .await
                .unwrap(),
        );
        lb.start().await.unwrap();
        for i in 0..200u64 {
            let pick = lb.pick("api").unwrap();
            let outcome = if i % 7 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            pick.record(outcome, Some(Duration::from_micros(100 + 37 * i)));
            lb.select_with_affinity("cache", &format!("user-{}", i % 13))
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = tai_loadbalancer::encode_prometheus(&lb);
        lb.stop().await.unwrap();
        text
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exposition_has_the_documented_families_and_passes_promtool() {
        let text = exposition_with_everything().await;
        for family in [
            "tai_lb_picks_total",
            "tai_lb_requests_total",
            "tai_lb_in_flight_requests",
            "tai_lb_request_duration_seconds_bucket",
            "tai_lb_request_duration_seconds_sum",
            "tai_lb_request_duration_seconds_count",
            "tai_lb_endpoint_routable",
            "tai_lb_endpoint_health",
            "tai_lb_health_checks_total",
            "tai_lb_health_check_duration_seconds",
            "tai_lb_service_endpoints",
            "tai_lb_affinity_lookups_total",
            "tai_lb_affinity_entries",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
        assert!(
            text.contains(r#"state="unhealthy"} 1"#),
            "the dead endpoint is unhealthy:\n{text}"
        );
        assert!(text.contains(r#"le="+Inf""#));

        common::promtool_check(&text);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_consistent() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_r, lb) = rt.block_on(lb_with(1, LoadBalancerConfig::default()));
        for ms in [1u64, 1, 3, 50, 50, 50, 700, 15_000] {
            lb.pick("svc")
                .unwrap()
                .record(Outcome::Success, Some(Duration::from_millis(ms)));
        }
        let text = tai_loadbalancer::encode_prometheus(&lb);
        let bucket = |le: &str| -> u64 {
            let needle = format!(r#"le="{le}"}} "#);
            let line = text
                .lines()
                .find(|l| l.starts_with("tai_lb_request_duration_seconds_bucket") && l.contains(&needle))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(
            bucket("0.001"),
            0,
            "1 ms values sit in a bucket ending just above 1 ms"
        );
        assert_eq!(bucket("0.002"), 2);
        assert_eq!(bucket("0.004"), 3);
        assert_eq!(bucket("0.065"), 6);
        assert_eq!(bucket("1"), 7);
        assert_eq!(bucket("20"), 8);
        assert_eq!(bucket("+Inf"), 8);
        assert!(text.contains(
            r#"tai_lb_request_duration_seconds_count{service="svc",endpoint="127.0.0.1:31000"} 8"#
        ));
    }
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn the_metrics_facade_receives_the_same_figures() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tai_loadbalancer::{MetricsExporter, MetricsFacadeExporter};

    let (_r, lb) = lb_with(2, LoadBalancerConfig::default()).await;
    for _ in 0..10 {
        lb.pick("svc")
            .unwrap()
            .record(Outcome::Success, Some(Duration::from_millis(3)));
    }
    lb.pick("svc").unwrap().failure();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let m = lb.metrics();
    metrics::with_local_recorder(&recorder, || MetricsFacadeExporter::new().export(&m));
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, outcome: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == outcome)
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter("tai_lb_requests_total", "success"), 10);
    assert_eq!(counter("tai_lb_requests_total", "failure"), 1);
    assert!(
        snapshot
            .iter()
            .any(|(k, _, _, _)| k.key().name() == "tai_lb_request_duration_seconds")
    );
}

#[cfg(feature = "metrics-server")]
#[tokio::test]
async fn the_metrics_server_serves_the_exposition() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_r, lb) = lb_with(2, LoadBalancerConfig::default()).await;
    lb.pick("svc").unwrap().success();
    let server = tai_loadbalancer::serve_metrics("127.0.0.1:0".parse().unwrap(), &lb)
        .await
        .unwrap();
    let at = server.local_addr();
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    };
    let reply = get("/metrics").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("tai_lb_picks_total"));
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
}
