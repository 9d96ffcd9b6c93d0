//! Loom twin of the sync door: every primitive the models must explore comes from loom.
#![deny(unsafe_code)]

use core::fmt;
use core::ops::Deref;

pub(crate) use loom::sync::Arc;

/// Atomics, re-exported from loom.
pub(crate) mod atomic {
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
    };
}

/// Poison-tolerant mutex over `loom::sync::Mutex`.
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

/// Guard of [`Mutex`].
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Mutex(..)")
    }
}

/// Condition variable over `loom::sync::Condvar`.
#[derive(Debug)]
pub(crate) struct Condvar(loom::sync::Condvar);

impl Default for Condvar {
    fn default() -> Self {
        Self::new()
    }
}

impl Condvar {
    pub(crate) fn new() -> Self {
        Self(loom::sync::Condvar::new())
    }

    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loom has no time: a timed wait is a plain wait that may also wake spuriously, which
    /// the callers handle (they re-check their condition).
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        _timeout: std::time::Duration,
    ) -> (MutexGuard<'a, T>, bool) {
        (self.wait(guard), false)
    }

    pub(crate) fn notify_one(&self) {
        self.0.notify_one();
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// Stand-in for the arc-swap cell with the same contract: a load returns one whole
/// published `Arc<T>`; a store replaces it. Modelled with a loom `RwLock` so the models
/// explore every interleaving of loads and stores.
pub(crate) struct SnapshotCell<T>(loom::sync::RwLock<Arc<T>>);

/// A loaded snapshot (an owned `Arc` in the model).
pub(crate) struct Snap<T>(Arc<T>);

impl<T> SnapshotCell<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self(loom::sync::RwLock::new(value))
    }

    pub(crate) fn load(&self) -> Snap<T> {
        Snap(self.load_full())
    }

    pub(crate) fn load_full(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        let mut slot = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        core::mem::replace(&mut *slot, value)
    }

    pub(crate) fn store(&self, value: Arc<T>) {
        let old = {
            let mut slot = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            core::mem::replace(&mut *slot, value)
        };
        drop(old);
    }
}

impl<T> Deref for Snap<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for SnapshotCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SnapshotCell(..)")
    }
}

impl<T> fmt::Debug for Snap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snap(..)")
    }
}

/// Unbounded channels, from std (event subscriptions are not part of the models).
pub(crate) mod mpsc {
    pub(crate) use std::sync::mpsc::{Receiver, channel};
}

/// Threads for the control plane, from loom.
pub(crate) mod thread {
    pub(crate) use loom::thread::JoinHandle;

    pub(crate) fn spawn<F>(name: String, f: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        loom::thread::Builder::new().name(name).spawn(f)
    }

    /// loom's handles cannot tell; the models never kill the control thread (it ends only
    /// when shut down, and is then joined).
    pub(crate) fn is_finished(_handle: &JoinHandle<()>) -> bool {
        false
    }
}

/// One counter shard under the model.
pub(crate) fn shard_count() -> usize {
    1
}

/// Every model thread maps to shard 0.
pub(crate) fn thread_ordinal() -> usize {
    0
}

/// Deterministic under the model: always the first index.
pub(crate) fn random_below(_n: usize) -> usize {
    0
}

/// Deterministic under the model.
pub(crate) fn random_u64() -> u64 {
    0x9e37_79b9_7f4a_7c15
}
