//! The file discovery source: a TOML file of services, reloaded on change, feeding a
//! registry with a balancer attached. Loopback addresses only.
#![cfg(feature = "runtime")]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tai_loadbalancer::{
    DiscoveryRunner, FileDiscovery, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry, SourceHealth, SourceStats,
};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tai-lb-file-tests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("services.toml")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` atomically (a temporary file renamed over `path`), as operators should.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const INITIAL: &str = r#"# services for the file tests
[[services]]
name = "api"

[[services.endpoints]]
address = "127.0.0.1:5001"
zone = "zone-a"
weight = 3
tags = { track = "stable" }

[[services.endpoints]]
address = "127.0.0.2:5001"
region = "region-1"
priority = 1

[[services]]
name = "billing"

[[services.endpoints]]
address = "127.0.0.3:6001"
"#;

async fn setup(path: &Path) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer, DiscoveryRunner) {
    let registry = Arc::new(ServiceRegistry::new());
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    let runner = DiscoveryRunner::new(registry.clone());
    runner.spawn(FileDiscovery::new(path).with_poll_interval(Duration::from_millis(50)));
    runner.synced().await;
    (registry, lb, runner)
}

fn routed(lb: &IntegratedLoadBalancer, service: &str) -> BTreeSet<SocketAddr> {
    lb.service(service)
        .map(|s| s.endpoints().into_iter().map(|(e, _)| e.address).collect())
        .unwrap_or_default()
}

fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn stats(runner: &DiscoveryRunner) -> SourceStats {
    runner.stats()[0].clone()
}

async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_load_carries_every_field_into_the_balancer() {
    let dir = TempDir::new();
    write_atomically(&dir.file(), INITIAL);
    let (registry, lb, runner) = setup(&dir.file()).await;
    assert_eq!(routed(&lb, "api"), addrs(&["127.0.0.1:5001", "127.0.0.2:5001"]));
    assert_eq!(routed(&lb, "billing"), addrs(&["127.0.0.3:6001"]));
    let api = registry.endpoints("api").await.unwrap();
    assert_eq!(api[0].weight(), 3);
    assert_eq!(api[0].zone(), Some("zone-a"));
    assert_eq!(api[0].tag("track"), Some("stable"));
    assert_eq!(api[1].region(), Some("region-1"));
    assert_eq!(api[1].weight(), 1);
    assert_eq!((api[0].priority(), api[1].priority()), (0, 1));
    let s = stats(&runner);
    assert_eq!(s.health, SourceHealth::Healthy);
    assert_eq!(s.name, format!("file:{}", dir.file().display()));
    assert_eq!(s.updates, 2, "one snapshot per service");
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_reloaded_into_the_balancer() {
    let dir = TempDir::new();
    write_atomically(&dir.file(), INITIAL);
    let (registry, lb, runner) = setup(&dir.file()).await;

    let changed = INITIAL
        .replace("weight = 3", "weight = 7")
        .replace("127.0.0.2:5001", "127.0.0.4:5001");
    write_atomically(&dir.file(), &changed);
    eventually(Duration::from_secs(3), "reload visible in the balancer", || {
        routed(&lb, "api") == addrs(&["127.0.0.1:5001", "127.0.0.4:5001"])
    })
    .await;
    assert_eq!(registry.endpoints("api").await.unwrap()[0].weight(), 7);
    // `billing` did not change: it was not republished.
    assert_eq!(stats(&runner).updates, 3);

    // A rewrite of the same size within the same second (same mtime tick) is still seen.
    let same_size = changed.replace("127.0.0.3:6001", "127.0.0.3:6002");
    assert_eq!(same_size.len(), changed.len());
    std::fs::write(dir.file(), &same_size).unwrap();
    eventually(Duration::from_secs(3), "same-size rewrite seen", || {
        routed(&lb, "billing") == addrs(&["127.0.0.3:6002"])
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_removed_from_the_file_is_emptied() {
    let dir = TempDir::new();
    write_atomically(&dir.file(), INITIAL);
    let (registry, lb, runner) = setup(&dir.file()).await;
    let without_billing = &INITIAL[..INITIAL.find("[[services]]\nname = \"billing\"").unwrap()];
    write_atomically(&dir.file(), without_billing);
    eventually(Duration::from_secs(3), "billing emptied", || {
        routed(&lb, "billing").is_empty()
    })
    .await;
    // Still known (empty), so picks fail with "no endpoints", not "unknown service".
    assert!(registry.endpoints("billing").await.unwrap().is_empty());
    assert!(matches!(
        lb.pick("billing"),
        Err(tai_loadbalancer::Error::NoEndpoints { .. })
    ));
    assert_eq!(routed(&lb, "api").len(), 2);
    assert_eq!(stats(&runner).health, SourceHealth::Healthy);
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_keeps_the_last_good_membership_names_line_and_field_and_recovers() {
    let dir = TempDir::new();
    write_atomically(&dir.file(), INITIAL);
    let (_registry, lb, runner) = setup(&dir.file()).await;
    let good = routed(&lb, "api");

    // Line 8 is `weight = 3`; also remove an endpoint in the same edit: nothing applies.
    let bad = INITIAL
        .replace("weight = 3", "weight = 0")
        .replace("127.0.0.2:5001", "127.0.0.9:5001");
    write_atomically(&dir.file(), &bad);
    eventually(Duration::from_secs(3), "degraded on a bad file", || {
        matches!(stats(&runner).health, SourceHealth::Degraded { .. })
    })
    .await;
    let s = stats(&runner);
    let error = s.last_error.clone().unwrap();
    assert!(error.contains("line 8"), "{error}");
    assert!(error.contains("services[0].endpoints[0].weight"), "{error}");
    assert_eq!(routed(&lb, "api"), good, "the last good membership stays");
    assert_eq!(s.degradations, 1);
    // Polls of the same bad file do not count more degradations.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats(&runner).degradations, 1);

    // An unknown field (a typo) is just as fatal, and named.
    write_atomically(&dir.file(), &INITIAL.replace("region =", "regoin ="));
    eventually(Duration::from_secs(3), "typo reported", || {
        stats(&runner)
            .last_error
            .is_some_and(|e| e.contains("regoin") && e.contains("line 13"))
    })
    .await;
    assert_eq!(routed(&lb, "api"), good);
    assert_eq!(
        stats(&runner).degradations,
        1,
        "a new error while degraded is not a new degradation"
    );

    // Fixed: healthy again, and the fixed content applies.
    write_atomically(&dir.file(), &INITIAL.replace("127.0.0.2:5001", "127.0.0.9:5001"));
    eventually(Duration::from_secs(3), "recovered", || {
        stats(&runner).health == SourceHealth::Healthy
            && routed(&lb, "api") == addrs(&["127.0.0.1:5001", "127.0.0.9:5001"])
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_degraded_until_it_appears() {
    let dir = TempDir::new();
    let (_registry, lb, runner) = setup(&dir.file()).await; // synced returns: degraded counts
    let s = stats(&runner);
    assert!(matches!(s.health, SourceHealth::Degraded { .. }), "{s:?}");
    assert!(s.last_error.unwrap().contains("services.toml"));
    assert!(lb.services().is_empty());
    write_atomically(&dir.file(), INITIAL);
    eventually(Duration::from_secs(3), "loaded once created", || {
        stats(&runner).health == SourceHealth::Healthy && routed(&lb, "billing").len() == 1
    })
    .await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_truncated_or_half_written_in_place_never_empties_a_service() {
    let dir = TempDir::new();
    write_atomically(&dir.file(), INITIAL);
    let (_registry, lb, runner) = setup(&dir.file()).await;
    let api = addrs(&["127.0.0.1:5001", "127.0.0.2:5001"]);
    let billing = addrs(&["127.0.0.3:6001"]);
    // Truncated (as `>` or an editor does before writing): degraded, routing unchanged.
    std::fs::write(dir.file(), "").unwrap();
    eventually(Duration::from_secs(5), "empty file reported degraded", || {
        matches!(stats(&runner).health, SourceHealth::Degraded { .. })
    })
    .await;
    assert_eq!(routed(&lb, "api"), api);
    assert_eq!(routed(&lb, "billing"), billing);
    // Written slowly in place, a valid-TOML prefix at a time: no poll applies a prefix that
    // drops the billing service or an api endpoint, because the content is still changing.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.file())
        .unwrap();
    let sampler = {
        let mut worst = (usize::MAX, usize::MAX);
        let start = Instant::now();
        let mut written = 0;
        for line in INITIAL.split_inclusive('\n') {
            use std::io::Write;
            file.write_all(line.as_bytes()).unwrap();
            file.flush().unwrap();
            written += 1;
            // Lines arrive 10 ms apart: less than the source's settle time between two reads.
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                worst.0 = worst.0.min(routed(&lb, "api").len());
                worst.1 = worst.1.min(routed(&lb, "billing").len());
            }
        }
        assert!(written > 10 && start.elapsed() > Duration::from_millis(100));
        worst
    };
    assert_eq!(sampler, (2, 1), "a half-written file was applied");
    eventually(Duration::from_secs(5), "healthy again once complete", || {
        stats(&runner).health == SourceHealth::Healthy
    })
    .await;
    assert_eq!(routed(&lb, "api"), api);
    assert_eq!(routed(&lb, "billing"), billing);
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keys_come_from_the_file_and_a_shared_one_rejects_the_file() {
    let dir = TempDir::new();
    let pods = |second_key: &str, second_address: &str| {
        format!(
            "[[services]]\nname = \"cache\"\n\n\
             [[services.endpoints]]\naddress = \"127.0.0.1:7001\"\ntags = {{ hash_key = \"cache-0\" }}\n\n\
             [[services.endpoints]]\naddress = \"{second_address}\"\ntags = {{ hash_key = \"{second_key}\" }}\n"
        )
    };
    write_atomically(&dir.file(), &pods("cache-1", "127.0.0.1:7002"));
    let (registry, lb, runner) = setup(&dir.file()).await;
    let owner_of = |lb: &IntegratedLoadBalancer, k: u32| {
        lb.select_with_hash("cache", k.to_le_bytes())
            .unwrap()
            .tag(tai_loadbalancer::HASH_KEY_TAG)
            .unwrap()
            .to_owned()
    };
    let before: Vec<String> = (0..2_000).map(|k| owner_of(&lb, k)).collect();

    // Pod 1 comes back on another address with its key: no key moves.
    write_atomically(&dir.file(), &pods("cache-1", "127.0.0.1:7003"));
    eventually(Duration::from_secs(10), "the new address is applied", || {
        routed(&lb, "cache") == addrs(&["127.0.0.1:7001", "127.0.0.1:7003"])
    })
    .await;
    let after: Vec<String> = (0..2_000).map(|k| owner_of(&lb, k)).collect();
    assert_eq!(before, after, "keys follow the hash key, not the address");

    // Two endpoints with one hash key: the whole file is refused, naming the field.
    write_atomically(&dir.file(), &pods("cache-0", "127.0.0.1:7003"));
    eventually(Duration::from_secs(10), "the bad file is reported", || {
        matches!(stats(&runner).health, SourceHealth::Degraded { .. })
    })
    .await;
    let error = stats(&runner).last_error.unwrap();
    assert!(error.contains("hash key") && error.contains("tags"), "{error}");
    assert_eq!(routed(&lb, "cache"), addrs(&["127.0.0.1:7001", "127.0.0.1:7003"]));
    assert_eq!(registry.endpoints("cache").await.unwrap().len(), 2);
    runner.shutdown().await;
}
