//! Shared setup for the benches: registries of loopback endpoints and ready balancers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};

pub(crate) const STRATEGIES: [LoadBalancingStrategy; 6] = [
    LoadBalancingStrategy::RoundRobin,
    LoadBalancingStrategy::Random,
    LoadBalancingStrategy::LeastConnections,
    LoadBalancingStrategy::Weighted,
    LoadBalancingStrategy::ConsistentHash,
    LoadBalancingStrategy::PeakEwma,
];

/// The `i`-th loopback endpoint: spread over 127.0.0.0/8, never 127.0.0.0 itself.
pub(crate) fn addr(i: usize) -> SocketAddr {
    let host = (i / 64) as u32 + 1;
    let ip = Ipv4Addr::from(0x7f00_0000 | (host & 0x00ff_ffff));
    SocketAddr::V4(SocketAddrV4::new(ip, 20_000 + (i % 64) as u16))
}

/// `n` endpoints; with `weighted`, weights cycle 1..=4 so the weighted strategy has a schedule.
pub(crate) fn endpoints(n: usize, weighted: bool) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let meta = weighted.then(|| EndpointMetadata::new().with_weight(1 + (i % 4) as u32));
            Endpoint::new(addr(i), meta)
        })
        .collect()
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A started balancer over one service `svc` of `n` endpoints.
pub(crate) fn balancer(
    rt: &tokio::runtime::Runtime,
    strategy: LoadBalancingStrategy,
    n: usize,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    rt.block_on(async {
        let registry = Arc::new(ServiceRegistry::new());
        let weighted = strategy == LoadBalancingStrategy::Weighted;
        registry
            .register_batch("svc", endpoints(n, weighted))
            .await
            .unwrap();
        let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default())
            .await
            .unwrap();
        lb.start().await.unwrap();
        if strategy == LoadBalancingStrategy::PeakEwma {
            measure_every_endpoint(&lb, n);
        }
        (registry, lb)
    })
}

/// Gives every endpoint of a Peak-EWMA service a latency estimate on the calling thread's
/// shard (unmeasured endpoints win every comparison, so each pick measures a new one until
/// none is left), with latencies spread over 0.1 to 5 ms, so that picks compare estimates
/// rather than take the unmeasured shortcut.
pub(crate) fn measure_every_endpoint(lb: &IntegratedLoadBalancer, n: usize) {
    for i in 0..8 * n as u64 {
        let pick = lb.pick("svc").unwrap();
        let latency = Duration::from_micros(100 + (i * 7_919) % 4_900);
        pick.record(tai_loadbalancer::Outcome::Success, Some(latency));
    }
    let unmeasured = lb.metrics().services[0]
        .endpoints
        .iter()
        .filter(|e| e.latency_estimate.is_none())
        .count();
    assert_eq!(unmeasured, 0, "every endpoint measured");
}

/// Runs `f(iters)` on `threads` threads at once and returns the wall time of the slowest.
pub(crate) fn on_threads(threads: usize, iters: u64, f: impl Fn(u64) + Sync) -> Duration {
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    f(iters);
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}
