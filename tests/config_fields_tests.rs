//! Config that validates must run.
//!
//! * Every field of every section, set alone to any accepted value (its bounds and a few in
//!   between; the others keep their defaults), validates, and a balancer built from it starts
//!   and serves: picks, failures reported (ejections), a drain, an operator mark-down, a
//!   deregistration, metrics and stop. Defaults that depend on another field follow it
//!   (`jitter` is clamped to half the `interval`, the ejection cap to the base time, the pool
//!   minimum to its maximum), so no single field trips another's default.
//! * Values just past each bound are refused, naming the field.
//! * A proptest builds balancers from random combinations of extreme accepted values and
//!   drives the same operations: nothing panics, nothing hangs.
#![cfg(feature = "runtime")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tai_loadbalancer::{
    Endpoint, Error, HealthCheckKind, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    Outcome, RebalanceStrategy, ServiceRegistry,
};

use common::addr;

/// One field per line: `(section, field = value)`. Each is applied alone to the defaults.
const ONE_FIELD: &[(&str, &str)] = &[
    ("", "panic_threshold_percent = 0"),
    ("", "panic_threshold_percent = 100"),
    ("health_check", "enabled = true"),
    ("health_check", "interval = \"1ns\""),
    ("health_check", "interval = \"1ms\""),
    ("health_check", "interval = \"100ms\""),
    ("health_check", "interval = \"1h\""),
    ("health_check", "timeout = \"1ns\""),
    ("health_check", "timeout = \"30s\""),
    ("health_check", "timeout = \"1h\""),
    ("health_check", "unhealthy_threshold = 1"),
    ("health_check", "unhealthy_threshold = 4294967295"),
    ("health_check", "healthy_threshold = 1"),
    ("health_check", "healthy_threshold = 4294967295"),
    ("health_check", "grace_period = \"0s\""),
    ("health_check", "grace_period = \"1day\""),
    ("health_check", "jitter = \"0s\""),
    ("health_check", "jitter = \"1h\""),
    ("health_check", "max_concurrent = 1"),
    ("health_check", "max_concurrent = 65536"),
    ("health_check.check", "kind = \"tcp\""),
    (
        "health_check.check",
        "kind = \"http\"\npath = \"/\"\nexpected_status = \"100-599\"",
    ),
    ("health_check.check", "kind = \"grpc\""),
    ("health_check.check", "kind = \"grpc_watch\"\nservice = \"a.b\""),
    ("outlier_detection", "enabled = true"),
    ("outlier_detection", "consecutive_failures = 1"),
    ("outlier_detection", "consecutive_failures = 4294967295"),
    ("outlier_detection", "base_ejection_time = \"1ns\""),
    ("outlier_detection", "base_ejection_time = \"10m\""),
    ("outlier_detection", "base_ejection_time = \"1day\""),
    ("outlier_detection", "max_ejection_time = \"0s\""),
    ("outlier_detection", "max_ejection_time = \"1day\""),
    ("outlier_detection", "max_ejection_percent = 0"),
    ("outlier_detection", "max_ejection_percent = 100"),
    ("slow_start", "window = \"1ns\""),
    ("slow_start", "window = \"1h\""),
    ("slow_start", "aggression = 1e-9"),
    ("slow_start", "aggression = 1e9"),
    ("slow_start", "min_weight_percent = 1"),
    ("slow_start", "min_weight_percent = 100"),
    ("affinity", "ttl = \"1ns\""),
    ("affinity", "ttl = \"365days\""),
    ("affinity", "max_entries = 1"),
    ("affinity", "max_entries = 50000000"),
    ("affinity.strategy", "kind = \"source_ip\""),
    ("affinity.strategy", "kind = \"cookie\"\nname = \"sid\""),
    ("rebalance.strategy", "kind = \"manual\""),
    ("pool", "min_connections = 0"),
    ("pool", "min_connections = 1000"),
    ("pool", "min_connections = 1000000"),
    ("pool", "max_connections = 1"),
    ("pool", "max_connections = 1000000"),
    ("pool", "acquire_timeout = \"1ns\""),
    ("pool", "acquire_timeout = \"365days\""),
    ("pool", "connect_timeout = \"365days\""),
    ("pool", "idle_timeout = \"1ns\""),
    ("pool", "max_lifetime = \"365days\""),
    ("pool", "max_waiters = 0"),
    ("pool", "max_waiters = 1000000"),
    ("pool", "maintenance_interval = \"1ns\""),
    ("pool", "maintenance_interval = \"365days\""),
    ("consistent_hash", "slots = 1024"),
    ("consistent_hash", "slots = 16777216"),
    ("consistent_hash", "algorithm = \"maglev\""),
    ("consistent_hash", "algorithm = \"ring\""),
    ("consistent_hash", "maglev_table_size = 251"),
    ("consistent_hash", "maglev_table_size = 16777259"),
    ("consistent_hash", "balance_factor = 1.0"),
    ("consistent_hash", "balance_factor = 1.25"),
    ("consistent_hash", "balance_factor = 100.0"),
    ("locality", "mode = \"zone_aware\""),
    ("locality", "mode = \"prefer_local\""),
    ("locality", "mode = \"disabled\""),
    ("locality", "local_zone = \"zone-a\""),
    ("locality", "local_zone_env = \"TAI_LB_SURELY_UNSET_ZONE\""),
    ("locality", "local_region = \"region-1\""),
    ("locality", "local_region_env = \"TAI_LB_SURELY_UNSET_REGION\""),
    ("locality", "min_cluster_size = 1"),
    ("locality", "min_cluster_size = 1000000"),
    ("locality.client_zones", "zone-a = 3"),
    ("priority", "overprovisioning_factor = 1.0"),
    ("priority", "overprovisioning_factor = 1.4"),
    ("priority", "overprovisioning_factor = 100.0"),
    ("subsets", "selectors = [[\"version\"], [\"stage\", \"version\"]]"),
    ("subsets", "fallback = \"no_fallback\""),
    ("subsets", "fallback = \"any_endpoint\""),
    ("subsets", "fallback = \"default_subset\""),
    ("subsets.default_subset", "version = \"v1\""),
    ("subsetting", "subset_size = 0"),
    ("subsetting", "subset_size = 1"),
    ("subsetting", "subset_size = 1000000"),
    ("subsetting", "client_id = 0"),
    ("subsetting", "client_id = 18446744073709551615"),
    ("subsetting", "client_id_env = \"TAI_LB_SURELY_UNSET_ID\""),
    ("control_plane", "max_batch = 1"),
    ("control_plane", "max_batch = 1000000"),
    (
        "control_plane",
        "thread_name = \"a-name-longer-than-linux-shows\"",
    ),
    ("peak_ewma", "decay = \"1ms\""),
    ("peak_ewma", "decay = \"1h\""),
    ("health_events", "buffer = 1"),
    ("health_events", "buffer = 1000000"),
    (
        "health_events",
        "log_path = \"target/tai-lb-config-fields-events.jsonl\"",
    ),
    ("health_events", "log_max_bytes = 4096"),
    ("health_events", "log_max_bytes = 1099511627776"),
    ("health_events", "log_files = 1"),
    ("health_events", "log_files = 1000"),
    ("services.api", "strategy = \"consistent_hash\""),
    ("services.api", "strategy = \"peak_ewma\""),
    ("circuit_breakers", "max_requests = 1"),
    ("circuit_breakers", "max_requests = 4294967295"),
    ("circuit_breakers", "max_pending = 1"),
    ("circuit_breakers", "max_pending = 4294967295"),
    ("circuit_breakers", "max_retries = 1"),
    ("circuit_breakers", "max_retries = 4294967295"),
    ("circuit_breakers", "max_connections_per_endpoint = 1"),
    ("circuit_breakers", "max_connections_per_endpoint = 4294967295"),
    ("services.api.circuit_breakers", "max_requests = 1"),
    ("services.api.circuit_breakers", "max_pending = 4294967295"),
    ("services.api.circuit_breakers", "max_retries = 1"),
    (
        "services.api.circuit_breakers",
        "max_connections_per_endpoint = 1",
    ),
];

/// Values just past a bound: `(section, field = value, the field the error names)`.
const REFUSED: &[(&str, &str, &str)] = &[
    ("", "panic_threshold_percent = 101", "panic_threshold_percent"),
    ("health_check", "interval = \"0s\"", "health_check.interval"),
    ("health_check", "interval = \"1h 1ns\"", "health_check.interval"),
    ("health_check", "timeout = \"0s\"", "health_check.timeout"),
    ("health_check", "timeout = \"1h 1ns\"", "health_check.timeout"),
    ("health_check", "jitter = \"1h 1ns\"", "health_check.jitter"),
    (
        "health_check",
        "grace_period = \"1day 1ns\"",
        "health_check.grace_period",
    ),
    (
        "health_check",
        "max_concurrent = 0",
        "health_check.max_concurrent",
    ),
    (
        "health_check",
        "max_concurrent = 65537",
        "health_check.max_concurrent",
    ),
    (
        "health_check",
        "unhealthy_threshold = 0",
        "health_check.unhealthy_threshold",
    ),
    (
        "outlier_detection",
        "base_ejection_time = \"0s\"",
        "outlier_detection.base_ejection_time",
    ),
    (
        "outlier_detection",
        "base_ejection_time = \"1day 1ns\"",
        "outlier_detection.base_ejection_time",
    ),
    (
        "outlier_detection",
        "max_ejection_time = \"1day 1ns\"",
        "outlier_detection.max_ejection_time",
    ),
    (
        "outlier_detection",
        "max_ejection_percent = 101",
        "outlier_detection.max_ejection_percent",
    ),
    ("slow_start", "window = \"1h 1ns\"", "slow_start.window"),
    ("slow_start", "aggression = 0.0", "slow_start.aggression"),
    (
        "slow_start",
        "min_weight_percent = 0",
        "slow_start.min_weight_percent",
    ),
    ("affinity", "ttl = \"0s\"", "affinity.ttl"),
    ("affinity", "ttl = \"366days\"", "affinity.ttl"),
    ("affinity", "max_entries = 50000001", "affinity.max_entries"),
    ("pool", "max_connections = 0", "pool.max_connections"),
    ("pool", "min_connections = 1000001", "pool.min_connections"),
    ("pool", "idle_timeout = \"366days\"", "pool.idle_timeout"),
    ("consistent_hash", "slots = 2048000", "consistent_hash.slots"),
    (
        "consistent_hash",
        "maglev_table_size = 65536",
        "consistent_hash.maglev_table_size",
    ),
    (
        "consistent_hash",
        "balance_factor = 0.99",
        "consistent_hash.balance_factor",
    ),
    ("locality", "min_cluster_size = 0", "locality.min_cluster_size"),
    ("locality", "local_zone = \"\"", "locality.local_zone"),
    (
        "priority",
        "overprovisioning_factor = 0.5",
        "priority.overprovisioning_factor",
    ),
    ("subsets", "selectors = [[]]", "subsets.selectors"),
    ("subsetting", "subset_size = 1000001", "subsetting.subset_size"),
    ("control_plane", "max_batch = 0", "control_plane.max_batch"),
    ("peak_ewma", "decay = \"1h 1ns\"", "peak_ewma.decay"),
    (
        "circuit_breakers",
        "max_requests = 0",
        "circuit_breakers.max_requests",
    ),
    (
        "circuit_breakers",
        "max_pending = 0",
        "circuit_breakers.max_pending",
    ),
    (
        "circuit_breakers",
        "max_retries = 0",
        "circuit_breakers.max_retries",
    ),
    (
        "circuit_breakers",
        "max_connections_per_endpoint = 0",
        "circuit_breakers.max_connections_per_endpoint",
    ),
    (
        "services.api.circuit_breakers",
        "max_requests = 0",
        "services.api.circuit_breakers.max_requests",
    ),
    ("health_events", "buffer = 0", "health_events.buffer"),
    ("health_events", "buffer = 1000001", "health_events.buffer"),
    ("health_events", "log_path = \"\"", "health_events.log_path"),
    (
        "health_events",
        "log_max_bytes = 4095",
        "health_events.log_max_bytes",
    ),
    (
        "health_events",
        "log_max_bytes = 1099511627777",
        "health_events.log_max_bytes",
    ),
    ("health_events", "log_files = 0", "health_events.log_files"),
    ("health_events", "log_files = 1001", "health_events.log_files"),
];

fn toml_for(section: &str, line: &str) -> String {
    if section.is_empty() {
        format!("{line}\n")
    } else {
        format!("[{section}]\n{line}\n")
    }
}

/// Builds a balancer from `config` over three loopback endpoints that nothing serves, and
/// drives what a config can influence. Every step must succeed or fail with a typed error.
async fn exercise(config: LoadBalancerConfig, strategy: LoadBalancingStrategy) {
    let registry = Arc::new(ServiceRegistry::new());
    let endpoints: Vec<Endpoint> = (0..3).map(|i| Endpoint::new(addr(40 + i), None)).collect();
    registry.register_batch("api", endpoints.clone()).await.unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
        .await
        .expect("a validated config constructs");
    lb.start().await.expect("a validated config starts");
    for i in 0..20u64 {
        match lb.pick_with_hash("api", i.to_le_bytes()) {
            Ok(pick) => pick.record(Outcome::Failure, Some(Duration::from_millis(1))),
            Err(Error::NoHealthyEndpoints { .. }) => {}
            Err(e) => panic!("unexpected pick error: {e}"),
        }
        if let Ok(endpoint) = lb.select("api") {
            lb.record_result("api", &endpoint, Outcome::Failure, None)
                .or_else(|e| match e {
                    Error::UnknownEndpoint { .. } => Ok(()),
                    e => Err(e),
                })
                .unwrap();
        }
    }
    let _ = lb.next_endpoint_with_affinity("api", "user-1").await;
    let report = tokio::time::timeout(Duration::from_secs(10), lb.drain("api", &endpoints[0]))
        .await
        .expect("a drain with nothing in flight ends at once")
        .unwrap();
    assert_eq!(report.in_flight_at_end, 0);
    lb.mark_down("api", &endpoints[1]).await.unwrap();
    lb.mark_up("api", &endpoints[1]).await.unwrap();
    registry.deregister("api", &endpoints[2]).await.unwrap();
    let metrics = lb.metrics();
    assert!(metrics.service("api").is_some());
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_one_field_alone_validates_and_runs() {
    for &(section, line) in ONE_FIELD {
        let text = toml_for(section, line);
        let config = LoadBalancerConfig::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{section}: {line} alone was refused: {e}"));
        exercise(config.clone(), LoadBalancingStrategy::LeastConnections).await;
        // With its section switched on, so the value is used and not just stored.
        let enabled = match section {
            "health_check" | "health_check.check" => Some("[health_check]\nenabled = true\n"),
            "outlier_detection" => Some("[outlier_detection]\nenabled = true\n"),
            _ => None,
        };
        if let Some(enabled) = enabled.filter(|_| !line.starts_with("enabled")) {
            let text = if section == "health_check.check" {
                format!("{enabled}{text}")
            } else {
                format!("{enabled}{}", line.to_owned() + "\n")
            };
            let config = LoadBalancerConfig::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("{text} was refused: {e}"));
            exercise(config, LoadBalancingStrategy::PeakEwma).await;
        }
    }
}

#[test]
fn the_gradual_strategy_takes_any_one_field_alone() {
    let base = || match RebalanceStrategy::gradual(Duration::from_secs(5)) {
        RebalanceStrategy::Gradual {
            drain_timeout,
            batch_size,
            batch_interval,
        } => (drain_timeout, batch_size, batch_interval),
        other => panic!("{other:?}"),
    };
    let (d, s, i) = base();
    let variants = [
        (Duration::from_nanos(1), s, i),
        (Duration::from_secs(24 * 3600), s, i),
        (d, 1, i),
        (d, usize::MAX, i),
        (d, s, Duration::from_nanos(1)),
        (d, s, Duration::from_secs(3600)),
    ];
    for (drain_timeout, batch_size, batch_interval) in variants {
        let mut config = LoadBalancerConfig::default();
        config.rebalance.strategy = RebalanceStrategy::Gradual {
            drain_timeout,
            batch_size,
            batch_interval,
        };
        config.validate().unwrap();
        common::rt().block_on(exercise(config, LoadBalancingStrategy::RoundRobin));
    }
    for (drain_timeout, batch_interval, field) in [
        (
            Duration::from_secs(24 * 3600 + 1),
            i,
            "rebalance.strategy.drain_timeout",
        ),
        (Duration::MAX, i, "rebalance.strategy.drain_timeout"),
        (d, Duration::from_secs(3601), "rebalance.strategy.batch_interval"),
    ] {
        let mut config = LoadBalancerConfig::default();
        config.rebalance.strategy = RebalanceStrategy::Gradual {
            drain_timeout,
            batch_size: s,
            batch_interval,
        };
        match config.validate() {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn values_past_a_bound_are_refused_naming_the_field() {
    for &(section, line, field) in REFUSED {
        let text = toml_for(section, line);
        match LoadBalancerConfig::from_toml_str(&text) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: expected an error naming {field}, got {other:?}"),
        }
    }
}

/// A value from a short list that favours the bounds.
fn pick<T: Clone + std::fmt::Debug + 'static>(values: Vec<T>) -> impl Strategy<Value = T> {
    proptest::sample::select(values)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

prop_compose! {
    fn extreme_config()(
        interval in pick(vec![Duration::from_nanos(1), Duration::from_millis(5), secs(3600)]),
        timeout in pick(vec![Duration::from_nanos(1), Duration::from_millis(50), secs(3600)]),
        jitter in pick(vec![Duration::ZERO, secs(3600)]),
        grace in pick(vec![Duration::ZERO, secs(86_400)]),
        thresholds in pick(vec![1u32, 2, u32::MAX]),
        concurrent in pick(vec![1usize, 65_536]),
        checks_on in any::<bool>(),
        od_on in any::<bool>(),
        failures in pick(vec![1u32, 3, u32::MAX]),
        base in pick(vec![Duration::from_nanos(1), Duration::from_millis(20), secs(86_400)]),
        max in pick(vec![Duration::ZERO, secs(86_400)]),
        percent in pick(vec![0u32, 34, 100]),
        window in pick(vec![Duration::ZERO, Duration::from_nanos(1), secs(3600)]),
        aggression in pick(vec![1e-9f64, 1.0, 1e9]),
        min_weight in pick(vec![1u32, 100]),
        panic in pick(vec![0u32, 50, 100]),
        gradual in any::<bool>(),
        drain in pick(vec![Duration::from_nanos(1), secs(86_400)]),
        batch in pick(vec![1usize, usize::MAX]),
        batch_interval in pick(vec![Duration::from_nanos(1), secs(3600)]),
        decay in pick(vec![Duration::from_millis(1), secs(3600)]),
        max_batch in pick(vec![1usize, 1_000_000]),
        breaker in pick(vec![None, Some(1u32), Some(u32::MAX)]),
    ) -> LoadBalancerConfig {
        let mut c = LoadBalancerConfig::default();
        c.health_check.enabled = checks_on;
        c.health_check.interval = interval;
        c.health_check.timeout = timeout;
        c.health_check.jitter = jitter;
        c.health_check.grace_period = grace;
        c.health_check.unhealthy_threshold = thresholds;
        c.health_check.healthy_threshold = thresholds;
        c.health_check.max_concurrent = concurrent;
        c.health_check.check = HealthCheckKind::Tcp;
        c.outlier_detection.enabled = od_on;
        c.outlier_detection.consecutive_failures = failures;
        c.outlier_detection.base_ejection_time = base;
        c.outlier_detection.max_ejection_time = max;
        c.outlier_detection.max_ejection_percent = percent;
        c.slow_start.window = window;
        c.slow_start.aggression = aggression;
        c.slow_start.min_weight_percent = min_weight;
        c.panic_threshold_percent = panic;
        if gradual {
            c.rebalance.strategy = RebalanceStrategy::Gradual {
                drain_timeout: drain,
                batch_size: batch,
                batch_interval,
            };
        }
        c.peak_ewma.decay = decay;
        c.control_plane.max_batch = max_batch;
        c.circuit_breakers = tai_loadbalancer::CircuitBreakerConfig {
            max_requests: breaker,
            max_pending: breaker,
            max_retries: breaker,
            max_connections_per_endpoint: breaker,
        };
        c
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn combinations_of_extreme_values_run(config in extreme_config(), strategy in pick(vec![
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancingStrategy::PeakEwma,
    ])) {
        prop_assert!(config.validate().is_ok(), "{:?}", config.validate());
        common::rt().block_on(exercise(config, strategy));
    }
}
