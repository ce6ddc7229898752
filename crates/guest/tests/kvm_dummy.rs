// SPDX-License-Identifier: Apache-2.0
//! The dummy KVM guest on the real `/dev/kvm`: paused means no guest instruction runs, start runs
//! guest code (the counter comes from the guest's `out`), start is idempotent, pause really stops.

mod common;

use std::time::{Duration, Instant};

use common::record;
use vmm_takeover_core::{TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::{DummyVm, DummyVmConfig, GuestStateError};

/// Generous bound for events that normally take microseconds (loaded CI machines).
const EVENT_BOUND: Duration = Duration::from_secs(10);

/// A paused dummy VM of the default shape (as `DummyVm::new`), or `None` without `/dev/kvm`.
fn vm_or_skip() -> Option<DummyVm> {
    common::vm_or_skip(DummyVmConfig::default())
}

#[test]
fn paused_vm_executes_no_guest_instruction() {
    let Some(vm) = vm_or_skip() else { return };
    // Asserting an absence needs a wait; 200 ms is ~100k guest loop iterations had it run.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.counter(), 0);
    assert_eq!(vm.exits(), 0);
    assert!(!vm.is_running());
    assert_eq!(vm.started_at(), None);
    assert_eq!(vm.first_exit_after_start(), None);
    assert_eq!(vm.starts(), 0);
}

#[test]
fn start_runs_guest_code() {
    let Some(vm) = vm_or_skip() else { return };
    assert!(vm.start().unwrap());
    assert!(vm.is_running());
    assert!(
        vm.wait_for_counter(1000, EVENT_BOUND),
        "counter stuck at {} (failure: {:?})",
        vm.counter(),
        vm.failure()
    );
    let started = vm.started_at().expect("started_at");
    let first = vm.wait_first_exit(EVENT_BOUND).unwrap();
    assert!(first >= started);
    assert_eq!(vm.first_exit_after_start(), Some(first));
    vm.pause().unwrap();
    // Every exit is one `out` of the guest's incremented eax: the values match one for one.
    assert_eq!(vm.counter(), vm.exits());
}

#[test]
fn vm_start_twice_starts_once() {
    let Some(vm) = vm_or_skip() else { return };
    let mut hook = vm.clone();
    let rec = record(TakeoverReason::TimedOut, Some(libc::ETIMEDOUT));
    hook.vm_start(&rec).unwrap();
    // vm_start returns once the guest has exited at least once: it is known to run.
    assert!(vm.counter() >= 1);
    let started = vm.started_at().expect("started_at");
    let first = vm.first_exit_after_start().expect("first exit");

    hook.vm_start(&rec).unwrap();
    assert!(!vm.start().unwrap());
    assert_eq!(vm.starts(), 1, "one release of the vCPU thread");
    assert_eq!(vm.started_at(), Some(started));
    assert_eq!(vm.first_exit_after_start(), Some(first));
    assert_eq!(VmStart::describe(&hook), "kvm-dummy");
    let now = vm.counter();
    assert!(vm.wait_for_counter(now + 1000, EVENT_BOUND));
}

#[test]
fn pause_stops_the_guest_and_start_resumes_it() {
    let Some(vm) = vm_or_skip() else { return };
    vm.start().unwrap();
    assert!(vm.wait_for_counter(100, EVENT_BOUND));

    assert!(vm.pause().unwrap());
    assert!(!vm.is_running());
    let frozen = vm.counter();
    assert_eq!(frozen, vm.exits());
    // Absence again: the parked vCPU thread must not enter KVM_RUN.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.counter(), frozen);
    assert_eq!(vm.exits(), frozen);
    assert!(!vm.pause().unwrap(), "a second pause is a no-op");

    assert!(vm.start().unwrap());
    assert_eq!(vm.starts(), 2);
    assert!(vm.wait_for_counter(frozen + 100, EVENT_BOUND));
    // The guest resumed where it stopped: its register state survived the pause.
    vm.pause().unwrap();
    assert_eq!(vm.counter(), vm.exits());
}

#[test]
fn vm_pause_hook_parks_the_guest() {
    let Some(vm) = vm_or_skip() else { return };
    let mut hook = vm.clone();
    hook.vm_start(&record(TakeoverReason::Handoff, None))
        .unwrap();
    hook.vm_pause().unwrap();
    let frozen = vm.counter();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.counter(), frozen);
    assert_eq!(VmPause::describe(&hook), "kvm-dummy");
}

#[test]
fn dropping_a_running_vm_joins_its_thread() {
    let Some(vm) = vm_or_skip() else { return };
    let watcher = vm.clone();
    vm.start().unwrap();
    assert!(vm.wait_for_counter(10, EVENT_BOUND));
    drop(vm);
    // The clone keeps the VM alive and running.
    let now = watcher.counter();
    assert!(watcher.wait_for_counter(now + 10, EVENT_BOUND));
    // Dropping the last handle stops and joins the vCPU thread (the test would hang otherwise).
    drop(watcher);
}

#[test]
fn counter_is_readable_from_another_thread() {
    let Some(vm) = vm_or_skip() else { return };
    let reader = vm.clone();
    let t = std::thread::spawn(move || reader.wait_for_counter(500, EVENT_BOUND));
    vm.start().unwrap();
    assert!(t.join().unwrap());
}

#[test]
fn vm_resume_restarts_a_paused_guest() {
    let Some(vm) = vm_or_skip() else { return };
    let mut hook = vm.clone();
    hook.vm_start(&record(TakeoverReason::Handoff, None))
        .unwrap();
    hook.vm_pause().unwrap();
    let frozen = vm.counter();
    // vm_resume returns once the guest has exited again: it is known to run.
    hook.vm_resume().unwrap();
    assert!(vm.is_running());
    assert!(vm.counter() > frozen, "{} <= {frozen}", vm.counter());
    assert_eq!(vm.starts(), 2);
    // On a running guest it changes nothing.
    hook.vm_resume().unwrap();
    assert_eq!(vm.starts(), 2);
}

fn is_fenced(err: &GuestStateError) -> bool {
    matches!(err, GuestStateError::Fenced { .. })
}

#[test]
fn past_run_deadline_refuses_start_and_no_guest_instruction_runs() {
    let Some(vm) = vm_or_skip() else { return };
    vm.set_run_deadline(Some(Instant::now() - Duration::from_millis(1)));
    assert!(vm.run_deadline().is_some());
    let err = vm.start().unwrap_err();
    assert!(is_fenced(&err), "{err:?}");
    assert!(err.to_string().contains("set_run_deadline"), "{err}");
    assert!(vm.fenced());
    let mut hook = vm.clone();
    let err = hook
        .vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap_err();
    assert!(
        err.downcast_ref::<GuestStateError>().is_some_and(is_fenced),
        "{err:?}"
    );
    // Absence: 100 ms is ~50k guest exits had the vCPU entered the guest.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.counter(), 0);
    assert_eq!(vm.exits(), 0);
    assert!(!vm.is_running());
    assert_eq!(vm.starts(), 0);

    // Clearing the deadline lifts the fence; the guest stays paused until started.
    vm.set_run_deadline(None);
    assert!(!vm.fenced());
    assert_eq!(vm.run_deadline(), None);
    assert!(!vm.is_running());
    hook.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert!(vm.wait_for_counter(100, EVENT_BOUND));
}

#[test]
fn run_deadline_ahead_lets_the_guest_run_then_freezes_it() {
    let Some(vm) = vm_or_skip() else { return };
    let deadline = Instant::now() + Duration::from_millis(200);
    vm.set_run_deadline(Some(deadline));
    assert!(!vm.fenced());
    assert!(vm.start().unwrap());
    assert!(
        vm.wait_for_counter(100, EVENT_BOUND),
        "the guest must run before its deadline (counter {})",
        vm.counter()
    );

    // Nobody pauses it: the vCPU thread fences itself at the deadline.
    assert!(vm.wait_fenced(EVENT_BOUND), "not fenced after the deadline");
    assert!(
        Instant::now() >= deadline,
        "fenced {:?} before the deadline",
        deadline - Instant::now()
    );
    assert!(!vm.is_running());
    assert_eq!(vm.failure(), None);
    let frozen = vm.counter();
    assert_eq!(frozen, vm.exits());
    // Absence over a further interval: the parked vCPU thread does not enter KVM_RUN.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.counter(), frozen);
    assert_eq!(vm.exits(), frozen);
    assert!(!vm.wait_for_counter(frozen + 1, EVENT_BOUND));
    let err = vm.start().unwrap_err();
    assert!(is_fenced(&err), "{err:?}");
    assert_eq!(vm.counter(), frozen);

    // Extending the deadline lets it run again, from where it stopped.
    vm.set_run_deadline(Some(Instant::now() + EVENT_BOUND * 6));
    assert!(!vm.fenced());
    assert!(vm.start().unwrap());
    assert!(vm.wait_for_counter(frozen + 100, EVENT_BOUND));
    // Clearing it keeps it running.
    vm.set_run_deadline(None);
    let now = vm.counter();
    assert!(vm.wait_for_counter(now + 100, EVENT_BOUND));
    assert!(vm.pause().unwrap());
    assert_eq!(vm.counter(), vm.exits());
}

#[test]
fn fence_parks_now_and_refuses_start_until_the_deadline_moves() {
    let Some(vm) = vm_or_skip() else { return };
    vm.start().unwrap();
    assert!(vm.wait_for_counter(100, EVENT_BOUND));
    assert!(vm.fence().unwrap(), "it was running");
    assert!(vm.fenced());
    assert!(!vm.is_running());
    let frozen = vm.counter();
    assert_eq!(frozen, vm.exits());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.counter(), frozen);

    assert!(is_fenced(&vm.start().unwrap_err()));
    let mut hook = vm.clone();
    assert!(hook.vm_resume().is_err());
    // A deadline that has passed too does not lift the fence.
    vm.set_run_deadline(Some(Instant::now() - Duration::from_secs(1)));
    assert!(vm.fenced());
    assert!(is_fenced(&vm.start().unwrap_err()));
    assert_eq!(vm.counter(), frozen);

    vm.set_run_deadline(None);
    assert!(!vm.fenced());
    hook.vm_resume().unwrap();
    assert!(vm.wait_for_counter(frozen + 100, EVENT_BOUND));
}
