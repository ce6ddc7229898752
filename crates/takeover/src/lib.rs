// SPDX-License-Identifier: Apache-2.0
//! Heartbeat link and takeover core for rust-vmm based VMMs.
//!
//! - [`source::SourceListener`]: the source VMM's subscriber; listens, handshakes backups, sends
//!   heartbeats, STAND_DOWN and HANDOFF.
//! - [`backup::BackupMonitor`]: the backup VMM's subscriber; connects with keepalive tuning, arms the
//!   link, and calls [`VmStart`] exactly once when the armed link is lost.
//! - [`link`]: the pure state machine behind every takeover decision.
//! - [`protocol`]: wire protocol v1.
//!
//! Both subscribers implement event-manager's `MutEventSubscriber`: add them to the VMM's own
//! `EventManager`. Neither ever blocks in `process()`.
#![deny(missing_docs)]

use std::net::SocketAddr;

pub mod arbiter;
pub mod backup;
pub mod hook;
pub mod link;
pub mod protocol;
pub mod source;
pub mod timer;

pub use arbiter::{Acquire, Arbiter, ArbiterError, Ownership};
pub use backup::{BackupConfig, BackupMonitor, BackupNotice, HeartbeatStats};
pub use hook::{AbortHandle, HookError, TakeoverReason, TakeoverRecord, VmPause, VmStart};
pub use link::{LinkEvent, LinkState, SocketFailure, Verdict};
pub use source::{SourceConfig, SourceListener, SourceNotice};
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
    sock.set_tcp_nodelay(true)
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
    /// A timerfd, eventfd or thread could not be created.
    #[error("cannot create a timerfd, eventfd or thread: {0}")]
    Resource(std::io::Error),
    /// The operation is already under way.
    #[error("busy: {0}")]
    Busy(&'static str),
}
