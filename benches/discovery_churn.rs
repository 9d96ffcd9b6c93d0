//! Registry churn through discovery, with picks running: what does a source publishing
//! ~1,000 changes per second into a 10,000-endpoint service cost the readers, how many
//! registry writes (table rebuilds) does it cause, and how long does a change take to
//! reach the balancer's routing table?
//!
//! * `quiet/<strategy>`: `lb.pick("svc")` over 10,000 endpoints fed by a
//!   [`DiscoveryRunner`], with the source idle (the same-run baseline).
//! * `churn/<strategy>`: the same picks while the source publishes one change per
//!   millisecond (one endpoint added, an older one removed: membership stays ~10,000), each a
//!   `MembershipUpdate::Changes`, coalesced by the runner into registry writes.
//!
//! After each churn run it prints the registry writes per second and the change-to-visible
//! latency (publish → the address is in the balancer's current table, checked by a watcher
//! thread polling every ~50 µs, so figures include up to that much polling slack) as
//! p50/p99/max from an hdrhistogram.

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use tai_loadbalancer::{
    Discovery, DiscoveryRunner, DiscoverySink, Endpoint, EndpointMetadata, IntegratedLoadBalancer,
    LoadBalancerConfig, LoadBalancingStrategy, MembershipUpdate, ServiceRegistry, SourceHealth,
};

use common::addr;

const N: usize = 10_000;
/// Changes per second the source aims for (one per tick).
const TICK: Duration = Duration::from_millis(1);
/// How many churned endpoints stay before the oldest is removed.
const WINDOW: usize = 100;

fn endpoint(i: usize, weighted: bool) -> Endpoint {
    let meta = weighted.then(|| EndpointMetadata::new().with_weight(1 + (i % 4) as u32));
    Endpoint::new(addr(i), meta)
}

/// Publishes the initial 10,000 endpoints, then one change per tick while `churning`,
/// telling the watcher what it published and when.
struct Churn {
    weighted: bool,
    churning: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    watch: mpsc::Sender<(SocketAddr, Instant)>,
}

#[async_trait::async_trait]
impl Discovery for Churn {
    fn name(&self) -> String {
        "bench-churn".into()
    }

    async fn run(self: Box<Self>, sink: DiscoverySink) {
        sink.publish(MembershipUpdate::Snapshot {
            service: "svc".into(),
            endpoints: (0..N).map(|i| endpoint(i, self.weighted)).collect(),
        });
        sink.set_health(SourceHealth::Healthy);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut next = N;
        loop {
            tokio::select! {
                _ = sink.closed() => return,
                _ = tick.tick() => {}
            }
            if !self.churning.load(Ordering::Relaxed) {
                continue;
            }
            let added = endpoint(next, self.weighted);
            let removals = if next >= N + WINDOW {
                vec![addr(next - WINDOW)]
            } else {
                vec![]
            };
            let _ = self.watch.send((added.address, Instant::now()));
            sink.publish(MembershipUpdate::Changes {
                service: "svc".into(),
                upserts: vec![added],
                removals,
            });
            self.published.fetch_add(1, Ordering::Relaxed);
            next += 1;
        }
    }
}

/// Records publish → visible latencies until the channel closes.
fn watcher(
    lb: Arc<IntegratedLoadBalancer>,
    changes: mpsc::Receiver<(SocketAddr, Instant)>,
) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for (address, published) in changes {
        while lb.in_flight("svc", address).is_none() {
            std::thread::sleep(Duration::from_micros(50));
            if published.elapsed() > Duration::from_secs(10) {
                panic!("{address} not visible after 10 s");
            }
        }
        let us = u64::try_from(published.elapsed().as_micros()).unwrap_or(u64::MAX);
        histogram.saturating_record(us.max(1));
    }
    histogram
}

fn discovery_churn(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("discovery_churn");
    for strategy in [LoadBalancingStrategy::Random, LoadBalancingStrategy::Weighted] {
        let registry = Arc::new(ServiceRegistry::new());
        let lb = Arc::new(
            rt.block_on(IntegratedLoadBalancer::new(
                registry.clone(),
                strategy,
                LoadBalancerConfig::default(),
            ))
            .unwrap(),
        );
        let churning = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let (watch, changes) = mpsc::channel();
        let runner = {
            let _guard = rt.enter();
            DiscoveryRunner::new(registry.clone())
        };
        rt.block_on(async {
            runner.spawn(Churn {
                weighted: strategy == LoadBalancingStrategy::Weighted,
                churning: churning.clone(),
                published: published.clone(),
                watch,
            });
            runner.synced().await;
        });
        assert_eq!(lb.service("svc").unwrap().endpoints().len(), N);

        let pick = || {
            let p = lb.pick("svc").unwrap();
            black_box(p.address());
        };
        group.bench_function(BenchmarkId::new("quiet", strategy), |b| b.iter(pick));

        let watcher = {
            let lb = lb.clone();
            std::thread::spawn(move || watcher(lb, changes))
        };
        let writes_before = runner.registry_writes();
        let version_before = registry.version();
        let started = Instant::now();
        churning.store(true, Ordering::Relaxed);
        group.bench_function(BenchmarkId::new("churn", strategy), |b| b.iter(pick));
        churning.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let writes = runner.registry_writes() - writes_before;
        let versions = registry.version() - version_before;
        let changes = published.load(Ordering::Relaxed);
        rt.block_on(runner.shutdown()); // closes the watcher's channel
        drop(runner);
        let histogram = watcher.join().unwrap();
        println!(
            "discovery_churn/{strategy}: {changes} changes in {elapsed:.1} s ({:.0}/s); {writes} registry writes \
             ({:.0}/s, {versions} versions); change-to-visible p50 {} us, p99 {} us, max {} us over {} changes",
            changes as f64 / elapsed,
            writes as f64 / elapsed,
            histogram.value_at_quantile(0.50),
            histogram.value_at_quantile(0.99),
            histogram.max(),
            histogram.len(),
        );
        rt.block_on(lb.stop()).unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = discovery_churn
}
criterion_main!(benches);
