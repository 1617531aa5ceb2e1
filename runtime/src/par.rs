//! A spinning thread team for decode-sized work, and [`for_each`], the one parallel loop of
//! the runtime's kernels.
//!
//! A decode step is ~150 products of 5–50 µs each with serial work between them. Rayon parks
//! an idle worker within microseconds, and waking it again is slow on this kind of VM
//! (measured: a `par_iter` of eight chunks cost 0.2–0.6 µs back to back, 8 µs after 20 µs of
//! serial work, 16 µs after 100 µs and 22 µs after 1 ms), so every product of a small model
//! paid about as much in wake-ups as in arithmetic.
//! The team's workers instead spin on an epoch counter for [`SPIN`] after their last chunk, so
//! during a decode step they are already running when the next product is published, and park
//! only once the model is idle. Chunks are claimed from one counter by whoever is free, the
//! caller included, so a worker that is slow to arrive never holds the caller up.
//!
//! The team is used only while [`Team::install`] is active on the calling thread (the executor
//! installs it for calls of a few rows); everywhere else [`for_each`] is rayon's, so prefill's
//! GEMMs keep the rayon pool to themselves.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Calls of at most this many rows (decode steps of up to eight sequences) run their parallel
/// loops on the model's team; longer ones on rayon, whose pool the GEMM crate shares.
pub const TEAM_ROWS: usize = 8;

/// `LOOPC_SPIN`: `0` keeps decode on rayon too (no spinning team: for machines where an idle
/// core is worth more to other work than this model's decode latency), `1` (the default) uses
/// the team.
pub fn spin_from_env() -> crate::Result<bool> {
    crate::error::env_switch("LOOPC_SPIN", true)
}

/// How long a worker spins for the next job before it parks.
const SPIN: Duration = Duration::from_micros(500);

type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// Fields of [`Shared::state`]: `epoch << 40 | chunks << 20 | next chunk`, so that publishing
/// a job and claiming one of its chunks are one atomic operation each and a claim always sees
/// its own job's chunk count.
const FIELD: u32 = 20;
const MASK: u64 = (1 << FIELD) - 1;
/// Jobs of more chunks go to rayon.
const MAX_CHUNKS: usize = MASK as usize;

fn unpack(s: u64) -> (u64, usize, usize) {
    (
        s >> (2 * FIELD),
        ((s >> FIELD) & MASK) as usize,
        (s & MASK) as usize,
    )
}

struct Shared {
    state: AtomicU64,
    /// Address of the current job's `&dyn Fn`, on the caller's stack. Written only between
    /// jobs; read only for a chunk that has been claimed, which the caller waits for.
    job: AtomicUsize,
    finished: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleeping: Vec<AtomicBool>,
    /// Held by the caller of the running job: sessions of one model may decode on several
    /// threads at once, and a job has one caller.
    busy: AtomicBool,
}

/// `workers` threads besides the caller. Dropping it stops them.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// The team installed on this thread (null: none).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Inside a chunk of a team job (or on a team worker): nested loops run inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    /// Claim and run chunks of the current job until none is left; `epoch` is the job's.
    fn work(&self, epoch: u64) {
        loop {
            // Compare-and-swap, not fetch-add: a worker that arrives after its job ended must not
            // consume a chunk index of the next one.
            let s = self.state.load(SeqCst);
            let (e, n, i) = unpack(s);
            if e != epoch || i >= n {
                return;
            }
            if self
                .state
                .compare_exchange_weak(s, s + 1, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            // SAFETY: chunk i of the live job is ours; the caller waits for it to finish, so the
            // closure outlives the call.
            let f: Job = unsafe { *(self.job.load(SeqCst) as *const Job) };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.finished.fetch_add(1, SeqCst);
        }
    }
}

impl Team {
    /// A team of `workers` threads (none: [`for_each`] under it runs inline on the caller).
    pub fn new(workers: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            busy: AtomicBool::new(false),
        });
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("loopc-team-{}", w + 1))
                .spawn(move || worker(&sh, w));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    let team = Team {
                        shared,
                        workers: handles,
                    };
                    drop(team);
                    return Err(e);
                }
            }
        }
        Ok(Team {
            shared,
            workers: handles,
        })
    }

    /// Run `body` with this team serving [`for_each`] on the calling thread.
    pub fn install<R>(&self, body: impl FnOnce() -> R) -> R {
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self)));
        body()
    }

    fn run(&self, n: usize, f: Job) {
        let sh = &*self.shared;
        sh.job.store(&f as *const Job as usize, SeqCst);
        sh.finished.store(0, SeqCst);
        let epoch = unpack(sh.state.load(SeqCst)).0.wrapping_add(1) & ((1 << (64 - 2 * FIELD)) - 1);
        sh.state
            .store(epoch << (2 * FIELD) | (n as u64) << FIELD, SeqCst);
        for (w, h) in self.workers.iter().enumerate() {
            if sh.sleeping[w].load(SeqCst) {
                h.thread().unpark();
            }
        }
        IN_JOB.with(|j| j.set(true));
        sh.work(epoch);
        IN_JOB.with(|j| j.set(false));
        while sh.finished.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        if sh.panicked.swap(false, SeqCst) {
            panic!("a chunk of a parallel loop panicked on a team worker");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for h in &self.workers {
            h.thread().unpark();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(sh: &Shared, w: usize) {
    IN_JOB.with(|j| j.set(true));
    let mut seen = 0u64;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            if sh.stop.load(SeqCst) {
                return;
            }
            let e = unpack(sh.state.load(SeqCst)).0;
            if e != seen {
                break e;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && since.elapsed() > SPIN {
                sh.sleeping[w].store(true, SeqCst);
                if unpack(sh.state.load(SeqCst)).0 == seen && !sh.stop.load(SeqCst) {
                    std::thread::park();
                }
                sh.sleeping[w].store(false, SeqCst);
                since = Instant::now();
            }
        };
        seen = epoch;
        // Tests widen the window between seeing a job and claiming from it, where a worker
        // can otherwise be descheduled while the caller finishes the job alone.
        #[cfg(test)]
        if tests::LATE.load(SeqCst) && epoch % 3 == 0 {
            std::thread::sleep(Duration::from_micros(1));
        }
        sh.work(epoch);
    }
}

/// `f(c)` for every `c` in `0..n`, in parallel: on the installed [`Team`] if there is one, else
/// on the current rayon pool; inline for a single chunk or inside another loop's chunk.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || IN_JOB.with(|j| j.get()) {
        (0..n).for_each(f);
        return;
    }
    let team = CURRENT.with(|c| c.get());
    // SAFETY: `install` keeps the team alive and current for the whole body.
    let team = (!team.is_null() && n <= MAX_CHUNKS).then(|| unsafe { &*team });
    match team {
        Some(t) if t.workers.is_empty() => (0..n).for_each(f),
        Some(t) if !t.shared.busy.swap(true, SeqCst) => {
            struct Release<'a>(&'a AtomicBool);
            impl Drop for Release<'_> {
                fn drop(&mut self) {
                    self.0.store(false, SeqCst);
                }
            }
            let _release = Release(&t.shared.busy);
            t.run(n, &f);
        }
        // No team, or another thread's call holds it: rayon's loop.
        _ => {
            use rayon::prelude::*;
            let f = &f;
            (0..n).into_par_iter().for_each(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Makes workers late for every third job (see `worker`).
    pub(super) static LATE: AtomicBool = AtomicBool::new(false);

    /// Runs `body` on its own thread and fails if it has not finished in a minute: a lost
    /// chunk shows as a caller waiting for ever.
    fn within_a_minute(body: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            body();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => h.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(h.join().unwrap_err())
            }
            Err(e) => panic!("a team job did not finish: {e:?}"),
        }
    }

    /// Every chunk runs exactly once, across many jobs of different sizes, with the workers
    /// spinning (back-to-back jobs, many so small that the caller finishes them before a worker
    /// arrives: a late worker must not take a chunk of the next job), parked (after a pause
    /// past `SPIN`), and with nested loops running inline.
    #[test]
    fn every_chunk_runs_once() {
        within_a_minute(|| {
            LATE.store(true, SeqCst);
            let team = Team::new(2).unwrap();
            team.install(|| {
                for round in 0..20_000usize {
                    let n = 2 + round % 37;
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let nested = AtomicUsize::new(0);
                    for_each(n, |c| {
                        hits[c].fetch_add(1, SeqCst);
                        if round % 7 == 0 {
                            for_each(3, |_| {
                                nested.fetch_add(1, SeqCst);
                            });
                        }
                    });
                    assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
                    let want = if round % 7 == 0 { 3 * n } else { 0 };
                    assert_eq!(nested.load(SeqCst), want);
                    if round % 5000 == 4999 {
                        std::thread::sleep(SPIN * 3);
                    }
                }
            });
            // Not installed any more: rayon's loop, same contract.
            let count = AtomicUsize::new(0);
            for_each(10, |_| {
                count.fetch_add(1, SeqCst);
            });
            assert_eq!(count.load(SeqCst), 10);
        });
    }

    /// Two threads with the same team installed: one runs each job on the team, the other
    /// falls back to rayon while the team is taken; every chunk still runs exactly once.
    #[test]
    fn concurrent_callers_share_one_team() {
        within_a_minute(|| {
            let team = Team::new(1).unwrap();
            std::thread::scope(|sc| {
                for t in 0..2 {
                    let team = &team;
                    sc.spawn(move || {
                        team.install(|| {
                            for round in 0..3000usize {
                                let n = 2 + (round + t) % 19;
                                let hits: Vec<AtomicUsize> =
                                    (0..n).map(|_| AtomicUsize::new(0)).collect();
                                for_each(n, |c| {
                                    hits[c].fetch_add(1, SeqCst);
                                });
                                assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
                            }
                        })
                    });
                }
            });
        });
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller() {
        let team = Team::new(1).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.install(|| {
                for_each(64, |c| {
                    if c == 63 {
                        panic!("chunk 63");
                    }
                })
            })
        }));
        assert!(r.is_err());
        // The team is still usable afterwards.
        let count = AtomicUsize::new(0);
        team.install(|| {
            for_each(8, |_| {
                count.fetch_add(1, SeqCst);
            })
        });
        assert_eq!(count.load(SeqCst), 8);
    }
}
