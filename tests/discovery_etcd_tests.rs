//! etcd discovery and self-registration against a REAL etcd server (Debian's `etcd-server`).
//!
//! Each test starts its own etcd on 127.0.0.1 free ports with a temporary data directory
//! ([`EtcdServer`]) and kills it at the end. Without `etcd` on PATH the tests FAIL, unless
//! `TAI_LB_SKIP_ETCD=1` is set (then they print a note and pass); `.ci/run` installs it.
//!
//! Multi-process tests re-run this test binary as a child process (the `child_process`
//! entry point, selected by the `TAI_LB_ETCD_CHILD` environment variable): a registrant
//! that is SIGKILLed, and balancers that report consistent-hash owners on request.
#![cfg(feature = "etcd")]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tai_loadbalancer::etcd_client::{self, Client, CompactionOptions, GetOptions};
use tai_loadbalancer::{
    DiscoveryRunner, Endpoint, EndpointMetadata, EtcdConfig, EtcdDiscovery, EtcdDiscoveryStats,
    EtcdRegistration, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
    SourceHealth, etcd_record,
};

// ===== the etcd harness =====

/// A real etcd on loopback: a temporary data dir, free ports, killed on drop. It can be
/// stopped and started again on the same ports and data (same cluster, same revisions).
struct EtcdServer {
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A free loopback port (bound, read, released; etcd binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// Starts etcd, or returns `None` (the test then passes with a note) when etcd is
    /// missing and `TAI_LB_SKIP_ETCD=1`; a missing etcd otherwise fails the test.
    fn start_or_skip() -> Option<Self> {
        if let Err(error) = Command::new("etcd").arg("--version").output() {
            if std::env::var("TAI_LB_SKIP_ETCD").as_deref() == Ok("1") {
                eprintln!("etcd not found ({error}): skipped because TAI_LB_SKIP_ETCD=1");
                return None;
            }
            panic!(
                "these tests need a real etcd on PATH (Debian: apt-get install etcd-server; .ci/run installs it): {error}. \
                 Set TAI_LB_SKIP_ETCD=1 to skip them."
            );
        }
        let dir = std::env::temp_dir().join(format!(
            "tai-lb-etcd-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = EtcdServer {
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
        };
        // Another process may take a "free" port before etcd binds it: retry on new ports.
        for attempt in 0.. {
            server.client_port = free_port();
            server.peer_port = free_port();
            let _ = std::fs::remove_dir_all(server.dir.join("data"));
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(log) if attempt < 3 => eprintln!("etcd did not start, retrying on other ports:\n{log}"),
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new("etcd")
            .arg("--name=tai-lb-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tai-lb-test={peer}"))
            // Quiet watches hear how far the store moved every 200 ms (default 10 min), so
            // the progress-notification resume is testable.
            .arg("--experimental-watch-progress-notify-interval=200ms")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Probed from a thread of its own: callers may be inside a tokio runtime.
        let probe = |client: &str| {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            let connect = Client::connect([client], None);
                            let Ok(Ok(mut c)) =
                                tokio::time::timeout(Duration::from_millis(500), connect).await
                            else {
                                return false;
                            };
                            let get = c.get("probe", None);
                            matches!(
                                tokio::time::timeout(Duration::from_millis(500), get).await,
                                Ok(Ok(_))
                            )
                        })
                    })
                    .join()
                    .unwrap()
            })
        };
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("etcd exited ({status}):\n{log}"));
            }
            let ready = probe(&client);
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(format!("etcd did not answer within 20 s:\n{log}"))
    }

    /// SIGKILLs etcd (its data stays).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    fn restart(&mut self) {
        self.spawn()
            .unwrap_or_else(|log| panic!("etcd did not restart:\n{log}"));
    }

    async fn client(&self) -> Client {
        Client::connect([self.url()], None).await.unwrap()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

macro_rules! etcd_or_skip {
    () => {
        match EtcdServer::start_or_skip() {
            Some(server) => server,
            None => return,
        }
    };
}

// ===== helpers =====

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn ep(port: u16, weight: u32) -> Endpoint {
    Endpoint::new(addr(port), Some(EndpointMetadata::new().with_weight(weight)))
}

fn key(service: &str, instance: &str) -> String {
    format!("/services/{service}/{instance}")
}

async fn put(client: &mut Client, service: &str, instance: &str, endpoint: &Endpoint) {
    client
        .put(key(service, instance), etcd_record(endpoint), None)
        .await
        .unwrap();
}

/// A registry fed by an `EtcdDiscovery`, and a consistent-hash balancer on it.
struct Follower {
    registry: Arc<ServiceRegistry>,
    runner: DiscoveryRunner,
    lb: IntegratedLoadBalancer,
    stats: EtcdDiscoveryStats,
}

async fn follow(url: &str, services: &[&str], backoff: (u64, u64)) -> Follower {
    let config = EtcdConfig::new([url])
        .with_request_timeout(Duration::from_secs(2))
        .with_backoff(Duration::from_millis(backoff.0), Duration::from_millis(backoff.1));
    follow_with(config, services).await
}

async fn follow_with(config: EtcdConfig, services: &[&str]) -> Follower {
    let registry = Arc::new(ServiceRegistry::new());
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    let runner = DiscoveryRunner::new(registry.clone());
    let source = EtcdDiscovery::new(config, services.iter().copied()).unwrap();
    let stats = source.stats_handle();
    runner.spawn(source);
    tokio::time::timeout(Duration::from_secs(10), runner.synced())
        .await
        .expect("the source synced");
    Follower {
        registry,
        runner,
        lb,
        stats,
    }
}

/// The service's endpoints in the balancer's routing, as (address, weight).
fn members(lb: &IntegratedLoadBalancer, service: &str) -> Vec<(SocketAddr, u32)> {
    lb.service(service)
        .map(|h| {
            h.endpoints()
                .into_iter()
                .map(|(e, _)| (e.address, e.weight()))
                .collect()
        })
        .unwrap_or_default()
}

fn expect(list: &[(u16, u32)]) -> Vec<(SocketAddr, u32)> {
    let mut v: Vec<_> = list.iter().map(|&(p, w)| (addr(p), w)).collect();
    v.sort();
    v
}

/// Waits (polling every millisecond) until `cond` holds; panics after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn health(runner: &DiscoveryRunner) -> SourceHealth {
    runner.stats()[0].health.clone()
}

// ===== tests =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_load_then_changes_visible_within_200ms_p99() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    let tagged = Endpoint::new(
        addr(5001),
        Some(
            EndpointMetadata::new()
                .with_region("eu-1")
                .with_zone("eu-1a")
                .with_weight(3)
                .with_tag("version", "2"),
        ),
    );
    put(&mut client, "api", "a", &tagged).await;
    put(&mut client, "api", "b", &ep(5002, 1)).await;
    put(&mut client, "other", "x", &ep(6001, 1)).await;

    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;
    assert_eq!(members(&f.lb, "api"), expect(&[(5001, 3), (5002, 1)]));
    let loaded = f.registry.endpoints("api").await.unwrap();
    assert!(loaded.contains(&tagged), "metadata loaded: {loaded:?}");
    assert!(
        f.lb.service("other").is_err(),
        "only the configured services are followed"
    );
    assert_eq!(health(&f.runner), SourceHealth::Healthy);
    assert_eq!(f.stats.full_reads(), 1);

    // 100 changes: add, reweight, remove, ...; each timed from the put/delete returning to
    // the balancer's routing showing it. One measurement per change, no retries.
    let mut expected: BTreeMap<u16, u32> = [(5001, 3), (5002, 1)].into_iter().collect();
    let mut latencies = Vec::with_capacity(100);
    for i in 0..100u16 {
        let port = 7000 + i / 3;
        let instance = format!("n{port}");
        let start = match i % 3 {
            0 => {
                put(&mut client, "api", &instance, &ep(port, 1)).await;
                expected.insert(port, 1);
                Instant::now()
            }
            1 => {
                put(&mut client, "api", &instance, &ep(port, 7)).await;
                expected.insert(port, 7);
                Instant::now()
            }
            _ => {
                client.delete(key("api", &instance), None).await.unwrap();
                expected.remove(&port);
                Instant::now()
            }
        };
        let want: Vec<_> = expected.iter().map(|(&p, &w)| (addr(p), w)).collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            while members(&f.lb, "api") != want {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("change {i} not visible within 5 s"));
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let p50 = latencies[49];
    let p99 = latencies[98];
    eprintln!(
        "etcd change-to-visible latency over 100 changes: p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies[99]
    );
    assert!(
        p99 < Duration::from_millis(200),
        "p99 {p99:?} over the 200 ms bound"
    );
    let stats = &f.runner.stats()[0];
    assert_eq!((stats.malformed, stats.rejected, stats.conflicts), (0, 0, 0));
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_skipped_and_counted() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    put(&mut client, "api", "good", &ep(5001, 1)).await;
    let raw = [
        (
            "extra-fields",
            r#"{"address":"127.0.0.1:5002","weight":2,"owner":{"team":"x"},"zone":"z"}"#,
        ),
        ("not-json", "127.0.0.1:5003"),
        ("bad-address", r#"{"address":"localhost:5004"}"#),
        ("wrong-type", r#"{"address":"127.0.0.1:5005","weight":"heavy"}"#),
        ("invalid-endpoint", r#"{"address":"127.0.0.1:5006","weight":0}"#),
    ];
    for (instance, value) in raw {
        client.put(key("api", instance), value, None).await.unwrap();
    }
    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;
    assert_eq!(members(&f.lb, "api"), expect(&[(5001, 1), (5002, 2)]));
    assert_eq!(f.runner.stats()[0].malformed, 4, "four malformed records skipped");
    assert_eq!(f.runner.stats()[0].rejected, 0, "the registry never saw them");

    // Through the watch: a malformed put next to a good one in one transaction; the good
    // one applies.
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(
            key("api", "late-bad"),
            r#"{"address":"127.0.0.1:5007","tags":{"v":2}}"#,
            None,
        ),
        etcd_client::TxnOp::put(key("api", "late-good"), etcd_record(&ep(5008, 4)), None),
    ]);
    client.txn(txn).await.unwrap();
    wait_until("the good record of the batch", Duration::from_secs(5), || {
        members(&f.lb, "api") == expect(&[(5001, 1), (5002, 2), (5008, 4)])
    })
    .await;
    assert_eq!(f.runner.stats()[0].malformed, 5);

    // A key whose value turns malformed stops advertising its old address.
    client.put(key("api", "good"), "{oops", None).await.unwrap();
    wait_until(
        "the garbled key's address removed",
        Duration::from_secs(5),
        || members(&f.lb, "api") == expect(&[(5002, 2), (5008, 4)]),
    )
    .await;
    assert_eq!(f.runner.stats()[0].malformed, 6);
    assert_eq!(health(&f.runner), SourceHealth::Healthy);
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_keeps_alive_replaces_a_lost_lease_and_deregisters() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;
    let config =
        EtcdConfig::new([etcd.url()]).with_backoff(Duration::from_millis(100), Duration::from_millis(500));
    let me = Endpoint::new(
        addr(5001),
        Some(EndpointMetadata::new().with_zone("a").with_weight(2)),
    );
    let registration =
        EtcdRegistration::register(&config, "api", "api-1", me.clone(), Duration::from_secs(2))
            .await
            .unwrap();
    assert_eq!(registration.key(), "/services/api/api-1");
    wait_until("registered", Duration::from_secs(5), || {
        members(&f.lb, "api") == expect(&[(5001, 2)])
    })
    .await;
    assert_eq!(f.registry.endpoints("api").await.unwrap(), vec![me.clone()]);

    // Kept alive well past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(members(&f.lb, "api"), expect(&[(5001, 2)]), "alive after 2 TTLs");

    // The lease is lost (revoked behind its back): the key goes, then comes back under a
    // new lease.
    let first_lease = registration.lease_id();
    client.lease_revoke(first_lease).await.unwrap();
    wait_until("the revoked lease's key removed", Duration::from_secs(5), || {
        members(&f.lb, "api").is_empty()
    })
    .await;
    wait_until("re-registered", Duration::from_secs(10), || {
        members(&f.lb, "api") == expect(&[(5001, 2)])
    })
    .await;
    wait_until("a new lease", Duration::from_secs(5), || {
        registration.lease_id() != first_lease
    })
    .await;

    // Clean shutdown: gone at once, lease revoked.
    let lease = registration.lease_id();
    let start = Instant::now();
    registration.deregister().await.unwrap();
    wait_until("deregistered", Duration::from_secs(1), || {
        members(&f.lb, "api").is_empty()
    })
    .await;
    eprintln!("deregistration visible after {:?}", start.elapsed());
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the lease was revoked");
    let left = client
        .get("/services/api/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(left.kvs().is_empty());

    // Invalid input is a typed error, never a panic.
    for (service, instance, ttl) in [
        ("api", "", 2),
        ("api", "a/b", 2),
        ("a/b", "x", 2),
        ("api", "x", 0),
    ] {
        let result =
            EtcdRegistration::register(&config, service, instance, ep(5001, 1), Duration::from_secs(ttl))
                .await;
        assert!(result.is_err(), "{service:?} {instance:?} {ttl}");
    }
    let bad = EtcdRegistration::register(&config, "api", "x", ep(0, 1), Duration::from_secs(2)).await;
    assert!(matches!(bad, Err(tai_loadbalancer::Error::InvalidAddress { .. })));
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_registrant_disappears_when_its_lease_expires() {
    let etcd = etcd_or_skip!();
    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;
    let mut registrant = ChildProcess::spawn(
        "registrant",
        &[
            ("TAI_LB_ETCD_URL", etcd.url()),
            ("TAI_LB_ETCD_PORT", "5001".into()),
            ("TAI_LB_ETCD_TTL", "2".into()),
        ],
    );
    let line = registrant.read_line_starting("REGISTERED", Duration::from_secs(20));
    eprintln!("child: {line}");
    wait_until("the child's record", Duration::from_secs(5), || {
        members(&f.lb, "api") == expect(&[(5001, 1)])
    })
    .await;

    registrant.kill(); // SIGKILL: no deregistration
    let gone = wait_until("lease expiry", Duration::from_secs(10), || {
        members(&f.lb, "api").is_empty()
    })
    .await;
    eprintln!("killed registrant removed {gone:?} after SIGKILL (lease TTL 2 s)");
    assert!(
        gone < Duration::from_secs(2 + 4),
        "removed within the TTL plus etcd's expiry granularity"
    );
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_routing_on_the_last_membership_then_resyncs() {
    let mut etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    for port in [5001, 5002, 5003] {
        put(&mut client, "api", &format!("n{port}"), &ep(port, 1)).await;
    }
    let f = follow(&etcd.url(), &["api"], (200, 1000)).await;
    let before = expect(&[(5001, 1), (5002, 1), (5003, 1)]);
    assert_eq!(members(&f.lb, "api"), before);

    // Sample the routing all along: it must never be emptied.
    let sampler_lb = f.lb.service("api").unwrap();
    let smallest = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = {
        let smallest = smallest.clone();
        tokio::spawn(async move {
            loop {
                let n = sampler_lb.endpoints().len();
                smallest.fetch_min(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    etcd.stop();
    wait_until("the source degraded", Duration::from_secs(15), || {
        matches!(health(&f.runner), SourceHealth::Degraded { .. })
    })
    .await;
    // Down: routing continues on the last membership.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(members(&f.lb, "api"), before);
    for i in 0..100 {
        f.lb.select_with_hash("api", format!("user-{i}")).unwrap();
    }
    assert!(f.runner.stats()[0].degradations >= 1);

    // Back, and changed at once by another writer (before or while the source reconnects).
    etcd.restart();
    let mut client = etcd.client().await;
    client.delete(key("api", "n5001"), None).await.unwrap();
    put(&mut client, "api", "n5002", &ep(5002, 5)).await;
    put(&mut client, "api", "n5004", &ep(5004, 1)).await;
    let after = expect(&[(5002, 5), (5003, 1), (5004, 1)]);
    wait_until("resynced", Duration::from_secs(15), || {
        members(&f.lb, "api") == after
    })
    .await;
    wait_until("healthy again", Duration::from_secs(5), || {
        health(&f.runner) == SourceHealth::Healthy
    })
    .await;
    sampler.abort();
    assert!(smallest.load(Ordering::Relaxed) >= 2, "routing was never emptied");
    f.runner.shutdown().await;
}

/// A loopback TCP proxy in front of etcd that can cut and refuse connections: the source
/// loses etcd while the test keeps writing to it.
struct Proxy {
    port: u16,
    open: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(tokio::sync::watch::channel(true).0);
        let gate = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut state = gate.subscribe();
                if !*state.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = state.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Proxy { port, open, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_source_resumes_from_its_revision_or_rereads_after_compaction() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    put(&mut client, "api", "a", &ep(5001, 1)).await;
    put(&mut client, "api", "b", &ep(5002, 1)).await;
    let proxy = Proxy::start(etcd.client_port).await;
    let f = follow(&proxy.url(), &["api"], (100, 300)).await;
    assert_eq!(members(&f.lb, "api"), expect(&[(5001, 1), (5002, 1)]));
    assert_eq!((f.stats.full_reads(), f.stats.watch_resumes()), (1, 0));

    // Cut off; etcd changes meanwhile; the resumed watch replays the changes.
    proxy.set_open(false);
    wait_until("degraded", Duration::from_secs(15), || {
        matches!(health(&f.runner), SourceHealth::Degraded { .. })
    })
    .await;
    client.delete(key("api", "a"), None).await.unwrap();
    put(&mut client, "api", "c", &ep(5003, 2)).await;
    put(&mut client, "api", "b", &ep(5002, 3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        members(&f.lb, "api"),
        expect(&[(5001, 1), (5002, 1)]),
        "last membership kept"
    );
    proxy.set_open(true);
    wait_until(
        "changes made while cut off applied",
        Duration::from_secs(10),
        || members(&f.lb, "api") == expect(&[(5002, 3), (5003, 2)]),
    )
    .await;
    wait_until("healthy", Duration::from_secs(5), || {
        health(&f.runner) == SourceHealth::Healthy
    })
    .await;
    assert_eq!(f.stats.full_reads(), 1, "resumed, not re-read");
    assert!(f.stats.watch_resumes() >= 1);

    // Cut off again; etcd changes and compacts the history: the source must read again.
    proxy.set_open(false);
    wait_until("degraded again", Duration::from_secs(15), || {
        matches!(health(&f.runner), SourceHealth::Degraded { .. })
    })
    .await;
    client.delete(key("api", "b"), None).await.unwrap();
    put(&mut client, "api", "d", &ep(5004, 1)).await;
    let revision = client.get("x", None).await.unwrap().header().unwrap().revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    proxy.set_open(true);
    wait_until("re-read after compaction", Duration::from_secs(10), || {
        members(&f.lb, "api") == expect(&[(5003, 2), (5004, 1)])
    })
    .await;
    assert!(f.stats.compactions() >= 1, "{:?}", f.stats);
    assert_eq!(f.stats.full_reads(), 2, "{:?}", f.stats);
    wait_until("healthy", Duration::from_secs(5), || {
        health(&f.runner) == SourceHealth::Healthy
    })
    .await;
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancer_processes_agree_on_the_owners_of_10000_keys() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    for port in 5001..=5005 {
        put(&mut client, "api", &format!("n{port}"), &ep(port, 1)).await;
    }
    let mut children: Vec<ChildProcess> = (0..2)
        .map(|_| ChildProcess::spawn("balancer", &[("TAI_LB_ETCD_URL", etcd.url())]))
        .collect();
    for child in &mut children {
        child.read_line_starting("READY", Duration::from_secs(20));
    }
    // A third balancer here, to check the digest is not trivially equal.
    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;

    let mut membership: BTreeMap<u16, u32> = (5001..=5005).map(|p| (p, 1)).collect();
    let mut previous_digest = String::new();
    for step in 0..4 {
        match step {
            0 => {}
            1 => {
                put(&mut client, "api", "n5006", &ep(5006, 1)).await;
                membership.insert(5006, 1);
            }
            2 => {
                client.delete(key("api", "n5002"), None).await.unwrap();
                membership.remove(&5002);
            }
            _ => {
                put(&mut client, "api", "n5004", &ep(5004, 4)).await;
                membership.insert(5004, 4);
            }
        }
        let spec = membership_spec(membership.iter().map(|(&p, &w)| (addr(p), w)));
        let mut answers = Vec::new();
        for child in &mut children {
            child.send(&format!("expect {spec}"));
        }
        for child in &mut children {
            let line = child.read_line_starting("DIGEST", Duration::from_secs(20));
            answers.push(line);
        }
        let want: Vec<_> = membership.iter().map(|(&p, &w)| (addr(p), w)).collect();
        wait_until("the local balancer", Duration::from_secs(10), || {
            members(&f.lb, "api") == want
        })
        .await;
        let (local, distinct) = owners_digest(&f.lb);
        let local = format!("DIGEST {spec} {local} {distinct}");
        eprintln!("step {step}: {local}");
        assert_eq!(
            answers[0], answers[1],
            "the two processes disagree at step {step}"
        );
        assert_eq!(
            answers[0], local,
            "the processes and this one disagree at step {step}"
        );
        assert_eq!(distinct, membership.len(), "every endpoint owns keys");
        assert_ne!(local, previous_digest, "step {step} moved some keys");
        previous_digest = local;
    }
    for child in &mut children {
        child.close_stdin_and_wait();
    }
    f.runner.shutdown().await;
}

fn membership_spec(members: impl IntoIterator<Item = (SocketAddr, u32)>) -> String {
    members
        .into_iter()
        .map(|(a, w)| format!("{a}={w}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A digest of the owners of keys `user-0..user-9999`, and how many distinct owners.
fn owners_digest(lb: &IntegratedLoadBalancer) -> (String, usize) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut distinct = std::collections::BTreeSet::new();
    for i in 0..10_000 {
        let owner = lb.select_with_hash("api", format!("user-{i}")).unwrap().address;
        owner.hash(&mut hasher);
        distinct.insert(owner);
    }
    (format!("{:016x}", hasher.finish()), distinct.len())
}

// ===== child processes =====

/// This test binary re-run as a child (`child_process` below), killed on drop.
struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildProcess {
    fn spawn(mode: &str, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "child_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TAI_LB_ETCD_CHILD", mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ChildProcess { child, stdin, lines }
    }

    /// The rest of the next line holding `prefix` (the test harness's own lines are skipped).
    fn read_line_starting(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest may print `test child_process ... ` on the same line first.
                Ok(line) => {
                    if let Some(at) = line.find(prefix) {
                        return line[at..].to_owned();
                    }
                    assert!(!line.contains("TIMEOUT"), "child: {line}");
                }
                Err(e) => panic!("no `{prefix}` line from the child within {timeout:?}: {e}"),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL on unix
        let _ = self.child.wait();
    }

    fn close_stdin_and_wait(&mut self) {
        self.stdin = None;
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child exited with {status}");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Entry point of the child processes of the multi-process tests, selected by
/// `TAI_LB_ETCD_CHILD` (`registrant` or `balancer`); without it this does nothing. Both
/// modes exit when their stdin closes (so a dead parent leaves no orphans).
#[test]
#[ignore = "child process entry point of the multi-process tests (they run it)"]
fn child_process() {
    let Ok(mode) = std::env::var("TAI_LB_ETCD_CHILD") else {
        return;
    };
    let url = std::env::var("TAI_LB_ETCD_URL").expect("TAI_LB_ETCD_URL");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if stdin_tx.send(line).is_err() {
                break;
            }
        }
    });
    rt.block_on(async move {
        match mode.as_str() {
            "registrant" => {
                let port: u16 = std::env::var("TAI_LB_ETCD_PORT").unwrap().parse().unwrap();
                let ttl: u64 = std::env::var("TAI_LB_ETCD_TTL").unwrap().parse().unwrap();
                let config = EtcdConfig::new([url]);
                let registration = EtcdRegistration::register(
                    &config,
                    "api",
                    "child",
                    ep(port, 1),
                    Duration::from_secs(ttl),
                )
                .await
                .unwrap();
                println!("REGISTERED lease {}", registration.lease_id());
                // Until killed (or the parent goes away).
                while stdin_rx.recv().await.is_some() {}
                registration.deregister().await.unwrap();
            }
            "balancer" => {
                let f = follow(&url, &["api"], (100, 1000)).await;
                println!("READY");
                while let Some(line) = stdin_rx.recv().await {
                    let Some(spec) = line.strip_prefix("expect ") else {
                        continue;
                    };
                    let deadline = Instant::now() + Duration::from_secs(15);
                    loop {
                        let now = membership_spec(members(&f.lb, "api"));
                        if now == spec {
                            let (digest, distinct) = owners_digest(&f.lb);
                            println!("DIGEST {spec} {digest} {distinct}");
                            break;
                        }
                        if Instant::now() > deadline {
                            println!("TIMEOUT expected {spec}, have {now}");
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                f.runner.shutdown().await;
            }
            other => panic!("unknown child mode {other:?}"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_cut_off_for_less_than_its_ttl_keeps_its_lease_and_key() {
    let etcd = etcd_or_skip!();
    let f = follow(&etcd.url(), &["api"], (100, 1000)).await;
    let proxy = Proxy::start(etcd.client_port).await;
    let config = EtcdConfig::new([proxy.url()])
        .with_request_timeout(Duration::from_millis(400))
        .with_backoff(Duration::from_millis(100), Duration::from_millis(300));
    let registration = EtcdRegistration::register(
        &config,
        "api",
        "api-1",
        Endpoint::new(addr(5001), None),
        Duration::from_secs(4),
    )
    .await
    .unwrap();
    wait_until("registered", Duration::from_secs(5), || {
        members(&f.lb, "api") == expect(&[(5001, 1)])
    })
    .await;
    let lease = registration.lease_id();
    // Its connection to etcd is cut for 1.5 s (a keepalive round fails), then restored.
    proxy.set_open(false);
    let cut = std::time::Instant::now();
    let mut gone = false;
    while cut.elapsed() < Duration::from_millis(1_500) {
        gone |= members(&f.lb, "api").is_empty();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set_open(true);
    // Well past the next keepalive rounds: still the same lease, never deregistered.
    let after = std::time::Instant::now();
    while after.elapsed() < Duration::from_secs(5) {
        gone |= members(&f.lb, "api").is_empty();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!gone, "a short cut must not take the instance out of the fleet");
    assert_eq!(
        registration.lease_id(),
        lease,
        "a transient failure must keep the lease"
    );
    registration.deregister().await.unwrap();
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_service_is_read_in_pages_that_add_up_to_one_revision() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    // 2,500 instances (in transactions of 125 puts: etcd allows 128 operations per txn),
    // plus keys just outside the prefix on both sides, which must not be read.
    let mut expected = Vec::new();
    for batch in 0..20u16 {
        let ops: Vec<etcd_client::TxnOp> = (0..125u16)
            .map(|i| {
                let port = 20_000 + batch * 125 + i;
                expected.push((port, 1 + u32::from(port % 5)));
                etcd_client::TxnOp::put(
                    key("big", &format!("i{port}")),
                    etcd_record(&ep(port, 1 + u32::from(port % 5))),
                    None,
                )
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    client
        .put("/services/big", etcd_record(&ep(9001, 1)), None)
        .await
        .unwrap();
    client
        .put("/services/big0", etcd_record(&ep(9002, 1)), None)
        .await
        .unwrap();
    put(&mut client, "bif", "x", &ep(9003, 1)).await;

    let config = EtcdConfig::new([etcd.url()])
        .with_request_timeout(Duration::from_secs(5))
        .with_range_page_size(300);
    let f = follow_with(config, &["big"]).await;
    assert_eq!(members(&f.lb, "big"), expect(&expected));
    assert_eq!(f.stats.full_reads(), 1);

    // Pages read at one revision add up to a state the store really had: a writer moves
    // instances (one transaction deletes `i<n>`, which sorts early, and puts `late<n>`, which
    // sorts last) while the pages are read one key at a time, so every real state has exactly
    // 2,500 instances; pages read at different revisions would see some instances twice.
    // Nothing written during the read is lost either: the watch starts after its revision.
    let config = EtcdConfig::new([etcd.url()])
        .with_request_timeout(Duration::from_secs(5))
        .with_range_page_size(1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let mut client = etcd.client().await;
        let stop = stop.clone();
        async move {
            let mut moved = 0u16;
            while moved < 2_000 && !stop.load(Ordering::Relaxed) {
                let move_one = etcd_client::Txn::new().and_then(vec![
                    etcd_client::TxnOp::delete(key("big", &format!("i{}", 20_000 + moved)), None),
                    etcd_client::TxnOp::put(
                        key("big", &format!("late{moved:04}")),
                        etcd_record(&ep(30_000 + moved, 1)),
                        None,
                    ),
                ]);
                client.txn(move_one).await.unwrap();
                moved += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            moved
        }
    });
    let g = follow_with(config, &["big"]).await;
    assert_eq!(
        members(&g.lb, "big").len(),
        2_500,
        "the paged read is one real state"
    );
    stop.store(true, Ordering::Relaxed);
    let moved = writer.await.unwrap();
    assert!(moved > 0, "the writer ran during the read");
    let mut want: Vec<(u16, u32)> = expected
        .iter()
        .copied()
        .filter(|&(p, _)| p >= 20_000 + moved)
        .collect();
    want.extend((0..moved).map(|i| (30_000 + i, 1)));
    wait_until(
        "every move made during the paged read",
        Duration::from_secs(10),
        || {
            let now = members(&g.lb, "big");
            assert_eq!(now.len(), 2_500, "every published state is a real one");
            now == expect(&want)
        },
    )
    .await;
    eprintln!("{moved} instances moved while 2,500 keys were read one per page");
    assert_eq!(g.stats.full_reads(), 1);
    f.runner.shutdown().await;
    g.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_service_resumes_after_compaction_thanks_to_progress_notifications() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    put(&mut client, "quiet", "a", &ep(5001, 1)).await;
    let proxy = Proxy::start(etcd.client_port).await;
    let f = follow(&proxy.url(), &["quiet"], (100, 300)).await;
    assert_eq!(members(&f.lb, "quiet"), expect(&[(5001, 1)]));

    // The store moves on elsewhere; the quiet watch hears of it by progress notifications.
    for i in 0..20 {
        put(&mut client, "busy", &format!("b{i}"), &ep(6000 + i, 1)).await;
    }
    let heard = f.stats.progress_notifications();
    wait_until("two progress notifications", Duration::from_secs(10), || {
        f.stats.progress_notifications() >= heard + 2
    })
    .await;

    // Cut off; etcd compacts everything up to now; a change to the quiet service is made.
    proxy.set_open(false);
    wait_until("degraded", Duration::from_secs(15), || {
        matches!(health(&f.runner), SourceHealth::Degraded { .. })
    })
    .await;
    let revision = client.get("x", None).await.unwrap().header().unwrap().revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    put(&mut client, "quiet", "b", &ep(5002, 1)).await;
    proxy.set_open(true);
    wait_until("the change made while cut off", Duration::from_secs(10), || {
        members(&f.lb, "quiet") == expect(&[(5001, 1), (5002, 1)])
    })
    .await;
    assert_eq!(
        (f.stats.full_reads(), f.stats.compactions()),
        (1, 0),
        "resumed after the compacted revision, not re-read: {:?}",
        f.stats
    );
    assert!(f.stats.watch_resumes() >= 1);
    f.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_services_follow_their_own_prefixes_and_the_greatest_key_wins_an_address() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    put(&mut client, "api", "a", &ep(5001, 1)).await;
    put(&mut client, "search", "a", &ep(5101, 1)).await;
    // Two keys advertise 5003 in api: the record under the greatest key ("y") wins.
    put(&mut client, "api", "x", &ep(5003, 1)).await;
    put(&mut client, "api", "y", &ep(5003, 7)).await;
    let f = follow(&etcd.url(), &["api", "search"], (100, 1000)).await;
    let g = follow(&etcd.url(), &["search", "api"], (100, 1000)).await;
    for lb in [&f.lb, &g.lb] {
        assert_eq!(members(lb, "api"), expect(&[(5001, 1), (5003, 7)]));
        assert_eq!(members(lb, "search"), expect(&[(5101, 1)]));
    }

    // Each step: both balancers (services listed in either order) show the same thing.
    // (what, api's members, search's members) as (port, weight).
    type Step = (&'static str, Vec<(u16, u32)>, Vec<(u16, u32)>);
    let steps: Vec<Step> = vec![
        (
            "delete api/y: api/x's record is the one left",
            vec![(5001, 1), (5003, 1)],
            vec![(5101, 1)],
        ),
        (
            "put api/z: the greatest key now",
            vec![(5001, 1), (5003, 2)],
            vec![(5101, 1)],
        ),
        (
            "put api/w: not the greatest, no change",
            vec![(5001, 1), (5003, 2)],
            vec![(5101, 1)],
        ),
        (
            "delete api/z: api/x wins again",
            vec![(5001, 1), (5003, 1)],
            vec![(5101, 1)],
        ),
        (
            "search changes alone",
            vec![(5001, 1), (5003, 1)],
            vec![(5101, 1), (5102, 4)],
        ),
        (
            "api/x malformed: api/w's record",
            vec![(5001, 1), (5003, 9)],
            vec![(5101, 1), (5102, 4)],
        ),
        (
            "delete api/w: 5003 gone",
            vec![(5001, 1)],
            vec![(5101, 1), (5102, 4)],
        ),
    ];
    for (i, (what, api, search)) in steps.into_iter().enumerate() {
        match i {
            0 => drop(client.delete(key("api", "y"), None).await.unwrap()),
            1 => put(&mut client, "api", "z", &ep(5003, 2)).await,
            2 => put(&mut client, "api", "w", &ep(5003, 9)).await,
            3 => drop(client.delete(key("api", "z"), None).await.unwrap()),
            4 => put(&mut client, "search", "b", &ep(5102, 4)).await,
            5 => drop(client.put(key("api", "x"), "{not json", None).await.unwrap()),
            _ => drop(client.delete(key("api", "w"), None).await.unwrap()),
        }
        for lb in [&f.lb, &g.lb] {
            wait_until(what, Duration::from_secs(5), || {
                members(lb, "api") == expect(&api) && members(lb, "search") == expect(&search)
            })
            .await;
        }
    }
    f.runner.shutdown().await;
    g.runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_read_whose_revision_is_compacted_reads_again_without_degrading() {
    let etcd = etcd_or_skip!();
    let mut client = etcd.client().await;
    let mut expected = Vec::new();
    for batch in 0..20u16 {
        let ops: Vec<etcd_client::TxnOp> = (0..125u16)
            .map(|i| {
                let port = 20_000 + batch * 125 + i;
                expected.push((port, 1));
                etcd_client::TxnOp::put(key("big", &format!("i{port}")), etcd_record(&ep(port, 1)), None)
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    // Compact twice while the source reads 2,500 keys one per page (over a second): the
    // revision of its first page disappears under it.
    let compactor = tokio::spawn({
        let mut client = etcd.client().await;
        async move {
            for delay in [100, 200] {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let revision = client
                    .put("/elsewhere/tick", "x", None)
                    .await
                    .unwrap()
                    .header()
                    .unwrap()
                    .revision();
                client
                    .compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
                    .unwrap();
            }
        }
    });
    let config = EtcdConfig::new([etcd.url()])
        .with_request_timeout(Duration::from_secs(5))
        .with_range_page_size(1);
    let f = follow_with(config, &["big"]).await;
    compactor.await.unwrap();
    let got = members(&f.lb, "big");
    assert!(
        got == expect(&expected),
        "{} members, not the 2,500 written",
        got.len()
    );
    assert!(
        f.stats.compactions() >= 1,
        "the read was compacted under: {:?}",
        f.stats
    );
    assert_eq!(f.stats.full_reads(), 1, "{:?}", f.stats);
    assert_eq!(
        f.runner.stats()[0].degradations,
        0,
        "a compaction is not a store failure"
    );
    f.runner.shutdown().await;
}
