//! `--zones`: zone-aware routing across real processes' worth of servers.
//!
//! Six greeter servers in three zones (`a`, `b`, `c`, two each); the demo's balancer is in
//! zone `a` with `[locality] mode = "zone_aware"` and gRPC `Watch` health checks. Callers send
//! a steady load through one `BalancedChannel` while the scenario
//!
//! 1. measures the local share with every zone healthy (all of it stays in `a`);
//! 2. kills `a0`: zone `a` keeps 1 of the 5 healthy servers (20 % of the capacity) for a third
//!    of the callers, so it takes 60 % of this balancer's calls and the rest spills to `b`
//!    and `c` (Envoy's algorithm);
//! 3. kills `a1`: zone `a` has no healthy server: calls spread over `b` and `c`;
//! 4. restarts both: after two passing checks, the calls come back to `a`.
//!
//! Each phase prints the share of calls each zone answered (the client's view) and the
//! balancer's `local_pick_share`, and the demo exits non-zero if a share is off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest, SAY_HELLO_PATH, SERVICE_NAME};
use tai_loadbalancer::{
    BalancedChannel, Endpoint, EndpointMetadata, HealthCheckConfig, HealthCheckKind, IntegratedLoadBalancer,
    LoadBalancerConfig, LocalityMode, RetryPolicy, ServiceRegistry,
};

use super::{Args, BoxError, SERVICE};

const ZONES: [&str; 3] = ["a", "b", "c"];

/// Replies per server (index `2 × zone + k`).
struct Counts([AtomicU64; 6]);

impl Counts {
    fn snapshot(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Per-zone shares of the replies between two snapshots.
fn zone_shares(before: &[u64; 6], after: &[u64; 6]) -> [f64; 3] {
    let delta: Vec<u64> = (0..6).map(|i| after[i] - before[i]).collect();
    let total: u64 = delta.iter().sum::<u64>().max(1);
    std::array::from_fn(|z| (delta[2 * z] + delta[2 * z + 1]) as f64 / total as f64)
}

pub(super) async fn run(args: &Args) -> Result<(), BoxError> {
    let mut servers: Vec<GreeterServer> = (0..6)
        .map(|i| GreeterServer::start(&format!("{}{}", ZONES[i / 2], i % 2)))
        .collect::<Result<_, _>>()?;
    let registry = Arc::new(ServiceRegistry::new());
    for (i, server) in servers.iter().enumerate() {
        let meta = EndpointMetadata::new()
            .with_zone(ZONES[i / 2])
            .with_region("demo");
        registry
            .register(SERVICE, Endpoint::new(server.address(), Some(meta)))
            .await?;
    }
    let mut config = LoadBalancerConfig {
        health_check: HealthCheckConfig {
            enabled: true,
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(200),
            unhealthy_threshold: 1,
            healthy_threshold: 2,
            grace_period: Duration::ZERO,
            jitter: Duration::from_millis(25),
            check: HealthCheckKind::grpc_watch(SERVICE_NAME),
            ..Default::default()
        },
        ..Default::default()
    };
    config.locality.mode = LocalityMode::ZoneAware;
    config.locality.local_zone = Some("a".into());
    let lb = Arc::new(IntegratedLoadBalancer::new(registry, args.strategy, config).await?);
    lb.start().await?;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .retry(RetryPolicy::default().idempotent_method(SAY_HELLO_PATH))
        .timeout(Duration::from_secs(2))
        .build()?;
    println!(
        "tai-loadbalancer zone-aware demo: 6 servers in zones a, b, c (two each) on loopback; this \
         balancer is in zone a; strategy {}, {} callers",
        args.strategy,
        args.concurrency.min(16)
    );

    // The load: callers in a loop until told to stop.
    let counts = Arc::new(Counts(Default::default()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let names: Vec<String> = servers.iter().map(|s| s.name().to_owned()).collect();
    let mut callers = Vec::new();
    for _ in 0..args.concurrency.min(16) {
        let (mut client, counts, failed, stop, names) = (
            GreeterClient::new(channel.clone()),
            counts.clone(),
            failed.clone(),
            stop.clone(),
            names.clone(),
        );
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = HelloRequest {
                    name: "zones".into(),
                    delay_ms: 1,
                    ..Default::default()
                };
                match client.say_hello(request).await {
                    Ok(reply) => {
                        let server = reply.into_inner().server;
                        if let Some(i) = names.iter().position(|n| *n == server) {
                            counts.0[i].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let routable = |lb: &IntegratedLoadBalancer, address| {
        lb.service(SERVICE)
            .map(|s| s.endpoints().iter().any(|(e, r)| e.address == address && *r))
            .unwrap_or(false)
    };
    let wait_until = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            if Instant::now() > deadline {
                return Err(format!("not within 10 s: {what}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    };
    let mut problems = Vec::new();
    let mut measure = |label: &str, expected_local: (f64, f64), shares_at: &[u64; 6], now: &[u64; 6]| {
        let shares = zone_shares(shares_at, now);
        let metrics = lb.metrics();
        let share = metrics
            .service(SERVICE)
            .and_then(|s| s.local_pick_share)
            .unwrap_or(0.0);
        println!(
            "[{:5.2}s] {label:<34} local share {:5.1}% (zone a {:5.1}%, b {:5.1}%, c {:5.1}%); balancer's cumulative local_pick_share {:5.1}%",
            started.elapsed().as_secs_f64(),
            shares[0] * 100.0,
            shares[0] * 100.0,
            shares[1] * 100.0,
            shares[2] * 100.0,
            share * 100.0,
        );
        if shares[0] < expected_local.0 || shares[0] > expected_local.1 {
            problems.push(format!(
                "{label}: local share {:.1}% not in {:.0}..={:.0}%",
                shares[0] * 100.0,
                expected_local.0 * 100.0,
                expected_local.1 * 100.0
            ));
        }
    };
    let phase = Duration::from_millis(1_500);

    // 1. Every zone healthy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = counts.snapshot();
    tokio::time::sleep(phase).await;
    measure("before: every zone healthy", (0.95, 1.0), &t, &counts.snapshot());

    // 2. One of the two local servers dies.
    servers[0].kill();
    let a0 = servers[0].address();
    let lb2 = lb.clone();
    wait_until("a0 out of routing", Box::new(move || !routable(&lb2, a0))).await?;
    let t = counts.snapshot();
    tokio::time::sleep(phase).await;
    measure("a0 killed: zone a at 1 of 2", (0.5, 0.7), &t, &counts.snapshot());

    // 3. The other one too.
    servers[1].kill();
    let a1 = servers[1].address();
    let lb2 = lb.clone();
    wait_until("a1 out of routing", Box::new(move || !routable(&lb2, a1))).await?;
    let t = counts.snapshot();
    tokio::time::sleep(phase).await;
    measure("a1 killed: zone a down", (0.0, 0.0), &t, &counts.snapshot());

    // 4. Both come back.
    servers[0].restart()?;
    servers[1].restart()?;
    let lb2 = lb.clone();
    wait_until(
        "a0 and a1 back in routing",
        Box::new(move || routable(&lb2, a0) && routable(&lb2, a1)),
    )
    .await?;
    let t = counts.snapshot();
    tokio::time::sleep(phase).await;
    measure(
        "a0, a1 restarted: zone a back",
        (0.95, 1.0),
        &t,
        &counts.snapshot(),
    );

    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await?;
    }
    let total: u64 = counts.snapshot().iter().sum();
    println!(
        "calls: {total} answered, {} failed (calls on a killed server are retried elsewhere)",
        failed.load(Ordering::Relaxed)
    );
    lb.stop().await?;
    if problems.is_empty() {
        println!("all checks passed: traffic stayed local, spilled by capacity, and came back");
        Ok(())
    } else {
        Err(problems.join("; ").into())
    }
}
