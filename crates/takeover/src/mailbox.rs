// SPDX-License-Identifier: Apache-2.0
//! How other threads reach a subscriber on its event loop: a channel plus an `EventFd` the loop
//! polls. API calls (stand down, hand off, stop) and the results of off-loop work (hooks, the
//! arbiter) all come in this way, so a subscriber's state is only ever touched on its loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The receiving end, owned by the subscriber, which registers [`Mailbox::as_raw_fd`].
#[derive(Debug)]
pub struct Mailbox<T> {
    rx: mpsc::Receiver<T>,
    tx: mpsc::Sender<T>,
    evt: Arc<EventFd>,
}

/// A sending end: cheap to clone, `Send`, never blocks.
#[derive(Debug)]
pub struct Sender<T> {
    tx: mpsc::Sender<T>,
    evt: Arc<EventFd>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            evt: self.evt.clone(),
        }
    }
}

impl<T> Mailbox<T> {
    /// A mailbox with a non-blocking, close-on-exec eventfd (hook children never inherit it).
    pub fn new() -> io::Result<Self> {
        let evt = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let (tx, rx) = mpsc::channel();
        Ok(Mailbox {
            rx,
            tx,
            evt: Arc::new(evt),
        })
    }

    /// A sending end.
    pub fn sender(&self) -> Sender<T> {
        Sender {
            tx: self.tx.clone(),
            evt: self.evt.clone(),
        }
    }

    /// Clears the wake-up and returns what is queued. Called when the eventfd is readable.
    pub fn drain(&self) -> Vec<T> {
        let _ = self.evt.read();
        self.rx.try_iter().collect()
    }
}

impl<T> AsRawFd for Mailbox<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl<T> Sender<T> {
    /// Queues `msg` and wakes the loop. `false` when the subscriber is gone.
    pub fn send(&self, msg: T) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        // A full counter (2^64 - 2 wake-ups) cannot happen; an error here only means the loop
        // already has a wake-up pending.
        let _ = self.evt.write(1);
        true
    }
}

/// The result of off-loop work: what the job returned, or the panic's message, and how long it
/// ran.
pub(crate) type Done<R> = (Result<R, String>, Duration);

/// Runs `job` on a thread of its own and sends `wrap((result, took))` back through `to`. A panic
/// in the job is reported as an error, never as silence. Deadlines are the caller's: it arms a
/// timer and, when the result is late, reports that and aborts the job through its handle.
pub(crate) fn offload<R, T>(
    name: &str,
    to: &Sender<T>,
    job: impl FnOnce() -> R + Send + 'static,
    wrap: impl FnOnce(Done<R>) -> T + Send + 'static,
) -> io::Result<()>
where
    R: Send + 'static,
    T: Send + 'static,
{
    let to = to.clone();
    let what = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let t = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                .map_err(|p| panic_message(&what, p.as_ref()));
            to.send(wrap((r, t.elapsed())));
        })
        .map(drop)
}

fn panic_message(what: &str, p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    format!("{what} panicked: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 10_000) == 1 }
    }

    #[test]
    fn a_message_wakes_the_fd_and_drains_in_order() {
        let mb = Mailbox::new().unwrap();
        let tx = mb.sender();
        std::thread::spawn(move || {
            tx.send(1);
            tx.send(2);
        });
        assert!(wait_readable(mb.as_raw_fd()));
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(wait_readable(mb.as_raw_fd()) || !got.is_empty());
            got.extend(mb.drain());
        }
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn offload_reports_results_and_panics() {
        let mb = Mailbox::<Done<u32>>::new().unwrap();
        offload("ok", &mb.sender(), || 7, |d| d).unwrap();
        offload("boom", &mb.sender(), || -> u32 { panic!("no way") }, |d| d).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(wait_readable(mb.as_raw_fd()));
            got.extend(mb.drain().into_iter().map(|(r, _)| r));
        }
        assert!(got.contains(&Ok(7)));
        assert!(got.contains(&Err("boom panicked: no way".to_string())));
    }

    #[test]
    fn the_eventfd_is_close_on_exec() {
        let mb = Mailbox::<()>::new().unwrap();
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(mb.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
    }
}
