//! A small spinning thread pool for the compiled engine: `run(f)` calls `f(t)` on every
//! worker t (the caller is worker 0) and returns when all are done. Workers spin briefly for
//! the next task (a decode step dispatches hundreds of short kernels), then park. `run`
//! allocates nothing. One caller at a time: a `Pool` is not `Sync` (so no two threads can
//! share one), and the engine keeps its pool inside its workspace lock.

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

type Task = *const (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    task: UnsafeCell<Option<Task>>,
}

// SAFETY: `task` is written only by `run` while no worker reads it (all workers have finished
// the previous epoch and wait for the next), and read by workers only after they observe the
// new epoch (Acquire/Release on `epoch` orders the write before the reads).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
    /// nanoseconds the caller spent waiting for workers (profiling)
    wait_ns: AtomicUsize,
    /// not `Sync`: `run` assumes one caller at a time
    _one_caller: std::marker::PhantomData<std::cell::Cell<()>>,
}

const SPIN: Duration = Duration::from_millis(2);

impl Pool {
    pub(crate) fn new(threads: usize) -> std::io::Result<Pool> {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            task: UnsafeCell::new(None),
        });
        let mut workers = Vec::new();
        for t in 1..n {
            let sh = shared.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("wkvc-cpu-{t}"))
                    .spawn(move || worker(sh, t))?,
            );
        }
        Ok(Pool {
            shared,
            workers,
            n,
            wait_ns: AtomicUsize::new(0),
            _one_caller: std::marker::PhantomData,
        })
    }

    pub(crate) fn threads(&self) -> usize {
        self.n
    }

    /// Run `f(t)` for t in 0..threads, the caller doing t = 0.
    pub(crate) fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        let sh = &self.shared;
        // SAFETY: all workers finished the previous task (run waits for them), so none reads
        // `task` now; the pointer is only used until this call returns.
        unsafe {
            let t: Task = std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(f);
            *sh.task.get() = Some(t);
        }
        sh.done.store(0, Ordering::SeqCst);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
        f(0);
        let tw = Instant::now();
        while sh.done.load(Ordering::Acquire) < self.n - 1 {
            std::hint::spin_loop();
        }
        self.wait_ns
            .fetch_add(tw.elapsed().as_nanos() as usize, Ordering::Relaxed);
    }

    /// Nanoseconds spent waiting for workers since the last call.
    pub(crate) fn take_wait_ns(&self) -> usize {
        self.wait_ns.swap(0, Ordering::Relaxed)
    }
}

impl Pool {
    /// Run `f(t, lo, hi)` over `0..n` in chunks of `grain` that the workers take in turn
    /// (balances uneven workers; no allocation).
    pub(crate) fn run_chunks(
        &self,
        n: usize,
        grain: usize,
        f: &(dyn Fn(usize, usize, usize) + Sync),
    ) {
        let grain = grain.max(1);
        let next = AtomicUsize::new(0);
        self.run(&|t| {
            loop {
                let lo = next.fetch_add(grain, Ordering::Relaxed);
                if lo >= n {
                    break;
                }
                f(t, lo, (lo + grain).min(n));
            }
        });
    }
}

/// Rows per chunk so that each of `threads` workers takes about 8 chunks, a multiple of
/// `align` and at least `align`.
pub(crate) fn grain(n: usize, threads: usize, align: usize) -> usize {
    (n.div_ceil(8 * threads.max(1))).div_ceil(align).max(1) * align
}

fn worker(sh: Arc<Shared>, t: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = sh.epoch.load(Ordering::Acquire);
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                sh.sleepers.fetch_add(1, Ordering::SeqCst);
                if sh.epoch.load(Ordering::SeqCst) == seen && !sh.stop.load(Ordering::SeqCst) {
                    thread::park_timeout(Duration::from_millis(50));
                }
                sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: `run` stored the task before bumping the epoch and keeps it alive until
        // every worker has counted itself done.
        let task = unsafe { (*sh.task.get()).expect("a task is set before the epoch moves") };
        unsafe { (*task)(t) };
        sh.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_runs_every_worker_once_per_call() {
        let p = Pool::new(3).expect("pool");
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            p.run(&|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
    }

    #[test]
    fn run_chunks_covers_the_range_once() {
        let p = Pool::new(2).expect("pool");
        for n in [0usize, 1, 7, 960, 1001] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            p.run_chunks(n, grain(n, 2, 4), &|_, lo, hi| {
                for s in &seen[lo..hi] {
                    s.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        }
    }
}
