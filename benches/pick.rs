//! Pick latency: every strategy at 8, 1,024 and 65,536 endpoints, on one and two threads.
//!
//! * `guarded/<strategy>/<n>`: `ServiceHandle::pick` + drop (in-flight increment and
//!   decrement included): the hot path a least-connections user runs.
//! * `select/<strategy>/<n>`: `ServiceHandle::select` (unguarded, returns the `Endpoint`).
//! * `by_name/<strategy>/1024`: `IntegratedLoadBalancer::pick("svc")`: adds the service-name
//!   lookup.
//! * `two_threads/...`: the same operation on two threads at once; the reported time is per
//!   *pair* of picks (one per thread), so throughput scaling = 2 * one-thread time / this.
//! * `floor/...`: what the pick is built from, measured in the same run.
//!
//! Consistent-hash picks hash a different 8-byte key each time (`pick_with_hash`).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{LoadBalancingStrategy, ServiceHandle, jump_hash};

use common::{STRATEGIES, balancer, on_threads, runtime};

const SIZES: [usize; 3] = [8, 1_024, 65_536];

fn guarded(handle: &ServiceHandle, strategy: LoadBalancingStrategy, i: u64) {
    let pick = if strategy == LoadBalancingStrategy::ConsistentHash {
        handle.pick_with_hash(i.to_le_bytes())
    } else {
        handle.pick()
    };
    black_box(pick.unwrap().address());
}

fn unguarded(handle: &ServiceHandle, strategy: LoadBalancingStrategy, i: u64) {
    let endpoint = if strategy == LoadBalancingStrategy::ConsistentHash {
        handle.select_with_hash(i.to_le_bytes())
    } else {
        handle.select()
    };
    black_box(endpoint.unwrap().address);
}

fn picks(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("pick");
    for strategy in STRATEGIES {
        for n in SIZES {
            let (_registry, lb) = balancer(&rt, strategy, n);
            let handle = lb.service("svc").unwrap();
            let mut i = 0u64;
            group.bench_function(BenchmarkId::new(format!("guarded/{strategy}"), n), |b| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    guarded(&handle, strategy, i)
                })
            });
            group.bench_function(BenchmarkId::new(format!("select/{strategy}"), n), |b| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    unguarded(&handle, strategy, i)
                })
            });
            if n == 1_024 {
                group.bench_function(BenchmarkId::new(format!("by_name/{strategy}"), n), |b| {
                    b.iter(|| {
                        i = i.wrapping_add(1);
                        let pick = if strategy == LoadBalancingStrategy::ConsistentHash {
                            lb.pick_with_hash("svc", i.to_le_bytes())
                        } else {
                            lb.pick("svc")
                        };
                        black_box(pick.unwrap().address())
                    })
                });
            }
            for (label, op) in [
                ("guarded", guarded as fn(&ServiceHandle, _, u64)),
                ("select", unguarded),
            ] {
                group.bench_function(
                    BenchmarkId::new(format!("two_threads/{label}/{strategy}"), n),
                    |b| {
                        b.iter_custom(|iters| {
                            let seed = AtomicUsize::new(0);
                            on_threads(2, iters, |iters| {
                                let base = seed.fetch_add(1, Ordering::Relaxed) as u64 * (1 << 40);
                                for k in 0..iters {
                                    op(&handle, strategy, base + k);
                                }
                            })
                        })
                    },
                );
            }
            rt.block_on(lb.stop()).unwrap();
        }
    }
    group.finish();
}

/// The building blocks, measured in the same run as the picks.
fn floors(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    let cell = arc_swap::ArcSwap::from_pointee(vec![0u64; 1024]);
    let counter = AtomicUsize::new(0);
    group.bench_function("arcswap_load_fetch_add", |b| {
        b.iter(|| {
            let table = cell.load();
            let i = counter.fetch_add(1, Ordering::Relaxed) % table.len();
            black_box(table[i])
        })
    });
    group.bench_function("fastrand_load", |b| {
        b.iter(|| {
            let table = cell.load();
            black_box(table[fastrand::usize(..table.len())])
        })
    });
    // The machine's own two-thread ceiling for read-mostly work, in the same run: a snapshot
    // load plus a random index on two threads (nothing shared is written).
    group.bench_function("two_threads/fastrand_load", |b| {
        b.iter_custom(|iters| {
            on_threads(2, iters, |iters| {
                for _ in 0..iters {
                    let table = cell.load();
                    black_box(table[fastrand::usize(..table.len())]);
                }
            })
        })
    });
    let shared = Arc::new(0u64);
    group.bench_function("arc_clone_drop", |b| b.iter(|| black_box(Arc::clone(&shared))));
    let mut k = 0u64;
    for n in [1_024u32, 65_536] {
        group.bench_function(BenchmarkId::new("jump_hash", n), |b| {
            b.iter(|| {
                k = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(jump_hash(k, n))
            })
        });
    }
    group.finish();
}

/// Hash picks on a service whose table carries no ring yet (a service not routed by
/// consistent hash, on a balancer that was never started, so the ring the first hash pick
/// asks for is never built): each one computes the owner from the ring's definition, in
/// `O(total weight)`. What CONFIGURATION.md's "when is a ring built" section quotes.
fn ringless(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("ringless_hash");
    for n in [8usize, 100, 1_024] {
        let (_registry, lb) = rt.block_on(async {
            let registry = Arc::new(tai_loadbalancer::ServiceRegistry::new());
            registry
                .register_batch("svc", common::endpoints(n, false))
                .await
                .unwrap();
            let lb = tai_loadbalancer::IntegratedLoadBalancer::new(
                registry.clone(),
                LoadBalancingStrategy::RoundRobin,
                tai_loadbalancer::LoadBalancerConfig::default(),
            )
            .await
            .unwrap();
            (registry, lb)
        });
        let handle = lb.service("svc").unwrap();
        let mut i = 0u64;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(handle.select_with_hash(i.to_le_bytes()).unwrap().address)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = floors, picks, ringless
}
criterion_main!(benches);
