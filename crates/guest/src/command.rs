// SPDX-License-Identifier: Apache-2.0
//! [`CommandHook`]: runs a shell command to start (or, on the source, pause) the guest, so that any
//! VMM can be plugged in without code (`virsh resume`, a Firecracker API call, ...).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use log::info;
use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

/// The environment variable carrying the takeover reason (`peer-closed`, ..., `handoff-pause`).
pub const ENV_REASON: &str = "VMM_TAKEOVER_REASON";
/// The environment variable carrying the pair id (takeover only).
pub const ENV_PAIR_ID: &str = "VMM_TAKEOVER_PAIR_ID";
/// The environment variable carrying the raw errno, when the loss came from a socket error.
pub const ENV_ERRNO: &str = "VMM_TAKEOVER_ERRNO";
/// The reason passed to the command when it is used as a pause hook.
pub const REASON_HANDOFF_PAUSE: &str = "handoff-pause";

/// Errors of the command hook.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// `sh` could not be started.
    #[error("cannot run `sh -c {cmd}`: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and exited with a non-zero status.
    #[error("command `{cmd}` failed: exit status {code}")]
    Exited {
        /// The command.
        cmd: String,
        /// Its exit code.
        code: i32,
    },
    /// The command was killed by a signal.
    #[error("command `{cmd}` failed: killed by signal {signal}")]
    Signaled {
        /// The command.
        cmd: String,
        /// The signal number.
        signal: i32,
    },
}

/// Runs `sh -c CMD` and waits for it; a non-zero exit or a signal is an error.
///
/// As a [`VmStart`] the command sees `VMM_TAKEOVER_REASON` (the reason's kebab-case name),
/// `VMM_TAKEOVER_PAIR_ID` and, when the loss came from a socket error, `VMM_TAKEOVER_ERRNO`.
/// As a [`VmPause`] it sees `VMM_TAKEOVER_REASON=handoff-pause`.
/// Its stdout and stderr are the VMM's; stdin is `/dev/null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHook {
    /// The shell command line.
    pub cmd: String,
}

impl CommandHook {
    /// A hook running `cmd` through `sh -c`.
    pub fn new(cmd: impl Into<String>) -> Self {
        CommandHook { cmd: cmd.into() }
    }

    /// Runs the command with `env` (after removing any inherited `VMM_TAKEOVER_*` values, so the
    /// command never sees stale ones from the VMM's own environment).
    pub fn run(&self, env: &[(&str, String)]) -> Result<(), CommandError> {
        let mut command = Command::new("sh");
        command.arg("-c").arg(&self.cmd).stdin(Stdio::null());
        for key in [ENV_REASON, ENV_PAIR_ID, ENV_ERRNO] {
            command.env_remove(key);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let status = command.status().map_err(|source| CommandError::Spawn {
            cmd: self.cmd.clone(),
            source,
        })?;
        self.check(status)
    }

    fn check(&self, status: ExitStatus) -> Result<(), CommandError> {
        if status.success() {
            return Ok(());
        }
        if let Some(signal) = status.signal() {
            return Err(CommandError::Signaled {
                cmd: self.cmd.clone(),
                signal,
            });
        }
        Err(CommandError::Exited {
            cmd: self.cmd.clone(),
            code: status.code().unwrap_or(-1),
        })
    }
}

impl VmStart for CommandHook {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        let mut env = vec![
            (ENV_REASON, record.reason.as_str().to_string()),
            (ENV_PAIR_ID, record.pair_id.clone()),
        ];
        if let Some(errno) = record.errno {
            env.push((ENV_ERRNO, errno.to_string()));
        }
        info!("command: running `{}` ({})", self.cmd, record.reason);
        self.run(&env)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command:{}", self.cmd)
    }
}

impl VmPause for CommandHook {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        info!("command: running `{}` (handoff pause)", self.cmd);
        self.run(&[(ENV_REASON, REASON_HANDOFF_PAUSE.to_string())])?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command:{}", self.cmd)
    }
}
