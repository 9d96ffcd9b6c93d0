//! Circuit breakers: a service's limits on requests in flight, calls waiting for a connection,
//! retries in flight and connections per endpoint (Envoy's thresholds), checked with atomic
//! counters.
//!
//! One [`Breaker`] belongs to one service's counter arena (it lives in the service's
//! `ServiceContext`, so every table, pick and channel of the service shares it), and exists
//! only when one of its limits is set. Each limit is an admission counter:
//!
//! * [`Breaker::admit`] adds one and keeps it if the count before was under the limit;
//!   otherwise it takes the one back, counts the refusal and answers
//!   [`Error::CircuitOpen`]. One `fetch_add` (and a `fetch_sub` when refused or released): no
//!   lock, no loop, no allocation.
//! * A refused admission's transient increment can make a racing admission see the service
//!   one fuller than it is, so under contention a call may be refused one early; never is
//!   one admitted over the limit (the count is at least the number admitted at every
//!   instant, and admission needs it under the limit).
//!
//! Connections per endpoint are counted under a lock, in a map by address: they are
//! opened and closed on the connection path, never per pick.
//!
//! # Invariants
//!
//! * Every admission that returned `Ok(true)` is released exactly once (by the guard or
//!   the [`Pick`](crate::Pick) that holds it).
//! * `open[limit]` counts every refusal of that limit, once.
#![deny(unsafe_code)]
// Pending calls, retries and connections are the gRPC channel's (feature `grpc`).
#![cfg_attr(not(feature = "grpc"), allow(dead_code))]

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use crate::config::circuit_breakers::CircuitBreakerConfig;
use crate::error::{CircuitLimit, Error};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{CachePadded, DataArc, Mutex};

/// A service's circuit breakers: limits and the counters they are checked against.
pub(crate) struct Breaker {
    service: DataArc<str>,
    limits: CircuitBreakerConfig,
    /// Admitted and not released, per limit (`MaxConnectionsPerEndpoint` counts every
    /// connection of the service). Padded: every admission of a busy service writes them.
    active: [CachePadded<AtomicU64>; 4],
    /// Refusals per limit.
    open: [AtomicU64; 4],
    /// Connections per endpoint.
    connections: Mutex<HashMap<SocketAddr, u32, ahash::RandomState>>,
}

/// What a metrics read sees of a breaker: the limits and counters of every limit, by
/// [`CircuitLimit::index`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BreakerCounts {
    pub(crate) limits: CircuitBreakerConfig,
    pub(crate) active: [u64; 4],
    pub(crate) open: [u64; 4],
}

impl Breaker {
    /// The breaker of `service` with `limits`, or `None` when no limit is set (nothing to
    /// check).
    pub(crate) fn new(service: DataArc<str>, limits: CircuitBreakerConfig) -> Option<DataArc<Breaker>> {
        limits.is_set().then(|| {
            DataArc::new(Breaker {
                service,
                limits,
                active: Default::default(),
                open: Default::default(),
                connections: Mutex::new(HashMap::default()),
            })
        })
    }

    /// Whether `limit` is set.
    #[inline]
    pub(crate) fn limits(&self, limit: CircuitLimit) -> bool {
        self.limits.limit(limit).is_some()
    }

    /// Admits one more under `limit`: `Ok(true)` if it was counted (release it once),
    /// `Ok(false)` if `limit` is not set (nothing to release), `Err` (and the refusal
    /// counted) if the service is at the limit.
    #[inline]
    pub(crate) fn admit(&self, limit: CircuitLimit) -> Result<bool, Error> {
        let Some(max) = self.limits.limit(limit) else {
            return Ok(false);
        };
        // Relaxed: an admission counter publishes nothing; what matters is that the
        // read-modify-write is atomic, so every increment sees every earlier one.
        let active = &self.active[limit.index()];
        if active.fetch_add(1, Ordering::Relaxed) < u64::from(max) {
            return Ok(true);
        }
        active.fetch_sub(1, Ordering::Relaxed);
        Err(self.refused(limit))
    }

    /// Whether one more would be admitted under `limit` now (for unguarded selections,
    /// which hold nothing); counts a refusal when not.
    #[inline]
    pub(crate) fn check(&self, limit: CircuitLimit) -> Result<(), Error> {
        match self.limits.limit(limit) {
            Some(max) if self.active[limit.index()].load(Ordering::Relaxed) >= u64::from(max) => {
                Err(self.refused(limit))
            }
            _ => Ok(()),
        }
    }

    /// Releases one admission of `limit` that returned `Ok(true)`.
    #[inline]
    pub(crate) fn release(&self, limit: CircuitLimit) {
        // Relaxed: see `admit`.
        self.active[limit.index()].fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a refusal of `limit` and returns its error.
    #[cold]
    pub(crate) fn refused(&self, limit: CircuitLimit) -> Error {
        // Relaxed: a statistic.
        self.open[limit.index()].fetch_add(1, Ordering::Relaxed);
        Error::CircuitOpen {
            service: self.service.clone(),
            limit,
            max: self.limits.limit(limit).unwrap_or(0),
        }
    }

    /// Counts one more connection to `address` if it has fewer than
    /// `max_connections_per_endpoint` (always, without that limit); otherwise the refusal is
    /// counted and returned.
    pub(crate) fn open_connection(&self, address: SocketAddr) -> Result<(), Error> {
        let mut connections = self.connections.lock();
        let n = connections.entry(address).or_insert(0);
        if let Some(max) = self.limits.max_connections_per_endpoint {
            if *n >= max {
                drop(connections);
                return Err(self.refused(CircuitLimit::MaxConnectionsPerEndpoint));
            }
        }
        *n += 1;
        // Relaxed: a gauge for metrics; the map under the lock is what is checked.
        self.active[CircuitLimit::MaxConnectionsPerEndpoint.index()].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts one connection to `address` fewer.
    pub(crate) fn close_connection(&self, address: SocketAddr) {
        let mut connections = self.connections.lock();
        if let Some(n) = connections.get_mut(&address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                connections.remove(&address);
            }
            self.active[CircuitLimit::MaxConnectionsPerEndpoint.index()].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Connections counted to `address`.
    #[cfg(test)]
    pub(crate) fn connections(&self, address: SocketAddr) -> u32 {
        self.connections.lock().get(&address).copied().unwrap_or(0)
    }

    /// The limits and counters now.
    pub(crate) fn counts(&self) -> BreakerCounts {
        BreakerCounts {
            limits: self.limits,
            active: CircuitLimit::ALL.map(|l| self.active[l.index()].load(Ordering::Relaxed)),
            open: CircuitLimit::ALL.map(|l| self.open[l.index()].load(Ordering::Relaxed)),
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("service", &self.service)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// One admission under a limit, released when dropped (the channel's pending calls and
/// retries).
#[must_use = "dropping an admission releases it"]
pub(crate) struct Admission {
    breaker: DataArc<Breaker>,
    limit: CircuitLimit,
}

impl Admission {
    /// Admits one under `limit` of `breaker`: `Ok(None)` when the limit is not set.
    pub(crate) fn take(breaker: &DataArc<Breaker>, limit: CircuitLimit) -> Result<Option<Admission>, Error> {
        Ok(breaker.admit(limit)?.then(|| Admission {
            breaker: breaker.clone(),
            limit,
        }))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.breaker.release(self.limit);
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission").field("limit", &self.limit).finish()
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    fn breaker(limits: CircuitBreakerConfig) -> DataArc<Breaker> {
        Breaker::new(DataArc::from("svc"), limits).expect("a limit is set")
    }

    #[test]
    fn no_limit_no_breaker() {
        assert!(Breaker::new(DataArc::from("svc"), CircuitBreakerConfig::default()).is_none());
    }

    #[test]
    fn admits_up_to_the_limit_and_counts_refusals() {
        let b = breaker(CircuitBreakerConfig {
            max_requests: Some(2),
            ..Default::default()
        });
        assert_eq!(b.admit(CircuitLimit::MaxRequests), Ok(true));
        assert_eq!(b.admit(CircuitLimit::MaxRequests), Ok(true));
        match b.admit(CircuitLimit::MaxRequests) {
            Err(Error::CircuitOpen { service, limit, max }) => {
                assert_eq!((&*service, limit, max), ("svc", CircuitLimit::MaxRequests, 2));
            }
            other => panic!("{other:?}"),
        }
        assert!(b.check(CircuitLimit::MaxRequests).is_err());
        b.release(CircuitLimit::MaxRequests);
        assert!(b.check(CircuitLimit::MaxRequests).is_ok());
        assert_eq!(b.admit(CircuitLimit::MaxRequests), Ok(true));
        // Limits that are not set admit without counting.
        assert_eq!(b.admit(CircuitLimit::MaxPending), Ok(false));
        let counts = b.counts();
        assert_eq!(counts.active[CircuitLimit::MaxRequests.index()], 2);
        assert_eq!(counts.open[CircuitLimit::MaxRequests.index()], 2);
        assert_eq!(counts.open[CircuitLimit::MaxPending.index()], 0);
    }

    #[test]
    fn admissions_release_on_drop() {
        let b = breaker(CircuitBreakerConfig {
            max_retries: Some(1),
            ..Default::default()
        });
        let first = Admission::take(&b, CircuitLimit::MaxRetries).unwrap();
        assert!(first.is_some());
        assert!(Admission::take(&b, CircuitLimit::MaxRetries).is_err());
        drop(first);
        assert!(Admission::take(&b, CircuitLimit::MaxRetries).unwrap().is_some());
        assert!(Admission::take(&b, CircuitLimit::MaxPending).unwrap().is_none());
    }

    #[test]
    fn connections_per_endpoint() {
        let b = breaker(CircuitBreakerConfig {
            max_connections_per_endpoint: Some(2),
            ..Default::default()
        });
        let (a, c) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        assert!(b.open_connection(a).is_ok() && b.open_connection(a).is_ok());
        assert!(b.open_connection(a).is_err(), "a third to the same endpoint");
        assert!(b.open_connection(c).is_ok(), "another endpoint has its own count");
        b.close_connection(a);
        assert!(b.open_connection(a).is_ok());
        assert_eq!(b.connections(a), 2);
        let counts = b.counts();
        assert_eq!(counts.active[CircuitLimit::MaxConnectionsPerEndpoint.index()], 3);
        assert_eq!(counts.open[CircuitLimit::MaxConnectionsPerEndpoint.index()], 1);
    }

    /// Many threads admitting and releasing at once: the number admitted never exceeds
    /// the limit, and every refusal is counted.
    #[test]
    fn never_over_the_limit_under_contention() {
        let b = breaker(CircuitBreakerConfig {
            max_requests: Some(3),
            ..Default::default()
        });
        let held = DataArc::new(AtomicU64::new(0));
        let worst = DataArc::new(AtomicU64::new(0));
        let refused = DataArc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        match b.admit(CircuitLimit::MaxRequests) {
                            Ok(true) => {
                                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                                worst.fetch_max(now, Ordering::SeqCst);
                                held.fetch_sub(1, Ordering::SeqCst);
                                b.release(CircuitLimit::MaxRequests);
                            }
                            Ok(false) => unreachable!("the limit is set"),
                            Err(_) => {
                                refused.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                });
            }
        });
        assert!(worst.load(Ordering::SeqCst) <= 3);
        assert_eq!(
            b.counts().open[CircuitLimit::MaxRequests.index()],
            refused.load(Ordering::SeqCst)
        );
        assert_eq!(b.counts().active[CircuitLimit::MaxRequests.index()], 0);
    }
}
