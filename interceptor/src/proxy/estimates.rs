//! Tokenizer estimates of cut streams, bounded: at most `running` at once on the blocking pool and
//! `waiting` more queued behind them. A stream beyond that is recorded without an estimate (usage
//! `missing`) and counted, so a burst of cut streams (a client pool closing, a deploy) neither starts
//! a thread per stream nor holds every stream's kept text until its turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntCounter;
use tokio::sync::Semaphore;

/// Estimates queued behind the running ones, at most (each holds its stream's kept events, up to
/// four times the tokenizer's text limit, and its request body).
const MAX_WAITING: usize = 64;

pub struct EstimatePool {
    running: Arc<Semaphore>,
    /// Running plus waiting.
    admitted: AtomicUsize,
    max_admitted: usize,
    skipped: IntCounter,
}

/// A place among the admitted estimates, given back when dropped.
pub struct Admission {
    pool: Arc<EstimatePool>,
}

impl EstimatePool {
    /// `running` estimates at once (at least one), `waiting` more queued; `skipped` counts the
    /// streams turned away.
    pub fn new(running: usize, waiting: usize, skipped: IntCounter) -> Arc<Self> {
        let running = running.max(1);
        Arc::new(Self {
            running: Arc::new(Semaphore::new(running)),
            admitted: AtomicUsize::new(0),
            max_admitted: running + waiting,
            skipped,
        })
    }

    /// As many running at once as the machine has CPUs, [`MAX_WAITING`] queued.
    pub fn for_this_machine(skipped: IntCounter) -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cpus, MAX_WAITING, skipped)
    }

    /// A place for one more estimate, or `None` (counted) when running and waiting are full.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let admitted = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_admitted).then_some(n + 1)
            });
        match admitted {
            Ok(_) => Some(Admission { pool: self.clone() }),
            Err(_) => {
                self.skipped.inc();
                None
            }
        }
    }

    /// Estimates admitted and not finished (running or waiting).
    #[cfg(test)]
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}

impl Admission {
    /// Waits for a running place, then does `work` on the blocking pool (tokenizing is CPU work that
    /// must stay off the I/O threads).
    pub async fn run<F>(self, work: F)
    where
        F: FnOnce() + Send + 'static,
    {
        // The semaphore is never closed; if it were, the work would still be done, here.
        let Ok(slot) = self.pool.running.clone().acquire_owned().await else {
            work();
            return;
        };
        let blocking = tokio::task::spawn_blocking(move || {
            work();
            drop(slot);
            drop(self);
        });
        // A panic in `work` already released the places (unwinding drops them).
        let _ = blocking.await;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.pool.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("skipped", "estimates skipped").expect("counter")
    }

    #[test]
    fn beyond_running_and_waiting_a_stream_is_turned_away_and_counted() {
        let skipped = counter();
        let pool = EstimatePool::new(1, 2, skipped.clone());
        let held: Vec<Admission> = (0..3).map(|_| pool.admit().expect("room")).collect();
        assert!(pool.admit().is_none(), "a fourth estimate has no place");
        assert_eq!(skipped.get(), 1);
        assert_eq!(pool.admitted(), 3);
        drop(held);
        assert_eq!(pool.admitted(), 0, "places are given back");
        assert!(pool.admit().is_some(), "and taken again");
        assert_eq!(skipped.get(), 1);
    }

    #[test]
    fn at_least_one_estimate_runs() {
        let pool = EstimatePool::new(0, 0, counter());
        assert!(pool.admit().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_the_running_places_work_at_once_and_all_admitted_work_is_done() {
        let pool = EstimatePool::new(2, 10, counter());
        let concurrent = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let admission = pool.admit().expect("12 places: 2 running, 10 waiting");
            let (concurrent, most, done) = (concurrent.clone(), most.clone(), done.clone());
            tasks.push(tokio::spawn(admission.run(move || {
                let now = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                concurrent.fetch_sub(1, Ordering::SeqCst);
                done.lock().expect("lock").push(i);
            })));
        }
        assert!(pool.admit().is_none(), "running and waiting are full");
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "at most two at once");
        let mut done = done.lock().expect("lock").clone();
        done.sort_unstable();
        assert_eq!(done, (0..12).collect::<Vec<_>>(), "every admitted estimate ran");
        assert_eq!(pool.admitted(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_estimate_gives_its_places_back() {
        let pool = EstimatePool::new(1, 0, counter());
        let admission = pool.admit().expect("room");
        admission.run(|| panic!("tokenizer failure")).await;
        assert_eq!(pool.admitted(), 0);
        let admission = pool.admit().expect("the running place is free again");
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        admission
            .run(move || {
                seen.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
