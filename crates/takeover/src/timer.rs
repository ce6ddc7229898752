// SPDX-License-Identifier: Apache-2.0
//! A non-blocking one-shot/periodic timer on vmm-sys-util's `TimerFd`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

/// A `TimerFd` switched to non-blocking mode.
///
/// `TimerFd::wait` blocks when the timer has not expired. An epoll batch can report the timer
/// readable and then, while an earlier event of the same batch is handled, the timer gets re-armed
/// (which clears the expiration); a blocking read would then stall the event loop.
#[derive(Debug)]
pub struct Timer(TimerFd);

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Timer> {
        let t = TimerFd::new().map_err(io::Error::from)?;
        set_nonblocking(t.as_raw_fd())?;
        Ok(Timer(t))
    }

    /// Fires once after `after`, then every `every` if given. A zero `after` is rounded up to
    /// 1 ns because zero would disarm the timer.
    pub fn arm(&mut self, after: Duration, every: Option<Duration>) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        self.0.reset(after, every).map_err(io::Error::from)
    }

    /// Stops the timer.
    pub fn disarm(&mut self) -> io::Result<()> {
        self.0.clear().map_err(io::Error::from)
    }

    /// Consumes the expirations: how many, 0 when the event was stale.
    pub fn expirations(&mut self) -> u64 {
        self.0.wait().unwrap_or(0)
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Sets O_NONBLOCK on a file descriptor.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
