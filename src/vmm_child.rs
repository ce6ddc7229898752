// SPDX-License-Identifier: Apache-2.0
//! The sidecar shares fate with its guest: the VMM it serves (`source … -- CMD ARGS`) runs as
//! its child, and the health of a QEMU it drives (`--qmp`) is checked off the loop.
//!
//! - The child gets `PR_SET_PDEATHSIG(SIGKILL)`: when the sidecar dies (even by SIGKILL), the
//!   kernel kills the VMM. Its exit is seen on the loop through a pidfd.
//! - A hung or dead QEMU stops being served: its process is killed (the pid comes from the child,
//!   or from `SO_PEERCRED` of its QMP socket, taken at start while it answered), so that it can
//!   never resume its guest beside the backup's copy.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;

/// What ended the VMM.
pub enum VmmEnd {
    /// The child exited.
    Exited(ExitStatus),
    /// The QMP health check failed; `killed` says whether its process is surely dead.
    Unhealthy {
        /// What failed.
        why: String,
        /// Whether the VMM was killed (SIGKILL to the checked pid).
        killed: bool,
    },
}

/// Watches the VMM; calls `on_end` once, on the loop.
pub struct VmmWatch {
    child: Option<(Child, OwnedFd)>,
    health: Option<UnixStream>,
    /// The QEMU process to kill when it is unhealthy: its pid and start time (so that a recycled
    /// pid is never hit).
    target: Option<(i32, u64)>,
    on_end: Option<Box<dyn FnOnce(VmmEnd)>>,
}

const TOKEN_CHILD: u32 = 0;
const TOKEN_HEALTH: u32 = 1;

impl VmmWatch {
    /// Starts `argv` as the VMM child (dies with this process), and/or a health thread checking
    /// the QEMU behind `qmp` every `every`, each check bounded by `every` too.
    pub fn start(
        argv: &[String],
        qmp: Option<PathBuf>,
        every: Duration,
        on_end: Box<dyn FnOnce(VmmEnd)>,
    ) -> Result<VmmWatch, String> {
        let child = match argv.split_first() {
            None => None,
            Some((prog, args)) => Some(spawn(prog, args)?),
        };
        let child_pid = child.as_ref().map(|(c, _)| c.id() as i32);
        let (health, target) = match qmp {
            None => (None, None),
            Some(path) => {
                let pid = match child_pid {
                    Some(p) => Some(p),
                    None => wait_peer_pid(&path, Duration::from_secs(10)),
                };
                if pid.is_none() {
                    warn!(
                        "cannot learn the pid behind {}: a hung QEMU would only be reported, \
                         not killed",
                        path.display()
                    );
                }
                let target = pid.and_then(|p| start_time(p).map(|t| (p, t)));
                (Some(health_thread(path, every)?), target)
            }
        };
        Ok(VmmWatch {
            child,
            health,
            target,
            on_end: Some(on_end),
        })
    }

    /// The VMM child's pid, if there is one.
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|(c, _)| c.id())
    }

    fn end(&mut self, how: VmmEnd) {
        if let Some(f) = self.on_end.take() {
            f(how);
        }
    }

    /// SIGKILL to the VMM, if it is still the process we started or found.
    fn kill_target(&self) -> bool {
        let Some((pid, started)) = self.target else {
            return false;
        };
        if start_time(pid) != Some(started) {
            return false;
        }
        // SAFETY: kill(2) on a pid whose identity was checked just above.
        unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
    }
}

impl MutEventSubscriber for VmmWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some((_, pidfd)) = &self.child {
            if let Err(e) = ops.add(Events::with_data(pidfd, TOKEN_CHILD, EventSet::IN)) {
                error!("cannot watch the VMM child: {e:?}");
            }
        }
        if let Some(h) = &self.health {
            if let Err(e) = ops.add(Events::with_data(h, TOKEN_HEALTH, EventSet::IN)) {
                error!("cannot watch the VMM's health: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_CHILD => {
                let Some((child, pidfd)) = self.child.as_mut() else {
                    return;
                };
                let _ = ops.remove(Events::new(pidfd, EventSet::IN));
                // The pidfd is readable: the child exited, so this does not block.
                let status = child.wait();
                self.child = None;
                match status {
                    Ok(s) => {
                        warn!("the VMM exited: {s}");
                        self.end(VmmEnd::Exited(s));
                    }
                    Err(e) => error!("cannot reap the VMM: {e}"),
                }
            }
            TOKEN_HEALTH => {
                let mut buf = [0u8; 512];
                let n = match self.health.as_ref().map(|mut h| h.read(&mut buf)) {
                    Some(Ok(n)) => n,
                    _ => return,
                };
                if let Some(h) = self.health.take() {
                    let _ = ops.remove(Events::new(&h, EventSet::IN));
                }
                let why = String::from_utf8_lossy(&buf[..n]).into_owned();
                let killed = self.kill_target();
                error!("the VMM is unhealthy: {why} (killed: {killed})");
                self.end(VmmEnd::Unhealthy { why, killed });
            }
            _ => {}
        }
    }
}

/// Spawns the VMM child: dies with this process (`PR_SET_PDEATHSIG`), watched through a pidfd.
fn spawn(prog: &str, args: &[String]) -> Result<(Child, OwnedFd), String> {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill us.
            if libc::getppid() == 1 {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the VMM `{prog}`: {e}"))?;
    // SAFETY: pidfd_open on our own child's pid; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        return Err(format!(
            "cannot watch the VMM (pidfd_open): {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh fd returned by pidfd_open, owned from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    info!("VMM started: pid {} ({prog})", child.id());
    Ok((child, pidfd))
}

/// The pid of the process listening on the unix socket `path` (`SO_PEERCRED`), waiting up to
/// `timeout` for the socket to appear (a child QEMU creates it shortly after start).
fn wait_peer_pid(path: &std::path::Path, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            let mut cred = libc::ucred {
                pid: 0,
                uid: 0,
                gid: 0,
            };
            let mut len = size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: SO_PEERCRED writes one ucred into the buffer of the given length.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    (&mut cred as *mut libc::ucred).cast(),
                    &mut len,
                )
            };
            return (r == 0 && cred.pid > 0).then_some(cred.pid);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Start-up only (before the loop runs): the socket does not exist yet.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The start time of `pid` (field 22 of /proc/PID/stat): with the pid, an identity that a
/// recycled pid does not share.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A thread that asks QEMU for its status every `every` (each answer due within `every`) and
/// writes the first failure into the returned socket.
fn health_thread(path: PathBuf, every: Duration) -> Result<UnixStream, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    ours.set_nonblocking(true)
        .map_err(|e| format!("socket pair: {e}"))?;
    let vm = vmm_takeover_guest::QmpVm::new(path.clone()).with_timeout(every);
    std::thread::Builder::new()
        .name("vmm-health".into())
        .spawn(move || {
            let mut theirs = theirs;
            let mut failures = 0;
            loop {
                std::thread::sleep(every);
                match vm.query_status() {
                    Ok(_) => failures = 0,
                    // Twice in a row: QEMU serves one QMP client at a time, and a pause or
                    // resume of a handoff may hold the monitor for one check.
                    Err(e) if failures == 0 => {
                        warn!("QEMU health check failed once: {e}");
                        failures = 1;
                    }
                    Err(e) => {
                        let _ = write!(
                            theirs,
                            "QEMU at {} did not answer twice in a row: {e}",
                            path.display()
                        );
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the health thread: {e}"))?;
    Ok(ours)
}
