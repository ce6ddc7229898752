// SPDX-License-Identifier: Apache-2.0
//! The dummy KVM guest on the real `/dev/kvm`: paused means no guest instruction runs, start runs
//! guest code (the counter comes from the guest's `out`), start is idempotent, pause really stops.

mod common;

use std::time::Duration;

use common::{record, skip};
use vmm_takeover_core::{TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::{DummyVm, KvmDummyError};

/// Generous bound for events that normally take microseconds (loaded CI machines).
const EVENT_BOUND: Duration = Duration::from_secs(10);

/// A paused dummy VM, or `None` (after printing why) when `/dev/kvm` cannot be opened.
fn vm_or_skip() -> Option<DummyVm> {
    match DummyVm::new() {
        Ok(vm) => Some(vm),
        Err(
            e @ (KvmDummyError::KvmMissing
            | KvmDummyError::KvmPermission
            | KvmDummyError::KvmNoDevice(_)
            | KvmDummyError::KvmOpen(_)),
        ) => {
            skip(e);
            None
        }
        Err(e) => panic!("cannot create the dummy VM although /dev/kvm opened: {e}"),
    }
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
