//! Long-form documentation, rendered by rustdoc (no code).
#![deny(unsafe_code)]

#[doc = include_str!("consistent_hashing.md")]
pub mod consistent_hashing {}

#[cfg(feature = "etcd")]
#[doc = include_str!("fleet.md")]
pub mod fleet {}
