//! Per-endpoint slot accounting of the connection pool: who may open a connection, who gets
//! a returned one, who waits.
//!
//! Owns, under one short per-endpoint lock: the idle connections (a LIFO stack, warmest on
//! top), the count of open connections, the FIFO queue of waiters and the grants handed to
//! them. No I/O and no clock happen here (the caller passes the time and does the
//! connecting), so the protocol is a plain state machine that `loom-tests/` explores.
//!
//! # Invariants
//!
//! * **Bound.** `open` counts idle connections, connections in use and slots reserved for a
//!   connect in progress. It only grows in [`Slots::acquire`] (when `open < max`) and
//!   [`Slots::reserve`] (when `open < min <= max`), so it never exceeds `max`.
//! * **Handoff, not barging.** A released connection, or the slot of a closed one or of a
//!   failed connect, goes to the *first* waiter if there is one (a grant), otherwise back to
//!   the idle stack (or `open` shrinks). A waiter is therefore never overtaken by a newcomer
//!   while it waits: newcomers only find idle connections or free slots when nobody waits.
//! * **No lost grant.** A waiter that gives up (timeout, cancellation) after being granted
//!   passes its grant on exactly as a release would: a connection or a slot is never lost,
//!   so a waiter can never sleep forever while a slot is free.
//! * **No lost wakeup.** Grants and waker registration happen under the same lock; wakers
//!   are woken after it is released.
#![deny(unsafe_code)]
#![cfg_attr(not(feature = "runtime"), allow(dead_code))]

use std::collections::VecDeque;
use std::task::{Poll, Waker};

use crate::sync::Mutex;

/// A connection with its birth time (milliseconds on the pool's clock).
#[derive(Debug)]
pub(crate) struct Tracked<T> {
    pub(crate) conn: T,
    pub(crate) created_ms: u64,
}

/// What a waiter is handed.
#[derive(Debug)]
pub(crate) enum Grant<T> {
    /// A connection, straight from the one who released it.
    Conn(Tracked<T>),
    /// Permission to open one (counted in `open` already).
    Slot,
}

/// The outcome of [`Slots::acquire`].
#[derive(Debug)]
pub(crate) enum Acquired<T> {
    /// A reusable idle connection.
    Idle(Tracked<T>),
    /// A slot: open a connection, then call [`Slots::connected`] or [`Slots::connect_failed`].
    Create,
    /// All slots are busy: wait with [`Slots::poll_wait`] under this ticket.
    Wait(u64),
}

/// Why the pool refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_waiters` are already waiting.
    Exhausted { waiters: usize },
    /// The endpoint's pool was closed (its endpoint left).
    Closed,
}

/// Counts at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) open: usize,
    pub(crate) idle: usize,
    pub(crate) connecting: usize,
    pub(crate) waiters: usize,
    pub(crate) draining: bool,
    pub(crate) closed: bool,
}

impl Counts {
    /// Connections handed out and not returned.
    pub(crate) fn in_use(&self) -> usize {
        self.open.saturating_sub(self.idle + self.connecting)
    }
}

struct Idle<T> {
    tracked: Tracked<T>,
    since_ms: u64,
}

struct State<T> {
    idle: Vec<Idle<T>>,
    open: usize,
    connecting: usize,
    queue: VecDeque<(u64, Option<Waker>)>,
    granted: Vec<(u64, Grant<T>)>,
    next_ticket: u64,
    draining: bool,
    closed: bool,
}

/// One endpoint's slots.
pub(crate) struct Slots<T> {
    state: Mutex<State<T>>,
    max: usize,
    max_waiters: usize,
}

/// Connections the caller must close (drop) after the lock is released, and wakers to wake.
pub(crate) struct Aftermath<T> {
    pub(crate) closed: Vec<T>,
    wake: Vec<Waker>,
}

impl<T> Default for Aftermath<T> {
    fn default() -> Self {
        Self {
            closed: Vec::new(),
            wake: Vec::new(),
        }
    }
}

impl<T> Aftermath<T> {
    /// Wakes the waiters and returns how many connections were closed (dropping them).
    pub(crate) fn finish(self) -> usize {
        for waker in self.wake {
            waker.wake();
        }
        self.closed.len()
    }
}

impl<T> State<T> {
    /// A slot is free (a connection was closed, or a connect failed or was abandoned): the
    /// first waiter gets it, else `open` shrinks.
    fn free_slot(&mut self, after: &mut Aftermath<T>) {
        if let Some((ticket, waker)) = self.queue.pop_front() {
            self.connecting += 1;
            self.granted.push((ticket, Grant::Slot));
            after.wake.extend(waker);
        } else {
            self.open -= 1;
        }
    }

    /// A usable connection is back: the first waiter gets it, else it goes idle.
    fn put_back(&mut self, tracked: Tracked<T>, now_ms: u64, after: &mut Aftermath<T>) {
        if self.closed || self.draining {
            after.closed.push(tracked.conn);
            if self.closed {
                self.open -= 1;
            } else {
                self.free_slot(after);
            }
        } else if let Some((ticket, waker)) = self.queue.pop_front() {
            self.granted.push((ticket, Grant::Conn(tracked)));
            after.wake.extend(waker);
        } else {
            self.idle.push(Idle {
                tracked,
                since_ms: now_ms,
            });
        }
    }
}

impl<T> Slots<T> {
    /// Slots for at most `max` connections and `max_waiters` waiters.
    pub(crate) fn new(max: usize, max_waiters: usize) -> Self {
        Self {
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                connecting: 0,
                queue: VecDeque::new(),
                granted: Vec::new(),
                next_ticket: 0,
                draining: false,
                closed: false,
            }),
            max,
            max_waiters,
        }
    }

    /// Takes the warmest idle connection that `reusable(connection, idle_since_ms)` accepts
    /// (closing the ones it rejects), else a slot to open one, else a place in the queue.
    pub(crate) fn acquire(
        &self,
        mut reusable: impl FnMut(&mut Tracked<T>, u64) -> bool,
        after: &mut Aftermath<T>,
    ) -> Result<Acquired<T>, Refused> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        while let Some(mut idle) = s.idle.pop() {
            // Counted out before the caller's check runs: if `reusable` (a connector's
            // `is_valid`) panics, the connection is dropped and `open` is already exact.
            s.open -= 1;
            if reusable(&mut idle.tracked, idle.since_ms) {
                s.open += 1;
                return Ok(Acquired::Idle(idle.tracked));
            }
            after.closed.push(idle.tracked.conn);
        }
        if s.open < self.max && s.queue.is_empty() {
            s.open += 1;
            s.connecting += 1;
            return Ok(Acquired::Create);
        }
        if s.queue.len() >= self.max_waiters {
            return Err(Refused::Exhausted {
                waiters: s.queue.len(),
            });
        }
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.queue.push_back((ticket, None));
        Ok(Acquired::Wait(ticket))
    }

    /// Whether `ticket` was granted (or the pool closed); registers `waker` otherwise.
    pub(crate) fn poll_wait(&self, ticket: u64, waker: &Waker) -> Poll<Result<Grant<T>, Refused>> {
        let mut s = self.state.lock();
        if let Some(i) = s.granted.iter().position(|(t, _)| *t == ticket) {
            return Poll::Ready(Ok(s.granted.swap_remove(i).1));
        }
        match s.queue.iter_mut().find(|(t, _)| *t == ticket) {
            Some((_, slot)) => {
                if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *slot = Some(waker.clone());
                }
                Poll::Pending
            }
            // Not queued and not granted: the queue was closed.
            None => Poll::Ready(Err(Refused::Closed)),
        }
    }

    /// A waiter gives up: leaves the queue, or passes on what it was granted.
    pub(crate) fn cancel(&self, ticket: u64, now_ms: u64, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        if let Some(i) = s.queue.iter().position(|(t, _)| *t == ticket) {
            s.queue.remove(i);
        } else if let Some(i) = s.granted.iter().position(|(t, _)| *t == ticket) {
            match s.granted.swap_remove(i).1 {
                Grant::Conn(tracked) => s.put_back(tracked, now_ms, after),
                Grant::Slot => {
                    s.connecting -= 1;
                    s.free_slot(after);
                }
            }
        }
    }

    /// A connect on a slot succeeded: the connection is in use.
    pub(crate) fn connected(&self) {
        self.state.lock().connecting -= 1;
    }

    /// A connect on a slot failed (or was abandoned): the slot goes to the next waiter, who
    /// tries for itself.
    pub(crate) fn connect_failed(&self, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        s.connecting -= 1;
        s.free_slot(after);
    }

    /// A connection comes back from use; `keep` is false if it is broken or expired.
    pub(crate) fn release(&self, tracked: Tracked<T>, keep: bool, now_ms: u64, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        if keep {
            s.put_back(tracked, now_ms, after);
        } else {
            after.closed.push(tracked.conn);
            if s.closed {
                s.open -= 1;
            } else {
                s.free_slot(after);
            }
        }
    }

    /// A connection in use leaves the pool for good (detached): its slot is freed.
    pub(crate) fn release_slot_only(&self, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        if s.closed {
            s.open -= 1;
        } else {
            s.free_slot(after);
        }
    }

    /// A connection opened on a [`reserve`](Self::reserve)d slot: it goes to a waiter or idle.
    pub(crate) fn add_reserved(&self, tracked: Tracked<T>, now_ms: u64, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        s.connecting -= 1;
        s.put_back(tracked, now_ms, after);
    }

    /// Reserves slots to bring `open` up to `min` (none while draining or closed); the
    /// caller opens that many connections and calls [`add_reserved`](Self::add_reserved) or
    /// [`connect_failed`](Self::connect_failed) for each.
    pub(crate) fn reserve(&self, min: usize) -> usize {
        let mut s = self.state.lock();
        if s.draining || s.closed {
            return 0;
        }
        let want = min.min(self.max).saturating_sub(s.open);
        s.open += want;
        s.connecting += want;
        want
    }

    /// Closes idle connections that `keep(connection, idle_since_ms)` rejects.
    pub(crate) fn reap(&self, mut keep: impl FnMut(&mut Tracked<T>, u64) -> bool, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        // Taken out and counted out first, put back one by one: a panicking `keep` leaves
        // `open` exact (the ones not yet put back are dropped, that is, closed).
        let idle = std::mem::take(&mut s.idle);
        s.open -= idle.len();
        for mut i in idle {
            if keep(&mut i.tracked, i.since_ms) {
                s.idle.push(i);
                s.open += 1;
            } else {
                after.closed.push(i.tracked.conn);
            }
        }
    }

    /// Draining: idle connections close now, returned ones close on return.
    pub(crate) fn set_draining(&self, draining: bool, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        s.draining = draining;
        if draining {
            let n = s.idle.len();
            after.closed.extend(s.idle.drain(..).map(|i| i.tracked.conn));
            s.open -= n;
        }
    }

    /// Closed for good: idle connections close now, returned ones on return, waiters and
    /// later acquires are refused.
    pub(crate) fn close(&self, after: &mut Aftermath<T>) {
        let mut s = self.state.lock();
        s.closed = true;
        let n = s.idle.len();
        after.closed.extend(s.idle.drain(..).map(|i| i.tracked.conn));
        s.open -= n;
        // Queued waiters wake to find their ticket gone (refused). A waiter granted before the
        // close still takes its grant; what it returns is closed then, so `open` stays exact.
        after.wake.extend(s.queue.drain(..).filter_map(|(_, w)| w));
    }

    /// Counts now.
    pub(crate) fn counts(&self) -> Counts {
        let s = self.state.lock();
        Counts {
            open: s.open,
            idle: s.idle.len(),
            connecting: s.connecting,
            waiters: s.queue.len(),
            draining: s.draining,
            closed: s.closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::sync::DataArc as StdArc;
    use crate::sync::atomic::{AtomicBool, Ordering};
    use std::task::Wake;

    use super::*;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: StdArc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn waker() -> (Waker, StdArc<Flag>) {
        let flag = StdArc::new(Flag(false.into()));
        (Waker::from(flag.clone()), flag)
    }

    fn t(conn: u32) -> Tracked<u32> {
        Tracked { conn, created_ms: 0 }
    }

    #[test]
    fn creates_up_to_max_then_queues_then_refuses() {
        let slots = Slots::<u32>::new(2, 1);
        let mut after = Aftermath::default();
        assert!(matches!(
            slots.acquire(|_, _| true, &mut after),
            Ok(Acquired::Create)
        ));
        assert!(matches!(
            slots.acquire(|_, _| true, &mut after),
            Ok(Acquired::Create)
        ));
        assert!(matches!(
            slots.acquire(|_, _| true, &mut after),
            Ok(Acquired::Wait(0))
        ));
        assert_eq!(
            slots.acquire(|_, _| true, &mut after).unwrap_err(),
            Refused::Exhausted { waiters: 1 }
        );
        assert_eq!(slots.counts().open, 2);
    }

    #[test]
    fn release_hands_to_the_first_waiter_and_lifo_reuse() {
        let slots = Slots::<u32>::new(1, 4);
        let mut after = Aftermath::default();
        assert!(matches!(
            slots.acquire(|_, _| true, &mut after),
            Ok(Acquired::Create)
        ));
        slots.connected();
        let Ok(Acquired::Wait(a)) = slots.acquire(|_, _| true, &mut after) else {
            panic!()
        };
        let Ok(Acquired::Wait(b)) = slots.acquire(|_, _| true, &mut after) else {
            panic!()
        };
        let (wa, fa) = waker();
        let (wb, _) = waker();
        assert!(slots.poll_wait(a, &wa).is_pending());
        assert!(slots.poll_wait(b, &wb).is_pending());
        slots.release(t(7), true, 0, &mut after);
        assert_eq!(std::mem::take(&mut after).finish(), 0);
        assert!(fa.0.load(Ordering::SeqCst), "first waiter woken");
        assert!(matches!(
            slots.poll_wait(a, &wa),
            Poll::Ready(Ok(Grant::Conn(Tracked { conn: 7, .. })))
        ));
        assert!(slots.poll_wait(b, &wb).is_pending(), "second still waits");
        // b gives up; a returns the connection: it goes idle, on top.
        slots.cancel(b, 0, &mut after);
        slots.release(t(7), true, 0, &mut after);
        assert_eq!(
            slots.counts(),
            Counts {
                open: 1,
                idle: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn a_failed_connect_passes_the_slot_and_a_cancelled_grant_is_not_lost() {
        let slots = Slots::<u32>::new(1, 4);
        let mut after = Aftermath::default();
        assert!(matches!(
            slots.acquire(|_, _| true, &mut after),
            Ok(Acquired::Create)
        ));
        let Ok(Acquired::Wait(a)) = slots.acquire(|_, _| true, &mut after) else {
            panic!()
        };
        let Ok(Acquired::Wait(b)) = slots.acquire(|_, _| true, &mut after) else {
            panic!()
        };
        slots.connect_failed(&mut after);
        // a was granted the slot but gives up before using it: b gets it.
        slots.cancel(a, 0, &mut after);
        let (wb, _) = waker();
        assert!(matches!(slots.poll_wait(b, &wb), Poll::Ready(Ok(Grant::Slot))));
        assert_eq!(slots.counts().open, 1);
        slots.connect_failed(&mut after);
        assert_eq!(slots.counts(), Counts::default());
    }

    #[test]
    fn reap_drain_and_close_keep_open_exact() {
        let slots = Slots::<u32>::new(4, 4);
        let mut after = Aftermath::default();
        assert_eq!(slots.reserve(3), 3);
        for i in 0..3 {
            slots.add_reserved(t(i), i as u64, &mut after);
        }
        assert_eq!(slots.reserve(3), 0);
        slots.reap(|_, since| since != 1, &mut after);
        assert_eq!(slots.counts().open, 2);
        // Expired idle connections are skipped by acquire.
        let got = slots.acquire(|t, _| t.conn != 2, &mut after);
        assert!(matches!(got, Ok(Acquired::Idle(Tracked { conn: 0, .. }))));
        assert_eq!(slots.counts().open, 1);
        slots.set_draining(true, &mut after);
        assert_eq!(slots.reserve(3), 0, "no replenishing while draining");
        slots.release(t(0), true, 0, &mut after);
        assert_eq!(slots.counts().open, 0, "returned while draining: closed");
        assert_eq!(after.finish(), 3);
        let mut after = Aftermath::default();
        slots.close(&mut after);
        assert_eq!(
            slots.acquire(|_, _| true, &mut after).unwrap_err(),
            Refused::Closed
        );
    }
}
