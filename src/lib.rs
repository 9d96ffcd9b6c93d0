#![doc = include_str!("../README.md")]
//!
//! # Crate layout
//!
//! | path | role |
//! |---|---|
//! | [`endpoint`](crate::Endpoint), `registry` | membership: what exists (control-plane state) |
//! | `table`, `pick`, `balancer` | the read path: snapshots, strategies, [`Pick`] guards |
//! | `control` | the write path: command queue, coalescing, rebuild and publish |
//! | `discovery` | sources of membership (`FileDiscovery`, `DnsDiscovery`, `EtcdDiscovery`, your own `Discovery`) feeding a registry through a `DiscoveryRunner` (feature `runtime`) |
//! | `config`, `stats`, `error` | configuration, counters snapshot, errors |
//! | `events` | the health event log: [`HealthEvent`]s, the [`HealthEvents`] stream, the JSON-lines file sink |
//! | `tls` | TLS settings of a service (`ClientTls`, files reloaded as they change), `TlsConnector` for pools, handshake errors in words (feature `tls`) |
//! | `sync` | the one door to atomics, `Arc`, locks, threads and entropy (loom-swappable) |
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(tai_loadbalancer_loom, allow(dead_code, unreachable_pub))]

#[cfg(all(tai_loadbalancer_loom, not(feature = "loom")))]
compile_error!("`--cfg tai_loadbalancer_loom` needs `--features loom` (see loom-tests/README.md)");

mod affinity;
mod balancer;
mod breaker;
mod config;
mod control;
#[cfg(feature = "runtime")]
mod discovery;
pub mod docs;
mod endpoint;
mod error;
mod events;
mod export;
mod failover;
#[cfg(feature = "grpc")]
mod grpc;
mod handoff;
mod health;
mod histogram;
mod pick;
mod pool;
mod rebalance;
mod registry;
mod stats;
mod sync;
mod table;
#[cfg(feature = "tls")]
mod tls;

pub use affinity::AffinityManager;
pub use balancer::{IntegratedLoadBalancer, RoutingUpdates, ServiceHandle};
pub use config::affinity::{
    AffinityConfig, AffinityRequest, AffinityStrategy, MAX_AFFINITY_ENTRIES, MAX_AFFINITY_KEY_LEN,
    MAX_AFFINITY_TTL, cookie_value,
};
pub use config::circuit_breakers::CircuitBreakerConfig;
pub use config::health::{
    HealthCheck, HealthCheckConfig, HealthCheckKind, MAX_CHECK_DURATION, MAX_CONCURRENT_CHECKS,
    MAX_EJECTION_TIME, OutlierDetectionConfig, SlowStartConfig, StatusRange,
};
pub use config::locality::{
    LocalityConfig, LocalityMode, MAX_MIN_CLUSTER_SIZE, MAX_SUBSET_KEYS, MAX_SUBSET_SELECTORS,
    MAX_SUBSET_SIZE, PriorityConfig, SubsetConfig, SubsetFallback, SubsettingConfig,
};
pub use config::pool::{MAX_POOL_SIZE, PoolConfig};
pub use config::rebalance::{
    DEFAULT_DRAIN_TIMEOUT, MAX_BATCH_INTERVAL, MAX_DRAIN_TIMEOUT, RebalanceConfig, RebalanceStrategy,
};
pub use config::strategy::LoadBalancingStrategy;
pub use config::{
    ConsistentHashConfig, ControlPlaneConfig, DEFAULT_MAGLEV_TABLE_SIZE, HashAlgorithm, HealthEventsConfig,
    LoadBalancerConfig, MAX_BALANCE_FACTOR, MAX_EVENT_LOG_BYTES, MAX_HASH_SLOTS, MAX_MAGLEV_TABLE_SIZE,
    MIN_EVENT_LOG_FILE_BYTES, MIN_HASH_SLOTS, MIN_MAGLEV_TABLE_SIZE, PeakEwmaConfig, ServiceConfig,
};
#[cfg(feature = "runtime")]
pub use discovery::{
    DEFAULT_FILE_POLL_INTERVAL, Discovery, DiscoveryRunner, DiscoverySink, FileDiscovery, MembershipUpdate,
    SourceHealth, SourceStats, parse_services_toml,
};
#[cfg(feature = "etcd")]
pub use discovery::{
    DEFAULT_LEASE_TTL, DEFAULT_RANGE_PAGE_SIZE, DEFAULT_ROOT, EtcdConfig, EtcdDiscovery, EtcdDiscoveryStats,
    EtcdRegistration, etcd_record,
};
#[cfg(feature = "dns")]
pub use discovery::{DnsConfig, DnsDiscovery, DnsTarget, DnsTargetKind};
pub use endpoint::{
    Endpoint, EndpointMetadata, HASH_KEY_TAG, MAX_PRIORITY, MAX_SERVICE_NAME_LEN, MAX_WEIGHT,
};
pub use error::{CircuitLimit, Error};
/// `etcd-client`, re-exported so a client of the same version is at hand (to write records,
/// or to pass [`ConnectOptions`](etcd_client::ConnectOptions) to [`EtcdConfig`]).
#[cfg(feature = "etcd")]
pub use etcd_client;
pub use events::{HealthEvent, HealthEventKind, HealthEvents, MAX_REASON_LEN};
#[cfg(feature = "metrics")]
pub use export::MetricsFacadeExporter;
#[cfg(feature = "opentelemetry")]
pub use export::OtelMetrics;
pub use export::{LATENCY_BUCKETS_SECONDS, MetricsExporter};
#[cfg(feature = "metrics-server")]
pub use export::{MetricsServer, serve_metrics};
#[cfg(feature = "prometheus")]
pub use export::{PrometheusCollector, encode_prometheus, encode_prometheus_snapshot};
#[cfg(all(feature = "prometheus", feature = "runtime"))]
pub use export::{encode_discovery_prometheus, encode_pool_prometheus};
pub use failover::{FailoverConfig, FailoverManager, FailoverStats};
#[cfg(feature = "grpc")]
pub use grpc::{
    BalancedBody, BalancedChannel, BalancedChannelBuilder, BoxError, DEFAULT_MAX_STREAMS_PER_CONNECTION,
    Idempotent, KeyExtractorFn, MAX_ATTEMPTS, MAX_CONNECTIONS_PER_ENDPOINT, RequestHash, ResponseFuture,
    RetryPolicy,
};
#[cfg(feature = "runtime")]
pub use health::HealthCheckManager;
pub use histogram::LatencyHistogram;
pub use pick::jump::jump_hash;
pub use pick::{Outcome, Pick};
#[cfg(feature = "grpc")]
pub use pool::GrpcConnector;
pub use pool::PoolStats;
#[cfg(feature = "tls")]
pub use pool::TlsConnector;
#[cfg(feature = "runtime")]
pub use pool::{ConnectionPool, Connector, PooledConnection, TcpConnector};
/// `prometheus-client`, re-exported so a registry of the same version is at hand.
#[cfg(feature = "prometheus")]
pub use prometheus_client;
#[cfg(feature = "runtime")]
pub use rebalance::{RebalanceEvents, RebalanceManager};
pub use registry::ServiceRegistry;
pub use stats::{
    AffinityStats, CircuitBreakerMetrics, DrainReport, EndpointHealth, EndpointMetrics, HealthState,
    HealthStatus, LoadBalancerMetrics, RebalanceEvent, RebalanceTrigger, ReleasedEndpoint, RoutingUpdate,
    ServiceMetrics,
};
pub use table::estimate::FAILED_PROBE_ESTIMATE;
pub use table::ring::{FALLBACK_PROBES, MAX_VIRTUAL_MEMBERS, hash_key};
#[cfg(feature = "tls")]
pub use tls::{ClientTls, DEFAULT_TLS_POLL_INTERVAL, TLS_SERVER_NAME_TAG, TlsFiles, TlsStats, TlsStream};

/// Internal hooks for `loom-tests/`. Not public API: absent from normal builds, outside
/// semver.
#[cfg(tai_loadbalancer_loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::loom_hooks::*;
}

#[cfg(tai_loadbalancer_loom)]
mod loom_hooks;

/// Internal hooks for `fuzz/`. Not public API: only built under `cfg(fuzzing)`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::affinity::FuzzAffinity as Affinity;
    pub use crate::pick::{MAX_BOUNDED_WALK, bounded_walk};
    pub use crate::table::maglev::FuzzMaglev as Maglev;
    pub use crate::table::plan::{
        LevelHealth, prefer_local_step, priority_loads, total_health, zone_aware_shares,
    };
    pub use crate::table::ring::FuzzRing as Ring;
}
