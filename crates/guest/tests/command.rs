// SPDX-License-Identifier: Apache-2.0
//! The shell-command hook: real `sh` processes, environment read back from a file.

mod common;

use common::{record, TempDir};
use vmm_takeover_core::{TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::{CommandError, CommandHook};

/// A command that writes the three variables (or `unset`) to `file`, one a line.
fn dump_env_to(file: &std::path::Path) -> String {
    format!(
        "printf '%s\\n%s\\n%s\\n' \"${{VMM_TAKEOVER_REASON-unset}}\" \
         \"${{VMM_TAKEOVER_PAIR_ID-unset}}\" \"${{VMM_TAKEOVER_ERRNO-unset}}\" > '{}'",
        file.display()
    )
}

fn read_lines(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .expect("the command wrote its file")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn vm_start_passes_reason_pair_id_and_errno() {
    let dir = TempDir::new("cmd-env");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    hook.vm_start(&record(TakeoverReason::TimedOut, Some(libc::ETIMEDOUT)))
        .unwrap();
    assert_eq!(
        read_lines(&out),
        ["timed-out", "test-pair", &libc::ETIMEDOUT.to_string()]
    );
}

#[test]
fn vm_start_without_errno_leaves_it_unset() {
    let dir = TempDir::new("cmd-noerrno");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    hook.vm_start(&record(TakeoverReason::HeartbeatTimeout, None))
        .unwrap();
    assert_eq!(
        read_lines(&out),
        ["heartbeat-timeout", "test-pair", "unset"]
    );
}

#[test]
fn vm_pause_says_handoff_pause() {
    let dir = TempDir::new("cmd-pause");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    hook.vm_pause().unwrap();
    assert_eq!(read_lines(&out), ["handoff-pause", "unset", "unset"]);
    assert_eq!(VmPause::describe(&hook), format!("command:{}", hook.cmd));
}

#[test]
fn failing_command_names_command_and_exit_status() {
    let mut hook = CommandHook::new("echo starting >&2; exit 3");
    let err = hook
        .vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(msg.contains("echo starting >&2; exit 3"), "{msg}");
    match err.downcast_ref::<CommandError>() {
        Some(CommandError::Exited { code: 3, .. }) => {}
        other => panic!("expected Exited(3), got {other:?}"),
    }
}

#[test]
fn missing_program_is_exit_127() {
    let mut hook = CommandHook::new("/nonexistent/vmm-takeover-resume");
    let err = hook.vm_pause().unwrap_err();
    assert!(err.to_string().contains("exit status 127"), "{err}");
}

#[test]
fn killed_command_names_the_signal() {
    let mut hook = CommandHook::new("kill -TERM $$");
    let err = hook
        .vm_start(&record(TakeoverReason::Reset, None))
        .unwrap_err();
    assert!(err.to_string().contains("signal 15"), "{err}");
    assert!(matches!(
        err.downcast_ref::<CommandError>(),
        Some(CommandError::Signaled { signal: 15, .. })
    ));
}
