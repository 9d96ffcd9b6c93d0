//! Behaviour off the happy path (issue 15): operator decisions in panic mode, read-your-writes
//! on writes that change nothing or fail, and drains that report in-flight counts truly.
#![cfg(feature = "runtime")]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tai_loadbalancer::{
    Endpoint, EndpointHealth, Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    OutlierDetectionConfig, ServiceRegistry,
};

use common::{addr, ep};

async fn balancer(
    n: usize,
    config: LoadBalancerConfig,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer, Vec<Endpoint>) {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoints: Vec<Endpoint> = (0..n).map(ep).collect();
    registry.register_batch("svc", endpoints.clone()).await.unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    (registry, lb, endpoints)
}

/// Picks `n` times and counts the addresses.
fn spread(lb: &IntegratedLoadBalancer, n: usize) -> BTreeMap<SocketAddr, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(lb.select("svc").unwrap().address).or_default() += 1;
    }
    counts
}

// ===== section 3: operator decisions hold in panic mode =====

#[tokio::test]
async fn marked_down_endpoints_stay_out_with_the_default_panic_threshold() {
    let (_registry, lb, endpoints) = balancer(3, LoadBalancerConfig::default()).await;
    lb.mark_down("svc", &endpoints[0]).await.unwrap();
    lb.mark_down("svc", &endpoints[1]).await.unwrap();
    let counts = spread(&lb, 300);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![endpoints[2].address],
        "marked-down endpoints were picked: {counts:?}"
    );
    assert!(
        !lb.is_in_panic("svc").unwrap(),
        "1 of 1 eligible endpoints is healthy"
    );
    lb.mark_up("svc", &endpoints[0]).await.unwrap();
    assert_eq!(spread(&lb, 300).len(), 2, "marked up again, it takes picks again");
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn draining_endpoints_stay_out_with_the_default_panic_threshold() {
    let (_registry, lb, endpoints) = balancer(3, LoadBalancerConfig::default()).await;
    for endpoint in &endpoints[..2] {
        let report = lb.drain("svc", endpoint).await.unwrap();
        assert!(!report.timed_out);
    }
    let counts = spread(&lb, 300);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![endpoints[2].address],
        "draining endpoints were picked: {counts:?}"
    );
    assert!(!lb.is_in_panic("svc").unwrap());
    // Draining every endpoint leaves nothing routable: a typed miss, not a pick of a drained one.
    lb.drain("svc", &endpoints[2]).await.unwrap();
    assert!(matches!(
        lb.select("svc"),
        Err(Error::NoHealthyEndpoints { total: 3, .. })
    ));
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn panic_from_health_routes_to_unhealthy_endpoints_but_never_to_marked_down_ones() {
    let config = LoadBalancerConfig {
        outlier_detection: OutlierDetectionConfig {
            enabled: true,
            consecutive_failures: 1,
            max_ejection_percent: 100,
            base_ejection_time: Duration::from_secs(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_registry, lb, endpoints) = balancer(4, config).await;
    lb.mark_down("svc", &endpoints[3]).await.unwrap();
    for endpoint in &endpoints[..2] {
        lb.record_result("svc", endpoint, tai_loadbalancer::Outcome::Failure, None)
            .unwrap();
    }
    // Ejections are applied by the control thread.
    let ejected = |lb: &IntegratedLoadBalancer| {
        endpoints[..2]
            .iter()
            .all(|e| lb.endpoint_health("svc", e.address) == Some(EndpointHealth::Ejected))
    };
    for _ in 0..400 {
        if ejected(&lb) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ejected(&lb), "both endpoints ejected");
    // 1 healthy of 3 eligible (33 % < 50 %): panic, over the three that were not marked down.
    assert!(lb.is_in_panic("svc").unwrap());
    let counts = spread(&lb, 600);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        endpoints[..3].iter().map(|e| e.address).collect::<Vec<_>>(),
        "{counts:?}"
    );
    assert_eq!(
        lb.endpoint_health("svc", endpoints[3].address),
        Some(EndpointHealth::Down)
    );
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn a_service_whose_every_endpoint_is_marked_down_has_no_routable_endpoint() {
    let (_registry, lb, endpoints) = balancer(2, LoadBalancerConfig::default()).await;
    for endpoint in &endpoints {
        lb.mark_down("svc", endpoint).await.unwrap();
    }
    assert!(matches!(
        lb.pick("svc"),
        Err(Error::NoHealthyEndpoints { total: 2, .. })
    ));
    assert!(!lb.is_in_panic("svc").unwrap());
    assert_eq!(addr(0), endpoints[0].address);
    lb.stop().await.unwrap();
}

// ===== section 4: a panic in a background task never hangs a caller or fakes success =====

struct PanicsFor(SocketAddr);

#[async_trait::async_trait]
impl tai_loadbalancer::HealthCheck for PanicsFor {
    async fn check(&self, endpoint: &Endpoint) -> Result<(), String> {
        if endpoint.address == self.0 {
            panic!("injected fault: a custom check with a bug");
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_health_check_is_a_failed_check_and_checks_go_on() {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoints: Vec<Endpoint> = (0..3).map(|i| ep(60 + i)).collect();
    registry.register_batch("svc", endpoints.clone()).await.unwrap();
    let config = LoadBalancerConfig {
        health_check: tai_loadbalancer::HealthCheckConfig {
            enabled: true,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            grace_period: Duration::ZERO,
            unhealthy_threshold: 2,
            check: tai_loadbalancer::HealthCheckKind::custom(PanicsFor(endpoints[0].address)),
            ..Default::default()
        },
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    let checks = lb.health_checks();
    let mut out = false;
    for _ in 0..500 {
        out = lb.endpoint_health("svc", endpoints[0].address) == Some(EndpointHealth::Unhealthy);
        if out {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(out, "the endpoint whose check panics leaves routing");
    let status = checks.get_health_status("svc", &endpoints[0]).await.unwrap();
    let reason = status.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("panicked") && reason.contains("injected fault"),
        "{reason}"
    );
    // It keeps being checked (the panic did not wedge its schedule), and so do the others.
    let before = status.checks;
    let others_before = checks
        .get_health_status("svc", &endpoints[1])
        .await
        .unwrap()
        .checks;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        checks
            .get_health_status("svc", &endpoints[0])
            .await
            .unwrap()
            .checks
            > before
    );
    let others = checks.get_health_status("svc", &endpoints[1]).await.unwrap();
    assert!(others.checks > others_before && others.is_healthy());
    assert!(checks.is_running());
    for _ in 0..50 {
        assert_ne!(lb.select("svc").unwrap().address, endpoints[0].address);
    }
    lb.stop().await.unwrap();
}

// ===== section 5: read-your-writes on writes that change nothing or fail =====

/// A balancer whose rebuilds take long enough (thousands of endpoints) that a racing writer
/// would see the gap between the registry and the published table.
async fn large_balancer() -> (Arc<ServiceRegistry>, Arc<IntegratedLoadBalancer>) {
    let registry = Arc::new(ServiceRegistry::new());
    let bulk: Vec<Endpoint> = (1_000..5_000).map(ep).collect();
    registry.register_batch("svc", bulk).await.unwrap();
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    lb.start().await.unwrap();
    (registry, Arc::new(lb))
}

fn routes(lb: &IntegratedLoadBalancer, address: SocketAddr) -> bool {
    lb.in_flight("svc", address).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_register_racing_the_first_returns_only_once_it_is_published() {
    let (registry, lb) = large_balancer().await;
    for i in 0..200 {
        let endpoint = ep(100 + i);
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (registry, lb, endpoint) = (registry.clone(), lb.clone(), endpoint.clone());
                tokio::spawn(async move {
                    registry.register("svc", endpoint.clone()).await.unwrap();
                    assert!(
                        routes(&lb, endpoint.address),
                        "register returned Ok while picks do not know {}",
                        endpoint.address
                    );
                })
            })
            .collect();
        for racer in racers {
            racer.await.unwrap();
        }
    }
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deregister_reports_unknown_only_once_picks_no_longer_see_it() {
    let (registry, lb) = large_balancer().await;
    for i in 0..200 {
        let endpoint = ep(100 + i);
        registry.register("svc", endpoint.clone()).await.unwrap();
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (registry, lb, endpoint) = (registry.clone(), lb.clone(), endpoint.clone());
                tokio::spawn(async move {
                    match registry.deregister("svc", &endpoint).await {
                        Ok(()) | Err(Error::UnknownEndpoint { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    assert!(
                        !routes(&lb, endpoint.address),
                        "deregister returned while picks still see {}",
                        endpoint.address
                    );
                })
            })
            .collect();
        for racer in racers {
            racer.await.unwrap();
        }
    }
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_remove_service_reports_unknown_only_once_the_service_is_gone() {
    let (registry, lb) = large_balancer().await;
    for i in 0..100 {
        let name = format!("gone-{i}");
        registry
            .register_batch(name.clone(), (0..2_000).map(|p| ep(10_000 + p)).collect())
            .await
            .unwrap();
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (registry, lb, name) = (registry.clone(), lb.clone(), name.clone());
                tokio::spawn(async move {
                    match registry.remove_service(&name).await {
                        Ok(()) | Err(Error::UnknownService { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    assert!(
                        matches!(lb.select(&name), Err(Error::UnknownService { .. })),
                        "remove_service returned while `{name}` is still routed"
                    );
                })
            })
            .collect();
        for racer in racers {
            racer.await.unwrap();
        }
    }
    lb.stop().await.unwrap();
}
