// SPDX-License-Identifier: Apache-2.0
//! A **simulated** standby guest for machines without `/dev/kvm`: no VM, no guest code, just a
//! thread that increments a counter while "running". It has the same surface as
//! [`crate::DummyVm`] so that demos and tests can run everywhere, but it proves nothing about
//! virtualization — say so wherever its numbers are shown.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

use crate::gate::{Gate, GuestStateError, WorkerGuard};
use crate::kvm_dummy::{DEFAULT_PAUSE_TIMEOUT, DEFAULT_START_TIMEOUT};

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

struct Inner {
    gate: Arc<Gate>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.gate.shutdown();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                error!("simulated guest: its thread panicked");
            }
        }
    }
}

/// A simulated standby guest (a counting thread, not a VM), created paused. Cheap to clone.
#[derive(Clone)]
pub struct SimulatedVm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimulatedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedVm")
            .field("counter", &self.counter())
            .field("running", &self.is_running())
            .finish()
    }
}

impl SimulatedVm {
    /// Creates the simulation paused, ticking every [`DEFAULT_TICK`] once started.
    pub fn new() -> Result<Self, SimulatedVmError> {
        Self::with_tick(DEFAULT_TICK)
    }

    /// Creates the simulation paused, ticking every `tick` once started.
    pub fn with_tick(tick: Duration) -> Result<Self, SimulatedVmError> {
        let gate = Arc::new(Gate::default());
        let worker = gate.clone();
        let handle = std::thread::Builder::new()
            .name("simulated-guest".into())
            .spawn(move || {
                let _finish = WorkerGuard(worker.clone());
                let mut n = 0u64;
                while worker.wait_runnable() {
                    // Count first, then sleep: the first tick after start is immediate, and a
                    // pause never lets one more increment through after it returned.
                    n += 1;
                    worker.record_exit(n);
                    std::thread::sleep(tick);
                }
            })
            .map_err(SimulatedVmError::Spawn)?;
        Ok(SimulatedVm {
            inner: Arc::new(Inner {
                gate,
                thread: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The simulated counter (0 before the first start).
    pub fn counter(&self) -> u64 {
        self.inner.gate.counter()
    }

    /// How many simulated exits (ticks) happened.
    pub fn exits(&self) -> u64 {
        self.inner.gate.exits()
    }

    /// Whether the simulation is released.
    pub fn is_running(&self) -> bool {
        self.inner.gate.is_running()
    }

    /// Releases the simulation; `Ok(false)` if it already ran (nothing changes).
    pub fn start(&self) -> Result<bool, GuestStateError> {
        let started = self.inner.gate.start()?;
        if started {
            info!("simulated guest: released (this is a simulation, not a VM)");
        }
        Ok(started)
    }

    /// Stops the simulation; returns once its thread has parked.
    pub fn pause(&self) -> Result<bool, GuestStateError> {
        self.inner.gate.pause(DEFAULT_PAUSE_TIMEOUT)
    }

    /// When the simulation was last released.
    pub fn started_at(&self) -> Option<Instant> {
        self.inner.gate.started_at()
    }

    /// When the first tick after the last release happened.
    pub fn first_exit_after_start(&self) -> Option<Instant> {
        self.inner.gate.first_exit_after_start()
    }

    /// How many times the simulation was released.
    pub fn starts(&self) -> u64 {
        self.inner.gate.starts()
    }

    /// Waits for the first tick after the last release.
    pub fn wait_first_exit(&self, timeout: Duration) -> Result<Instant, GuestStateError> {
        self.inner.gate.wait_first_exit(timeout)
    }

    /// Waits until the counter is at least `min`; `false` on timeout.
    pub fn wait_for_counter(&self, min: u64, timeout: Duration) -> bool {
        self.inner.gate.wait_for_counter(min, timeout)
    }
}

impl VmStart for SimulatedVm {
    fn vm_start(&mut self, _record: &TakeoverRecord) -> Result<(), HookError> {
        self.start()?;
        self.wait_first_exit(DEFAULT_START_TIMEOUT)?;
        Ok(())
    }

    fn describe(&self) -> String {
        "simulated".to_string()
    }
}

impl VmPause for SimulatedVm {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        self.pause()?;
        Ok(())
    }

    fn describe(&self) -> String {
        "simulated".to_string()
    }
}
