//! Behaviour off the happy path (issue 15): operator decisions in panic mode, read-your-writes
//! on writes that change nothing or fail, and drains that report in-flight counts truly.

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
