//! The cost of a circuit breaker's check on the pick path (issue 20): guarded picks
//! (`ServiceHandle::pick` + drop) at 1,024 endpoints, one thread, with no breaker (`off`)
//! against `max_requests` set (`on`: one `fetch_add` to take the place, one `fetch_sub` to
//! give it back), and a refused pick (`refused`: the service at its limit, the typed error
//! built and dropped).

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{
    CircuitBreakerConfig, Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};

use common::{addr, runtime};

const ENDPOINTS: usize = 1_024;

fn balancer(
    rt: &tokio::runtime::Runtime,
    strategy: LoadBalancingStrategy,
    max_requests: Option<u32>,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    rt.block_on(async {
        let registry = Arc::new(ServiceRegistry::new());
        let endpoints = (0..ENDPOINTS).map(|i| Endpoint::new(addr(i), None)).collect();
        registry.register_batch("svc", endpoints).await.unwrap();
        let config = LoadBalancerConfig {
            circuit_breakers: CircuitBreakerConfig {
                max_requests,
                ..Default::default()
            },
            ..Default::default()
        };
        let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
            .await
            .unwrap();
        lb.start().await.unwrap();
        (registry, lb)
    })
}

fn breaker(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("breaker");
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::LeastConnections,
    ] {
        for (label, max_requests) in [("off", None), ("on", Some(1 << 20))] {
            let (_registry, lb) = balancer(&rt, strategy, max_requests);
            let handle = lb.service("svc").unwrap();
            group.bench_function(BenchmarkId::new(format!("{label}/{strategy}"), ENDPOINTS), |b| {
                b.iter(|| black_box(handle.pick().unwrap().address()))
            });
            rt.block_on(lb.stop()).unwrap();
        }
        let (_registry, lb) = balancer(&rt, strategy, Some(1));
        let handle = lb.service("svc").unwrap();
        let held = handle.pick().unwrap();
        group.bench_function(BenchmarkId::new(format!("refused/{strategy}"), ENDPOINTS), |b| {
            b.iter(|| black_box(handle.pick().is_err()))
        });
        drop(held);
        rt.block_on(lb.stop()).unwrap();
    }
    group.finish();
}

criterion_group!(benches, breaker);
criterion_main!(benches);
