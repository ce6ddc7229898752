// SPDX-License-Identifier: Apache-2.0
//! The shell-command hook: real `sh` processes, environment read back from a file, timeouts and
//! aborts checked against the kernel's view of the process group.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{record, TempDir};
use vmm_takeover_core::{HookError, TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::command::{DEFAULT_COMMAND_TIMEOUT, KILL_GRACE};
use vmm_takeover_guest::{CommandError, CommandHook};

/// A command that writes the four variables (or `unset`) to `file`, one a line.
fn dump_env_to(file: &std::path::Path) -> String {
    format!(
        "printf '%s\\n%s\\n%s\\n%s\\n' \"${{VMM_TAKEOVER_REASON-unset}}\" \
         \"${{VMM_TAKEOVER_PAIR_ID-unset}}\" \"${{VMM_TAKEOVER_ERRNO-unset}}\" \
         \"${{VMM_TAKEOVER_EPOCH-unset}}\" > '{}'",
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
        [
            "timed-out",
            "test-pair",
            &libc::ETIMEDOUT.to_string(),
            "unset"
        ]
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
        ["heartbeat-timeout", "test-pair", "unset", "unset"]
    );
}

#[test]
fn vm_pause_says_handoff_pause() {
    let dir = TempDir::new("cmd-pause");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    hook.vm_pause().unwrap();
    assert_eq!(
        read_lines(&out),
        ["handoff-pause", "unset", "unset", "unset"]
    );
    assert_eq!(VmPause::describe(&hook), format!("command:{}", hook.cmd));
}

#[test]
fn vm_start_passes_the_epoch() {
    let dir = TempDir::new("cmd-epoch");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    let mut rec = record(TakeoverReason::PeerClosed, None);
    rec.epoch = Some(18_446_744_073_709_551_615);
    hook.vm_start(&rec).unwrap();
    assert_eq!(
        read_lines(&out),
        ["peer-closed", "test-pair", "unset", "18446744073709551615"]
    );
}

#[test]
fn vm_resume_runs_the_resume_command() {
    let dir = TempDir::new("cmd-resume");
    let paused = dir.path("paused");
    let resumed = dir.path("resumed");
    let mut hook = CommandHook::new(dump_env_to(&paused)).with_resume(dump_env_to(&resumed));
    assert_eq!(hook.resume_cmd(), Some(dump_env_to(&resumed).as_str()));
    hook.vm_pause().unwrap();
    assert_eq!(read_lines(&paused)[0], "handoff-pause");
    assert!(!resumed.exists());
    std::fs::remove_file(&paused).unwrap();
    hook.vm_resume().unwrap();
    assert_eq!(
        read_lines(&resumed),
        ["handoff-resume", "unset", "unset", "unset"]
    );
    assert!(!paused.exists(), "vm_resume must not run the pause command");
}

#[test]
fn vm_resume_without_a_resume_command_fails_and_runs_nothing() {
    let dir = TempDir::new("cmd-noresume");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    let err = hook.vm_resume().unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<CommandError>(),
            Some(CommandError::NoResumeCommand { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("with_resume"), "{err}");
    assert!(!out.exists());
}

#[test]
fn failing_resume_command_names_itself() {
    let mut hook = CommandHook::new("true").with_resume("exit 4");
    let err = hook.vm_resume().unwrap_err();
    assert!(err.to_string().contains("`exit 4`"), "{err}");
    assert!(err.to_string().contains("exit status 4"), "{err}");
}

#[test]
fn default_timeout_is_thirty_seconds() {
    assert_eq!(CommandHook::new("true").timeout(), Duration::from_secs(30));
    assert_eq!(DEFAULT_COMMAND_TIMEOUT, Duration::from_secs(30));
    let hook = CommandHook::new("true").with_timeout(Duration::from_secs(2));
    assert_eq!(hook.timeout(), Duration::from_secs(2));
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

// ---- timeouts, abort, process groups ----

/// Generous slack for process start-up and signal delivery on a loaded CI machine.
const SLACK: Duration = Duration::from_secs(10);

/// A pipe: (read end, write end), both close-on-exec (the hook duplicates the write end into the
/// command's stdout).
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Reads one line from `pipe`, waiting (poll, not sleep) at most `bound`.
fn read_line_within(pipe: &mut File, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    let mut line = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "no complete line from the command within {bound:?} (got {:?})",
            String::from_utf8_lossy(&line)
        );
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, remaining.as_millis().max(1) as i32) };
        if rc <= 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        match pipe.read(&mut byte) {
            Ok(0) => panic!("the command closed its stdout before a full line"),
            Ok(_) if byte[0] == b'\n' => return String::from_utf8(line).unwrap(),
            Ok(_) => line.push(byte[0]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The pids (and states) of every process whose process group is `pgid`, from /proc.
fn group_members(pgid: i32) -> Vec<(i32, char)> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // exited meanwhile
        };
        // "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|f| f.parse::<i32>().ok()) == Some(pgid) {
            members.push((pid, fields[0].chars().next().unwrap_or('?')));
        }
    }
    members
}

/// Asserts that no process of group `pgid` is alive (zombies waiting for a reaper that is not
/// this process do not count: they run nothing). Waits on a pidfd of each live member, bounded,
/// because SIGKILL is delivered asynchronously.
fn assert_group_gone(pgid: i32) {
    let live = |m: &(i32, char)| !matches!(m.1, 'Z' | 'X');
    for (pid, _) in group_members(pgid).into_iter().filter(live) {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            continue; // already gone
        }
        // SAFETY: just created, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, SLACK.as_millis() as i32) };
    }
    let survivors: Vec<_> = group_members(pgid).into_iter().filter(live).collect();
    assert!(
        survivors.is_empty(),
        "processes of group {pgid} survive: {survivors:?}"
    );
}

/// The command's first stdout line: `$$` and its process group, read from /proc.
const REPORT_GROUP: &str = "echo $$ $(cut -d' ' -f5 /proc/$$/stat)";

/// Reads the line written by [`REPORT_GROUP`] and checks that the shell leads its own group.
fn read_group(out: &mut File) -> i32 {
    let line = read_line_within(out, SLACK);
    let ids: Vec<i32> = line
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{line}");
    assert_eq!(
        ids[0], ids[1],
        "the command must lead its own process group"
    );
    assert_ne!(
        ids[1],
        // SAFETY: getpgrp has no preconditions.
        unsafe { libc::getpgrp() },
        "the command must not share the VMM's process group"
    );
    ids[1]
}

fn timed_out_within(cmd: &str, timeout: Duration, min: Duration) -> i32 {
    let (mut out, w) = pipe();
    let mut hook = CommandHook::new(cmd).with_timeout(timeout).stdout_to(w);
    let t0 = Instant::now();
    let err = hook
        .vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap_err();
    let took = t0.elapsed();
    match err.downcast_ref::<CommandError>() {
        Some(CommandError::TimedOut { timeout: t, .. }) => assert_eq!(*t, timeout),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(err.to_string().contains("did not finish within"), "{err}");
    assert!(took >= min, "returned after {took:?}, before {min:?}");
    assert!(
        took < timeout + KILL_GRACE + SLACK,
        "returned only after {took:?}"
    );
    let pgid = read_group(&mut out);
    assert_group_gone(pgid);
    pgid
}

#[test]
fn never_ending_command_times_out_and_its_group_is_gone() {
    let timeout = Duration::from_millis(800);
    timed_out_within(&format!("{REPORT_GROUP}; sleep 1000"), timeout, timeout);
}

#[test]
fn command_ignoring_sigterm_is_killed_after_the_grace() {
    let timeout = Duration::from_millis(800);
    // `sleep` inherits the ignored SIGTERM: only SIGKILL ends either of them, after the grace.
    timed_out_within(
        &format!("trap '' TERM; {REPORT_GROUP}; sleep 1000"),
        timeout,
        timeout + KILL_GRACE,
    );
}

#[test]
fn background_grandchild_dies_with_the_group() {
    let timeout = Duration::from_millis(800);
    timed_out_within(
        &format!("sleep 1000 & {REPORT_GROUP}; wait"),
        timeout,
        timeout,
    );
}

#[test]
fn grandchild_ignoring_sigterm_is_killed_when_the_shell_exits() {
    let timeout = Duration::from_millis(800);
    // The shell dies on SIGTERM at once; its background child ignores it and must still go.
    timed_out_within(
        &format!("(trap '' TERM; exec sleep 1000) & {REPORT_GROUP}; wait"),
        timeout,
        timeout,
    );
}

/// Runs `hook.vm_start` on a thread, aborts it once the command has reported its group, and
/// returns the error, how long the call took after the abort, and the group.
fn abort_running(cmd: &str) -> (HookError, Duration, i32) {
    let (mut out, w) = pipe();
    let mut hook = CommandHook::new(cmd).stdout_to(w);
    let abort = VmStart::abort_handle(&hook).expect("the command hook can be aborted");
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let result = hook.vm_start(&record(TakeoverReason::Reset, None));
        tx.send(result).unwrap();
    });
    let pgid = read_group(&mut out);
    let t0 = Instant::now();
    // From another thread than the runner, as the event loop would.
    abort();
    let result = rx
        .recv_timeout(DEFAULT_COMMAND_TIMEOUT)
        .expect("vm_start did not return after the abort");
    let took = t0.elapsed();
    runner.join().unwrap();
    (result.unwrap_err(), took, pgid)
}

#[test]
fn abort_handle_ends_a_running_command() {
    let (err, took, pgid) = abort_running(&format!("{REPORT_GROUP}; sleep 1000"));
    assert!(
        matches!(
            err.downcast_ref::<CommandError>(),
            Some(CommandError::Aborted { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("aborted"), "{err}");
    // The shell dies on SIGTERM: no need to wait for the grace.
    assert!(took < KILL_GRACE + SLACK, "took {took:?}");
    assert_group_gone(pgid);
}

#[test]
fn abort_escalates_to_sigkill_after_the_grace() {
    let (err, took, pgid) = abort_running(&format!("trap '' TERM; {REPORT_GROUP}; sleep 1000"));
    assert!(
        matches!(
            err.downcast_ref::<CommandError>(),
            Some(CommandError::Aborted { .. })
        ),
        "{err:?}"
    );
    assert!(
        took >= KILL_GRACE,
        "SIGKILL came before the grace: {took:?}"
    );
    assert!(took < KILL_GRACE + SLACK, "took {took:?}");
    assert_group_gone(pgid);
}

#[test]
fn abort_when_nothing_runs_is_harmless() {
    let dir = TempDir::new("cmd-idle-abort");
    let out = dir.path("env");
    let mut hook = CommandHook::new(dump_env_to(&out));
    let abort = VmPause::abort_handle(&hook).unwrap();
    let t0 = Instant::now();
    abort();
    abort();
    assert!(t0.elapsed() < SLACK, "the handle must not block");
    // The next call is not affected by the earlier aborts.
    hook.vm_pause().unwrap();
    assert_eq!(read_lines(&out)[0], "handoff-pause");
    abort();
    hook.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert_eq!(read_lines(&out)[0], "peer-closed");
}

// ---- output ----

#[test]
fn stdout_goes_to_the_chosen_fd_and_stderr_stays_stderr() {
    let (mut out, w) = pipe();
    let mut hook = CommandHook::new("echo on-stdout; echo on-stderr >&2").stdout_to(w);
    hook.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert_eq!(read_line_within(&mut out, SLACK), "on-stdout");
}

/// Set by the tests below when they run this binary again as a child process.
const HELPER_ENV: &str = "VMM_TAKEOVER_GUEST_TEST_HELPER_CMD";

/// Not a test of its own: when [`HELPER_ENV`] is set, runs that command through a default
/// `CommandHook` (as the VMM would) and exits; otherwise does nothing.
#[test]
fn helper_runs_a_hook_in_a_child_process() {
    let Ok(cmd) = std::env::var(HELPER_ENV) else {
        return;
    };
    let mut hook = CommandHook::new(cmd);
    hook.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
}

/// Runs the helper above in a child process with `cmd` (and `extra_env`); returns its stdout
/// and stderr.
fn run_helper(cmd: &str, extra_env: &[(&str, &str)]) -> (String, String) {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([
            "helper_runs_a_hook_in_a_child_process",
            "--exact",
            "--nocapture",
        ])
        .env(HELPER_ENV, cmd)
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "helper failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

#[test]
fn hook_stdout_reaches_the_vmm_stderr_never_its_stdout() {
    let (stdout, stderr) = run_helper("echo hook-said-this-on-stdout", &[]);
    assert!(
        !stdout.contains("hook-said-this-on-stdout"),
        "the hook's output reached the VMM's stdout: {stdout}"
    );
    assert!(stderr.contains("hook-said-this-on-stdout"), "{stderr}");
}

#[test]
fn inherited_epoch_is_removed_when_the_record_has_none() {
    let (_, stderr) = run_helper(
        "echo \"epoch=${VMM_TAKEOVER_EPOCH-unset} reason=$VMM_TAKEOVER_REASON\"",
        &[
            ("VMM_TAKEOVER_EPOCH", "999"),
            ("VMM_TAKEOVER_REASON", "stale"),
        ],
    );
    assert!(
        stderr.contains("epoch=unset reason=peer-closed"),
        "{stderr}"
    );
}
