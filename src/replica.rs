// SPDX-License-Identifier: Apache-2.0
//! Replication in the CLI (`--checkpoint`, `--replica-from`, `--then-checkpoint`): the replica
//! crate's threads started from the flags, their reports as JSON events, and output commit on
//! what this process shows of its guest.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::json;
use vmm_takeover_core::auth::Credentials;
use vmm_takeover_core::{ArbiterSession, HookError, VmPause};
use vmm_takeover_guest::{DummyVm, StandbyGuest};
use vmm_takeover_replica::{
    BackupReplicaConfig, EventSink, Fault, Recorder, ReplicaBackup, ReplicaEvent, ReplicaSource,
    SourceReplicaConfig, Verifier,
};

use crate::events::emit;
use crate::{exit, us, Failure};

/// The replication this process serves as a source, once it does: from then on what it reports of
/// its guest's output is what the backup holds (output commit).
static OUTPUT: OnceLock<ReplicaSource> = OnceLock::new();

/// The guest's output (its counter) as this process may show it: with replication, only what a
/// checkpoint the backup acknowledged covers; otherwise the counter itself.
pub fn reported_counter(g: &StandbyGuest) -> u64 {
    OUTPUT
        .get()
        .map_or_else(|| g.counter(), ReplicaSource::released)
}

/// Whether output is held for acknowledgements (for the `guest` event's `output_commit`).
pub fn output_committed() -> bool {
    OUTPUT.get().is_some()
}

/// The dummy KVM guest replication needs, or a usage error naming the flag.
pub fn dummy<'a>(guest: Option<&'a StandbyGuest>, flag: &str) -> Result<&'a DummyVm, Failure> {
    guest
        .and_then(StandbyGuest::as_dummy)
        .ok_or_else(|| Failure {
            code: exit::USAGE,
            message: format!(
                "{flag} needs --vm kvm-dummy: replication takes the guest's dirty pages from KVM, \
             which only the built-in KVM guest exposes here"
            ),
        })
}

/// `VMM_TAKEOVER_FAULT=checkpoint-stall:N` (tests only): the source stops sending in the middle
/// of checkpoint N, as a kill in mid-stream would leave it.
fn fault() -> Option<Fault> {
    let v = std::env::var("VMM_TAKEOVER_FAULT").ok()?;
    let n = v.strip_prefix("checkpoint-stall:")?.parse().ok()?;
    log::warn!("fault injection asked: checkpoint {n} will be cut in half");
    Some(Fault { stall_at: n })
}

/// Starts replicating `vm` to the backup that dials `listen`; `start_mark` is the output already
/// shown (a promoted backup's), which stays released.
pub fn start_source(
    listen: SocketAddr,
    pair_id: &str,
    credentials: &Credentials,
    interval: Duration,
    vm: &DummyVm,
    start_mark: u64,
    record: Option<Recorder>,
) -> Result<ReplicaSource, String> {
    let mut cfg =
        SourceReplicaConfig::new(listen, pair_id.to_string(), credentials.clone(), interval);
    cfg.fault = fault();
    cfg.record = record;
    let r = ReplicaSource::start(cfg, Arc::new(vm.clone()), start_mark, sink())
        .map_err(|e| format!("cannot listen for the replication stream on {listen}: {e}"))?;
    // One guest per process: the first replication started is the one its output follows.
    let _ = OUTPUT.set(r.clone());
    Ok(r)
}

/// Bound on one arbiter call for the replica of record.
const RECORD_TIMEOUT: Duration = Duration::from_secs(2);

/// The epoch this process holds the pair under, as the source's `owner` notices last said (a
/// failed handoff that takes the pair back gets a new one). One pair per process.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// A new epoch is held (the `owner` notice).
pub fn note_epoch(epoch: u64) {
    EPOCH.store(epoch, Ordering::SeqCst);
}

/// With `--arbiter`: the source records a stream's link as the pair's replica of record (owned
/// under the epoch held now, at first `epoch`) before releasing output on its acknowledgements.
pub fn recorder(session: ArbiterSession, pair_id: &str, epoch: u64) -> Recorder {
    let pair = pair_id.to_string();
    let _ = EPOCH.compare_exchange(0, epoch, Ordering::SeqCst, Ordering::SeqCst);
    Arc::new(move |link| {
        session
            .set_replica_blocking(
                &pair,
                EPOCH.load(Ordering::SeqCst),
                &link.to_hex(),
                RECORD_TIMEOUT,
            )
            .map_err(|e| e.to_string())
    })
}

/// With `--arbiter`: the backup reads the pair's replica of record after winning the pair (three
/// tries: the arbiter just answered, a failure is likely passing).
pub fn verifier(session: ArbiterSession, pair_id: &str) -> Verifier {
    let pair = pair_id.to_string();
    Box::new(move || {
        let mut last = String::new();
        for _ in 0..3 {
            match session.replica_blocking(&pair, RECORD_TIMEOUT) {
                Ok(r) => return Ok(r),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
}

/// Starts keeping `vm` a replica of the source's guest at `from`.
pub fn start_backup(
    from: SocketAddr,
    pair_id: &str,
    credentials: &Credentials,
    vm: &DummyVm,
) -> Result<ReplicaBackup, Failure> {
    let cfg = BackupReplicaConfig::new(from, pair_id.to_string(), credentials.clone());
    ReplicaBackup::start(cfg, Arc::new(vm.clone()), sink())
        .map_err(|e| Failure::runtime(format!("cannot start the replication thread: {e}")))
}

/// The pause hook of a replicated guest: before a handoff, a final checkpoint that leaves the
/// guest paused, acknowledged by the backup, so that the backup resumes exactly where the guest
/// stopped; without one (no synced backup, timeout) a plain pause, and the backup resumes from
/// its last checkpoint (progress lost, never released output).
pub struct ReplicatedPause {
    guest: StandbyGuest,
    replica: ReplicaSource,
    timeout: Duration,
}

impl ReplicatedPause {
    /// For `guest`, replicated by `replica`; the final checkpoint is bounded by `timeout`.
    pub fn boxed(
        guest: StandbyGuest,
        replica: ReplicaSource,
        timeout: Duration,
    ) -> Box<dyn VmPause> {
        Box::new(ReplicatedPause {
            guest,
            replica,
            timeout,
        })
    }
}

impl VmPause for ReplicatedPause {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        match self.replica.final_checkpoint(self.timeout) {
            Ok(seq) => {
                log::info!("final checkpoint {seq} acknowledged: the guest is paused in it");
                // Already paused by the checkpoint; this only confirms it.
                self.guest.vm_pause()
            }
            Err(why) => {
                log::warn!(
                    "no final checkpoint ({why}): pausing; the backup resumes from its last one"
                );
                self.guest.vm_pause()
            }
        }
    }

    fn vm_resume(&mut self) -> Result<(), HookError> {
        self.guest.vm_resume()
    }

    fn vm_fence(&mut self) -> Result<(), HookError> {
        // The lease ran out: stop now, no checkpoint first.
        self.guest.vm_fence()
    }

    fn describe(&self) -> String {
        format!(
            "{} (final checkpoint, then pause)",
            VmPause::describe(&self.guest)
        )
    }
}

/// The replication threads' reports as events.
fn sink() -> EventSink {
    Arc::new(|e: &ReplicaEvent| match e {
        ReplicaEvent::Listening { addr } => {
            emit("replica-listening", json!({"addr": addr.to_string()}));
        }
        ReplicaEvent::Connected { peer, link } => emit(
            "replica-connected",
            json!({"peer": peer.map(|p| p.to_string()), "link": link.to_string()}),
        ),
        ReplicaEvent::Refused { why } => emit("replica-refused", json!({"why": why})),
        ReplicaEvent::Acked {
            seq,
            full,
            last,
            pages,
            bytes,
            pause,
            mark,
            rtt,
        } => emit(
            "checkpoint",
            json!({"seq": seq, "full": full, "last": last, "pages": pages, "bytes": bytes,
                   "pause_us": us(*pause), "released": mark, "rtt_us": us(*rtt)}),
        ),
        ReplicaEvent::Applied {
            seq,
            full,
            pages,
            mark,
        } => emit(
            "checkpoint-applied",
            json!({"seq": seq, "full": full, "pages": pages, "mark": mark}),
        ),
        ReplicaEvent::Discarded { seq, pages, why } => emit(
            "checkpoint-discarded",
            json!({"seq": seq, "pages": pages, "why": why}),
        ),
        ReplicaEvent::Lost { why } => emit("replica-lost", json!({"why": why})),
        ReplicaEvent::Failed { why } => emit("replica-failed", json!({"why": why})),
        ReplicaEvent::FaultInjected { seq } => emit("fault-injected", json!({"seq": seq})),
    })
}
