// SPDX-License-Identifier: Apache-2.0
//! The simulated standby guest (no KVM) and the `StandbyGuest` wrapper: same contract as the
//! dummy KVM guest.

mod common;

use std::time::{Duration, Instant};

use common::{record, skip};
use vmm_takeover_core::{TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::{GuestStateError, SimulatedVm, StandbyGuest};

const EVENT_BOUND: Duration = Duration::from_secs(10);

#[test]
fn paused_simulation_does_not_count() {
    let vm = SimulatedVm::new().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.counter(), 0);
    assert!(!vm.is_running());
}

#[test]
fn start_is_idempotent_and_pause_stops() {
    let mut vm = SimulatedVm::new().unwrap();
    vm.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    let started = vm.started_at().unwrap();
    vm.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert_eq!(vm.starts(), 1);
    assert_eq!(vm.started_at(), Some(started));
    assert!(vm.wait_for_counter(5, EVENT_BOUND));

    vm.vm_pause().unwrap();
    let frozen = vm.counter();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.counter(), frozen);
    assert!(vm.start().unwrap());
    assert!(vm.wait_for_counter(frozen + 5, EVENT_BOUND));
}

#[test]
fn standby_guest_wraps_either_backend() {
    let mut sim = StandbyGuest::simulated().unwrap();
    assert_eq!(sim.kind(), "simulated");
    assert!(!sim.is_real());
    sim.vm_start(&record(TakeoverReason::Reset, None)).unwrap();
    assert!(sim.wait_for_counter(3, EVENT_BOUND));
    sim.vm_pause().unwrap();
    assert!(!sim.is_running());
    let frozen = sim.counter();
    sim.vm_resume().unwrap();
    assert!(sim.is_running());
    assert!(sim.wait_for_counter(frozen + 3, EVENT_BOUND));

    match StandbyGuest::kvm() {
        Ok(mut kvm) => {
            assert_eq!(VmStart::describe(&kvm), "kvm-dummy");
            assert!(kvm.is_real());
            kvm.vm_start(&record(TakeoverReason::Reset, None)).unwrap();
            assert!(kvm.wait_for_counter(100, EVENT_BOUND));
            kvm.vm_pause().unwrap();
            let frozen = kvm.counter();
            kvm.vm_resume().unwrap();
            assert!(kvm.counter() > frozen);
        }
        Err(e) => skip(format!("StandbyGuest::kvm: {e}")),
    }
}

#[test]
fn simulation_stops_at_its_run_deadline() {
    let vm = SimulatedVm::new().unwrap();
    let deadline = Instant::now() + Duration::from_millis(200);
    vm.set_run_deadline(Some(deadline));
    vm.start().unwrap();
    assert!(vm.wait_for_counter(3, EVENT_BOUND));
    assert!(vm.wait_fenced(EVENT_BOUND));
    assert!(Instant::now() >= deadline);
    let frozen = vm.counter();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.counter(), frozen);
    assert!(matches!(
        vm.start().unwrap_err(),
        GuestStateError::Fenced { .. }
    ));
    vm.set_run_deadline(Some(Instant::now() + Duration::from_secs(60)));
    vm.start().unwrap();
    assert!(vm.wait_for_counter(frozen + 3, EVENT_BOUND));
}

#[test]
fn simulation_with_a_past_deadline_does_not_count() {
    let mut vm = SimulatedVm::new().unwrap();
    vm.set_run_deadline(Some(Instant::now()));
    assert!(vm
        .vm_start(&record(TakeoverReason::PeerClosed, None))
        .is_err());
    assert!(vm.fenced());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.counter(), 0);
}
