//! The one door to concurrency primitives.
//!
//! Every other module takes its atomics, `Arc`, locks, the routing-snapshot cell, threads
//! and entropy from here, never from `std::sync`, `arc_swap`, `std::thread` or `fastrand`
//! directly (`.ci/run` greps for violations). Two twins implement the same contract:
//!
//! * `std_impl` (normal builds): `std` atomics and locks, [`arc_swap::ArcSwap`] as the
//!   snapshot cell, `fastrand`'s thread-local generator.
//! * `loom_impl` (`--cfg tai_loadbalancer_loom`): loom's atomics, `Arc`, locks and threads,
//!   a `loom::sync::RwLock<Arc<T>>` stand-in for the snapshot cell (arc-swap is not
//!   loom-aware), and a fixed "random" source so models are deterministic.
//!
//! # What is exported
//!
//! * `Arc`: reference counts the models must see (endpoint state held by pick guards,
//!   published tables, acknowledgements). Under loom this is `loom::sync::Arc`, so a leaked
//!   or double-freed guard is caught.
//! * `DataArc`/`DataWeak`: always `std::sync::Arc`/`Weak`, for immutable shared data
//!   (names, endpoint metadata, membership lists) and for owners whose count the models
//!   do not need to track. loom's `Arc` has no `Weak` and no unsized conversions.
//! * `atomic::*`, `CachePadded`, `Mutex` (poison-tolerant), `Condvar`.
//! * `SnapshotCell<T>`: a cell holding an `Arc<T>`, loaded without locks in normal builds.
//! * `thread::spawn`, `random_below`.
//!
//! # Invariants
//!
//! * Locks are control-plane only: nothing on the pick path takes `Mutex` or `Condvar`.
//! * `SnapshotCell::load` never blocks a reader on a writer in normal builds.
#![allow(dead_code)]

#[cfg(not(tai_loadbalancer_loom))]
mod std_impl;
#[cfg(not(tai_loadbalancer_loom))]
pub(crate) use std_impl::*;

#[cfg(tai_loadbalancer_loom)]
mod loom_impl;
#[cfg(tai_loadbalancer_loom)]
pub(crate) use loom_impl::*;

pub(crate) use crossbeam_utils::CachePadded;
pub(crate) use std::sync::{Arc as DataArc, Weak as DataWeak};
