//! The balancing strategies, as configured ([`LoadBalancingStrategy`]). How each one picks is
//! `crate::pick`'s business.
#![deny(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a service's requests are spread over its endpoints.
///
/// In TOML: `"round_robin"`, `"random"`, `"least_connections"`, `"weighted"`,
/// `"consistent_hash"`, `"peak_ewma"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancingStrategy {
    /// Each endpoint in turn. Sequential callers see an exact rotation; concurrent callers
    /// share one cursor and are fair within one rotation.
    #[default]
    RoundRobin,
    /// Uniformly at random, from a per-thread generator (scales with cores).
    Random,
    /// The endpoint with fewer requests in flight (per unit of weight) of two chosen at random:
    /// the power of two choices. In-flight counts come from [`Pick`](crate::Pick) guards, so use
    /// [`IntegratedLoadBalancer::pick`](crate::IntegratedLoadBalancer::pick) with this
    /// strategy.
    LeastConnections,
    /// Proportional to [`EndpointMetadata::weight`](crate::EndpointMetadata::weight), in a
    /// smooth deterministic rotation (a 95/5 split sends the 5 % endpoint every 20th request).
    Weighted,
    /// By consistent hash of a request key (see
    /// [`IntegratedLoadBalancer::next_endpoint_with_hash`](crate::IntegratedLoadBalancer::next_endpoint_with_hash)).
    /// Requests without a key are spread at random.
    ConsistentHash,
    /// The endpoint with the lower `latency estimate × (in flight + 1) / weight` of two chosen
    /// at random: Finagle's and tower's Peak-EWMA, which sends traffic away from an endpoint
    /// as soon as it answers slowly and back as it recovers (see
    /// [`PeakEwmaConfig`](crate::PeakEwmaConfig)). The estimate is fed by the latencies
    /// requests report ([`Pick::record`](crate::Pick::record) with a latency, or
    /// [`BalancedChannel`](crate::BalancedChannel), which reports every call's); without
    /// reported latencies it is least connections with one probe per unmeasured endpoint.
    PeakEwma,
}

impl fmt::Display for LoadBalancingStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RoundRobin => "round_robin",
            Self::Random => "random",
            Self::LeastConnections => "least_connections",
            Self::Weighted => "weighted",
            Self::ConsistentHash => "consistent_hash",
            Self::PeakEwma => "peak_ewma",
        })
    }
}
