//! The main demo: `cargo run --release --example demo`.
//!
//! Starts three real tonic gRPC servers on loopback (the `greeter.v1.Greeter` service of
//! `examples/greeter`, each with the standard `grpc.health.v1` service), one
//! [`BalancedChannel`] in front of them, and a steady concurrent load of unary RPCs through a
//! generated `GreeterClient`. While the load runs it:
//!
//! 1. kills `s1` abruptly (its connections are cut): calls that were on it, or picked it
//!    before the health checks noticed, are retried on another server (`SayHello` is marked
//!    idempotent), so no call fails; the `Watch` health stream takes it out of routing;
//! 2. restarts `s1` on the same port: it returns after passing health checks and ramps up
//!    under slow start (its share is printed every half second);
//! 3. drains `s2` for a rolling deploy (no new calls, calls in flight finish), restarts it
//!    and puts it back;
//! 4. shows sticky sessions: a second channel routes by the `x-user` header, and each user
//!    stays on one server.
//!
//! At the end it prints a per-server table (requests, failed attempts, p50/p99 as the
//! balancer measured them), the health transitions it saw, and the client's view (calls,
//! failures, retries, latency), and writes the Prometheus exposition to a file.
//!
//! Flags: `--duration SECS` (default 10), `--requests N` (total RPCs, default 20000, spread
//! evenly over the duration), `--concurrency C` (callers, default 32), `--strategy NAME`
//! (`round_robin`, `random`, `least_connections` (default), `weighted`, `consistent_hash`,
//! `peak_ewma`),
//! `--metrics-file PATH` (default `target/demo-metrics.prom`), `--serve-metrics ADDR`
//! (serve `/metrics` while it runs, e.g. `127.0.0.1:9464`), `--tls` (the same scenario over
//! mTLS, with `--features tls`: a CA, a certificate per server and a client certificate are
//! made at start, written to a temporary directory and loaded with `TlsFiles::watch`; each
//! server is verified by its own name through its `tls_server_name` tag), `--zones` (a
//! separate scenario: six servers in three zones, zone-aware routing, the local zone's
//! servers killed and restarted; see `examples/demo/zones.rs`).
//! Logging: `RUST_LOG=tai_loadbalancer=debug cargo run --release --example demo`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest, SAY_HELLO_PATH, SERVICE_NAME};
use tai_loadbalancer::{
    BalancedChannel, Endpoint, EndpointHealth, EndpointMetadata, HealthCheckConfig, HealthCheckKind,
    IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, RetryPolicy, ServiceRegistry,
    SlowStartConfig,
};

#[path = "demo/zones.rs"]
mod zones;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SERVICE: &str = "greeter";
const SERVERS: usize = 3;
const STRATEGIES: [LoadBalancingStrategy; 6] = [
    LoadBalancingStrategy::RoundRobin,
    LoadBalancingStrategy::Random,
    LoadBalancingStrategy::LeastConnections,
    LoadBalancingStrategy::Weighted,
    LoadBalancingStrategy::ConsistentHash,
    LoadBalancingStrategy::PeakEwma,
];

struct Args {
    duration: Duration,
    requests: u64,
    concurrency: usize,
    strategy: LoadBalancingStrategy,
    metrics_file: String,
    serve_metrics: Option<SocketAddr>,
    tls: bool,
    zones: bool,
}

impl Args {
    fn parse() -> Result<Self, BoxError> {
        let mut args = Self {
            duration: Duration::from_secs(10),
            requests: 20_000,
            concurrency: 32,
            strategy: LoadBalancingStrategy::LeastConnections,
            metrics_file: "target/demo-metrics.prom".into(),
            serve_metrics: None,
            tls: false,
            zones: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--duration" => {
                    args.duration = Duration::from_secs_f64(value()?.parse::<f64>()?.clamp(1.0, 600.0))
                }
                "--requests" => args.requests = value()?.parse::<u64>()?.max(1),
                "--concurrency" => args.concurrency = value()?.parse::<usize>()?.clamp(1, 4096),
                "--strategy" => {
                    let name = value()?;
                    args.strategy = STRATEGIES
                        .into_iter()
                        .find(|s| s.to_string() == name)
                        .ok_or_else(|| format!("unknown strategy `{name}`; one of {STRATEGIES:?}"))?;
                }
                "--metrics-file" => args.metrics_file = value()?,
                "--serve-metrics" => args.serve_metrics = Some(value()?.parse()?),
                "--zones" => args.zones = true,
                "--tls" if cfg!(feature = "tls") => args.tls = true,
                "--tls" => return Err("--tls needs the `tls` feature: cargo run --release --features tls --example demo -- --tls".into()),
                "--help" | "-h" => {
                    println!(
                        "usage: demo [--duration SECS] [--requests N] [--concurrency C] [--strategy NAME] \
                         [--metrics-file PATH] [--serve-metrics ADDR] [--tls] [--zones]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown flag `{other}` (try --help)").into()),
            }
        }
        Ok(args)
    }
}

/// What the callers saw.
#[derive(Default)]
struct ClientView {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Replies per server name (s0, s1, s2).
    by_server: [AtomicU64; SERVERS],
}

/// Prints above the progress bar (or plainly when there is no terminal to draw it on).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse()?;
    if args.zones {
        return zones::run(&args).await;
    }

    // With --tls: certificates made now, servers requiring client certificates.
    #[cfg(feature = "tls")]
    let tls = if args.tls {
        Some(mtls::DemoTls::generate(SERVERS)?)
    } else {
        None
    };
    #[cfg(not(feature = "tls"))]
    let tls: Option<std::convert::Infallible> = None;

    // Three real gRPC servers on loopback, each with grpc.health.v1.
    let mut servers = (0..SERVERS)
        .map(|i| {
            let name = format!("s{i}");
            match &tls {
                #[cfg(feature = "tls")]
                Some(tls) => GreeterServer::start_tls(&name, tls.server_config(i)),
                #[cfg(not(feature = "tls"))]
                Some(never) => match *never {},
                None => GreeterServer::start(&name),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let addresses: Vec<SocketAddr> = servers.iter().map(GreeterServer::address).collect();
    let name_of = |address: SocketAddr| {
        addresses
            .iter()
            .position(|a| *a == address)
            .map_or_else(|| address.to_string(), |i| format!("s{i}"))
    };

    let registry = Arc::new(ServiceRegistry::new());
    for (i, &address) in addresses.iter().enumerate() {
        let mut metadata = EndpointMetadata::new().with_weight(10).with_zone("local-a");
        if tls.is_some() {
            // Each server presents a certificate for its own name.
            metadata = metadata.with_tag("tls_server_name", format!("s{i}.greeter.demo"));
        }
        registry
            .register(SERVICE, Endpoint::new(address, Some(metadata)))
            .await?;
    }
    let config = LoadBalancerConfig {
        health_check: HealthCheckConfig {
            enabled: true,
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(200),
            unhealthy_threshold: 1,
            healthy_threshold: 2,
            grace_period: Duration::ZERO,
            jitter: Duration::from_millis(25),
            // The Watch stream pushes NOT_SERVING (and a broken stream) at once.
            check: HealthCheckKind::grpc_watch(SERVICE_NAME),
            ..Default::default()
        },
        slow_start: SlowStartConfig {
            window: Duration::from_secs(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let lb = Arc::new(IntegratedLoadBalancer::new(registry.clone(), args.strategy, config).await?);
    let _metrics_server = match args.serve_metrics {
        Some(address) => {
            let server = tai_loadbalancer::serve_metrics(address, &lb).await?;
            println!(
                "serving Prometheus metrics at http://{}/metrics",
                server.local_addr()
            );
            Some(server)
        }
        None => None,
    };

    // One channel for every caller: SayHello is idempotent, so a call that reached a server
    // which then died may be retried elsewhere (calls that never reached one always may).
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut builder = BalancedChannel::builder(lb.clone(), SERVICE)
        .retry(RetryPolicy::default().idempotent_method(SAY_HELLO_PATH))
        .timeout(Duration::from_secs(2));
    #[cfg(feature = "tls")]
    if let Some(tls) = &tls {
        // The service's TLS: the channel's connections and the Watch health checks.
        builder = builder.tls(tls.client.clone());
    }
    let channel = builder.build()?;

    // Started once the service's TLS is set, so no check ever speaks plaintext to a TLS server.
    lb.start().await?;

    println!(
        "tai-loadbalancer gRPC demo: {} servers on loopback ({}), strategy {}, {} callers, {} RPCs over {:?}",
        SERVERS,
        addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.strategy,
        args.concurrency,
        args.requests,
        args.duration
    );

    // Health transitions, as the routing snapshots published them.
    let started = Instant::now();
    let transitions = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let updates = lb.routing_updates();
    let watcher = {
        let transitions = transitions.clone();
        let addresses = addresses.clone();
        // What routing looks like now; the watcher reports changes from there.
        let mut last: BTreeMap<SocketAddr, (EndpointHealth, bool)> = lb
            .service(SERVICE)?
            .endpoints()
            .iter()
            .filter_map(|(e, up)| Some((e.address, (lb.endpoint_health(SERVICE, e.address)?, *up))))
            .collect();
        std::thread::spawn(move || {
            while let Some(update) = updates.next_timeout(Duration::from_secs(120)) {
                if update.removed {
                    return;
                }
                for (address, health) in &update.endpoints {
                    let routable = update.routable.contains(address);
                    let now = (*health, routable);
                    if last.insert(*address, now).is_some_and(|before| before != now) {
                        let name = addresses
                            .iter()
                            .position(|a| a == address)
                            .map_or_else(|| address.to_string(), |i| format!("s{i}"));
                        transitions.lock().unwrap().push(format!(
                            "{:>6.2}s  {name}: {health:?}, {}",
                            started.elapsed().as_secs_f64(),
                            if routable { "routable" } else { "not routable" }
                        ));
                    }
                }
            }
        })
    };

    // The load: `requests` RPCs spread evenly over `duration` by `concurrency` callers.
    let view = Arc::new(ClientView::default());
    let latencies = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let bar = ProgressBar::new(args.requests);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} RPCs  {msg}",
    )?);
    bar.set_message("steady load");
    let next = Arc::new(AtomicU64::new(0));
    let interval = args.duration.as_secs_f64() / args.requests as f64;
    let mut callers = Vec::new();
    for _ in 0..args.concurrency {
        let mut client = GreeterClient::new(channel.clone());
        let (view, latencies, next, bar) = (view.clone(), latencies.clone(), next.clone(), bar.clone());
        let total = args.requests;
        callers.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut failures = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                tokio::time::sleep_until((started + Duration::from_secs_f64(interval * n as f64)).into())
                    .await;
                let request = HelloRequest {
                    name: format!("user{}", n % 1000),
                    delay_ms: 1 + (n % 4) as u32,
                    fail_with: 0,
                };
                let sent = Instant::now();
                match client.say_hello(request).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        let _ = local.record(sent.elapsed().as_micros() as u64);
                        view.ok.fetch_add(1, Ordering::Relaxed);
                        if let Some(i) = reply
                            .server
                            .strip_prefix('s')
                            .and_then(|i| i.parse::<usize>().ok())
                        {
                            view.by_server[i.min(SERVERS - 1)].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(status) => {
                        view.failed.fetch_add(1, Ordering::Relaxed);
                        failures.push(status);
                    }
                }
                bar.inc(1);
            }
            latencies.lock().unwrap().add(&local).expect("same bounds");
            failures
        }));
    }

    // The script, at fixed points of the run.
    let at = |fraction: f64| tokio::time::sleep_until((started + args.duration.mul_f64(fraction)).into());
    at(0.2).await;
    let routable = |address: SocketAddr| {
        lb.service(SERVICE)
            .map(|s| s.endpoints().iter().any(|(e, up)| e.address == address && *up))
            .unwrap_or(false)
    };
    bar.set_message("s1 killed");
    servers[1].kill();
    let killed = Instant::now();
    while routable(addresses[1]) && killed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out_after = killed.elapsed();
    let s1_selections = || {
        lb.metrics()
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .find(|e| e.address == addresses[1])
            .map_or(0, |e| e.selections)
    };
    let s1_picked_at_exclusion = s1_selections();
    say(
        &bar,
        format!(
            "[{:>5.2}s] s1 killed: out of routing after {out_after:.0?} (its Watch stream broke); {} calls failed",
            started.elapsed().as_secs_f64(),
            view.failed.load(Ordering::Relaxed)
        ),
    );

    at(0.4).await;
    let s1_picked_while_out = s1_selections() - s1_picked_at_exclusion;
    bar.set_message("s1 restarted (slow start)");
    servers[1].restart()?;
    let restarted = Instant::now();
    while !routable(addresses[1]) && restarted.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    say(
        &bar,
        format!(
            "[{:>5.2}s] s1 restarted on {}: back in routing after {:.0?} (2 passing checks), ramping up over 2 s; \
         it got {s1_picked_while_out} calls while out",
            started.elapsed().as_secs_f64(),
            addresses[1],
            restarted.elapsed(),
        ),
    );
    let mut ramp = Vec::new();
    let mut previous: Vec<u64> = view.by_server.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now: Vec<u64> = view.by_server.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let delta: Vec<u64> = now.iter().zip(&previous).map(|(n, p)| n - p).collect();
        let total: u64 = delta.iter().sum();
        ramp.push(format!("{:.0}%", 100.0 * delta[1] as f64 / total.max(1) as f64));
        previous = now;
    }
    say(
        &bar,
        format!(
            "[{:>5.2}s] s1's share of calls, per half second since it returned: {} (a fair share is 33%)",
            started.elapsed().as_secs_f64(),
            ramp.join(" → ")
        ),
    );

    at(0.65).await;
    bar.set_message("rolling deploy of s2");
    let s2 = Endpoint::new(addresses[2], None);
    let report = lb.drain(SERVICE, &s2).await?;
    say(
        &bar,
        format!(
            "[{:>5.2}s] s2 drained for a rolling deploy: {report:?}",
            started.elapsed().as_secs_f64()
        ),
    );
    servers[2].kill();
    tokio::time::sleep(Duration::from_millis(300)).await; // deploying the new version
    servers[2].restart()?;
    lb.undrain(SERVICE, &s2).await?;
    let undrained = Instant::now();
    while !routable(addresses[2]) && undrained.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    say(
        &bar,
        format!(
            "[{:>5.2}s] s2 stopped, redeployed, restarted: back in routing after {:.0?} of health checks; {} calls failed",
            started.elapsed().as_secs_f64(),
            undrained.elapsed(),
            view.failed.load(Ordering::Relaxed)
        ),
    );

    at(0.85).await;
    bar.set_message("sticky sessions");
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut sticky = BalancedChannel::builder(lb.clone(), SERVICE).affinity_header("x-user");
    #[cfg(feature = "tls")]
    if let Some(tls) = &tls {
        sticky = sticky.tls(tls.client.clone());
    }
    let sticky = sticky.build()?;
    let mut sessions = Vec::new();
    let mut sticky_calls = 0;
    for user in ["ada", "grace", "linus", "margaret", "ken"] {
        let mut client = GreeterClient::new(sticky.clone());
        let mut seen = BTreeMap::<String, u32>::new();
        for i in 0..20 {
            let mut request = tonic::Request::new(HelloRequest {
                name: format!("{user}-{i}"),
                delay_ms: 0,
                fail_with: 0,
            });
            request.metadata_mut().insert("x-user", user.parse()?);
            *seen
                .entry(client.say_hello(request).await?.into_inner().server)
                .or_default() += 1;
            sticky_calls += 1;
        }
        sessions.push(format!("{user} → {seen:?}"));
        assert_eq!(seen.len(), 1, "sticky session of {user} moved: {seen:?}");
    }
    say(
        &bar,
        format!(
            "[{:>5.2}s] sticky sessions by the x-user header (20 calls each): {}",
            started.elapsed().as_secs_f64(),
            sessions.join(", ")
        ),
    );

    let mut failures = Vec::new();
    for caller in callers {
        failures.extend(caller.await?);
    }
    bar.finish_with_message("done");
    let elapsed = started.elapsed();

    // The per-server table, from the balancer's own metrics.
    let metrics = lb.metrics();
    let service = metrics
        .services
        .iter()
        .find(|s| s.service == SERVICE)
        .ok_or("service missing from metrics")?;
    println!("\nper server (the balancer's view: every attempt, retried ones included):");
    println!(
        "  {:<4} {:<17} {:>9} {:>8} {:>9} {:>9}  {:<10}",
        "", "address", "requests", "errors", "p50", "p99", "health"
    );
    let mut rows: Vec<_> = service.endpoints.iter().collect();
    rows.sort_by_key(|e| name_of(e.address));
    for endpoint in rows {
        let percentile = |p: f64| {
            endpoint
                .latency
                .percentile(p)
                .map_or_else(|| "-".into(), |d| format!("{:.2}ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "  {:<4} {:<17} {:>9} {:>8} {:>9} {:>9}  {:?}",
            name_of(endpoint.address),
            endpoint.address.to_string(),
            endpoint.selections,
            endpoint.failures,
            percentile(50.0),
            percentile(99.0),
            endpoint.health
        );
    }

    println!("\nhealth transitions (as published in routing snapshots):");
    for line in transitions.lock().unwrap().iter() {
        println!("  {line}");
    }

    let latencies = latencies.lock().unwrap().clone();
    let ok = view.ok.load(Ordering::Relaxed);
    let failed = view.failed.load(Ordering::Relaxed);
    let attempts: u64 = service.endpoints.iter().map(|e| e.selections).sum();
    println!(
        "\nclient view: {ok} calls succeeded, {failed} failed, {} attempts retried, in {:.1}s ({:.0} RPC/s); \
         latency p50 {:.2}ms, p99 {:.2}ms, max {:.2}ms",
        attempts.saturating_sub(ok + failed + sticky_calls),
        elapsed.as_secs_f64(),
        (ok + failed) as f64 / elapsed.as_secs_f64(),
        latencies.value_at_quantile(0.5) as f64 / 1e3,
        latencies.value_at_quantile(0.99) as f64 / 1e3,
        latencies.max() as f64 / 1e3,
    );
    println!(
        "replies per server: s0 {}, s1 {}, s2 {}",
        view.by_server[0].load(Ordering::Relaxed),
        view.by_server[1].load(Ordering::Relaxed),
        view.by_server[2].load(Ordering::Relaxed)
    );

    let exposition = tai_loadbalancer::encode_prometheus(&lb);
    if let Some(parent) = std::path::Path::new(&args.metrics_file).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.metrics_file, &exposition)?;
    println!(
        "\nPrometheus exposition ({} lines) written to {}; for example:",
        exposition.lines().count(),
        args.metrics_file
    );
    for line in exposition
        .lines()
        .filter(|l| l.starts_with("tai_lb_requests_total{") || l.starts_with("tai_lb_endpoint_routable{"))
        .take(6)
    {
        println!("  {line}");
    }

    // What the demo promises, checked.
    assert!(
        failures.is_empty(),
        "{} calls failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(ok, args.requests, "every call answered");
    assert!(
        out_after < Duration::from_secs(5),
        "a dead server must leave routing"
    );
    assert_eq!(
        s1_picked_while_out, 0,
        "a server out of routing must get no calls"
    );
    assert_eq!(
        addresses
            .iter()
            .filter_map(|a| lb.in_flight(SERVICE, *a))
            .sum::<u64>(),
        0,
        "no call left in flight"
    );
    #[cfg(feature = "tls")]
    if let Some(tls) = &tls {
        tls.check(&servers, &exposition);
    }
    lb.stop().await?;
    drop(lb);
    let _ = watcher.join();
    let over = if tls.is_some() { " over mTLS" } else { "" };
    println!("\nall checks passed: 0 failed RPCs{over} through a kill, a restart and a rolling deploy");
    Ok(())
}

/// `--tls`: the demo's certificates, made at start.
#[cfg(feature = "tls")]
mod mtls {
    use std::path::PathBuf;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use tai_lb_greeter::GreeterServer;
    use tai_loadbalancer::{ClientTls, TlsFiles};
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};

    use super::BoxError;

    pub(super) struct DemoTls {
        /// The client's settings, reloaded from the files as they change.
        pub(super) client: ClientTls,
        client_der: Vec<u8>,
        ca_pem: String,
        servers: Vec<(String, String)>,
        dir: PathBuf,
    }

    impl DemoTls {
        /// A CA, a certificate for `s{i}.greeter.demo` per server, and a client certificate.
        pub(super) fn generate(servers: usize) -> Result<Self, BoxError> {
            let ca_key = KeyPair::generate()?;
            let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "tai-lb demo CA");
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_pem = ca_params.self_signed(&ca_key)?.pem();
            let ca = Issuer::new(ca_params, ca_key);
            let leaf = |name: &str, usage| -> Result<(String, String, Vec<u8>), BoxError> {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::new(vec![name.to_owned()])?;
                params.distinguished_name.push(DnType::CommonName, name);
                params.extended_key_usages = vec![usage];
                // Valid from a day ago for 90 days, as short-lived certificates are.
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                let epoch = rcgen::date_time_ymd(1970, 1, 1);
                params.not_before = epoch + (now - std::time::Duration::from_secs(86_400));
                params.not_after = epoch + (now + std::time::Duration::from_secs(90 * 86_400));
                let cert = params.signed_by(&key, &ca)?;
                Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
            };
            let servers = (0..servers)
                .map(|i| {
                    leaf(&format!("s{i}.greeter.demo"), ExtendedKeyUsagePurpose::ServerAuth)
                        .map(|(c, k, _)| (c, k))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (cert, key, client_der) = leaf("demo-client", ExtendedKeyUsagePurpose::ClientAuth)?;
            let dir = std::env::temp_dir().join(format!("tai-lb-demo-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("ca.pem"), &ca_pem)?;
            std::fs::write(dir.join("client.pem"), cert)?;
            std::fs::write(dir.join("client.key"), key)?;
            let client = TlsFiles::new()
                .ca_file(dir.join("ca.pem"))
                .identity_files(dir.join("client.pem"), dir.join("client.key"))
                .watch()?;
            let expires = client.stats().client_certificate_expires_in().unwrap_or_default();
            println!(
                "mTLS: certificates made at start in {} (a CA, s0..s{}.greeter.demo, client `demo-client` valid {} more days), \
                 reloaded when they change",
                dir.display(),
                servers.len() - 1,
                expires.as_secs() / 86_400
            );
            Ok(Self {
                client,
                client_der,
                ca_pem,
                servers,
                dir,
            })
        }

        /// Server `i`'s TLS: its certificate, and client certificates of the demo CA required.
        pub(super) fn server_config(&self, i: usize) -> ServerTlsConfig {
            let (cert, key) = &self.servers[i];
            ServerTlsConfig::new()
                .identity(Identity::from_pem(cert, key))
                .client_ca_root(Certificate::from_pem(&self.ca_pem))
        }

        /// Every server served the client's certificate; the expiry metric is exported.
        pub(super) fn check(&self, servers: &[GreeterServer], exposition: &str) {
            for server in servers {
                let calls = server.state().calls_from(&self.client_der);
                assert!(calls > 0, "{} served no call over mTLS", server.name());
            }
            let expiry = exposition
                .lines()
                .find(|l| l.starts_with("tai_lb_tls_client_certificate_expiry_timestamp_seconds{"))
                .expect("the client certificate's expiry is exported");
            println!("mTLS: every server verified its own name and the client certificate; {expiry}");
        }
    }

    impl Drop for DemoTls {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
