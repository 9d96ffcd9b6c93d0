//! Connection-pool overhead beside deadpool (a well-kept async pool) in the same run, with
//! in-memory "connections" so only the pools' own bookkeeping is measured.
//!
//! * `acquire_release/<pool>`: acquire an idle connection and drop the handle, one task.
//! * `two_threads/<pool>`: the same on two OS threads at once, one shared pool (one endpoint
//!   for ours), each thread with its own current-thread runtime; time per pair.
//! * `saturated/<pool>`: `max = 1` and 4 tasks on one runtime contending for it: every
//!   acquire after the first waits and is handed the connection by a release (FIFO handoff);
//!   time per acquire.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tai_loadbalancer::{ConnectionPool, Connector, Endpoint, PoolConfig};

struct Memory(AtomicU64);

impl Connector for Memory {
    type Connection = u64;
    type Error = std::io::Error;

    async fn connect(&self, _endpoint: &Endpoint) -> Result<u64, std::io::Error> {
        Ok(self.0.fetch_add(1, Ordering::Relaxed))
    }
}

struct DeadpoolMemory(AtomicU64);

impl deadpool::managed::Manager for DeadpoolMemory {
    type Type = u64;
    type Error = std::io::Error;

    async fn create(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.fetch_add(1, Ordering::Relaxed))
    }

    async fn recycle(
        &self,
        _conn: &mut u64,
        _metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<std::io::Error> {
        Ok(())
    }
}

type Deadpool = deadpool::managed::Pool<DeadpoolMemory>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ours(max: usize) -> ConnectionPool<Memory> {
    ConnectionPool::new(
        PoolConfig {
            max_connections: max,
            acquire_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        Memory(AtomicU64::new(0)),
    )
    .unwrap()
}

fn deadpool(max: usize) -> Deadpool {
    Deadpool::builder(DeadpoolMemory(AtomicU64::new(0)))
        .max_size(max)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .unwrap()
}

fn endpoint() -> Endpoint {
    Endpoint::new("127.0.0.1:7000".parse().unwrap(), None)
}

/// Runs `body(iters)` on two threads at once (each with its own runtime); the slower's time.
fn two_threads(iters: u64, body: impl Fn(u64) -> Duration + Sync) -> Duration {
    std::thread::scope(|s| {
        let a = s.spawn(|| body(iters));
        let b = s.spawn(|| body(iters));
        a.join().unwrap().max(b.join().unwrap())
    })
}

fn pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    let ep = endpoint();

    let rt1 = rt();
    let mine = ours(16);
    let theirs = deadpool(16);
    group.bench_function("acquire_release/tai", |b| {
        b.iter_custom(|iters| {
            rt1.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    drop(black_box(mine.acquire(&ep).await.unwrap()));
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("acquire_release/deadpool", |b| {
        b.iter_custom(|iters| {
            rt1.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    drop(black_box(theirs.get().await.unwrap()));
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("two_threads/tai", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |iters| {
                rt().block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        drop(black_box(mine.acquire(&ep).await.unwrap()));
                    }
                    start.elapsed()
                })
            })
        })
    });
    group.bench_function("two_threads/deadpool", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |iters| {
                rt().block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        drop(black_box(theirs.get().await.unwrap()));
                    }
                    start.elapsed()
                })
            })
        })
    });

    const TASKS: u64 = 4;
    let mine1 = Arc::new(ours(1));
    let theirs1 = deadpool(1);
    group.bench_function("saturated/tai", |b| {
        b.iter_custom(|iters| {
            rt1.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let (pool, ep) = (mine1.clone(), ep.clone());
                        tokio::spawn(async move {
                            for _ in 0..iters.div_ceil(TASKS) {
                                let conn = pool.acquire(&ep).await.unwrap();
                                tokio::task::yield_now().await;
                                drop(conn);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("saturated/deadpool", |b| {
        b.iter_custom(|iters| {
            rt1.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let pool = theirs1.clone();
                        tokio::spawn(async move {
                            for _ in 0..iters.div_ceil(TASKS) {
                                let conn = pool.get().await.unwrap();
                                tokio::task::yield_now().await;
                                drop(conn);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    println!("tai pool after the run: {:?}", mine.totals());
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = pool
}
criterion_main!(benches);
