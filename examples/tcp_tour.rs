//! A tour of the core over plain TCP: `cargo run --release --example tcp_tour`.
//! (The main demo, over gRPC, is `examples/demo.rs`.)
//!
//! Starts four real TCP backends on loopback, each answering a request line with its own
//! name, and routes real requests to them through every strategy, with a pool of concurrent
//! client tasks. For each strategy it prints where the requests went, checks every reply came
//! from the backend the balancer picked, and reports pick latency percentiles (the time of
//! the pick itself, not of the request). Then it shows consistent hashing keeping each user
//! on one backend, and a backend being deregistered mid-traffic: once `deregister` returns it
//! gets no new request. Then active health checks (a backend killed and restarted), sticky
//! sessions surviving a drain (rolling deploy) and a backend removal, and a primary/backup
//! failover group in action.
//!
//! Flags: `--requests N` (per strategy, default 4000), `--concurrency C` (default 16),
//! `--serve-metrics ADDR` (serve each strategy's balancer at `http://ADDR/metrics` while it
//! runs, e.g. `127.0.0.1:9464`), `--metrics-file PATH` (write the last strategy's Prometheus
//! exposition, and the connection pool's, there).
//! Logging: `RUST_LOG=tai_loadbalancer=debug cargo run --release --example tcp_tour`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tai_loadbalancer::{
    ConnectionPool, Endpoint, EndpointMetadata, IntegratedLoadBalancer, LatencyHistogram, LoadBalancerConfig,
    LoadBalancingStrategy, Outcome, PoolConfig, ServiceRegistry, TcpConnector,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NAMES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
const WEIGHTS: [u32; 4] = [5, 3, 1, 1];

/// A backend: answers every line with its name (after a short, name-dependent delay so the
/// least-connections strategy has something to see).
async fn backend(name: &'static str, delay: Duration) -> Result<SocketAddr, BoxError> {
    Ok(serve(name, delay, "127.0.0.1:0".parse()?).await?.0)
}

/// Serves `name` on `addr`; aborting the returned task closes the listening socket.
async fn serve(
    name: &'static str,
    delay: Duration,
    addr: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(_request)) = lines.next_line().await {
                    tokio::time::sleep(delay).await;
                    if write.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

/// One request over a fresh connection; returns the name that answered.
async fn request(addr: SocketAddr) -> Result<String, BoxError> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"hello\n").await?;
    let mut reply = String::new();
    BufReader::new(&mut stream).read_line(&mut reply).await?;
    Ok(reply.trim().to_string())
}

/// One request over a pooled connection (kept open and reused); returns the name that
/// answered. A connection that fails is discarded instead of returned.
async fn pooled_request(
    pool: &ConnectionPool<TcpConnector>,
    endpoint: &Endpoint,
) -> Result<String, BoxError> {
    let mut conn = pool.acquire(endpoint).await?;
    let result = async {
        conn.write_all(b"hello\n").await?;
        let mut reply = Vec::with_capacity(16);
        let mut buf = [0u8; 64];
        while !reply.ends_with(b"\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Err::<String, BoxError>("connection closed".into());
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).trim().to_string())
    }
    .await;
    if result.is_err() {
        conn.discard();
    }
    result
}

struct Run {
    per_backend: BTreeMap<String, usize>,
    pick_ns: Histogram<u64>,
    errors: usize,
    mismatches: usize,
}

/// Sends `requests` requests with `concurrency` tasks; `key` gives an optional hash key.
async fn drive(
    lb: &Arc<IntegratedLoadBalancer>,
    pool: &ConnectionPool<TcpConnector>,
    names: &Arc<BTreeMap<SocketAddr, &'static str>>,
    requests: usize,
    concurrency: usize,
    key: Option<fn(usize) -> String>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let run = Arc::new(Mutex::new(Run {
        per_backend: BTreeMap::new(),
        pick_ns: Histogram::new(3).expect("valid histogram"),
        errors: 0,
        mismatches: 0,
    }));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (lb, names, next, run) = (lb.clone(), names.clone(), next.clone(), run.clone());
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let started = Instant::now();
                let pick = match key {
                    Some(key) => lb.pick_with_hash("echo", key(i)),
                    None => lb.pick("echo"),
                };
                let pick_ns = started.elapsed().as_nanos() as u64;
                let Ok(pick) = pick else {
                    run.lock().await.errors += 1;
                    continue;
                };
                let address = pick.address();
                let sent = Instant::now();
                let result = pooled_request(&pool, pick.endpoint()).await;
                let latency = sent.elapsed();
                let mut run = run.lock().await;
                run.pick_ns.record(pick_ns.max(1)).ok();
                match result {
                    Ok(name) => {
                        if names.get(&address).copied() != Some(name.as_str()) {
                            run.mismatches += 1;
                        }
                        *run.per_backend.entry(name).or_default() += 1;
                        drop(run);
                        pick.record(Outcome::Success, Some(latency));
                    }
                    Err(_) => {
                        run.errors += 1;
                        drop(run);
                        pick.record(Outcome::Failure, Some(latency));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task panicked");
    }
    Arc::try_unwrap(run).ok().expect("all tasks joined").into_inner()
}

fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let requests = arg("--requests", 4_000);
    let concurrency = arg("--concurrency", 16).max(1);

    let mut names = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let addr = backend(name, Duration::from_micros(200 * (i as u64 + 1))).await?;
        names.insert(addr, *name);
        endpoints.push(Endpoint::new(
            addr,
            Some(
                EndpointMetadata::new()
                    .with_weight(WEIGHTS[i])
                    .with_tag("name", *name),
            ),
        ));
    }
    let names = Arc::new(names);
    println!(
        "backends: {}",
        names
            .iter()
            .map(|(a, n)| format!("{n}={a}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{requests} requests per strategy, {concurrency} concurrent clients, over pooled TCP connections (at most 8 per backend)\n"
    );
    println!(
        "{:<18} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9}",
        "strategy", NAMES[0], NAMES[1], NAMES[2], NAMES[3], "errors", "pick p50", "pick p99"
    );

    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("echo", endpoints.clone()).await?;
    let pool = ConnectionPool::new(
        PoolConfig {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        TcpConnector::new(),
    )?;
    // Per backend over every strategy: requests, errors, request latency.
    let mut summary: BTreeMap<SocketAddr, (u64, u64, LatencyHistogram)> = BTreeMap::new();
    let metrics_addr = text_arg("--serve-metrics");
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
    ] {
        let lb = Arc::new(
            IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default()).await?,
        );
        lb.start().await?;
        // `--serve-metrics ADDR`: this strategy's balancer at http://ADDR/metrics while it runs.
        let _server = match &metrics_addr {
            Some(addr) => {
                let server = tai_loadbalancer::serve_metrics(addr.parse()?, &lb).await?;
                println!(
                    "  (serving http://{}/metrics during {strategy})",
                    server.local_addr()
                );
                Some(server)
            }
            None => None,
        };
        let run = drive(&lb, &pool, &names, requests, concurrency, None).await;
        for e in &lb.metrics().service("echo").ok_or("no echo service")?.endpoints {
            let row = summary.entry(e.address).or_default();
            row.0 += e.successes + e.failures;
            row.1 += e.failures;
            row.2.merge(&e.latency);
        }
        if let Some(path) = text_arg("--metrics-file") {
            let text =
                tai_loadbalancer::encode_prometheus(&lb) + &tai_loadbalancer::encode_pool_prometheus(&pool);
            std::fs::write(&path, text)?;
        }
        assert_eq!(
            run.mismatches, 0,
            "a reply came from a backend other than the one picked"
        );
        let count = |n: &str| run.per_backend.get(n).copied().unwrap_or(0);
        println!(
            "{:<18} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7}ns {:>7}ns",
            strategy.to_string(),
            count(NAMES[0]),
            count(NAMES[1]),
            count(NAMES[2]),
            count(NAMES[3]),
            run.errors,
            run.pick_ns.value_at_quantile(0.5),
            run.pick_ns.value_at_quantile(0.99),
        );
        lb.stop().await?;
    }
    println!(
        "  weights are 5:3:1:1 (weighted follows them exactly; consistent hash without a key spreads at"
    );
    println!("  random); least connections favours the faster backends; pick latency is measured between");
    println!("  network round trips, so caches are cold (see BENCHMARKS.md for the hot-loop figures)");
    println!("\nrequest metrics per backend (all strategies; lb.metrics(), latency of the round trip):");
    println!(
        "  {:<6} {:>8} {:>7} {:>9} {:>9} {:>9}",
        "", "requests", "errors", "p50", "p99", "max"
    );
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}ms", d.as_secs_f64() * 1e3));
    for (address, (n, errors, latency)) in &summary {
        println!(
            "  {:<6} {:>8} {:>7} {:>9} {:>9} {:>9}",
            names[address],
            n,
            errors,
            ms(latency.p50()),
            ms(latency.p99()),
            ms(latency.max())
        );
    }
    assert_eq!(
        summary.values().map(|r| r.0).sum::<u64>(),
        (requests * 5) as u64,
        "every request counted"
    );
    let totals = pool.totals();
    println!(
        "connection pool: {} connections opened for {} requests ({} open now, {} waits timed out, {} rejected, {} connect errors)",
        totals.created,
        requests * 5,
        totals.open,
        totals.timeouts,
        totals.rejected,
        totals.connect_errors
    );
    for (address, stats) in pool.endpoints() {
        println!(
            "  {:<6} open {} (idle {}), created {}",
            names[&address], stats.open, stats.idle, stats.created
        );
        assert!(stats.open <= 8, "the pool's limit holds");
    }
    println!();

    // Consistent hashing: each of 40 users always lands on the same backend.
    let lb = Arc::new(
        IntegratedLoadBalancer::new(
            registry.clone(),
            LoadBalancingStrategy::ConsistentHash,
            LoadBalancerConfig::default(),
        )
        .await?,
    );
    lb.start().await?;
    let mut owner = BTreeMap::new();
    for round in 0..3 {
        for user in 0..40 {
            let addr = lb
                .next_endpoint_with_hash("echo", format!("user-{user}"))
                .await?
                .address;
            let name = request(addr).await?;
            if round == 0 {
                owner.insert(user, name);
            } else {
                assert_eq!(owner[&user], name, "user-{user} moved");
            }
        }
    }
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for name in owner.values() {
        *per.entry(name).or_default() += 1;
    }
    println!("consistent hash: 40 users x 3 rounds, every user stayed on one backend");
    println!("  users per backend (the ring honours the 5:3:1:1 weights): {per:?}");

    // Deregistration under load: after `deregister` returns, the backend gets no new request.
    let gone = endpoints[0].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let after_removal = Arc::new(AtomicUsize::new(0));
    let removed = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (lb, stop, after_removal, removed) =
            (lb.clone(), stop.clone(), after_removal.clone(), removed.clone());
        let gone = gone.address;
        tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let was_removed = removed.load(Ordering::SeqCst);
                let pick = lb
                    .pick_with_hash("echo", format!("user-{}", sent % 40))
                    .expect("pick");
                if was_removed && pick.address() == gone {
                    after_removal.fetch_add(1, Ordering::SeqCst);
                }
                match request(pick.address()).await {
                    Ok(_) => pick.success(),
                    Err(_) => pick.failure(),
                }
                sent += 1;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    registry.deregister("echo", &gone).await?;
    removed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = traffic.await?;
    println!(
        "deregistered {} under load ({sent} requests): {} picks of it after deregister returned",
        names[&gone.address],
        after_removal.load(Ordering::SeqCst)
    );
    assert_eq!(after_removal.load(Ordering::SeqCst), 0);

    lb.stop().await?;

    // Health checks: a backend dies, is excluded, comes back on the same port, returns.
    health_demo(&registry).await?;

    // Sticky sessions through a drain and a backend removal; a failover group.
    sessions_demo(&registry).await?;
    failover_demo(&registry).await?;

    let metrics = lb.metrics();
    println!(
        "\nconsistent-hash balancer metrics: {} requests, {} succeeded, success rate {:.1}%, {} in flight",
        metrics.total_requests,
        metrics.successful_requests,
        100.0 * metrics.success_rate().unwrap_or(0.0),
        metrics.in_flight
    );
    Ok(())
}

/// TCP health checks every 100 ms: out after 2 failures, back after 2 successes.
fn fast_tcp_checks() -> tai_loadbalancer::HealthCheckConfig {
    tai_loadbalancer::HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        grace_period: Duration::ZERO,
        jitter: Duration::from_millis(10),
        check: tai_loadbalancer::HealthCheckKind::Tcp,
        ..Default::default()
    }
}

/// A fifth backend, "epsilon", joins under active TCP health checks (every 100 ms, out after 2
/// failures, back after 2 successes); it is killed, excluded, restarted on the same port and
/// let back in, while picks continue.
async fn health_demo(registry: &Arc<ServiceRegistry>) -> Result<(), BoxError> {
    let (addr, task) = serve("epsilon", Duration::ZERO, "127.0.0.1:0".parse()?).await?;
    registry.register("checked", Endpoint::new(addr, None)).await?;
    let (other, _other_task) = serve("zeta", Duration::ZERO, "127.0.0.1:0".parse()?).await?;
    registry.register("checked", Endpoint::new(other, None)).await?;
    let config = LoadBalancerConfig {
        health_check: fast_tcp_checks(),
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config).await?;
    lb.start().await?;
    let routable = |lb: &IntegratedLoadBalancer| {
        lb.service("checked")
            .map(|s| s.endpoints().iter().any(|(e, r)| e.address == addr && *r))
            .unwrap_or(false)
    };
    let wait = |want: bool| {
        let lb = &lb;
        async move {
            let start = Instant::now();
            while routable(lb) != want && start.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            start.elapsed()
        }
    };
    println!("\nhealth checks (TCP every 100 ms, out after 2 failures, back after 2 successes):");
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let _ = task.await;
    let out = wait(false).await;
    let picks_to_dead = (0..100)
        .filter(|_| lb.pick("checked").map(|p| p.address() == addr).unwrap_or(false))
        .count();
    println!(
        "  epsilon killed: out of routing after {out:?}; {picks_to_dead} of 100 picks went to it afterwards"
    );
    assert_eq!(picks_to_dead, 0, "a dead backend must be out of routing");
    let (_, revived) = serve("epsilon", Duration::ZERO, addr).await?;
    let back = wait(true).await;
    assert!(routable(&lb), "a restarted backend must come back");
    println!("  epsilon restarted on {addr}: back in routing after {back:?}");
    let status = lb
        .health_checks()
        .get_health_status("checked", &Endpoint::new(addr, None))
        .await?;
    println!(
        "  its status: {:?}, {} checks, {} failed, last error: {}",
        status.state,
        status.checks,
        status.failed_checks,
        status.last_error.as_deref().unwrap_or("-")
    );
    revived.abort();
    lb.stop().await?;
    Ok(())
}

/// Backends answering with their names, on fresh loopback ports.
async fn start_backends(
    list: &[&'static str],
) -> Result<
    (
        BTreeMap<SocketAddr, &'static str>,
        Vec<Endpoint>,
        Vec<tokio::task::JoinHandle<()>>,
    ),
    BoxError,
> {
    let (mut names, mut endpoints, mut tasks) = (BTreeMap::new(), Vec::new(), Vec::new());
    for &name in list {
        let (addr, task) = serve(name, Duration::ZERO, "127.0.0.1:0".parse()?).await?;
        names.insert(addr, name);
        endpoints.push(Endpoint::new(addr, None));
        tasks.push(task);
    }
    Ok((names, endpoints, tasks))
}

/// 60 sticky sessions over three backends: they stick; one backend is drained while a request
/// is in flight on it (new picks avoid it, the drain waits for that request); another is
/// killed and deregistered. Only the sessions of the two leave them, and they stick to their
/// new homes; the others never move.
async fn sessions_demo(registry: &Arc<ServiceRegistry>) -> Result<(), BoxError> {
    use tai_loadbalancer::{AffinityConfig, AffinityStrategy};

    let (_names, endpoints, tasks) = start_backends(&["red", "green", "blue"]).await?;
    registry.register_batch("sessions", endpoints.clone()).await?;
    let config = LoadBalancerConfig {
        affinity: AffinityConfig {
            strategy: AffinityStrategy::Cookie {
                name: "session".into(),
            },
            ttl: Duration::from_secs(600),
            max_entries: 10_000,
        },
        ..Default::default()
    };
    let lb = Arc::new(
        IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config).await?,
    );
    lb.start().await?;

    // Each session's requests carry a `Cookie` header; the balancer keys on its `session`.
    let route = |lb: &IntegratedLoadBalancer, session: usize| {
        let header = format!("theme=dark; session=s{session:03}");
        let request = tai_loadbalancer::AffinityRequest::new().cookie_header(&header);
        let key = lb.affinity().config().strategy.key(&request)?;
        lb.select_with_affinity("sessions", &key)
    };
    let mut home = BTreeMap::new();
    for round in 0..3 {
        for session in 0..60 {
            let endpoint = route(&lb, session)?;
            let name = request(endpoint.address).await?;
            if round == 0 {
                home.insert(session, name);
            } else {
                assert_eq!(home[&session], name, "session {session} moved");
            }
        }
    }
    let count = |home: &BTreeMap<usize, String>, n: &str| home.values().filter(|h| *h == n).count();
    println!(
        "\nsticky sessions (cookie `session`, 60 sessions x 3 rounds): every session stayed on one backend"
    );
    println!(
        "  red {}, green {}, blue {} sessions",
        count(&home, "red"),
        count(&home, "green"),
        count(&home, "blue")
    );

    // Rolling deploy of green: a request is in flight on it while it drains.
    let green = endpoints[1].clone();
    let in_flight = lb.pick("sessions")?;
    let in_flight = if in_flight.address() == green.address {
        in_flight
    } else {
        drop(in_flight);
        loop {
            let p = lb.pick("sessions")?;
            if p.address() == green.address {
                break p;
            }
        }
    };
    let started = Instant::now();
    let drainer = {
        let (lb, green) = (lb.clone(), green.clone());
        tokio::spawn(async move { lb.drain("sessions", &green).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut to_green = 0;
    for session in 0..60 {
        if route(&lb, session)?.address == green.address {
            to_green += 1;
        }
    }
    let held = Duration::from_millis(150);
    tokio::time::sleep(held).await;
    let finished_early = drainer.is_finished();
    request(in_flight.address()).await?;
    in_flight.success();
    let report = drainer.await??;
    println!(
        "  green drained: {to_green} of 60 sessions routed to it while draining; the drain waited \
         {:?} for its in-flight request ({} at start, {} at end, finished early: {finished_early})",
        started.elapsed(),
        report.in_flight_at_start,
        report.in_flight_at_end
    );
    assert_eq!(to_green, 0);
    assert!(!finished_early);

    // Blue dies and is deregistered.
    let blue = endpoints[2].clone();
    tasks[2].abort();
    registry.deregister("sessions", &blue).await?;
    registry.deregister("sessions", &green).await?;
    let mut moved = 0;
    let mut unmoved_kept = true;
    let mut after = BTreeMap::new();
    for round in 0..2 {
        for session in 0..60 {
            let name = request(route(&lb, session)?.address).await?;
            if round == 0 {
                if name != home[&session] {
                    moved += 1;
                }
                if home[&session] == "red" && name != "red" {
                    unmoved_kept = false;
                }
                after.insert(session, name);
            } else {
                assert_eq!(
                    after[&session], name,
                    "a moved session must stick to its new home"
                );
            }
        }
    }
    println!(
        "  green and blue removed: {moved} sessions moved (all of theirs), red's stayed: {unmoved_kept}; \
         moved sessions stuck to their new home for 2 more rounds"
    );
    assert!(unmoved_kept);
    assert_eq!(moved, count(&home, "green") + count(&home, "blue"));
    let stats = lb.affinity().stats();
    println!(
        "  affinity table: {} keys; {} hits ({} of them found a gone backend and moved), {} misses",
        lb.affinity().len(),
        stats.hits,
        stats.moved,
        stats.misses
    );
    lb.stop().await?;
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// A primary/backup group as a service's routing policy, under TCP health checks: the
/// primary takes all traffic; killed, its traffic goes to the first backup; restarted, it
/// takes over again. Then the seed's `FailoverManager` walking the same group by hand.
async fn failover_demo(registry: &Arc<ServiceRegistry>) -> Result<(), BoxError> {
    use tai_loadbalancer::{FailoverConfig, FailoverManager};

    let (names, endpoints, tasks) = start_backends(&["primary", "backup-1", "backup-2"]).await?;
    registry.register_batch("critical", endpoints.clone()).await?;
    let config = LoadBalancerConfig {
        health_check: fast_tcp_checks(),
        ..Default::default()
    };
    let lb = Arc::new(
        IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config).await?,
    );
    lb.start().await?;
    lb.set_failover_group("critical", endpoints[0].clone(), endpoints[1..].to_vec())
        .await?;
    let serve_100 = |lb: Arc<IntegratedLoadBalancer>, names: BTreeMap<SocketAddr, &'static str>| async move {
        let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut errors = 0;
        for _ in 0..100 {
            let pick = lb.pick("critical")?;
            match request(pick.address()).await {
                Ok(_) => {
                    *seen.entry(names[&pick.address()]).or_default() += 1;
                    pick.success();
                }
                Err(_) => {
                    errors += 1;
                    pick.failure();
                }
            }
        }
        Ok::<_, BoxError>((seen, errors))
    };
    println!("\nfailover group (primary, backup-1, backup-2) as the routing policy, TCP health checks:");
    let (seen, errors) = serve_100(lb.clone(), names.clone()).await?;
    println!("  all up:          100 requests -> {seen:?}, {errors} errors");
    assert_eq!(seen.get("primary"), Some(&100));

    let primary = endpoints[0].address;
    tasks[0].abort();
    let start = Instant::now();
    while lb.endpoint_health("critical", primary) == Some(tai_loadbalancer::EndpointHealth::Healthy)
        && start.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (seen, errors) = serve_100(lb.clone(), names.clone()).await?;
    println!(
        "  primary killed:  out after {:?}; 100 requests -> {seen:?}, {errors} errors",
        start.elapsed()
    );
    assert_eq!(seen.get("backup-1"), Some(&100));

    let (_, revived) = serve("primary", Duration::ZERO, primary).await?;
    let start = Instant::now();
    while lb.endpoint_health("critical", primary) != Some(tai_loadbalancer::EndpointHealth::Healthy)
        && start.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (seen, errors) = serve_100(lb.clone(), names.clone()).await?;
    println!(
        "  primary back:    after {:?}; 100 requests -> {seen:?}, {errors} errors",
        start.elapsed()
    );
    assert_eq!(seen.get("primary"), Some(&100));

    // The seed's FailoverManager, with health from the balancer: backup-1 is marked down, so
    // a failover from the primary skips it.
    let manager = FailoverManager::new(FailoverConfig {
        enabled: true,
        max_attempts: 3,
        log_failovers: false,
    })
    .with_health_from(lb.clone());
    manager
        .register("critical", endpoints[0].clone(), endpoints[1..].to_vec())
        .await?;
    lb.mark_down("critical", &endpoints[1]).await?;
    let next = manager.failover("critical", &endpoints[0]).await?;
    let stats = manager.stats("critical")?;
    println!(
        "  FailoverManager: backup-1 marked down, failover from primary -> {} ({} failover, current {})",
        names[&next.address], stats.failovers, names[&stats.current.address]
    );
    assert_eq!(next.address, endpoints[2].address);
    revived.abort();
    lb.stop().await?;
    for task in tasks {
        task.abort();
    }
    Ok(())
}
