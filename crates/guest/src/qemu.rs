// SPDX-License-Identifier: Apache-2.0
//! [`QemuProcess`]: a paused, empty QEMU/KVM guest with a QMP socket, owned by this process.
//!
//! Used by the tests and the benchmark, and by demos that want a real QEMU standby without
//! preparing one: `qemu-system-x86_64 -S -machine accel=kvm -nodefaults -display none -m 64
//! -qmp unix:PATH,server=on,wait=off`. The process is killed and reaped on drop, and its private
//! temporary directory (socket, stderr log) removed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};

use crate::qmp::QmpClient;

/// The QEMU binary this module runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How long [`QemuProcess::spawn_paused`] waits for QEMU to answer over QMP.
pub const DEFAULT_SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Errors starting QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The binary is not on `PATH`.
    #[error("{QEMU_BINARY} not found on PATH: install it (Debian/Ubuntu: apt-get install qemu-system-x86)")]
    NotInstalled,
    /// The private temporary directory could not be created.
    #[error("cannot create a temporary directory for QEMU: {0}")]
    TempDir(#[source] std::io::Error),
    /// The process could not be spawned.
    #[error("cannot spawn {QEMU_BINARY}: {0}")]
    Spawn(#[source] std::io::Error),
    /// QEMU exited before its QMP socket came up.
    #[error("{QEMU_BINARY} exited ({status}) before its QMP socket came up: {stderr}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// QEMU did not answer over QMP in time.
    #[error("QMP socket {} did not answer within {timeout:?}: {stderr}", .path.display())]
    NotReady {
        /// The socket path.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
        /// What QEMU printed on stderr so far.
        stderr: String,
    },
}

/// Finds `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| candidate.is_file())
}

/// A unique, private temporary directory (no extra dependency for one `mkdir`).
fn unique_temp_dir() -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-takeover-qemu-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Whether a full QMP session (greeting, capabilities, `query-status`) completes before
/// `deadline`.
fn answers_qmp(path: &Path, deadline: Instant) -> bool {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return false;
    }
    QmpClient::connect(path, remaining)
        .and_then(|mut client| client.query_status())
        .is_ok()
}

/// A running QEMU started with `-S` (paused before its first instruction) and a QMP socket.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    dir: PathBuf,
    socket_path: PathBuf,
}

impl QemuProcess {
    /// Starts a paused, empty 64 MiB QEMU/KVM guest and waits until it answers over QMP.
    pub fn spawn_paused() -> Result<Self, QemuError> {
        let binary = find_qemu().ok_or(QemuError::NotInstalled)?;
        let dir = unique_temp_dir().map_err(QemuError::TempDir)?;
        let socket_path = dir.join("qmp.sock");
        let stderr_path = dir.join("stderr.log");
        let spawned = File::create(&stderr_path).and_then(|stderr| {
            Command::new(&binary)
                .arg("-S")
                .args(["-machine", "accel=kvm"])
                .args(["-nodefaults", "-no-user-config"])
                .args(["-display", "none"])
                .args(["-m", "64"])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket_path.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // A file, not a pipe: nobody reads QEMU's stderr while it runs.
                .stderr(stderr)
                .spawn()
        });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(QemuError::Spawn(e));
            }
        };
        // From here on, Drop kills the child and removes the directory on every error path.
        let mut qemu = QemuProcess {
            child,
            dir,
            socket_path,
        };
        qemu.wait_for_socket(DEFAULT_SOCKET_WAIT)?;
        debug!(
            "qemu pid {} ready at {}",
            qemu.pid(),
            qemu.socket_path.display()
        );
        Ok(qemu)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn wait_for_socket(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(QemuError::Exited {
                    status,
                    stderr: self.stderr(),
                });
            }
            // QEMU listens, and even greets, before it has finished starting: only an answered
            // command proves it is ready (otherwise the caller's first command pays tens of
            // milliseconds of QEMU start-up). The probe session is closed at once, which frees
            // QEMU's single QMP client slot again.
            if answers_qmp(&self.socket_path, deadline) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(QemuError::NotReady {
                    path: self.socket_path.clone(),
                    timeout,
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The QMP socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills QEMU (SIGKILL) and reaps it; the socket file stays behind until drop.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            warn!("cannot kill qemu pid {}: {e}", self.child.id());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
