//! `LoadBalancingStrategy::PeakEwma`: traffic leaves an endpoint that answers slowly, comes
//! back once it recovers, a new endpoint gets one probe, and the estimate is visible in the
//! metrics and the Prometheus exposition. Loopback addresses only; nothing is dialled.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tai_loadbalancer::{
    Endpoint, Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, Outcome,
    PeakEwmaConfig, ServiceRegistry,
};

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 32_000 + i))
}

async fn balancer(n: u16, decay: Duration) -> (Arc<ServiceRegistry>, Arc<IntegratedLoadBalancer>) {
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..n).map(|i| Endpoint::new(addr(i), None)).collect())
        .await
        .unwrap();
    let config = LoadBalancerConfig {
        peak_ewma: PeakEwmaConfig { decay },
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::PeakEwma, config)
        .await
        .unwrap();
    (registry, Arc::new(lb))
}

/// One request: pick, "send" it (the latency `latency_of` gives its endpoint), report.
fn request(lb: &IntegratedLoadBalancer, latency_of: impl Fn(SocketAddr) -> Duration) -> SocketAddr {
    let pick = lb.pick("svc").unwrap();
    let address = pick.address();
    pick.record(Outcome::Success, Some(latency_of(address)));
    address
}

#[tokio::test]
async fn traffic_leaves_a_slow_endpoint_at_once_and_returns_after_it_recovers() {
    let decay = Duration::from_millis(100);
    let (_registry, lb) = balancer(3, decay).await;
    let slow = addr(0);

    // The slow endpoint answers in 20 ms, the others in 1 ms.
    let latency = |a: SocketAddr| Duration::from_millis(if a == slow { 20 } else { 1 });
    for _ in 0..30 {
        request(&lb, latency); // every endpoint measured
    }
    let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
    for _ in 0..3_000 {
        *counts.entry(request(&lb, latency)).or_default() += 1;
    }
    let to_slow = counts.get(&slow).copied().unwrap_or(0);
    assert!(
        to_slow <= 30,
        "the slow endpoint still got {to_slow} of 3,000: {counts:?}"
    );
    let estimate = |a| {
        lb.metrics().services[0]
            .endpoints
            .iter()
            .find(|e| e.address == a)
            .and_then(|e| e.latency_estimate)
            .unwrap()
    };
    assert!(estimate(slow) > Duration::from_millis(5), "{:?}", estimate(slow));
    assert!(
        estimate(addr(1)) < Duration::from_millis(5),
        "{:?}",
        estimate(addr(1))
    );

    // It recovers. The others keep refreshing their 1 ms estimates while its own fades
    // toward zero, so it is tried again after ~ln(20)·τ = 300 ms, measured at 1 ms, and gets
    // its share back. (A generous window: the test only needs the share to come back.)
    let recovered = |_: SocketAddr| Duration::from_millis(1);
    let started = Instant::now();
    let mut late: HashMap<SocketAddr, u32> = HashMap::new();
    while started.elapsed() < Duration::from_millis(2_000) {
        let to = request(&lb, recovered);
        if started.elapsed() > Duration::from_millis(1_200) {
            *late.entry(to).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let total: u32 = late.values().sum();
    let back = late.get(&slow).copied().unwrap_or(0);
    assert!(
        f64::from(back) > 0.15 * f64::from(total),
        "after recovering it got {back} of the last {total} requests: {late:?}"
    );
}

/// One endpoint measured at 5 ms, then a second one registered: the next pick is the new
/// endpoint's probe (unmeasured and idle, it costs nothing). Returns the balancer and the
/// probe, still in flight.
async fn measured_one_then_a_new_one() -> (Arc<IntegratedLoadBalancer>, tai_loadbalancer::Pick) {
    let (registry, lb) = balancer(1, Duration::from_secs(10)).await;
    for _ in 0..10 {
        request(&lb, |_| Duration::from_millis(5));
    }
    // Registration returns once the balancer routes with it (read-your-writes).
    registry
        .register("svc", Endpoint::new(addr(1), None))
        .await
        .unwrap();
    let probe = lb.pick("svc").unwrap();
    assert_eq!(probe.address(), addr(1), "the new endpoint is probed first");
    (lb, probe)
}

#[tokio::test]
async fn a_new_endpoint_gets_one_probe_until_it_is_measured() {
    let (lb, probe) = measured_one_then_a_new_one().await;
    // While the probe is out, it is avoided: every other request goes to the measured one,
    // however loaded (the guards are held).
    let held: Vec<_> = (0..50).map(|_| lb.pick("svc").unwrap()).collect();
    assert!(
        held.iter().all(|p| p.address() == addr(0)),
        "no second request before the probe answers"
    );
    drop(held);
    // The probe answers fast: the new endpoint now wins on its measure.
    probe.record(Outcome::Success, Some(Duration::from_millis(1)));
    let mut to_new = 0;
    for _ in 0..100 {
        if request(&lb, |a| Duration::from_millis(if a == addr(1) { 1 } else { 5 })) == addr(1) {
            to_new += 1;
        }
    }
    assert!(to_new >= 90, "{to_new} of 100 to the faster new endpoint");
}

/// 1,000 requests: those picked to `failing` fail (reporting `failure_latency`), the others
/// succeed in 5 ms. Returns how many went to `failing`.
fn requests_to_a_failing_endpoint(
    lb: &IntegratedLoadBalancer,
    failing: SocketAddr,
    failure_latency: Option<Duration>,
) -> u32 {
    let mut to_failing = 0;
    for _ in 0..1_000 {
        let pick = lb.pick("svc").unwrap();
        if pick.address() == failing {
            to_failing += 1;
            pick.record(Outcome::Failure, failure_latency);
        } else {
            pick.record(Outcome::Success, Some(Duration::from_millis(5)));
        }
    }
    to_failing
}

#[tokio::test]
async fn a_fast_failure_does_not_attract_traffic() {
    let (_registry, lb) = balancer(2, Duration::from_secs(10)).await;
    let failing = addr(0);
    // Both measured at 5 ms; then the failing one fails in 10 µs every time it is picked.
    for _ in 0..20 {
        request(&lb, |_| Duration::from_millis(5));
    }
    let to_failing = requests_to_a_failing_endpoint(&lb, failing, Some(Duration::from_micros(10)));
    // Fast failures would make it look 500x faster if they fed the average: it would take
    // nearly everything. They only count as peaks, so it keeps about its half.
    assert!(
        to_failing < 700,
        "{to_failing} of 1,000 went to the failing endpoint"
    );
}

#[tokio::test]
async fn configuration_and_metrics() {
    // TOML, validation naming the field.
    let config = LoadBalancerConfig::from_toml_str(
        "[peak_ewma]\ndecay = \"250ms\"\n[services.api]\nstrategy = \"peak_ewma\"\n",
    )
    .unwrap();
    assert_eq!(config.peak_ewma.decay, Duration::from_millis(250));
    assert_eq!(
        config.services["api"].strategy,
        Some(LoadBalancingStrategy::PeakEwma)
    );
    assert_eq!(LoadBalancingStrategy::PeakEwma.to_string(), "peak_ewma");
    for bad in ["0s", "2h"] {
        match LoadBalancerConfig::from_toml_str(&format!("[peak_ewma]\ndecay = \"{bad}\"\n")) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "peak_ewma.decay"),
            other => panic!("{bad}: {other:?}"),
        }
    }

    // The estimate in the metrics (only for peak_ewma services, once measured) and in the
    // exposition, which promtool accepts.
    let (registry, lb) = balancer(2, Duration::from_secs(10)).await;
    let before = lb.metrics();
    assert!(
        before.services[0]
            .endpoints
            .iter()
            .all(|e| e.latency_estimate.is_none())
    );
    for _ in 0..20 {
        request(&lb, |_| Duration::from_millis(3));
    }
    let after = lb.metrics();
    for e in &after.services[0].endpoints {
        let estimate = e.latency_estimate.expect("measured");
        assert!(
            estimate <= Duration::from_millis(3) && estimate > Duration::from_micros(2_900),
            "{estimate:?}"
        );
    }
    #[cfg(feature = "prometheus")]
    {
        let text = tai_loadbalancer::encode_prometheus(&lb);
        assert!(
            text.contains("tai_lb_endpoint_latency_estimate_seconds{service=\"svc\""),
            "{text}"
        );
        common::promtool_check(&text);
    }

    let other = IntegratedLoadBalancer::new(
        registry,
        LoadBalancingStrategy::LeastConnections,
        Default::default(),
    )
    .await
    .unwrap();
    let pick = other.pick("svc").unwrap();
    pick.record(Outcome::Success, Some(Duration::from_millis(3)));
    assert!(
        other.metrics().services[0]
            .endpoints
            .iter()
            .all(|e| e.latency_estimate.is_none())
    );
}

#[tokio::test]
async fn an_endpoint_that_fails_fast_after_an_idle_spell_does_not_become_the_cheapest() {
    let decay = Duration::from_millis(50);
    let (_registry, lb) = balancer(2, decay).await;
    let failing = addr(0);
    for _ in 0..20 {
        request(&lb, |_| Duration::from_millis(5));
    }
    // Idle for 10 τ: both estimates fade to almost nothing.
    tokio::time::sleep(decay * 10).await;
    // A transport error: no latency at all.
    let to_failing = requests_to_a_failing_endpoint(&lb, failing, None);
    // Its faded estimate must not stand: a failure restores the last measure (5 ms), so it
    // keeps about its half instead of winning nearly every comparison.
    assert!(
        to_failing < 700,
        "{to_failing} of 1,000 went to the failing endpoint"
    );
}

#[tokio::test]
async fn a_new_endpoint_whose_probe_fails_is_avoided() {
    let (lb, probe) = measured_one_then_a_new_one().await;
    probe.record(Outcome::Failure, Some(Duration::from_micros(50)));
    // It counts as 1 s slow now: the 5 ms endpoint takes the traffic.
    let to_new = (0..200)
        .filter(|_| request(&lb, |_| Duration::from_millis(5)) == addr(1))
        .count();
    assert_eq!(to_new, 0, "a failed probe is not a fast endpoint");
}

#[tokio::test]
async fn without_reported_latencies_busy_endpoints_compare_by_requests_in_flight() {
    let (_registry, lb) = balancer(2, Duration::from_secs(10)).await;
    // Guards held, nothing reported: every endpoint stays unmeasured.
    let held: Vec<_> = (0..20).map(|_| lb.pick("svc").unwrap()).collect();
    let on_first = held.iter().filter(|p| p.address() == addr(0)).count();
    assert!(
        on_first.abs_diff(20 - on_first) <= 1,
        "{on_first} and {} in flight: least connections among unmeasured endpoints",
        20 - on_first
    );
}
