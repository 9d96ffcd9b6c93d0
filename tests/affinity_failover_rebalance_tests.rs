//! Session affinity, failover groups, draining and rebalancing: every semantic of the issue
//! as an assertion. TTLs and drain timeouts use `tokio::time::pause` where no wall time is
//! needed.
#![cfg(feature = "runtime")]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{addr, ep, key};
use tai_loadbalancer::{
    AffinityConfig, AffinityManager, AffinityRequest, AffinityStrategy, Endpoint, EndpointHealth, Error,
    FailoverConfig, FailoverManager, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    RebalanceConfig, RebalanceStrategy, RebalanceTrigger, ServiceRegistry,
};

async fn lb_with(
    endpoints: Vec<Endpoint>,
    strategy: LoadBalancingStrategy,
    config: LoadBalancerConfig,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("svc", endpoints).await.unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
        .await
        .unwrap();
    (registry, lb)
}

// ===== affinity =====

/// The seed's snippet, verbatim apart from wiring the config in.
#[tokio::test]
async fn seed_affinity_snippet() -> Result<(), Box<dyn std::error::Error>> {
    let affinity_config = AffinityConfig {
        strategy: AffinityStrategy::CustomKey,
        ttl: Duration::from_secs(3600),
        max_entries: 100_000,
    };
    let config = LoadBalancerConfig {
        affinity: affinity_config,
        ..Default::default()
    };
    let (_r, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;

    // Get endpoint with session affinity
    let endpoint = lb.next_endpoint_with_affinity("svc", "user-123").await?;
    for _ in 0..20 {
        assert_eq!(lb.next_endpoint_with_affinity("svc", "user-123").await?, endpoint);
    }
    Ok(())
}

#[tokio::test]
async fn first_request_goes_to_the_hash_owner_then_sticks() {
    let (registry, lb) = lb_with(
        (0..5).map(ep).collect(),
        LoadBalancingStrategy::Random,
        Default::default(),
    )
    .await;
    let mut bound = HashMap::new();
    for k in 0..500 {
        let owner = lb.select_with_hash("svc", key(k)).unwrap();
        let got = lb.next_endpoint_with_affinity("svc", &key(k)).await.unwrap();
        assert_eq!(got, owner, "a fresh key goes to its consistent-hash owner");
        bound.insert(k, got.address);
    }
    // A new endpoint would take about 1/6 of the keys by hash; bound keys stay where they are.
    registry.register("svc", ep(5)).await.unwrap();
    let moved_by_hash = (0..500)
        .filter(|k| lb.select_with_hash("svc", key(*k)).unwrap().address != bound[k])
        .count();
    assert!(
        moved_by_hash > 30,
        "the new endpoint should own some keys by hash"
    );
    for k in 0..500 {
        assert_eq!(
            lb.next_endpoint_with_affinity("svc", &key(k))
                .await
                .unwrap()
                .address,
            bound[&k],
            "key {k}"
        );
    }
    // Two balancers over the same endpoints agree on fresh keys without sharing state.
    let other = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await
    .unwrap();
    for k in 1_000..1_200 {
        assert_eq!(
            lb.next_endpoint_with_affinity("svc", &key(k)).await.unwrap(),
            other.next_endpoint_with_affinity("svc", &key(k)).await.unwrap()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn bindings_expire_after_ttl_of_no_use() {
    let config = LoadBalancerConfig {
        affinity: AffinityConfig {
            strategy: AffinityStrategy::CustomKey,
            ttl: Duration::from_secs(10),
            max_entries: 1_000,
        },
        ..Default::default()
    };
    let (_r, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    let owner = lb.select_with_hash("svc", "sess").unwrap();
    let elsewhere = (0..4).map(ep).find(|e| *e != owner).unwrap();
    lb.affinity()
        .set_affinity("svc", "sess", elsewhere.clone())
        .await
        .unwrap();
    // Used every 9 s: never expires.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            lb.next_endpoint_with_affinity("svc", "sess").await.unwrap(),
            elsewhere
        );
    }
    // 10 s without use: expired; the key goes back to its hash owner and sticks there.
    tokio::time::advance(Duration::from_millis(10_001)).await;
    assert_eq!(
        lb.next_endpoint_with_affinity("svc", "sess").await.unwrap(),
        owner
    );
    assert!(lb.affinity().stats().expirations >= 1);
    let standalone = AffinityManager::new(AffinityConfig {
        ttl: Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap();
    standalone.set_affinity("svc", "k", ep(1)).await.unwrap();
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(standalone.get_affinity("svc", "k").await, Some(ep(1)));
    tokio::time::advance(Duration::from_millis(1_000)).await;
    assert_eq!(standalone.get_affinity("svc", "k").await, None);
}

#[tokio::test]
async fn a_binding_to_a_gone_unhealthy_or_draining_endpoint_moves_and_sticks() {
    let (registry, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await;
    let first = lb.next_endpoint_with_affinity("svc", "k").await.unwrap();
    // Deregistered: never returned once deregister returned.
    registry.deregister("svc", &first).await.unwrap();
    let second = lb.next_endpoint_with_affinity("svc", "k").await.unwrap();
    assert_ne!(second, first);
    for _ in 0..5 {
        assert_eq!(
            lb.next_endpoint_with_affinity("svc", "k").await.unwrap(),
            second,
            "sticks to the new one"
        );
    }
    // Unhealthy (marked down): moves again.
    lb.mark_down("svc", &second).await.unwrap();
    let third = lb.next_endpoint_with_affinity("svc", "k").await.unwrap();
    assert!(third != second && third != first);
    lb.mark_up("svc", &second).await.unwrap();
    assert_eq!(
        lb.next_endpoint_with_affinity("svc", "k").await.unwrap(),
        third,
        "sticks after recovery"
    );
    // Draining under the (default) Immediate strategy: moves at once.
    let report = lb.drain("svc", &third).await.unwrap();
    assert!(!report.timed_out);
    let fourth = lb.next_endpoint_with_affinity("svc", "k").await.unwrap();
    assert!(
        fourth != first && fourth != third,
        "not the removed one, not the draining one"
    );
    // Deregistered, then marked down: two hits whose endpoint had left routing.
    let stats = lb.affinity().stats();
    assert_eq!(stats.moved, 2, "{stats:?}");
}

/// Index of a loopback test address (inverse of `common::addr`).
fn index_of(a: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = a else {
        panic!("unexpected {a}")
    };
    let host = (u32::from(*v4.ip()) & 0x00ff_ffff) as usize - 1;
    host * 64 + (v4.port() as usize - 30_000)
}

#[test]
fn bounded_under_concurrent_churn_with_no_stale_endpoint() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = LoadBalancerConfig {
        affinity: AffinityConfig {
            strategy: AffinityStrategy::CustomKey,
            ttl: Duration::from_secs(60),
            max_entries: 20_000,
        },
        ..Default::default()
    };
    let (registry, lb) = rt.block_on(lb_with(
        (0..8).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    ));
    rt.block_on(lb.start()).unwrap();
    // removed_at[i]: epoch at which endpoint i's deregistration returned (0: live).
    let removed_at: Vec<AtomicU64> = (0..64).map(|_| AtomicU64::new(0)).collect();
    let epoch = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let stale = AtomicU64::new(0);
    let max_len = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (lb, removed_at, epoch, stop, stale, max_len) =
                (&lb, &removed_at, &epoch, &stop, &stale, &max_len);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    i = (i + 7_919) % 100_000;
                    let started = epoch.load(Ordering::SeqCst);
                    let e = lb.select_with_affinity("svc", &key(i as usize)).unwrap();
                    let idx = index_of(e.address);
                    let removed = removed_at[idx].load(Ordering::SeqCst);
                    if removed != 0 && removed <= started {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                    max_len.fetch_max(lb.affinity().len() as u64, Ordering::Relaxed);
                }
            });
        }
        // Stops the pickers even if the churn below panics (scope joins them before it
        // propagates the panic).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(&stop);
        rt.block_on(async {
            let mut live: std::collections::VecDeque<usize> = (0..8).collect();
            for round in 0..40 {
                let gone = live.pop_front().unwrap();
                registry.deregister("svc", &ep(gone)).await.unwrap();
                let e = epoch.load(Ordering::SeqCst) + 1;
                removed_at[gone].store(e, Ordering::SeqCst);
                epoch.store(e, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                // Replaced by a fresh address, so the check stays exact.
                registry.register("svc", ep(8 + round)).await.unwrap();
                live.push_back(8 + round);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        stop.store(true, Ordering::SeqCst);
    });
    assert_eq!(
        stale.load(Ordering::SeqCst),
        0,
        "a binding to a deregistered endpoint was used"
    );
    assert!(
        max_len.load(Ordering::Relaxed) <= 20_000,
        "table grew past max_entries"
    );
    assert!(
        lb.affinity().stats().evictions > 0,
        "100,000 keys through a 20,000 table must evict"
    );
    rt.block_on(lb.stop()).unwrap();
}

#[tokio::test]
async fn keys_from_requests() {
    let cookie = LoadBalancerConfig {
        affinity: AffinityConfig {
            strategy: AffinityStrategy::Cookie {
                name: "SESSIONID".into(),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let (_r, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        cookie,
    )
    .await;
    let request = AffinityRequest::new().cookie_header("lang=en; SESSIONID=s-42");
    let a = lb.next_endpoint_for_request("svc", &request).await.unwrap();
    assert_eq!(a, lb.next_endpoint_with_affinity("svc", "s-42").await.unwrap());
    assert!(matches!(
        lb.next_endpoint_for_request("svc", &AffinityRequest::new().cookie_header("lang=en"))
            .await,
        Err(Error::InvalidAffinityKey { .. })
    ));
    let by_ip = AffinityStrategy::SourceIp;
    let one: SocketAddr = "127.0.0.9:1000".parse().unwrap();
    let other_port: SocketAddr = "127.0.0.9:2000".parse().unwrap();
    assert_eq!(
        by_ip.key(&AffinityRequest::new().source(one)).unwrap(),
        by_ip.key(&AffinityRequest::new().source(other_port)).unwrap()
    );
    assert_eq!(
        AffinityStrategy::UserId
            .key(&AffinityRequest::new().user_id("alice"))
            .unwrap(),
        "alice"
    );
}

#[tokio::test]
async fn affinity_bad_input() {
    assert!(matches!(
        AffinityManager::new(AffinityConfig { ttl: Duration::ZERO, ..Default::default() }),
        Err(Error::InvalidConfig { field, .. }) if field == "affinity.ttl"
    ));
    assert!(matches!(
        AffinityManager::new(AffinityConfig { max_entries: 0, ..Default::default() }),
        Err(Error::InvalidConfig { field, .. }) if field == "affinity.max_entries"
    ));
    let (_r, lb) = lb_with(vec![ep(0)], LoadBalancingStrategy::RoundRobin, Default::default()).await;
    assert!(matches!(
        lb.next_endpoint_with_affinity("svc", "").await,
        Err(Error::InvalidAffinityKey { .. })
    ));
    assert!(matches!(
        lb.affinity().set_affinity("svc", "", ep(0)).await,
        Err(Error::InvalidAffinityKey { .. })
    ));
    assert!(matches!(
        lb.next_endpoint_with_affinity("svc", &"k".repeat(5_000)).await,
        Err(Error::InvalidAffinityKey { .. })
    ));
    assert!(matches!(
        lb.next_endpoint_with_affinity("nope", "k").await,
        Err(Error::UnknownService { .. })
    ));
    let manager = AffinityManager::new(AffinityConfig::default()).unwrap();
    manager.set_affinity("s", "k", ep(1)).await.unwrap();
    assert_eq!(manager.len(), 1);
    assert_eq!(manager.remove_affinity("s", "k").await, Some(ep(1)));
    assert!(manager.is_empty());
}

// ===== failover =====

/// The seed's failover snippet.
#[tokio::test]
async fn seed_failover_snippet() -> Result<(), Box<dyn std::error::Error>> {
    let config = FailoverConfig {
        enabled: true,
        max_attempts: 3,
        log_failovers: true,
    };

    let manager = FailoverManager::new(config);

    // Register failover group
    let primary = Endpoint::new("127.0.0.1:5001".parse()?, None);
    let backups = vec![
        Endpoint::new("127.0.0.1:5002".parse()?, None),
        Endpoint::new("127.0.0.1:5003".parse()?, None),
    ];

    manager
        .register("critical-service", primary.clone(), backups.clone())
        .await?;

    // Trigger failover on error
    let endpoint = manager.current("critical-service").await?;
    let next = manager.failover("critical-service", &endpoint).await?;
    assert_eq!(next, backups[0]);
    let next = manager.failover("critical-service", &next).await?;
    assert_eq!(next, backups[1]);
    // Reset failover
    manager.reset_failover("critical-service", &primary).await?;
    assert_eq!(manager.current("critical-service").await?, primary);
    Ok(())
}

#[tokio::test]
async fn failover_is_bounded_skips_unhealthy_and_fails_back() {
    let (_r, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await;
    let lb = Arc::new(lb);
    let manager = FailoverManager::new(FailoverConfig {
        enabled: true,
        max_attempts: 2,
        log_failovers: true,
    })
    .with_health_from(lb.clone());
    manager
        .register("svc", ep(0), vec![ep(1), ep(2), ep(3)])
        .await
        .unwrap();
    // Backup 1 is unhealthy: the walk skips it.
    lb.mark_down("svc", &ep(1)).await.unwrap();
    assert_eq!(manager.failover("svc", &ep(0)).await.unwrap(), ep(2));
    assert_eq!(manager.failover("svc", &ep(2)).await.unwrap(), ep(3));
    // max_attempts (2) used: refused with a typed error, counted.
    assert!(matches!(
        manager.failover("svc", &ep(3)).await,
        Err(Error::FailoverExhausted { attempts: 2, .. })
    ));
    let stats = manager.stats("svc").unwrap();
    assert_eq!(
        (stats.failovers, stats.exhausted, stats.current.clone()),
        (2, 1, ep(3))
    );
    // The primary is healthy: the group fails back by itself.
    assert_eq!(manager.current("svc").await.unwrap(), ep(0));
    assert_eq!(manager.stats("svc").unwrap().failbacks, 1);
    assert_eq!(manager.stats("svc").unwrap().attempts, 0);
    // With failback off, it stays on the backup until reset.
    let manual = FailoverManager::new(FailoverConfig::default())
        .with_failback(false)
        .with_health_from(lb.clone());
    manual.register("svc", ep(0), vec![ep(2)]).await.unwrap();
    manual.failover("svc", &ep(0)).await.unwrap();
    assert_eq!(manual.current("svc").await.unwrap(), ep(2));
    manual.reset_failover("svc", &ep(0)).await.unwrap();
    assert_eq!(manual.current("svc").await.unwrap(), ep(0));
    // Running off the end of the order is exhaustion too.
    let short = FailoverManager::new(FailoverConfig::default());
    short.register("svc", ep(0), vec![ep(1)]).await.unwrap();
    assert!(matches!(
        short.failover("svc", &ep(1)).await,
        Err(Error::FailoverExhausted { .. })
    ));
}

#[tokio::test]
async fn failover_bad_input() {
    let manager = FailoverManager::new(FailoverConfig::default());
    assert!(matches!(
        manager.failover("nope", &ep(0)).await,
        Err(Error::UnknownService { .. })
    ));
    assert!(matches!(
        manager.register("svc", ep(0), vec![ep(0)]).await,
        Err(Error::InvalidFailoverGroup { .. })
    ));
    assert!(matches!(
        manager.register("svc", ep(0), vec![ep(1), ep(1)]).await,
        Err(Error::InvalidFailoverGroup { .. })
    ));
    assert!(matches!(
        manager.register("", ep(0), vec![ep(1)]).await,
        Err(Error::InvalidServiceName { .. })
    ));
    let zero = FailoverManager::new(FailoverConfig {
        enabled: true,
        max_attempts: 0,
        log_failovers: false,
    });
    assert!(matches!(
        zero.register("svc", ep(0), vec![ep(1)]).await,
        Err(Error::InvalidConfig { field, .. }) if field == "failover.max_attempts"
    ));
    let off = FailoverManager::new(FailoverConfig {
        enabled: false,
        max_attempts: 3,
        log_failovers: false,
    });
    off.register("svc", ep(0), vec![ep(1)]).await.unwrap();
    assert!(matches!(
        off.failover("svc", &ep(0)).await,
        Err(Error::FailoverDisabled { .. })
    ));
    manager.register("svc", ep(0), vec![ep(1)]).await.unwrap();
    assert!(matches!(
        manager.failover("svc", &ep(7)).await,
        Err(Error::UnknownEndpoint { .. })
    ));
    assert!(matches!(
        manager.reset_failover("svc", &ep(1)).await,
        Err(Error::InvalidFailoverGroup { .. })
    ));
}

#[test]
fn failovers_are_logged() {
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            for log in [true, false] {
                let manager = FailoverManager::new(FailoverConfig {
                    enabled: true,
                    max_attempts: 3,
                    log_failovers: log,
                });
                manager
                    .register(if log { "logged" } else { "quiet" }, ep(0), vec![ep(1)])
                    .await
                    .unwrap();
                manager
                    .failover(if log { "logged" } else { "quiet" }, &ep(0))
                    .await
                    .unwrap();
            }
        })
    });
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "one event, for the group that logs: {text}"
    );
    assert!(
        text.contains("logged") && text.contains(&addr(1).to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_failover_group_routes_a_service() {
    let (_r, lb) = lb_with(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await;
    lb.set_failover_group("svc", ep(2), vec![ep(0), ep(3)])
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            lb.pick("svc").unwrap().address(),
            addr(2),
            "the primary takes all traffic"
        );
    }
    lb.mark_down("svc", &ep(2)).await.unwrap();
    for _ in 0..20 {
        assert_eq!(
            lb.pick("svc").unwrap().address(),
            addr(0),
            "then the first healthy backup"
        );
    }
    lb.mark_down("svc", &ep(0)).await.unwrap();
    assert_eq!(lb.next_endpoint("svc").await.unwrap().address, addr(3));
    lb.mark_up("svc", &ep(2)).await.unwrap();
    assert_eq!(
        lb.pick("svc").unwrap().address(),
        addr(2),
        "and the primary again once it recovers"
    );
    lb.clear_failover_group("svc").await.unwrap();
    let spread: HashSet<SocketAddr> = (0..6).map(|_| lb.pick("svc").unwrap().address()).collect();
    assert!(spread.len() >= 2, "back to round robin");
    assert!(matches!(
        lb.set_failover_group("svc", ep(1), vec![ep(1)]).await,
        Err(Error::InvalidFailoverGroup { .. })
    ));
}

// ===== draining and rebalancing =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keeps_in_flight_requests_and_avoids_new_picks() {
    let (_r, lb) = lb_with(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await;
    let lb = Arc::new(lb);
    let held: Vec<_> = (0..9)
        .map(|_| lb.pick("svc").unwrap())
        .filter(|p| p.address() == addr(1))
        .collect();
    assert_eq!(held.len(), 3);
    let drainer = {
        let lb = lb.clone();
        tokio::spawn(async move { lb.drain("svc", &ep(1)).await })
    };
    // New picks avoid it at once while the three requests are still in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(lb.endpoint_health("svc", addr(1)), Some(EndpointHealth::Draining));
    for _ in 0..30 {
        assert_ne!(lb.pick("svc").unwrap().address(), addr(1));
    }
    assert_eq!(lb.in_flight("svc", addr(1)), Some(3));
    assert!(!drainer.is_finished(), "the drain waits for requests in flight");
    for pick in held {
        pick.success();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = drainer.await.unwrap().unwrap();
    assert_eq!(
        (
            report.in_flight_at_start,
            report.in_flight_at_end,
            report.timed_out
        ),
        (3, 0, false)
    );
    assert_eq!(
        lb.metrics()
            .service("svc")
            .unwrap()
            .endpoint(addr(1))
            .unwrap()
            .successes,
        3
    );
    lb.undrain("svc", &ep(1)).await.unwrap();
    assert_eq!(lb.endpoint_health("svc", addr(1)), Some(EndpointHealth::Healthy));
}

#[tokio::test(start_paused = true)]
async fn a_drain_gives_up_at_its_timeout() {
    let config = LoadBalancerConfig {
        rebalance: RebalanceConfig {
            strategy: RebalanceStrategy::gradual(Duration::from_secs(5)),
        },
        ..Default::default()
    };
    let (_r, lb) = lb_with(vec![ep(0), ep(1)], LoadBalancingStrategy::RoundRobin, config).await;
    let stuck = loop {
        let p = lb.pick("svc").unwrap();
        if p.address() == addr(0) {
            break p;
        }
    };
    let report = lb.drain("svc", &ep(0)).await.unwrap();
    assert!(report.timed_out);
    assert_eq!(report.in_flight_at_end, 1);
    assert!(report.elapsed >= Duration::from_secs(5));
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradual_drain_moves_sticky_keys_in_batches() {
    let config = LoadBalancerConfig {
        rebalance: RebalanceConfig {
            strategy: RebalanceStrategy::Gradual {
                drain_timeout: Duration::from_secs(10),
                batch_size: 100,
                batch_interval: Duration::from_millis(100),
            },
        },
        ..Default::default()
    };
    let (_r, lb) = lb_with(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    let lb = Arc::new(lb);
    lb.rebalancer().start().await.unwrap();
    let mut events = lb.rebalancer().subscribe();
    for k in 0..250 {
        lb.affinity().set_affinity("svc", &key(k), ep(1)).await.unwrap();
    }
    let drainer = {
        let lb = lb.clone();
        tokio::spawn(async move { lb.drain("svc", &ep(1)).await })
    };
    // While keys are pending they are still served by the draining endpoint (sticky).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let still = (0..250)
        .filter(|k| lb.select_with_affinity("svc", &key(*k)).unwrap().address == addr(1))
        .count();
    assert!(
        (100..=150).contains(&still),
        "after the first batch, {still} of 250 keys still stick"
    );
    assert!(
        lb.pick("svc").unwrap().address() != addr(1),
        "but it gets no new picks"
    );
    let report = drainer.await.unwrap().unwrap();
    assert!(!report.timed_out, "{report:?}");
    assert!(report.affinity_keys_moved >= 100, "{report:?}");
    let mut batches = Vec::new();
    while let Some(event) = events.try_recv() {
        if event.trigger == RebalanceTrigger::Drain && event.released.is_empty() {
            batches.push((event.affinity_keys_moved, event.affinity_keys_pending));
        }
    }
    assert!(batches.len() >= 2, "progress visible in batches: {batches:?}");
    assert!(batches.iter().all(|(moved, _)| *moved <= 100));
    assert!(
        batches.windows(2).all(|w| w[1].1 <= w[0].1),
        "pending only shrinks: {batches:?}"
    );
    for k in 0..250 {
        assert_ne!(lb.select_with_affinity("svc", &key(k)).unwrap().address, addr(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_strategy_moves_keys_only_on_rebalance_service() {
    let config = LoadBalancerConfig {
        rebalance: RebalanceConfig {
            strategy: RebalanceStrategy::Manual,
        },
        ..Default::default()
    };
    let (_r, lb) = lb_with(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    lb.rebalancer().start().await.unwrap();
    for k in 0..50 {
        lb.affinity().set_affinity("svc", &key(k), ep(2)).await.unwrap();
    }
    lb.mark_down("svc", &ep(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(lb.affinity().len(), 50, "Manual: nothing moves by itself");
    let event = lb.rebalancer().rebalance_service("svc").await.unwrap();
    assert_eq!(
        (event.trigger, event.affinity_keys_moved),
        (RebalanceTrigger::Manual, 50)
    );
    assert_eq!(lb.affinity().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_changes_are_reported_and_removed_endpoints_released() {
    let config = LoadBalancerConfig {
        rebalance: RebalanceConfig {
            strategy: RebalanceStrategy::gradual(Duration::from_millis(300)),
        },
        ..Default::default()
    };
    let (registry, lb) = lb_with(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    lb.start().await.unwrap();
    lb.rebalancer().start().await.unwrap();
    let mut events = lb.rebalancer().subscribe();
    for k in 0..30 {
        lb.affinity().set_affinity("svc", &key(k), ep(0)).await.unwrap();
    }
    registry.register("svc", ep(5)).await.unwrap();
    lb.mark_down("svc", &ep(1)).await.unwrap();
    // Remove endpoint 0 while a request is in flight on it.
    let held = loop {
        let p = lb.pick("svc").unwrap();
        if p.address() == addr(0) {
            break p;
        }
    };
    registry.deregister("svc", &ep(0)).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            let done = !event.released.is_empty();
            seen.push(event);
            if done {
                break;
            }
        }
    }
    assert!(seen.iter().any(|e| e.added.contains(&addr(5))), "{seen:?}");
    assert!(
        seen.iter()
            .any(|e| e.health_changed.contains(&(addr(1), EndpointHealth::Down))),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| e.removed.contains(&addr(0))),
        "removal reported: {seen:?}"
    );
    assert_eq!(
        seen.iter().map(|e| e.affinity_keys_moved).sum::<usize>(),
        30,
        "keys of a removed endpoint are unbound (in one batch of up to 100 here): {seen:?}"
    );
    // The held request outlives the 300 ms drain timeout: released as timed out.
    let release = seen
        .iter()
        .find(|e| !e.released.is_empty())
        .expect("release reported");
    assert_eq!(release.released[0].address, addr(0));
    assert!(release.released[0].timed_out && release.released[0].in_flight_abandoned == 1);
    drop(held);
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn rebalance_bad_input() {
    let bad = |strategy| match LoadBalancerConfig::from_toml_str(strategy) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        bad(
            "[rebalance.strategy]\nkind = \"gradual\"\ndrain_timeout = \"0s\"\nbatch_size = 1\nbatch_interval = \"1s\""
        ),
        "rebalance.strategy.drain_timeout"
    );
    assert_eq!(
        bad(
            "[rebalance.strategy]\nkind = \"gradual\"\ndrain_timeout = \"1s\"\nbatch_size = 0\nbatch_interval = \"1s\""
        ),
        "rebalance.strategy.batch_size"
    );
    assert_eq!(bad("[affinity]\nttl = \"0s\""), "affinity.ttl");
    assert_eq!(bad("[affinity]\nmax_entries = 0"), "affinity.max_entries");
    let (_r, lb) = lb_with(vec![ep(0)], LoadBalancingStrategy::RoundRobin, Default::default()).await;
    assert!(matches!(
        lb.drain("svc", &ep(9)).await,
        Err(Error::UnknownEndpoint { .. })
    ));
    assert!(matches!(
        lb.drain("nope", &ep(0)).await,
        Err(Error::UnknownService { .. })
    ));
}

#[tokio::test]
async fn gradual_rebalancing_unbinds_a_removed_endpoints_keys_in_batches() {
    let config = LoadBalancerConfig {
        rebalance: RebalanceConfig {
            strategy: RebalanceStrategy::Gradual {
                drain_timeout: Duration::from_secs(10),
                batch_size: 40,
                batch_interval: Duration::from_millis(50),
            },
        },
        ..Default::default()
    };
    let (registry, lb) = lb_with(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    let lb = Arc::new(lb);
    lb.start().await.unwrap();
    lb.rebalancer().start().await.unwrap();
    let mut events = lb.rebalancer().subscribe();
    for k in 0..150 {
        lb.affinity().set_affinity("svc", &key(k), ep(2)).await.unwrap();
    }
    registry.deregister("svc", &ep(2)).await.unwrap();
    // The endpoint is gone: a key whose batch has not come yet still moves on its request.
    assert_ne!(
        lb.select_with_affinity("svc", &key(149)).unwrap().address,
        addr(2)
    );
    let mut batches = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
            Ok(Some(event)) if event.affinity_keys_moved > 0 => {
                batches.push((event.affinity_keys_moved, event.affinity_keys_pending));
                if event.affinity_keys_pending == 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(batches.len() >= 3, "bounded batches with progress: {batches:?}");
    assert!(batches.iter().all(|(moved, _)| *moved <= 40), "{batches:?}");
    assert_eq!(batches.iter().map(|(m, _)| m).sum::<usize>(), 149, "{batches:?}");
    assert_eq!(batches.last().unwrap().1, 0);
    assert!(
        batches.windows(2).all(|w| w[1].1 < w[0].1),
        "pending shrinks: {batches:?}"
    );
    for k in 0..150 {
        assert_ne!(lb.select_with_affinity("svc", &key(k)).unwrap().address, addr(2));
    }
    lb.stop().await.unwrap();
}
