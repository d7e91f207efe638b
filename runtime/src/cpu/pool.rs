//! A small spinning thread pool for the compiled engine: `run(f)` calls `f(t)` once for every
//! slot t in 0..threads and returns when all are done. The caller runs slot 0; worker t runs
//! slot t if it claims it first, and the caller runs (claims) every slot still unclaimed once
//! its own is done. Workers spin briefly for the next task (a decode step dispatches hundreds
//! of short kernels), then park. `run` allocates nothing. One caller at a time: a `Pool` is
//! not `Sync` (so no two threads can share one), and the engine keeps its pool inside its
//! workspace lock.
//!
//! Why slots are claimed: on a machine shared with other work (a server's HTTP threads, its
//! clients, other processes) a worker is often not running when a task is posted. The caller
//! used to spin until every worker had run its part, a whole scheduler time slice (ms) per
//! kernel when one was preempted: under load, serving ran at a quarter of its speed. With
//! `run_chunks`, whose slots take work from a shared counter, a worker that arrives late finds
//! nothing left, so the caller claims its slot and goes on; only a worker that has started a
//! chunk is waited for, and the caller yields its core while it waits.

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
    /// slot t (1..n) of the current task has been claimed (by worker t or by the caller)
    claimed: Vec<AtomicBool>,
    task: UnsafeCell<Option<Task>>,
}

// SAFETY: `task` is written only by `run` while no worker reads it: a worker reads it only
// after claiming a slot, and `run` returns only after every slot claimed by a worker is done.
// `run` writes the task before it resets the claims (Release); a worker's claim (AcqRel swap)
// reads that reset, so the write is visible to it.
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
            claimed: (0..n).map(|_| AtomicBool::new(true)).collect(),
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

    /// Run `f(t)` once for every t in 0..threads: the caller does t = 0, then every slot no
    /// worker has claimed yet (module docs), then waits for the workers' slots.
    pub(crate) fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n == 1 {
            f(0);
            return;
        }
        let sh = &self.shared;
        // SAFETY: every slot a worker claimed in the previous task is done (run waited for
        // them) and no slot is claimable (all are claimed), so no worker reads `task` now;
        // the pointer is only used until this call returns.
        unsafe {
            let t: Task = std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(f);
            *sh.task.get() = Some(t);
        }
        sh.done.store(0, Ordering::SeqCst);
        for c in &sh.claimed[1..] {
            c.store(false, Ordering::Release);
        }
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
        f(0);
        let tw = Instant::now();
        // slots no worker has taken: run them here (with `run_chunks` nothing is left by now)
        let mut mine = 0;
        for (t, c) in sh.claimed.iter().enumerate().skip(1) {
            if !c.swap(true, Ordering::AcqRel) {
                f(t);
                mine += 1;
            }
        }
        let theirs = self.n - 1 - mine;
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < theirs {
            spins += 1;
            if spins > 4096 {
                // a worker holding a chunk was preempted: let it (or whatever runs) have a core
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
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
        // the caller may have run this slot already (this worker came late)
        if sh.claimed[t].swap(true, Ordering::AcqRel) {
            continue;
        }
        // SAFETY: `run` stored the task before it made the slot claimable and keeps it alive
        // until every slot a worker claimed is counted done.
        let task = unsafe { (*sh.task.get()).expect("a task is set before a slot is free") };
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
    fn every_slot_runs_once_with_more_workers_than_cores() {
        // workers are preempted all the time here, so the caller claims many of their slots
        let n = 4 * std::thread::available_parallelism().map_or(2, |c| c.get());
        let p = Pool::new(n).expect("pool");
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let total = AtomicUsize::new(0);
        for round in 1..=2000 {
            p.run(&|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
                total.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), round * n);
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 2000);
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
