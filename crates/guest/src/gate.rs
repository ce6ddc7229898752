// SPDX-License-Identifier: Apache-2.0
//! The run/park state machine shared by the standby guests ([`crate::DummyVm`] and
//! [`crate::SimulatedVm`]).
//!
//! A worker thread (the vCPU thread, or the simulation's tick thread) asks the gate before every
//! step whether it may run; the controller (`start`/`pause`/drop) flips the gate and waits for the
//! worker to acknowledge. One mutex + one condvar carry every transition, so there are no lost
//! wake-ups and `pause` can return only once the worker has actually parked.
//!
//! The *run deadline* is the exception: the worker reads it without the lock, right before every
//! entry into the guest (see [`GuestControl::set_run_deadline`]).

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
    /// The run deadline has passed (or `fence` was called): the guest may not run.
    #[error(
        "the guest is fenced: its run deadline passed {overdue:?} ago (or fence() was called); \
         it may not run until set_run_deadline clears the deadline or moves it past now"
    )]
    Fenced {
        /// How long ago the deadline passed.
        overdue: Duration,
    },
}

/// `deadline_ns` value meaning "no run deadline".
const NO_DEADLINE: u64 = u64::MAX;

/// Nanoseconds of `CLOCK_BOOTTIME`: monotonic, and unlike `Instant` (`CLOCK_MONOTONIC`) it keeps
/// counting while the host is suspended, as the arbiter's lease does. Read through the vDSO: no
/// system call.
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_BOOTTIME exists on every Linux this crate runs on.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `deadline` as `CLOCK_BOOTTIME` nanoseconds (never [`NO_DEADLINE`]).
fn to_boottime_ns(deadline: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), boottime_ns());
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if deadline >= now {
        now_ns
            .saturating_add(ns(deadline - now))
            .min(NO_DEADLINE - 1)
    } else {
        now_ns.saturating_sub(ns(now - deadline))
    }
}

/// A `CLOCK_BOOTTIME` deadline back as an `Instant` (as seen now: a suspend since it was set
/// moves it earlier).
fn from_boottime_ns(deadline_ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), boottime_ns());
    if deadline_ns >= now_ns {
        now + Duration::from_nanos(deadline_ns - now_ns)
    } else {
        now.checked_sub(Duration::from_nanos(now_ns - deadline_ns))
            .unwrap_or(now)
    }
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
    /// The guest was fenced (deadline passed or `fence`) and the deadline was not moved since.
    fenced: bool,
}

/// The shared run/park gate. Lives in an `Arc` shared by the controller and the worker thread.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    /// Held by `start` (before `state`) and by a checkpoint apply (`DummyVm::apply`) for its
    /// whole length: `start` waits for an apply to finish, and an apply sees whether the guest
    /// ever started. Separate from `state` so that readers of `state` (`is_running`, on an event
    /// loop) never wait for a long apply.
    apply_lock: Mutex<()>,
    cv: Condvar,
    counter: AtomicU64,
    exits: AtomicU64,
    /// The run deadline in `CLOCK_BOOTTIME` nanoseconds, or [`NO_DEADLINE`]. Written under the
    /// state lock (so the worker's re-check under that lock sees a consistent value), read
    /// without it on the worker's hot path.
    deadline_ns: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: Mutex::default(),
            apply_lock: Mutex::new(()),
            cv: Condvar::new(),
            counter: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            deadline_ns: AtomicU64::new(NO_DEADLINE),
        }
    }
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

    /// Whether the worker may enter the guest now; called right before every entry (every
    /// `KVM_RUN`). Past the run deadline it fences the guest (parks it as paused, refuses `start`)
    /// and returns `false`: the worker must go back to `wait_runnable` without entering.
    ///
    /// Hot-path cost: one acquire load when no deadline is set; with one, also a vDSO clock read
    /// and an integer comparison. No lock, no system call.
    #[inline]
    pub(crate) fn may_enter(&self) -> bool {
        let deadline = self.deadline_ns.load(Ordering::Acquire);
        if deadline == NO_DEADLINE || boottime_ns() < deadline {
            return true;
        }
        self.fence_at_deadline()
    }

    /// The slow path of [`may_enter`](Self::may_enter): re-checks under the lock (the deadline
    /// may have just been moved) and fences.
    #[cold]
    fn fence_at_deadline(&self) -> bool {
        let mut st = self.lock();
        let deadline = self.deadline_ns.load(Ordering::Acquire);
        let now = boottime_ns();
        if deadline == NO_DEADLINE || now < deadline {
            return true;
        }
        st.want_run = false;
        let newly = !std::mem::replace(&mut st.fenced, true);
        self.cv.notify_all();
        drop(st);
        // Logged without the lock: a slow log sink must not stall the controller.
        if newly {
            log::warn!(
                "guest fenced: run deadline passed {:?} ago; the worker will not enter the guest \
                 again (counter frozen at {})",
                Duration::from_nanos(now - deadline),
                self.counter()
            );
        }
        false
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

    /// Sets the counter the host reports (a restored checkpoint's, before the first start),
    /// under the lock like `record_exit` so that `wait_for_counter` cannot miss it.
    pub(crate) fn set_counter(&self, counter: u64) {
        let _st = self.lock();
        self.counter.store(counter, Ordering::Release);
        self.cv.notify_all();
    }

    /// Excludes `start` while held (see the field `apply_lock`).
    pub(crate) fn apply_lock(&self) -> MutexGuard<'_, ()> {
        // Guards no data: a poisoned lock is as good as a clean one.
        self.apply_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker pauses itself (as `pause` would, without waiting): it parks at its next
    /// `wait_runnable`.
    pub(crate) fn park_self(&self) {
        let mut st = self.lock();
        st.want_run = false;
        self.cv.notify_all();
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
        // Waits for a checkpoint apply to finish (see `apply_lock`).
        let _apply = self.apply_lock();
        let mut st = self.lock();
        if let Some(why) = &st.failure {
            return Err(GuestStateError::Failed(why.clone()));
        }
        if st.worker_done || st.shutdown {
            return Err(GuestStateError::Stopped);
        }
        if let Some(overdue) = self.overdue() {
            st.fenced = true;
            st.want_run = false;
            self.cv.notify_all();
            return Err(GuestStateError::Fenced { overdue });
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
            if st.fenced {
                return Err(GuestStateError::Fenced {
                    overdue: self.overdue().unwrap_or_default(),
                });
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
        self.park(timeout, false)
    }

    /// Moves the run deadline to now (so `start` is refused), then parks the worker like
    /// `pause`. `Ok(true)` if it was running.
    pub(crate) fn fence(&self, timeout: Duration) -> Result<bool, GuestStateError> {
        self.park(timeout, true)
    }

    fn park(&self, timeout: Duration, fence: bool) -> Result<bool, GuestStateError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if fence {
            self.deadline_ns.store(boottime_ns(), Ordering::Release);
            st.fenced = true;
        }
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
            if st.worker_done || st.fenced {
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

    /// Sets (or clears) the run deadline. Clearing it, or moving it past now, also lifts a fence
    /// (the guest stays paused until the next `start`); a deadline already passed fences the
    /// guest at its next entry.
    pub(crate) fn set_run_deadline(&self, deadline: Option<Instant>) {
        let mut st = self.lock();
        let ns = deadline.map_or(NO_DEADLINE, to_boottime_ns);
        self.deadline_ns.store(ns, Ordering::Release);
        if ns == NO_DEADLINE || boottime_ns() < ns {
            st.fenced = false;
        }
        self.cv.notify_all();
    }

    /// Waits until the guest is fenced; `false` on timeout.
    pub(crate) fn wait_fenced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.fenced {
                return true;
            }
            let (g, timed_out) = self.wait_until(st, deadline);
            st = g;
            if timed_out {
                return st.fenced;
            }
        }
    }

    // ---- readers ----

    /// How long ago the run deadline passed, or `None` if it has not (or there is none).
    fn overdue(&self) -> Option<Duration> {
        let deadline = self.deadline_ns.load(Ordering::Acquire);
        let now = boottime_ns();
        (deadline != NO_DEADLINE && now >= deadline).then(|| Duration::from_nanos(now - deadline))
    }

    pub(crate) fn run_deadline(&self) -> Option<Instant> {
        match self.deadline_ns.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            ns => Some(from_boottime_ns(ns)),
        }
    }

    pub(crate) fn fenced(&self) -> bool {
        self.lock().fenced
    }

    pub(crate) fn counter(&self) -> u64 {
        self.counter.load(Ordering::Acquire)
    }

    pub(crate) fn exits(&self) -> u64 {
        self.exits.load(Ordering::Acquire)
    }

    /// Wanted running, worker alive and the run deadline not passed (past it the worker never
    /// enters again, even if nobody has fenced it yet: a process continued after SIGSTOP must
    /// not report a guest it will not run).
    pub(crate) fn is_running(&self) -> bool {
        let st = self.lock();
        st.want_run && !st.worker_done && self.overdue().is_none()
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

/// How long `vm_start` waits for the first guest exit (or simulated tick) after releasing it.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `pause` waits for the worker to park.
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Owner of a standby guest's worker thread: when the last handle goes, the thread is stopped and
/// joined.
struct Owner {
    kind: &'static str,
    gate: Arc<Gate>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.gate.shutdown();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                log::error!("{}: the guest's worker thread panicked", self.kind);
            }
        }
    }
}

/// The controls every standby guest shares ([`crate::DummyVm`], [`crate::SimulatedVm`] deref to
/// it): start, pause, and what the host can observe of the guest. Cheap to clone: clones control
/// the same guest, so the CLI can keep one to read the counter while the takeover core owns another
/// as its hook.
#[derive(Clone)]
pub struct GuestControl {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for GuestControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.owner.kind)
            .field("counter", &self.counter())
            .field("exits", &self.exits())
            .field("running", &self.is_running())
            .field("fenced", &self.fenced())
            .finish()
    }
}

impl GuestControl {
    /// Spawns the paused worker: `work` runs on its own thread and must ask the gate
    /// (`wait_runnable`) before every step.
    pub(crate) fn spawn<F>(kind: &'static str, thread_name: &str, work: F) -> std::io::Result<Self>
    where
        F: FnOnce(Arc<Gate>) + Send + 'static,
    {
        let gate = Arc::new(Gate::default());
        let worker = gate.clone();
        let handle = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || work(worker))?;
        Ok(GuestControl {
            owner: Arc::new(Owner {
                kind,
                gate,
                thread: Mutex::new(Some(handle)),
            }),
        })
    }

    pub(crate) fn gate(&self) -> &Gate {
        &self.owner.gate
    }

    /// `"kvm-dummy"` or `"simulated"`.
    pub fn kind(&self) -> &'static str {
        self.owner.kind
    }

    /// The last counter value the guest produced (0 before it ever ran).
    pub fn counter(&self) -> u64 {
        self.gate().counter()
    }

    /// How many guest exits (or simulated ticks) the worker has handled.
    pub fn exits(&self) -> u64 {
        self.gate().exits()
    }

    /// Whether the guest is released (started and not paused) and its worker alive.
    pub fn is_running(&self) -> bool {
        self.gate().is_running()
    }

    /// Releases the worker and returns at once. `Ok(true)` if the guest was paused and now runs;
    /// `Ok(false)` if it already ran (nothing changes, `started_at` is kept).
    pub fn start(&self) -> Result<bool, GuestStateError> {
        let started = self.gate().start()?;
        if started {
            log::info!("{}: guest released", self.kind());
        }
        Ok(started)
    }

    /// Stops the guest after its current step. Returns once the worker has parked (`Ok(true)` if
    /// it was running). `start` resumes where the guest stopped.
    pub fn pause(&self) -> Result<bool, GuestStateError> {
        let was_running = self.gate().pause(DEFAULT_PAUSE_TIMEOUT)?;
        if was_running {
            log::info!(
                "{}: guest paused at counter {}",
                self.kind(),
                self.counter()
            );
        }
        Ok(was_running)
    }

    /// When the guest was last released (paused → running).
    pub fn started_at(&self) -> Option<Instant> {
        self.gate().started_at()
    }

    /// When the first exit (or tick) after the last release arrived.
    pub fn first_exit_after_start(&self) -> Option<Instant> {
        self.gate().first_exit_after_start()
    }

    /// How many times the guest was released (paused → running).
    pub fn starts(&self) -> u64 {
        self.gate().starts()
    }

    /// Waits (without polling) for the first exit after the last release.
    pub fn wait_first_exit(&self, timeout: Duration) -> Result<Instant, GuestStateError> {
        self.gate().wait_first_exit(timeout)
    }

    /// Waits (without polling) until the counter is at least `min`; `false` on timeout, when the
    /// worker is gone, or as soon as the guest is fenced (its counter is then frozen).
    pub fn wait_for_counter(&self, min: u64, timeout: Duration) -> bool {
        self.gate().wait_for_counter(min, timeout)
    }

    /// Why the worker stopped, if the guest failed.
    pub fn failure(&self) -> Option<String> {
        self.gate().failure()
    }

    /// Sets the *run deadline*: past it, the worker does not enter the guest again. The vCPU
    /// thread itself checks it right before every entry (every `KVM_RUN`; for the dummy guest,
    /// between every two counter increments); once past, it parks the guest as paused, marks it
    /// [`fenced`](Self::fenced), and the counter stays frozen. `start` (and `vm_start`,
    /// `vm_resume`) then fail with [`GuestStateError::Fenced`].
    ///
    /// Why on the vCPU thread: a process stopped past its lease (SIGSTOP, a long page-in) and then
    /// continued wakes its vCPU threads at the same instant as its event loop, so a check on the
    /// loop comes too late; the guest itself must not run past the lease.
    ///
    /// `None` clears the deadline. Clearing it or moving it past now lifts a fence, but does not
    /// restart the guest: call `start` for that. A change takes effect at the next entry (a step
    /// already entered completes). The deadline is kept on `CLOCK_BOOTTIME`, which, unlike
    /// `Instant`, also counts time the host spent suspended.
    ///
    /// Limits: a process stopped between the check and the entry runs one more step when it is
    /// continued (for the dummy guest: one increment). A real guest can run long without exiting,
    /// so a real VMM also needs a timer that kicks its vCPUs out at the deadline.
    pub fn set_run_deadline(&self, deadline: Option<Instant>) {
        self.gate().set_run_deadline(deadline);
        match deadline {
            Some(d) => log::debug!(
                "{}: run deadline in {:?}",
                self.kind(),
                d.saturating_duration_since(Instant::now())
            ),
            None => log::debug!("{}: run deadline cleared", self.kind()),
        }
    }

    /// The run deadline, if one is set (a deadline set before a host suspend shows earlier).
    pub fn run_deadline(&self) -> Option<Instant> {
        self.gate().run_deadline()
    }

    /// Fences the guest now: moves the run deadline to now and parks the worker like
    /// [`pause`](Self::pause) (returns once it has parked; `Ok(true)` if it was running). Until
    /// [`set_run_deadline`](Self::set_run_deadline) clears the deadline or moves it past now,
    /// `start` fails with [`GuestStateError::Fenced`].
    pub fn fence(&self) -> Result<bool, GuestStateError> {
        let was_running = self.gate().fence(DEFAULT_PAUSE_TIMEOUT)?;
        log::warn!(
            "{}: guest fenced at counter {}",
            self.kind(),
            self.counter()
        );
        Ok(was_running)
    }

    /// Whether the guest is fenced: its worker refused to enter it past the run deadline, or
    /// `start` was refused for that reason, or [`fence`](Self::fence) was called, and the
    /// deadline has not been cleared or moved past now since.
    pub fn fenced(&self) -> bool {
        self.gate().fenced()
    }

    /// Waits (without polling) until the guest is fenced; `false` on timeout.
    pub fn wait_fenced(&self, timeout: Duration) -> bool {
        self.gate().wait_fenced(timeout)
    }
}

impl vmm_takeover_core::VmStart for GuestControl {
    /// Releases the guest and returns once its first exit proves that it runs.
    fn vm_start(
        &mut self,
        record: &vmm_takeover_core::TakeoverRecord,
    ) -> Result<(), vmm_takeover_core::HookError> {
        log::debug!("{}: vm_start ({})", self.kind(), record.reason);
        self.start()?;
        self.wait_first_exit(DEFAULT_START_TIMEOUT)?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}

impl vmm_takeover_core::VmPause for GuestControl {
    fn vm_pause(&mut self) -> Result<(), vmm_takeover_core::HookError> {
        self.pause()?;
        Ok(())
    }

    /// Releases the guest again and returns once its first exit proves that it runs (as
    /// `vm_start`). A fenced guest is refused.
    fn vm_resume(&mut self) -> Result<(), vmm_takeover_core::HookError> {
        log::debug!("{}: vm_resume", self.kind());
        self.start()?;
        self.wait_first_exit(DEFAULT_START_TIMEOUT)?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}

/// Implements `Deref<Target = GuestControl>`, `VmStart` and `VmPause` (with `vm_resume`) for a
/// guest type that wraps
/// a `GuestControl` in its field `0`.
macro_rules! guest_control {
    ($ty:ty) => {
        impl std::ops::Deref for $ty {
            type Target = $crate::gate::GuestControl;
            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }

        impl vmm_takeover_core::VmStart for $ty {
            fn vm_start(
                &mut self,
                record: &vmm_takeover_core::TakeoverRecord,
            ) -> Result<(), vmm_takeover_core::HookError> {
                self.0.vm_start(record)
            }

            fn describe(&self) -> String {
                vmm_takeover_core::VmStart::describe(&self.0)
            }
        }

        impl vmm_takeover_core::VmPause for $ty {
            fn vm_pause(&mut self) -> Result<(), vmm_takeover_core::HookError> {
                self.0.vm_pause()
            }

            fn vm_resume(&mut self) -> Result<(), vmm_takeover_core::HookError> {
                self.0.vm_resume()
            }

            fn describe(&self) -> String {
                vmm_takeover_core::VmPause::describe(&self.0)
            }
        }
    };
}
pub(crate) use guest_control;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_survives_the_round_trip_through_boottime() {
        let now = Instant::now();
        for offset in [
            Duration::ZERO,
            Duration::from_millis(200),
            Duration::from_secs(3600),
        ] {
            let back = from_boottime_ns(to_boottime_ns(now + offset));
            let error = back
                .saturating_duration_since(now + offset)
                .max((now + offset).saturating_duration_since(back));
            // Two clock reads per conversion: microseconds at most.
            assert!(
                error < Duration::from_millis(1),
                "{offset:?}: off by {error:?}"
            );
        }
        let past = to_boottime_ns(now - Duration::from_millis(5));
        assert!(past < boottime_ns());
    }

    #[test]
    fn far_deadlines_never_mean_no_deadline() {
        // More nanoseconds than a u64 holds.
        let far = Instant::now() + Duration::from_secs(u64::MAX / 1_000_000_000 + 1);
        assert_eq!(to_boottime_ns(far), NO_DEADLINE - 1);
    }

    #[test]
    fn fresh_gate_has_no_deadline() {
        let gate = Gate::default();
        assert!(gate.may_enter());
        assert_eq!(gate.run_deadline(), None);
        assert!(!gate.fenced());
    }
}
