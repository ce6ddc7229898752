// SPDX-License-Identifier: Apache-2.0
//! A **simulated** standby guest for machines without `/dev/kvm`: no VM, no guest code, just a
//! thread that increments a counter while "running". It has the same surface as
//! [`crate::DummyVm`] so that demos and tests can run everywhere, but it proves nothing about
//! virtualization — say so wherever its numbers are shown.

use std::time::Duration;

use crate::gate::{guest_control, GuestControl, GuestStateError, WorkerGuard};

/// The default time between two simulated "exits".
pub const DEFAULT_TICK: Duration = Duration::from_millis(1);

/// Errors of the simulated guest.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedVmError {
    /// The simulation thread could not be spawned.
    #[error("cannot spawn the simulated guest's thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Starting or pausing failed.
    #[error(transparent)]
    State(#[from] GuestStateError),
}

/// A simulated standby guest (a counting thread, not a VM), created paused. Cheap to clone. Its
/// controls (start, pause, counter, ...) are [`GuestControl`]'s, which it derefs to.
#[derive(Clone, Debug)]
pub struct SimulatedVm(GuestControl);

guest_control!(SimulatedVm);

impl SimulatedVm {
    /// Creates the simulation paused, ticking every [`DEFAULT_TICK`] once started.
    pub fn new() -> Result<Self, SimulatedVmError> {
        Self::with_tick(DEFAULT_TICK)
    }

    /// Creates the simulation paused, ticking every `tick` once started.
    pub fn with_tick(tick: Duration) -> Result<Self, SimulatedVmError> {
        let control = GuestControl::spawn("simulated", "simulated-guest", move |worker| {
            let _finish = WorkerGuard(worker.clone());
            let mut n = 0u64;
            while worker.wait_runnable() {
                // The run deadline, checked before every step as the vCPU does before KVM_RUN.
                if !worker.may_enter() {
                    continue;
                }
                // Count first, then sleep: the first tick after start is immediate, and a pause
                // never lets one more increment through after it returned.
                n += 1;
                worker.record_exit(n);
                std::thread::sleep(tick);
            }
        })
        .map_err(SimulatedVmError::Spawn)?;
        Ok(SimulatedVm(control))
    }
}
