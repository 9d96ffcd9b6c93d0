//! The seed README's snippets (as written, or as corrected in our README), and every property
//! the core data-plane issue states, as assertions against the public API.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{addr, ep, key, rt, setup, weighted};
use tai_loadbalancer::{
    Endpoint, EndpointMetadata, Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    Outcome, ServiceRegistry,
};

// ===== seed snippets =====

/// The seed's Quick Start, verbatim (inside a test function instead of `main`).
#[tokio::test]
async fn seed_quick_start() -> Result<(), Box<dyn std::error::Error>> {
    // Create service registry
    let registry = Arc::new(ServiceRegistry::new());

    // Register endpoints
    registry
        .register(
            "api-service".to_string(),
            Endpoint::new("127.0.0.1:5001".parse()?, None),
        )
        .await?;

    registry
        .register(
            "api-service".to_string(),
            Endpoint::new("127.0.0.1:5002".parse()?, None),
        )
        .await?;

    // Create load balancer
    let lb = IntegratedLoadBalancer::new(
        registry,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await?;

    // Start background processes (health checks, rebalancing)
    lb.start().await?;

    // Get next endpoint
    let endpoint = lb.next_endpoint("api-service").await?;
    println!("Selected endpoint: {}", endpoint.address);
    assert!(["127.0.0.1:5001", "127.0.0.1:5002"].contains(&endpoint.address.to_string().as_str()));

    // Cleanup
    lb.stop().await?;

    Ok(())
}

/// The seed's ServiceRegistry and LoadBalancer snippets.
#[tokio::test]
async fn seed_registry_and_balancer_snippets() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoint = Endpoint::new(
        "127.0.0.1:6001".parse()?,
        Some(
            EndpointMetadata::new()
                .with_region("us-west-2")
                .with_zone("us-west-2a"),
        ),
    );

    // Register single endpoint
    registry.register("service", endpoint.clone()).await?;
    // Batch register
    registry
        .register_batch(
            "service",
            vec![
                Endpoint::new("127.0.0.1:6002".parse()?, None),
                Endpoint::new(
                    "127.0.0.1:6003".parse()?,
                    Some(EndpointMetadata::new().with_region("eu-west-1")),
                ),
            ],
        )
        .await?;
    // Find by metadata
    let endpoints = registry.find_matching("service", Some("us-west-2"), None).await?;
    assert_eq!(endpoints, vec![endpoint.clone()]);
    assert_eq!(
        registry
            .find_matching("service", None, Some("us-west-2a"))
            .await?
            .len(),
        1
    );
    assert_eq!(registry.find_matching("service", None, None).await?.len(), 3);

    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await?;
    // Simple routing
    let endpoint_a = lb.next_endpoint("service").await?;
    // Hash-based routing
    let hashed = lb.next_endpoint_with_hash("service", "user-123").await?;
    assert_eq!(hashed, lb.next_endpoint_with_hash("service", "user-123").await?);
    assert!(registry.endpoints("service").await?.contains(&endpoint_a));

    // Deregister
    registry.deregister("service", &endpoint).await?;
    assert!(
        registry
            .find_matching("service", Some("us-west-2"), None)
            .await?
            .is_empty()
    );
    for _ in 0..10 {
        assert_ne!(lb.next_endpoint("service").await?.address, endpoint.address);
    }
    Ok(())
}

/// The seed's metrics snippet does not compile (`100.0 * u64`); the corrected form from our
/// README, with counters that mean what the docs say.
#[tokio::test]
async fn seed_metrics_snippet_corrected() -> Result<(), Box<dyn std::error::Error>> {
    let (_registry, lb) = setup(LoadBalancingStrategy::RoundRobin, vec![ep(1), ep(2)]).await;
    for i in 0..10 {
        let pick = lb.pick("svc")?;
        if i < 8 { pick.success() } else { pick.failure() }
    }
    let _unreported = lb.next_endpoint("svc").await?;

    let metrics = lb.metrics();
    println!("Requests: {}", metrics.total_requests);
    println!(
        "Success: {}%",
        100.0 * metrics.successful_requests as f64 / metrics.total_requests as f64
    );
    assert_eq!(metrics.total_requests, 11);
    assert_eq!(metrics.successful_requests, 8);
    assert_eq!(metrics.failed_requests, 2);
    assert_eq!(metrics.success_rate(), Some(0.8));
    assert_eq!(metrics.in_flight, 0);
    Ok(())
}

// ===== registry semantics =====

#[tokio::test]
async fn identity_is_the_address_and_reregistration_is_idempotent() {
    let registry = ServiceRegistry::new();
    registry.register("svc", ep(1)).await.unwrap();
    let v = registry.version();
    registry.register("svc", ep(1)).await.unwrap();
    assert_eq!(registry.version(), v, "identical re-registration changes nothing");
    registry.register("svc", weighted(1, 7)).await.unwrap();
    let eps = registry.endpoints("svc").await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].weight(), 7);
    assert_eq!(registry.services().await, vec!["svc".to_string()]);
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_changes_nothing() {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", ep(1)).await.unwrap();
    let v = registry.version();

    assert!(matches!(
        registry.register("", ep(2)).await,
        Err(Error::InvalidServiceName { .. })
    ));
    assert!(matches!(
        registry.register(" svc", ep(2)).await,
        Err(Error::InvalidServiceName { .. })
    ));
    assert!(matches!(
        registry.register("svc", weighted(2, 0)).await,
        Err(Error::InvalidWeight { weight: 0, .. })
    ));
    assert!(matches!(
        registry
            .register("svc", Endpoint::new("0.0.0.0:80".parse().unwrap(), None))
            .await,
        Err(Error::InvalidAddress { .. })
    ));
    match registry.deregister("nope", &ep(1)).await {
        Err(Error::UnknownService { service }) => assert_eq!(&*service, "nope"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        registry.deregister("svc", &ep(9)).await,
        Err(Error::UnknownEndpoint { .. })
    ));
    assert!(matches!(
        registry.find_matching("nope", None, None).await,
        Err(Error::UnknownService { .. })
    ));
    assert!(matches!(
        registry.remove_service("nope").await,
        Err(Error::UnknownService { .. })
    ));

    // A batch is all or nothing: one bad endpoint and nothing is registered.
    let err = registry
        .register_batch("svc", vec![ep(2), ep(3), weighted(4, 2_000_000)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidWeight { .. }), "{err}");
    assert!(matches!(
        registry.register_batch("svc", vec![ep(2), ep(2)]).await,
        Err(Error::DuplicateEndpoint { .. })
    ));
    assert!(matches!(
        registry
            .register_batch("new-svc", vec![ep(2), weighted(3, 0)])
            .await,
        Err(Error::InvalidWeight { .. })
    ));
    assert_eq!(registry.endpoints("svc").await.unwrap(), vec![ep(1)]);
    assert_eq!(
        registry.services().await,
        vec!["svc".to_string()],
        "failed batch created no service"
    );
    assert_eq!(registry.version(), v);

    // Errors name the problem.
    let e = registry
        .register("svc", weighted(2, 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight") && e.contains(&addr(2).to_string()), "{e}");
}

#[tokio::test]
async fn picks_on_unknown_or_empty_services_are_typed_errors() {
    let (registry, lb) = setup(LoadBalancingStrategy::RoundRobin, vec![ep(1)]).await;
    assert!(matches!(lb.pick("nope"), Err(Error::UnknownService { .. })));
    assert!(matches!(
        lb.next_endpoint("nope").await,
        Err(Error::UnknownService { .. })
    ));
    registry.deregister("svc", &ep(1)).await.unwrap();
    match lb.pick("svc") {
        Err(Error::NoEndpoints { service }) => assert_eq!(&*service, "svc"),
        other => panic!("{other:?}"),
    }
    registry.remove_service("svc").await.unwrap();
    assert!(matches!(lb.pick("svc"), Err(Error::UnknownService { .. })));
    assert!(lb.services().is_empty());
}

#[tokio::test]
async fn invalid_config_is_refused_naming_the_field() {
    let registry = Arc::new(ServiceRegistry::new());
    let mut config = LoadBalancerConfig::default();
    config.consistent_hash.slots = 1000;
    match IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config).await {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "consistent_hash.slots"),
        other => panic!("{other:?}"),
    }
}

// ===== read-your-writes and lifecycle =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_across_balancers_sharing_a_registry() {
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..4).map(ep).collect())
        .await
        .unwrap();
    let mut balancers = Vec::new();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancingStrategy::LeastConnections,
    ] {
        let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default())
            .await
            .unwrap();
        balancers.push(lb);
    }
    balancers[0].start().await.unwrap(); // one threaded, two applying inline
    balancers[1].start().await.unwrap();
    for round in 0..50 {
        let gone = ep(round % 4);
        registry.deregister("svc", &gone).await.unwrap();
        for lb in &balancers {
            for k in 0..20 {
                assert_ne!(lb.pick("svc").unwrap().address(), gone.address);
                assert_ne!(lb.select_with_hash("svc", key(k)).unwrap().address, gone.address);
            }
        }
        registry.register("svc", gone.clone()).await.unwrap();
        for lb in &balancers {
            assert!(
                lb.service("svc")
                    .unwrap()
                    .endpoints()
                    .iter()
                    .any(|(e, _)| e.address == gone.address)
            );
        }
    }
    let added = ep(100);
    registry.register("other", added.clone()).await.unwrap();
    for lb in &balancers {
        assert_eq!(lb.next_endpoint("other").await.unwrap(), added);
    }
}

#[tokio::test]
async fn start_stop_are_idempotent_and_stop_is_final() {
    let (registry, lb) = setup(LoadBalancingStrategy::RoundRobin, vec![ep(1)]).await;
    assert!(!lb.is_running());
    lb.start().await.unwrap();
    lb.start().await.unwrap();
    assert!(lb.is_running());
    let handle = lb.service("svc").unwrap();
    let held = lb.pick("svc").unwrap();
    lb.stop().await.unwrap();
    lb.stop().await.unwrap();
    assert!(!lb.is_running());
    assert!(matches!(lb.start().await, Err(Error::Stopped)));
    assert!(matches!(lb.pick("svc"), Err(Error::Stopped)));
    assert!(matches!(lb.pick("unknown"), Err(Error::Stopped)));
    assert!(matches!(handle.pick(), Err(Error::Stopped)));
    assert!(matches!(lb.next_endpoint("svc").await, Err(Error::Stopped)));
    // The registry no longer waits for it, and a held pick still ends cleanly.
    registry.register("svc", ep(2)).await.unwrap();
    assert_eq!(held.address(), addr(1));
    drop(held);
    assert_eq!(lb.metrics().in_flight, 0);
}

#[test]
fn picks_work_outside_any_runtime_and_async_calls_are_ready_at_once() {
    let (registry, lb) = rt().block_on(setup(LoadBalancingStrategy::Random, vec![ep(1), ep(2)]));
    let lb = Arc::new(lb);
    // Plain OS threads, no runtime.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let lb = lb.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    let pick = lb.pick("svc").unwrap();
                    assert!(pick.address() == addr(1) || pick.address() == addr(2));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The async API completes on its first poll (no lock, no channel on the pick path).
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(lb.next_endpoint("svc"));
    assert!(matches!(
        fut.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Ok(_))
    ));
    let mut fut = std::pin::pin!(lb.next_endpoint_with_hash("svc", "k"));
    assert!(matches!(
        fut.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Ok(_))
    ));
    drop(registry);
}

// ===== strategies =====

#[tokio::test]
async fn round_robin_rotates_exactly_for_a_sequential_caller() {
    let (_r, lb) = setup(LoadBalancingStrategy::RoundRobin, (0..5).map(ep).collect()).await;
    let first: Vec<SocketAddr> = (0..5).map(|_| lb.pick("svc").unwrap().address()).collect();
    let distinct: HashSet<_> = first.iter().collect();
    assert_eq!(distinct.len(), 5, "one full rotation visits every endpoint once");
    for round in 0..20 {
        for (i, expected) in first.iter().enumerate() {
            assert_eq!(
                &lb.next_endpoint("svc").await.unwrap().address,
                expected,
                "round {round} step {i}"
            );
        }
    }
}

#[test]
fn round_robin_is_fair_under_concurrency() {
    let (_r, lb) = rt().block_on(setup(LoadBalancingStrategy::RoundRobin, (0..4).map(ep).collect()));
    let handle = lb.service("svc").unwrap();
    let counts: Vec<HashMap<SocketAddr, u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut c = HashMap::new();
                    for _ in 0..20_000 {
                        *c.entry(handle.pick().unwrap().address()).or_insert(0) += 1;
                    }
                    c
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut total: HashMap<SocketAddr, u64> = HashMap::new();
    for c in counts {
        for (a, n) in c {
            *total.entry(a).or_default() += n;
        }
    }
    // 40,000 tickets over 4 endpoints: each ticket is distinct, so each endpoint gets exactly
    // 10,000.
    assert_eq!(total.len(), 4);
    for n in total.values() {
        assert_eq!(*n, 10_000);
    }
}

#[tokio::test]
async fn random_is_uniform() {
    let (_r, lb) = setup(LoadBalancingStrategy::Random, (0..10).map(ep).collect()).await;
    let mut counts: HashMap<SocketAddr, f64> = HashMap::new();
    let picks = 100_000;
    for _ in 0..picks {
        *counts.entry(lb.select("svc").unwrap().address).or_default() += 1.0;
    }
    assert_eq!(counts.len(), 10);
    // Chi-square with 9 degrees of freedom: 27.9 is the 0.1 % critical value.
    let expected = picks as f64 / 10.0;
    let chi2: f64 = counts.values().map(|&o| (o - expected).powi(2) / expected).sum();
    assert!(chi2 < 27.9, "chi2 {chi2}: {counts:?}");
}

#[tokio::test]
async fn least_connections_prefers_idle_endpoints_and_spreads_ties() {
    let (_r, lb) = setup(LoadBalancingStrategy::LeastConnections, (0..10).map(ep).collect()).await;
    // Occupy endpoint 0 heavily: later picks avoid it.
    let mut held = Vec::new();
    while held.len() < 50 {
        let p = lb.pick("svc").unwrap();
        if p.address() == addr(0) {
            for _ in 0..49 {
                held.push(lb.service("svc").unwrap().pick().unwrap());
            }
        }
        held.push(p);
    }
    drop(held);
    // Idle endpoints share load: holding 1,000 picks on 10 endpoints, p2c keeps every
    // endpoint near 100 in flight (random alone would spread them +-30).
    let held: Vec<_> = (0..1000).map(|_| lb.pick("svc").unwrap()).collect();
    let mut per: HashMap<SocketAddr, usize> = HashMap::new();
    for p in &held {
        *per.entry(p.address()).or_default() += 1;
    }
    assert_eq!(per.len(), 10);
    let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
    assert!(max - min <= 12, "in-flight spread {min}..{max}: {per:?}");
    // With everything idle again, ties do not herd onto one endpoint.
    drop(held);
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..10_000 {
        *counts.entry(lb.pick("svc").unwrap().address()).or_default() += 1;
    }
    assert_eq!(counts.len(), 10);
    assert!(counts.values().all(|&c| (700..1300).contains(&c)), "{counts:?}");
    assert_eq!(lb.metrics().in_flight, 0);
}

#[tokio::test]
async fn least_connections_follows_weight() {
    let (_r, lb) = setup(
        LoadBalancingStrategy::LeastConnections,
        vec![weighted(0, 3), weighted(1, 1)],
    )
    .await;
    let held: Vec<_> = (0..400).map(|_| lb.pick("svc").unwrap()).collect();
    let heavy = held.iter().filter(|p| p.address() == addr(0)).count();
    assert!(
        (280..=320).contains(&heavy),
        "weight 3:1 should hold ~300 of 400, got {heavy}"
    );
}

#[tokio::test]
async fn weighted_canary_split_is_exact_and_smooth() {
    let (_r, lb) = setup(
        LoadBalancingStrategy::Weighted,
        vec![weighted(0, 95), weighted(1, 5)],
    )
    .await;
    let picks: Vec<SocketAddr> = (0..100_000).map(|_| lb.pick("svc").unwrap().address()).collect();
    let canary = picks.iter().filter(|a| **a == addr(1)).count();
    // Within 1 % of the 5,000 target (it is exact over whole rotations).
    assert!((4_950..=5_050).contains(&canary), "canary got {canary}");
    // Smooth: never two canary picks within 19 of each other.
    let positions: Vec<usize> = picks
        .iter()
        .enumerate()
        .filter(|(_, a)| **a == addr(1))
        .map(|(i, _)| i)
        .collect();
    assert!(
        positions.windows(2).all(|w| w[1] - w[0] >= 19),
        "canary picks bunch up"
    );
}

#[tokio::test]
async fn weighted_proportions_with_many_endpoints() {
    let eps: Vec<Endpoint> = (0..6).map(|i| weighted(i, i as u32 + 1)).collect();
    let (_r, lb) = setup(LoadBalancingStrategy::Weighted, eps).await;
    let mut counts: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for _ in 0..21_000 {
        *counts.entry(lb.select("svc").unwrap().address).or_default() += 1;
    }
    for i in 0..6 {
        assert_eq!(counts[&addr(i)], 1_000 * (i + 1), "{counts:?}");
    }
}

// ===== consistent hashing =====

async fn owners(lb: &IntegratedLoadBalancer, keys: usize) -> Vec<SocketAddr> {
    let handle = lb.service("svc").unwrap();
    (0..keys)
        .map(|k| handle.select_with_hash(key(k)).unwrap().address)
        .collect()
}

#[tokio::test]
async fn consistent_hash_is_stable_and_balanced() {
    let (_r, lb) = setup(LoadBalancingStrategy::ConsistentHash, (0..10).map(ep).collect()).await;
    let a = owners(&lb, 50_000).await;
    assert_eq!(a, owners(&lb, 50_000).await, "stable per key");
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for o in &a {
        *counts.entry(*o).or_default() += 1;
    }
    assert_eq!(counts.len(), 10);
    for (e, c) in &counts {
        assert!(
            (4_000..=6_000).contains(c),
            "{e} owns {c} of 50,000 (mean 5,000 +-20 %)"
        );
    }
}

#[tokio::test]
async fn consistent_hash_removal_moves_only_the_removed_endpoints_keys() {
    let (registry, lb) = setup(LoadBalancingStrategy::ConsistentHash, (0..10).map(ep).collect()).await;
    let before = owners(&lb, 50_000).await;
    registry.deregister("svc", &ep(3)).await.unwrap();
    let after = owners(&lb, 50_000).await;
    let mut others_moved = 0;
    let mut others = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, addr(3));
        if *b != addr(3) {
            others += 1;
            others_moved += usize::from(a != b);
        }
    }
    assert!(
        others_moved * 50 <= others,
        "{others_moved} of {others} other keys moved (max 2 %)"
    );
}

#[tokio::test]
async fn consistent_hash_addition_moves_about_one_in_n_plus_one_to_the_new_endpoint() {
    let (registry, lb) = setup(LoadBalancingStrategy::ConsistentHash, (0..10).map(ep).collect()).await;
    let before = owners(&lb, 50_000).await;
    registry.register("svc", ep(10)).await.unwrap();
    let after = owners(&lb, 50_000).await;
    let to_new = after.iter().filter(|a| **a == addr(10)).count();
    let between_old = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a != b && **a != addr(10))
        .count();
    let expected = 50_000 / 11;
    assert!(
        (expected * 8 / 10..=expected * 12 / 10).contains(&to_new),
        "{to_new} keys moved to the new endpoint, expected about {expected}"
    );
    assert!(
        between_old * 50 <= 50_000,
        "{between_old} keys moved between old endpoints (max 2 %)"
    );
}

#[tokio::test]
async fn consistent_hash_is_a_pure_function_of_the_endpoint_set() {
    // Same set, registered in different orders, with different histories, under different
    // strategies: identical mapping.
    let (_r1, lb1) = setup(LoadBalancingStrategy::ConsistentHash, (0..12).map(ep).collect()).await;

    let registry = Arc::new(ServiceRegistry::new());
    for i in (0..20).rev() {
        registry.register("svc", ep(i)).await.unwrap();
    }
    let lb2 = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await
    .unwrap();
    lb2.start().await.unwrap();
    for i in 12..20 {
        registry.deregister("svc", &ep(i)).await.unwrap();
    }
    registry.register("svc", weighted(5, 9)).await.unwrap();
    registry.register("svc", ep(5)).await.unwrap();
    assert_eq!(owners(&lb1, 20_000).await, owners(&lb2, 20_000).await);
}

/// The same mapping in another process: the test re-runs its own binary, which prints the
/// owners of 2,000 keys.
#[test]
fn consistent_hash_agrees_across_processes() {
    const CHILD: &str = "TAI_LB_CHILD_PRINT_OWNERS";
    let compute = || {
        let (_r, lb) = rt().block_on(setup(
            LoadBalancingStrategy::ConsistentHash,
            (0..16).map(ep).collect(),
        ));
        let owners = rt().block_on(owners(&lb, 2_000));
        let text: Vec<String> = owners.iter().map(|a| a.to_string()).collect();
        format!("{:016x}", tai_loadbalancer::hash_key(text.join(",")))
    };
    if std::env::var_os(CHILD).is_some() {
        println!("OWNERS={}", compute());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "consistent_hash_agrees_across_processes",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs = stdout
        .split("OWNERS=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("child printed no owners: {stdout}"));
    assert_eq!(theirs, compute());
}

#[tokio::test]
async fn hash_routing_works_under_every_strategy_with_the_same_mapping() {
    let mut maps = Vec::new();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
    ] {
        let (_r, lb) = setup(strategy, (0..7).map(ep).collect()).await;
        lb.start().await.unwrap();
        maps.push(owners(&lb, 3_000).await);
        // Once the ring is built (asynchronously for non-hash strategies) nothing changes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        maps.push(owners(&lb, 3_000).await);
    }
    assert!(maps.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test]
async fn consistent_hash_honours_weights() {
    let (_r, lb) = setup(
        LoadBalancingStrategy::ConsistentHash,
        vec![weighted(0, 3), weighted(1, 1)],
    )
    .await;
    let a = owners(&lb, 40_000).await;
    let heavy = a.iter().filter(|o| **o == addr(0)).count();
    assert!(
        (28_000..=32_000).contains(&heavy),
        "weight 3:1 owns {heavy} of 40,000"
    );
}

// ===== counters =====

#[tokio::test]
async fn outcomes_and_in_flight_are_counted_per_endpoint_and_survive_republish() {
    let (registry, lb) = setup(LoadBalancingStrategy::RoundRobin, vec![ep(1), ep(2)]).await;
    let p = lb.pick("svc").unwrap();
    assert_eq!(p.in_flight(), 1);
    let first = p.address();
    p.record(Outcome::Success, Some(Duration::from_millis(4)));
    let e = lb.next_endpoint("svc").await.unwrap();
    lb.record_result("svc", &e, Outcome::Failure, None).unwrap();
    registry.register("svc", ep(3)).await.unwrap(); // republish
    let m = lb.metrics();
    let s = m.service("svc").unwrap();
    assert_eq!(
        (s.total_requests, s.successful_requests, s.failed_requests),
        (2, 1, 1)
    );
    let em = s.endpoint(first).unwrap();
    assert_eq!(em.successes, 1);
    assert_eq!(em.mean_latency, Some(Duration::from_millis(4)));
    assert_eq!(s.endpoints_total, 3);
    // Removed endpoints keep their counts in the service totals but leave the list.
    registry
        .deregister("svc", &Endpoint::new(first, None))
        .await
        .unwrap();
    let s = lb.metrics().services.remove(0);
    assert_eq!((s.total_requests, s.successful_requests), (2, 1));
    assert!(s.endpoint(first).is_none());
    assert!(matches!(
        lb.record_result("svc", &Endpoint::new(first, None), Outcome::Success, None),
        Err(Error::UnknownEndpoint { .. })
    ));
    // A metadata change keeps the endpoint's counters.
    let other = e.address;
    if other != first {
        registry
            .register(
                "svc",
                Endpoint::new(other, Some(EndpointMetadata::new().with_zone("z"))),
            )
            .await
            .unwrap();
        let s = lb.metrics().services.remove(0);
        assert_eq!(s.endpoint(other).unwrap().failures, 1);
    }
}

#[tokio::test]
async fn per_service_strategy_override() {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("a", vec![ep(1), ep(2)]).await.unwrap();
    registry.register_batch("b", vec![ep(1), ep(2)]).await.unwrap();
    let config = LoadBalancerConfig::from_toml_str("[services.b]\nstrategy = \"weighted\"\n").unwrap();
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::Random, config)
        .await
        .unwrap();
    let m = lb.metrics();
    assert_eq!(m.service("a").unwrap().strategy, LoadBalancingStrategy::Random);
    assert_eq!(m.service("b").unwrap().strategy, LoadBalancingStrategy::Weighted);
}

#[tokio::test]
async fn bursts_are_coalesced_into_few_rebuilds() {
    // A large service, so one rebuild takes longer than queueing the whole burst.
    let (registry, lb) = setup(
        LoadBalancingStrategy::RoundRobin,
        (10_000..20_000).map(ep).collect(),
    )
    .await;
    lb.start().await.unwrap();
    let before = lb.metrics().services[0].table_version;
    // 500 writers at once: the first poll of every call queues its change (in a tight loop,
    // before any acknowledgement is awaited), while the control thread takes whatever is
    // queued as one batch.
    let mut calls: Vec<_> = (1..=500)
        .map(|i| Some(Box::pin(registry.register("svc", ep(i)))))
        .collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in &mut calls {
            if let Some(call) = slot {
                match call.as_mut().poll(cx) {
                    std::task::Poll::Ready(result) => {
                        result.unwrap();
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    let after = lb.metrics().services[0].table_version;
    assert_eq!(
        lb.service("svc").unwrap().endpoints().len(),
        10_500,
        "every change applied"
    );
    assert!(
        after - before <= 20,
        "500 changes took {} rebuilds",
        after - before
    );
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<ServiceRegistry>();
    check::<IntegratedLoadBalancer>();
    check::<tai_loadbalancer::ServiceHandle>();
    check::<tai_loadbalancer::Pick>();
    check::<Endpoint>();
    check::<Error>();
    check::<LoadBalancerConfig>();
    check::<tai_loadbalancer::LoadBalancerMetrics>();
}
