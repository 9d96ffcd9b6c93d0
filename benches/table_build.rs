//! Snapshot rebuild cost: what one membership change costs the control plane.
//!
//! Each iteration changes one endpoint's weight in a service of `n` endpoints through the
//! registry, on a balancer that is not started, so the change is applied on the calling
//! thread: registry update + membership copy + table rebuild (+ ring rebuild for consistent
//! hash, + schedule for weighted) + publish. That is the full cost of one change to the
//! control plane, without the thread handoff (see `change_visible.rs` for that).
//!
//! * `rebuild/<strategy>/<n>` for n = 1,000 and 10,000. For `consistent_hash` a weight
//!   change rebuilds the 65,536-slot ring every time (the worst case: a health-only change
//!   reuses it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};

use common::{STRATEGIES, addr, endpoints, runtime};

fn rebuild(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rebuild");
    group.sample_size(20);
    for n in [1_000usize, 10_000] {
        for strategy in STRATEGIES {
            let registry = Arc::new(ServiceRegistry::new());
            let weighted = strategy == LoadBalancingStrategy::Weighted;
            rt.block_on(registry.register_batch("svc", endpoints(n, weighted)))
                .unwrap();
            let lb = rt
                .block_on(IntegratedLoadBalancer::new(
                    registry.clone(),
                    strategy,
                    LoadBalancerConfig::default(),
                ))
                .unwrap();
            let mut w = 1u32;
            group.bench_function(BenchmarkId::new(format!("{strategy}"), n), |b| {
                b.iter(|| {
                    w = w % 7 + 1;
                    let changed = Endpoint::new(addr(0), Some(EndpointMetadata::new().with_weight(w)));
                    rt.block_on(registry.register("svc", changed)).unwrap();
                })
            });
            drop(lb);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = rebuild
}
criterion_main!(benches);
