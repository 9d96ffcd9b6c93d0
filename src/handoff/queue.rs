//! The handoff from writers to the control plane: a FIFO of commands and one-shot
//! acknowledgements.
//!
//! A writer (a registry call, later a health checker or a discovery source) pushes a command
//! with an [`AckSender`] and awaits the paired [`Ack`]. The control plane completes the ack
//! with [`Applied`](AckOutcome::Applied) only *after* it has published the tables the command
//! changed, which is what gives registry calls read-your-writes: when the ack resolves, every
//! pick that starts afterwards loads the new table.
//!
//! # Invariants
//!
//! * Commands are taken in push order, and only while the control state lock is held
//!   (see `ControlPlane::process`), so they are applied in the order writers pushed them.
//! * An ack resolves exactly once, and never to `Applied` for a change that was not
//!   published: a sender dropped without [`AckSender::complete`] (a panic unwinding through
//!   the control plane, a discarded command) resolves its ack to
//!   [`Failed`](AckOutcome::Failed), so a writer never waits forever and never sees a false
//!   success.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::error::Error;
use crate::sync::{Arc, Condvar, DataArc, Mutex};

// ===== impl Ack =====

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// Its effect is published.
    Applied,
    /// The balancer was stopped: nothing is published any more, and nothing needs to be.
    Stopped,
    /// The control plane could not publish it (a panic while applying it); the reason.
    Failed(DataArc<str>),
}

impl AckOutcome {
    /// The result a writer reports for a command of `service` that ended so.
    pub(crate) fn into_result(self, service: &DataArc<str>) -> Result<(), Error> {
        match self {
            AckOutcome::Applied => Ok(()),
            AckOutcome::Stopped => Err(Error::Stopped),
            AckOutcome::Failed(reason) => Err(Error::PublishFailed {
                service: service.clone(),
                reason,
            }),
        }
    }
}

#[derive(Default)]
struct AckState {
    outcome: Option<AckOutcome>,
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
    /// An ack that is already resolved to `Applied` (nothing needed publishing).
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn resolved() -> Ack {
        Ack { inner: None }
    }

    /// An ack already resolved to `Stopped` (the queue is closed).
    fn stopped() -> Ack {
        let (sender, ack) = ack_pair();
        sender.complete(AckOutcome::Stopped);
        ack
    }

    /// Whether the command was applied or abandoned.
    pub(crate) fn is_resolved(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|i| i.state.lock().outcome.is_some())
    }
}

impl Future for Ack {
    type Output = AckOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AckOutcome> {
        let Some(inner) = &self.inner else {
            return Poll::Ready(AckOutcome::Applied);
        };
        let mut state = inner.state.lock();
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(outcome.clone());
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl AckSender {
    /// Resolves the ack to `outcome`.
    pub(crate) fn complete(self, outcome: AckOutcome) {
        self.resolve(outcome);
        // `Drop` sees the outcome set and leaves it.
    }

    fn resolve(&self, outcome: AckOutcome) {
        let waker = {
            let mut state = self.inner.state.lock();
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            state.waker.take()
        };
        // Wake outside the lock: the woken task may poll on this thread at once.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for AckSender {
    fn drop(&mut self) {
        // Dropped without an outcome: the command was not published (the control plane
        // unwound past it, or discarded it). Never a false success.
        self.resolve(AckOutcome::Failed(DataArc::from(
            "the control plane dropped the change before publishing it",
        )));
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
    /// [`close`](Self::close) the command is discarded and the ack is already resolved to
    /// `Stopped`.
    pub(crate) fn push(&self, command: C) -> Ack {
        let (sender, ack) = ack_pair();
        let envelope = Envelope {
            command,
            ack: Some(sender),
        };
        match self.push_envelope(envelope) {
            Ok(()) => ack,
            Err(envelope) => {
                if let Some(sender) = envelope.ack {
                    sender.complete(AckOutcome::Stopped);
                }
                Ack::stopped()
            }
        }
    }

    /// Queues `command` without an acknowledgement.
    pub(crate) fn push_unacked(&self, command: C) {
        let _ = self.push_envelope(Envelope { command, ack: None });
    }

    fn push_envelope(&self, envelope: Envelope<C>) -> Result<(), Envelope<C>> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(envelope);
        }
        state.pending.push_back(envelope);
        drop(state);
        self.wake.notify_one();
        Ok(())
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

    /// Whether nothing is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().pending.is_empty()
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
    fn a_dropped_sender_resolves_its_ack_to_failed_never_applied() {
        let (tx, rx) = ack_pair();
        assert!(!rx.is_resolved());
        drop(tx);
        assert!(rx.is_resolved());
        assert!(matches!(block_on(rx), AckOutcome::Failed(_)));
    }

    #[test]
    fn a_completed_sender_resolves_once_with_its_outcome() {
        let (tx, rx) = ack_pair();
        tx.complete(AckOutcome::Applied);
        assert_eq!(block_on(rx), AckOutcome::Applied);
        let (tx, rx) = ack_pair();
        tx.complete(AckOutcome::Failed("boom".into()));
        assert_eq!(block_on(rx), AckOutcome::Failed("boom".into()));
    }

    #[test]
    fn closed_queue_resolves_at_once() {
        let q: Queue<u32> = Queue::new();
        let a = q.push(1);
        assert!(!a.is_resolved());
        q.close();
        let late = q.push(2);
        assert!(late.is_resolved());
        assert_eq!(block_on(late), AckOutcome::Stopped);
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
            for envelope in q2.take(1) {
                envelope.ack.unwrap().complete(AckOutcome::Applied);
            }
        })
        .unwrap();
        assert_eq!(block_on(ack), AckOutcome::Applied);
        t.join().unwrap();
    }
}
