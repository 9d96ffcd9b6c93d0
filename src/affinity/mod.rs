//! Session affinity: a bounded, expiring table from (service, session key) to endpoint.
//!
//! This module owns [`AffinityConfig`], [`AffinityStrategy`] (how a key is derived from a
//! request), [`AffinityRequest`] and [`AffinityManager`] (the table). The balancer uses the
//! table in [`IntegratedLoadBalancer::next_endpoint_with_affinity`](crate::IntegratedLoadBalancer::next_endpoint_with_affinity):
//! the first request for a key goes to the key's consistent-hash owner (so every balancer of
//! a fleet agrees on a fresh key without sharing state), later requests stick to that
//! endpoint while it stays routable.
//!
//! # The table
//!
//! A [`quick_cache`] sharded concurrent cache (a lookup takes one shard's read lock, never a
//! global one) bounded to `max_entries` items. When full, quick_cache evicts by its
//! CLOCK-Pro/S3-FIFO policy: entries used once go first, entries used again survive, which
//! approximates LRU while resisting scans, the same trade HAProxy's stick tables make with
//! their expire-and-evict-oldest policy. An entry expires after `ttl` without use: each hit
//! records its time, and an expired entry is dropped when next touched (or by
//! [`AffinityManager::purge_expired`]).
//!
//! Keys are stored as 128-bit fingerprints of (service, key), not as strings (see
//! `fingerprint`). Memory per entry: about 150 bytes whatever the key's length: the
//! binding (endpoint, service name handle, last use, routing hint: ~100 bytes with its `Arc`
//! header) and quick_cache's slot and index (~50 bytes at the default load);
//! `AffinityManager::memory_used` reports the cache's own part.
//!
//! # Invariants
//!
//! * The table never holds more than `max_entries` entries.
//! * An entry not used for `ttl` is never returned.
#![deny(unsafe_code)]

use std::fmt;
use std::hash::Hasher;
use std::net::SocketAddr;

use crate::config::affinity::{AffinityConfig, validate_key};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::stats::AffinityStats;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{CachePadded, DataArc, clock};
use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, UnitWeighter};

/// Entries the table is sized for at first (it grows up to `max_entries` as keys arrive).
const INITIAL_CAPACITY: usize = 16_384;

// ===== the table =====

/// A 128-bit fingerprint of (service, key): XXH3-128 of the key, seeded with XXH3-64 of the
/// service name. The table stores fingerprints, not key strings, so an entry holds no heap
/// string and a lookup compares one integer. Two distinct keys collide with probability
/// 2^-128 per pair (about 10^-29 for a table of 100,000 keys).
#[inline]
pub(crate) fn fingerprint(service: &str, key: &str) -> u128 {
    let seed = xxhash_rust::xxh3::xxh3_64(service.as_bytes());
    xxhash_rust::xxh3::xxh3_128_with_seed(key.as_bytes(), seed)
}

/// Hashes a fingerprint by folding it (it is uniformly distributed already).
#[derive(Clone, Default)]
struct FoldFingerprint;

#[derive(Default)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used for `u128` keys; kept correct for any other input.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

impl std::hash::BuildHasher for FoldFingerprint {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(0)
    }
}

/// One binding: shared (`Arc`) by the table and the lookups in progress, so a hit records its
/// use (and its routing hint) without rewriting the entry. Everything a hit touches is on
/// this one allocation.
pub(crate) struct Binding {
    pub(crate) endpoint: Endpoint,
    service: DataArc<str>,
    last_used: AtomicU64,
    /// `(table version << 24) | (member index + 1)` of the last table the binding was
    /// resolved against (0: none): a hit on the same table version skips the member search.
    hint: AtomicU64,
}

impl Binding {
    /// The member index recorded for table `version`, if any.
    #[inline]
    pub(crate) fn hint(&self, version: u64) -> Option<usize> {
        let h = self.hint.load(Ordering::Relaxed);
        (h != 0 && h >> 24 == version & ((1 << 40) - 1)).then(|| (h & 0xff_ffff) as usize - 1)
    }

    /// Records that the endpoint is member `index` of table `version`.
    #[inline]
    pub(crate) fn set_hint(&self, version: u64, index: usize) {
        if index < 0xff_ffff {
            let h = ((version & ((1 << 40) - 1)) << 24) | (index as u64 + 1);
            self.hint.store(h, Ordering::Relaxed);
        }
    }
}

/// Counts evictions (quick_cache calls it when the capacity bound removes an entry).
#[derive(Clone, Default)]
struct CountEvictions(DataArc<AtomicU64>);

impl Lifecycle<u128, DataArc<Binding>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: u128, _val: DataArc<Binding>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hit and miss counts, one set per shard of threads (no shared hot line).
#[derive(Default)]
struct ShardStats {
    hits: AtomicU64,
    misses: AtomicU64,
    moved: AtomicU64,
}

/// The session-affinity table.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{AffinityConfig, AffinityManager, Endpoint};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tai_loadbalancer::Error> {
/// let manager = AffinityManager::new(AffinityConfig::default())?;
/// let endpoint = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
/// // Store affinity
/// manager.set_affinity("service", "session-key", endpoint.clone()).await?;
/// // Retrieve affinity
/// if let Some(found) = manager.get_affinity("service", "session-key").await {
///     assert_eq!(found, endpoint);
/// }
/// assert_eq!(manager.len(), 1);
/// # Ok(())
/// # }
/// ```
pub struct AffinityManager {
    config: AffinityConfig,
    cache: Cache<u128, DataArc<Binding>, UnitWeighter, FoldFingerprint, CountEvictions>,
    evictions: DataArc<AtomicU64>,
    stats: Box<[CachePadded<ShardStats>]>,
    expirations: AtomicU64,
    clock: clock::Clock,
}

impl AffinityManager {
    /// An empty table.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a zero `ttl` or `max_entries` (naming the field).
    pub fn new(config: AffinityConfig) -> Result<Self, Error> {
        Self::with_clock(config, clock::Clock::system())
    }

    pub(crate) fn with_clock(config: AffinityConfig, clock: clock::Clock) -> Result<Self, Error> {
        config.validate()?;
        let capacity = config.max_entries;
        let options = OptionsBuilder::new()
            // An initial size, not a reservation: the table grows as keys arrive, so a
            // large `max_entries` costs memory only once it is used.
            .estimated_items_capacity(capacity.min(INITIAL_CAPACITY))
            .weight_capacity(capacity as u64)
            .build()
            .map_err(|e| Error::invalid_config("affinity.max_entries", e.to_string()))?;
        let evictions = CountEvictions::default();
        let counter = evictions.0.clone();
        let cache = Cache::with_options(options, UnitWeighter, FoldFingerprint, evictions);
        Ok(Self {
            config,
            cache,
            evictions: counter,
            stats: (0..crate::sync::shard_count())
                .map(|_| CachePadded::new(ShardStats::default()))
                .collect(),
            expirations: AtomicU64::new(0),
            clock,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AffinityConfig {
        &self.config
    }

    /// Binds `key` of `service` to `endpoint` (replacing any previous binding).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidServiceName`], [`Error::InvalidAffinityKey`] (empty or too long).
    pub async fn set_affinity(&self, service: &str, key: &str, endpoint: Endpoint) -> Result<(), Error> {
        crate::endpoint::validate_service_name(service)?;
        validate_key(key)?;
        self.insert(&DataArc::from(service), fingerprint(service, key), endpoint);
        Ok(())
    }

    /// The endpoint `key` of `service` is bound to, if the binding exists and has not
    /// expired. Counts as a use (restarts the TTL).
    pub async fn get_affinity(&self, service: &str, key: &str) -> Option<Endpoint> {
        self.lookup(fingerprint(service, key)).map(|b| b.endpoint.clone())
    }

    /// Removes the binding of `key`; returns the endpoint it pointed to.
    pub async fn remove_affinity(&self, service: &str, key: &str) -> Option<Endpoint> {
        self.cache
            .remove(&fingerprint(service, key))
            .map(|(_, b)| b.endpoint.clone())
    }

    /// Entries currently held (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Counts a hit whose endpoint had left routing.
    pub(crate) fn note_moved(&self) {
        self.shard_stats().moved.fetch_add(1, Ordering::Relaxed);
    }

    /// Counters.
    pub fn stats(&self) -> AffinityStats {
        AffinityStats {
            hits: self.stats.iter().map(|s| s.hits.load(Ordering::Relaxed)).sum(),
            misses: self.stats.iter().map(|s| s.misses.load(Ordering::Relaxed)).sum(),
            moved: self.stats.iter().map(|s| s.moved.load(Ordering::Relaxed)).sum(),
            expirations: self.expirations.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.cache.len(),
        }
    }

    /// Bytes the table's cache structure uses: its slots and index, with each key as a 16-byte
    /// fingerprint. Each entry's binding (endpoint, service, timestamps) is a separate
    /// allocation of 96 bytes on a 64-bit target, not counted here.
    pub fn memory_used(&self) -> usize {
        let m = self.cache.memory_used();
        m.entries + m.map
    }

    /// Drops every expired entry now; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now_ms();
        let ttl = self.ttl_ms();
        let before = self.cache.len();
        self.cache
            .retain(|_, e| now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < ttl);
        let dropped = before.saturating_sub(self.cache.len());
        self.expirations.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Drops up to `limit` bindings of `service` to `address`; returns how many.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn unbind(&self, service: &str, address: SocketAddr, limit: usize) -> usize {
        let removed = AtomicU64::new(0);
        self.cache.retain(|_, b| {
            if *b.service == *service
                && b.endpoint.address == address
                && removed.load(Ordering::Relaxed) < limit as u64
            {
                removed.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
        removed.load(Ordering::Relaxed) as usize
    }

    /// Drops every binding of `service` whose endpoint address matches `pred`; returns how many.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn unbind_where(&self, service: &str, pred: impl Fn(SocketAddr) -> bool) -> usize {
        let removed = AtomicU64::new(0);
        self.cache.retain(|_, b| {
            let drop = *b.service == *service && pred(b.endpoint.address);
            if drop {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            !drop
        });
        removed.load(Ordering::Relaxed) as usize
    }

    /// How many bindings of `service` point at `address`.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn count_bound(&self, service: &str, address: SocketAddr) -> usize {
        self.cache
            .iter()
            .filter(|(_, b)| *b.service == *service && b.endpoint.address == address)
            .count()
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    #[inline]
    fn shard_stats(&self) -> &ShardStats {
        &self.stats[crate::sync::thread_ordinal() & (self.stats.len() - 1)]
    }

    /// A live binding, recording its use.
    #[inline]
    pub(crate) fn lookup(&self, fingerprint: u128) -> Option<DataArc<Binding>> {
        let Some(binding) = self.cache.get(&fingerprint) else {
            self.shard_stats().misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let now = self.clock.now_ms();
        let ttl = self.ttl_ms();
        // Relaxed: a timestamp, only compared with the TTL.
        let last = binding.last_used.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= ttl {
            if self
                .cache
                .remove_if(&fingerprint, |b| {
                    now.saturating_sub(b.last_used.load(Ordering::Relaxed)) >= ttl
                })
                .is_some()
            {
                self.expirations.fetch_add(1, Ordering::Relaxed);
            }
            self.shard_stats().misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if last != now {
            binding.last_used.store(now, Ordering::Relaxed);
        }
        self.shard_stats().hits.fetch_add(1, Ordering::Relaxed);
        Some(binding)
    }

    /// Binds without validation (the balancer has validated already).
    pub(crate) fn insert(&self, service: &DataArc<str>, fingerprint: u128, endpoint: Endpoint) {
        let binding = Binding {
            endpoint,
            service: service.clone(),
            last_used: AtomicU64::new(self.clock.now_ms()),
            hint: AtomicU64::new(0),
        };
        self.cache.insert(fingerprint, DataArc::new(binding));
    }
}

impl fmt::Debug for AffinityManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AffinityManager")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Fuzzing access to an affinity table on a manual clock (built only under `cfg(fuzzing)`).
#[cfg(fuzzing)]
#[derive(Debug)]
pub struct FuzzAffinity {
    /// The table.
    pub table: AffinityManager,
    /// Its clock: milliseconds, advanced by the fuzzer.
    pub now: DataArc<AtomicU64>,
}

#[cfg(fuzzing)]
impl FuzzAffinity {
    /// A table with a manual clock starting at 0.
    pub fn new(config: AffinityConfig) -> Result<Self, Error> {
        let now = DataArc::new(AtomicU64::new(0));
        Ok(Self {
            table: AffinityManager::with_clock(config, clock::Clock::manual(now.clone()))?,
            now,
        })
    }

    /// Looks up (synchronously).
    pub fn get(&self, service: &str, key: &str) -> Option<Endpoint> {
        self.table
            .lookup(fingerprint(service, key))
            .map(|b| b.endpoint.clone())
    }

    /// Unbinds (synchronously).
    pub fn remove(&self, service: &str, key: &str) -> Option<Endpoint> {
        self.table
            .cache
            .remove(&fingerprint(service, key))
            .map(|(_, b)| b.endpoint.clone())
    }

    /// Binds (synchronously, validated).
    pub fn set(&self, service: &str, key: &str, endpoint: Endpoint) -> Result<(), Error> {
        crate::endpoint::validate_service_name(service)?;
        validate_key(key)?;
        self.table
            .insert(&DataArc::from(service), fingerprint(service, key), endpoint);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::affinity::AffinityStrategy;

    #[test]
    fn bounded_and_expiring() {
        let now = DataArc::new(AtomicU64::new(0));
        let config = AffinityConfig {
            strategy: AffinityStrategy::CustomKey,
            ttl: Duration::from_millis(100),
            max_entries: 50,
        };
        let m = AffinityManager::with_clock(config, clock::Clock::manual(now.clone())).unwrap();
        let e = Endpoint::new("127.0.0.1:1".parse().unwrap(), None);
        let s: DataArc<str> = DataArc::from("s");
        for i in 0..500 {
            m.insert(&s, fingerprint("s", &format!("k{i}")), e.clone());
            assert!(m.len() <= 50);
        }
        assert!(m.stats().evictions >= 450);
        let live = fingerprint("s", "live");
        m.insert(&s, live, e.clone());
        now.store(60, Ordering::Relaxed);
        assert!(m.lookup(live).is_some()); // used at 60: lives until 160
        now.store(150, Ordering::Relaxed);
        assert!(m.lookup(live).is_some());
        now.store(251, Ordering::Relaxed);
        assert!(m.lookup(live).is_none(), "unused for 101 ms > ttl");
        assert_eq!(m.stats().expirations, 1);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_binding_fits_the_documented_96_bytes() {
        // An `Arc` allocation is the value plus two counters.
        assert!(
            std::mem::size_of::<Binding>() + 16 <= 96,
            "{}",
            std::mem::size_of::<Binding>()
        );
    }
}
