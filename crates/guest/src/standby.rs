// SPDX-License-Identifier: Apache-2.0
//! [`StandbyGuest`]: either the real dummy KVM guest or the simulation, behind one type.

use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

use crate::gate::GuestControl;
use crate::kvm_dummy::{DummyVm, DummyVmConfig, KvmDummyError};
use crate::simulated::{SimulatedVm, SimulatedVmError};

/// A standby guest the demo can start, pause and watch: a real KVM guest or a simulation.
/// Cheap to clone (clones share the guest). Its controls are [`GuestControl`]'s, which it derefs
/// to.
#[derive(Debug, Clone)]
pub enum StandbyGuest {
    /// A real KVM guest ([`DummyVm`]).
    Kvm(DummyVm),
    /// A counting thread, for machines without `/dev/kvm` ([`SimulatedVm`]).
    Simulated(SimulatedVm),
}

impl StandbyGuest {
    /// A real dummy KVM guest, created paused.
    pub fn kvm() -> Result<Self, KvmDummyError> {
        DummyVm::new().map(StandbyGuest::Kvm)
    }

    /// A real dummy KVM guest built from `cfg`, created paused.
    pub fn kvm_with(cfg: DummyVmConfig) -> Result<Self, KvmDummyError> {
        DummyVm::with_config(cfg).map(StandbyGuest::Kvm)
    }

    /// The KVM guest, for checkpointing (`None` for the simulation).
    pub fn as_dummy(&self) -> Option<&DummyVm> {
        match self {
            StandbyGuest::Kvm(vm) => Some(vm),
            StandbyGuest::Simulated(_) => None,
        }
    }

    /// A simulated guest, created paused.
    pub fn simulated() -> Result<Self, SimulatedVmError> {
        SimulatedVm::new().map(StandbyGuest::Simulated)
    }

    /// Whether this is a real KVM guest (as opposed to the simulation).
    pub fn is_real(&self) -> bool {
        matches!(self, StandbyGuest::Kvm(_))
    }
}

impl std::ops::Deref for StandbyGuest {
    type Target = GuestControl;

    fn deref(&self) -> &GuestControl {
        match self {
            StandbyGuest::Kvm(vm) => vm,
            StandbyGuest::Simulated(vm) => vm,
        }
    }
}

impl VmStart for StandbyGuest {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        match self {
            StandbyGuest::Kvm(vm) => vm.vm_start(record),
            StandbyGuest::Simulated(vm) => vm.vm_start(record),
        }
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}

impl VmPause for StandbyGuest {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        match self {
            StandbyGuest::Kvm(vm) => vm.vm_pause(),
            StandbyGuest::Simulated(vm) => vm.vm_pause(),
        }
    }

    fn vm_resume(&mut self) -> Result<(), HookError> {
        match self {
            StandbyGuest::Kvm(vm) => vm.vm_resume(),
            StandbyGuest::Simulated(vm) => vm.vm_resume(),
        }
    }

    fn describe(&self) -> String {
        self.kind().to_string()
    }
}
