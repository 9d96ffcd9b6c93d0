//! Picks with locality and priority on, against off (issue 18's target: ≤ 1.3× off), at
//! 1,024 and 65,536 endpoints, one thread, guarded picks (`ServiceHandle::pick` + drop).
//!
//! * `off/<strategy>/<n>`: the endpoints carry zones and priorities, but `[locality]` is
//!   disabled and every endpoint is at priority 0: the plain path.
//! * `on/<strategy>/<n>`: three zones (this balancer in zone `a`), two priority levels (a
//!   sixth of the endpoints at priority 1), `zone_aware`, and `client_zones = { a = 3, b = 1,
//!   c = 1 }` so that the local zone cannot take all of its callers' traffic: the plan has
//!   three groups (a, b and c at priority 0) and every pick draws a group, then runs the
//!   strategy inside it.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    LocalityMode, ServiceRegistry,
};

use common::{addr, runtime};

fn endpoints(n: usize, levels: bool) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let meta = EndpointMetadata::new()
                .with_zone(["a", "b", "c"][i % 3])
                .with_priority(u32::from(levels && i % 6 == 5));
            Endpoint::new(addr(i), Some(meta))
        })
        .collect()
}

fn balancer(
    rt: &tokio::runtime::Runtime,
    n: usize,
    strategy: LoadBalancingStrategy,
    on: bool,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    rt.block_on(async {
        let registry = Arc::new(ServiceRegistry::new());
        registry.register_batch("svc", endpoints(n, on)).await.unwrap();
        let mut config = LoadBalancerConfig::default();
        if on {
            config.locality.mode = LocalityMode::ZoneAware;
            config.locality.local_zone = Some("a".into());
            config.locality.client_zones = [("a".into(), 3), ("b".into(), 1), ("c".into(), 1)].into();
        }
        let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
            .await
            .unwrap();
        lb.start().await.unwrap();
        (registry, lb)
    })
}

fn locality(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("locality");
    for strategy in [
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::RoundRobin,
    ] {
        for n in [1_024usize, 65_536] {
            for on in [false, true] {
                let (_registry, lb) = balancer(&rt, n, strategy, on);
                let handle = lb.service("svc").unwrap();
                let label = if on { "on" } else { "off" };
                group.bench_function(BenchmarkId::new(format!("{label}/{strategy}"), n), |b| {
                    b.iter(|| black_box(handle.pick().unwrap().address()))
                });
                rt.block_on(lb.stop()).unwrap();
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = locality
}
criterion_main!(benches);
