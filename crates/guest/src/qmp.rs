// SPDX-License-Identifier: Apache-2.0
//! A minimal QMP (QEMU Machine Protocol) client over a unix socket, and [`QmpVm`], the hook that
//! resumes (`cont`) or pauses (`stop`) a QEMU guest.
//!
//! QMP is line-delimited JSON: a greeting `{"QMP": {...}}`, then `qmp_capabilities` leaves
//! negotiation mode, then each command gets one `{"return": ...}` or `{"error": ...}`; asynchronous
//! `{"event": ...}` lines may arrive at any time and are skipped here.
//!
//! QEMU serves one QMP client per monitor at a time, so [`QmpVm`] connects for each call and hangs
//! up after it, leaving the monitor free for operators and other tools in between. While another
//! client holds the monitor, QEMU stops accepting: new connections wait in the socket's listen
//! backlog, and once that is full a plain `connect` blocks. The connect here is bounded too.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{json, Value};
use vmm_takeover_core::{AbortHandle, HookError, TakeoverRecord, VmPause, VmStart};

/// The default bound for a whole `vm_start` / `vm_pause` / `vm_resume` (connect, greeting,
/// command, status confirmation).
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// A blocked connect is retried in slices this long, so that an abort ends it within one slice.
const CONNECT_SLICE: Duration = Duration::from_millis(50);

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
    /// The socket's listen backlog stayed full: nobody accepted within the bound.
    #[error(
        "cannot connect to QMP socket {} within {timeout:?}: its listen backlog is full \
         (QEMU serves one QMP client at a time: is another one connected?)",
        .path.display()
    )]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
    },
    /// The QEMU was receiving a live migration (`inmigrate`) and it did not complete: its
    /// image is incomplete and is never resumed.
    #[error(
        "QEMU at {} was receiving a live migration that did not complete ({why}): its image is \
         incomplete and is not resumed",
        .path.display()
    )]
    IncomingIncomplete {
        /// The socket path.
        path: PathBuf,
        /// What was seen.
        why: String,
    },
    /// The caller gave up on the call through its [`AbortHandle`] (the socket was shut down).
    #[error(
        "QMP call on {} aborted by its caller (deadline passed or VMM stopping): whether the \
         command took effect is unknown, ask with query-status",
        .path.display()
    )]
    Aborted {
        /// The socket path.
        path: PathBuf,
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

/// What the abort handle of a [`QmpVm`] needs to reach the call in progress.
#[derive(Debug, Default)]
struct CallState {
    /// A call is in progress.
    active: bool,
    /// The abort handle was called during this call.
    aborted: bool,
    /// A clone of the call's connected socket, for `shutdown` (which wakes a blocked read).
    stream: Option<UnixStream>,
}

type SharedCall = Arc<Mutex<CallState>>;

// Held only for non-blocking steps (flag updates, `shutdown`), never across I/O.
fn lock(call: &Mutex<CallState>) -> MutexGuard<'_, CallState> {
    call.lock().unwrap_or_else(|e| e.into_inner())
}

fn earliest(deadline: Instant, cap: Option<Instant>) -> Instant {
    cap.map_or(deadline, |cap| cap.min(deadline))
}

/// The `sockaddr_un` for `path`, or why it cannot be one.
fn unix_addr(path: &Path) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the path is {} bytes long; a unix socket path holds at most {}",
                bytes.len(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    if bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "the path contains a NUL byte",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Sets `SO_SNDTIMEO`, which also bounds a blocking `connect` of a unix socket.
fn set_send_timeout(fd: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    // A zero timeval would mean "no timeout": never go below one microsecond.
    let timeout = timeout.max(Duration::from_micros(1));
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the unix socket at `path` before `deadline`.
///
/// A unix-socket `connect` never returns EINPROGRESS: with the listener's backlog full, a
/// non-blocking one fails with EAGAIN at once and there is nothing to poll for. A blocking one
/// waits for room in the backlog for up to `SO_SNDTIMEO`, then fails with EAGAIN. So the wait is
/// a blocking connect in slices of [`CONNECT_SLICE`], retried until the deadline, with the abort
/// flag checked between slices.
fn connect_unix(
    path: &Path,
    deadline: Instant,
    timeout: Duration,
    call: Option<&SharedCall>,
) -> Result<UnixStream, QmpError> {
    let connect_err = |source| QmpError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let (addr, len) = unix_addr(path).map_err(connect_err)?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(connect_err(std::io::Error::last_os_error()));
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        if call.is_some_and(|call| lock(call).aborted) {
            return Err(QmpError::Aborted {
                path: path.to_path_buf(),
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(QmpError::ConnectTimeout {
                path: path.to_path_buf(),
                timeout,
            });
        }
        set_send_timeout(&fd, remaining.min(CONNECT_SLICE)).map_err(connect_err)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // The backlog stayed full for this slice, or a signal came: try again.
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            Some(libc::ENOENT) => {
                return Err(QmpError::SocketMissing {
                    path: path.to_path_buf(),
                })
            }
            _ => return Err(connect_err(e)),
        }
    }
}

/// A connected QMP session, past capabilities negotiation.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    greeting: Value,
    next_id: u64,
    /// No step may end after this (the whole operation's deadline), whatever `timeout` says.
    cap: Option<Instant>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities, all within `timeout` (also when
    /// the socket's listen backlog is full and nobody accepts). Every later command is bounded by
    /// `timeout` too.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_within(path.as_ref(), timeout, None, None)
    }

    /// [`connect`](Self::connect), with every step also bounded by `cap` (the whole operation's
    /// deadline) and abortable through `call`.
    fn connect_within(
        path: &Path,
        timeout: Duration,
        cap: Option<Instant>,
        call: Option<&SharedCall>,
    ) -> Result<Self, QmpError> {
        let path = path.to_path_buf();
        let handshake_deadline = earliest(Instant::now() + timeout, cap);
        let stream = connect_unix(&path, handshake_deadline, timeout, call)?;
        let io_err = |source| QmpError::Io {
            path: path.clone(),
            source,
        };
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        if let Some(call) = call {
            // From here on the abort handle can shut the socket; an abort that came during the
            // connect is honoured now.
            let clone = stream.try_clone().map_err(io_err)?;
            let mut st = lock(call);
            if st.aborted {
                return Err(QmpError::Aborted { path });
            }
            st.stream = Some(clone);
        }
        let mut client = QmpClient {
            path,
            reader: BufReader::new(stream),
            timeout,
            greeting: Value::Null,
            next_id: 0,
            cap: Some(handshake_deadline),
        };
        let line = client.read_line(handshake_deadline, "the QMP greeting")?;
        let greeting: Value =
            serde_json::from_str(&line).map_err(|_| client.not_greeting(&line))?;
        if greeting.get("QMP").is_none() {
            return Err(client.not_greeting(&line));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", None)?;
        client.cap = cap;
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
        let deadline = earliest(Instant::now() + self.timeout, self.cap);
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

/// A QEMU guest driven over QMP: `vm_start` and `vm_resume` = `cont` + wait until running,
/// `vm_pause` = `stop` + confirm it no longer runs. Each call connects, and the whole call
/// (connect, greeting, command, confirmation) is bounded by [`timeout`](Self::timeout).
///
/// Its abort handle shuts the socket of the call in progress down, so a blocked read returns at
/// once and the call fails with [`QmpError::Aborted`]; a connect waiting on a full backlog gives
/// up within 50 ms. A clone has its own calls (and abort handle).
#[derive(Debug)]
pub struct QmpVm {
    /// The QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub socket_path: PathBuf,
    /// The bound for each whole operation.
    pub timeout: Duration,
    call: SharedCall,
}

impl Clone for QmpVm {
    fn clone(&self) -> Self {
        QmpVm {
            socket_path: self.socket_path.clone(),
            timeout: self.timeout,
            call: SharedCall::default(),
        }
    }
}

/// Clears the call state however a call ends (return or panic).
struct EndCall<'a>(&'a Mutex<CallState>);

impl Drop for EndCall<'_> {
    fn drop(&mut self) {
        *lock(self.0) = CallState::default();
    }
}

impl QmpVm {
    /// A hook for the QMP socket at `socket_path`, with [`DEFAULT_QMP_TIMEOUT`].
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        QmpVm {
            socket_path: socket_path.into(),
            timeout: DEFAULT_QMP_TIMEOUT,
            call: SharedCall::default(),
        }
    }

    /// The same hook with another bound.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Opens a QMP session on the socket (connect, greeting and capabilities within the bound).
    pub fn connect(&self) -> Result<QmpClient, QmpError> {
        QmpClient::connect(&self.socket_path, self.timeout)
    }

    /// Runs `op` on a fresh session, the whole call bounded by `timeout` and abortable.
    fn call<T>(
        &self,
        op: impl FnOnce(&mut QmpClient, Instant) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        let deadline = Instant::now() + self.timeout;
        *lock(&self.call) = CallState {
            active: true,
            ..CallState::default()
        };
        let _end = EndCall(&self.call);
        let result = QmpClient::connect_within(
            &self.socket_path,
            self.timeout,
            Some(deadline),
            Some(&self.call),
        )
        .and_then(|mut client| op(&mut client, deadline));
        match result {
            // Whatever the failure looks like after a shutdown (EOF, EPIPE), the cause is the abort.
            Err(_) if lock(&self.call).aborted => {
                warn!("qmp {}: call aborted", self.socket_path.display());
                Err(QmpError::Aborted {
                    path: self.socket_path.clone(),
                })
            }
            other => other,
        }
    }

    /// QEMU's run state (`prelaunch`, `running`, `paused`, ...).
    pub fn query_status(&self) -> Result<String, QmpError> {
        self.call(|client, _| Ok(client.query_status()?.status))
    }

    /// `cont`, then waits until QEMU reports running. Calling it on a running VM is harmless.
    pub fn cont(&self) -> Result<QmpStatus, QmpError> {
        let status = self.call(|client, deadline| self.cont_on(client, deadline))?;
        info!("qmp {}: guest running", self.socket_path.display());
        Ok(status)
    }

    /// `cont` on an open session, then waits (until `deadline`) for QEMU to report running.
    fn cont_on(&self, client: &mut QmpClient, deadline: Instant) -> Result<QmpStatus, QmpError> {
        client.execute("cont", None)?;
        let (status, ok) = client.poll_status(deadline, |s| s.running)?;
        if !ok {
            return Err(QmpError::NotRunning {
                path: self.socket_path.clone(),
                timeout: self.timeout,
                status: status.status,
            });
        }
        Ok(status)
    }

    /// `stop`, then waits until QEMU reports that the guest no longer runs.
    pub fn stop(&self) -> Result<QmpStatus, QmpError> {
        let status = self.call(|client, deadline| {
            client.execute("stop", None)?;
            let (status, ok) = client.poll_status(deadline, |s| !s.running)?;
            if !ok {
                return Err(QmpError::NotPaused {
                    path: self.socket_path.clone(),
                    timeout: self.timeout,
                    status: status.status,
                });
            }
            Ok(status)
        })?;
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

    fn abort_handle(&self) -> AbortHandle {
        let call = self.call.clone();
        Arc::new(move || {
            let mut st = lock(&call);
            if !st.active {
                return;
            }
            st.aborted = true;
            if let Some(stream) = &st.stream {
                // Wakes a read blocked on the socket at once; never blocks itself.
                let _ = stream.shutdown(Shutdown::Both);
            }
        })
    }
}

impl QmpVm {
    /// `vm_start` of a standby QEMU: if it is still receiving a live migration (`inmigrate`),
    /// waits (within the bound) until the migration completed, and never resumes an incomplete
    /// image: a QEMU that gives up its incoming migration exits, and one still receiving at the
    /// bound is left paused. Then `cont`, as [`cont`](Self::cont).
    pub fn start_complete(&self) -> Result<QmpStatus, QmpError> {
        // One session for all of it: every extra connect is a round trip to QEMU's main loop.
        let status = self.call(|client, deadline| {
            if client.query_status()?.status == "inmigrate" {
                self.wait_incoming(client, deadline)?;
            }
            self.cont_on(client, deadline)
        })?;
        info!("qmp {}: guest running", self.socket_path.display());
        Ok(status)
    }

    /// Waits while QEMU is `inmigrate` and a migration is arriving; an error when it does not
    /// complete.
    fn wait_incoming(&self, client: &mut QmpClient, deadline: Instant) -> Result<(), QmpError> {
        info!(
            "qmp {}: receiving a live migration: waiting for it to complete",
            self.socket_path.display()
        );
        let incomplete = |why: String| QmpError::IncomingIncomplete {
            path: self.socket_path.clone(),
            why,
        };
        let ended = |e: QmpError| match e {
            // QEMU ends itself when its incoming migration fails.
            QmpError::Closed { .. } | QmpError::Io { .. } => {
                incomplete("QEMU ended during the incoming migration".into())
            }
            e => e,
        };
        loop {
            // Waiting is worth it only while a migration is arriving; a QEMU that never got one
            // holds no image (and nobody will send it one now).
            let m = client.execute("query-migrate", None).map_err(ended)?;
            let arriving = m.get("status").and_then(Value::as_str);
            if arriving == Some("completed")
                || client.query_status().map_err(ended)?.status != "inmigrate"
            {
                info!(
                    "qmp {}: the incoming migration completed",
                    self.socket_path.display()
                );
                return Ok(());
            }
            if !matches!(arriving, Some("active" | "device")) {
                return Err(incomplete(format!(
                    "no migration is arriving (migration status {})",
                    arriving.unwrap_or("none")
                )));
            }
            if Instant::now() >= deadline {
                return Err(incomplete(format!(
                    "still arriving after {:?}",
                    self.timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl VmStart for QmpVm {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        debug!(
            "qmp {}: vm_start ({})",
            self.socket_path.display(),
            record.reason
        );
        self.start_complete()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("qmp:{}", self.socket_path.display())
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(QmpVm::abort_handle(self))
    }
}

impl VmPause for QmpVm {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        self.stop()?;
        Ok(())
    }

    /// `cont`, confirmed by `query-status` (as `vm_start`).
    fn vm_resume(&mut self) -> Result<(), HookError> {
        debug!("qmp {}: vm_resume", self.socket_path.display());
        self.cont()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("qmp:{}", self.socket_path.display())
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(QmpVm::abort_handle(self))
    }
}
