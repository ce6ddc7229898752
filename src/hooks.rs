// SPDX-License-Identifier: Apache-2.0
//! Builds the vm_start / pause hooks the flags ask for, from the guest backends crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_takeover_core::{AbortHandle, HookError, TakeoverRecord, VmPause, VmStart};
use vmm_takeover_guest::{CommandHook, DummyVmConfig, QmpError, QmpMigrate, QmpVm, StandbyGuest};

use crate::cli::{BackupArgs, GuestArgs, SourceArgs};

/// A guest that lives inside this process (`--vm`), which the CLI reports on.
pub fn local_guest(
    kind: Option<&str>,
    shape: &GuestArgs,
    dirty_log: bool,
) -> Result<Option<StandbyGuest>, String> {
    match kind {
        None => Ok(None),
        Some("kvm-dummy") => StandbyGuest::kvm_with(DummyVmConfig {
            mem_size: shape.guest_mem.0,
            dirty_rate: shape.guest_dirty_rate.0,
            dirty_log,
        })
        .map(Some)
        .map_err(|e| e.to_string()),
        Some("simulated") => StandbyGuest::simulated()
            .map(Some)
            .map_err(|e| e.to_string()),
        Some(other) => Err(format!(
            "unknown --vm {other:?} (allowed: kvm-dummy, simulated)"
        )),
    }
}

/// A hook, and the guest living in this process if `--vm` asked for one.
type WithGuest<H> = (H, Option<StandbyGuest>);

/// The backup's `vm_start` hook, and the local standby guest if `--vm` asked for one. Hooks
/// that can bound themselves get the same deadline as the core gives them, so that a hung
/// command is killed, not only reported.
pub fn start_hook(
    a: &BackupArgs,
    incomplete: &Arc<AtomicBool>,
) -> Result<WithGuest<Box<dyn VmStart>>, String> {
    let t = a.hook_timeout;
    if let Some(cmd) = &a.on_takeover {
        return Ok((Box::new(command(cmd, t)), None));
    }
    if let Some(path) = &a.qmp {
        let vm = QmpVm::new(path.clone()).with_timeout(t);
        return Ok((
            Box::new(QmpStart {
                vm,
                incomplete: incomplete.clone(),
            }),
            None,
        ));
    }
    if let Some(guest) = local_guest(
        a.vm.as_deref(),
        &a.guest,
        a.replica_from.is_some() || a.then_checkpoint.is_some(),
    )? {
        return Ok((Box::new(guest.clone()), Some(guest)));
    }
    Ok((
        Box::new(|_: &TakeoverRecord| -> Result<(), HookError> {
            log::warn!("no vm_start hook configured: takeover reported only");
            Ok(())
        }),
        None,
    ))
}

/// The backup's QEMU hook: [`QmpVm`], noting when it refused an incomplete incoming migration
/// (the CLI then exits 9 rather than 3).
struct QmpStart {
    vm: QmpVm,
    incomplete: Arc<AtomicBool>,
}

impl VmStart for QmpStart {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        match self.vm.vm_start(record) {
            Err(e) if matches!(e.downcast_ref(), Some(QmpError::IncomingIncomplete { .. })) => {
                self.incomplete.store(true, Ordering::SeqCst);
                Err(e)
            }
            other => other,
        }
    }

    fn describe(&self) -> String {
        VmStart::describe(&self.vm)
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        VmStart::abort_handle(&self.vm)
    }
}

fn command(cmd: &str, t: Duration) -> CommandHook {
    CommandHook::new(cmd.to_string()).with_timeout(t)
}

/// The source's pause-before-handoff hook (`None`: hand off at once), and its running local guest
/// if `--vm` asked for one.
pub fn pause_hook(a: &SourceArgs) -> Result<WithGuest<Option<Box<dyn VmPause>>>, String> {
    let t = a.hook_timeout;
    if let Some(cmd) = &a.on_handoff {
        let mut hook = command(cmd, t);
        if let Some(resume) = &a.on_resume {
            hook = hook.with_resume(resume.clone());
        }
        return Ok((Some(Box::new(hook)), None));
    }
    if let (Some(path), Some(uri)) = (&a.qmp, &a.migrate_to) {
        // A margin below the core's deadline for the pause, so that a migration that takes too
        // long is reported (and cancelled) as such rather than as a pause timeout.
        let bound = t.saturating_sub((t / 10).max(Duration::from_millis(100)));
        let hook = QmpMigrate::new(path.clone(), uri, bound).map_err(|e| e.to_string())?;
        return Ok((Some(Box::new(hook)), None));
    }
    if let Some(path) = &a.qmp {
        return Ok((
            Some(Box::new(QmpVm::new(path.clone()).with_timeout(t))),
            None,
        ));
    }
    if let Some(guest) = local_guest(a.vm.as_deref(), &a.guest, a.checkpoint.is_some())? {
        // The source's guest is the primary; the caller starts it (after owning the pair, with
        // an arbiter).
        return Ok((Some(Box::new(guest.clone())), Some(guest)));
    }
    Ok((None, None))
}
