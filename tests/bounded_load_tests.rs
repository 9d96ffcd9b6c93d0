//! Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016):
//! `consistent_hash.balance_factor = c` caps each endpoint at `ceil(c × average in flight)`.
//!
//! * With c = 1.25 and one hot key range, no endpoint's in-flight count ever exceeds the cap
//!   while two threads pick and hold guards, checked continuously by a third; with bounded
//!   loads off the hot endpoint does exceed it (so the check can fail).
//! * Keys spill only while their owner is full: on an idle service every key goes to its
//!   plain consistent-hash owner, and the spill is itself consistent (the next endpoint along
//!   the ring).
//! * Session affinity honours the cap: a hot session key spills its requests and stays bound.
//! * Maglev tables get the same bound.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{addr, ep};
use tai_loadbalancer::{
    ConsistentHashConfig, HashAlgorithm, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    Pick, ServiceRegistry,
};

const ENDPOINTS: usize = 10;
const C: f64 = 1.25;
/// Guards each picking thread holds (oldest dropped first): the service's in-flight total
/// stays in 25..=32 once the window is full, where the cap `ceil(1.25 × total / 10)` is 4.
const WINDOW: usize = 14;
const THREADS: usize = 2;

fn config(balance_factor: Option<f64>, algorithm: HashAlgorithm) -> LoadBalancerConfig {
    LoadBalancerConfig {
        consistent_hash: ConsistentHashConfig {
            balance_factor,
            algorithm,
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn balancer(config: LoadBalancerConfig) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..ENDPOINTS).map(ep).collect())
        .await
        .unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::ConsistentHash, config)
        .await
        .unwrap();
    (registry, lb)
}

/// The cap as the issue defines it: `ceil(c × average in flight)`, at least 1.
fn cap(c: f64, total: u64) -> u64 {
    ((c * total as f64 / ENDPOINTS as f64).ceil() as u64).max(1)
}

/// Keys that all hash to the same endpoint when loads are ignored: one hot key range.
fn hot_keys(lb: &IntegratedLoadBalancer) -> (SocketAddr, Vec<String>) {
    let owner = lb.select_with_hash("svc", "hot-0").unwrap().address;
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("hot-{i}"))
        .filter(|k| lb.select_with_hash("svc", k).unwrap().address == owner)
        .take(64)
        .collect();
    assert!(keys.len() >= 32, "enough keys share one owner");
    (owner, keys)
}

struct Run {
    /// Most requests in flight seen on one endpoint while the window was full.
    max_seen: u64,
    /// Checks where an endpoint was over the cap of the total read in the same pass.
    violations: u64,
    /// Passes of the checker.
    checks: u64,
    /// Endpoints that served the hot keys.
    served: HashSet<SocketAddr>,
}

/// Checker passes (with both windows full) the pickers wait for before they stop.
const MIN_CHECKS: u64 = 2_000;

/// Two threads pick the hot keys and hold each guard for `WINDOW` picks; a third reads every
/// endpoint's in-flight count in a loop and checks it against the cap of the total it read.
/// The pickers make at least `picks` picks and go on until the checker made `MIN_CHECKS`
/// passes.
fn run(lb: Arc<IntegratedLoadBalancer>, keys: Vec<String>, c: f64, picks: usize) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let full = Arc::new(AtomicU64::new(0));
    let checks = Arc::new(AtomicU64::new(0));
    let checker = {
        let (lb, stop, full, checks) = (lb.clone(), stop.clone(), full.clone(), checks.clone());
        std::thread::spawn(move || {
            let mut run = Run {
                max_seen: 0,
                violations: 0,
                checks: 0,
                served: HashSet::new(),
            };
            while !stop.load(Ordering::Acquire) {
                let loads: Vec<u64> = (0..ENDPOINTS)
                    .map(|i| lb.in_flight("svc", addr(i)).unwrap())
                    .collect();
                let total: u64 = loads.iter().sum();
                let max = *loads.iter().max().unwrap();
                // Check once both windows are full: the total then stays in 25..=32, where the
                // cap is 4 whatever moment of a pass each endpoint was read at. (While the
                // windows fill, the total only grows, and so does the cap.)
                if full.load(Ordering::Acquire) == THREADS as u64 {
                    run.checks += 1;
                    checks.fetch_add(1, Ordering::Relaxed);
                    run.max_seen = run.max_seen.max(max);
                    if max > cap(c, total.max(25)) {
                        run.violations += 1;
                    }
                }
            }
            run
        })
    };
    let pickers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (lb, keys, full, checks) = (lb.clone(), keys.clone(), full.clone(), checks.clone());
            std::thread::spawn(move || {
                let mut held: VecDeque<Pick> = VecDeque::new();
                let mut served = HashSet::new();
                for n in 0.. {
                    if n >= picks && checks.load(Ordering::Relaxed) >= MIN_CHECKS {
                        break;
                    }
                    if held.len() == WINDOW {
                        held.pop_front();
                    }
                    let key = &keys[(n * 7 + t) % keys.len()];
                    let pick = lb.pick_with_hash("svc", key).unwrap();
                    served.insert(pick.address());
                    held.push_back(pick);
                    if n + 1 == WINDOW {
                        full.fetch_add(1, Ordering::AcqRel);
                    }
                }
                served
            })
        })
        .collect();
    let mut served = HashSet::new();
    for p in pickers {
        served.extend(p.join().unwrap());
    }
    stop.store(true, Ordering::Release);
    let mut run = checker.join().unwrap();
    run.served = served;
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_exceeds_the_cap_while_two_threads_hold_guards() {
    let (_registry, lb) = balancer(config(Some(C), HashAlgorithm::Ring)).await;
    let (owner, keys) = hot_keys(&lb);
    let lb = Arc::new(lb);
    let run = tokio::task::spawn_blocking({
        let lb = lb.clone();
        move || run(lb, keys, C, 200_000)
    })
    .await
    .unwrap();
    println!(
        "c = {C}: {} checks, most in flight on one endpoint {}, {} endpoints served the hot keys",
        run.checks,
        run.max_seen,
        run.served.len()
    );
    assert!(
        run.checks >= MIN_CHECKS,
        "the checker ran while the windows were full"
    );
    assert_eq!(run.violations, 0, "an endpoint went over the cap");
    assert!(run.max_seen <= 4);
    assert!(run.served.contains(&owner));
    assert!(run.served.len() > 1, "the hot keys spilled past their owner");
    for i in 0..ENDPOINTS {
        assert_eq!(lb.in_flight("svc", addr(i)), Some(0), "every guard ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bounded_loads_the_hot_endpoint_exceeds_the_cap() {
    let (_registry, lb) = balancer(config(None, HashAlgorithm::Ring)).await;
    let (owner, keys) = hot_keys(&lb);
    let lb = Arc::new(lb);
    let run = tokio::task::spawn_blocking(move || run(lb, keys, C, 20_000))
        .await
        .unwrap();
    assert!(run.checks >= MIN_CHECKS);
    assert!(run.violations > 0, "the check can fail");
    assert_eq!(
        run.max_seen,
        (THREADS * WINDOW) as u64,
        "every hot request on one endpoint"
    );
    assert_eq!(run.served, HashSet::from([owner]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_tables_get_the_same_bound() {
    let (_registry, lb) = balancer(config(Some(C), HashAlgorithm::Maglev)).await;
    let (_owner, keys) = hot_keys(&lb);
    let lb = Arc::new(lb);
    let run = tokio::task::spawn_blocking(move || run(lb, keys, C, 100_000))
        .await
        .unwrap();
    assert!(run.checks >= MIN_CHECKS);
    assert_eq!(run.violations, 0);
    assert!(run.served.len() > 1);
}

#[tokio::test]
async fn an_idle_service_routes_every_key_to_its_owner_and_the_spill_is_consistent() {
    let (_plain_registry, plain) = balancer(config(None, HashAlgorithm::Ring)).await;
    let (_registry, bounded) = balancer(config(Some(C), HashAlgorithm::Ring)).await;
    let (_registry2, bounded_too) = balancer(config(Some(C), HashAlgorithm::Ring)).await;
    // Idle: bounded loads change nothing.
    for k in 0..5_000u32 {
        let key = k.to_le_bytes();
        let owner = plain.select_with_hash("svc", key).unwrap().address;
        assert_eq!(bounded.select_with_hash("svc", key).unwrap().address, owner);
        let pick = bounded.pick_with_hash("svc", key).unwrap();
        assert_eq!(pick.address(), owner, "an idle owner is under the cap");
    }
    // Loaded alike, two balancers spill a key alike: the walk is a function of the ring and
    // the loads.
    let (_, keys) = hot_keys(&bounded);
    let mut held = (Vec::new(), Vec::new());
    let mut spills = HashMap::new();
    for key in keys.iter().cycle().take(40) {
        let a = bounded.pick_with_hash("svc", key).unwrap();
        let b = bounded_too.pick_with_hash("svc", key).unwrap();
        assert_eq!(a.address(), b.address(), "{key}");
        *spills.entry(a.address()).or_insert(0) += 1;
        held.0.push(a);
        held.1.push(b);
    }
    assert!(
        spills.len() > 1,
        "the hot owner filled up and keys spilled: {spills:?}"
    );
    let most = spills.values().max().unwrap();
    assert!(*most as u64 <= cap(C, 40), "{spills:?}");
}

#[tokio::test]
async fn a_hot_session_key_spills_at_the_cap_and_stays_bound() {
    let (_registry, lb) = balancer(config(Some(C), HashAlgorithm::Ring)).await;
    let first = lb.pick_with_affinity("svc", "session-hot").unwrap();
    let home = first.address();
    let mut held = vec![first];
    let mut places = HashMap::new();
    for _ in 0..39 {
        let pick = lb.pick_with_affinity("svc", "session-hot").unwrap();
        *places.entry(pick.address()).or_insert(0u64) += 1;
        held.push(pick);
        let total: u64 = (0..ENDPOINTS)
            .map(|i| lb.in_flight("svc", addr(i)).unwrap())
            .sum();
        let max = (0..ENDPOINTS)
            .map(|i| lb.in_flight("svc", addr(i)).unwrap())
            .max()
            .unwrap();
        assert!(max <= cap(C, total), "{max} in flight at total {total}");
    }
    assert!(places.len() > 1, "the session's requests spilled: {places:?}");
    // The key stays bound: once the load is gone, its requests go home again.
    drop(held);
    for _ in 0..10 {
        assert_eq!(
            lb.pick_with_affinity("svc", "session-hot").unwrap().address(),
            home
        );
    }
    let bound = lb.affinity().get_affinity("svc", "session-hot").await;
    assert_eq!(bound.map(|e| e.address), Some(home), "the binding never moved");
}

#[test]
fn balance_factor_is_validated() {
    for (text, ok) in [
        ("balance_factor = 1.25", true),
        ("balance_factor = 1.0", true),
        ("balance_factor = 100.0", true),
        ("balance_factor = 0.99", false),
        ("balance_factor = 0.0", false),
        ("balance_factor = -1.0", false),
        ("balance_factor = 100.5", false),
        ("balance_factor = nan", false),
        ("balance_factor = inf", false),
    ] {
        let parsed = LoadBalancerConfig::from_toml_str(&format!("[consistent_hash]\n{text}\n"));
        assert_eq!(parsed.is_ok(), ok, "{text}: {parsed:?}");
        if let Err(e) = parsed {
            assert!(e.to_string().contains("balance_factor"), "{e}");
        }
    }
}
