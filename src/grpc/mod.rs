//! The gRPC integration (feature `grpc`): [`BalancedChannel`], a tower service that generated
//! tonic clients accept and that routes every call through the balancer's data plane, with
//! failover on the request path ([`RetryPolicy`], [`Idempotent`]) and outcome reporting
//! ([`BalancedBody`]).
//!
//! This module owns the request path of a call (key extraction, pick, send, retry, deadline,
//! outcome); it owns no routing state: membership, health and load live in the balancer, and
//! a call only reads the current snapshot.

mod body;
mod channel;
#[cfg(feature = "opentelemetry")]
mod otel;
mod retry;
mod trace;

pub use body::BalancedBody;
pub use channel::{
    BalancedChannel, BalancedChannelBuilder, BoxError, DEFAULT_MAX_STREAMS_PER_CONNECTION, KeyExtractorFn,
    MAX_CONNECTIONS_PER_ENDPOINT, RequestHash, ResponseFuture,
};
pub use retry::{Idempotent, MAX_ATTEMPTS, RetryPolicy};
