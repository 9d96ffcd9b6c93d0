//! Normal-build twin of the sync door: `std`, `arc-swap` and `fastrand`.
#![deny(unsafe_code)]

use core::fmt;
use core::ops::Deref;

pub(crate) use std::sync::Arc;

/// Atomics, re-exported from `std`.
pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
    };
}

/// A mutex whose `lock` ignores poisoning.
///
/// The control plane keeps its invariants by publishing whole snapshots, never by leaving
/// half-written state behind a lock, so a panic in one holder does not make the data
/// unusable for the next. Returning the guard keeps one panic from cascading into every
/// later registry call.
#[derive(Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

/// Guard of [`Mutex`].
pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar(std::sync::Condvar);

impl Condvar {
    pub(crate) fn new() -> Self {
        Self(std::sync::Condvar::new())
    }

    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until notified or `timeout` elapses; returns the guard and whether it timed out.
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> (MutexGuard<'a, T>, bool) {
        let (guard, result) = self
            .0
            .wait_timeout(guard, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (guard, result.timed_out())
    }

    pub(crate) fn notify_one(&self) {
        self.0.notify_one();
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// A cell holding the current `Arc<T>`: loaded wait-free, replaced whole.
///
/// Backed by [`arc_swap::ArcSwap`]: a load takes one of the thread's debt slots instead of
/// touching the shared reference count, so readers on different cores do not contend.
pub(crate) struct SnapshotCell<T>(arc_swap::ArcSwap<T>);

/// A loaded snapshot. Keep it on the stack for the length of one decision: arc-swap has a
/// few cheap slots per thread and falls back to a reference-count increment beyond them.
pub(crate) struct Snap<T>(arc_swap::Guard<Arc<T>>);

impl<T> SnapshotCell<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self(arc_swap::ArcSwap::new(value))
    }

    #[inline]
    pub(crate) fn load(&self) -> Snap<T> {
        Snap(self.0.load())
    }

    pub(crate) fn load_full(&self) -> Arc<T> {
        self.0.load_full()
    }

    /// Publishes `value`. `ArcSwap::store` is a `SeqCst` swap: every load that starts after
    /// it returns sees `value` or something newer.
    pub(crate) fn store(&self, value: Arc<T>) {
        self.0.store(value);
    }

    /// Publishes `value` and returns the value it replaces. Every load that returned the old
    /// value and is still held is counted in its reference count by the time this returns
    /// (arc-swap pays its readers' debts), so a count of 1 means nobody else holds it.
    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        self.0.swap(value)
    }
}

impl<T> Deref for Snap<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for SnapshotCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SnapshotCell").field(&**self.0.load()).finish()
    }
}

impl<T: fmt::Debug> fmt::Debug for Snap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// Unbounded channels (event subscriptions): sending never blocks the control plane.
pub(crate) mod mpsc {
    pub(crate) use std::sync::mpsc::{Receiver, channel};
}

/// Threads for the control plane.
pub(crate) mod thread {
    pub(crate) use std::thread::JoinHandle;

    /// Spawns a named OS thread.
    pub(crate) fn spawn<F>(name: String, f: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        std::thread::Builder::new().name(name).spawn(f)
    }

    /// Whether the thread has ended (returned or panicked).
    pub(crate) fn is_finished(handle: &JoinHandle<()>) -> bool {
        handle.is_finished()
    }
}

/// Most per-endpoint counter shards (see [`shard_count`]).
const MAX_SHARDS: usize = 4;

/// Number of counter shards per endpoint: the machine's parallelism, capped at 4, rounded up
/// to a power of two. Computed once per process.
pub(crate) fn shard_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(MAX_SHARDS)
            .next_power_of_two()
    })
}

/// A small number identifying the calling thread, assigned in order of first use. Threads
/// map to counter shards by `ordinal & (shards - 1)`, so consecutive threads use different
/// shards.
#[inline]
pub(crate) fn thread_ordinal() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ORDINAL: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    ORDINAL.with(|ordinal| {
        let v = ordinal.get();
        if v != usize::MAX {
            return v;
        }
        // Relaxed: a ticket; only uniqueness matters.
        let v = NEXT.fetch_add(1, Ordering::Relaxed) & (usize::MAX >> 1);
        ordinal.set(v);
        v
    })
}

/// A uniformly random index in `0..n` from the calling thread's generator (`fastrand`'s
/// wyrand: no shared state, no allocation after the thread's first call). `n` must be > 0.
#[inline]
pub(crate) fn random_below(n: usize) -> usize {
    fastrand::usize(..n)
}

/// A random 64-bit value from the calling thread's generator.
#[inline]
pub(crate) fn random_u64() -> u64 {
    fastrand::u64(..)
}
