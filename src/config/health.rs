//! Configuration of health: active checks, passive outlier detection, slow start, panic mode.
//!
//! Plain data with defaults (see `CONFIGURATION.md` for why each default was chosen); each
//! section validates itself and names the offending field by its dotted path.
#![deny(unsafe_code)]

use std::fmt;

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::sync::DataArc;

// ===== active checks =====

/// Active health checking: periodic probes of every endpoint, on the balancer's runtime.
///
/// Off by default, as in Envoy, HAProxy (`check`) and NGINX Plus (`health_check`): probes
/// are traffic to your backends, so they are opted into. Field names are part of the API.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::{HealthCheckConfig, HealthCheckKind, LoadBalancerConfig};
///
/// let config = LoadBalancerConfig {
///     health_check: HealthCheckConfig {
///         enabled: true,
///         interval: Duration::from_secs(1),
///         timeout: Duration::from_millis(500),
///         check: HealthCheckKind::http("/healthz"),
///         ..Default::default()
///     },
///     ..Default::default()
/// };
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Run active checks (default `false`).
    pub enabled: bool,
    /// Time between two checks of one endpoint (default 2 s, HAProxy's `inter`; at most
    /// [`MAX_CHECK_DURATION`]). Checks of one endpoint never overlap: the next one is due
    /// `interval` (plus jitter) after the previous one finished.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A check that has not answered within this time fails (default 1 s; at most
    /// [`MAX_CHECK_DURATION`]). It may be longer than `interval`: a slow check only delays
    /// the next one of the same endpoint.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures that take a healthy endpoint out of routing (default 3,
    /// HAProxy's `fall`).
    pub unhealthy_threshold: u32,
    /// Consecutive successes that bring an unhealthy endpoint back (default 2, HAProxy's
    /// `rise`).
    pub healthy_threshold: u32,
    /// After an endpoint is registered, failures during this time do not count towards
    /// `unhealthy_threshold` (default 10 s, at most a day), so an instance still starting up
    /// is not ejected before it had a chance. It is routable from the start.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Each check is delayed by a random amount up to this (default 200 ms, at most
    /// [`MAX_CHECK_DURATION`]). It follows the interval: a jitter longer than half of
    /// `interval` is clamped to half of it (see [`effective_jitter`](Self::effective_jitter)),
    /// so setting a short `interval` alone keeps checks roughly periodic. First checks are
    /// also spread over one `interval`, so 1,000 endpoints are never probed in one burst.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Most checks in progress at once (default 64, `1..=`[`MAX_CONCURRENT_CHECKS`]).
    pub max_concurrent: usize,
    /// What a check does (default: TCP connect).
    pub check: HealthCheckKind,
}

/// Longest accepted `health_check.interval`, `timeout` and `jitter`.
pub const MAX_CHECK_DURATION: Duration = Duration::from_secs(3600);

/// Most health checks in progress at once (`health_check.max_concurrent`).
pub const MAX_CONCURRENT_CHECKS: usize = 65_536;

/// Longest accepted `outlier_detection.base_ejection_time`, `max_ejection_time`, and
/// `health_check.grace_period`.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(24 * 3600);

impl HealthCheckConfig {
    /// The jitter checks actually use: `jitter`, clamped to half of `interval`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tai_loadbalancer::HealthCheckConfig;
    ///
    /// let fast = HealthCheckConfig { interval: Duration::from_millis(100), ..Default::default() };
    /// fast.validate().unwrap(); // the default 200 ms jitter follows the interval
    /// assert_eq!(fast.effective_jitter(), Duration::from_millis(50));
    /// assert_eq!(HealthCheckConfig::default().effective_jitter(), Duration::from_millis(200));
    /// ```
    pub fn effective_jitter(&self) -> Duration {
        self.jitter.min(self.interval / 2)
    }
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            grace_period: Duration::from_secs(10),
            jitter: Duration::from_millis(200),
            max_concurrent: 64,
            check: HealthCheckKind::Tcp,
        }
    }
}

/// An HTTP status range, inclusive: `"200-299"` or `"204"` in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusRange {
    /// Lowest accepted status.
    pub start: u16,
    /// Highest accepted status.
    pub end: u16,
}

impl StatusRange {
    /// `200..=299`.
    pub const SUCCESS: StatusRange = StatusRange { start: 200, end: 299 };

    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.start..=self.end).contains(&status)
    }
}

impl Default for StatusRange {
    fn default() -> Self {
        Self::SUCCESS
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| serde::de::Error::custom(format!("invalid HTTP status {s:?} in {text:?}")))
        };
        match text.split_once('-') {
            Some((a, b)) => Ok(StatusRange {
                start: parse(a)?,
                end: parse(b)?,
            }),
            None => {
                let s = parse(&text)?;
                Ok(StatusRange { start: s, end: s })
            }
        }
    }
}

/// What an active check does.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheckKind {
    /// Open a TCP connection (and close it).
    #[default]
    Tcp,
    /// `GET path` over HTTP/1.1; healthy when the status is in `expected_status`.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Accepted statuses (default `200-299`).
        #[serde(default)]
        expected_status: StatusRange,
        /// `Host` header (default: the endpoint's address).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// The standard `grpc.health.v1.Health/Check` for `service` (`""`: the server as a
    /// whole); healthy when the answer is `SERVING`. Needs the `grpc` feature.
    Grpc {
        /// The service name asked about.
        #[serde(default)]
        service: String,
    },
    /// The standard `grpc.health.v1.Health/Watch` for `service` (`""`: the server as a
    /// whole), where the server supports it; healthy when the latest status streamed is
    /// `SERVING`. Needs the `grpc` feature.
    ///
    /// Each endpoint keeps one long-lived `Watch` stream (one connection, opened by its
    /// first check and reopened by the check after it ends). A check reads the latest
    /// status the stream sent, and when that status *changes* (a `NOT_SERVING` push, say)
    /// the endpoint is checked again at once instead of at the next `interval`; the
    /// thresholds still apply, each check counting once. For an endpoint whose server
    /// answers `UNIMPLEMENTED` to `Watch`, the check falls back to
    /// [`Grpc`](Self::Grpc)'s `Check`, and keeps to it while the endpoint is checked.
    ///
    /// The stream's connection sends HTTP/2 PINGs every `max(interval, 30 s)` to notice a
    /// peer that vanished without closing it. Streams close when their endpoint leaves the
    /// registry and when the checks stop.
    GrpcWatch {
        /// The service name asked about.
        #[serde(default)]
        service: String,
    },
    /// Your own check (not expressible in TOML).
    #[serde(skip)]
    Custom(DataArc<dyn HealthCheck>),
}

impl HealthCheckKind {
    /// `GET path`, expecting a 2xx status.
    pub fn http(path: impl Into<String>) -> Self {
        Self::Http {
            path: path.into(),
            expected_status: StatusRange::SUCCESS,
            host: None,
        }
    }

    /// The gRPC health check of `service`.
    pub fn grpc(service: impl Into<String>) -> Self {
        Self::Grpc {
            service: service.into(),
        }
    }

    /// The gRPC health check of `service` over a `Watch` stream (falling back to `Check`
    /// where the server does not implement `Watch`).
    ///
    /// # Examples
    ///
    /// ```
    /// use tai_loadbalancer::{HealthCheckConfig, HealthCheckKind};
    ///
    /// let check = HealthCheckKind::grpc_watch("greeter");
    /// assert_eq!(
    ///     check,
    ///     HealthCheckKind::GrpcWatch {
    ///         service: "greeter".into()
    ///     }
    /// );
    /// assert_ne!(check, HealthCheckKind::grpc("greeter"));
    /// let config = HealthCheckConfig {
    ///     enabled: true,
    ///     check,
    ///     ..Default::default()
    /// };
    /// config.validate().unwrap();
    /// ```
    pub fn grpc_watch(service: impl Into<String>) -> Self {
        Self::GrpcWatch {
            service: service.into(),
        }
    }

    /// A custom check.
    pub fn custom(check: impl HealthCheck) -> Self {
        Self::Custom(DataArc::new(check))
    }
}

impl PartialEq for HealthCheckKind {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Tcp, Self::Tcp) => true,
            (
                Self::Http {
                    path: a,
                    expected_status: sa,
                    host: ha,
                },
                Self::Http {
                    path: b,
                    expected_status: sb,
                    host: hb,
                },
            ) => a == b && sa == sb && ha == hb,
            (Self::Grpc { service: a }, Self::Grpc { service: b }) => a == b,
            (Self::GrpcWatch { service: a }, Self::GrpcWatch { service: b }) => a == b,
            (Self::Custom(a), Self::Custom(b)) => DataArc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for HealthCheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("Tcp"),
            Self::Http {
                path,
                expected_status,
                host,
            } => f
                .debug_struct("Http")
                .field("path", path)
                .field("expected_status", &format_args!("{expected_status}"))
                .field("host", host)
                .finish(),
            Self::Grpc { service } => f.debug_struct("Grpc").field("service", service).finish(),
            Self::GrpcWatch { service } => f.debug_struct("GrpcWatch").field("service", service).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

// ===== passive checks =====

/// Passive health: ejection of endpoints whose requests keep failing (Envoy's outlier
/// detection, gRPC's A50). Fed by outcomes reported on picks and through `record_result`.
///
/// Off by default (as in Envoy and gRPC), the parameters take the Envoy/gRPC defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Eject on consecutive failures (default `false`).
    pub enabled: bool,
    /// Consecutive reported failures that eject an endpoint (default 5).
    pub consecutive_failures: u32,
    /// First ejection lasts this long; the n-th lasts n times as long (default 30 s, at
    /// most [`MAX_EJECTION_TIME`]).
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Cap on one ejection's duration (default 300 s, at most [`MAX_EJECTION_TIME`]). As in
    /// Envoy, the cap is this or `base_ejection_time`, whichever is larger (see
    /// [`effective_max_ejection_time`](Self::effective_max_ejection_time)), so a long
    /// `base_ejection_time` set alone is accepted.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// Most endpoints of a service ejected at once, in percent (default 10; at least one
    /// endpoint can always be ejected).
    pub max_ejection_percent: u32,
}

impl OutlierDetectionConfig {
    /// The cap ejections actually use: the larger of `max_ejection_time` and
    /// `base_ejection_time` (Envoy's rule).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tai_loadbalancer::OutlierDetectionConfig;
    ///
    /// let long = OutlierDetectionConfig { base_ejection_time: Duration::from_secs(600), ..Default::default() };
    /// long.validate().unwrap();
    /// assert_eq!(long.effective_max_ejection_time(), Duration::from_secs(600));
    /// ```
    pub fn effective_max_ejection_time(&self) -> Duration {
        self.max_ejection_time.max(self.base_ejection_time)
    }
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Slow start: an endpoint that joins or recovers receives a growing share of traffic over
/// `window` (Envoy's `slow_start_config`). Applies to the strategies that use weights:
/// weighted, least connections and peak EWMA. Consistent hashing keeps its ring (ramping ring shares
/// would move keys), round robin and random ignore weights.
///
/// Effective weight = `weight * max(min_weight_percent / 100, (t / window) ^ (1 / aggression))`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlowStartConfig {
    /// Length of the ramp; `0s` turns slow start off (the default).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Shape of the ramp: 1.0 is linear, larger values ramp up faster early (default 1.0).
    pub aggression: f64,
    /// Weight at the start of the ramp, in percent of the full weight (default 10).
    pub min_weight_percent: u32,
}

impl Default for SlowStartConfig {
    fn default() -> Self {
        Self {
            window: Duration::ZERO,
            aggression: 1.0,
            min_weight_percent: 10,
        }
    }
}

impl SlowStartConfig {
    /// The weight factor (in `(0, 1]`) `elapsed` into the ramp.
    pub(crate) fn factor(&self, elapsed: Duration) -> f64 {
        if self.window.is_zero() || elapsed >= self.window {
            return 1.0;
        }
        let t = elapsed.as_secs_f64() / self.window.as_secs_f64();
        let ramp = t.powf(1.0 / self.aggression);
        ramp.max(f64::from(self.min_weight_percent) / 100.0).min(1.0)
    }
}

// ===== validation =====

fn bad(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid_config(field, reason)
}

impl HealthCheckConfig {
    /// Checks every field (prefix `health_check.`).
    pub fn validate(&self) -> Result<(), Error> {
        for (field, value) in [
            ("health_check.interval", self.interval),
            ("health_check.timeout", self.timeout),
        ] {
            if value.is_zero() {
                return Err(bad(field, "must be greater than zero"));
            }
            if value > MAX_CHECK_DURATION {
                return Err(bad(field, format!("{value:?} is more than one hour")));
            }
        }
        if self.jitter > MAX_CHECK_DURATION {
            return Err(bad(
                "health_check.jitter",
                format!("{:?} is more than one hour", self.jitter),
            ));
        }
        if self.grace_period > MAX_EJECTION_TIME {
            return Err(bad(
                "health_check.grace_period",
                format!("{:?} is more than a day", self.grace_period),
            ));
        }
        if self.unhealthy_threshold == 0 {
            return Err(bad("health_check.unhealthy_threshold", "must be at least 1"));
        }
        if self.healthy_threshold == 0 {
            return Err(bad("health_check.healthy_threshold", "must be at least 1"));
        }
        if !(1..=MAX_CONCURRENT_CHECKS).contains(&self.max_concurrent) {
            return Err(bad(
                "health_check.max_concurrent",
                format!(
                    "{} is not between 1 and {MAX_CONCURRENT_CHECKS}",
                    self.max_concurrent
                ),
            ));
        }
        match &self.check {
            HealthCheckKind::Http {
                path,
                expected_status,
                host,
            } => {
                if !path.starts_with('/') {
                    return Err(bad(
                        "health_check.check.path",
                        format!("{:?} must start with `/`", crate::error::truncate(path)),
                    ));
                }
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad(
                        "health_check.check.path",
                        "must not contain whitespace or control characters",
                    ));
                }
                if path.parse::<http_path::Path>().is_err() {
                    return Err(bad("health_check.check.path", "is not a valid request target"));
                }
                if !(100..=599).contains(&expected_status.start)
                    || !(100..=599).contains(&expected_status.end)
                    || expected_status.start > expected_status.end
                {
                    return Err(bad(
                        "health_check.check.expected_status",
                        format!("{expected_status} is not a range of HTTP statuses (100-599)"),
                    ));
                }
                if let Some(host) = host {
                    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(bad("health_check.check.host", "must be a non-empty host name"));
                    }
                }
            }
            HealthCheckKind::Grpc { service } | HealthCheckKind::GrpcWatch { service } => {
                if service.chars().any(char::is_control) {
                    return Err(bad(
                        "health_check.check.service",
                        "must not contain control characters",
                    ));
                }
            }
            HealthCheckKind::Tcp | HealthCheckKind::Custom(_) => {}
        }
        Ok(())
    }
}

/// A minimal request-target check (origin form): `/` then visible ASCII.
mod http_path {
    pub(super) struct Path;

    impl std::str::FromStr for Path {
        type Err = ();

        fn from_str(s: &str) -> Result<Self, ()> {
            if s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(Path)
            } else {
                Err(())
            }
        }
    }
}

impl OutlierDetectionConfig {
    /// Checks every field (prefix `outlier_detection.`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.consecutive_failures == 0 {
            return Err(bad(
                "outlier_detection.consecutive_failures",
                "must be at least 1",
            ));
        }
        if self.base_ejection_time.is_zero() {
            return Err(bad(
                "outlier_detection.base_ejection_time",
                "must be greater than zero",
            ));
        }
        for (field, value) in [
            ("outlier_detection.base_ejection_time", self.base_ejection_time),
            ("outlier_detection.max_ejection_time", self.max_ejection_time),
        ] {
            if value > MAX_EJECTION_TIME {
                return Err(bad(field, format!("{value:?} is more than a day")));
            }
        }
        if self.max_ejection_percent > 100 {
            return Err(bad(
                "outlier_detection.max_ejection_percent",
                "must be at most 100",
            ));
        }
        Ok(())
    }
}

impl SlowStartConfig {
    /// Checks every field (prefix `slow_start.`).
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.aggression.is_finite() && self.aggression > 0.0) {
            return Err(bad("slow_start.aggression", "must be a positive number"));
        }
        if !(1..=100).contains(&self.min_weight_percent) {
            return Err(bad("slow_start.min_weight_percent", "must be between 1 and 100"));
        }
        if self.window > Duration::from_secs(3600) {
            return Err(bad("slow_start.window", "must be at most one hour"));
        }
        Ok(())
    }
}

// ===== custom checks =====

/// A health check of your own, for [`HealthCheckKind::Custom`](crate::HealthCheckKind::Custom).
///
/// Return `Ok(())` when the endpoint is healthy, `Err(reason)` otherwise. The manager
/// enforces the configured timeout around it and runs it concurrently with other checks.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Endpoint, HealthCheck, HealthCheckKind};
///
/// struct AlwaysUp;
///
/// #[async_trait::async_trait]
/// impl HealthCheck for AlwaysUp {
///     async fn check(&self, _endpoint: &Endpoint) -> Result<(), String> {
///         Ok(())
///     }
/// }
///
/// let kind = HealthCheckKind::custom(AlwaysUp);
/// # let _ = kind;
/// ```
#[async_trait::async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// Probes `endpoint`.
    async fn check(&self, endpoint: &Endpoint) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        HealthCheckConfig::default().validate().unwrap();
        OutlierDetectionConfig::default().validate().unwrap();
        SlowStartConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let hc = |f: fn(&mut HealthCheckConfig)| {
            let mut c = HealthCheckConfig::default();
            f(&mut c);
            match c.validate() {
                Err(Error::InvalidConfig { field, .. }) => field,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(hc(|c| c.interval = Duration::ZERO), "health_check.interval");
        assert_eq!(
            hc(|c| c.timeout = Duration::from_secs(3601)),
            "health_check.timeout"
        );
        assert_eq!(hc(|c| c.timeout = Duration::ZERO), "health_check.timeout");
        assert_eq!(
            hc(|c| c.unhealthy_threshold = 0),
            "health_check.unhealthy_threshold"
        );
        assert_eq!(hc(|c| c.healthy_threshold = 0), "health_check.healthy_threshold");
        assert_eq!(
            hc(|c| c.jitter = Duration::from_secs(3601)),
            "health_check.jitter"
        );
        assert_eq!(hc(|c| c.max_concurrent = 0), "health_check.max_concurrent");
        assert_eq!(
            hc(|c| c.max_concurrent = usize::MAX),
            "health_check.max_concurrent"
        );
        assert_eq!(
            hc(|c| c.grace_period = Duration::MAX),
            "health_check.grace_period"
        );
        assert_eq!(
            hc(|c| c.check = HealthCheckKind::http("healthz")),
            "health_check.check.path"
        );
        assert_eq!(
            hc(|c| c.check = HealthCheckKind::http("/a b")),
            "health_check.check.path"
        );
        assert_eq!(
            hc(|c| c.check = HealthCheckKind::Http {
                path: "/".into(),
                expected_status: StatusRange { start: 300, end: 200 },
                host: None
            }),
            "health_check.check.expected_status"
        );
        let o = OutlierDetectionConfig {
            consecutive_failures: 0,
            ..Default::default()
        };
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("outlier_detection.consecutive_failures")
        );
        let s = SlowStartConfig {
            aggression: 0.0,
            ..Default::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("slow_start.aggression")
        );
    }

    #[test]
    fn grpc_watch_kind() {
        let kind = HealthCheckKind::grpc_watch("a");
        assert_eq!(kind, HealthCheckKind::GrpcWatch { service: "a".into() });
        assert_ne!(kind, HealthCheckKind::grpc("a"));
        assert_ne!(kind, HealthCheckKind::grpc_watch("b"));
        assert_eq!(format!("{kind:?}"), r#"GrpcWatch { service: "a" }"#);
        let parsed: HealthCheckKind = toml::from_str("kind = \"grpc_watch\"\nservice = \"a\"").unwrap();
        assert_eq!(parsed, kind);
        let parsed: HealthCheckKind = toml::from_str("kind = \"grpc_watch\"").unwrap();
        assert_eq!(parsed, HealthCheckKind::grpc_watch(""));
        let config = HealthCheckConfig {
            check: HealthCheckKind::grpc_watch("a\u{7}"),
            ..Default::default()
        };
        match config.validate() {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "health_check.check.service"),
            other => panic!("{other:?}"),
        }
    }

    #[cfg(not(feature = "grpc"))]
    #[test]
    fn grpc_kinds_need_the_grpc_feature() {
        for check in [HealthCheckKind::grpc(""), HealthCheckKind::grpc_watch("")] {
            let config = crate::LoadBalancerConfig {
                health_check: HealthCheckConfig {
                    check,
                    ..Default::default()
                },
                ..Default::default()
            };
            match config.validate() {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "health_check.check.kind"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn slow_start_ramp() {
        let s = SlowStartConfig {
            window: Duration::from_secs(10),
            aggression: 1.0,
            min_weight_percent: 10,
        };
        assert_eq!(s.factor(Duration::ZERO), 0.1);
        assert!((s.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(s.factor(Duration::from_secs(10)), 1.0);
        let fast = SlowStartConfig {
            aggression: 2.0,
            ..s.clone()
        };
        assert!(fast.factor(Duration::from_secs(5)) > 0.7);
        assert_eq!(SlowStartConfig::default().factor(Duration::ZERO), 1.0);
    }

    #[test]
    fn status_range_text() {
        let r: StatusRange = serde::Deserialize::deserialize(toml::Value::String("200-204".into())).unwrap();
        assert_eq!(r, StatusRange { start: 200, end: 204 });
        assert!(r.contains(204) && !r.contains(205));
        let one: StatusRange = serde::Deserialize::deserialize(toml::Value::String("204".into())).unwrap();
        assert_eq!(one.to_string(), "204");
    }
}
