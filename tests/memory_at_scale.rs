//! Memory at scale (issue 16): 100,000 endpoints across 1,000 services, every strategy
//! configured, held in at most 64 MiB, measured by a counting global allocator (live bytes:
//! allocated minus freed, on every thread, the control thread's included).
//!
//! The phases are measured one after the other, so the test also says where the memory goes:
//! the registry's copy of the membership, then the balancer (routing tables, counter arenas,
//! consistent-hash rings, control-plane bookkeeping), then what the first picks add.

#![cfg(feature = "runtime")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceConfig, ServiceRegistry,
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call to `System` unchanged; the only addition is an atomic counter
// update, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SERVICES: usize = 1_000;
const PER_SERVICE: usize = 100;
const BUDGET: isize = 64 << 20;

const STRATEGIES: [LoadBalancingStrategy; 6] = [
    LoadBalancingStrategy::RoundRobin,
    LoadBalancingStrategy::Random,
    LoadBalancingStrategy::LeastConnections,
    LoadBalancingStrategy::Weighted,
    LoadBalancingStrategy::ConsistentHash,
    LoadBalancingStrategy::PeakEwma,
];

/// Endpoint `i` of service `s`: loopback, distinct across the whole fleet, with the metadata
/// a real fleet carries (zone, weight, a version tag).
fn endpoint(s: usize, i: usize) -> Endpoint {
    let n = (s * PER_SERVICE + i) as u32;
    let ip = std::net::Ipv4Addr::from(0x7f00_0000 | (n / 64 + 1));
    let meta = EndpointMetadata::new()
        .with_zone(format!("zone-{}", n % 3))
        .with_weight(1 + n % 4)
        .with_tag("version", "v1");
    Endpoint::new(
        std::net::SocketAddr::from((ip, 20_000 + (n % 64) as u16)),
        Some(meta),
    )
}

#[test]
fn a_hundred_thousand_endpoints_in_a_thousand_services_fit_in_64_mib() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut config = LoadBalancerConfig::default();
        for s in 0..SERVICES {
            config.services.insert(
                format!("service-{s}"),
                ServiceConfig {
                    strategy: Some(STRATEGIES[s % STRATEGIES.len()]),
                    ..Default::default()
                },
            );
        }
        let start = live();
        let registry = Arc::new(ServiceRegistry::new());
        for s in 0..SERVICES {
            let endpoints = (0..PER_SERVICE).map(|i| endpoint(s, i)).collect();
            registry.register_batch(format!("service-{s}"), endpoints).await.unwrap();
        }
        let after_registry = live();
        let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
            .await
            .unwrap();
        lb.start().await.unwrap();
        let after_balancer = live();
        // Every service picked once by its strategy, every endpoint given one outcome.
        // (Latency histograms are allocated by an endpoint's first reported latency, 16 KiB
        // each: traffic-dependent, not counted here; see BENCHMARKS.md.)
        for s in 0..SERVICES {
            let name = format!("service-{s}");
            drop(lb.pick(&name).unwrap());
            for i in 0..PER_SERVICE {
                lb.record_result(
                    &name,
                    &endpoint(s, i),
                    tai_loadbalancer::Outcome::Success,
                    None,
                )
                .unwrap();
            }
        }
        let after_picks = live();
        let total = after_picks - start;
        let mib = |b: isize| b as f64 / (1 << 20) as f64;
        eprintln!(
            "memory at scale: registry {:.1} MiB, balancer {:.1} MiB, first picks {:.1} MiB, total {:.1} MiB ({} bytes per endpoint)",
            mib(after_registry - start),
            mib(after_balancer - after_registry),
            mib(after_picks - after_balancer),
            mib(total),
            total / (SERVICES * PER_SERVICE) as isize
        );
        assert_eq!(lb.services().len(), SERVICES);
        assert_eq!(lb.metrics().total_requests, SERVICES as u64);
        assert!(total <= BUDGET, "{:.1} MiB held, over the 64 MiB budget", mib(total));
        lb.stop().await.unwrap();
    });
}
