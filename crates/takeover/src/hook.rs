// SPDX-License-Identifier: Apache-2.0
//! The hooks a VMM plugs in: start the standby guest, pause the local one.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use vmm_keepalive::EffectiveKeepalive;

/// An error from a hook, boxed so that each backend keeps its own `thiserror` enum.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the backup took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TakeoverReason {
    /// EOF on an armed link with no STAND_DOWN before it (source VMM process died).
    PeerClosed,
    /// ECONNRESET (source host rebooted: its kernel no longer knows the connection).
    Reset,
    /// ETIMEDOUT (keepalive or TCP_USER_TIMEOUT expired: host dead, cable cut, partition).
    TimedOut,
    /// EHOSTUNREACH / ENETUNREACH / ENETDOWN / EHOSTDOWN.
    Unreachable,
    /// Planned switchover: the source paused its guest and sent HANDOFF.
    Handoff,
    /// No HEARTBEAT frame within `interval × misses` (source VMM hung or link dead).
    HeartbeatTimeout,
    /// Another socket error on an armed link.
    LinkError,
}

impl TakeoverReason {
    /// The stable kebab-case name used in events, environment variables and docs.
    pub fn as_str(&self) -> &'static str {
        match self {
            TakeoverReason::PeerClosed => "peer-closed",
            TakeoverReason::Reset => "reset",
            TakeoverReason::TimedOut => "timed-out",
            TakeoverReason::Unreachable => "unreachable",
            TakeoverReason::Handoff => "handoff",
            TakeoverReason::HeartbeatTimeout => "heartbeat-timeout",
            TakeoverReason::LinkError => "link-error",
        }
    }
}

impl fmt::Display for TakeoverReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the backup knew when it decided to take over.
#[derive(Debug, Clone)]
pub struct TakeoverRecord {
    /// Why.
    pub reason: TakeoverReason,
    /// The pair id of the link.
    pub pair_id: String,
    /// Wall-clock time the link armed.
    pub armed_at: SystemTime,
    /// Wall-clock time the loss was seen on the event loop.
    pub detected_at: SystemTime,
    /// Monotonic time the loss was seen (for latency measurements).
    pub detected_instant: Instant,
    /// The keepalive values read back from the link's socket.
    pub keepalive: Option<EffectiveKeepalive>,
    /// The heartbeat interval announced by the source, if any.
    pub heartbeat: Option<Duration>,
    /// The raw errno that was classified, if the loss came from a socket error (the keepalive
    /// watchdog reports `ETIMEDOUT`, as the kernel would a moment later).
    pub errno: Option<i32>,
    /// What exactly was seen, for logs and operators (e.g. "EOF from source").
    pub detail: String,
}

/// Starts the standby guest. Implemented by the guest backends (dummy KVM VM, QEMU QMP, command).
///
/// The backup subscriber never calls this on the event loop: it runs on a thread of its own and its
/// result comes back to the loop through an eventfd, so a slow hook cannot stall the VMM.
/// The subscriber calls it at most once per link.
pub trait VmStart: Send {
    /// Resumes the standby guest. Returns once the guest is known to run (or has failed to).
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError>;

    /// A short human description, e.g. `kvm-dummy` or `qmp:/run/vm.qmp`.
    fn describe(&self) -> String;
}

/// Pauses the local guest before a planned HANDOFF (source side).
pub trait VmPause: Send {
    /// Pauses the guest. Returns once it is paused.
    fn vm_pause(&mut self) -> Result<(), HookError>;

    /// A short human description.
    fn describe(&self) -> String;
}

impl<F> VmStart for F
where
    F: FnMut(&TakeoverRecord) -> Result<(), HookError> + Send,
{
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        self(record)
    }

    fn describe(&self) -> String {
        "closure".to_string()
    }
}
