//! Rebalancing settings: how affinity keys move off endpoints that leave routing, and how long
//! drains wait. The manager that applies them is
//! [`RebalanceManager`](crate::RebalanceManager).
#![deny(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Drain timeout of the `Immediate` and `Manual` strategies.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest accepted `rebalance.strategy.drain_timeout` (a day).
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted `rebalance.strategy.batch_interval` (an hour).
pub const MAX_BATCH_INTERVAL: Duration = Duration::from_secs(3600);

/// How affinity keys move and how long drains wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RebalanceStrategy {
    /// Keys bound to an endpoint that leaves routing (or drains) are unbound at once.
    #[default]
    Immediate,
    /// A draining endpoint keeps serving its sticky keys while they are unbound in batches.
    Gradual {
        /// How long a drain waits for requests in flight (and keys) before releasing.
        #[serde(with = "humantime_serde")]
        drain_timeout: Duration,
        /// Keys unbound per batch.
        batch_size: usize,
        /// Time between batches.
        #[serde(with = "humantime_serde")]
        batch_interval: Duration,
    },
    /// Nothing moves until [`RebalanceManager::rebalance_service`](crate::RebalanceManager::rebalance_service) is called.
    Manual,
}

impl RebalanceStrategy {
    /// A gradual strategy with `drain_timeout`, 100 keys per batch, a batch every 100 ms.
    pub fn gradual(drain_timeout: Duration) -> Self {
        Self::Gradual {
            drain_timeout,
            batch_size: 100,
            batch_interval: Duration::from_millis(100),
        }
    }

    /// How long a drain waits for requests in flight.
    pub fn drain_timeout(&self) -> Duration {
        match self {
            Self::Gradual { drain_timeout, .. } => *drain_timeout,
            Self::Immediate | Self::Manual => DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Whether a draining endpoint keeps serving the keys bound to it (until they are moved).
    pub(crate) fn sticky_while_draining(&self) -> bool {
        !matches!(self, Self::Immediate)
    }
}

/// Rebalancing settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// How keys move and how long drains wait (default `Immediate`).
    pub strategy: RebalanceStrategy,
}

impl RebalanceConfig {
    /// Checks every field (prefix `rebalance.`).
    pub fn validate(&self) -> Result<(), Error> {
        if let RebalanceStrategy::Gradual {
            drain_timeout,
            batch_size,
            batch_interval,
        } = &self.strategy
        {
            if drain_timeout.is_zero() || *drain_timeout > MAX_DRAIN_TIMEOUT {
                return Err(Error::invalid_config(
                    "rebalance.strategy.drain_timeout",
                    format!("{drain_timeout:?} is not between zero (excluded) and a day"),
                ));
            }
            if *batch_size == 0 {
                return Err(Error::invalid_config(
                    "rebalance.strategy.batch_size",
                    "must be at least 1",
                ));
            }
            if batch_interval.is_zero() || *batch_interval > MAX_BATCH_INTERVAL {
                return Err(Error::invalid_config(
                    "rebalance.strategy.batch_interval",
                    format!("{batch_interval:?} is not between zero (excluded) and an hour"),
                ));
            }
        }
        Ok(())
    }
}
