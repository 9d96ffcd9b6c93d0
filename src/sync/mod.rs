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

pub(crate) mod arena;
pub(crate) mod name_cache;
#[cfg(not(tai_loadbalancer_loom))]
mod std_impl;
#[cfg(not(tai_loadbalancer_loom))]
pub(crate) use std_impl::*;

#[cfg(tai_loadbalancer_loom)]
mod loom_impl;
#[cfg(tai_loadbalancer_loom)]
pub(crate) use loom_impl::*;

pub(crate) use crossbeam_utils::CachePadded;

/// Time for expiring things (affinity entries): milliseconds on a monotonic clock.
pub(crate) mod clock {
    use super::DataArc;
    use super::atomic::{AtomicU64, Ordering};

    /// A millisecond clock: the system's monotonic clock, or a manual one (fuzzing, tests).
    #[derive(Clone, Debug)]
    pub(crate) enum Clock {
        System,
        Manual(DataArc<AtomicU64>),
    }

    impl Clock {
        pub(crate) fn system() -> Self {
            Clock::System
        }

        #[cfg_attr(not(any(test, fuzzing)), allow(dead_code))]
        pub(crate) fn manual(now: DataArc<AtomicU64>) -> Self {
            Clock::Manual(now)
        }

        /// Milliseconds since an arbitrary, fixed point.
        #[inline]
        pub(crate) fn now_ms(&self) -> u64 {
            match self {
                Clock::System => system_ms(),
                Clock::Manual(now) => now.load(Ordering::Relaxed),
            }
        }
    }

    /// The system clock. With a tokio runtime this is tokio's clock, so tests that pause
    /// time (`tokio::time::pause`) control expiry.
    #[cfg(all(feature = "runtime", not(tai_loadbalancer_loom)))]
    fn system_ms() -> u64 {
        static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        let base = *BASE.get_or_init(tokio::time::Instant::now);
        tokio::time::Instant::now()
            .saturating_duration_since(base)
            .as_millis() as u64
    }

    #[cfg(not(all(feature = "runtime", not(tai_loadbalancer_loom))))]
    fn system_ms() -> u64 {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let base = *BASE.get_or_init(std::time::Instant::now);
        base.elapsed().as_millis() as u64
    }
}
pub(crate) use std::sync::{Arc as DataArc, Weak as DataWeak};
