//! Wrappers that let `loom-tests/` drive internals the public API does not reach. Built only
//! under `--cfg tai_loadbalancer_loom`; not public API.
#![deny(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::control::queue::{Ack, Queue};

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

    /// Queues `value`; the future resolves once the value is taken and dropped.
    pub fn push(&self, value: u32) -> AckFuture {
        AckFuture(self.0.push(value))
    }

    /// Blocks until something is queued (`true`) or the queue is closed and empty.
    pub fn wait_pending(&self) -> bool {
        self.0.wait_pending()
    }

    /// Takes up to `max` values; their acks resolve when this returns.
    pub fn take(&self, max: usize) -> Vec<u32> {
        self.0.take(max).into_iter().map(|e| e.command).collect()
    }

    /// Closes the queue.
    pub fn close(&self) {
        self.0.close();
    }
}

impl Future for AckFuture {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx)
    }
}
