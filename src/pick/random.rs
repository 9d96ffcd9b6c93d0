//! Uniform random selection from the calling thread's generator.
//!
//! No shared state is written, so two threads picking at once do not contend (this is the
//! strategy that scales with cores; see `BENCHMARKS.md`).
#![deny(unsafe_code)]

use crate::sync::random_below;

/// A uniformly random index in `0..n` (`n > 0`).
#[inline]
pub(crate) fn index(n: usize) -> usize {
    random_below(n)
}
