//! Wrappers that let `loom-tests/` drive internals the public API does not reach. Built only
//! under `--cfg tai_loadbalancer_loom`; not public API.
#![deny(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::handoff::queue::{Ack, AckOutcome, Queue};

/// The control plane's command queue, carrying plain numbers.
#[derive(Debug)]
pub struct HandoffQueue(Queue<u32>);

/// A pending acknowledgement from [`HandoffQueue::push`].
#[derive(Debug)]
pub struct AckFuture(Ack);

impl HandoffQueue {
    /// An empty, open queue.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(Queue::new())
    }

    /// Queues `value`; the future resolves once the value is taken (to `true`: applied).
    pub fn push(&self, value: u32) -> AckFuture {
        AckFuture(self.0.push(value))
    }

    /// Blocks until something is queued (`true`) or the queue is closed and empty.
    pub fn wait_pending(&self) -> bool {
        self.0.wait_pending()
    }

    /// Takes up to `max` values; their acks resolve (applied) when this returns.
    pub fn take(&self, max: usize) -> Vec<u32> {
        self.0
            .take(max)
            .into_iter()
            .map(|e| {
                if let Some(ack) = e.ack {
                    ack.complete(AckOutcome::Applied);
                }
                e.command
            })
            .collect()
    }

    /// Closes the queue.
    pub fn close(&self) {
        self.0.close();
    }
}

impl Future for AckFuture {
    /// Whether the value was applied (taken before the queue closed).
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|outcome| outcome == AckOutcome::Applied)
    }
}

/// The connection pool's per-endpoint slot protocol, with `u32` "connections".
#[allow(missing_debug_implementations)]
pub struct PoolSlots(crate::pool::slots::Slots<u32>);

/// What [`PoolSlots::acquire`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum PoolAcquired {
    /// An idle connection.
    Idle(u32),
    /// A slot to connect on.
    Create,
    /// Queued under this ticket.
    Wait(u64),
    /// Refused: too many waiters.
    Exhausted,
    /// Refused: closed.
    Closed,
}

/// What a waiter was granted: `Some(connection)` or `None` (a slot to connect on).
pub type PoolGrant = Result<Option<u32>, ()>;

/// Counts: (open, idle, connecting, waiters).
pub type PoolCounts = (usize, usize, usize, usize);

impl PoolSlots {
    /// Slots for `max` connections and `max_waiters` waiters.
    pub fn new(max: usize, max_waiters: usize) -> Self {
        Self(crate::pool::slots::Slots::new(max, max_waiters))
    }

    /// Acquire (every idle connection is reusable).
    pub fn acquire(&self) -> PoolAcquired {
        use crate::pool::slots::{Acquired, Aftermath, Refused};
        let mut after = Aftermath::default();
        let got = self.0.acquire(|_, _| true, &mut after);
        after.finish();
        match got {
            Ok(Acquired::Idle(t)) => PoolAcquired::Idle(t.conn),
            Ok(Acquired::Create) => PoolAcquired::Create,
            Ok(Acquired::Wait(t)) => PoolAcquired::Wait(t),
            Err(Refused::Exhausted { .. }) => PoolAcquired::Exhausted,
            Err(Refused::Closed) => PoolAcquired::Closed,
        }
    }

    /// Waits for `ticket`'s grant.
    pub fn wait(&self, ticket: u64) -> impl Future<Output = PoolGrant> + '_ {
        use crate::pool::slots::Grant;
        std::future::poll_fn(move |cx| match self.0.poll_wait(ticket, cx.waker()) {
            Poll::Ready(Ok(Grant::Conn(t))) => Poll::Ready(Ok(Some(t.conn))),
            Poll::Ready(Ok(Grant::Slot)) => Poll::Ready(Ok(None)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        })
    }

    /// A waiter gives up.
    pub fn cancel(&self, ticket: u64) {
        let mut after = crate::pool::slots::Aftermath::default();
        self.0.cancel(ticket, 0, &mut after);
        after.finish();
    }

    /// A connect on a slot succeeded.
    pub fn connected(&self) {
        self.0.connected();
    }

    /// A connect on a slot failed.
    pub fn connect_failed(&self) {
        let mut after = crate::pool::slots::Aftermath::default();
        self.0.connect_failed(&mut after);
        after.finish();
    }

    /// A connection comes back (`keep`: reusable).
    pub fn release(&self, conn: u32, keep: bool) {
        let mut after = crate::pool::slots::Aftermath::default();
        self.0.release(
            crate::pool::slots::Tracked { conn, created_ms: 0 },
            keep,
            0,
            &mut after,
        );
        after.finish();
    }

    /// (open, idle, connecting, waiters).
    pub fn counts(&self) -> PoolCounts {
        let c = self.0.counts();
        (c.open, c.idle, c.connecting, c.waiters)
    }
}

// ===== the counter arena =====

/// A counter arena whose records are plain numbers (`sync::arena` with `R = u32`).
#[allow(missing_debug_implementations)]
pub struct SlotArena(crate::sync::arena::ArenaOwner<u32, ()>);

/// A view of some slots of a [`SlotArena`].
#[allow(missing_debug_implementations)]
pub struct SlotView(crate::sync::arena::View<u32, (), ()>);

/// One request in flight on one slot.
#[allow(missing_debug_implementations)]
pub struct SlotLease(crate::sync::arena::Lease<u32, ()>);

/// A slot of a [`SlotArena`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(crate::sync::arena::SlotId);

impl SlotArena {
    /// An empty arena with one shard.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(crate::sync::arena::ArenaOwner::new(1, false, ()))
    }

    /// A slot holding `record`.
    pub fn alloc(&mut self, record: u32) -> Slot {
        Slot(self.0.alloc(record))
    }

    /// Retires `slot`.
    pub fn retire(&mut self, slot: Slot) {
        self.0.retire(slot.0);
    }

    /// Recycles what can be; returns the records freed.
    pub fn recycle(&mut self) -> Vec<u32> {
        self.0.recycle().into_iter().map(|r| r.record).collect()
    }

    /// A view of `slots`.
    pub fn view(&self, slots: &[Slot]) -> SlotView {
        SlotView(
            self.0.view(
                slots
                    .iter()
                    .map(|s| crate::sync::arena::Entry {
                        slot: s.0,
                        payload: (),
                    })
                    .collect(),
            ),
        )
    }
}

impl SlotView {
    /// A lease on entry `i`.
    pub fn lease(&self, i: usize) -> SlotLease {
        SlotLease(self.0.lease(i, 0))
    }

    /// A lease on entry `i` only if fewer than `below` (at least 1) requests are in flight on
    /// it (the bounded-load pick's check-and-take); otherwise the load seen.
    pub fn try_lease(&self, i: usize, below: u64) -> Result<SlotLease, u64> {
        self.0.try_lease(i, 0, || below).map(SlotLease)
    }

    /// Requests in flight on entry `i`.
    pub fn in_flight(&self, i: usize) -> u64 {
        self.0.in_flight_everywhere(i)
    }
}

impl SlotLease {
    /// The leased slot's record.
    pub fn record(&self) -> u32 {
        *self.0.record()
    }
}
