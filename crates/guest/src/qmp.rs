// SPDX-License-Identifier: Apache-2.0
//! A minimal QMP (QEMU Machine Protocol) client over a unix socket, and [`QmpVm`], the hook that
//! resumes (`cont`) or pauses (`stop`) a QEMU guest.
//!
//! QMP is line-delimited JSON: a greeting `{"QMP": {...}}`, then `qmp_capabilities` leaves
//! negotiation mode, then each command gets one `{"return": ...}` or `{"error": ...}`; asynchronous
//! `{"event": ...}` lines may arrive at any time and are skipped here.
//!
//! QEMU serves one QMP client per monitor at a time, so [`QmpVm`] connects for each call and hangs
//! up after it, leaving the monitor free for operators and other tools in between.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{json, Value};
use vmm_takeover_core::{HookError, TakeoverRecord, VmPause, VmStart};

/// The default bound for a whole `vm_start` / `vm_pause` (connect, command, status confirmation).
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QMP client and hook.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Nothing exists at the socket path.
    #[error(
        "QMP socket {} does not exist: is QEMU running with `-qmp unix:{},server=on,wait=off`?",
        .path.display(), .path.display()
    )]
    SocketMissing {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but connecting failed (e.g. nobody listens: QEMU exited).
    #[error("cannot connect to QMP socket {}: {source}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O on {} failed: {source}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No complete reply within the bound.
    #[error(
        "no reply from QMP socket {} to {what} within {timeout:?} \
         (QEMU serves one QMP client at a time: is another one connected?)",
        .path.display()
    )]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// What was awaited.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// QEMU closed the connection.
    #[error("QMP socket {} closed the connection while waiting for {what}", .path.display())]
    Closed {
        /// The socket path.
        path: PathBuf,
        /// What was awaited.
        what: String,
    },
    /// The first line was not a QMP greeting.
    #[error("{} did not greet like QMP (expected {{\"QMP\": ...}}), got: {line}", .path.display())]
    NotGreeting {
        /// The socket path.
        path: PathBuf,
        /// The line received instead.
        line: String,
    },
    /// A line was not valid JSON or not a QMP reply.
    #[error("unexpected QMP reply from {}: {line}", .path.display())]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// The line received.
        line: String,
    },
    /// QEMU answered a command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The QMP error class, e.g. `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// `cont` was accepted but the VM did not report running in time.
    #[error(
        "the VM behind {} did not reach running within {timeout:?} after cont (status: {status})",
        .path.display()
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
        /// The last status seen.
        status: String,
    },
    /// `stop` was accepted but the VM still reports running.
    #[error(
        "the VM behind {} still runs {timeout:?} after stop (status: {status})",
        .path.display()
    )]
    NotPaused {
        /// The socket path.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
        /// The last status seen.
        status: String,
    },
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpStatus {
    /// QEMU's run state, e.g. `prelaunch`, `running`, `paused`, `shutdown`.
    pub status: String,
    /// Whether the guest's vCPUs run.
    pub running: bool,
}

/// A connected QMP session, past capabilities negotiation.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    greeting: Value,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities. Every later read or write is
    /// bounded by `timeout`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| {
            if source.kind() == ErrorKind::NotFound {
                QmpError::SocketMissing { path: path.clone() }
            } else {
                QmpError::Connect {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| QmpError::Io {
                path: path.clone(),
                source,
            })?;
        let mut client = QmpClient {
            path,
            reader: BufReader::new(stream),
            timeout,
            greeting: Value::Null,
            next_id: 0,
        };
        let deadline = Instant::now() + timeout;
        let line = client.read_line(deadline, "the QMP greeting")?;
        let greeting: Value =
            serde_json::from_str(&line).map_err(|_| client.not_greeting(&line))?;
        if greeting.get("QMP").is_none() {
            return Err(client.not_greeting(&line));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    fn not_greeting(&self, line: &str) -> QmpError {
        QmpError::NotGreeting {
            path: self.path.clone(),
            line: line.trim_end().to_string(),
        }
    }

    /// The greeting QEMU sent (`{"QMP": {"version": ..., "capabilities": ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one line, bounded by `deadline`.
    fn read_line(&mut self, deadline: Instant, what: &str) -> Result<String, QmpError> {
        let mut line = String::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timeout_error(what));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(remaining))
                .map_err(|source| self.io_error(source))?;
            match self.reader.read_line(&mut line) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        what: what.to_string(),
                    })
                }
                Ok(_) if line.ends_with('\n') => return Ok(line),
                // A partial line before EOF: the next read returns 0 and reports the close.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.timeout_error(what))
                }
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn timeout_error(&self, what: &str) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            what: what.to_string(),
            timeout: self.timeout,
        }
    }

    fn io_error(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs one command and returns its `return` value. Asynchronous events are skipped; a QMP
    /// error reply becomes [`QmpError::Command`] with its class and description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = format!("vmm-takeover-{}", self.next_id);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        debug!("qmp {}: -> {}", self.path.display(), request);
        self.reader
            .get_mut()
            .write_all(&bytes)
            .map_err(|source| self.io_error(source))?;

        let what = format!("`{command}`");
        let deadline = Instant::now() + self.timeout;
        loop {
            let line = self.read_line(deadline, &what)?;
            let bad_reply = || QmpError::BadReply {
                path: self.path.clone(),
                line: line.trim_end().to_string(),
            };
            let reply: Value = serde_json::from_str(&line).map_err(|_| bad_reply())?;
            if let Some(event) = reply.get("event") {
                debug!("qmp {}: event {}", self.path.display(), event);
                continue;
            }
            // Replies carry our id back; one without it (or with another) is not ours.
            if reply.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                warn!(
                    "qmp {}: skipping a reply that is not ours: {}",
                    self.path.display(),
                    line.trim_end()
                );
                continue;
            }
            if let Some(ret) = reply.get("return") {
                debug!("qmp {}: <- {}", self.path.display(), ret);
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |name| {
                    err.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(bad_reply());
        }
    }

    /// Runs `query-status`.
    pub fn query_status(&mut self) -> Result<QmpStatus, QmpError> {
        let ret = self.execute("query-status", None)?;
        let status = ret.get("status").and_then(Value::as_str);
        let running = ret.get("running").and_then(Value::as_bool);
        match (status, running) {
            (Some(status), Some(running)) => Ok(QmpStatus {
                status: status.to_string(),
                running,
            }),
            _ => Err(QmpError::BadReply {
                path: self.path.clone(),
                line: ret.to_string(),
            }),
        }
    }

    /// Polls `query-status` until `want(status)` or `deadline`; returns the last status and
    /// whether `want` held.
    fn poll_status(
        &mut self,
        deadline: Instant,
        want: impl Fn(&QmpStatus) -> bool,
    ) -> Result<(QmpStatus, bool), QmpError> {
        // `cont` and `stop` act synchronously in QEMU, so the first query normally answers;
        // the short back-off only matters for a QEMU that is slow to switch state.
        let mut pause = Duration::from_millis(1);
        loop {
            let status = self.query_status()?;
            if want(&status) {
                return Ok((status, true));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok((status, false));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// A QEMU guest driven over QMP: `vm_start` = `cont` + wait until running, `vm_pause` = `stop` +
/// confirm it no longer runs.
#[derive(Debug, Clone)]
pub struct QmpVm {
    /// The QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub socket_path: PathBuf,
    /// The bound for each whole operation.
    pub timeout: Duration,
}

impl QmpVm {
    /// A hook for the QMP socket at `socket_path`, with [`DEFAULT_QMP_TIMEOUT`].
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        QmpVm {
            socket_path: socket_path.into(),
            timeout: DEFAULT_QMP_TIMEOUT,
        }
    }

    /// The same hook with another bound.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Opens a QMP session on the socket.
    pub fn connect(&self) -> Result<QmpClient, QmpError> {
        QmpClient::connect(&self.socket_path, self.timeout)
    }

    /// QEMU's run state (`prelaunch`, `running`, `paused`, ...).
    pub fn query_status(&self) -> Result<String, QmpError> {
        Ok(self.connect()?.query_status()?.status)
    }

    /// `cont`, then waits until QEMU reports running. Calling it on a running VM is harmless.
    pub fn cont(&self) -> Result<QmpStatus, QmpError> {
        let deadline = Instant::now() + self.timeout;
        let mut client = self.connect()?;
        client.execute("cont", None)?;
        let (status, ok) = client.poll_status(deadline, |s| s.running)?;
        if !ok {
            return Err(QmpError::NotRunning {
                path: self.socket_path.clone(),
                timeout: self.timeout,
                status: status.status,
            });
        }
        info!("qmp {}: guest running", self.socket_path.display());
        Ok(status)
    }

    /// `stop`, then waits until QEMU reports that the guest no longer runs.
    pub fn stop(&self) -> Result<QmpStatus, QmpError> {
        let deadline = Instant::now() + self.timeout;
        let mut client = self.connect()?;
        client.execute("stop", None)?;
        let (status, ok) = client.poll_status(deadline, |s| !s.running)?;
        if !ok {
            return Err(QmpError::NotPaused {
                path: self.socket_path.clone(),
                timeout: self.timeout,
                status: status.status,
            });
        }
        // What matters for a handoff is that the vCPUs no longer run; a state other than
        // `paused` (e.g. `shutdown`) is still worth a note.
        if status.status != "paused" {
            warn!(
                "qmp {}: guest stopped in state {}",
                self.socket_path.display(),
                status.status
            );
        } else {
            info!("qmp {}: guest paused", self.socket_path.display());
        }
        Ok(status)
    }
}

impl VmStart for QmpVm {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        debug!(
            "qmp {}: vm_start ({})",
            self.socket_path.display(),
            record.reason
        );
        self.cont()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("qmp:{}", self.socket_path.display())
    }
}

impl VmPause for QmpVm {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        self.stop()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("qmp:{}", self.socket_path.display())
    }
}
