// SPDX-License-Identifier: Apache-2.0
//! `--control PATH`: a Unix socket (mode 0600) on which `vmm-takeover status` asks a running
//! process for its state.
//!
//! A thread accepts and reads the request; the call reaches the loop through the core's
//! [`Mailbox`] (a channel plus an `EventFd`), the loop answers from its own state, and the
//! thread writes the answer. So the answer is also proof that the loop turns: a loop that does
//! not answer within [`LOOP_DEADLINE`] is reported as such. Calls are served on threads of their
//! own (a few at once); an answer of the loop younger than 5 ms is given again rather than asked
//! anew, which bounds what a flood of calls can cost the loop to 200 answers a second.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_takeover_core::mailbox::{Mailbox, Sender};

use super::Ops;

/// How long the thread waits for the loop's answer.
pub const LOOP_DEADLINE: Duration = Duration::from_secs(1);
/// How long a client may take to send its request or to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another live process answers on the path.
    #[error("{0}: another process is listening on this control socket")]
    InUse(PathBuf),
    /// The path exists and is not a socket: never removed.
    #[error("{0}: exists and is not a socket; choose another --control path")]
    NotASocket(PathBuf),
    /// Binding or setting it up failed.
    #[error("{path}: cannot open the control socket: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// A call for the loop: answer on `reply`.
pub struct Call {
    reply: mpsc::Sender<Value>,
}

/// The loop's side: answers calls from [`Ops`].
pub struct Responder {
    mailbox: Mailbox<Call>,
    ops: &'static Ops,
}

impl Responder {
    /// A responder and the sending end for the control thread.
    pub fn new(ops: &'static Ops) -> io::Result<(Responder, Sender<Call>)> {
        let mailbox = Mailbox::new()?;
        let tx = mailbox.sender();
        Ok((Responder { mailbox, ops }, tx))
    }
}

impl MutEventSubscriber for Responder {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.mailbox, EventSet::IN)) {
            error!(
                "cannot register the control mailbox {}: {e:?}",
                self.mailbox.as_raw_fd()
            );
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        for call in self.mailbox.drain() {
            let _ = call.reply.send(self.ops.status_json());
        }
    }
}

/// The open control socket: its file goes when this is dropped (at exit).
#[derive(Debug)]
pub struct Socket(PathBuf);

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Most calls served at once; beyond it a caller is told to retry.
const MAX_CALLS: usize = 16;
/// A loop answer younger than this is given again instead of asking the loop: a flood of calls
/// costs the loop at most one answer per this interval.
const FRESH: Duration = Duration::from_millis(5);

/// What the control threads share: the way to the loop and its last answer.
struct Shared {
    loop_tx: Sender<Call>,
    last: Mutex<LoopState>,
}

/// The loop's last answer, and a call it has not answered yet.
#[derive(Default)]
struct LoopState {
    answer: Option<(Instant, Value)>,
    outstanding: Option<(mpsc::Receiver<Value>, Instant)>,
}

/// Opens `path` (mode 0600; a stale socket left by a dead process is replaced) and serves it
/// from a thread, each call on a thread of its own (at most [`MAX_CALLS`]).
pub fn start(path: &Path, loop_tx: Sender<Call>) -> Result<Socket, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    // Bound with a umask that leaves only the owner's bits, so that the socket is never
    // reachable by others, not even for a moment before a chmod.
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let shared = Arc::new(Shared {
        loop_tx,
        last: Mutex::new(LoopState::default()),
    });
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            super::serve_bounded(
                "control",
                l.incoming(),
                MAX_CALLS,
                |c: UnixStream| {
                    let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
                    let busy = json!({"error": "too many calls at once; retry"});
                    let _ = (&c).write_all(format!("{busy}\n").as_bytes());
                },
                move |c| serve(c, &shared),
            );
        })
        .map_err(io)?;
    Ok(Socket(path.to_path_buf()))
}

/// The loop's answer, or a fresh enough earlier one.
fn ask_loop(sh: &Shared) -> Value {
    // Held while the loop answers: concurrent callers wait for this answer rather than queue
    // more calls on the loop.
    let mut st = sh.last.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, v)) = &st.answer {
        if at.elapsed() < FRESH {
            return v.clone();
        }
    }
    // A call the loop has not answered yet (it was hung or slow) is waited for again rather
    // than joined by another: a loop that wakes up answers one call, not a backlog.
    let (rx, asked) = match st.outstanding.take() {
        Some(o) => o,
        None => {
            let (tx, rx) = mpsc::channel();
            let sent = sh.loop_tx.send(Call { reply: tx });
            if !sent {
                return json!({"error": "the event loop has ended"});
            }
            (rx, Instant::now())
        }
    };
    match rx.recv_timeout(LOOP_DEADLINE) {
        Ok(mut v) => {
            v["loop_answer_us"] = Value::from(asked.elapsed().as_micros() as u64);
            st.answer = Some((Instant::now(), v.clone()));
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            st.outstanding = Some((rx, asked));
            json!({"error": format!(
                "the event loop did not answer within {LOOP_DEADLINE:?}: it is hung or \
                 overloaded")})
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            json!({"error": "the event loop has ended"})
        }
    }
}

fn serve(c: UnixStream, sh: &Shared) -> io::Result<()> {
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    // A request is one short line.
    BufReader::new(io::Read::take(&c, 256)).read_line(&mut line)?;
    let answer = match line.trim() {
        "status" => ask_loop(sh),
        other => json!({"error": format!("unknown request {other:?}; the only request is status")}),
    };
    let mut out = answer.to_string();
    out.push('\n');
    (&c).write_all(out.as_bytes())
}

/// `vmm-takeover status`: asks the process on `path` and returns its answer.
pub fn ask(path: &Path, timeout: Duration) -> Result<Value, String> {
    let c = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach {}: {e} (is a source or backup running with --control {}?)",
            path.display(),
            path.display()
        )
    })?;
    c.set_read_timeout(Some(timeout))
        .and_then(|()| c.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    // A busy process answers (and closes) without reading: its answer is still there to read.
    let sent = (&c).write_all(b"status\n");
    let mut line = String::new();
    BufReader::new(&c)
        .read_line(&mut line)
        .map_err(|e| format!("{}: no answer within {timeout:?}: {e}", path.display()))?;
    if line.is_empty() {
        return Err(match sent {
            Err(e) => format!("{}: cannot send the request: {e}", path.display()),
            Ok(()) => format!("{}: closed without an answer", path.display()),
        });
    }
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("{}: not a status answer ({e}): {line:?}", path.display()))?;
    match v.get("error").and_then(Value::as_str) {
        Some(e) => Err(format!("{}: {e}", path.display())),
        None => Ok(v),
    }
}
