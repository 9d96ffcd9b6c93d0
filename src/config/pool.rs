//! Connection-pool limits and timeouts ([`PoolConfig`]), read by
//! [`ConnectionPool`](crate::ConnectionPool).
#![deny(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Largest accepted `max_connections` and `max_waiters`.
pub const MAX_POOL_SIZE: usize = 1_000_000;

/// Pool limits and timeouts, per endpoint.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::PoolConfig;
///
/// let config = PoolConfig {
///     min_connections: 2,
///     max_connections: 32,
///     acquire_timeout: Duration::from_millis(250),
///     ..Default::default()
/// };
/// config.validate().unwrap();
///
/// // A minimum above the maximum is clamped to it (as HikariCP does), not refused, so
/// // setting `min_connections` alone never trips the default `max_connections`.
/// let warm = PoolConfig { min_connections: 50, ..Default::default() };
/// warm.validate().unwrap();
/// assert_eq!(warm.effective_min_connections(), 10);
///
/// let bad = PoolConfig { max_connections: 0, ..Default::default() };
/// assert!(bad.validate().unwrap_err().to_string().contains("pool.max_connections"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Connections kept open per endpoint in use, replenished in the background (default 0;
    /// clamped to `max_connections`, see
    /// [`effective_min_connections`](Self::effective_min_connections)).
    pub min_connections: usize,
    /// Most connections open per endpoint, including ones being opened (default 10).
    pub max_connections: usize,
    /// Longest an `acquire` waits for a busy pool to free a connection (default 1 s).
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest a connect may take (default 1 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An idle connection unused this long is closed (default 10 min).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection this old is closed when next idle or returned (default 30 min).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Most callers waiting per endpoint; beyond it `acquire` fails at once with
    /// [`Error::PoolExhausted`](crate::Error::PoolExhausted) (default 1,024; 0: never wait).
    pub max_waiters: usize,
    /// How often the background task closes expired idle connections, checks idle ones with
    /// [`Connector::is_valid`](crate::Connector::is_valid) and replenishes `min_connections` (default 1 s).
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_connections: 0,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(1800),
            max_waiters: 1024,
            maintenance_interval: Duration::from_secs(1),
        }
    }
}

impl PoolConfig {
    /// The minimum the pool keeps: `min_connections`, clamped to `max_connections`.
    pub fn effective_min_connections(&self) -> usize {
        self.min_connections.min(self.max_connections)
    }

    /// Checks every field; the error names the first offending one (`pool.<field>`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_connections == 0 {
            return Err(Error::invalid_config(
                "pool.max_connections",
                "must be at least 1",
            ));
        }
        if self.max_connections > MAX_POOL_SIZE {
            return Err(Error::invalid_config(
                "pool.max_connections",
                format!("must be at most {MAX_POOL_SIZE}"),
            ));
        }
        if self.min_connections > MAX_POOL_SIZE {
            return Err(Error::invalid_config(
                "pool.min_connections",
                format!("must be at most {MAX_POOL_SIZE}"),
            ));
        }
        if self.max_waiters > MAX_POOL_SIZE {
            return Err(Error::invalid_config(
                "pool.max_waiters",
                format!("must be at most {MAX_POOL_SIZE}"),
            ));
        }
        for (field, value) in [
            ("pool.acquire_timeout", self.acquire_timeout),
            ("pool.connect_timeout", self.connect_timeout),
            ("pool.idle_timeout", self.idle_timeout),
            ("pool.max_lifetime", self.max_lifetime),
            ("pool.maintenance_interval", self.maintenance_interval),
        ] {
            if value.is_zero() {
                return Err(Error::invalid_config(field, "must be greater than zero"));
            }
            if value > Duration::from_secs(365 * 24 * 3600) {
                return Err(Error::invalid_config(field, "must be at most a year"));
            }
        }
        Ok(())
    }
}
