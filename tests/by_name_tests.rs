//! Picks by service name go through a per-thread cache of name lookups, validated by the
//! directory's version. These tests check it stays correct: across removal and
//! re-registration of a service (read-your-writes by name), across balancers that route
//! services of the same name, and under churn from another thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::ep;
use tai_loadbalancer::{
    Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};

async fn balancer(registry: &Arc<ServiceRegistry>) -> IntegratedLoadBalancer {
    IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_cached_name_follows_removal_and_re_registration() {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", ep(1)).await.unwrap();
    let lb = balancer(&registry).await;
    lb.start().await.unwrap();
    for _ in 0..3 {
        assert_eq!(lb.pick("svc").unwrap().address(), ep(1).address);
    }
    registry.remove_service("svc").await.unwrap();
    assert!(matches!(lb.pick("svc"), Err(Error::UnknownService { .. })));
    assert!(matches!(lb.select("svc"), Err(Error::UnknownService { .. })));
    registry.register("svc", ep(2)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            lb.pick("svc").unwrap().address(),
            ep(2).address,
            "the new service, not the old slot"
        );
        assert_eq!(lb.select_with_hash("svc", b"k").unwrap().address, ep(2).address);
    }
    lb.stop().await.unwrap();
    assert!(matches!(lb.pick("svc"), Err(Error::Stopped)));
}

#[tokio::test]
async fn balancers_routing_the_same_name_do_not_share_cached_lookups() {
    let (r1, r2) = (Arc::new(ServiceRegistry::new()), Arc::new(ServiceRegistry::new()));
    r1.register("svc", ep(1)).await.unwrap();
    r2.register("svc", ep(2)).await.unwrap();
    let (lb1, lb2) = (balancer(&r1).await, balancer(&r2).await);
    for _ in 0..10 {
        assert_eq!(lb1.pick("svc").unwrap().address(), ep(1).address);
        assert_eq!(lb2.pick("svc").unwrap().address(), ep(2).address);
    }
    // A balancer dropped and another created (perhaps at the same address) never reuses the
    // dropped one's cached lookups.
    drop(lb1);
    let r3 = Arc::new(ServiceRegistry::new());
    r3.register("svc", ep(3)).await.unwrap();
    let lb3 = balancer(&r3).await;
    assert_eq!(lb3.pick("svc").unwrap().address(), ep(3).address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_by_name_under_churn_only_see_published_memberships() {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", ep(1)).await.unwrap();
    let lb = Arc::new(balancer(&registry).await);
    lb.start().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let picker = {
        let (lb, stop) = (lb.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut picks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match lb.pick("svc") {
                    Ok(pick) => {
                        let port = pick.address().port();
                        assert!(port == ep(1).address.port() || port == ep(2).address.port());
                        picks += 1;
                    }
                    Err(Error::UnknownService { .. } | Error::NoEndpoints { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                // Other names in between, so the cache's ways rotate.
                let _ = lb.pick("other");
            }
            picks
        })
    };
    for round in 0..200 {
        registry.remove_service("svc").await.unwrap();
        assert!(
            matches!(lb.pick("svc"), Err(Error::UnknownService { .. })),
            "round {round}"
        );
        let endpoint = if round % 2 == 0 { ep(2) } else { ep(1) };
        registry.register("svc", endpoint.clone()).await.unwrap();
        assert_eq!(
            lb.pick("svc").unwrap().address(),
            endpoint.address,
            "round {round}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert!(picker.join().unwrap() > 0);
    lb.stop().await.unwrap();
}
