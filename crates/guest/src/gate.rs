// SPDX-License-Identifier: Apache-2.0
//! The run/park state machine shared by the standby guests ([`crate::DummyVm`] and
//! [`crate::SimulatedVm`]).
//!
//! A worker thread (the vCPU thread, or the simulation's tick thread) asks the gate before every
//! step whether it may run; the controller (`start`/`pause`/drop) flips the gate and waits for the
//! worker to acknowledge. One mutex + one condvar carry every transition, so there are no lost
//! wake-ups and `pause` can return only once the worker has actually parked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Errors of the run/park state machine, shared by both standby guests.
#[derive(Debug, thiserror::Error)]
pub enum GuestStateError {
    /// The worker thread stopped because the guest failed; the message says why.
    #[error("the guest's worker thread failed: {0}")]
    Failed(String),
    /// The worker thread is gone (the guest was shut down).
    #[error("the guest's worker thread has stopped")]
    Stopped,
    /// `pause` asked the worker to park but it did not within the bound.
    #[error("the guest did not park within {0:?} after pause")]
    PauseTimeout(Duration),
    /// `start` released the worker but no guest exit arrived within the bound.
    #[error("no guest exit arrived within {0:?} after start")]
    StartTimeout(Duration),
}

#[derive(Debug, Default)]
struct GateState {
    /// The controller wants the worker to run.
    want_run: bool,
    /// The worker is blocked in `wait_runnable` (or gone): it will not step until released.
    parked: bool,
    /// The owner is being dropped: the worker must return.
    shutdown: bool,
    /// The worker thread has returned.
    worker_done: bool,
    /// Why the worker failed, if it did.
    failure: Option<String>,
    /// When the last paused → running transition happened.
    started_at: Option<Instant>,
    /// When the first step after `started_at` completed.
    first_exit_after_start: Option<Instant>,
    /// How many paused → running transitions happened.
    starts: u64,
    /// Threads blocked in `wait_for_counter`: only then does a step pay for a wake-up syscall.
    counter_waiters: usize,
}

/// The shared run/park gate. Lives in an `Arc` shared by the controller and the worker thread.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    counter: AtomicU64,
    exits: AtomicU64,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic while holding this lock cannot leave the plain-data state inconsistent, so a
        // poisoned lock is still usable (and Drop must never panic on it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.cv.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<'a>(
        &self,
        guard: MutexGuard<'a, GateState>,
        deadline: Instant,
    ) -> (MutexGuard<'a, GateState>, bool) {
        let now = Instant::now();
        if now >= deadline {
            return (guard, true);
        }
        let (g, res) = self
            .cv
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner());
        (g, res.timed_out())
    }

    // ---- worker side ----

    /// Blocks until the worker may take its next step. Returns `false` when it must return.
    pub(crate) fn wait_runnable(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return false;
            }
            if st.want_run {
                st.parked = false;
                return true;
            }
            if !st.parked {
                st.parked = true;
                self.cv.notify_all();
            }
            st = self.wait(st);
        }
    }

    /// Records one completed step (a guest exit) and the counter value it produced.
    pub(crate) fn record_exit(&self, counter: u64) {
        let mut st = self.lock();
        // Stored under the lock so that `wait_for_counter` cannot miss the wake-up.
        self.counter.store(counter, Ordering::Release);
        self.exits.fetch_add(1, Ordering::AcqRel);
        let mut wake = st.counter_waiters > 0;
        if st.started_at.is_some() && st.first_exit_after_start.is_none() {
            st.first_exit_after_start = Some(Instant::now());
            wake = true;
        }
        if wake {
            self.cv.notify_all();
        }
    }

    /// Marks the worker as failed; it must return right after.
    pub(crate) fn fail(&self, why: String) {
        let mut st = self.lock();
        st.failure = Some(why);
        st.want_run = false;
        st.parked = true;
        st.worker_done = true;
        self.cv.notify_all();
    }

    /// Marks the worker as gone (called by the worker as it returns).
    pub(crate) fn worker_finished(&self) {
        let mut st = self.lock();
        st.parked = true;
        st.worker_done = true;
        self.cv.notify_all();
    }

    // ---- controller side ----

    /// Releases the worker. `Ok(true)` if it was paused and now runs, `Ok(false)` if it already
    /// ran (a second start does nothing and keeps `started_at`).
    pub(crate) fn start(&self) -> Result<bool, GuestStateError> {
        let mut st = self.lock();
        if let Some(why) = &st.failure {
            return Err(GuestStateError::Failed(why.clone()));
        }
        if st.worker_done || st.shutdown {
            return Err(GuestStateError::Stopped);
        }
        if st.want_run {
            return Ok(false);
        }
        st.want_run = true;
        st.starts += 1;
        st.started_at = Some(Instant::now());
        st.first_exit_after_start = None;
        self.cv.notify_all();
        Ok(true)
    }

    /// Waits until the first exit after the last start (or failure / timeout).
    pub(crate) fn wait_first_exit(&self, timeout: Duration) -> Result<Instant, GuestStateError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(t) = st.first_exit_after_start {
                return Ok(t);
            }
            if let Some(why) = &st.failure {
                return Err(GuestStateError::Failed(why.clone()));
            }
            if st.worker_done {
                return Err(GuestStateError::Stopped);
            }
            let (g, timed_out) = self.wait_until(st, deadline);
            st = g;
            if timed_out && st.first_exit_after_start.is_none() {
                return Err(GuestStateError::StartTimeout(timeout));
            }
        }
    }

    /// Asks the worker to park and waits until it has. `Ok(true)` if it was running.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<bool, GuestStateError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let was_running = st.want_run;
        st.want_run = false;
        self.cv.notify_all();
        while !st.parked {
            let (g, timed_out) = self.wait_until(st, deadline);
            st = g;
            if timed_out && !st.parked {
                return Err(GuestStateError::PauseTimeout(timeout));
            }
        }
        Ok(was_running)
    }

    /// Tells the worker to return (it is joined by the owner right after).
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.want_run = false;
        self.cv.notify_all();
    }

    /// Waits until the counter reaches `min`; `false` on timeout or if the worker is gone.
    pub(crate) fn wait_for_counter(&self, min: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        st.counter_waiters += 1;
        let reached = loop {
            if self.counter() >= min {
                break true;
            }
            if st.worker_done {
                break false;
            }
            let (g, timed_out) = self.wait_until(st, deadline);
            st = g;
            if timed_out {
                break self.counter() >= min;
            }
        };
        st.counter_waiters -= 1;
        reached
    }

    // ---- readers ----

    pub(crate) fn counter(&self) -> u64 {
        self.counter.load(Ordering::Acquire)
    }

    pub(crate) fn exits(&self) -> u64 {
        self.exits.load(Ordering::Acquire)
    }

    pub(crate) fn is_running(&self) -> bool {
        let st = self.lock();
        st.want_run && !st.worker_done
    }

    pub(crate) fn started_at(&self) -> Option<Instant> {
        self.lock().started_at
    }

    pub(crate) fn first_exit_after_start(&self) -> Option<Instant> {
        self.lock().first_exit_after_start
    }

    pub(crate) fn starts(&self) -> u64 {
        self.lock().starts
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }
}

/// Marks the gate's worker as finished however its thread ends (return or panic), so that `pause`
/// and the `wait_*` helpers never wait for a thread that is gone.
pub(crate) struct WorkerGuard(pub(crate) Arc<Gate>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.0.worker_finished();
    }
}
