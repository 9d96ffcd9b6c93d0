//! The handoff from writers to the control plane: a FIFO of commands and one-shot
//! acknowledgements.
//!
//! A writer (a registry call, later a health checker or a discovery source) pushes a command
//! with an [`AckSender`] and awaits the paired [`Ack`]. The control plane completes the ack
//! only *after* it has published the tables the command changed, which is what gives registry
//! calls read-your-writes: when the ack resolves, every pick that starts afterwards loads the
//! new table.
//!
//! # Invariants
//!
//! * Commands are taken in push order, and only while the control state lock is held
//!   (see `ControlPlane::process`), so they are applied in the order writers pushed them.
//! * An ack resolves exactly once: completed, or dropped (the control plane stopped or the
//!   command was discarded). A dropped sender also resolves its ack, so a writer never waits
//!   forever.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, Condvar, Mutex};

// ===== impl Ack =====

#[derive(Default)]
struct AckState {
    done: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct AckInner {
    state: Mutex<AckState>,
}

/// The receiving half: a future that resolves once the command was applied (or abandoned).
#[must_use = "an Ack does nothing unless awaited"]
pub(crate) struct Ack {
    inner: Option<Arc<AckInner>>,
}

/// The sending half, held by the queued command. Completing it or dropping it resolves the
/// [`Ack`].
pub(crate) struct AckSender {
    inner: Arc<AckInner>,
}

/// A connected sender and receiver.
pub(crate) fn ack_pair() -> (AckSender, Ack) {
    let inner = Arc::new(AckInner::default());
    (AckSender { inner: inner.clone() }, Ack { inner: Some(inner) })
}

impl Ack {
    /// An ack that is already resolved.
    pub(crate) fn resolved() -> Ack {
        Ack { inner: None }
    }

    /// Whether the command was applied or abandoned.
    pub(crate) fn is_resolved(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| i.state.lock().done)
    }
}

impl Future for Ack {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(inner) = &self.inner else {
            return Poll::Ready(());
        };
        let mut state = inner.state.lock();
        if state.done {
            return Poll::Ready(());
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for AckSender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.inner.state.lock();
            state.done = true;
            state.waker.take()
        };
        // Wake outside the lock: the woken task may poll on this thread at once.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("resolved", &self.is_resolved())
            .finish()
    }
}

impl fmt::Debug for AckSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AckSender")
    }
}

// ===== impl Queue =====

/// One queued command and its acknowledgement.
#[derive(Debug)]
pub(crate) struct Envelope<C> {
    pub(crate) command: C,
    pub(crate) ack: Option<AckSender>,
}

struct QueueState<C> {
    pending: VecDeque<Envelope<C>>,
    closed: bool,
}

/// A blocking FIFO for the control-plane thread.
pub(crate) struct Queue<C> {
    state: Mutex<QueueState<C>>,
    wake: Condvar,
}

impl<C> Queue<C> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(QueueState {
                pending: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        }
    }

    /// Queues `command`; the returned ack resolves once it is applied. After
    /// [`close`](Self::close) the command is discarded and the ack is already resolved.
    pub(crate) fn push(&self, command: C) -> Ack {
        let (sender, ack) = ack_pair();
        if self.push_envelope(Envelope {
            command,
            ack: Some(sender),
        }) {
            ack
        } else {
            Ack::resolved()
        }
    }

    /// Queues `command` without an acknowledgement.
    pub(crate) fn push_unacked(&self, command: C) {
        self.push_envelope(Envelope { command, ack: None });
    }

    fn push_envelope(&self, envelope: Envelope<C>) -> bool {
        let mut state = self.state.lock();
        if state.closed {
            return false;
        }
        state.pending.push_back(envelope);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Blocks until a command is pending (`true`) or the queue is closed and empty (`false`).
    pub(crate) fn wait_pending(&self) -> bool {
        let mut state = self.state.lock();
        loop {
            if !state.pending.is_empty() {
                return true;
            }
            if state.closed {
                return false;
            }
            state = self.wake.wait(state);
        }
    }

    /// Like [`wait_pending`](Self::wait_pending), but also returns (with `true`) once
    /// `deadline` has passed, so the caller can run its timers.
    pub(crate) fn wait_pending_until(&self, deadline: Option<std::time::Instant>) -> bool {
        let Some(deadline) = deadline else {
            return self.wait_pending();
        };
        let mut state = self.state.lock();
        loop {
            if !state.pending.is_empty() {
                return true;
            }
            if state.closed {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return true;
            }
            let (guard, _timed_out) = self.wake.wait_timeout(state, deadline - now);
            state = guard;
        }
    }

    /// Takes up to `max` pending commands, oldest first, without blocking.
    pub(crate) fn take(&self, max: usize) -> Vec<Envelope<C>> {
        let mut state = self.state.lock();
        let n = state.pending.len().min(max);
        state.pending.drain(..n).collect()
    }

    /// Refuses further commands and wakes the waiting thread. Commands already queued stay
    /// queued until taken.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }
}

impl<C> fmt::Debug for Queue<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("Queue")
            .field("pending", &state.pending.len())
            .field("closed", &state.closed)
            .finish()
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn ack_resolves_on_drop_of_sender() {
        let (tx, rx) = ack_pair();
        assert!(!rx.is_resolved());
        drop(tx);
        assert!(rx.is_resolved());
        block_on(rx);
    }

    #[test]
    fn closed_queue_resolves_at_once() {
        let q: Queue<u32> = Queue::new();
        let a = q.push(1);
        assert!(!a.is_resolved());
        q.close();
        assert!(q.push(2).is_resolved());
        assert!(q.wait_pending(), "queued work survives close");
        let taken = q.take(10);
        assert_eq!(taken.iter().map(|e| e.command).collect::<Vec<_>>(), vec![1]);
        drop(taken);
        assert!(a.is_resolved());
        assert!(!q.wait_pending());
    }

    #[test]
    fn take_is_fifo_and_bounded() {
        let q: Queue<u32> = Queue::new();
        for i in 0..5 {
            q.push_unacked(i);
        }
        assert_eq!(
            q.take(2).iter().map(|e| e.command).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(
            q.take(9).iter().map(|e| e.command).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn ack_wakes_a_waiting_task() {
        let q = crate::sync::Arc::new(Queue::<u32>::new());
        let ack = q.push(7);
        let q2 = q.clone();
        let t = crate::sync::thread::spawn("ack-test".into(), move || {
            assert!(q2.wait_pending());
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(q2.take(1));
        })
        .unwrap();
        block_on(ack);
        t.join().unwrap();
    }
}
