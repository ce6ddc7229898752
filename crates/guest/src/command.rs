// SPDX-License-Identifier: Apache-2.0
//! [`CommandHook`]: runs a shell command to start (or, on the source, pause and resume) the guest,
//! so that any VMM can be plugged in without code (`virsh resume`, a Firecracker API call, ...).
//!
//! The command runs in a process group of its own, so that a timeout or an abort can end it
//! together with everything it started in the background. Its stdout goes to the VMM's stderr:
//! the VMM's stdout carries one JSON object per line and must not be corrupted by a hook.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_takeover_core::{AbortHandle, HookError, TakeoverRecord, VmPause, VmStart};

/// The environment variable carrying the takeover reason (`peer-closed`, ..., `handoff-pause`).
pub const ENV_REASON: &str = "VMM_TAKEOVER_REASON";
/// The environment variable carrying the pair id (takeover only).
pub const ENV_PAIR_ID: &str = "VMM_TAKEOVER_PAIR_ID";
/// The environment variable carrying the raw errno, when the loss came from a socket error.
pub const ENV_ERRNO: &str = "VMM_TAKEOVER_ERRNO";
/// The environment variable carrying the arbiter's fencing epoch (decimal), when there is one.
pub const ENV_EPOCH: &str = "VMM_TAKEOVER_EPOCH";
/// The reason passed to the command when it is used as a pause hook.
pub const REASON_HANDOFF_PAUSE: &str = "handoff-pause";
/// The reason passed to the resume command (see [`CommandHook::with_resume`]).
pub const REASON_HANDOFF_RESUME: &str = "handoff-resume";

/// How long a command may run before it is ended, unless [`CommandHook::with_timeout`] says
/// otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the command's shell gets between SIGTERM and SIGKILL after a timeout or an abort.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// Poll interval of the fallback wait, used only on kernels without `pidfd_open` (before 5.3).
const FALLBACK_POLL: Duration = Duration::from_millis(10);

/// Every variable this hook sets: all are removed from the inherited environment first, so the
/// command never sees stale ones from the VMM's own environment.
const ALL_ENV: [&str; 4] = [ENV_REASON, ENV_PAIR_ID, ENV_ERRNO, ENV_EPOCH];

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
    /// The command did not finish in time; its process group was ended.
    #[error(
        "command `{cmd}` did not finish within {timeout:?} (the bound set by \
         CommandHook::with_timeout): its process group got SIGTERM, then SIGKILL after at most \
         {KILL_GRACE:?}"
    )]
    TimedOut {
        /// The command.
        cmd: String,
        /// The bound.
        timeout: Duration,
    },
    /// The caller gave up on the command through its [`AbortHandle`]; its process group was ended.
    #[error(
        "command `{cmd}` was aborted by its caller (deadline passed or VMM stopping): its process \
         group got SIGTERM, then SIGKILL after at most {KILL_GRACE:?}"
    )]
    Aborted {
        /// The command.
        cmd: String,
    },
    /// Waiting for the command failed; its process group was killed.
    #[error("cannot wait for command `{cmd}` (its process group was killed): {source}")]
    Wait {
        /// The command.
        cmd: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `vm_resume` was called on a hook built without [`CommandHook::with_resume`].
    #[error(
        "the pause hook `{cmd}` has no resume command (set one with CommandHook::with_resume): \
         the guest stays paused"
    )]
    NoResumeCommand {
        /// The pause command.
        cmd: String,
    },
}

/// What the abort handle needs to reach the command that runs now.
#[derive(Debug, Default)]
struct RunState {
    /// A call is in progress (possibly before its child exists).
    active: bool,
    /// The running child's process group; cleared *before* the child is reaped, so that the
    /// abort handle never signals a group id the kernel may have handed out again.
    pgid: Option<i32>,
    /// The abort handle was called during this call.
    aborted: bool,
    /// Wakes the waiting thread when the abort handle is called.
    wake: Option<Arc<EventFd>>,
}

type SharedRun = Arc<Mutex<RunState>>;

// Never held across a wait: only for the few non-blocking syscalls of a state change, so the
// abort handle (called on the VMM's event loop) never waits on it for long.
fn lock(run: &Mutex<RunState>) -> MutexGuard<'_, RunState> {
    run.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `signal` to every process of group `pgid` (errors ignored: the group may be gone).
fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-pgid, signal) };
}

/// What the abort handle does: SIGTERM to the running group now, wake the waiting thread (which
/// escalates to SIGKILL after the grace). Never waits.
fn abort_running(run: &Mutex<RunState>) {
    let mut st = lock(run);
    if !st.active {
        return;
    }
    st.aborted = true;
    if let Some(pgid) = st.pgid {
        signal_group(pgid, libc::SIGTERM);
    }
    if let Some(wake) = &st.wake {
        // Non-blocking eventfd: a full counter (EAGAIN) already means "woken".
        let _ = wake.write(1);
    }
}

/// Resets the shared state however a call ends (return or panic).
struct EndRun<'a>(&'a Mutex<RunState>);

impl Drop for EndRun<'_> {
    fn drop(&mut self) {
        *lock(self.0) = RunState::default();
    }
}

/// Why a wait returned.
enum Woke {
    /// The child exited (not yet reaped).
    Exited,
    /// The deadline passed.
    Deadline,
    /// The abort handle's eventfd fired.
    Abort,
}

/// How the child's exit is awaited.
enum ExitWatch {
    /// A pidfd: readable once the child exits, polled together with the abort eventfd.
    Pidfd(OwnedFd),
    /// No `pidfd_open` (ENOSYS): `waitid(WNOHANG | WNOWAIT)` every [`FALLBACK_POLL`].
    Polling(libc::pid_t),
}

fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether child `pid` has exited, without reaping it.
fn exited_nowait(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: an all-zero siginfo_t is valid; waitid fills it in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so si_pid is initialized (0 when no child has changed state).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Milliseconds for poll(2), rounded up so a wait never ends just before its deadline.
fn poll_ms(d: Duration) -> libc::c_int {
    let ms = d.as_micros().div_ceil(1000);
    ms.min(libc::c_int::MAX as u128) as libc::c_int
}

impl ExitWatch {
    fn new(pid: libc::pid_t) -> std::io::Result<Self> {
        match pidfd_open(pid) {
            Ok(fd) => Ok(ExitWatch::Pidfd(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(ExitWatch::Polling(pid)),
            Err(e) => Err(e),
        }
    }

    /// Waits until the child exits, `deadline` passes or (if given) `wake` fires.
    fn wait(&self, wake: Option<&EventFd>, deadline: Instant) -> std::io::Result<Woke> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (exit_fd, slice) = match self {
                ExitWatch::Pidfd(fd) => (Some(fd.as_raw_fd()), remaining),
                ExitWatch::Polling(pid) => {
                    if exited_nowait(*pid)? {
                        return Ok(Woke::Exited);
                    }
                    (None, remaining.min(FALLBACK_POLL))
                }
            };
            if remaining.is_zero() {
                return Ok(Woke::Deadline);
            }
            let mut fds = [
                libc::pollfd {
                    fd: exit_fd.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.map_or(-1, |w| w.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds (negative fds are ignored by poll).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, poll_ms(slice)) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[0].revents != 0 {
                return Ok(Woke::Exited);
            }
            if fds[1].revents != 0 {
                if let Some(w) = wake {
                    let _ = w.read();
                }
                return Ok(Woke::Abort);
            }
        }
    }
}

/// Runs `sh -c CMD` and waits for it, bounded; a non-zero exit, a signal, a timeout or an abort
/// is an error.
///
/// As a [`VmStart`] the command sees `VMM_TAKEOVER_REASON` (the reason's kebab-case name),
/// `VMM_TAKEOVER_PAIR_ID`, and when known `VMM_TAKEOVER_ERRNO` (the socket error) and
/// `VMM_TAKEOVER_EPOCH` (the arbiter's fencing epoch, decimal). As a [`VmPause`] it sees
/// `VMM_TAKEOVER_REASON=handoff-pause`, and the resume command (see [`with_resume`]) sees
/// `handoff-resume`. Inherited values of these variables are always removed.
///
/// - **Process group**: the command is the leader of a new process group, so a timeout or an abort
///   ends it together with whatever it started in the background. A successful command's
///   background processes are left alone (a hook may legitimately start a daemon); a process that
///   moves itself into another group or session escapes either way.
/// - **Output**: stdin is `/dev/null`; stdout goes to the VMM's *stderr* (the VMM's stdout carries
///   JSON lines that a hook must not corrupt); stderr is the VMM's stderr.
/// - **Timeout**: [`DEFAULT_COMMAND_TIMEOUT`] (30 s) unless [`with_timeout`] says otherwise. On
///   expiry the group gets SIGTERM, then SIGKILL once the shell has exited or after
///   [`KILL_GRACE`] (1 s), whichever comes first; the shell is reaped and the call returns
///   [`CommandError::TimedOut`]. Waiting uses a pidfd, not sleeps.
/// - **Abort**: [`VmStart::abort_handle`] / [`VmPause::abort_handle`] end the running command the
///   same way, from any thread, and make the call return [`CommandError::Aborted`].
///
/// [`with_resume`]: CommandHook::with_resume
/// [`with_timeout`]: CommandHook::with_timeout
#[derive(Debug)]
pub struct CommandHook {
    /// The shell command line.
    pub cmd: String,
    resume: Option<String>,
    timeout: Duration,
    /// Where the command's stdout goes; `None` = a duplicate of the VMM's stderr.
    stdout: Option<Arc<OwnedFd>>,
    run: SharedRun,
}

impl Clone for CommandHook {
    /// The clone runs its own commands: its abort handle reaches only its own calls.
    fn clone(&self) -> Self {
        CommandHook {
            cmd: self.cmd.clone(),
            resume: self.resume.clone(),
            timeout: self.timeout,
            stdout: self.stdout.clone(),
            run: SharedRun::default(),
        }
    }
}

impl PartialEq for CommandHook {
    fn eq(&self, other: &Self) -> bool {
        self.cmd == other.cmd && self.resume == other.resume && self.timeout == other.timeout
    }
}

impl Eq for CommandHook {}

impl CommandHook {
    /// A hook running `cmd` through `sh -c`, bounded by [`DEFAULT_COMMAND_TIMEOUT`] (30 s).
    pub fn new(cmd: impl Into<String>) -> Self {
        CommandHook {
            cmd: cmd.into(),
            resume: None,
            timeout: DEFAULT_COMMAND_TIMEOUT,
            stdout: None,
            run: SharedRun::default(),
        }
    }

    /// The same hook with another bound for each run (the default is 30 s). A zero bound ends the
    /// command at once.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same hook with a command that resumes the guest after a pause (used by
    /// [`VmPause::vm_resume`] when a handoff fails; it sees `VMM_TAKEOVER_REASON=handoff-resume`).
    /// Without one, `vm_resume` fails and the guest stays paused.
    pub fn with_resume(mut self, cmd: impl Into<String>) -> Self {
        self.resume = Some(cmd.into());
        self
    }

    /// The bound for each run.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The resume command, if any.
    pub fn resume_cmd(&self) -> Option<&str> {
        self.resume.as_deref()
    }

    /// Sends the command's stdout to `fd` instead of the VMM's stderr. For tests: the VMM itself
    /// must keep the default, so that hook output never reaches its stdout.
    #[doc(hidden)]
    pub fn stdout_to(mut self, fd: OwnedFd) -> Self {
        self.stdout = Some(Arc::new(fd));
        self
    }

    /// Runs the command with `env` (after removing any inherited `VMM_TAKEOVER_*` values), bounded
    /// by the timeout and abortable through the abort handle.
    pub fn run(&mut self, env: &[(&str, String)]) -> Result<(), CommandError> {
        let cmd = self.cmd.clone();
        self.run_cmd(&cmd, env)
    }

    fn child_stdout(&self) -> std::io::Result<Stdio> {
        let fd = match &self.stdout {
            Some(fd) => fd.try_clone()?,
            None => std::io::stderr().as_fd().try_clone_to_owned()?,
        };
        Ok(Stdio::from(fd))
    }

    fn run_cmd(&self, cmd: &str, env: &[(&str, String)]) -> Result<(), CommandError> {
        let spawn_err = |source| CommandError::Spawn {
            cmd: cmd.to_string(),
            source,
        };
        // A fresh eventfd per call: a wake-up left over from an earlier call cannot end this one.
        let wake = Arc::new(EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(spawn_err)?);
        *lock(&self.run) = RunState {
            active: true,
            pgid: None,
            aborted: false,
            wake: Some(wake.clone()),
        };
        let _end = EndRun(&self.run);

        let stdout = match self.child_stdout() {
            Ok(stdout) => stdout,
            Err(e) => {
                // Only when the VMM runs with fd 2 closed; its stdout is still not an option.
                warn!(
                    "command: cannot duplicate stderr for `{cmd}`'s stdout ({e}); using /dev/null"
                );
                Stdio::null()
            }
        };
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .process_group(0);
        for key in ALL_ENV {
            command.env_remove(key);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        if lock(&self.run).aborted {
            return Err(CommandError::Aborted {
                cmd: cmd.to_string(),
            });
        }
        let started = Instant::now();
        let mut child = command.spawn().map_err(spawn_err)?;
        let pgid = child.id() as libc::pid_t;
        {
            let mut st = lock(&self.run);
            st.pgid = Some(pgid);
            if st.aborted {
                // Aborted while spawning: the handle saw no group yet.
                signal_group(pgid, libc::SIGTERM);
            }
        }
        // A bound too large for Instant means "no bound" in practice: a century.
        let deadline = started
            .checked_add(self.timeout)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 24 * 3600));
        match self.wait_child(cmd, &mut child, pgid, &wake, deadline) {
            Ok(Ended::Status(status)) => self.check(cmd, status),
            Ok(Ended::TimedOut) => Err(CommandError::TimedOut {
                cmd: cmd.to_string(),
                timeout: self.timeout,
            }),
            Ok(Ended::Aborted) => Err(CommandError::Aborted {
                cmd: cmd.to_string(),
            }),
            Err(source) => Err(CommandError::Wait {
                cmd: cmd.to_string(),
                source,
            }),
        }
    }

    /// Waits for the child; on timeout or abort ends its group. Always reaps the child.
    fn wait_child(
        &self,
        cmd: &str,
        child: &mut Child,
        pgid: libc::pid_t,
        wake: &EventFd,
        deadline: Instant,
    ) -> std::io::Result<Ended> {
        let watch = match ExitWatch::new(pgid) {
            Ok(watch) => watch,
            Err(e) => {
                self.kill_and_reap(cmd, child, pgid);
                return Err(e);
            }
        };
        let ended = loop {
            let woke = match watch.wait(Some(wake), deadline) {
                Ok(woke) => woke,
                Err(e) => {
                    self.kill_and_reap(cmd, child, pgid);
                    return Err(e);
                }
            };
            let aborted = {
                let mut st = lock(&self.run);
                if !st.aborted && matches!(woke, Woke::Exited) {
                    // From here on the abort handle has no group to signal: the reap below may
                    // free the id.
                    st.pgid = None;
                }
                st.aborted
            };
            match woke {
                // Also when the exit raced with the abort: the handle has signalled the group, so
                // it is ended like any aborted one.
                _ if aborted => {
                    warn!("command: `{cmd}` aborted; terminating its process group");
                    break Ended::Aborted;
                }
                Woke::Exited => return child.wait().map(Ended::Status),
                Woke::Deadline => {
                    warn!(
                        "command: `{cmd}` still runs after {:?}; terminating its process group",
                        self.timeout
                    );
                    signal_group(pgid, libc::SIGTERM);
                    break Ended::TimedOut;
                }
                // Cannot happen (the handle sets `aborted` before it wakes us); keep waiting.
                Woke::Abort => continue,
            }
        };
        // The grace is measured on the shell (the group leader): background processes that
        // survive SIGTERM are killed with the rest of the group right after.
        if let Err(e) = watch.wait(None, Instant::now() + KILL_GRACE) {
            warn!("command: waiting for `{cmd}` after SIGTERM failed: {e}");
        }
        self.kill_and_reap(cmd, child, pgid);
        Ok(ended)
    }

    /// SIGKILL to the whole group, then reaps the leader. The group is signalled only while the
    /// leader is unreaped, so its id cannot have been reused.
    fn kill_and_reap(&self, cmd: &str, child: &mut Child, pgid: libc::pid_t) {
        {
            let mut st = lock(&self.run);
            signal_group(pgid, libc::SIGKILL);
            st.pgid = None;
        }
        if let Err(e) = child.wait() {
            warn!("command: cannot reap `{cmd}` (pid {pgid}): {e}");
        }
    }

    fn check(&self, cmd: &str, status: ExitStatus) -> Result<(), CommandError> {
        if status.success() {
            return Ok(());
        }
        if let Some(signal) = status.signal() {
            return Err(CommandError::Signaled {
                cmd: cmd.to_string(),
                signal,
            });
        }
        Err(CommandError::Exited {
            cmd: cmd.to_string(),
            code: status.code().unwrap_or(-1),
        })
    }

    fn handle(&self) -> AbortHandle {
        let run = self.run.clone();
        Arc::new(move || abort_running(&run))
    }
}

/// How a run ended.
enum Ended {
    Status(ExitStatus),
    TimedOut,
    Aborted,
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
        if let Some(epoch) = record.epoch {
            env.push((ENV_EPOCH, epoch.to_string()));
        }
        info!("command: running `{}` ({})", self.cmd, record.reason);
        self.run(&env)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command:{}", self.cmd)
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(self.handle())
    }
}

impl VmPause for CommandHook {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        info!("command: running `{}` (handoff pause)", self.cmd);
        self.run(&[(ENV_REASON, REASON_HANDOFF_PAUSE.to_string())])?;
        Ok(())
    }

    fn vm_resume(&mut self) -> Result<(), HookError> {
        let Some(resume) = self.resume.clone() else {
            return Err(CommandError::NoResumeCommand {
                cmd: self.cmd.clone(),
            }
            .into());
        };
        info!("command: running `{resume}` (handoff resume)");
        self.run_cmd(&resume, &[(ENV_REASON, REASON_HANDOFF_RESUME.to_string())])?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command:{}", self.cmd)
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(self.handle())
    }
}
