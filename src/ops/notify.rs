// SPDX-License-Identifier: Apache-2.0
//! systemd's notify protocol (`Type=notify`): `READY=1` once the source listens or the backup
//! is armed, `STATUS=` on every state change, `STOPPING=1` at the end, and `WATCHDOG=1` from a
//! timer **on the event loop**, so that systemd sees a hung loop exactly as the backup does.
//!
//! The datagrams themselves are sent by the `sd-notify` crate from a thread of their own: a
//! send to a full notify socket blocks, and the loop must never block. The loop only puts a
//! message in a bounded queue (`try_send`); a full queue drops it (a dropped `WATCHDOG=1` is
//! what a stuck notifier deserves: systemd then restarts the process, as it should).

use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, warn};
use sd_notify::NotifyState;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// What the loop asks the notifier thread to send.
enum Msg {
    Ready(String),
    Status(String),
    Watchdog,
    Stopping(std::sync::mpsc::Sender<()>),
}

static TX: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// Starts the notifier thread if the process runs under a service manager (`NOTIFY_SOCKET`);
/// without one every call here is a no-op.
pub fn start() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (tx, rx) = sync_channel::<Msg>(64);
    let spawned = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || {
            for m in rx {
                let r = match &m {
                    Msg::Ready(s) => {
                        sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)])
                    }
                    Msg::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
                    Msg::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    Msg::Stopping(done) => {
                        let r = sd_notify::notify(&[NotifyState::Stopping]);
                        let _ = done.send(());
                        r
                    }
                };
                if let Err(e) = r {
                    debug!("sd_notify: {e}");
                }
            }
        });
    match spawned {
        Ok(_) => {
            let _ = TX.set(tx);
        }
        Err(e) => error!("cannot start the sd-notify thread: {e}; systemd will not hear from us"),
    }
}

fn send(m: Msg) {
    if let Some(tx) = TX.get() {
        match tx.try_send(m) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => debug!("sd-notify queue full: message dropped"),
        }
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(Msg::Ready(status.to_string()));
}

/// `STATUS=…`.
pub fn status(status: &str) {
    send(Msg::Status(status.to_string()));
}

/// `STOPPING=1`, at exit (off the loop): waits up to 200 ms for it and what was queued before
/// it to go out.
pub fn stopping() {
    let (tx, rx) = std::sync::mpsc::channel();
    send(Msg::Stopping(tx));
    let _ = rx.recv_timeout(Duration::from_millis(200));
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    TX.get()?;
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// The loop's side of the watchdog: a timer at half of `WATCHDOG_USEC` (what sd_watchdog_enabled(3)
/// recommends) that queues `WATCHDOG=1` each time the loop gets to it.
pub struct Watchdog {
    timer: TimerFd,
    every: Duration,
}

impl Watchdog {
    /// A watchdog pinging every `every`.
    pub fn new(every: Duration) -> std::io::Result<Watchdog> {
        Ok(Watchdog {
            timer: TimerFd::new()?,
            every,
        })
    }

    /// The subscriber for the loop, when systemd asked for a watchdog.
    pub fn from_env() -> Option<Watchdog> {
        let usec = watchdog_interval()?;
        let every = (usec / 2).max(Duration::from_millis(1));
        match Watchdog::new(every) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("cannot create the watchdog timer: {e}; systemd will restart us");
                None
            }
        }
    }
}

impl MutEventSubscriber for Watchdog {
    fn init(&mut self, ops: &mut EventOps) {
        // Periodic and never re-armed: a readable timer always has an expiration to read.
        if let Err(e) = self.timer.reset(Duration::from_nanos(1), Some(self.every)) {
            error!("watchdog timer: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            error!(
                "cannot register the watchdog timer {}: {e:?}",
                self.timer.as_raw_fd()
            );
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Expirations coalesce: a loop that was late pings once.
        if self.timer.wait().unwrap_or(0) > 0 {
            send(Msg::Watchdog);
        }
    }
}
