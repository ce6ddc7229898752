// SPDX-License-Identifier: Apache-2.0
//! The hooks a VMM plugs in: start the standby guest, pause the local one.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use vmm_keepalive::EffectiveKeepalive;

/// An error from a hook, boxed so that each backend keeps its own `thiserror` enum.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Makes a running hook give up as soon as it can (kill its child process group, shut its socket).
///
/// Taken from the hook (see [`VmStart::abort_handle`]) before the hook moves onto its worker
/// thread, and called from the event loop when the hook's deadline passes or the VMM stops while
/// the hook runs. Must not block.
pub type AbortHandle = Arc<dyn Fn() + Send + Sync>;

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
    /// Every reason.
    pub const ALL: [TakeoverReason; 7] = [
        TakeoverReason::PeerClosed,
        TakeoverReason::Reset,
        TakeoverReason::TimedOut,
        TakeoverReason::Unreachable,
        TakeoverReason::Handoff,
        TakeoverReason::HeartbeatTimeout,
        TakeoverReason::LinkError,
    ];

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
    /// The fencing epoch the arbiter granted with the pair, when an arbiter is configured. It only
    /// ever grows: storage or network fencing can refuse writes tagged with an older one.
    pub epoch: Option<u64>,
    /// The link whose loss (or HANDOFF) caused the takeover ([`crate::auth::LinkId`]): state that
    /// arrived over a stream bound to another link is not this link's (replication checks it).
    pub link: Option<crate::auth::LinkId>,
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

    /// A handle that makes a running `vm_start` give up (see [`AbortHandle`]); `None` when the
    /// hook cannot be interrupted (it then runs to its own end, reported late).
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
}

/// Pauses the local guest before a planned HANDOFF (source side), and resumes it when the handoff
/// fails before the backup's copy runs.
pub trait VmPause: Send {
    /// Pauses the guest. Returns once it is paused.
    fn vm_pause(&mut self) -> Result<(), HookError>;

    /// Resumes the guest after [`vm_pause`](Self::vm_pause), when the handoff did not happen (the
    /// backup refused or failed to start its copy). Returns once the guest runs. The default says
    /// it cannot: the guest then stays paused and the failure is reported.
    fn vm_resume(&mut self) -> Result<(), HookError> {
        Err(format!("the pause hook {} cannot resume the guest", self.describe()).into())
    }

    /// Stops the guest for good because the lease ran out (fencing): as fast as it can, and
    /// never by anything slower than a pause. The default is [`vm_pause`](Self::vm_pause); a
    /// hook whose pause is slow (a live migration) stops the guest directly.
    fn vm_fence(&mut self) -> Result<(), HookError> {
        self.vm_pause()
    }

    /// A short human description.
    fn describe(&self) -> String;

    /// A handle that makes a running pause or resume give up (see [`AbortHandle`]).
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
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
