//! Cost of observability: recording outcomes on the request path, and scraping.
//!
//! * `record/pick_only`: `ServiceHandle::pick()` and dropping the guard (1,024 endpoints,
//!   round robin): the baseline.
//! * `record/pick_success`: the same plus `success()` (an outcome without latency).
//! * `record/pick_record_latency`: the same plus `record(Success, Some(latency))` (outcome
//!   and a histogram sample).
//! * `scrape/metrics_1000`: `lb.metrics()` for 1,000 endpoints that all have latencies.
//! * `scrape/prometheus_1000`: `encode_prometheus` (snapshot + text) for the same.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{LoadBalancingStrategy, Outcome};

fn record(c: &mut Criterion) {
    let rt = common::runtime();
    let (_registry, lb) = common::balancer(&rt, LoadBalancingStrategy::RoundRobin, 1_024);
    let handle = lb.service("svc").unwrap();
    let mut group = c.benchmark_group("record");
    group.bench_function("pick_only", |b| {
        b.iter(|| drop(black_box(handle.pick().unwrap())))
    });
    group.bench_function("pick_success", |b| {
        b.iter(|| black_box(handle.pick().unwrap()).success())
    });
    // Latencies precomputed (a division per iteration would cost more than the recording).
    // 1,021 of them (a prime, not the endpoint count): with 1,024 the round-robin cursor and
    // the latency index would advance in lockstep, every endpoint would always record the
    // same latency into the same histogram bucket, and the 1,024 buckets touched would fit
    // in cache, which real traffic does not do.
    const LATENCIES: usize = 1_021;
    let latencies: Vec<Duration> = (0..LATENCIES as u64)
        .map(|i| Duration::from_nanos(50_000 + (i * 7_919 * 4_889) % 5_000_000))
        .collect();
    let mut i = 0usize;
    let mut next = move || {
        i += 1;
        if i == LATENCIES {
            i = 0;
        }
        i
    };
    group.bench_function("pick_record_latency", |b| {
        b.iter(|| {
            let i = next();
            black_box(handle.pick().unwrap()).record(Outcome::Success, Some(latencies[i]))
        })
    });
    // The same with Peak-EWMA: its pick reads the clock and two estimates, its record also
    // updates the estimate (clock read, `exp`, two stores).
    let (_peak_registry, peak) = common::balancer(&rt, LoadBalancingStrategy::PeakEwma, 1_024);
    let peak_handle = peak.service("svc").unwrap();
    group.bench_function("peak_ewma_pick_only", |b| {
        b.iter(|| drop(black_box(peak_handle.pick().unwrap())))
    });
    group.bench_function("peak_ewma_pick_record_latency", |b| {
        b.iter(|| {
            let i = next();
            black_box(peak_handle.pick().unwrap()).record(Outcome::Success, Some(latencies[i]))
        })
    });
    group.finish();
}

fn scrape(c: &mut Criterion) {
    let rt = common::runtime();
    let (_registry, lb) = common::balancer(&rt, LoadBalancingStrategy::RoundRobin, 1_000);
    let lb = Arc::new(lb);
    for i in 0..200_000u64 {
        let latency = Duration::from_nanos(20_000 + (i * 7_919) % 20_000_000);
        lb.pick("svc").unwrap().record(Outcome::Success, Some(latency));
    }
    let mut group = c.benchmark_group("scrape");
    group.bench_function("metrics_1000", |b| b.iter(|| black_box(lb.metrics())));
    group.bench_function("prometheus_1000", |b| {
        b.iter(|| black_box(tai_loadbalancer::encode_prometheus(&lb)))
    });
    group.finish();
    println!(
        "exposition of 1,000 endpoints: {} bytes",
        tai_loadbalancer::encode_prometheus(&lb).len()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = record, scrape
}
criterion_main!(benches);
