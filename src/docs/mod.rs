//! Long-form documentation, rendered by rustdoc (no code).
#![deny(unsafe_code)]

#[doc = include_str!("consistent_hashing.md")]
pub mod consistent_hashing {}

#[doc = include_str!("locality_and_priority.md")]
pub mod locality_and_priority {}

#[cfg(feature = "etcd")]
#[doc = include_str!("fleet.md")]
pub mod fleet {}

#[cfg(feature = "opentelemetry")]
#[doc = include_str!("observability.md")]
pub mod observability {}
