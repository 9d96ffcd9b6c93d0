//! Change-to-visible latency through the control-plane thread.
//!
//! A registry call returns once every attached balancer has published the change, so its
//! duration *is* the change-to-visible latency (read-your-writes). Measured on a started
//! balancer (the change crosses to the control-plane thread and back), for a service of 16
//! and of 1,024 endpoints, with a thread picking all the while.
//!
//! Besides criterion's mean/median, this prints p50/p99/p99.9 from an HDR histogram of 10,000
//! changes, since the target is a p99.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use hdrhistogram::Histogram;
use tai_loadbalancer::{Endpoint, LoadBalancingStrategy};

use common::{addr, balancer, runtime};

fn with_picker<R>(
    n: usize,
    f: impl FnOnce(&tokio::runtime::Runtime, &tai_loadbalancer::ServiceRegistry) -> R,
) -> R {
    let rt = runtime();
    let (registry, lb) = balancer(&rt, LoadBalancingStrategy::RoundRobin, n);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = lb.service("svc").unwrap();
    let picker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    black_box(handle.pick().unwrap().address());
                }
                std::thread::yield_now();
            }
        })
    };
    let out = f(&rt, &registry);
    stop.store(true, Ordering::Relaxed);
    picker.join().unwrap();
    rt.block_on(lb.stop()).unwrap();
    out
}

fn percentiles() {
    for n in [16usize, 1_024] {
        let hist = with_picker(n, |rt, registry| {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let extra = Endpoint::new(addr(n + 1), None);
            for i in 0..10_000 {
                let start = Instant::now();
                if i % 2 == 0 {
                    rt.block_on(registry.register("svc", extra.clone())).unwrap();
                } else {
                    rt.block_on(registry.deregister("svc", &extra)).unwrap();
                }
                hist.record(start.elapsed().as_nanos() as u64).unwrap();
            }
            hist
        });
        println!(
            "change_visible/{n}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us (10,000 changes)",
            hist.value_at_quantile(0.50) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
            hist.value_at_quantile(0.999) as f64 / 1e3,
            hist.max() as f64 / 1e3,
        );
    }
}

fn criterion_runs(c: &mut Criterion) {
    let mut group = c.benchmark_group("change_visible");
    for n in [16usize, 1_024] {
        with_picker(n, |rt, registry| {
            let extra = Endpoint::new(addr(n + 1), None);
            let mut present = false;
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    if present {
                        rt.block_on(registry.deregister("svc", &extra)).unwrap();
                    } else {
                        rt.block_on(registry.register("svc", extra.clone())).unwrap();
                    }
                    present = !present;
                })
            });
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    // `cargo bench --no-run` builds this; `cargo test --benches` runs it in test mode.
    if std::env::args().any(|a| a == "--bench") {
        percentiles();
    }
    criterion_runs(&mut c);
    c.final_summary();
}
