//! Session-affinity lookups at 1,000 and 100,000 live keys, one and two threads, beside a raw
//! quick_cache (the well-kept concurrent cache the table is built on) in the same run.
//!
//! * `hit/lb/<keys>`: `IntegratedLoadBalancer::select_with_affinity` for a bound key: table
//!   lookup, TTL check and touch, routability check against the routing snapshot, endpoint
//!   clone. The full hot path.
//! * `hit/table/<keys>`: `AffinityManager::get_affinity` alone (polled once; it never waits).
//! * `hit/quick_cache/<keys>`: `quick_cache::sync::Cache<String, u64>::get(&str)`: the floor.
//! * `miss/lb/100000`: a key seen for the first time (consistent-hash pick, insert, eviction
//!   past `max_entries`).
//! * `two_threads/...`: the same on two threads at once; time per pair.

mod common;

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{
    AffinityConfig, AffinityStrategy, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};

use common::{endpoints, on_threads, runtime};

fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("affinity lookups never wait"),
    }
}

struct Keys {
    text: String,
    ends: Vec<u32>,
}

impl Keys {
    fn new(n: usize) -> Self {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            text.push_str(&format!("user-{i}"));
            ends.push(text.len() as u32);
        }
        Self { text, ends }
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.ends.len()).map(|i| &self[i])
    }
}

impl std::ops::Index<usize> for Keys {
    type Output = str;

    fn index(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }
}

fn affinity(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("affinity");
    for n in [1_000usize, 100_000] {
        // Keys packed in one buffer (a request's key is hot in cache when it is looked up; a
        // `Vec<String>` of 100,000 keys would make the probe itself a memory miss).
        let keys = Arc::new(Keys::new(n));
        let config = LoadBalancerConfig {
            affinity: AffinityConfig {
                strategy: AffinityStrategy::CustomKey,
                ttl: Duration::from_secs(3600),
                // Room for every key: a hit bench must not measure evictions.
                max_entries: 2 * n,
            },
            ..Default::default()
        };
        let lb = rt.block_on(async {
            let registry = Arc::new(ServiceRegistry::new());
            registry
                .register_batch("svc", endpoints(64, false))
                .await
                .unwrap();
            let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
                .await
                .unwrap();
            lb.start().await.unwrap();
            lb
        });
        for k in keys.iter() {
            lb.select_with_affinity("svc", k).unwrap();
        }
        // The first hash pick asked the control plane for this service's ring; let it land,
        // then check every key is bound.
        std::thread::sleep(Duration::from_millis(100));
        for k in keys.iter() {
            lb.select_with_affinity("svc", k).unwrap();
        }
        let before = lb.affinity().stats();
        for k in keys.iter() {
            lb.select_with_affinity("svc", k).unwrap();
        }
        assert_eq!(lb.affinity().stats().misses, before.misses, "every key must hit");
        let raw: quick_cache::sync::Cache<String, u64> = quick_cache::sync::Cache::new(2 * n);
        for (i, k) in keys.iter().enumerate() {
            raw.insert(k.to_owned(), i as u64);
        }
        let mut i = 0usize;
        let mut next = || {
            i = (i + 7_919) % n;
            i
        };
        group.bench_function(BenchmarkId::new("hit/lb", n), |b| {
            b.iter(|| black_box(lb.select_with_affinity("svc", &keys[next()]).unwrap()))
        });
        group.bench_function(BenchmarkId::new("hit/table", n), |b| {
            b.iter(|| black_box(ready(lb.affinity().get_affinity("svc", &keys[next()]))))
        });
        group.bench_function(BenchmarkId::new("hit/quick_cache", n), |b| {
            b.iter(|| black_box(raw.get(&keys[next()])))
        });
        let seed = AtomicUsize::new(0);
        group.bench_function(BenchmarkId::new("two_threads/hit/lb", n), |b| {
            b.iter_custom(|iters| {
                on_threads(2, iters, |iters| {
                    let mut j = seed.fetch_add(1, Ordering::Relaxed) * 1_000;
                    for _ in 0..iters {
                        j = (j + 7_919) % n;
                        black_box(lb.select_with_affinity("svc", &keys[j]).unwrap());
                    }
                })
            })
        });
        group.bench_function(BenchmarkId::new("two_threads/hit/quick_cache", n), |b| {
            b.iter_custom(|iters| {
                on_threads(2, iters, |iters| {
                    let mut j = seed.fetch_add(1, Ordering::Relaxed) * 1_000;
                    for _ in 0..iters {
                        j = (j + 7_919) % n;
                        black_box(raw.get(&keys[j]));
                    }
                })
            })
        });
        if n == 100_000 {
            let fresh: Vec<String> = (0..1_000_000).map(|i| format!("new-{i}")).collect();
            let mut f = 0usize;
            // Misses on a full table: every miss also evicts.
            for k in fresh.iter().take(2 * n) {
                lb.select_with_affinity("svc", k).unwrap();
            }
            group.bench_function(BenchmarkId::new("miss/lb", n), |b| {
                b.iter(|| {
                    f = (f + 1) % fresh.len();
                    black_box(lb.select_with_affinity("svc", &fresh[f]).unwrap())
                })
            });
            let stats = lb.affinity().stats();
            println!(
                "affinity/{n}: {} entries, {} bytes of cache structure ({} per entry, plus a 96-byte binding each)",
                stats.entries,
                lb.affinity().memory_used(),
                lb.affinity().memory_used() / stats.entries.max(1)
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = affinity
}
criterion_main!(benches);
