//! Stable endpoint hash keys (gRPC A76): an endpoint carrying the `hash_key` tag is placed on
//! the consistent-hash ring by that key, not by its address.
//!
//! * The mapping is unchanged when an endpoint's address changes but its hash key stays (a
//!   StatefulSet pod restarting on a new IP).
//! * It is identical in two OS processes whose registries were built in different orders and
//!   through different histories (the key is a property of the endpoint, not of the process).
//! * Two endpoints of one service with the same hash key are a typed error.
//! * Hash picks before the service's ring exists (answered from the ring's definition) agree
//!   with the ring.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::addr;
use tai_loadbalancer::{
    Endpoint, EndpointMetadata, Error, HASH_KEY_TAG, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, ServiceRegistry,
};

const KEYS: u64 = 10_000;

fn pod(ordinal: usize, address: SocketAddr) -> Endpoint {
    Endpoint::new(
        address,
        Some(
            EndpointMetadata::new()
                .with_tag(HASH_KEY_TAG, format!("cache-{ordinal}"))
                .with_zone("zone-a"),
        ),
    )
}

/// Which pod (by hash key) owns each of `KEYS` keys.
fn owners(lb: &IntegratedLoadBalancer) -> Vec<String> {
    (0..KEYS)
        .map(|k| {
            let e = lb.select_with_hash("cache", k.to_le_bytes()).unwrap();
            e.tag(HASH_KEY_TAG).unwrap().to_owned()
        })
        .collect()
}

async fn balancer(registry: &Arc<ServiceRegistry>) -> IntegratedLoadBalancer {
    IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_mapping_follows_the_hash_key_not_the_address() {
    let registry = Arc::new(ServiceRegistry::new());
    let pods: Vec<Endpoint> = (0..5).map(|i| pod(i, addr(i))).collect();
    registry.register_batch("cache", pods.clone()).await.unwrap();
    let lb = balancer(&registry).await;
    let before = owners(&lb);
    let counts = before.iter().fold(BTreeMap::<&str, usize>::new(), |mut m, o| {
        *m.entry(o).or_default() += 1;
        m
    });
    assert_eq!(counts.len(), 5, "every pod owns keys: {counts:?}");

    // Pod 2 restarts on a new address (its old one disappears, the new one carries its key).
    registry.deregister("cache", &pods[2]).await.unwrap();
    registry.register("cache", pod(2, addr(40))).await.unwrap();
    assert_eq!(owners(&lb), before, "no key moved: the pod kept its hash key");

    // Without hash keys the same restart moves the keys owned by the pod that moved.
    let plain = Arc::new(ServiceRegistry::new());
    let plain_pods: Vec<Endpoint> = (0..5).map(|i| Endpoint::new(addr(i), None)).collect();
    plain.register_batch("cache", plain_pods.clone()).await.unwrap();
    let plain_lb = balancer(&plain).await;
    let by_address = |lb: &IntegratedLoadBalancer| -> Vec<SocketAddr> {
        (0..KEYS)
            .map(|k| lb.select_with_hash("cache", k.to_le_bytes()).unwrap().address)
            .collect()
    };
    let plain_before = by_address(&plain_lb);
    plain.deregister("cache", &plain_pods[2]).await.unwrap();
    plain
        .register("cache", Endpoint::new(addr(40), None))
        .await
        .unwrap();
    let moved = by_address(&plain_lb)
        .iter()
        .zip(&plain_before)
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 1_000, "addresses place endpoints: {moved} keys moved");
}

/// The mapping a process computes after building its registry in its own way.
async fn mapping(order: &[usize], churn: bool) -> Vec<String> {
    let registry = Arc::new(ServiceRegistry::new());
    if churn {
        // A different history: extra pods that come and go, one pod first registered at
        // another address.
        registry.register("cache", pod(90, addr(90))).await.unwrap();
        registry.register("cache", pod(1, addr(91))).await.unwrap();
        registry.deregister("cache", &pod(1, addr(91))).await.unwrap();
    }
    for &i in order {
        registry.register("cache", pod(i, addr(i))).await.unwrap();
    }
    if churn {
        registry.deregister("cache", &pod(90, addr(90))).await.unwrap();
    }
    let lb = balancer(&registry).await;
    owners(&lb)
}

#[test]
fn child_process_mapping() {
    // Runs only as the child of `two_processes_with_different_histories_agree`.
    if std::env::var_os("TAI_LB_HASH_KEYS_CHILD").is_none() {
        return;
    }
    let rt = common::rt();
    let owners = rt.block_on(mapping(&[4, 2, 0, 3, 1], true));
    println!("MAPPING {}", owners.join(","));
}

#[tokio::test]
async fn two_processes_with_different_histories_agree() {
    let here = mapping(&[0, 1, 2, 3, 4], false).await;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_mapping",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TAI_LB_HASH_KEYS_CHILD", "1")
        .output()
        .expect("the test binary runs as a child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness prints the test's name on the same line as the test's own output.
    let line = stdout
        .split("MAPPING ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no mapping from the child ({} bytes of output)", stdout.len()));
    let there: Vec<String> = line.split(',').map(str::to_owned).collect();
    assert_eq!(there.len(), KEYS as usize);
    assert_eq!(there, here, "another process, another history, the same owners");
}

#[tokio::test]
async fn two_endpoints_with_one_hash_key_are_refused() {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("cache", pod(0, addr(0))).await.unwrap();
    let clash = pod(0, addr(1));
    for result in [
        registry.register("cache", clash.clone()).await,
        registry.register_batch("cache", vec![clash.clone()]).await,
        registry
            .register_batch("other", vec![pod(5, addr(5)), pod(5, addr(6))])
            .await,
        registry.update("cache", vec![clash.clone()], &[]).await,
        registry
            .replace("cache", vec![pod(7, addr(7)), pod(7, addr(8))])
            .await,
    ] {
        match result {
            Err(Error::DuplicateHashKey { key, addresses, .. }) => {
                assert!(key.starts_with("cache-"), "{key}");
                assert_ne!(addresses.0, addresses.1);
            }
            other => panic!("expected DuplicateHashKey, got {other:?}"),
        }
    }
    let endpoints = registry.endpoints("cache").await.unwrap();
    assert_eq!(endpoints, vec![pod(0, addr(0))], "the registry is unchanged");
    assert!(registry.endpoints("other").await.is_err(), "nothing was created");
    // The key may move to a new address in one change (the old one leaves).
    registry
        .update("cache", vec![pod(0, addr(9))], &[addr(0)])
        .await
        .unwrap();
    // And an empty or over-long key is invalid metadata.
    for bad in [String::new(), "k".repeat(256)] {
        let e = Endpoint::new(addr(3), Some(EndpointMetadata::new().with_tag(HASH_KEY_TAG, bad)));
        assert!(matches!(
            registry.register("cache", e).await,
            Err(Error::InvalidMetadata { .. })
        ));
    }
}

#[tokio::test]
async fn hash_picks_before_the_ring_exists_agree_with_the_ring() {
    let registry = Arc::new(ServiceRegistry::new());
    let pods: Vec<Endpoint> = (0..7).map(|i| pod(i, addr(20 - i))).collect();
    registry.register_batch("cache", pods).await.unwrap();
    // Round robin: no ring until a hash pick asks for one; never started, so none is built
    // until the next registry write.
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    let ringless: Vec<String> = (0..2_000u64)
        .map(|k| {
            let e = lb.select_with_hash("cache", k.to_le_bytes()).unwrap();
            e.tag(HASH_KEY_TAG).unwrap().to_owned()
        })
        .collect();
    // A write lets the control plane build the ring the hash picks asked for.
    registry
        .register("unrelated", Endpoint::new(addr(50), None))
        .await
        .unwrap();
    let with_ring: Vec<String> = (0..2_000u64)
        .map(|k| {
            let e = lb.select_with_hash("cache", k.to_le_bytes()).unwrap();
            e.tag(HASH_KEY_TAG).unwrap().to_owned()
        })
        .collect();
    assert_eq!(ringless, with_ring);
}
