// SPDX-License-Identifier: Apache-2.0
//! `vm_start` / `vm_pause` backends for vmm-takeover.
//!
//! - [`DummyVm`] (`kvm_dummy`): a tiny real KVM guest, created paused, whose counter proves from
//!   the host that guest instructions execute after a takeover.
//! - [`SimulatedVm`] (`simulated`): a counting thread with the same surface, for machines without
//!   `/dev/kvm` — a simulation, not a VM. [`StandbyGuest`] holds either.
//! - [`QmpVm`] (`qmp`): a QEMU guest resumed with `cont` / paused with `stop` over QMP.
//! - [`QmpMigrate`] (`migrate`): a planned handoff by QEMU's own live migration.
//! - [`CommandHook`] (`command`): any VMM, through a shell command.
//! - [`QemuProcess`] (`qemu`): a paused, empty QEMU/KVM guest with a QMP socket, for tests,
//!   benchmarks and demos.
//!
//! The hooks implement [`vmm_takeover_core::VmStart`] and [`vmm_takeover_core::VmPause`]
//! (including `vm_resume`; [`CommandHook`] only with a resume command), are safe to call twice, and return only once the guest is known to run
//! (or to be paused). [`CommandHook`] and [`QmpVm`] are bounded by a timeout and hand out an
//! [`vmm_takeover_core::AbortHandle`]; the standby guests can be given a run deadline that their
//! vCPU thread enforces itself ([`GuestControl::set_run_deadline`]).

pub mod command;
mod gate;
pub mod kvm_dummy;
pub mod migrate;
pub mod qemu;
pub mod qmp;
pub mod simulated;
pub mod standby;

pub use command::{CommandError, CommandHook};
pub use gate::{GuestControl, GuestStateError, DEFAULT_PAUSE_TIMEOUT, DEFAULT_START_TIMEOUT};
pub use kvm_dummy::{
    Capture, DummyVm, DummyVmConfig, KvmDummyError, VcpuState, COUNTER_PORT, DIRTY_PORT, PAGE_SIZE,
};
pub use migrate::{MigrateError, MigrationInfo, QmpMigrate};
pub use qemu::{QemuError, QemuProcess};
pub use qmp::{QmpClient, QmpError, QmpStatus, QmpVm};
pub use simulated::{SimulatedVm, SimulatedVmError};
pub use standby::StandbyGuest;
