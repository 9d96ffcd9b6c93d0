//! A pick allocates nothing: a counting global allocator sees zero allocations on the picking
//! thread across thousands of picks of every strategy, through every pick API (by name, by
//! handle, by hash, by session affinity once the session is bound), and across outcome
//! reports (on a pick and by address, with latencies, once each endpoint's latency histogram
//! exists).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use common::{ep, rt, setup, weighted};
use tai_loadbalancer::{Endpoint, LoadBalancingStrategy, Outcome};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates every call to `System` unchanged; the only addition is a thread-local
// counter increment, which itself never allocates (const-initialised `Cell`, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn picks_do_not_allocate() {
    let rt = rt();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancingStrategy::PeakEwma,
    ] {
        let endpoints: Vec<Endpoint> = (0..64)
            .map(|i| if i % 2 == 0 { ep(i) } else { weighted(i, 3) })
            .collect();
        let (_registry, lb) = rt.block_on(setup(strategy, endpoints));
        rt.block_on(lb.start()).unwrap();
        let handle = lb.service("svc").unwrap();
        let reported: Endpoint = lb.select("svc").unwrap();
        // A fixed set of session keys: after the warm-up every affinity lookup is a hit.
        let sessions: Vec<String> = (0..16).map(|k| format!("session-{k}")).collect();
        let exercise = |rounds: u64| {
            for i in 0..rounds {
                let key = i.to_le_bytes();
                black_box(lb.pick("svc").unwrap().address());
                black_box(lb.select("svc").unwrap());
                drop(black_box(lb.pick_with_hash("svc", key).unwrap()));
                drop(black_box(handle.pick().unwrap()));
                black_box(handle.select().unwrap());
                black_box(handle.select_with_hash(key).unwrap());
                handle.pick_with_key_hash(i).unwrap().success();
                handle.pick().unwrap().record(
                    Outcome::Failure,
                    Some(std::time::Duration::from_micros(i % 900 + 1)),
                );
                lb.record_result(
                    "svc",
                    &reported,
                    Outcome::Success,
                    Some(std::time::Duration::from_micros(50)),
                )
                .unwrap();
                let session = &sessions[(i % 16) as usize];
                black_box(lb.select_with_affinity("svc", session).unwrap());
                drop(black_box(lb.pick_with_affinity("svc", session).unwrap()));
            }
        };
        // Warm up: thread-local state of the RNG, the snapshot cell and the shard ordinal,
        // and the ring that hash picks ask the control plane to build.
        exercise(1_000);
        std::thread::sleep(std::time::Duration::from_millis(50));
        exercise(1_000);
        let n = allocations_during(|| exercise(10_000));
        assert_eq!(n, 0, "{strategy}: {n} allocations in 110,000 picks and reports");
        rt.block_on(lb.stop()).unwrap();
    }
}

#[test]
fn locality_priority_subset_and_bounded_load_picks_do_not_allocate() {
    let rt = rt();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancingStrategy::PeakEwma,
    ] {
        // Three zones, two priority levels, two versions.
        let endpoints: Vec<Endpoint> = (0..60)
            .map(|i| {
                let meta = tai_loadbalancer::EndpointMetadata::new()
                    .with_zone(["a", "b", "c"][i % 3])
                    .with_priority(u32::from(i % 6 == 5))
                    .with_weight(1 + (i % 3) as u32)
                    .with_tag("version", ["v1", "v2"][i % 2]);
                Endpoint::new(common::addr(i), Some(meta))
            })
            .collect();
        let mut config = tai_loadbalancer::LoadBalancerConfig::default();
        config.locality.mode = tai_loadbalancer::LocalityMode::ZoneAware;
        config.locality.local_zone = Some("a".into());
        // Callers concentrated in zone a: the local zone takes only part of the traffic, so
        // picks draw among three groups.
        config.locality.client_zones = [("a".into(), 3), ("b".into(), 1), ("c".into(), 1)].into();
        config.subsets.selectors = vec![vec!["version".into()]];
        config.subsets.fallback = tai_loadbalancer::SubsetFallback::AnyEndpoint;
        config.consistent_hash.balance_factor = Some(1.25);
        let registry = std::sync::Arc::new(tai_loadbalancer::ServiceRegistry::new());
        rt.block_on(registry.register_batch("svc", endpoints)).unwrap();
        let lb = rt
            .block_on(tai_loadbalancer::IntegratedLoadBalancer::new(
                registry, strategy, config,
            ))
            .unwrap();
        rt.block_on(lb.start()).unwrap();
        let handle = lb.service("svc").unwrap();
        let exercise = |rounds: u64| {
            for i in 0..rounds {
                drop(black_box(lb.pick("svc").unwrap()));
                drop(black_box(handle.pick().unwrap()));
                drop(black_box(lb.pick_subset("svc", &[("version", "v2")]).unwrap()));
                drop(black_box(handle.pick_subset(&[("version", "v3")]).unwrap())); // falls back
                black_box(lb.select_subset("svc", &[("version", "v1")]).unwrap());
                // Bounded-load hash picks, several held at once so owners reach the cap.
                let held: [_; 4] = std::array::from_fn(|k| {
                    handle
                        .pick_with_key_hash(i.wrapping_mul(4).wrapping_add(k as u64))
                        .unwrap()
                });
                drop(black_box(held));
            }
        };
        exercise(1_000);
        std::thread::sleep(std::time::Duration::from_millis(50));
        exercise(1_000);
        let n = allocations_during(|| exercise(10_000));
        assert_eq!(n, 0, "{strategy}: {n} allocations");
        rt.block_on(lb.stop()).unwrap();
    }
}

/// Under a circuit breaker (`max_requests`), admitted picks and refusals allocate nothing:
/// the check is one `fetch_add` on the service's counter, and the refusal's error shares the
/// service's name.
#[test]
fn picks_under_a_circuit_breaker_do_not_allocate() {
    let rt = rt();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::ConsistentHash,
    ] {
        let config = tai_loadbalancer::LoadBalancerConfig {
            circuit_breakers: tai_loadbalancer::CircuitBreakerConfig {
                max_requests: Some(4),
                ..Default::default()
            },
            ..Default::default()
        };
        let registry = std::sync::Arc::new(tai_loadbalancer::ServiceRegistry::new());
        rt.block_on(registry.register_batch("svc", (0..16).map(ep).collect()))
            .unwrap();
        let lb = rt
            .block_on(tai_loadbalancer::IntegratedLoadBalancer::new(
                registry, strategy, config,
            ))
            .unwrap();
        rt.block_on(lb.start()).unwrap();
        let handle = lb.service("svc").unwrap();
        let exercise = |rounds: u64| {
            let mut refused = 0;
            for i in 0..rounds {
                let held = [
                    lb.pick("svc").unwrap(),
                    handle.pick().unwrap(),
                    handle.pick_with_key_hash(i).unwrap(),
                    lb.pick_with_hash("svc", i.to_le_bytes()).unwrap(),
                ];
                // Full: refused at once, without allocating.
                refused += u64::from(black_box(handle.pick()).is_err());
                refused += u64::from(black_box(lb.select("svc")).is_err());
                for pick in held {
                    pick.success();
                }
                black_box(lb.select("svc").unwrap());
            }
            assert_eq!(refused, 2 * rounds);
        };
        exercise(1_000);
        std::thread::sleep(std::time::Duration::from_millis(50));
        exercise(1_000);
        let n = allocations_during(|| exercise(10_000));
        assert_eq!(
            n, 0,
            "{strategy}: {n} allocations in 10,000 rounds of admitted and refused picks"
        );
        rt.block_on(lb.stop()).unwrap();
    }
}

/// Health events cost the pick path nothing: with a `health_events()` subscriber and the
/// JSON-lines file sink running, and another thread marking endpoints down and up (each a
/// table publication and two events), picks and outcome reports on this thread allocate
/// nothing.
#[test]
fn picks_do_not_allocate_while_health_events_flow() {
    use std::sync::Arc;
    use tai_loadbalancer::{IntegratedLoadBalancer, LoadBalancerConfig, ServiceRegistry};

    let rt = rt();
    let dir = std::env::temp_dir().join(format!("tai-lb-zero-alloc-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let registry = Arc::new(ServiceRegistry::new());
    let endpoints: Vec<Endpoint> = (0..16).map(ep).collect();
    rt.block_on(registry.register_batch("svc", endpoints.clone()))
        .unwrap();
    let mut config = LoadBalancerConfig::default();
    config.health_events.log_path = Some(dir.join("events.jsonl"));
    let lb = Arc::new(
        rt.block_on(IntegratedLoadBalancer::new(
            registry,
            LoadBalancingStrategy::LeastConnections,
            config,
        ))
        .unwrap(),
    );
    rt.block_on(lb.start()).unwrap();
    let events = lb.health_events();
    let handle = lb.service("svc").unwrap();
    let exercise = |rounds: u64| {
        for i in 0..rounds {
            black_box(lb.pick("svc").unwrap().address());
            handle.pick().unwrap().record(
                Outcome::Success,
                Some(std::time::Duration::from_micros(i % 900 + 1)),
            );
        }
    };
    exercise(2_000);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let operator = {
        let (lb, stop, endpoint) = (lb.clone(), stop.clone(), endpoints[3].clone());
        std::thread::spawn(move || {
            let rt = common::rt();
            let mut toggles = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rt.block_on(lb.mark_down("svc", &endpoint)).unwrap();
                rt.block_on(lb.mark_up("svc", &endpoint)).unwrap();
                toggles += 1;
            }
            toggles
        })
    };
    let n = allocations_during(|| exercise(50_000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let toggles = operator.join().unwrap();
    assert!(toggles > 0, "events flowed while picking");
    assert!(events.drain().len() >= 2);
    assert_eq!(
        n, 0,
        "{n} allocations in 100,000 picks and reports while events flowed"
    );
    rt.block_on(lb.stop()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
