// SPDX-License-Identifier: Apache-2.0
//! [`StandbyGuest`]: either the real dummy KVM guest or the simulation, behind one type.

use std::time::{Duration, Instant};

use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

use crate::gate::GuestStateError;
use crate::kvm_dummy::{DummyVm, KvmDummyError};
use crate::simulated::{SimulatedVm, SimulatedVmError};

/// A standby guest the demo can start, pause and watch: a real KVM guest or a simulation.
/// Cheap to clone (clones share the guest).
#[derive(Debug, Clone)]
pub enum StandbyGuest {
    /// A real KVM guest ([`DummyVm`]).
    Kvm(DummyVm),
    /// A counting thread, for machines without `/dev/kvm` ([`SimulatedVm`]).
    Simulated(SimulatedVm),
}

macro_rules! delegate {
    ($self:ident, $vm:ident => $e:expr) => {
        match $self {
            StandbyGuest::Kvm($vm) => $e,
            StandbyGuest::Simulated($vm) => $e,
        }
    };
}

impl StandbyGuest {
    /// A real dummy KVM guest, created paused.
    pub fn kvm() -> Result<Self, KvmDummyError> {
        DummyVm::new().map(StandbyGuest::Kvm)
    }

    /// A simulated guest, created paused.
    pub fn simulated() -> Result<Self, SimulatedVmError> {
        SimulatedVm::new().map(StandbyGuest::Simulated)
    }

    /// `"kvm-dummy"` or `"simulated"`.
    pub fn kind(&self) -> &'static str {
        match self {
            StandbyGuest::Kvm(_) => "kvm-dummy",
            StandbyGuest::Simulated(_) => "simulated",
        }
    }

    /// Whether this is a real KVM guest (as opposed to the simulation).
    pub fn is_real(&self) -> bool {
        matches!(self, StandbyGuest::Kvm(_))
    }

    /// The guest's counter.
    pub fn counter(&self) -> u64 {
        delegate!(self, vm => vm.counter())
    }

    /// How many guest exits (or simulated ticks) happened.
    pub fn exits(&self) -> u64 {
        delegate!(self, vm => vm.exits())
    }

    /// Whether the guest is released and alive.
    pub fn is_running(&self) -> bool {
        delegate!(self, vm => vm.is_running())
    }

    /// Releases the guest without waiting; `Ok(false)` if it already ran.
    pub fn start(&self) -> Result<bool, GuestStateError> {
        delegate!(self, vm => vm.start())
    }

    /// Pauses the guest; returns once it has parked.
    pub fn pause(&self) -> Result<bool, GuestStateError> {
        delegate!(self, vm => vm.pause())
    }

    /// When the guest was last released.
    pub fn started_at(&self) -> Option<Instant> {
        delegate!(self, vm => vm.started_at())
    }

    /// When the first exit after the last release arrived.
    pub fn first_exit_after_start(&self) -> Option<Instant> {
        delegate!(self, vm => vm.first_exit_after_start())
    }

    /// How many times the guest was released.
    pub fn starts(&self) -> u64 {
        delegate!(self, vm => vm.starts())
    }

    /// Waits for the first exit after the last release.
    pub fn wait_first_exit(&self, timeout: Duration) -> Result<Instant, GuestStateError> {
        delegate!(self, vm => vm.wait_first_exit(timeout))
    }

    /// Waits until the counter is at least `min`; `false` on timeout.
    pub fn wait_for_counter(&self, min: u64, timeout: Duration) -> bool {
        delegate!(self, vm => vm.wait_for_counter(min, timeout))
    }
}

impl VmStart for StandbyGuest {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        delegate!(self, vm => VmStart::vm_start(vm, record))
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}

impl VmPause for StandbyGuest {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        delegate!(self, vm => vm.vm_pause())
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}
