// SPDX-License-Identifier: Apache-2.0
//! Heartbeat link and takeover core for rust-vmm based VMMs.
//!
//! - [`source::SourceListener`]: the source VMM's subscriber; listens, handshakes backups, sends
//!   heartbeats, STAND_DOWN and HANDOFF.
//! - [`backup::BackupMonitor`]: the backup VMM's subscriber; connects with keepalive tuning, arms the
//!   link, and calls [`VmStart`] at most once when the armed link is lost.
//! - [`link`]: the pure state machines of both sides, behind every decision.
//! - [`protocol`]: wire protocol v1, and the frames and errors version 2 keeps.
//! - [`auth`]: wire protocol v2: key files, the authenticated handshake, sealed frames.
//! - [`arbiter`]: the ownership of a pair, decided by an external arbiter (split-brain guard).
//!
//! Both subscribers implement event-manager's `MutEventSubscriber`: add them to the VMM's own
//! `EventManager`. Neither ever blocks in `process()`; calls from other threads go through their
//! handles ([`SourceHandle`], [`BackupHandle`]), whose messages are carried out on the loop.

use std::net::SocketAddr;

pub mod arbiter;
pub mod auth;
pub mod backup;
pub mod counters;
pub mod hook;
pub mod link;
pub mod mailbox;
pub mod protocol;
pub mod session;
pub mod source;
mod timer;

pub use arbiter::{Acquire, Arbiter, ArbiterError, Ownership};
pub use backup::{BackupConfig, BackupHandle, BackupMonitor, BackupNotice, HeartbeatStats};
pub use counters::LinkCounters;
pub use hook::{AbortHandle, HookError, TakeoverReason, TakeoverRecord, VmPause, VmStart};
pub use link::SocketFailure;
pub use session::{ArbiterSession, SessionEvent};
pub use source::{SourceConfig, SourceHandle, SourceListener, SourceNotice};
pub use vmm_keepalive;

/// Tunes a heartbeat socket the same way on both sides: the keepalive spec (with its
/// `TCP_USER_TIMEOUT`) and `TCP_NODELAY`, so a frame leaves at once.
pub(crate) fn tune_socket(
    sock: &socket2::Socket,
    keepalive: &vmm_keepalive::KeepaliveSpec,
) -> std::io::Result<()> {
    keepalive
        .apply(sock)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    sock.set_tcp_nodelay(true)?;
    // A heartbeat link is a thin stream (a frame or two in flight): retransmit at a steady RTO
    // instead of doubling it, so that a peer whose receive queue overflowed while its loop
    // stalled gets the next frame within a fraction of a second of reading again, not after
    // seconds of backoff.
    set_int_opt(sock, libc::IPPROTO_TCP, libc::TCP_THIN_LINEAR_TIMEOUTS, 1)?;
    // A few bytes per beat need no bandwidth model: Reno (always built in) costs less per ACK
    // than BBR or CUBIC (BBR showed in profiles at 1,000 links). Best effort.
    set_congestion(sock, b"reno");
    Ok(())
}

fn set_congestion(sock: &socket2::Socket, name: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd and a byte buffer of the given length.
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
}

fn set_int_opt(
    sock: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd and a pointer to an int of the given size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kernel's `TCP_INFO` of a socket.
pub(crate) fn tcp_info(sock: &socket2::Socket) -> std::io::Result<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, a pointer to a properly sized buffer and its length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// Applies `keepalive` to a scratch socket of `addr`'s family, so that a value the kernel refuses
/// (a bound beyond what `TCP_USER_TIMEOUT` can hold, say) fails at start with the kernel's limit
/// named, never as an endless retry.
pub(crate) fn check_keepalive(
    keepalive: &vmm_keepalive::KeepaliveSpec,
    addr: SocketAddr,
) -> Result<(), Error> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        Some(socket2::Protocol::TCP),
    )
    .map_err(Error::Resource)?;
    keepalive
        .apply(&sock)
        .map(drop)
        .map_err(|e| Error::Config(format!("keepalive: {e}")))
}

/// Errors from building the subscribers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; the message says what is allowed.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen socket could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// A socket, timerfd, eventfd or thread could not be created.
    #[error("cannot create a socket, timerfd, eventfd or thread: {0}")]
    Resource(std::io::Error),
}
