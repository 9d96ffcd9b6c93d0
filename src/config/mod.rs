//! Configuration: plain data with defaults, loaded from TOML and validated in one place.
//!
//! This module owns [`LoadBalancerConfig`] and its sections. Every field has a default, so a
//! config file only names what it changes; unknown fields are errors (a typo is a parse error
//! naming the field, not a silently ignored setting). [`LoadBalancerConfig::validate`] is the
//! single gate: [`IntegratedLoadBalancer::new`](crate::IntegratedLoadBalancer::new) calls it
//! and refuses a config it rejects, naming the offending field by its dotted path.
//! `CONFIGURATION.md` documents every option, its default and tuning advice.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) mod affinity;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod rebalance;
pub(crate) mod strategy;

use crate::endpoint::validate_service_name;
use crate::error::Error;
use affinity::AffinityConfig;
use health::{HealthCheckConfig, OutlierDetectionConfig, SlowStartConfig};
use rebalance::RebalanceConfig;
use strategy::LoadBalancingStrategy;

/// Top-level configuration of an [`IntegratedLoadBalancer`](crate::IntegratedLoadBalancer).
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{LoadBalancerConfig, LoadBalancingStrategy};
///
/// let config = LoadBalancerConfig::from_toml_str(
///     r#"
///     [consistent_hash]
///     slots = 16384
///
///     [services.checkout]
///     strategy = "consistent_hash"
///     "#,
/// )
/// .unwrap();
/// assert_eq!(config.consistent_hash.slots, 16384);
/// assert_eq!(config.services["checkout"].strategy, Some(LoadBalancingStrategy::ConsistentHash));
///
/// let err = LoadBalancerConfig::from_toml_str("[consistent_hash]\nslots = 1000\n").unwrap_err();
/// assert!(err.to_string().contains("consistent_hash.slots"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancerConfig {
    /// Active health checks (off by default).
    pub health_check: HealthCheckConfig,
    /// Passive health: ejection after consecutive reported failures (off by default).
    pub outlier_detection: OutlierDetectionConfig,
    /// Traffic ramp for endpoints that join or recover (off by default).
    pub slow_start: SlowStartConfig,
    /// Session affinity for `next_endpoint_with_affinity` (TTL and size of the table).
    pub affinity: AffinityConfig,
    /// How affinity keys move on topology changes and how long drains wait.
    pub rebalance: RebalanceConfig,
    /// Connection-pool limits, for `ConnectionPool::new(config.pool.clone(), connector)`.
    pub pool: pool::PoolConfig,
    /// When fewer than this percentage of a service's endpoints are healthy, picks go to all
    /// of them regardless of health (Envoy's panic mode; default 50, 0 disables it: then a
    /// service with no healthy endpoint answers [`Error::NoHealthyEndpoints`]). Endpoints
    /// marked down or draining are an operator's decision, not health: they are left out of
    /// the percentage and stay out of routing in panic.
    pub panic_threshold_percent: u32,
    /// The consistent-hash ring (used by [`LoadBalancingStrategy::ConsistentHash`] and by
    /// every `*_with_hash` call).
    pub consistent_hash: ConsistentHashConfig,
    /// The control-plane thread that rebuilds and publishes routing snapshots.
    pub control_plane: ControlPlaneConfig,
    /// The latency estimate of [`LoadBalancingStrategy::PeakEwma`].
    pub peak_ewma: PeakEwmaConfig,
    /// Per-service overrides, keyed by service name.
    pub services: BTreeMap<String, ServiceConfig>,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self {
            health_check: HealthCheckConfig::default(),
            outlier_detection: OutlierDetectionConfig::default(),
            slow_start: SlowStartConfig::default(),
            affinity: AffinityConfig::default(),
            rebalance: RebalanceConfig::default(),
            pool: pool::PoolConfig::default(),
            panic_threshold_percent: 50,
            consistent_hash: ConsistentHashConfig::default(),
            control_plane: ControlPlaneConfig::default(),
            peak_ewma: PeakEwmaConfig::default(),
            services: BTreeMap::new(),
        }
    }
}

/// Settings of the consistent-hash ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistentHashConfig {
    /// Number of slots on the ring: a power of two in `1_024..=16_777_216`, default `65_536`.
    ///
    /// Keys map to slots, slots to endpoints. More slots give a finer balance (each endpoint
    /// owns about `slots / n` of them) at 4 bytes per slot per service. Keep it at least 64
    /// times the largest endpoint count you expect. Changing it remaps most keys, so every
    /// balancer of a fleet must use the same value.
    pub slots: u32,
}

/// Settings of the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Most changes coalesced into one rebuild (`1..=1_000_000`, default `4_096`). A burst
    /// larger than this is published in several snapshots, so the first writers are
    /// acknowledged sooner.
    pub max_batch: usize,
    /// Name of the control-plane OS thread, as shown by `top -H` (default `tai-lb-control`;
    /// Linux shows the first 15 bytes). Must be non-empty and contain no NUL byte.
    pub thread_name: String,
}

/// Settings of [`LoadBalancingStrategy::PeakEwma`]'s latency estimate.
///
/// In TOML: `[peak_ewma]` with `decay = "10s"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeakEwmaConfig {
    /// The time constant τ of the estimate (`1ms..=1h`, default 10 s, as Finagle and tower):
    /// how fast faster samples pull it down, and how fast it fades toward zero while the
    /// endpoint gets no traffic (to `1/e` of its value after τ), so that an endpoint avoided
    /// after a slow spell is tried again.
    #[serde(with = "humantime_serde")]
    pub decay: Duration,
}

impl Default for PeakEwmaConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
        }
    }
}

/// Overrides for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The strategy for this service, instead of the balancer's.
    pub strategy: Option<LoadBalancingStrategy>,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        Self { slots: 65_536 }
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            max_batch: 4_096,
            thread_name: "tai-lb-control".to_owned(),
        }
    }
}

/// Smallest accepted `consistent_hash.slots`.
pub const MIN_HASH_SLOTS: u32 = 1 << 10;
/// Largest accepted `consistent_hash.slots`.
pub const MAX_HASH_SLOTS: u32 = 1 << 24;

impl LoadBalancerConfig {
    /// Checks every field; the error names the first offending one by its dotted path.
    pub fn validate(&self) -> Result<(), Error> {
        self.health_check.validate()?;
        #[cfg(not(feature = "grpc"))]
        if matches!(
            self.health_check.check,
            crate::HealthCheckKind::Grpc { .. } | crate::HealthCheckKind::GrpcWatch { .. }
        ) {
            return Err(Error::invalid_config(
                "health_check.check.kind",
                "gRPC health checks need the `grpc` cargo feature",
            ));
        }
        self.outlier_detection.validate()?;
        self.slow_start.validate()?;
        self.affinity.validate()?;
        self.rebalance.validate()?;
        self.pool.validate()?;
        if self.panic_threshold_percent > 100 {
            return Err(Error::invalid_config(
                "panic_threshold_percent",
                "must be at most 100",
            ));
        }
        let slots = self.consistent_hash.slots;
        if !slots.is_power_of_two() || !(MIN_HASH_SLOTS..=MAX_HASH_SLOTS).contains(&slots) {
            return Err(Error::invalid_config(
                "consistent_hash.slots",
                format!("{slots} is not a power of two between {MIN_HASH_SLOTS} and {MAX_HASH_SLOTS}"),
            ));
        }
        let decay = self.peak_ewma.decay;
        if decay < Duration::from_millis(1) || decay > Duration::from_secs(3600) {
            return Err(Error::invalid_config(
                "peak_ewma.decay",
                format!("{decay:?} is not between 1ms and 1h"),
            ));
        }
        let cp = &self.control_plane;
        if !(1..=1_000_000).contains(&cp.max_batch) {
            return Err(Error::invalid_config(
                "control_plane.max_batch",
                format!("{} is not between 1 and 1000000", cp.max_batch),
            ));
        }
        if cp.thread_name.is_empty() || cp.thread_name.contains('\0') {
            return Err(Error::invalid_config(
                "control_plane.thread_name",
                "must be non-empty and contain no NUL byte",
            ));
        }
        for name in self.services.keys() {
            if let Err(Error::InvalidServiceName { reason, .. }) = validate_service_name(name) {
                return Err(Error::invalid_config(
                    format!("services.{}", crate::error::truncate(name)),
                    format!("invalid service name: {reason}"),
                ));
            }
        }
        Ok(())
    }

    /// Parses a TOML document and validates it. Missing fields take their defaults.
    ///
    /// Parse errors carry the line and column and name the unknown or mistyped field.
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        let config: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigIo {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_str(&text)
    }

    /// Renders the configuration as TOML (every field, defaults included).
    pub fn to_toml_string(&self) -> String {
        // Serializing plain structs of strings, integers and maps with string keys to TOML
        // cannot fail; keep a readable fallback rather than a panic path anyway.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The strategy for `service`: its override if configured, else `default`.
    pub(crate) fn strategy_for(
        &self,
        service: &str,
        default: LoadBalancingStrategy,
    ) -> LoadBalancingStrategy {
        self.services
            .get(service)
            .and_then(|s| s.strategy)
            .unwrap_or(default)
    }
}

/// A TOML parse error of `text` as [`Error::ConfigParse`], with its line and column.
pub(crate) fn toml_error(text: &str, error: &toml::de::Error) -> Error {
    let (line, column) = match error.span() {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Error::ConfigParse {
        line,
        column,
        message: error.message().trim_end().to_owned(),
    }
}

/// 1-based line and column of byte offset `at` in `text`.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = LoadBalancerConfig::default();
        c.validate().unwrap();
        let text = c.to_toml_string();
        assert_eq!(LoadBalancerConfig::from_toml_str(&text).unwrap(), c);
        assert_eq!(LoadBalancerConfig::from_toml_str("").unwrap(), c);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[consistent_hash]\nslots = 3000", "consistent_hash.slots"),
            ("[consistent_hash]\nslots = 512", "consistent_hash.slots"),
            ("[control_plane]\nmax_batch = 0", "control_plane.max_batch"),
            ("[control_plane]\nthread_name = \"\"", "control_plane.thread_name"),
            ("[services.\"\"]\nstrategy = \"random\"", "services."),
        ];
        for (text, field) in cases {
            match LoadBalancerConfig::from_toml_str(text) {
                Err(Error::InvalidConfig { field: f, .. }) => assert!(f.starts_with(field), "{f} vs {field}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn parse_errors_carry_position_and_name() {
        match LoadBalancerConfig::from_toml_str("[consistent_hash]\nslotz = 4") {
            Err(Error::ConfigParse { line, message, .. }) => {
                assert_eq!(line, Some(2));
                assert!(message.contains("slotz"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match LoadBalancerConfig::from_toml_str("[services.a]\nstrategy = \"fastest\"") {
            Err(Error::ConfigParse { message, .. }) => assert!(message.contains("fastest"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            LoadBalancerConfig::from_toml_str("[control_plane]\nmax_batch = -1"),
            Err(Error::ConfigParse { .. })
        ));
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
