//! Change-to-visible latency through the control-plane thread.
//!
//! A registry call returns once every attached balancer has published the change, so its
//! duration *is* the change-to-visible latency (read-your-writes). Measured on a started
//! balancer (the change crosses to the control-plane thread and back), for a service of 16
//! and of 1,024 endpoints, with a thread picking all the while.
//!
//! Besides criterion's mean/median, this prints p50/p99/p99.9 from an HDR histogram of 10,000
//! changes, since the target is a p99.
//!
//! `scrape/…` (issue 16): the same change latency on a small service while a second service
//! holds 65,536 endpoints, with and without a thread scraping `lb.metrics()` back to back. A
//! scrape reads every endpoint's counters but holds the control plane's lock only to take
//! each service's snapshot, so it must not delay a publication by more than 1 ms.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use hdrhistogram::Histogram;
use tai_loadbalancer::{
    Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};

use common::{addr, balancer, endpoints, runtime};

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

/// Change latency of a 16-endpoint service while another holds 65,536, with `scrapers`
/// threads calling `lb.metrics()` back to back.
fn under_scrapes(scrapers: usize) -> (Histogram<u64>, u64) {
    let rt = runtime();
    let registry = Arc::new(ServiceRegistry::new());
    rt.block_on(async {
        registry
            .register_batch("big", endpoints(65_536, false))
            .await
            .unwrap();
        registry
            .register_batch(
                "svc",
                (0..16).map(|i| Endpoint::new(addr(70_000 + i), None)).collect(),
            )
            .await
            .unwrap();
    });
    let lb = Arc::new(
        rt.block_on(IntegratedLoadBalancer::new(
            registry.clone(),
            LoadBalancingStrategy::LeastConnections,
            LoadBalancerConfig::default(),
        ))
        .unwrap(),
    );
    rt.block_on(lb.start()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A picker keeps the machine busy in both runs (an idle core adds wake-up latency that
    // would dwarf what is measured).
    let picker = {
        let (handle, stop) = (lb.service("big").unwrap(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    black_box(handle.pick().unwrap().address());
                }
                std::thread::yield_now();
            }
        })
    };
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            let (lb, stop) = (lb.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut scrapes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    black_box(lb.metrics());
                    scrapes += 1;
                }
                scrapes
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let extra = Endpoint::new(addr(80_000), None);
    for i in 0..4_000 {
        let start = Instant::now();
        if i % 2 == 0 {
            rt.block_on(registry.register("svc", extra.clone())).unwrap();
        } else {
            rt.block_on(registry.deregister("svc", &extra)).unwrap();
        }
        hist.record(start.elapsed().as_nanos() as u64).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let scrapes = threads.into_iter().map(|t| t.join().unwrap()).sum();
    picker.join().unwrap();
    rt.block_on(lb.stop()).unwrap();
    (hist, scrapes)
}

fn scrape_percentiles() {
    let (quiet, _) = under_scrapes(0);
    let (scraped, scrapes) = under_scrapes(1);
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "change_visible/scrape: 16-endpoint service beside a 65,536-endpoint one, 4,000 changes: \
         quiet p50 {:.1} us p99 {:.1} us max {:.1} us; while scraping ({scrapes} scrapes) p50 {:.1} us p99 {:.1} us max {:.1} us; p99 delay {:.1} us",
        us(&quiet, 0.5),
        us(&quiet, 0.99),
        quiet.max() as f64 / 1e3,
        us(&scraped, 0.5),
        us(&scraped, 0.99),
        scraped.max() as f64 / 1e3,
        us(&scraped, 0.99) - us(&quiet, 0.99),
    );
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
        scrape_percentiles();
    }
    criterion_runs(&mut c);
    c.final_summary();
}
