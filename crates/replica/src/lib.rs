// SPDX-License-Identifier: Apache-2.0
//! Remus-style replication for vmm-takeover: the standby holds the source's state.
//!
//! Every interval the source holds its vCPU between two guest entries, takes the pages the guest
//! dirtied since the last checkpoint (KVM dirty logging) and the vCPU state, lets the guest run
//! again, and streams the checkpoint to the backup ([`ReplicaSource`]). The backup stages it and
//! applies it to its paused guest only once the checkpoint's COMMIT arrived whole and verified,
//! then acknowledges ([`ReplicaBackup`]). A checkpoint cut short is never applied.
//!
//! **Output commit** (Remus's rule): what the guest shows the outside world is released only
//! once the backup acknowledged a checkpoint that covers it ([`ReplicaSource::released`]). So a
//! backup that resumes from its last applied checkpoint never takes back anything the world saw.
//!
//! **One arrow into the core**: the heartbeat link's [`LinkId`]. The stream is authenticated by
//! the link's own handshake and bound to the armed link's id; the backup's takeover carries the
//! id of the link it lost ([`vmm_takeover_core::TakeoverRecord::link`]), and
//! [`ReplicaStart`] starts the guest only if its last applied checkpoint came over that link.
//! A backup that re-armed (a new link) must be synced again before it may take over: another
//! backup may have acknowledged newer checkpoints in between, and output may have been released
//! past this one's state. The argument is in `docs/replication.md`.
//!
//! A VMM plugs its guest in through [`Replicable`]; [`vmm_takeover_guest::DummyVm`] implements it.

use std::time::Duration;

mod backup;
pub mod message;
mod source;
pub mod stream;

pub use backup::{Applied, BackupReplicaConfig, NoReplica, ReplicaBackup, ReplicaStart, Verifier};
pub use source::{Fault, Recorder, ReplicaSource, SourceReplicaConfig};
pub use vmm_takeover_core::auth::LinkId;

/// The page size the dirty log counts in.
pub const PAGE_SIZE: usize = 4096;

/// What one capture took from the running guest.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// The guest's output position this state covers (the dummy guest's counter).
    pub mark: u64,
    /// Dirty page indexes since the last capture (or since [`Replicable::begin_tracking`]).
    pub pages: Vec<u32>,
    /// `pages.len() × PAGE_SIZE` bytes, in the same order.
    pub data: Vec<u8>,
    /// Opaque vCPU (and device) state.
    pub state: Vec<u8>,
    /// How long the vCPU was held.
    pub pause: Duration,
}

/// A whole checkpoint, as the backup applies it.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// Zero all guest memory first (the first checkpoint of a stream).
    pub reset: bool,
    /// The output position it covers.
    pub mark: u64,
    /// Page indexes, in the order received (a later copy of a page overwrites an earlier one).
    pub pages: Vec<u32>,
    /// `pages.len() × PAGE_SIZE` bytes.
    pub data: Vec<u8>,
    /// Opaque vCPU (and device) state.
    pub state: Vec<u8>,
}

/// Why a capture did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The guest does not run (paused for a handoff, fenced, not started): nothing to take now.
    #[error("the guest is not running")]
    NotRunning,
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// What replication needs from a VMM. Everything is called from the replication threads, never
/// from the VMM's event loop.
pub trait Replicable: Send + Sync + 'static {
    /// Guest memory in pages.
    fn page_count(&self) -> u32;
    /// Clears the dirty log: pages written from now on show up in the next capture. Called
    /// before a live bulk copy.
    fn begin_tracking(&self) -> Result<(), String>;
    /// Copies one page as it is now (the guest may run); `false` if it is all zeros.
    fn read_page(&self, index: u32, out: &mut [u8; PAGE_SIZE]) -> Result<bool, String>;
    /// Holds the vCPUs between two guest entries and takes the dirty pages, the state and the
    /// output mark; the guest runs again when it returns. Bounded by `timeout`.
    fn capture(&self, timeout: Duration) -> Result<Capture, CaptureError>;
    /// Like [`Replicable::capture`], and the vCPUs stay paused right after it (the last
    /// checkpoint before a planned handoff): the state captured is the state the guest is left
    /// in. Resuming it is the VMM's own (its pause hook's) business.
    fn capture_and_pause(&self, timeout: Duration) -> Result<Capture, CaptureError>;
    /// Applies a whole checkpoint to the paused, never-started guest.
    fn apply(&self, checkpoint: &Checkpoint) -> Result<(), String>;
}

impl Replicable for vmm_takeover_guest::DummyVm {
    fn page_count(&self) -> u32 {
        self.pages()
    }

    fn begin_tracking(&self) -> Result<(), String> {
        self.clear_dirty_log().map_err(|e| e.to_string())
    }

    fn read_page(&self, index: u32, out: &mut [u8; PAGE_SIZE]) -> Result<bool, String> {
        vmm_takeover_guest::DummyVm::read_page(self, index, out).map_err(|e| e.to_string())
    }

    fn capture(&self, timeout: Duration) -> Result<Capture, CaptureError> {
        dummy_capture(vmm_takeover_guest::DummyVm::capture(self, false, timeout))
    }

    fn capture_and_pause(&self, timeout: Duration) -> Result<Capture, CaptureError> {
        dummy_capture(vmm_takeover_guest::DummyVm::capture_and_pause(
            self, timeout,
        ))
    }

    fn apply(&self, c: &Checkpoint) -> Result<(), String> {
        let vcpu =
            vmm_takeover_guest::VcpuState::from_bytes(&c.state).map_err(|e| e.to_string())?;
        vmm_takeover_guest::DummyVm::apply(self, c.reset, &c.pages, &c.data, Some(&vcpu), c.mark)
            .map_err(|e| e.to_string())
    }
}

fn dummy_capture(
    r: Result<vmm_takeover_guest::Capture, vmm_takeover_guest::KvmDummyError>,
) -> Result<Capture, CaptureError> {
    match r {
        Ok(c) => Ok(Capture {
            mark: c.counter,
            pages: c.pages,
            data: c.data,
            state: c.vcpu.to_bytes(),
            pause: c.pause,
        }),
        Err(vmm_takeover_guest::KvmDummyError::NotRunning(_)) => Err(CaptureError::NotRunning),
        Err(e) => Err(CaptureError::Failed(e.to_string())),
    }
}

/// What the replication threads report, for events and metrics.
#[derive(Debug, Clone)]
pub enum ReplicaEvent {
    /// Source: listening for the backup's stream.
    Listening {
        /// The bound address.
        addr: std::net::SocketAddr,
    },
    /// A stream is up (authenticated and bound to `link`).
    Connected {
        /// The peer.
        peer: Option<std::net::SocketAddr>,
        /// The heartbeat link it serves.
        link: LinkId,
    },
    /// A stream could not be set up (handshake failed or refused); the backup retries.
    Refused {
        /// Why.
        why: String,
    },
    /// Source: the backup acknowledged a checkpoint; output up to `mark` is released.
    Acked {
        /// The checkpoint.
        seq: u64,
        /// Whether it was a full one (the first of a stream).
        full: bool,
        /// Whether it was the last before a handoff (the guest stays paused after it).
        last: bool,
        /// Pages it carried.
        pages: usize,
        /// Bytes on the wire.
        bytes: u64,
        /// How long the guest was held.
        pause: Duration,
        /// The output it released.
        mark: u64,
        /// From the capture to the ACK.
        rtt: Duration,
    },
    /// Backup: a checkpoint was applied (reported for the first of a stream and then every
    /// `report_every`-th).
    Applied {
        /// The checkpoint.
        seq: u64,
        /// Whether it was a full one.
        full: bool,
        /// Pages it carried.
        pages: usize,
        /// The output position it covers.
        mark: u64,
    },
    /// Backup: a checkpoint that never completed was dropped, never applied.
    Discarded {
        /// The checkpoint.
        seq: u64,
        /// Pages received of it.
        pages: usize,
        /// Why.
        why: String,
    },
    /// Backup: replication cannot work with this source (its guest has another size); the
    /// thread stops for good and a takeover will start nothing.
    Failed {
        /// Why, naming what must match.
        why: String,
    },
    /// The stream ended.
    Lost {
        /// Why.
        why: String,
    },
    /// Source: a deliberate fault (tests only) stopped the stream in the middle of a checkpoint.
    FaultInjected {
        /// The checkpoint cut in half.
        seq: u64,
    },
}

/// Where the replication threads report.
pub type EventSink = std::sync::Arc<dyn Fn(&ReplicaEvent) + Send + Sync>;
