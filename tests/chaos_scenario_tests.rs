//! Chaos: picks on two threads while the registry churns through 1,000+ changes.
//!
//! Checked for every strategy (and for hash-keyed picks):
//! * no pick that *started after* a deregistration returned ever gets that endpoint;
//! * no panic on any thread;
//! * every in-flight counter is back to 0 once the pickers have dropped their guards.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use common::{addr, ep, rt};
use tai_loadbalancer::{
    Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, Pick, ServiceRegistry,
};

const POOL: usize = 1_400;
const CHANGES: usize = 1_200;

/// Index of a loopback test address (inverse of `common::addr`).
fn index_of(a: std::net::SocketAddr) -> usize {
    let std::net::SocketAddr::V4(v4) = a else {
        panic!("unexpected {a}")
    };
    let host = (u32::from(*v4.ip()) & 0x00ff_ffff) as usize - 1;
    host * 64 + (v4.port() as usize - 30_000)
}

struct Ledger {
    /// Incremented after each deregistration returns.
    epoch: AtomicU64,
    /// For each address: the epoch at which its deregistration returned (0 = live).
    removed_at: Vec<AtomicU64>,
    violations: AtomicUsize,
    picks: AtomicUsize,
    stop: AtomicBool,
}

fn picker(lb: &IntegratedLoadBalancer, ledger: &Ledger, hashed: bool) {
    let mut held: VecDeque<Pick> = VecDeque::new();
    let mut k = 0u64;
    while !ledger.stop.load(Ordering::SeqCst) {
        let started = ledger.epoch.load(Ordering::SeqCst);
        k += 1;
        let result = if hashed {
            lb.pick_with_hash("svc", k.to_le_bytes())
        } else {
            lb.pick("svc")
        };
        match result {
            Ok(pick) => {
                let removed = ledger.removed_at[index_of(pick.address())].load(Ordering::SeqCst);
                if removed != 0 && removed <= started {
                    ledger.violations.fetch_add(1, Ordering::SeqCst);
                }
                ledger.picks.fetch_add(1, Ordering::Relaxed);
                held.push_back(pick);
                if held.len() > 16 {
                    held.pop_front();
                }
                if k % 64 == 0 {
                    // Two pickers per test and several tests at once share two cores with the
                    // control threads: let them run.
                    std::thread::yield_now();
                }
            }
            Err(Error::NoEndpoints { .. }) => {}
            Err(e) => panic!("unexpected pick error: {e}"),
        }
    }
}

fn churn(strategy: LoadBalancingStrategy, hashed: bool) {
    let rt = rt();
    let registry = Arc::new(ServiceRegistry::new());
    rt.block_on(registry.register_batch("svc", (0..8).map(ep).collect()))
        .unwrap();
    let lb = rt
        .block_on(IntegratedLoadBalancer::new(
            registry.clone(),
            strategy,
            LoadBalancerConfig::default(),
        ))
        .unwrap();
    rt.block_on(lb.start()).unwrap();
    let ledger = Ledger {
        epoch: AtomicU64::new(0),
        removed_at: (0..POOL).map(|_| AtomicU64::new(0)).collect(),
        violations: AtomicUsize::new(0),
        picks: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    std::thread::scope(|s| {
        let pickers: Vec<_> = (0..2).map(|_| s.spawn(|| picker(&lb, &ledger, hashed))).collect();
        rt.block_on(async {
            let mut live: VecDeque<usize> = (0..8).collect();
            let mut next = 8;
            for change in 0..CHANGES {
                if live.len() > 3 && (change % 3 != 0 || next >= POOL) {
                    // Remove the oldest live endpoint, then record when the call returned.
                    let gone = live.pop_front().unwrap();
                    registry.deregister("svc", &ep(gone)).await.unwrap();
                    let e = ledger.epoch.load(Ordering::SeqCst) + 1;
                    ledger.removed_at[gone].store(e, Ordering::SeqCst);
                    ledger.epoch.store(e, Ordering::SeqCst);
                } else {
                    // Fresh addresses only: a removed address never comes back.
                    registry.register("svc", ep(next)).await.unwrap();
                    live.push_back(next);
                    next += 1;
                }
                if change % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        ledger.stop.store(true, Ordering::SeqCst);
        for p in pickers {
            p.join().expect("picker panicked");
        }
    });
    assert_eq!(
        ledger.violations.load(Ordering::SeqCst),
        0,
        "picked endpoints after their removal returned"
    );
    assert!(ledger.picks.load(Ordering::Relaxed) > 1_000, "pickers barely ran");
    let metrics = lb.metrics();
    assert_eq!(metrics.in_flight, 0, "in-flight counts leaked");
    for service in &metrics.services {
        for endpoint in &service.endpoints {
            assert_eq!(endpoint.in_flight, 0, "{} still in flight", endpoint.address);
        }
    }
    assert!(metrics.total_requests >= ledger.picks.load(Ordering::Relaxed) as u64);
    rt.block_on(lb.stop()).unwrap();
    assert!(addr(0).ip().is_loopback());
}

#[test]
fn churn_round_robin() {
    churn(LoadBalancingStrategy::RoundRobin, false);
}

#[test]
fn churn_least_connections() {
    churn(LoadBalancingStrategy::LeastConnections, false);
}

#[test]
fn churn_weighted_and_random() {
    churn(LoadBalancingStrategy::Weighted, false);
    churn(LoadBalancingStrategy::Random, false);
}

#[test]
fn churn_consistent_hash() {
    churn(LoadBalancingStrategy::ConsistentHash, true);
}

#[test]
fn churn_hash_keys_on_a_round_robin_balancer() {
    churn(LoadBalancingStrategy::RoundRobin, true);
}

// ===== health flapping =====

/// A check whose verdicts a flapper thread flips every 50 ms.
#[cfg(feature = "runtime")]
struct Flapping(Arc<std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>>);

#[cfg(feature = "runtime")]
#[async_trait::async_trait]
impl tai_loadbalancer::HealthCheck for Flapping {
    async fn check(&self, endpoint: &tai_loadbalancer::Endpoint) -> Result<(), String> {
        if self.0.lock().unwrap().contains(&endpoint.address) {
            Err("flapping down".into())
        } else {
            Ok(())
        }
    }
}

#[cfg(feature = "runtime")]
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Two threads pick while backends flap every 50 ms for three seconds: every pick's endpoint
/// was routable in the very table version the pick used, in-flight counts return to 0, no
/// panic, and memory stays bounded.
#[cfg(feature = "runtime")]
#[test]
fn picks_while_backends_flap() {
    use tai_loadbalancer::{HealthCheckConfig, HealthCheckKind};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let down = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let config = LoadBalancerConfig {
        health_check: HealthCheckConfig {
            enabled: true,
            interval: std::time::Duration::from_millis(10),
            timeout: std::time::Duration::from_millis(5),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            grace_period: std::time::Duration::ZERO,
            jitter: std::time::Duration::from_millis(2),
            max_concurrent: 16,
            check: HealthCheckKind::custom(Flapping(down.clone())),
        },
        panic_threshold_percent: 0, // unhealthy means unroutable, so the check below is exact
        ..Default::default()
    };
    let registry = Arc::new(ServiceRegistry::new());
    rt.block_on(registry.register_batch("svc", (0..8).map(ep).collect()))
        .unwrap();
    let lb = rt
        .block_on(IntegratedLoadBalancer::new(
            registry.clone(),
            LoadBalancingStrategy::LeastConnections,
            config,
        ))
        .unwrap();
    let updates = lb.routing_updates();
    // The table published at construction, before the subscription.
    let initial = lb.metrics().services.remove(0);
    let initial_routable: Vec<std::net::SocketAddr> = initial
        .endpoints
        .iter()
        .filter(|e| e.routable)
        .map(|e| e.address)
        .collect();
    rt.block_on(lb.start()).unwrap();
    let stop = AtomicBool::new(false);
    let flips = AtomicUsize::new(0);
    let rss_start = resident_bytes();
    let samples: Vec<Vec<(u64, std::net::SocketAddr)>> = std::thread::scope(|s| {
        let pickers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut samples = Vec::with_capacity(200_000);
                    let mut held: VecDeque<Pick> = VecDeque::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match lb.pick("svc") {
                            Ok(pick) => {
                                if n % 8 == 0 && samples.len() < samples.capacity() {
                                    samples.push((pick.table_version(), pick.address()));
                                }
                                held.push_back(pick);
                                if held.len() > 8 {
                                    held.pop_front();
                                }
                            }
                            Err(Error::NoHealthyEndpoints { .. }) => {}
                            Err(e) => panic!("unexpected pick error: {e}"),
                        }
                        if n % 256 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    samples
                })
            })
            .collect();
        let flapper = s.spawn(|| {
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                {
                    let mut d = down.lock().unwrap();
                    d.clear();
                    for i in 0..8 {
                        if (i + round) % 3 == 0 {
                            d.insert(addr(i));
                        }
                    }
                }
                flips.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        std::thread::sleep(std::time::Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        flapper.join().unwrap();
        pickers
            .into_iter()
            .map(|p| p.join().expect("picker panicked"))
            .collect()
    });
    rt.block_on(lb.stop()).unwrap();
    let rss_end = resident_bytes();

    // Every sampled pick's endpoint was routable in the table version it was made from.
    let mut routable_by_version = std::collections::HashMap::new();
    routable_by_version.insert(initial.table_version, initial_routable);
    for update in updates.drain() {
        if update.service == "svc" {
            routable_by_version.insert(update.version, update.routable);
        }
    }
    let mut checked = 0;
    for (version, address) in samples.iter().flatten() {
        let routable = routable_by_version
            .get(version)
            .unwrap_or_else(|| panic!("pick used version {version}, never published"));
        assert!(
            routable.contains(address),
            "{address} picked from version {version}, where it was not routable"
        );
        checked += 1;
    }
    let versions = routable_by_version.len();
    println!(
        "flapping: {} flips, {versions} tables, {checked} sampled picks checked, rss {} -> {} MiB",
        flips.load(Ordering::Relaxed),
        rss_start >> 20,
        rss_end >> 20
    );
    assert!(flips.load(Ordering::Relaxed) >= 40, "the flapper barely ran");
    assert!(versions >= 20, "only {versions} tables published while flapping");
    assert!(checked > 1_000, "only {checked} picks sampled");
    let metrics = lb.metrics();
    assert_eq!(metrics.in_flight, 0);
    assert!(
        rss_end.saturating_sub(rss_start) < 64 << 20,
        "resident memory grew by {} MiB",
        (rss_end - rss_start) >> 20
    );
}
