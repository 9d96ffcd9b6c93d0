//! Primary/backup failover groups.
//!
//! This module owns [`FailoverManager`]: named groups of a primary endpoint and ordered
//! backups, the current target of each, and how many failovers the group has used. It is
//! control-plane state (one lock, never taken on the pick path). A group can also be made the
//! routing policy of a balancer's service with
//! [`IntegratedLoadBalancer::set_failover_group`](crate::IntegratedLoadBalancer::set_failover_group):
//! picks then go to the first healthy endpoint in the group's order, inside the routing
//! snapshot.
//!
//! # Invariants
//!
//! * A group's order is primary, then backups, with no address twice.
//! * At most `max_attempts` failovers happen between two resets (or failbacks); the next one
//!   is refused with [`Error::FailoverExhausted`], so a request is never retried forever.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::endpoint::Endpoint;
use crate::endpoint::validate_service_name;
use crate::error::Error;
use crate::error::truncate;
use crate::stats::EndpointHealth;
use crate::sync::{DataArc, Mutex};

/// Failover settings (exactly the seed's three fields).
///
/// ```
/// use tai_loadbalancer::FailoverConfig;
///
/// let config = FailoverConfig {
///     enabled: true,
///     max_attempts: 3,
///     log_failovers: true,
/// };
/// # let _ = config;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// Whether `failover` moves to a backup (when off it answers [`Error::FailoverDisabled`]).
    pub enabled: bool,
    /// Failovers allowed between two resets (default 3; at least 1).
    pub max_attempts: u32,
    /// Emit a `tracing` warning per failover (default on).
    pub log_failovers: bool,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: 3,
            log_failovers: true,
        }
    }
}

impl FailoverConfig {
    /// Checks every field (prefix `failover.`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::invalid_config(
                "failover.max_attempts",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Counters and the current target of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverStats {
    /// The endpoint requests should go to now.
    pub current: Endpoint,
    /// Failovers since the last reset or failback.
    pub attempts: u32,
    /// Failovers ever.
    pub failovers: u64,
    /// Failovers refused because `max_attempts` was used up (or no backup was left).
    pub exhausted: u64,
    /// Automatic returns to a healthy primary.
    pub failbacks: u64,
    /// Explicit `reset_failover` calls.
    pub resets: u64,
}

struct Group {
    /// Primary first, then backups in order.
    chain: Vec<Endpoint>,
    current: usize,
    attempts: u32,
    stats: FailoverStats,
}

/// Where a manager learns endpoint health (a balancer's routing snapshots; implemented by
/// the balancer, which the manager does not otherwise know).
pub(crate) trait HealthView: Send + Sync {
    /// How `address` of `service` is routed now (`None` if it is not a member).
    fn health(&self, service: &str, address: SocketAddr) -> Option<EndpointHealth>;
}

/// Primary/backup failover for named groups.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Endpoint, Error, FailoverConfig, FailoverManager};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let config = FailoverConfig { enabled: true, max_attempts: 3, log_failovers: true };
/// let manager = FailoverManager::new(config);
///
/// // Register failover group
/// let primary = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
/// let backups = vec![
///     Endpoint::new("127.0.0.1:5002".parse().unwrap(), None),
///     Endpoint::new("127.0.0.1:5003".parse().unwrap(), None),
/// ];
/// manager.register("critical-service", primary.clone(), backups.clone()).await?;
///
/// // Trigger failover
/// let next = manager.failover("critical-service", &primary).await?;
/// assert_eq!(next, backups[0]);
///
/// // Reset failover
/// manager.reset_failover("critical-service", &primary).await?;
/// assert_eq!(manager.current("critical-service").await?, primary);
/// # Ok(())
/// # }
/// ```
pub struct FailoverManager {
    config: FailoverConfig,
    failback: bool,
    health: Option<DataArc<dyn HealthView>>,
    groups: Mutex<HashMap<String, Group>>,
}

impl FailoverManager {
    /// A manager with no groups. The configuration is checked when a group is registered.
    pub fn new(config: FailoverConfig) -> Self {
        Self {
            config,
            failback: true,
            health: None,
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Whether [`current`](Self::current) returns to the primary by itself once it is healthy
    /// again (default `true`; needs [`with_health_from`](Self::with_health_from)).
    pub fn with_failback(mut self, failback: bool) -> Self {
        self.failback = failback;
        self
    }

    /// Learns endpoint health from `view` (see `with_health_from`, defined beside the
    /// balancer).
    pub(crate) fn with_health_view(mut self, view: DataArc<dyn HealthView>) -> Self {
        self.health = Some(view);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &FailoverConfig {
        &self.config
    }

    fn healthy(&self, service: &str, endpoint: &Endpoint) -> bool {
        self.health
            .as_ref()
            .and_then(|h| h.health(service, endpoint.address))
            .is_none_or(|h| h == EndpointHealth::Healthy)
    }

    /// Registers (or replaces) the group of `service`: `primary`, then `backups` in order.
    /// The group starts on the primary.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`failover.max_attempts` of 0), [`Error::InvalidServiceName`],
    /// an invalid endpoint, [`Error::InvalidFailoverGroup`] (a backup equal to the primary or
    /// repeated).
    pub async fn register(
        &self,
        service: impl Into<String>,
        primary: Endpoint,
        backups: Vec<Endpoint>,
    ) -> Result<(), Error> {
        self.config.validate()?;
        let service = service.into();
        validate_service_name(&service)?;
        let chain = failover_chain(primary, backups)?;
        let stats = FailoverStats {
            current: chain[0].clone(),
            attempts: 0,
            failovers: 0,
            exhausted: 0,
            failbacks: 0,
            resets: 0,
        };
        self.groups.lock().insert(
            service,
            Group {
                chain,
                current: 0,
                attempts: 0,
                stats,
            },
        );
        Ok(())
    }

    /// Removes the group of `service`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub async fn deregister(&self, service: &str) -> Result<(), Error> {
        self.groups
            .lock()
            .remove(service)
            .map(|_| ())
            .ok_or_else(|| Error::unknown_service(service))
    }

    /// Moves the group of `service` off `current` (which failed) to the next healthy endpoint
    /// after it in order, and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`]; [`Error::FailoverDisabled`] when `enabled` is off;
    /// [`Error::FailoverExhausted`] when `max_attempts` failovers were used since the last
    /// reset or no healthy endpoint is left after `current`; [`Error::UnknownEndpoint`] if
    /// `current` is not in the group.
    pub async fn failover(&self, service: &str, current: &Endpoint) -> Result<Endpoint, Error> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        if !self.config.enabled {
            return Err(Error::FailoverDisabled {
                service: DataArc::from(truncate(service)),
            });
        }
        let from = group
            .chain
            .iter()
            .position(|e| e.address == current.address)
            .ok_or_else(|| Error::UnknownEndpoint {
                service: DataArc::from(truncate(service)),
                address: current.address,
            })?;
        let exhausted = |group: &mut Group| {
            group.stats.exhausted += 1;
            Err(Error::FailoverExhausted {
                service: DataArc::from(truncate(service)),
                attempts: group.attempts,
            })
        };
        if group.attempts >= self.config.max_attempts {
            return exhausted(group);
        }
        let Some(next) = (from + 1..group.chain.len()).find(|&i| self.healthy(service, &group.chain[i]))
        else {
            return exhausted(group);
        };
        group.current = next;
        group.attempts += 1;
        group.stats.failovers += 1;
        group.stats.attempts = group.attempts;
        group.stats.current = group.chain[next].clone();
        if self.config.log_failovers {
            tracing::warn!(
                service,
                from = %current.address,
                to = %group.chain[next].address,
                attempt = group.attempts,
                max_attempts = self.config.max_attempts,
                "failover"
            );
        }
        Ok(group.chain[next].clone())
    }

    /// Returns the group of `service` to `primary` and clears its attempts.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`]; [`Error::InvalidFailoverGroup`] if `primary` is not the
    /// group's primary.
    pub async fn reset_failover(&self, service: &str, primary: &Endpoint) -> Result<(), Error> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        if group.chain[0].address != primary.address {
            return Err(Error::InvalidFailoverGroup {
                reason: format!(
                    "{} is not the primary of `{}`",
                    primary.address,
                    truncate(service)
                ),
            });
        }
        group.current = 0;
        group.attempts = 0;
        group.stats.resets += 1;
        group.stats.attempts = 0;
        group.stats.current = group.chain[0].clone();
        Ok(())
    }

    /// Where requests for `service` should go now. With failback on and health known, a group
    /// away from its primary returns to it as soon as the primary is healthy again.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub async fn current(&self, service: &str) -> Result<Endpoint, Error> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        if group.current != 0
            && self.failback
            && self.health.is_some()
            && self.healthy(service, &group.chain[0])
        {
            if self.config.log_failovers {
                tracing::info!(service, to = %group.chain[0].address, "failback to the primary");
            }
            group.current = 0;
            group.attempts = 0;
            group.stats.failbacks += 1;
            group.stats.attempts = 0;
            group.stats.current = group.chain[0].clone();
        }
        Ok(group.chain[group.current].clone())
    }

    /// The counters of the group of `service`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub fn stats(&self, service: &str) -> Result<FailoverStats, Error> {
        let groups = self.groups.lock();
        let group = groups
            .get(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        Ok(group.stats.clone())
    }
}

impl fmt::Debug for FailoverManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverManager")
            .field("config", &self.config)
            .field("failback", &self.failback)
            .field("groups", &self.groups.lock().len())
            .finish()
    }
}

/// Validates a group and returns its order (primary first).
pub(crate) fn failover_chain(primary: Endpoint, backups: Vec<Endpoint>) -> Result<Vec<Endpoint>, Error> {
    primary.validate()?;
    let mut chain = Vec::with_capacity(1 + backups.len());
    chain.push(primary);
    for backup in backups {
        backup.validate()?;
        if backup.address == chain[0].address {
            return Err(Error::InvalidFailoverGroup {
                reason: format!("backup {} is the primary", backup.address),
            });
        }
        if chain.iter().any(|e| e.address == backup.address) {
            return Err(Error::InvalidFailoverGroup {
                reason: format!("backup {} appears twice", backup.address),
            });
        }
        chain.push(backup);
    }
    Ok(chain)
}
