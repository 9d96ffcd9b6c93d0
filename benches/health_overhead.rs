//! What active health checking costs: pick latency while 1,000 endpoints are being checked
//! every 100 ms, against the same picks with no checker running, in the same run; and the CPU
//! time of checking 1,000 endpoints once per second.
//!
//! Every endpoint is a real TCP listener on 127.0.0.1 (each check is a full connect + accept +
//! close). Checks run on a one-worker tokio runtime, as in a service that shares its runtime;
//! picks run on the bench thread.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use tai_loadbalancer::{
    Endpoint, HealthCheckConfig, HealthCheckKind, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, ServiceRegistry,
};

const N: usize = 1_000;

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 10 ms ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn checks(interval: Duration) -> HealthCheckConfig {
    HealthCheckConfig {
        enabled: true,
        interval,
        timeout: Duration::from_millis(50),
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        grace_period: Duration::ZERO,
        jitter: interval / 10,
        max_concurrent: 64,
        check: HealthCheckKind::Tcp,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { N } else { 16 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let endpoints: Vec<Endpoint> = rt.block_on(async {
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a loopback listener");
            endpoints.push(Endpoint::new(listener.local_addr().unwrap(), None));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            });
        }
        endpoints
    });
    let registry = Arc::new(ServiceRegistry::new());
    rt.block_on(registry.register_batch("svc", endpoints)).unwrap();
    let balancer = |health_check: HealthCheckConfig| {
        let config = LoadBalancerConfig {
            health_check,
            ..Default::default()
        };
        rt.block_on(async {
            let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::Random, config)
                .await
                .unwrap();
            lb.start().await.unwrap();
            lb
        })
    };

    // CPU cost of checking every endpoint once per second.
    if full {
        let lb = balancer(checks(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_secs(2)); // first checks spread over one interval
        let (cpu0, wall0) = (cpu_time(), Instant::now());
        std::thread::sleep(Duration::from_secs(5));
        let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
        let checks: u64 = lb
            .metrics()
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter_map(|e| e.health_check.as_ref().map(|h| h.checks))
            .sum();
        println!(
            "health_overhead/cpu: {n} endpoints checked every 1 s: {:.1} % of one core ({:.1} us of CPU per check; {checks} checks so far)",
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / (n as f64 * wall.as_secs_f64()),
        );
        rt.block_on(lb.stop()).unwrap();
    }

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = c.benchmark_group("health_overhead");
    for (label, config) in [
        ("no_checks", HealthCheckConfig::default()),
        ("checks_every_100ms", checks(Duration::from_millis(100))),
    ] {
        let lb = balancer(config);
        let handle = lb.service("svc").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        group.bench_function(BenchmarkId::new("pick_random", label), |b| {
            b.iter(|| black_box(handle.pick().unwrap().address()))
        });
        rt.block_on(lb.stop()).unwrap();
    }
    group.finish();
    c.final_summary();
}
