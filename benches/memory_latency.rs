//! The machine's memory latency by working-set size: a dependent pointer chase over a random
//! cyclic permutation of cache lines (no criterion; prints one line per size).
//!
//! This is the floor under any pick that touches per-endpoint state at random: once the
//! per-shard state of a service outgrows the L2 cache, each such pick pays this latency.
//! `BENCHMARKS.md` uses it to explain the 65,536-endpoint figures.

use std::hint::black_box;
use std::time::Instant;

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes_kib: &[usize] = if full {
        &[64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    } else {
        &[64]
    };
    for &kib in sizes_kib {
        let lines = kib * 1024 / 64;
        let mut order: Vec<usize> = (0..lines).collect();
        fastrand::seed(7);
        fastrand::shuffle(&mut order);
        // next[line * 8] holds the index (in u64 words) of the next line to visit.
        let mut next = vec![0usize; lines * 8];
        for w in 0..lines {
            next[order[w] * 8] = order[(w + 1) % lines] * 8;
        }
        let loads = if full { 4_000_000 } else { 10_000 };
        let mut p = 0usize;
        for _ in 0..lines.min(loads) {
            p = next[p];
        }
        let started = Instant::now();
        for _ in 0..loads {
            p = next[p];
        }
        let ns = started.elapsed().as_nanos() as f64 / loads as f64;
        println!("memory_latency/{kib:>6} KiB: {ns:6.1} ns per dependent load");
        black_box(p);
    }
}
