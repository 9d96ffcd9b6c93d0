//! Bulk loads go through the batched registry calls: one publication per call, whatever its
//! size (issue 16's "writes at scale"). A million endpoints load in 20 calls here; the same
//! load as a million awaited single `register`s would publish a million times, each copying
//! its service's membership (quadratic: see the README's bulk-load note).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tai_loadbalancer::{
    Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};

const SERVICES: usize = 10;
const PER_SERVICE: usize = 100_000;
const BATCH: usize = 50_000;

fn endpoint(s: usize, i: usize) -> Endpoint {
    let n = (s * PER_SERVICE + i) as u32;
    let ip = Ipv4Addr::from(0x7f00_0000 | (n / 64 + 1));
    Endpoint::new(SocketAddr::from((ip, 20_000 + (n % 64) as u16)), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_endpoints_load_in_batches_with_one_publication_per_call() {
    let registry = Arc::new(ServiceRegistry::new());
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::Random,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    lb.start().await.unwrap();
    let updates = lb.routing_updates();
    let started = Instant::now();
    let mut calls = 0;
    for s in 0..SERVICES {
        let name = format!("bulk-{s}");
        // In descending batches and shuffled within: the registry sorts and merges.
        for start in (0..PER_SERVICE).step_by(BATCH).rev() {
            let mut batch: Vec<Endpoint> = (start..start + BATCH).map(|i| endpoint(s, i)).collect();
            batch.reverse();
            registry.register_batch(name.clone(), batch).await.unwrap();
            calls += 1;
        }
    }
    let elapsed = started.elapsed();
    let published = updates.drain().len();
    eprintln!(
        "bulk load: {} endpoints in {calls} calls, {published} publications, {:.1} s",
        SERVICES * PER_SERVICE,
        elapsed.as_secs_f64()
    );
    assert_eq!(calls, SERVICES * PER_SERVICE / BATCH);
    assert_eq!(published, calls, "one publication per batched call");
    for s in 0..SERVICES {
        let name = format!("bulk-{s}");
        assert_eq!(registry.endpoints(&name).await.unwrap().len(), PER_SERVICE);
        let metrics = lb.metrics();
        let service = metrics.service(&name).unwrap();
        assert_eq!(service.endpoints_total, PER_SERVICE);
        let pick = lb.pick(&name).unwrap();
        assert!(pick.address().ip().is_loopback());
    }
    // An update that adds, replaces and removes at once is one publication too.
    let upserts: Vec<Endpoint> = (0..1_000).map(|i| endpoint(0, PER_SERVICE - 1 - i)).collect();
    let removals: Vec<SocketAddr> = (0..1_000).map(|i| endpoint(0, i).address).collect();
    registry.update("bulk-0", upserts, &removals).await.unwrap();
    assert_eq!(updates.drain().len(), 1);
    assert_eq!(
        registry.endpoints("bulk-0").await.unwrap().len(),
        PER_SERVICE - 1_000
    );
    lb.stop().await.unwrap();
}
