//! Maglev (Eisenbud et al., NSDI 2016) next to the ring, measured the way the crate's hashing
//! properties are measured: 50,000 keys over 10 endpoints.
//!
//! * Every key maps the same in two OS processes (a fleet agrees).
//! * Balance: each of 10 endpoints gets 10 % of the keys within ±5 % (relative) with the
//!   default table size 65,537.
//! * Disruption on one removal and one addition: the keys that move *between endpoints that
//!   stay* (the ring moves none; Maglev moves a few), asserted as measured.
//! * Weights are honoured by Maglev's weighted population.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::{addr, ep, weighted};
use tai_loadbalancer::{
    ConsistentHashConfig, Endpoint, HashAlgorithm, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, ServiceRegistry,
};

const KEYS: u64 = 50_000;

fn config(algorithm: HashAlgorithm) -> LoadBalancerConfig {
    LoadBalancerConfig {
        consistent_hash: ConsistentHashConfig {
            algorithm,
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn balancer(
    algorithm: HashAlgorithm,
    endpoints: Vec<Endpoint>,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("svc", endpoints).await.unwrap();
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::ConsistentHash,
        config(algorithm),
    )
    .await
    .unwrap();
    (registry, lb)
}

fn owners(lb: &IntegratedLoadBalancer) -> Vec<SocketAddr> {
    (0..KEYS)
        .map(|k| lb.select_with_hash("svc", k.to_le_bytes()).unwrap().address)
        .collect()
}

fn shares(owners: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
    let mut counts = HashMap::new();
    for o in owners {
        *counts.entry(*o).or_default() += 1;
    }
    counts
}

/// The largest relative deviation of an endpoint's share from the mean, in percent.
fn worst_deviation(owners: &[SocketAddr], endpoints: usize) -> f64 {
    let mean = owners.len() as f64 / endpoints as f64;
    let counts = shares(owners);
    assert_eq!(counts.len(), endpoints, "every endpoint owns keys");
    counts
        .values()
        .map(|&c| (c as f64 - mean).abs() / mean * 100.0)
        .fold(0.0, f64::max)
}

/// Keys whose owner changed from one endpoint that stays to another that stays.
fn moved_between_stayers(
    before: &[SocketAddr],
    after: &[SocketAddr],
    stays: impl Fn(SocketAddr) -> bool,
) -> usize {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b != a && stays(**b) && stays(**a))
        .count()
}

struct Figures {
    deviation: f64,
    moved_on_removal: usize,
    lost_by_removed: usize,
    moved_on_addition: usize,
    gained_by_added: usize,
}

async fn measure(algorithm: HashAlgorithm) -> Figures {
    let (registry, lb) = balancer(algorithm, (0..10).map(ep).collect()).await;
    let base = owners(&lb);
    let deviation = worst_deviation(&base, 10);

    registry.deregister("svc", &ep(3)).await.unwrap();
    let removed = owners(&lb);
    let moved_on_removal = moved_between_stayers(&base, &removed, |a| a != addr(3));
    let lost_by_removed = base.iter().filter(|&&o| o == addr(3)).count();

    registry.register("svc", ep(3)).await.unwrap();
    assert_eq!(owners(&lb), base, "the same set maps the same again");
    registry.register("svc", ep(10)).await.unwrap();
    let added = owners(&lb);
    let moved_on_addition = moved_between_stayers(&base, &added, |a| a != addr(10));
    let gained_by_added = added.iter().filter(|&&o| o == addr(10)).count();
    Figures {
        deviation,
        moved_on_removal,
        lost_by_removed,
        moved_on_addition,
        gained_by_added,
    }
}

#[tokio::test]
async fn maglev_balances_better_and_disrupts_more_than_the_ring() {
    let ring = measure(HashAlgorithm::Ring).await;
    let maglev = measure(HashAlgorithm::Maglev).await;
    for (name, f) in [("ring", &ring), ("maglev", &maglev)] {
        println!(
            "{name}: worst share deviation {:.2} %; removal: {} keys of the removed endpoint \
             moved, {} keys moved between the others; addition: {} keys to the new endpoint, \
             {} keys moved between the others",
            f.deviation, f.lost_by_removed, f.moved_on_removal, f.gained_by_added, f.moved_on_addition
        );
    }
    // Balance: both within ±5 %. At 50,000 keys this is mostly the keys' own sampling noise
    // (±1.3 % per endpoint): measured 1.64 % for the ring, 3.40 % for Maglev, whose table is
    // balanced to one entry in 6,554 (the next test separates the two).
    assert!(maglev.deviation <= 5.0, "maglev: {:.2} %", maglev.deviation);
    assert!(ring.deviation <= 5.0, "ring: {:.2} %", ring.deviation);

    // The ring moves only what it must.
    assert_eq!(ring.moved_on_removal, 0);
    assert_eq!(ring.moved_on_addition, 0);

    // Maglev moves a few keys between endpoints that stay, as measured (50,000 keys, 10
    // endpoints, M = 65,537; BENCHMARKS.md): the figures are deterministic, the band allows
    // only for a deliberate change of the table's construction, which must update them.
    assert!(
        (MAGLEV_MOVED_ON_REMOVAL.0..=MAGLEV_MOVED_ON_REMOVAL.1).contains(&maglev.moved_on_removal),
        "maglev removal: {} keys moved between the others",
        maglev.moved_on_removal
    );
    assert!(
        (MAGLEV_MOVED_ON_ADDITION.0..=MAGLEV_MOVED_ON_ADDITION.1).contains(&maglev.moved_on_addition),
        "maglev addition: {} keys moved between the others",
        maglev.moved_on_addition
    );
    assert!(maglev.moved_on_removal > ring.moved_on_removal);
    assert!(maglev.moved_on_addition > ring.moved_on_addition);
}

/// Keys moved between the 9 endpoints that stay when one of 10 is removed: 97 of 50,000
/// (0.19 %) measured, ±10 %.
const MAGLEV_MOVED_ON_REMOVAL: (usize, usize) = (87, 107);
/// Keys moved between the 10 endpoints that stay when an 11th is added: 105 of 50,000
/// (0.21 %) measured, ±10 %.
const MAGLEV_MOVED_ON_ADDITION: (usize, usize) = (95, 116);

/// The mapping of a process whose registry was built in its own order.
async fn maglev_mapping(order: &[usize]) -> Vec<SocketAddr> {
    let registry = Arc::new(ServiceRegistry::new());
    for &i in order {
        registry.register("svc", ep(i)).await.unwrap();
    }
    let lb = IntegratedLoadBalancer::new(
        registry,
        LoadBalancingStrategy::ConsistentHash,
        config(HashAlgorithm::Maglev),
    )
    .await
    .unwrap();
    owners(&lb)
}

#[test]
fn child_process_maglev_mapping() {
    // Runs only as the child of `maglev_maps_every_key_alike_in_two_processes`.
    if std::env::var_os("TAI_LB_MAGLEV_CHILD").is_none() {
        return;
    }
    let owners = common::rt().block_on(maglev_mapping(&[7, 2, 9, 0, 5, 1, 8, 3, 6, 4]));
    let text: Vec<String> = owners.iter().map(ToString::to_string).collect();
    println!("MAPPING {}", text.join(","));
}

#[tokio::test]
async fn maglev_maps_every_key_alike_in_two_processes() {
    let here = maglev_mapping(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).await;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_maglev_mapping",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TAI_LB_MAGLEV_CHILD", "1")
        .output()
        .expect("the test binary runs as a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .split("MAPPING ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no mapping from the child ({} bytes of output)", stdout.len()));
    let there: Vec<SocketAddr> = line.split(',').map(|a| a.parse().unwrap()).collect();
    assert_eq!(there.len(), KEYS as usize);
    assert_eq!(there, here, "another process, another order, the same owners");
}

#[tokio::test]
async fn maglev_honours_weights() {
    // Weights 1, 2, 3, 4: shares 10 %, 20 %, 30 %, 40 %.
    let (_registry, lb) = balancer(
        HashAlgorithm::Maglev,
        (0..4).map(|i| weighted(i, i as u32 + 1)).collect(),
    )
    .await;
    let counts = shares(&owners(&lb));
    for i in 0..4 {
        let share = counts[&addr(i)] as f64 / KEYS as f64;
        let expected = (i + 1) as f64 / 10.0;
        assert!(
            (share - expected).abs() / expected < 0.05,
            "weight {}: share {share:.4}, expected {expected}",
            i + 1
        );
    }
}

#[tokio::test]
async fn maglev_table_size_is_validated() {
    for (size, ok) in [
        (65_537, true),
        (251, true),
        (65_536, false), // not prime
        (250, false),    // below the minimum
        (16_777_259, true),
        (16_777_261, false), // above the maximum
    ] {
        let text = format!("[consistent_hash]\nalgorithm = \"maglev\"\nmaglev_table_size = {size}\n");
        let parsed = LoadBalancerConfig::from_toml_str(&text);
        assert_eq!(parsed.is_ok(), ok, "{size}: {parsed:?}");
        if let Err(e) = parsed {
            assert!(e.to_string().contains("maglev_table_size"), "{e}");
        }
    }
}

#[tokio::test]
async fn a_small_table_still_routes_every_endpoint() {
    // M = 251 for 10 endpoints is below the recommended 100 × N: it warns, and still works.
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..10).map(ep).collect())
        .await
        .unwrap();
    let mut config = config(HashAlgorithm::Maglev);
    config.consistent_hash.maglev_table_size = 251;
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::ConsistentHash, config)
        .await
        .unwrap();
    assert_eq!(shares(&owners(&lb)).len(), 10);
}

#[tokio::test]
async fn with_a_million_keys_the_tables_own_balance_shows() {
    // 50,000 keys carry a sampling noise of about ±1.3 % per endpoint (binomial), larger than
    // Maglev's table imbalance; a million keys (±0.3 %) show the structures themselves.
    let keys = 1_000_000u64;
    let mut worst = Vec::new();
    for algorithm in [HashAlgorithm::Ring, HashAlgorithm::Maglev] {
        let (_registry, lb) = balancer(algorithm, (0..10).map(ep).collect()).await;
        let owners: Vec<SocketAddr> = (0..keys)
            .map(|k| lb.select_with_hash("svc", k.to_le_bytes()).unwrap().address)
            .collect();
        let deviation = worst_deviation(&owners, 10);
        println!("{algorithm:?}: worst share deviation over {keys} keys {deviation:.2} %");
        worst.push(deviation);
    }
    let (ring, maglev) = (worst[0], worst[1]);
    assert!(maglev < ring, "maglev {maglev:.2} % vs ring {ring:.2} %");
    assert!(maglev <= 1.0, "maglev {maglev:.2} %");
}
