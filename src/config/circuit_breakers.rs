//! Circuit-breaker limits (`[circuit_breakers]`, and per service
//! `[services.<name>.circuit_breakers]`): Envoy's per-cluster thresholds.
#![deny(unsafe_code)]

use serde::{Deserialize, Serialize};

use crate::error::{CircuitLimit, Error};

/// A service's circuit-breaker limits. Each is off (no limit) unless set; a call over a set
/// limit fails at once with [`Error::CircuitOpen`] instead of waiting or piling onto the
/// service.
///
/// In TOML, at the top level for every service, and per service (a field set there replaces
/// the top-level one; fields not set there inherit it):
///
/// ```
/// # use tai_loadbalancer::LoadBalancerConfig;
/// let config = LoadBalancerConfig::from_toml_str(r#"
///     [circuit_breakers]
///     max_requests = 1024
///     max_retries = 3
///
///     [services.checkout.circuit_breakers]
///     max_requests = 16
/// "#).unwrap();
/// let checkout = config.circuit_breakers_for("checkout");
/// assert_eq!((checkout.max_requests, checkout.max_retries), (Some(16), Some(3)));
/// assert_eq!(config.circuit_breakers_for("search").max_requests, Some(1024));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Requests in flight across all the service's endpoints: guarded picks
    /// ([`Pick`](crate::Pick)) alive, every [`BalancedChannel`](crate::BalancedChannel) call
    /// included. Unguarded selections (`select`, `next_endpoint`) are refused while the
    /// service is at the limit but hold nothing.
    pub max_requests: Option<u32>,
    /// Calls waiting in a [`BalancedChannel`](crate::BalancedChannel) for a stream: every
    /// connection the channel may open to the chosen endpoint
    /// ([`connections_per_endpoint`](crate::BalancedChannelBuilder::connections_per_endpoint))
    /// carries
    /// [`max_streams_per_connection`](crate::BalancedChannelBuilder::max_streams_per_connection)
    /// calls. With this limit set, such calls wait in the channel, first come first served
    /// (without it they are queued inside HTTP/2, past the server's limit, uncounted).
    pub max_pending: Option<u32>,
    /// Retries in flight at once, over every channel of the service: Envoy's concurrency
    /// budget for retries, beside the channel's rate budget
    /// ([`RetryPolicy::budget_percent`](crate::RetryPolicy::budget_percent)).
    pub max_retries: Option<u32>,
    /// Connections to one endpoint, over every channel of the balancer. A call that would
    /// open one more shares an open one (the overflow is counted); a call with no connection
    /// of its own channel to share fails.
    pub max_connections_per_endpoint: Option<u32>,
}

impl CircuitBreakerConfig {
    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        CircuitLimit::ALL.iter().any(|&l| self.limit(l).is_some())
    }

    /// The value of `limit`, if set.
    pub fn limit(&self, limit: CircuitLimit) -> Option<u32> {
        match limit {
            CircuitLimit::MaxRequests => self.max_requests,
            CircuitLimit::MaxPending => self.max_pending,
            CircuitLimit::MaxRetries => self.max_retries,
            CircuitLimit::MaxConnectionsPerEndpoint => self.max_connections_per_endpoint,
        }
    }

    /// `self` with every limit `overrides` sets replaced by its value.
    pub(crate) fn overridden_by(self, overrides: &CircuitBreakerConfig) -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            max_requests: overrides.max_requests.or(self.max_requests),
            max_pending: overrides.max_pending.or(self.max_pending),
            max_retries: overrides.max_retries.or(self.max_retries),
            max_connections_per_endpoint: overrides
                .max_connections_per_endpoint
                .or(self.max_connections_per_endpoint),
        }
    }

    /// Checks every limit (`prefix.max_requests`, ...): each set one is at least 1 (leave a
    /// limit unset for none; 0 would refuse every call).
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), Error> {
        for limit in CircuitLimit::ALL {
            if self.limit(limit) == Some(0) {
                return Err(Error::invalid_config(
                    format!("{prefix}.{limit}"),
                    "must be at least 1 (leave it unset for no limit)",
                ));
            }
        }
        Ok(())
    }
}
