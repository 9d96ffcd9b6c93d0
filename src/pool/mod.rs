//! Connection pooling: per-endpoint pools of reusable connections with limits, timeouts,
//! lifecycle management and backpressure.
//!
//! Owns: the [`PoolConfig`], the [`Connector`] trait (what a connection is and how it is
//! opened), [`ConnectionPool`] (endpoint → per-endpoint pool, the background maintenance task)
//! and [`PooledConnection`] (the RAII handle that returns a connection on drop). The slot
//! protocol itself (bound, FIFO handoff, no lost grant or wakeup) lives in `slots` and is
//! modelled by loom.
//!
//! # Invariants
//!
//! * Never more than `max_connections` open per endpoint, counting connects in progress.
//! * An `acquire` either returns a connection, or fails with a typed error within
//!   `acquire_timeout` + `connect_timeout`; it never waits without bound.
//! * Every [`PooledConnection`] goes back exactly once: to a waiter, to the idle stack, or
//!   closed (broken, expired, draining, or its endpoint removed).
//! * Acquiring takes no global lock: the endpoint map is an immutable snapshot (rebuilt only
//!   when an endpoint is first seen or removed), each endpoint has its own short lock.
#![deny(unsafe_code)]

pub(crate) mod slots;

#[cfg(feature = "runtime")]
mod runtime;
#[cfg(feature = "runtime")]
pub use runtime::*;
#[cfg(feature = "tls")]
mod tls_connector;
#[cfg(feature = "tls")]
pub use tls_connector::TlsConnector;

/// Counters of one endpoint's pool, or of all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open: idle + in use + being opened.
    pub open: usize,
    /// Connections idle in the pool.
    pub idle: usize,
    /// Connections handed out and not yet returned.
    pub in_use: usize,
    /// Connects in progress.
    pub connecting: usize,
    /// Callers waiting for a connection.
    pub waiters: usize,
    /// Connections opened so far.
    pub created: u64,
    /// Connections closed so far (expired, broken, drained, or failing `is_valid`).
    pub closed: u64,
    /// Acquires that gave up after `acquire_timeout`.
    pub timeouts: u64,
    /// Acquires refused at once because `max_waiters` were waiting.
    pub rejected: u64,
    /// Connects that failed or timed out.
    pub connect_errors: u64,
}

impl PoolStats {
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn add(&mut self, other: &PoolStats) {
        self.open += other.open;
        self.idle += other.idle;
        self.in_use += other.in_use;
        self.connecting += other.connecting;
        self.waiters += other.waiters;
        self.created += other.created;
        self.closed += other.closed;
        self.timeouts += other.timeouts;
        self.rejected += other.rejected;
        self.connect_errors += other.connect_errors;
    }
}
