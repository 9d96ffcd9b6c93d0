//! Golden vectors: the consistent-hash mapping is a compatibility promise. A change here moves
//! traffic (and session affinity) across a fleet whose balancers run different versions, so
//! these values may only change with a major version and a migration note.
//!
//! Produced by tai-loadbalancer 0.1.0. `hash_key("")` is the published XXH3-64 test vector
//! for empty input (seed 0).

use std::sync::Arc;

use tai_loadbalancer::{
    Endpoint, EndpointMetadata, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry, hash_key, jump_hash,
};

#[test]
fn key_hash_is_xxh3_64() {
    assert_eq!(hash_key(""), 0x2d06_8005_38d3_94c2);
    assert_eq!(hash_key("user-123"), 0xfc4b_76c4_e477_7e39);
    assert_eq!(hash_key("a"), 0xe6c6_32b6_1e96_4e1f);
    assert_eq!(hash_key(b"session:42"), 0x4f77_b726_8a86_72c7);
}

#[test]
fn jump_hash_vectors() {
    assert_eq!(jump_hash(0, 1), 0);
    assert_eq!(jump_hash(1, 10), 6);
    assert_eq!(jump_hash(0xdead_beef, 1000), 285);
    assert_eq!(jump_hash(u64::MAX, 65_536), 18_311);
    assert_eq!(jump_hash(42, 7), 2);
}

#[tokio::test]
async fn ring_owners_are_pinned() {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoints: Vec<Endpoint> = (1..=5)
        .map(|i| Endpoint::new(format!("127.0.0.{i}:8080").parse().unwrap(), None))
        .collect();
    registry.register_batch("svc", endpoints).await.unwrap();
    registry
        .register(
            "svc",
            Endpoint::new(
                "[::1]:9000".parse().unwrap(),
                Some(EndpointMetadata::new().with_weight(3)),
            ),
        )
        .await
        .unwrap();
    let lb = IntegratedLoadBalancer::new(
        registry,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    let expected = [
        ("user-1", "127.0.0.3:8080"),
        ("user-2", "[::1]:9000"),
        ("user-3", "127.0.0.3:8080"),
        ("user-4", "127.0.0.3:8080"),
        ("user-5", "[::1]:9000"),
        ("user-6", "127.0.0.3:8080"),
        ("user-7", "127.0.0.4:8080"),
        ("user-8", "127.0.0.3:8080"),
    ];
    for (key, owner) in expected {
        assert_eq!(
            lb.select_with_hash("svc", key).unwrap().address.to_string(),
            owner,
            "{key}"
        );
    }
    let all: Vec<String> = (0..10_000)
        .map(|i| {
            lb.select_with_hash("svc", format!("key-{i}"))
                .unwrap()
                .address
                .to_string()
        })
        .collect();
    assert_eq!(
        hash_key(all.join(",")),
        0x3dd2_2d43_9539_7a7e,
        "owners of 10,000 keys changed"
    );
}
