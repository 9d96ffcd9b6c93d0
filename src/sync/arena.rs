//! The dense counter arena: every endpoint's per-request counters, in per-shard arrays indexed
//! by a stable slot, and the reclamation that lets a guard outlive the tables it came from.
//!
//! One arena belongs to one service. The control plane ([`ArenaOwner`]) gives each endpoint
//! generation a [`SlotId`] and a record `R` (its endpoint, its outcome bookkeeping). Routing
//! tables hold [`View`]s: arrays of slots with a payload each (the endpoint's address and
//! weight, in the order a strategy indexes them). A pick reads a view and takes a [`Lease`] on
//! one slot: a guard that holds one request in flight there.
//!
//! # Layout
//!
//! Slots live in segments of `16 << k` slots (`k < 24`), allocated as the service grows and
//! never moved, so a slot's counters never change address. Within a segment, each *shard* of
//! threads has its own rows: `load` (8 bytes per slot: requests in flight in the low 24 bits,
//! selections in the high 40), `aux` (8 bytes: a strategy's per-slot estimate, Peak-EWMA's)
//! and `cold` (24 bytes: successes, failures, and the base for counting selections past
//! 2^40). A random pick over 65,536 endpoints touches a 1 MiB array of entries and a 512 KiB
//! array of loads per shard: both stay in a core's L2, where a per-endpoint structure of 192
//! bytes per shard (12 MiB) did not.
//!
//! # Reclamation: why counted slots, not an epoch scheme
//!
//! A [`Lease`] is held across I/O, for as long as a request takes, and moves between threads
//! with its task. An epoch scheme (crossbeam-epoch, seize) protects memory for the length of a
//! pinned *critical section*: pinning across a request would stall reclamation for every
//! service and is not `Send`. What a lease needs protected is exactly one slot, and the count
//! that protects it already exists: the slot's in-flight count, which the pick increments and
//! the guard's drop decrements anyway. So a slot is generation-tagged by the control plane's
//! bookkeeping instead: a slot is recycled (its record replaced, its counters reset for a new
//! endpoint) only when
//!
//! 1. it was retired (no new view may contain it),
//! 2. no view contains it (each slot counts the views that contain it; views are dropped with
//!    their tables), and
//! 3. nothing is in flight on it in any shard.
//!
//! (1) and (2) mean no pick can start on the slot any more, since picks only go through views;
//! (3) then means no lease of the previous owner is alive. No reference count is written per
//! pick beyond the in-flight count itself.
//!
//! The arena's memory is freed when its last handle (the owner and the views) is gone *and*
//! nothing is in flight; a service dropped while leases are out is handed to a reaper thread
//! that frees it once they end.
//!
//! # Invariants (what makes the `unsafe` below sound)
//!
//! * A segment is allocated once, published before any view that uses it, and freed only with
//!   the arena.
//! * A slot's record is written only by [`ArenaOwner`] (`&mut self`), and only while the slot
//!   is free (conditions 1-3), so no `&R` handed out by a view or a lease can alias a write.
//! * A view holds an owner count; a lease holds one request in flight; the arena is freed only
//!   when there is neither.
#![allow(unsafe_code)]

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;
use std::cell::UnsafeCell;

use super::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

/// Requests in flight: the low 24 bits of a slot's load word.
const IN_FLIGHT_MASK: u64 = (1 << 24) - 1;
/// Selections: the high 40 bits.
const SELECTION_SHIFT: u32 = 24;
/// One more selection and one more request in flight, in one add.
const ACQUIRE: u64 = 1 | (1 << SELECTION_SHIFT);
/// One more selection.
const SELECT: u64 = 1 << SELECTION_SHIFT;
/// Selections wrap at this in the load word.
const SELECTION_WRAP: u64 = 1 << (64 - SELECTION_SHIFT);

/// Compare-and-swap attempts of [`View::try_lease`] before it counts a contended slot as full.
pub(crate) const TRY_LEASE_ATTEMPTS: usize = 4;

/// Slots of segment 0; segment `k` has `BASE << k`.
const BASE_SHIFT: u32 = 4;
/// Segments per arena: up to `16 × (2^24 − 1)` slots.
const MAX_SEGMENTS: usize = 24;
/// Bits of a [`SlotId`] that index within a segment.
const INDEX_BITS: u32 = 27;
/// Row stride granularity, in `u64`s: 128 bytes, so shards' rows never share a line (or the
/// adjacent-line prefetcher's pair).
const ROW_ALIGN: usize = 16;

/// A slot: segment number in the top 5 bits, index within the segment below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SlotId(u32);

impl SlotId {
    #[inline]
    fn segment(self) -> usize {
        (self.0 >> INDEX_BITS) as usize
    }

    #[inline]
    fn index(self) -> usize {
        (self.0 & ((1 << INDEX_BITS) - 1)) as usize
    }

    fn new(segment: usize, index: usize) -> SlotId {
        debug_assert!(segment < MAX_SEGMENTS && index < (BASE_LEN << segment));
        SlotId(((segment as u32) << INDEX_BITS) | index as u32)
    }

    /// The `n`-th slot ever created (segments fill in order).
    fn nth(n: usize) -> Option<SlotId> {
        // Segment k starts at BASE_LEN * (2^k - 1).
        let scaled = n / BASE_LEN + 1;
        let segment = (usize::BITS - 1 - scaled.leading_zeros()) as usize;
        if segment >= MAX_SEGMENTS {
            return None;
        }
        let start = BASE_LEN * ((1 << segment) - 1);
        Some(SlotId::new(segment, n - start))
    }

    /// A plain number for maps and logs.
    pub(crate) fn raw(self) -> u32 {
        self.0
    }
}

const BASE_LEN: usize = 1 << BASE_SHIFT;

/// Counters of one slot, summed over shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlotCounters {
    pub(crate) in_flight: u64,
    pub(crate) selections: u64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
}

// ===== segments =====

struct SlotMeta<R> {
    /// `Some` while the slot belongs to an endpoint (live or retired), `None` when free.
    record: UnsafeCell<Option<R>>,
    /// Views that contain the slot.
    views: AtomicU32,
}

struct Segment<R> {
    slots: Box<[SlotMeta<R>]>,
    /// `shards × stride` words: in flight (low 24 bits) and selections (high 40).
    load: Box<[AtomicU64]>,
    /// `shards × stride` words for the strategy's estimate (none unless the arena has them).
    aux: Box<[AtomicU64]>,
    /// `shards × stride × 3` words: successes, failures, selection base.
    cold: Box<[AtomicU64]>,
    stride: usize,
}

fn atomics(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl<R> Segment<R> {
    fn new(len: usize, shards: usize, aux: bool) -> Self {
        let stride = len.div_ceil(ROW_ALIGN) * ROW_ALIGN;
        Segment {
            slots: (0..len)
                .map(|_| SlotMeta {
                    record: UnsafeCell::new(None),
                    views: AtomicU32::new(0),
                })
                .collect(),
            load: atomics(shards * stride),
            aux: atomics(if aux { shards * stride } else { 0 }),
            cold: atomics(shards * stride * 3),
            stride,
        }
    }

    #[inline]
    fn load(&self, index: usize, shard: usize) -> &AtomicU64 {
        &self.load[shard * self.stride + index]
    }

    #[inline]
    fn aux(&self, index: usize, shard: usize) -> &AtomicU64 {
        &self.aux[shard * self.stride + index]
    }

    #[inline]
    fn cold(&self, index: usize, shard: usize) -> &[AtomicU64] {
        let at = (shard * self.stride + index) * 3;
        &self.cold[at..at + 3]
    }
}

// ===== the shared part =====

struct Inner<R, C> {
    /// Handles alive: the owner and every view.
    owners: AtomicUsize,
    shards: usize,
    /// Whether slots have an `aux` word.
    aux: bool,
    /// Requests in flight over every slot, per shard (empty unless the arena keeps them:
    /// bounded-load hashing compares an endpoint's load with the average).
    totals: Box<[super::CachePadded<AtomicU64>]>,
    context: C,
    segments: [AtomicPtr<Segment<R>>; MAX_SEGMENTS],
}

impl<R, C> Inner<R, C> {
    /// Segment `k`. Every slot id a caller holds was created by the owner after allocating
    /// its segment, and reached the caller through a view published after that.
    #[inline]
    fn segment(&self, slot: SlotId) -> &Segment<R> {
        // Relaxed: the segment was stored before the view (or lease) that carries `slot` was
        // published to this thread, which orders the store before this load.
        let ptr = self.segments[slot.segment()].load(Ordering::Relaxed);
        debug_assert!(!ptr.is_null(), "slot {slot:?} of an unallocated segment");
        // SAFETY: segments are allocated before any slot of theirs is handed out and freed
        // only with the arena (see the module's invariants); the caller holds a handle or a
        // lease, so the arena is alive.
        unsafe { &*ptr }
    }

    /// Whether nothing is in flight anywhere. `Acquire` pairs with the leases' `Release`
    /// decrements: everything they did before ending is visible.
    fn idle(&self) -> bool {
        self.segments.iter().all(|s| {
            let ptr = s.load(Ordering::Acquire);
            // SAFETY: a non-null segment pointer stays valid until the arena is freed, and
            // the caller is the arena's last user.
            ptr.is_null()
                || unsafe { &*ptr }
                    .load
                    .iter()
                    .all(|w| w.load(Ordering::Acquire) & IN_FLIGHT_MASK == 0)
        })
    }

    fn counters(&self, slot: SlotId) -> SlotCounters {
        let segment = self.segment(slot);
        let mut total = SlotCounters::default();
        for shard in 0..self.shards {
            let load = segment.load(slot.index(), shard).load(Ordering::Acquire);
            let cold = segment.cold(slot.index(), shard);
            total.in_flight += load & IN_FLIGHT_MASK;
            total.selections += selections(load, cold[2].load(Ordering::Relaxed));
            total.successes += cold[0].load(Ordering::Relaxed);
            total.failures += cold[1].load(Ordering::Relaxed);
        }
        total
    }
}

/// Selections counted by a shard's load word, given the last folded base: the base plus
/// what the 40-bit field advanced since (modulo 2^40). Exact while the base is folded at
/// least once per 2^40 selections of one slot in one shard (the control plane folds every
/// minute, and at every metrics read; 2^40 selections take hours even at one core's
/// maximum rate).
#[inline]
fn selections(load: u64, base: u64) -> u64 {
    let field = load >> SELECTION_SHIFT;
    base + (field.wrapping_sub(base) & (SELECTION_WRAP - 1))
}

/// Frees `inner` (which nothing uses any more).
///
/// # Safety
///
/// `inner` came from `Box::into_raw`, has no handle left, and nothing is in flight.
unsafe fn free<R, C>(inner: NonNull<Inner<R, C>>) {
    // SAFETY: per the contract, this is the only reference.
    let inner = unsafe { Box::from_raw(inner.as_ptr()) };
    for s in &inner.segments {
        let ptr = s.load(Ordering::Acquire);
        if !ptr.is_null() {
            // SAFETY: segments come from `Box::into_raw` and are freed only here, once.
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

/// Drops one handle of `inner`; the last one frees the arena, or hands it to the reaper
/// while requests are still in flight.
fn release<R: Send + Sync + 'static, C: Send + Sync + 'static>(inner: NonNull<Inner<R, C>>) {
    // SAFETY: the caller held a handle, so the arena is alive until this decrement.
    let owners = unsafe { inner.as_ref() }.owners.fetch_sub(1, Ordering::Release);
    if owners != 1 {
        return;
    }
    // Acquire, as in `Arc::drop`: every use through the other handles happened before.
    fence(Ordering::Acquire);
    // SAFETY: no handle is left, so no new lease can be taken; only leases may remain.
    if unsafe { inner.as_ref() }.idle() {
        // SAFETY: no handle and nothing in flight.
        unsafe { free(inner) };
    } else {
        reaper::adopt(Orphan(inner.cast(), idle_erased::<R, C>, free_erased::<R, C>));
    }
}

fn idle_erased<R, C>(inner: NonNull<()>) -> bool {
    // SAFETY: `Orphan` pairs the pointer with the functions of its own type.
    unsafe { inner.cast::<Inner<R, C>>().as_ref() }.idle()
}

fn free_erased<R, C>(inner: NonNull<()>) {
    // SAFETY: called by the reaper once `idle_erased` said nothing is in flight; no handle
    // is left (the arena was orphaned by its last one).
    unsafe { free(inner.cast::<Inner<R, C>>()) }
}

/// An arena whose handles are all gone while leases are still out.
struct Orphan(NonNull<()>, fn(NonNull<()>) -> bool, fn(NonNull<()>));

// SAFETY: an orphan is only ever touched by the reaper, and its `R` and `C` are Send + Sync
// (required by `release`).
unsafe impl Send for Orphan {}

/// Frees orphaned arenas once their last leases end.
mod reaper {
    use super::Orphan;

    static ORPHANS: std::sync::Mutex<Vec<Orphan>> = std::sync::Mutex::new(Vec::new());

    /// Takes `orphan` and makes sure a reaper runs.
    pub(super) fn adopt(orphan: Orphan) {
        let mut orphans = ORPHANS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = orphans.is_empty();
        orphans.push(orphan);
        drop(orphans);
        #[cfg(not(tai_loadbalancer_loom))]
        if start {
            // A short-lived thread: it exits once every orphan is freed. If the OS refuses a
            // thread, the orphans wait for the next one (or for `reap` from a later orphan).
            let _ = std::thread::Builder::new()
                .name("tai-lb-reaper".into())
                .spawn(|| {
                    while reap() > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                });
        }
        #[cfg(tai_loadbalancer_loom)]
        let _ = start;
    }

    /// Frees the orphans that are idle now; returns how many are left.
    pub(crate) fn reap() -> usize {
        let mut orphans = ORPHANS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        orphans.retain(|o| {
            if (o.1)(o.0) {
                (o.2)(o.0);
                false
            } else {
                true
            }
        });
        orphans.len()
    }
}

#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use reaper::reap as reap_orphans;

// ===== the owner =====

/// Whether a slot belongs to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Live,
    Retired,
}

/// The control plane's handle of one arena: the only one that changes slots.
pub(crate) struct ArenaOwner<R: Send + Sync + 'static, C: Send + Sync + 'static> {
    inner: NonNull<Inner<R, C>>,
    /// State of every slot created so far, by creation order (`SlotId::nth`).
    states: Vec<SlotState>,
    /// Free slots, reused last-freed first (their lines are the warmest).
    free: Vec<SlotId>,
    /// Retired slots waiting for their views and leases.
    retired: Vec<SlotId>,
    _owns: PhantomData<(R, C)>,
}

// SAFETY: the owner hands out `&R` and `&C` (shared across threads: `Sync`) and moves `R`
// values in and out (`Send`); the raw pointer is to memory it co-owns.
unsafe impl<R: Send + Sync, C: Send + Sync> Send for ArenaOwner<R, C> {}
// SAFETY: as above; `&ArenaOwner` only reads.
unsafe impl<R: Send + Sync, C: Send + Sync> Sync for ArenaOwner<R, C> {}

/// What recycling returns for each slot it freed: the slot's last counters and record.
pub(crate) struct Recycled<R> {
    pub(crate) slot: SlotId,
    pub(crate) counters: SlotCounters,
    pub(crate) record: R,
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> ArenaOwner<R, C> {
    /// An empty arena with `shards` rows per slot (a power of two), an `aux` word per slot
    /// and shard if asked for (8 bytes more per slot and shard), and `context` shared by
    /// every view and lease.
    pub(crate) fn new(shards: usize, aux: bool, context: C) -> Self {
        Self::with_totals(shards, aux, false, context)
    }

    /// As [`new`](Self::new), also keeping each shard's total of requests in flight over all
    /// slots if `totals` (one more `fetch_add` per lease taken, one more `fetch_sub` per
    /// lease ended, on a line of the lease's own shard).
    pub(crate) fn with_totals(shards: usize, aux: bool, totals: bool, context: C) -> Self {
        debug_assert!(shards.is_power_of_two());
        let inner = Box::new(Inner {
            owners: AtomicUsize::new(1),
            shards,
            aux,
            totals: (0..if totals { shards } else { 0 })
                .map(|_| super::CachePadded::new(AtomicU64::new(0)))
                .collect(),
            context,
            segments: core::array::from_fn(|_| AtomicPtr::new(core::ptr::null_mut())),
        });
        ArenaOwner {
            inner: NonNull::from(Box::leak(inner)),
            states: Vec::new(),
            free: Vec::new(),
            retired: Vec::new(),
            _owns: PhantomData,
        }
    }

    fn inner(&self) -> &Inner<R, C> {
        // SAFETY: the owner is a handle: the arena is alive while it is.
        unsafe { self.inner.as_ref() }
    }

    /// The context shared by views and leases.
    pub(crate) fn context(&self) -> &C {
        &self.inner().context
    }

    /// Slots ever created (live, retired or free).
    pub(crate) fn capacity(&self) -> usize {
        self.states.len()
    }

    /// Bytes the arena holds: its segments and its bookkeeping.
    pub(crate) fn memory(&self) -> usize {
        let shards = self.inner().shards;
        let mut bytes = core::mem::size_of::<Inner<R, C>>();
        for (k, s) in self.inner().segments.iter().enumerate() {
            if !s.load(Ordering::Relaxed).is_null() {
                let len = BASE_LEN << k;
                let stride = len.div_ceil(ROW_ALIGN) * ROW_ALIGN;
                bytes += len * core::mem::size_of::<SlotMeta<R>>() + shards * stride * 8 * 5;
            }
        }
        bytes + self.states.capacity() + (self.free.capacity() + self.retired.capacity()) * 4
    }

    /// Gives `record` a slot: a free one if there is one, else a new one.
    ///
    /// # Panics
    ///
    /// Past `16 × (2^24 − 1)` slots in one service (about 268 million endpoints).
    pub(crate) fn alloc(&mut self, record: R) -> SlotId {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let n = self.states.len();
                let slot = SlotId::nth(n).expect("more than 268 million endpoints in one service");
                if slot.index() == 0 {
                    let inner = self.inner();
                    let segment = Box::new(Segment::<R>::new(
                        BASE_LEN << slot.segment(),
                        inner.shards,
                        inner.aux,
                    ));
                    // Release: published before any view that uses it (and the views are
                    // published through the snapshot cell, which orders this store first).
                    self.inner().segments[slot.segment()].store(Box::into_raw(segment), Ordering::Release);
                }
                self.states.push(SlotState::Free);
                slot
            }
        };
        let meta = &self.inner().segment(slot).slots[slot.index()];
        // SAFETY: the slot is free: no view contains it and nothing is in flight on it
        // (`recycle`), so nobody else reads the record; `&mut self` excludes other writers.
        unsafe { *meta.record.get() = Some(record) };
        let at = self.position(slot);
        self.states[at] = SlotState::Live;
        slot
    }

    fn position(&self, slot: SlotId) -> usize {
        BASE_LEN * ((1 << slot.segment()) - 1) + slot.index()
    }

    /// Retires a live slot: it may no longer be put in a view. It is recycled once no view
    /// contains it and nothing is in flight on it.
    pub(crate) fn retire(&mut self, slot: SlotId) {
        let at = self.position(slot);
        debug_assert_eq!(self.states[at], SlotState::Live, "retiring {slot:?}");
        if self.states[at] == SlotState::Live {
            self.states[at] = SlotState::Retired;
            self.retired.push(slot);
        }
    }

    /// Slots retired and not yet recycled.
    pub(crate) fn retired(&self) -> &[SlotId] {
        &self.retired
    }

    /// Whether a retired slot could be recycled now.
    fn reusable(&self, slot: SlotId) -> bool {
        let segment = self.inner().segment(slot);
        // Acquire pairs with the Release decrements of dropped views and ended leases: their
        // reads of the record happened before the record is replaced.
        segment.slots[slot.index()].views.load(Ordering::Acquire) == 0
            && (0..self.inner().shards)
                .all(|s| segment.load(slot.index(), s).load(Ordering::Acquire) & IN_FLIGHT_MASK == 0)
    }

    /// Frees the retired slots that nothing uses any more (no view, nothing in flight):
    /// returns each one's last counters and its record, and resets its counters for its next
    /// owner.
    pub(crate) fn recycle(&mut self) -> Vec<Recycled<R>> {
        let mut freed = Vec::new();
        let mut i = 0;
        while i < self.retired.len() {
            let slot = self.retired[i];
            if !self.reusable(slot) {
                i += 1;
                continue;
            }
            self.retired.swap_remove(i);
            let counters = self.inner().counters(slot);
            let segment = self.inner().segment(slot);
            for shard in 0..self.inner().shards {
                segment.load(slot.index(), shard).store(0, Ordering::Relaxed);
                if self.inner().aux {
                    segment.aux(slot.index(), shard).store(0, Ordering::Relaxed);
                }
                for word in segment.cold(slot.index(), shard) {
                    word.store(0, Ordering::Relaxed);
                }
            }
            // SAFETY: retired (no new view), no view left and nothing in flight (checked
            // above with Acquire): nothing reads the record; `&mut self` excludes writers.
            let record = unsafe { (*segment.slots[slot.index()].record.get()).take() };
            let at = self.position(slot);
            self.states[at] = SlotState::Free;
            self.free.push(slot);
            if let Some(record) = record {
                freed.push(Recycled {
                    slot,
                    counters,
                    record,
                });
            }
        }
        freed
    }

    /// The counters of a live or retired slot, summed over shards.
    pub(crate) fn counters(&self, slot: SlotId) -> SlotCounters {
        debug_assert_ne!(self.states[self.position(slot)], SlotState::Free);
        self.inner().counters(slot)
    }

    /// The record of a live or retired slot.
    pub(crate) fn record(&self, slot: SlotId) -> &R {
        assert_ne!(
            self.states[self.position(slot)],
            SlotState::Free,
            "record of free slot {slot:?}"
        );
        let meta = &self.inner().segment(slot).slots[slot.index()];
        // SAFETY: not free, so it holds a record that only a later `recycle` (`&mut self`,
        // impossible while this borrow lives) replaces.
        match unsafe { &*meta.record.get() } {
            Some(record) => record,
            None => unreachable!("a live slot has a record"),
        }
    }

    /// Folds every slot's selection count into its base, so counts stay exact past 2^40
    /// selections of one slot in one shard. Call at least once per such span (every minute
    /// is plenty).
    pub(crate) fn fold_selections(&self) {
        let inner = self.inner();
        for (n, state) in self.states.iter().enumerate() {
            if *state == SlotState::Free {
                continue;
            }
            let Some(slot) = SlotId::nth(n) else { break };
            let segment = inner.segment(slot);
            for shard in 0..inner.shards {
                let load = segment.load(slot.index(), shard).load(Ordering::Relaxed);
                let base = &segment.cold(slot.index(), shard)[2];
                base.store(selections(load, base.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
        }
    }

    /// A view of `entries`: each must be a live slot of this arena.
    ///
    /// # Panics
    ///
    /// If an entry's slot is not live (a control-plane bug; checked, because a view of a
    /// retired slot would defeat its reclamation).
    pub(crate) fn view<P: Copy>(&self, entries: Vec<Entry<P>>) -> View<R, C, P> {
        for e in &entries {
            assert_eq!(
                self.states.get(self.position(e.slot)),
                Some(&SlotState::Live),
                "a view of slot {:?}",
                e.slot
            );
            // Relaxed: the view is published through the snapshot cell; the decrement is
            // Release and the recycler's read Acquire.
            self.inner().segment(e.slot).slots[e.slot.index()]
                .views
                .fetch_add(1, Ordering::Relaxed);
        }
        // Relaxed, as for `Arc::clone`: this handle exists to be given out.
        self.inner().owners.fetch_add(1, Ordering::Relaxed);
        View {
            inner: self.inner,
            entries: entries.into_boxed_slice(),
        }
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> Drop for ArenaOwner<R, C> {
    fn drop(&mut self) {
        release(self.inner);
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> fmt::Debug for ArenaOwner<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArenaOwner")
            .field("capacity", &self.states.len())
            .field("free", &self.free.len())
            .field("retired", &self.retired.len())
            .finish()
    }
}

// ===== views =====

/// One slot of a view, with the caller's payload (what a pick needs besides the counters:
/// the endpoint's address and weight, say).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry<P> {
    pub(crate) slot: SlotId,
    pub(crate) payload: P,
}

/// An immutable array of slots of one arena, as a routing table holds it. While a view is
/// alive its slots are not recycled.
pub(crate) struct View<R: Send + Sync + 'static, C: Send + Sync + 'static, P> {
    inner: NonNull<Inner<R, C>>,
    entries: Box<[Entry<P>]>,
}

// SAFETY: a view reads `R` and `C` through shared references (`Sync`); the arena may be freed
// by the thread that drops the last handle (`Send`).
unsafe impl<R: Send + Sync, C: Send + Sync, P: Send> Send for View<R, C, P> {}
// SAFETY: as above; a view's methods only read, or write atomics.
unsafe impl<R: Send + Sync, C: Send + Sync, P: Sync> Sync for View<R, C, P> {}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static, P> View<R, C, P> {
    #[inline]
    fn inner(&self) -> &Inner<R, C> {
        // SAFETY: a view is a handle: the arena is alive while it is.
        unsafe { self.inner.as_ref() }
    }

    /// The entries, in the order the view was built.
    #[inline]
    pub(crate) fn entries(&self) -> &[Entry<P>] {
        &self.entries
    }

    /// Number of entries.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Number of shards (a power of two).
    #[inline]
    pub(crate) fn shards(&self) -> usize {
        self.inner().shards
    }

    /// The arena's context.
    #[inline]
    pub(crate) fn context(&self) -> &C {
        &self.inner().context
    }

    /// Entry `i`'s load word in `shard`: requests in flight there (see [`in_flight`]).
    #[inline]
    pub(crate) fn load(&self, i: usize, shard: usize) -> &AtomicU64 {
        let slot = self.entries[i].slot;
        self.inner()
            .segment(slot)
            .load(slot.index(), shard & (self.shards() - 1))
    }

    /// Entry `i`'s estimate word in `shard` (the arena must have them: see
    /// [`ArenaOwner::new`]).
    #[inline]
    pub(crate) fn aux(&self, i: usize, shard: usize) -> &AtomicU64 {
        let slot = self.entries[i].slot;
        self.inner()
            .segment(slot)
            .aux(slot.index(), shard & (self.shards() - 1))
    }

    /// Entry `i`'s record.
    #[inline]
    pub(crate) fn record(&self, i: usize) -> &R {
        let slot = self.entries[i].slot;
        let meta = &self.inner().segment(slot).slots[slot.index()];
        // SAFETY: the slot is in this view, so it is not recycled while the view (and this
        // borrow of it) lives: its record is set and not written.
        match unsafe { &*meta.record.get() } {
            Some(record) => record,
            None => unreachable!("a slot in a view has a record"),
        }
    }

    /// Counts a selection of entry `i` by a thread of `shard`, without holding it in flight.
    #[inline]
    pub(crate) fn note_selection(&self, i: usize, shard: usize) {
        // Relaxed: a statistic.
        self.load(i, shard).fetch_add(SELECT, Ordering::Relaxed);
    }

    /// Takes a lease on entry `i` for a thread of `shard`: one more selection and one more
    /// request in flight, until the lease is dropped.
    #[inline]
    pub(crate) fn lease(&self, i: usize, shard: usize) -> Lease<R, C> {
        let slot = self.entries[i].slot;
        let shard = shard & (self.shards() - 1);
        // Relaxed: the increment publishes nothing; it only has to be counted before the
        // slot can be recycled, and the view we hold keeps the slot until after it is.
        let before = self
            .inner()
            .segment(slot)
            .load(slot.index(), shard)
            .fetch_add(ACQUIRE, Ordering::Relaxed);
        debug_assert!(before & IN_FLIGHT_MASK < IN_FLIGHT_MASK, "in-flight overflow");
        if let Some(total) = self.inner().totals.get(shard) {
            // Relaxed, as the slot's own count: a load signal.
            total.fetch_add(1, Ordering::Relaxed);
        }
        Lease {
            inner: self.inner,
            slot,
            shard: shard as u32,
            _owns: PhantomData,
        }
    }

    /// Takes a lease on entry `i` for a thread of `shard` only if fewer than `below()`
    /// requests are in flight on it, over every shard; otherwise returns the load it saw.
    /// `below()` is at least 1 and is only asked for when the entry is not idle (an idle
    /// entry always has room).
    ///
    /// The check and the increment are one compare-and-swap on this shard's load word, so in
    /// an arena of one shard two threads cannot both take the last place under `below`: the
    /// loser's swap fails and it sees the new load. (With several shards, the other shards'
    /// loads are read first and may move meanwhile.) At most [`TRY_LEASE_ATTEMPTS`] swaps: a
    /// word that keeps changing under contention counts as full, so the call is wait-free.
    #[inline]
    pub(crate) fn try_lease(
        &self,
        i: usize,
        shard: usize,
        below: impl Fn() -> u64,
    ) -> Result<Lease<R, C>, u64> {
        let slot = self.entries[i].slot;
        let shard = shard & (self.shards() - 1);
        let segment = self.inner().segment(slot);
        let others: u64 = if self.shards() == 1 {
            0
        } else {
            (0..self.shards())
                .filter(|&s| s != shard)
                .map(|s| in_flight(segment.load(slot.index(), s).load(Ordering::Relaxed)))
                .sum()
        };
        let word = segment.load(slot.index(), shard);
        let mut seen = word.load(Ordering::Relaxed);
        for _ in 0..TRY_LEASE_ATTEMPTS {
            let load = others + in_flight(seen);
            if load > 0 && load >= below() {
                return Err(load);
            }
            debug_assert!(seen & IN_FLIGHT_MASK < IN_FLIGHT_MASK, "in-flight overflow");
            // Relaxed, as in `lease`: the count publishes nothing. A strong swap: a spurious
            // failure (LL/SC machines, Miri) must not count a slot with room as full.
            match word.compare_exchange(
                seen,
                seen.wrapping_add(ACQUIRE),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if let Some(total) = self.inner().totals.get(shard) {
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Lease {
                        inner: self.inner,
                        slot,
                        shard: shard as u32,
                        _owns: PhantomData,
                    });
                }
                Err(now) => seen = now,
            }
        }
        Err(others + in_flight(seen))
    }

    /// Counts an outcome of entry `i` in `shard` (a request reported without a lease).
    /// Relaxed: statistics.
    #[inline]
    pub(crate) fn count(&self, i: usize, shard: usize, success: bool) {
        let slot = self.entries[i].slot;
        let cold = self
            .inner()
            .segment(slot)
            .cold(slot.index(), shard & (self.shards() - 1));
        cold[usize::from(!success)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests in flight on entry `i` over every shard. Relaxed: a load signal, stale by
    /// the requests racing with the read (it reads lines other shards write, so it is for
    /// decisions that need the whole load, like bounded-load hashing).
    #[inline]
    pub(crate) fn in_flight_everywhere(&self, i: usize) -> u64 {
        let slot = self.entries[i].slot;
        let segment = self.inner().segment(slot);
        (0..self.shards())
            .map(|s| in_flight(segment.load(slot.index(), s).load(Ordering::Relaxed)))
            .sum()
    }

    /// Requests in flight over every slot of the arena and every shard, if the arena keeps
    /// totals (see [`ArenaOwner::with_totals`]).
    #[inline]
    pub(crate) fn total_in_flight(&self) -> Option<u64> {
        let totals = &self.inner().totals;
        (!totals.is_empty()).then(|| totals.iter().map(|t| t.load(Ordering::Relaxed)).sum())
    }

    /// Entry `i`'s counters, summed over shards.
    pub(crate) fn counters(&self, i: usize) -> SlotCounters {
        self.inner().counters(self.entries[i].slot)
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static, P> Drop for View<R, C, P> {
    fn drop(&mut self) {
        for e in self.entries.iter() {
            // Release: this view's reads of the slot happen before its recycling.
            self.inner().segment(e.slot).slots[e.slot.index()]
                .views
                .fetch_sub(1, Ordering::Release);
        }
        release(self.inner);
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static, P> fmt::Debug for View<R, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// The requests in flight a load word counts.
#[inline]
pub(crate) fn in_flight(load: u64) -> u64 {
    load & IN_FLIGHT_MASK
}

// ===== leases =====

/// One request in flight on one slot: taken by [`View::lease`], ended by dropping it. The
/// slot (its record and counters) stays this endpoint's while the lease lives, whatever
/// happens to the tables and the service meanwhile.
#[must_use = "dropping a lease ends the request it accounts for"]
pub(crate) struct Lease<R: Send + Sync + 'static, C: Send + Sync + 'static> {
    inner: NonNull<Inner<R, C>>,
    slot: SlotId,
    shard: u32,
    _owns: PhantomData<(R, C)>,
}

// SAFETY: a lease reads `R` and `C` through shared references and writes atomics; it may end
// on any thread.
unsafe impl<R: Send + Sync, C: Send + Sync> Send for Lease<R, C> {}
// SAFETY: as above.
unsafe impl<R: Send + Sync, C: Send + Sync> Sync for Lease<R, C> {}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> Lease<R, C> {
    #[inline]
    fn inner(&self) -> &Inner<R, C> {
        // SAFETY: the arena is freed only when nothing is in flight, and this lease holds one
        // request in flight until it is dropped.
        unsafe { self.inner.as_ref() }
    }

    #[inline]
    fn segment(&self) -> &Segment<R> {
        self.inner().segment(self.slot)
    }

    /// The slot's record.
    #[inline]
    pub(crate) fn record(&self) -> &R {
        let meta = &self.segment().slots[self.slot.index()];
        // SAFETY: a slot with a request in flight is not recycled, so its record is set and
        // not written while this lease (and this borrow of it) lives.
        match unsafe { &*meta.record.get() } {
            Some(record) => record,
            None => unreachable!("a leased slot has a record"),
        }
    }

    /// The arena's context.
    #[inline]
    pub(crate) fn context(&self) -> &C {
        &self.inner().context
    }

    /// Requests in flight on the slot in this lease's shard, this one included.
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        in_flight(
            self.segment()
                .load(self.slot.index(), self.shard as usize)
                .load(Ordering::Relaxed),
        )
    }

    /// The slot's estimate word in this lease's shard (the arena must have them).
    #[inline]
    pub(crate) fn aux(&self) -> &AtomicU64 {
        self.segment().aux(self.slot.index(), self.shard as usize)
    }

    /// Counts an outcome in this lease's shard. Relaxed: statistics.
    #[inline]
    pub(crate) fn count(&self, success: bool) {
        let cold = self.segment().cold(self.slot.index(), self.shard as usize);
        cold[usize::from(!success)].fetch_add(1, Ordering::Relaxed);
    }

    /// The slot (for tests and logs).
    pub(crate) fn slot(&self) -> SlotId {
        self.slot
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> Drop for Lease<R, C> {
    #[inline]
    fn drop(&mut self) {
        // Release: everything this request recorded (outcomes, the record's bookkeeping) is
        // visible to whoever sees the count reach 0 with Acquire (a drain, the recycler, the
        // reaper). After this, the lease never touches the arena again.
        // The total first: the slot's own decrement is this lease's last touch of the arena.
        if let Some(total) = self.inner().totals.get(self.shard as usize) {
            total.fetch_sub(1, Ordering::Relaxed);
        }
        let before = self
            .segment()
            .load(self.slot.index(), self.shard as usize)
            .fetch_sub(1, Ordering::Release);
        debug_assert!(
            before & IN_FLIGHT_MASK > 0,
            "in-flight underflow on {:?}",
            self.slot
        );
    }
}

impl<R: Send + Sync + 'static, C: Send + Sync + 'static> fmt::Debug for Lease<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("slot", &self.slot)
            .field("shard", &self.shard)
            .finish()
    }
}

/// Counts a selection of a slot through its shared counters without a view (the arena
/// owner's `record_result` path uses views; this exists for tests).
#[cfg(test)]
pub(crate) fn selections_of(load: u64) -> u64 {
    load >> SELECTION_SHIFT
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Rec(u32);

    fn entries(slots: &[SlotId]) -> Vec<Entry<u32>> {
        slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| Entry {
                slot,
                payload: i as u32,
            })
            .collect()
    }

    #[test]
    fn slot_ids_fill_segments_in_order() {
        let mut seen = Vec::new();
        for n in 0..1_000 {
            let s = SlotId::nth(n).unwrap();
            assert!(s.index() < BASE_LEN << s.segment());
            seen.push((s.segment(), s.index()));
        }
        assert_eq!(seen[0], (0, 0));
        assert_eq!(seen[15], (0, 15));
        assert_eq!(seen[16], (1, 0));
        assert_eq!(seen[47], (1, 31));
        assert_eq!(seen[48], (2, 0));
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "distinct");
        assert!(SlotId::nth(BASE_LEN * ((1 << MAX_SEGMENTS) - 1)).is_none());
    }

    #[test]
    fn a_slot_is_not_recycled_while_a_view_or_a_lease_holds_it() {
        let mut arena = ArenaOwner::<Rec, ()>::new(2, true, ());
        let a = arena.alloc(Rec(1));
        let b = arena.alloc(Rec(2));
        let view = arena.view(entries(&[a, b]));
        let lease = view.lease(0, 1);
        assert_eq!(lease.record(), &Rec(1));
        assert_eq!(lease.in_flight(), 1);
        arena.retire(a);
        assert!(arena.recycle().is_empty(), "a view holds it");
        drop(view);
        assert!(arena.recycle().is_empty(), "a lease holds it");
        assert_eq!(lease.record(), &Rec(1), "the lease still reads its own record");
        lease.count(true);
        drop(lease);
        let freed = arena.recycle();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].slot, a);
        assert_eq!(freed[0].record, Rec(1));
        assert_eq!(
            freed[0].counters,
            SlotCounters {
                in_flight: 0,
                selections: 1,
                successes: 1,
                failures: 0
            }
        );
        // The slot is reused for the next endpoint, with fresh counters.
        let c = arena.alloc(Rec(3));
        assert_eq!(c, a);
        assert_eq!(arena.counters(c), SlotCounters::default());
        assert_eq!(arena.record(c), &Rec(3));
        assert_eq!(arena.record(b), &Rec(2));
    }

    #[test]
    fn selections_count_past_the_40_bit_field_when_folded() {
        let mut arena = ArenaOwner::<Rec, ()>::new(1, true, ());
        let a = arena.alloc(Rec(1));
        let view = arena.view(entries(&[a]));
        // Start the field just below its wrap.
        view.load(0, 0)
            .store((SELECTION_WRAP - 2) << SELECTION_SHIFT, Ordering::Relaxed);
        arena.fold_selections();
        for _ in 0..5 {
            view.note_selection(0, 0);
        }
        arena.fold_selections();
        assert_eq!(view.counters(0).selections, SELECTION_WRAP + 3);
        assert_eq!(selections_of(view.load(0, 0).load(Ordering::Relaxed)), 3);
    }

    #[test]
    fn grows_across_segments_and_frees_everything() {
        // Past a few segments (fewer under miri, which interprets every access).
        let n: u32 = if cfg!(miri) { 300 } else { 5_000 };
        let mut arena = ArenaOwner::<Rec, ()>::new(4, false, ());
        let slots: Vec<SlotId> = (0..n).map(|i| arena.alloc(Rec(i))).collect();
        let view = arena.view(entries(&slots));
        for i in (0..n as usize).step_by(7) {
            drop(view.lease(i, i));
        }
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(arena.record(*s), &Rec(i as u32));
        }
        drop(view);
        drop(arena);
    }

    #[test]
    fn an_arena_dropped_with_leases_out_is_freed_by_the_reaper_once_they_end() {
        let mut arena = ArenaOwner::<Rec, ()>::new(1, true, ());
        let a = arena.alloc(Rec(7));
        let view = arena.view(entries(&[a]));
        let lease = view.lease(0, 0);
        drop(view);
        drop(arena);
        // Orphaned: the lease still reads its record.
        assert_eq!(lease.record(), &Rec(7));
        drop(lease);
        for _ in 0..1_000 {
            if reap_orphans() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the orphan was never reaped");
    }

    #[test]
    fn try_lease_takes_only_below_the_cap_and_never_asks_for_it_when_idle() {
        let mut arena = ArenaOwner::<Rec, ()>::with_totals(1, false, true, ());
        let a = arena.alloc(Rec(1));
        let view = arena.view(entries(&[a]));
        let first = view
            .try_lease(0, 0, || panic!("an idle slot has room whatever the cap"))
            .unwrap();
        let second = view.try_lease(0, 0, || 2).unwrap();
        assert_eq!(view.try_lease(0, 0, || 2).err(), Some(2), "at the cap");
        assert_eq!(view.total_in_flight(), Some(2));
        assert_eq!(selections_of(view.load(0, 0).load(Ordering::Relaxed)), 2);
        drop(first);
        let third = view.try_lease(0, 0, || 2).unwrap();
        drop((second, third));
        assert_eq!(view.in_flight_everywhere(0), 0);
        assert_eq!(view.total_in_flight(), Some(0));

        // With two shards the other shard's load counts too.
        let mut sharded = ArenaOwner::<Rec, ()>::new(2, false, ());
        let b = sharded.alloc(Rec(2));
        let view = sharded.view(entries(&[b]));
        let elsewhere = view.lease(0, 1);
        assert_eq!(view.try_lease(0, 0, || 1).err(), Some(1));
        let _here = view.try_lease(0, 0, || 2).unwrap();
        drop(elsewhere);
    }

    #[test]
    fn totals_follow_leases_over_every_slot_and_shard() {
        let mut arena = ArenaOwner::<Rec, ()>::with_totals(2, false, true, ());
        let (a, b) = (arena.alloc(Rec(1)), arena.alloc(Rec(2)));
        let view = arena.view(entries(&[a, b]));
        assert_eq!(view.total_in_flight(), Some(0));
        let leases = [view.lease(0, 0), view.lease(0, 1), view.lease(1, 1)];
        assert_eq!(view.total_in_flight(), Some(3));
        assert_eq!(view.in_flight_everywhere(0), 2);
        assert_eq!(view.in_flight_everywhere(1), 1);
        drop(leases);
        assert_eq!(view.total_in_flight(), Some(0));
        let plain = ArenaOwner::<Rec, ()>::new(1, false, ());
        assert_eq!(plain.view::<u32>(Vec::new()).total_in_flight(), None);
    }

    #[test]
    fn in_flight_and_selections_share_one_word() {
        let mut arena = ArenaOwner::<Rec, ()>::new(1, true, ());
        let a = arena.alloc(Rec(1));
        let view = arena.view(entries(&[a]));
        let l1 = view.lease(0, 0);
        let l2 = view.lease(0, 0);
        view.note_selection(0, 0);
        let word = view.load(0, 0).load(Ordering::Relaxed);
        assert_eq!(in_flight(word), 2);
        assert_eq!(selections_of(word), 3);
        drop((l1, l2));
        assert_eq!(view.counters(0).in_flight, 0);
        assert_eq!(view.counters(0).selections, 3);
    }
}
