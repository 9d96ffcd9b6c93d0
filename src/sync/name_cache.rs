//! A per-thread cache of the last few name lookups of each thread, validated by a version.
//!
//! Picking by service name (`lb.pick("api")`) would otherwise load the balancer's directory
//! snapshot and hash the name on every pick. The cache keeps, per thread, the last
//! [`WAYS`] `(owner, version, name) → value` entries; a lookup compares the owner's id, the
//! directory version the caller read, and the name's bytes, and runs the caller's closure on
//! the cached value. A directory change bumps the version, so every cached entry of that owner
//! is stale at once.
//!
//! # Invariants
//!
//! * An entry is used only if its owner id (unique per owner for the process's life, never
//!   reused) and its version equal the caller's: a value from an older directory is never
//!   returned.
//! * The cache holds a strong reference to each value it keeps: an entry of a dropped owner
//!   holds its value until the thread replaces the entry or exits.
//! * Nothing is shared between threads: no atomic is written, no lock is taken.
#![deny(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;

use super::DataArc;

/// Entries per thread.
pub(crate) const WAYS: usize = 4;

struct Entry {
    owner: u64,
    version: u64,
    name: DataArc<str>,
    value: DataArc<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct Ways {
    entries: [Option<Entry>; WAYS],
    /// The next entry to replace (round robin).
    next: usize,
}

#[cfg(not(tai_loadbalancer_loom))]
thread_local! {
    static CACHE: RefCell<Ways> = RefCell::default();
}

/// A process-unique id for a cache owner (never reused, unlike an address).
pub(crate) fn owner_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` on the value cached for `(owner, version, name)` if there is one; `None`
/// otherwise (then look it up and [`put`] it).
#[inline]
pub(crate) fn with<T: Any + Send + Sync, R>(
    owner: u64,
    version: u64,
    name: &str,
    f: impl FnOnce(&T) -> R,
) -> Option<R> {
    #[cfg(tai_loadbalancer_loom)]
    {
        let _ = (owner, version, name, f);
        None
    }
    #[cfg(not(tai_loadbalancer_loom))]
    CACHE
        .try_with(|cache| {
            let cache = cache.try_borrow().ok()?;
            let entry = cache.entries.iter().flatten().find(|e| {
                e.owner == owner && e.version == version && e.name.len() == name.len() && *e.name == *name
            })?;
            Some(f(entry.value.downcast_ref::<T>()?))
        })
        .ok()
        .flatten()
}

/// Caches `value` for `(owner, version, name)` in the calling thread, replacing the entry
/// of the same owner and name if there is one, else the oldest.
pub(crate) fn put<T: Any + Send + Sync>(owner: u64, version: u64, name: DataArc<str>, value: DataArc<T>) {
    #[cfg(tai_loadbalancer_loom)]
    let _ = (owner, version, name, value);
    #[cfg(not(tai_loadbalancer_loom))]
    let _ = CACHE.try_with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return;
        };
        let same = cache
            .entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.owner == owner && e.name == name));
        let at = same.unwrap_or_else(|| {
            let at = cache.next;
            cache.next = (at + 1) % WAYS;
            at
        });
        cache.entries[at] = Some(Entry {
            owner,
            version,
            name,
            value,
        });
    });
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    #[test]
    fn hits_only_for_the_same_owner_version_and_name() {
        let owner = owner_id();
        assert_ne!(owner, owner_id(), "ids are unique");
        assert_eq!(with::<u32, _>(owner, 1, "api", |v| *v), None);
        put(owner, 1, DataArc::from("api"), DataArc::new(7u32));
        assert_eq!(with::<u32, _>(owner, 1, "api", |v| *v), Some(7));
        assert_eq!(with::<u32, _>(owner, 2, "api", |v| *v), None, "a newer version");
        assert_eq!(
            with::<u32, _>(owner + 1000, 1, "api", |v| *v),
            None,
            "another owner"
        );
        assert_eq!(with::<u32, _>(owner, 1, "apx", |v| *v), None, "another name");
        assert_eq!(with::<u64, _>(owner, 1, "api", |v| *v), None, "another type");
        // Re-putting the same name replaces its entry instead of taking another way.
        put(owner, 2, DataArc::from("api"), DataArc::new(8u32));
        assert_eq!(with::<u32, _>(owner, 2, "api", |v| *v), Some(8));
        assert_eq!(with::<u32, _>(owner, 1, "api", |v| *v), None);
    }

    #[test]
    fn keeps_the_last_ways_names_per_thread() {
        let owner = owner_id();
        for i in 0..WAYS {
            put(owner, 1, DataArc::from(format!("s{i}").as_str()), DataArc::new(i));
        }
        for i in 0..WAYS {
            assert_eq!(with::<usize, _>(owner, 1, &format!("s{i}"), |v| *v), Some(i));
        }
        put(owner, 1, DataArc::from("s-new"), DataArc::new(99usize));
        let hits = (0..WAYS)
            .filter(|i| with::<usize, _>(owner, 1, &format!("s{i}"), |v| *v).is_some())
            .count();
        assert_eq!(hits, WAYS - 1, "one entry was replaced");
        // Another thread has its own cache.
        std::thread::spawn(move || assert_eq!(with::<usize, _>(owner, 1, "s-new", |v| *v), None))
            .join()
            .unwrap();
    }
}
