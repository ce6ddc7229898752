// SPDX-License-Identifier: Apache-2.0
//! Builds the vm_start / pause hooks the flags ask for.

use std::process::Command;

use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

use crate::cli::{BackupArgs, SourceArgs};

/// The backup's `vm_start` hook.
pub fn start_hook(a: &BackupArgs) -> Result<Box<dyn VmStart>, String> {
    if let Some(cmd) = &a.on_takeover {
        let cmd = cmd.clone();
        return Ok(Box::new(
            move |r: &TakeoverRecord| -> Result<(), HookError> {
                let st = Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .env("VMM_TAKEOVER_REASON", r.reason.as_str())
                    .env("VMM_TAKEOVER_PAIR_ID", &r.pair_id)
                    .status()?;
                if st.success() {
                    Ok(())
                } else {
                    Err(format!("{cmd:?} failed: {st}").into())
                }
            },
        ));
    }
    Ok(Box::new(|_: &TakeoverRecord| -> Result<(), HookError> {
        log::warn!("no vm_start hook configured: takeover reported only");
        Ok(())
    }))
}

struct NoPause;

impl VmPause for NoPause {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "none".into()
    }
}

struct CmdPause(String);

impl VmPause for CmdPause {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        let st = Command::new("sh").arg("-c").arg(&self.0).status()?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("{:?} failed: {st}", self.0).into())
        }
    }
    fn describe(&self) -> String {
        format!("command:{}", self.0)
    }
}

/// The source's pause-before-handoff hook.
pub fn pause_hook(a: &SourceArgs) -> Result<Box<dyn VmPause>, String> {
    Ok(match &a.on_handoff {
        Some(cmd) => Box::new(CmdPause(cmd.clone())),
        None => Box::new(NoPause),
    })
}
