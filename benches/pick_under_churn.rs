//! Picks while the control plane republishes (arc-swap's `background.rs` question): how much
//! does a writer that never stops cost the readers?
//!
//! * `quiet/<strategy>`: picks at 1,024 endpoints with no writer (the same-run baseline).
//! * `churn/<strategy>`: the same picks while another thread toggles one endpoint in and out
//!   of the registry as fast as the control-plane thread can republish (every change rebuilds
//!   and stores a new 1,024-endpoint table).
//!
//! The picks load whatever table is current: a publication never blocks them, it only makes
//! their next load see a new pointer.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{Endpoint, LoadBalancingStrategy};

use common::{addr, balancer, runtime};

const N: usize = 1_024;

fn churn(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("pick_under_churn");
    for strategy in [
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::ConsistentHash,
    ] {
        let (registry, lb) = balancer(&rt, strategy, N);
        let handle = lb.service("svc").unwrap();
        let mut i = 0u64;
        let mut pick = || {
            i = i.wrapping_add(1);
            let p = if strategy == LoadBalancingStrategy::ConsistentHash {
                handle.pick_with_hash(i.to_le_bytes())
            } else {
                handle.pick()
            };
            black_box(p.unwrap().address());
        };
        group.bench_function(BenchmarkId::new("quiet", strategy), |b| b.iter(&mut pick));

        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, published, registry) = (stop.clone(), published.clone(), registry.clone());
            std::thread::spawn(move || {
                let rt = runtime();
                let extra = Endpoint::new(addr(N + 1), None);
                while !stop.load(Ordering::Relaxed) {
                    rt.block_on(registry.register("svc", extra.clone())).unwrap();
                    rt.block_on(registry.deregister("svc", &extra)).unwrap();
                    published.fetch_add(2, Ordering::Relaxed);
                }
            })
        };
        group.bench_function(BenchmarkId::new("churn", strategy), |b| b.iter(&mut pick));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        println!(
            "pick_under_churn/{strategy}: {} tables published during the churn run",
            published.load(Ordering::Relaxed)
        );
        rt.block_on(lb.stop()).unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = churn
}
criterion_main!(benches);
