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

#[cfg(feature = "grpc")]
mod grpc_watch;
#[cfg(feature = "runtime")]
mod manager;
#[cfg(feature = "runtime")]
mod probe;

#[cfg(feature = "runtime")]
pub use manager::HealthCheckManager;
