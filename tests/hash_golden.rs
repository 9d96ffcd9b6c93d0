//! Golden vectors: the consistent-hash mapping is a compatibility promise. A change here moves
//! traffic (and session affinity) across a fleet whose balancers run different versions, so
//! these values may only change with a major version and a migration note.
//!
//! Produced by tai-loadbalancer 0.1.0. `hash_key("")` is the published XXH3-64 test vector
//! for empty input (seed 0).

use std::sync::Arc;

use tai_loadbalancer::{
    Endpoint, EndpointMetadata, HashAlgorithm, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, ServiceRegistry, hash_key, jump_hash,
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

/// A Maglev balancer over `endpoints` with table size `size`.
async fn maglev(endpoints: Vec<Endpoint>, size: u32) -> IntegratedLoadBalancer {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("svc", endpoints).await.unwrap();
    let mut config = LoadBalancerConfig::default();
    config.consistent_hash.algorithm = HashAlgorithm::Maglev;
    config.consistent_hash.maglev_table_size = size;
    IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::ConsistentHash, config)
        .await
        .unwrap()
}

/// The smallest hash that lands on entry `e` of a table of `size` entries
/// (`entry = (hash × size) >> 64`).
fn hash_of_entry(e: u64, size: u64) -> u64 {
    ((u128::from(e) << 64).div_ceil(u128::from(size))) as u64
}

#[tokio::test]
async fn maglev_table_is_pinned() {
    // A whole table of 251 entries over three endpoints (one of weight 2), read entry by
    // entry: the digit is the owner's position in `endpoints`.
    let endpoints = vec![
        Endpoint::new("127.0.0.1:8080".parse().unwrap(), None),
        Endpoint::new(
            "127.0.0.2:8080".parse().unwrap(),
            Some(EndpointMetadata::new().with_weight(2)),
        ),
        Endpoint::new("[::1]:9000".parse().unwrap(), None),
    ];
    let lb = maglev(endpoints.clone(), 251).await;
    let handle = lb.service("svc").unwrap();
    let table: String = (0..251)
        .map(|e| {
            let pick = handle.pick_with_key_hash(hash_of_entry(e, 251)).unwrap();
            let owner = endpoints
                .iter()
                .position(|x| x.address == pick.address())
                .unwrap();
            char::from(b'0' + owner as u8)
        })
        .collect();
    assert_eq!(table, MAGLEV_TABLE_251);
}

const MAGLEV_TABLE_251: &str = concat!(
    "212010122101021111201112121111010111120011102021210202110120201012221102211121021010",
    "102121000212010110201021110201112121101212111101011102111010112121021211012120101211",
    "12022121211110100111200111020112101021211202110121211012211110011101021210102121100",
);

#[tokio::test]
async fn maglev_owners_are_pinned() {
    // The ring test's endpoints, the default table size (65,537).
    let mut endpoints: Vec<Endpoint> = (1..=5)
        .map(|i| Endpoint::new(format!("127.0.0.{i}:8080").parse().unwrap(), None))
        .collect();
    endpoints.push(Endpoint::new(
        "[::1]:9000".parse().unwrap(),
        Some(EndpointMetadata::new().with_weight(3)),
    ));
    let lb = maglev(endpoints, 65_537).await;
    let owner = |key: &str| lb.select_with_hash("svc", key).unwrap().address.to_string();
    let firsts: Vec<String> = (1..=8).map(|i| owner(&format!("user-{i}"))).collect();
    println!("FIRSTS {firsts:?}");
    let all: Vec<String> = (0..10_000).map(|i| owner(&format!("key-{i}"))).collect();
    println!("DIGEST {:#x}", hash_key(all.join(",")));
    assert_eq!(firsts, MAGLEV_FIRSTS);
    assert_eq!(
        hash_key(all.join(",")),
        MAGLEV_DIGEST,
        "owners of 10,000 keys changed"
    );
}

const MAGLEV_FIRSTS: [&str; 8] = [
    "127.0.0.1:8080",
    "[::1]:9000",
    "[::1]:9000",
    "127.0.0.2:8080",
    "127.0.0.4:8080",
    "[::1]:9000",
    "127.0.0.3:8080",
    "127.0.0.4:8080",
];
const MAGLEV_DIGEST: u64 = 0xb61f_f8a0_a4ef_335c;
