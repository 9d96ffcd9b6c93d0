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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) mod affinity;
pub(crate) mod circuit_breakers;
pub(crate) mod health;
pub(crate) mod locality;
pub(crate) mod pool;
pub(crate) mod rebalance;
pub(crate) mod strategy;

use crate::endpoint::validate_service_name;
use crate::error::Error;
use affinity::AffinityConfig;
use circuit_breakers::CircuitBreakerConfig;
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
    /// Zone-aware routing (off by default).
    pub locality: locality::LocalityConfig,
    /// How traffic spills across endpoints' priority levels.
    pub priority: locality::PriorityConfig,
    /// Metadata subsets a pick may name (none by default).
    pub subsets: locality::SubsetConfig,
    /// Deterministic subsetting for large fleets (off by default).
    pub subsetting: locality::SubsettingConfig,
    /// Circuit-breaker limits of every service (none by default); per-service values in
    /// [`ServiceConfig::circuit_breakers`] replace them.
    pub circuit_breakers: CircuitBreakerConfig,
    /// The health event log: subscribers' buffers and the JSON-lines file sink.
    pub health_events: HealthEventsConfig,
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
            locality: locality::LocalityConfig::default(),
            priority: locality::PriorityConfig::default(),
            subsets: locality::SubsetConfig::default(),
            subsetting: locality::SubsettingConfig::default(),
            circuit_breakers: CircuitBreakerConfig::default(),
            health_events: HealthEventsConfig::default(),
            services: BTreeMap::new(),
        }
    }
}

/// Settings of consistent hashing: the algorithm, its table size, and bounded loads.
///
/// In TOML:
///
/// ```
/// # use tai_loadbalancer::{HashAlgorithm, LoadBalancerConfig};
/// let config = LoadBalancerConfig::from_toml_str(r#"
///     [consistent_hash]
///     algorithm = "maglev"
///     maglev_table_size = 65537
///     balance_factor = 1.25
/// "#).unwrap();
/// assert_eq!(config.consistent_hash.algorithm, HashAlgorithm::Maglev);
/// assert_eq!(config.consistent_hash.balance_factor, Some(1.25));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistentHashConfig {
    /// Number of slots on the ring: a power of two in `1_024..=16_777_216`, default `65_536`.
    ///
    /// Keys map to slots, slots to endpoints. More slots give a finer balance (each endpoint
    /// owns about `slots / n` of them) at 1 to 4 bytes per slot per service. Keep it at least
    /// 64 times the largest endpoint count you expect. Changing it remaps most keys, so every
    /// balancer of a fleet must use the same value.
    pub slots: u32,
    /// `ring` (the default: rendezvous over slot permutations, minimal movement) or
    /// `maglev` (Maglev's lookup table: better balance, a little more movement on a change).
    /// See [`HashAlgorithm`].
    pub algorithm: HashAlgorithm,
    /// Maglev's table size `M`: a prime in `251..=16_777_259`, default 65,537. Keep it at least
    /// 100 times the largest endpoint count (a table built smaller logs a warning): each
    /// endpoint owns `M / n` entries within one, so `M / n` sets the balance's granularity.
    /// Like `slots`, every balancer of a fleet must use the same value.
    pub maglev_table_size: u32,
    /// Bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016; Envoy's
    /// `hash_balance_factor`): `None` (the default) is off; a factor `c >= 1.0` caps each
    /// endpoint at `ceil(c × average requests in flight)`, and a key whose owner is at the
    /// cap goes to the next endpoint along the ring (or table) that is under it. Applies to
    /// hash picks and to session affinity. Keys move only while their owner is loaded, so
    /// `c` trades cache locality for load: 1.25 to 2.0 is the usual range.
    pub balance_factor: Option<f64>,
}

/// The consistent-hash algorithm (TOML: `"ring"` or `"maglev"`).
///
/// Measured on 10 endpoints (`tests/maglev_tests.rs`): the ring's shares are independent
/// draws (±1.2 % around 10 %, one standard deviation, with the default 65,536 slots; 0.81 %
/// worst over a million keys for the test's set), Maglev's are within one entry of `M / n`
/// (0.57 % worst over a million keys, all of it the keys' sampling noise). Over 50,000 keys,
/// removing one endpoint moves only its keys on the ring, while Maglev also moves 97 keys
/// (0.19 %) between the endpoints that stay; adding one, 105 (0.21 %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithm {
    /// A fixed ring of `slots` slots owned by rendezvous over per-endpoint permutations
    /// (see `docs::consistent_hashing`): minimal movement on every change.
    #[default]
    Ring,
    /// Maglev (Eisenbud et al., NSDI 2016): a prime-sized lookup table filled from each
    /// endpoint's preference list; each endpoint owns `M / n` entries within one.
    Maglev,
}

/// Maglev's default table size: the prime the paper and Envoy use.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Smallest accepted Maglev table size (a prime).
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 251;
/// Largest accepted Maglev table size (a prime).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 16_777_259;
/// Largest accepted `balance_factor`.
pub const MAX_BALANCE_FACTOR: f64 = 100.0;

/// Whether `n` is prime (trial division).
pub(crate) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
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

/// The health event log ([`IntegratedLoadBalancer::health_events`](crate::IntegratedLoadBalancer::health_events)
/// and its JSON-lines file sink).
///
/// In TOML:
///
/// ```
/// # use tai_loadbalancer::LoadBalancerConfig;
/// let config = LoadBalancerConfig::from_toml_str(r#"
///     [health_events]
///     log_path = "/var/log/my-service/lb-health.jsonl"
///     log_max_bytes = 10485760
///     log_files = 4
/// "#).unwrap();
/// assert_eq!(config.health_events.log_files, 4);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthEventsConfig {
    /// Events a subscriber (a [`HealthEvents`](crate::HealthEvents) stream, the file sink,
    /// the status page) holds before it loses the oldest (`1..=1_000_000`, default 4,096).
    /// The control plane never waits for a subscriber.
    pub buffer: usize,
    /// Write every event as a line of JSON to this file (created if missing, appended to),
    /// rotated by size. `None` (the default): no file.
    pub log_path: Option<PathBuf>,
    /// The log and its rotated copies together hold at most this many bytes
    /// (`4096..=1 TiB`, default 10 MiB).
    pub log_max_bytes: u64,
    /// Files the log is spread over: the log and `log_files - 1` rotated copies
    /// (`PATH.1` newest ...), each at most `log_max_bytes / log_files` bytes
    /// (`1..=1000`, default 4; lowered so that each file holds at least 4 KiB).
    pub log_files: u32,
}

impl Default for HealthEventsConfig {
    fn default() -> Self {
        Self {
            buffer: 4096,
            log_path: None,
            log_max_bytes: 10 << 20,
            log_files: 4,
        }
    }
}

/// Largest accepted `health_events.log_max_bytes` (1 TiB).
pub const MAX_EVENT_LOG_BYTES: u64 = 1 << 40;

/// The smallest size of one health event log file (and of `health_events.log_max_bytes`):
/// an event line always fits (its reason is cut to 512 bytes).
pub const MIN_EVENT_LOG_FILE_BYTES: u64 = 4096;

impl HealthEventsConfig {
    /// Checks every field (prefix `health_events.`).
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=1_000_000).contains(&self.buffer) {
            return Err(Error::invalid_config(
                "health_events.buffer",
                format!("{} is not between 1 and 1000000", self.buffer),
            ));
        }
        if self.log_path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(Error::invalid_config("health_events.log_path", "is empty"));
        }
        let min = MIN_EVENT_LOG_FILE_BYTES;
        if !(min..=MAX_EVENT_LOG_BYTES).contains(&self.log_max_bytes) {
            return Err(Error::invalid_config(
                "health_events.log_max_bytes",
                format!(
                    "{} is not between {min} and {MAX_EVENT_LOG_BYTES}",
                    self.log_max_bytes
                ),
            ));
        }
        if !(1..=1000).contains(&self.log_files) {
            return Err(Error::invalid_config(
                "health_events.log_files",
                format!("{} is not between 1 and 1000", self.log_files),
            ));
        }
        Ok(())
    }
}

/// Overrides for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The strategy for this service, instead of the balancer's.
    pub strategy: Option<LoadBalancingStrategy>,
    /// Circuit-breaker limits for this service: each one set here replaces the top-level
    /// `[circuit_breakers]` value; the others are inherited.
    pub circuit_breakers: Option<CircuitBreakerConfig>,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        Self {
            slots: 65_536,
            algorithm: HashAlgorithm::Ring,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            balance_factor: None,
        }
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
        let m = self.consistent_hash.maglev_table_size;
        if !is_prime(m) || !(MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&m) {
            return Err(Error::invalid_config(
                "consistent_hash.maglev_table_size",
                format!("{m} is not a prime between {MIN_MAGLEV_TABLE_SIZE} and {MAX_MAGLEV_TABLE_SIZE}"),
            ));
        }
        if let Some(c) = self.consistent_hash.balance_factor {
            if !(c.is_finite() && (1.0..=MAX_BALANCE_FACTOR).contains(&c)) {
                return Err(Error::invalid_config(
                    "consistent_hash.balance_factor",
                    format!("{c} is not between 1.0 and {MAX_BALANCE_FACTOR}"),
                ));
            }
        }
        let decay = self.peak_ewma.decay;
        if decay < Duration::from_millis(1) || decay > Duration::from_secs(3600) {
            return Err(Error::invalid_config(
                "peak_ewma.decay",
                format!("{decay:?} is not between 1ms and 1h"),
            ));
        }
        self.health_events.validate()?;
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
        self.locality.validate()?;
        self.priority.validate()?;
        self.subsets.validate()?;
        self.subsetting.validate()?;
        self.circuit_breakers.validate("circuit_breakers")?;
        for (name, service) in &self.services {
            if let Err(Error::InvalidServiceName { reason, .. }) = validate_service_name(name) {
                return Err(Error::invalid_config(
                    format!("services.{}", crate::error::truncate(name)),
                    format!("invalid service name: {reason}"),
                ));
            }
            if let Some(breakers) = &service.circuit_breakers {
                breakers.validate(&format!("services.{name}.circuit_breakers"))?;
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

    /// The circuit-breaker limits of `service`: the top-level `[circuit_breakers]` with the
    /// service's own `[services.<name>.circuit_breakers]` values in their place.
    pub fn circuit_breakers_for(&self, service: &str) -> CircuitBreakerConfig {
        match self
            .services
            .get(service)
            .and_then(|s| s.circuit_breakers.as_ref())
        {
            Some(overrides) => self.circuit_breakers.overridden_by(overrides),
            None => self.circuit_breakers,
        }
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
