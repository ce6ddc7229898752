// SPDX-License-Identifier: Apache-2.0
//! Builds the vm_start / pause hooks the flags ask for, from the guest backends crate.

use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};
use vmm_takeover_guest::{CommandHook, QmpVm, StandbyGuest};

use crate::cli::{BackupArgs, SourceArgs};

/// A guest that lives inside this process (`--vm`), which the CLI reports on.
pub fn local_guest(kind: Option<&str>) -> Result<Option<StandbyGuest>, String> {
    match kind {
        None => Ok(None),
        Some("kvm-dummy") => StandbyGuest::kvm().map(Some).map_err(|e| e.to_string()),
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

/// The backup's `vm_start` hook, and the local standby guest if `--vm` asked for one.
pub fn start_hook(a: &BackupArgs) -> Result<WithGuest<Box<dyn VmStart>>, String> {
    if let Some(cmd) = &a.on_takeover {
        return Ok((Box::new(CommandHook::new(cmd.clone())), None));
    }
    if let Some(path) = &a.qmp {
        return Ok((Box::new(QmpVm::new(path.clone())), None));
    }
    if let Some(guest) = local_guest(a.vm.as_deref())? {
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

/// The source's pause-before-handoff hook (`None`: hand off at once), and its running local guest
/// if `--vm` asked for one.
pub fn pause_hook(a: &SourceArgs) -> Result<WithGuest<Option<Box<dyn VmPause>>>, String> {
    if let Some(cmd) = &a.on_handoff {
        return Ok((Some(Box::new(CommandHook::new(cmd.clone()))), None));
    }
    if let Some(path) = &a.qmp {
        return Ok((Some(Box::new(QmpVm::new(path.clone()))), None));
    }
    if let Some(guest) = local_guest(a.vm.as_deref())? {
        // The source's guest is the primary: it runs from the start.
        guest
            .start()
            .map_err(|e| format!("cannot start the local guest: {e}"))?;
        return Ok((Some(Box::new(guest.clone())), Some(guest)));
    }
    Ok((None, None))
}
