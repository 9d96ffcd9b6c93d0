//! Health: active checks of every endpoint, and the status types they report.
//!
//! This module owns the *active* side of health: [`HealthCheckManager`] probes the endpoints
//! of a registry (TCP connect, HTTP `GET`, gRPC `grpc.health.v1` `Check` or `Watch`, or
//! your own [`HealthCheck`]) on the runtime, applies the thresholds and the grace period, and tells
//! the balancers that subscribed when an endpoint changes state. It never touches a routing
//! table: the balancer's control plane reads the manager's verdicts and publishes a new
//! table, so membership and health always travel in one snapshot. The *passive* side
//! (outlier detection), slow start and panic mode live in the control plane
//! (`control::service`), because they depend on one balancer's traffic and tables.
//!
//! # Invariants
//!
//! * Checks never run on the pick path; a pick reads health as a field of its table.
//! * A newly registered endpoint is healthy (routable at once) until checks say otherwise,
//!   and failures during its grace period do not count.
//! * An endpoint removed from the registry is forgotten as soon as the scheduler wakes for the
//!   change (the registry call wakes it): no new check starts for it afterwards, and the
//!   result of one in progress is discarded.
#![deny(unsafe_code)]

pub(crate) mod config;
#[cfg(feature = "grpc")]
mod grpc_watch;
#[cfg(feature = "runtime")]
mod manager;
#[cfg(feature = "runtime")]
mod probe;

use std::time::{Duration, SystemTime};

use crate::endpoint::Endpoint;
#[cfg(feature = "runtime")]
pub use manager::HealthCheckManager;
#[cfg(feature = "runtime")]
pub(crate) use manager::HealthSink;

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

/// Whether active checks consider an endpoint healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Routable (new endpoints start here).
    Healthy,
    /// Failed `unhealthy_threshold` checks in a row (outside its grace period); out of
    /// routing until `healthy_threshold` checks in a row pass.
    Unhealthy,
}

/// The active-check status of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// Current verdict.
    pub state: HealthState,
    /// Checks passed in a row.
    pub consecutive_successes: u32,
    /// Checks failed in a row (failures during the grace period are not counted).
    pub consecutive_failures: u32,
    /// Checks completed.
    pub checks: u64,
    /// Checks that failed.
    pub failed_checks: u64,
    /// When the last check completed.
    pub last_check: Option<SystemTime>,
    /// How long the last check took.
    pub last_latency: Option<Duration>,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
    /// When `state` last changed (or the endpoint was first seen).
    pub since: SystemTime,
    /// Whether the endpoint is still in its grace period.
    pub in_grace_period: bool,
}

impl HealthStatus {
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn new() -> Self {
        Self {
            state: HealthState::Healthy,
            consecutive_successes: 0,
            consecutive_failures: 0,
            checks: 0,
            failed_checks: 0,
            last_check: None,
            last_latency: None,
            last_error: None,
            since: SystemTime::now(),
            in_grace_period: false,
        }
    }

    /// Whether the endpoint is healthy.
    pub fn is_healthy(&self) -> bool {
        self.state == HealthState::Healthy
    }
}
