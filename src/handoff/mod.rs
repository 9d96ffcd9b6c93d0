//! The handoff between writers and the control plane: the commands writers queue, the queue
//! and its acknowledgements ([`queue`]), and the narrow traits through which the control plane
//! reads memberships and health and through which the registry, the health checker and the
//! data plane reach a balancer.
//!
//! A leaf of the module graph (it uses only `sync` and the plain types), so the writers (the
//! registry, the health checker) and the control plane depend on it and not on one another.
//!
//! # Invariants
//!
//! * Every command names exactly one service ([`Command::service`]); the control plane
//!   applies a batch service by service, and acknowledges each command by its service's
//!   outcome.
#![deny(unsafe_code)]

pub(crate) mod queue;

use std::net::SocketAddr;

use crate::endpoint::Endpoint;
use crate::stats::{HealthStatus, ReleasedEndpoint, RoutingUpdate};
use crate::sync::DataArc;
use queue::Ack;

/// A change for the control plane.
#[derive(Debug)]
pub(crate) enum Command {
    /// The membership of this service changed in the registry (or it was created or removed):
    /// read it again.
    Changed(DataArc<str>),
    /// A hash-keyed pick found no ring on this service's table: build rings for it.
    WantRing(DataArc<str>),
    /// The active health of an endpoint of this service changed: read it again.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    HealthChanged(DataArc<str>),
    /// An endpoint reached its consecutive-failure threshold (outlier detection).
    Outlier {
        service: DataArc<str>,
        address: SocketAddr,
    },
    /// An operator marked an endpoint down (`true`) or up again (`false`).
    MarkDown {
        service: DataArc<str>,
        address: SocketAddr,
        down: bool,
    },
    /// Start (`true`) or stop draining an endpoint: no new picks, requests in flight finish.
    Drain {
        service: DataArc<str>,
        address: SocketAddr,
        draining: bool,
    },
    /// Route the service to the first healthy endpoint of this order (`None`: by strategy).
    Failover {
        service: DataArc<str>,
        order: Option<Vec<SocketAddr>>,
    },
}

/// Where the control plane reads memberships from (the registry; a trait so the control
/// plane does not depend on the registry's internals).
pub(crate) trait MembershipSource {
    /// The current membership of `service` (sorted by address) and its version, `None` if
    /// the service does not exist.
    fn membership(&self, service: &str) -> Option<(u64, DataArc<[Endpoint]>)>;
}

/// Where the control plane reads active health from (the health checker).
pub(crate) trait HealthSource: Send + Sync {
    /// Members of `service` currently failing their checks.
    fn unhealthy(&self, service: &str) -> Vec<SocketAddr>;
    /// The check status of one endpoint, for metrics.
    fn status(&self, service: &str, address: SocketAddr) -> Option<HealthStatus>;
}

/// What the control plane tells its subscribers.
#[derive(Clone, Debug)]
pub(crate) enum ControlEvent {
    /// A table was published.
    Published(RoutingUpdate),
    /// A removed endpoint's requests are finished (or abandoned at the drain timeout).
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    Released {
        service: String,
        released: ReleasedEndpoint,
    },
}

/// A subscriber: called for each event on the control plane's thread; must not block.
/// Returns `false` to unsubscribe.
pub(crate) type Watcher = Box<dyn FnMut(&ControlEvent) -> bool + Send>;

impl Command {
    /// The service the command is about.
    pub(crate) fn service(&self) -> &DataArc<str> {
        match self {
            Command::Changed(s) | Command::WantRing(s) | Command::HealthChanged(s) => s,
            Command::Outlier { service, .. }
            | Command::MarkDown { service, .. }
            | Command::Drain { service, .. }
            | Command::Failover { service, .. } => service,
        }
    }
}

// ===== the writers' and the data plane's view of a balancer =====

/// Where the registry announces membership changes: a balancer's control plane.
pub(crate) trait MembershipSink: Send + Sync {
    /// Queues the command; the ack resolves once its effect is published.
    fn submit(&self, command: Command) -> Ack;
    /// Applies queued updates on the caller's thread if the sink has no thread of its own.
    fn help(&self);
    /// Whether the sink was stopped (it is then dropped from the registry).
    fn is_closed(&self) -> bool;
}

/// Who wants to hear about health transitions (a balancer's control plane).
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
pub(crate) trait HealthSink: Send + Sync {
    /// An endpoint of `service` changed state.
    fn health_changed(&self, service: &DataArc<str>);
}

/// Where a run of consecutive failures is reported (the balancer's control plane).
pub(crate) trait OutlierSink: Send + Sync {
    /// `address` of `service` reached its consecutive-failure threshold.
    fn consecutive_failures(&self, service: &DataArc<str>, address: SocketAddr);
}
