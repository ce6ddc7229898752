// SPDX-License-Identifier: Apache-2.0
//! The backup's side: a thread that keeps a replication stream to the source for the armed link,
//! applies whole checkpoints to the paused guest, and a `vm_start` that resumes only a checkpoint
//! of the link whose loss caused the takeover.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};
use vmm_takeover_core::auth::{Credentials, LinkId};
use vmm_takeover_core::{AbortHandle, HookError, TakeoverRecord, VmStart};

use crate::message::Message;
use crate::stream::{self, Stream};
use crate::{Checkpoint, EventSink, ReplicaEvent, Replicable};

/// How the backup replicates.
#[derive(Clone)]
pub struct BackupReplicaConfig {
    /// The source's replication address.
    pub connect: SocketAddr,
    /// The pair (as the heartbeat link's).
    pub pair_id: String,
    /// The heartbeat link's credentials.
    pub credentials: Credentials,
    /// Bound on connecting and on the handshake.
    pub io_timeout: Duration,
    /// A stream silent this long is dropped and dialled again.
    pub idle_timeout: Duration,
    /// Wait between attempts.
    pub retry: Duration,
    /// Report every n-th applied checkpoint (the first of each stream always).
    pub report_every: u64,
}

impl BackupReplicaConfig {
    /// Defaults: I/O timeout 2 s, idle timeout 30 s (above the longest checkpoint interval, and
    /// a source whose guest is paused sends nothing), retry 200 ms, report every 10th.
    pub fn new(connect: SocketAddr, pair_id: String, credentials: Credentials) -> Self {
        BackupReplicaConfig {
            connect,
            pair_id,
            credentials,
            io_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            retry: Duration::from_millis(200),
            report_every: 10,
        }
    }
}

/// The last checkpoint applied to the standby guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The heartbeat link it came over.
    pub link: LinkId,
    /// Its number on that link's stream.
    pub seq: u64,
    /// The output position it covers.
    pub mark: u64,
}

/// Why the standby may not resume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoReplica {
    /// No checkpoint was ever applied.
    #[error(
        "no checkpoint was ever applied: starting the standby would run a different guest and take \
         back output the source already released; nothing is started"
    )]
    Never,
    /// The last checkpoint came over another link than the one lost.
    #[error(
        "the last checkpoint (#{seq}) came over link {had}, but the takeover is for link {lost}: \
         another backup may have acknowledged newer state since, so resuming this one could take \
         back released output; nothing is started"
    )]
    OtherLink {
        /// The checkpoint's link.
        had: LinkId,
        /// Its number.
        seq: u64,
        /// The link whose loss caused the takeover (`-` if none was named).
        lost: String,
    },
    /// The arbiter names another link as the pair's replica of record.
    #[error(
        "the arbiter records link {recorded} as the pair's replica of record, not this standby's \
         link {had}: another backup held newer checkpoints and output past this state may have \
         been released; nothing is started"
    )]
    Superseded {
        /// This standby's checkpoint's link.
        had: LinkId,
        /// The link the arbiter names.
        recorded: String,
    },
    /// The replica of record could not be read.
    #[error(
        "cannot read the pair's replica of record from the arbiter ({0}): whether this standby's \
         state is the newest is unknown; nothing is started"
    )]
    Unverified(String),
}

/// Reads the pair's replica of record from the arbiter (a link id in hex), once the pair was won.
pub type Verifier = Box<dyn Fn() -> Result<Option<String>, String> + Send>;

#[derive(Default)]
struct State {
    applied: Option<Applied>,
    /// Set at takeover: nothing is applied afterwards.
    frozen: bool,
}

struct Shared {
    /// Held for a whole apply (tens of milliseconds for a full checkpoint) and by the takeover.
    state: Mutex<State>,
    /// The armed link, behind a lock of its own: the backup's event loop sets it and must never
    /// wait for an apply. Taken after `state` when both are held.
    link: Mutex<Option<LinkId>>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self) -> Option<LinkId> {
        *self.link.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The backup's replication: a handle to its thread. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaBackup {
    shared: Arc<Shared>,
}

impl ReplicaBackup {
    /// Starts the thread; it dials once a link is armed ([`ReplicaBackup::set_link`]).
    pub fn start(
        cfg: BackupReplicaConfig,
        vm: Arc<dyn Replicable>,
        events: EventSink,
    ) -> std::io::Result<ReplicaBackup> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            link: Mutex::new(None),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("replica-backup".into())
            .spawn(move || run(cfg, vm, sh, events))?;
        Ok(ReplicaBackup { shared })
    }

    /// The armed heartbeat link (from the backup's `Armed` notice); `None` while none is.
    pub fn set_link(&self, link: Option<LinkId>) {
        *self.shared.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
        self.shared.cv.notify_all();
    }

    /// The last checkpoint applied.
    pub fn applied(&self) -> Option<Applied> {
        self.shared.lock().applied
    }

    /// At takeover: stops applying for good (waiting for an apply under way) and returns the
    /// checkpoint the guest holds, if it came over `lost` — the link whose loss caused the
    /// takeover.
    pub fn freeze(&self, lost: Option<LinkId>) -> Result<Applied, NoReplica> {
        let mut st = self.shared.lock();
        st.frozen = true;
        self.shared.cv.notify_all();
        match st.applied {
            None => Err(NoReplica::Never),
            Some(a) if Some(a.link) == lost => Ok(a),
            Some(a) => Err(NoReplica::OtherLink {
                had: a.link,
                seq: a.seq,
                lost: lost.map_or_else(|| "-".to_string(), |l| l.to_string()),
            }),
        }
    }

    /// Stops the thread (it also stops once frozen).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }
}

fn run(cfg: BackupReplicaConfig, vm: Arc<dyn Replicable>, shared: Arc<Shared>, events: EventSink) {
    let mut last_refusal = String::new();
    loop {
        // Wait for an armed link (and not frozen).
        let link = {
            let mut st = shared.lock();
            loop {
                if st.frozen || shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(l) = shared.link() {
                    break l;
                }
                // Bounded: `set_link` notifies without the state lock, so a wake-up can slip
                // between the check and the wait.
                st = shared
                    .cv
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        match stream::connect(
            cfg.connect,
            &cfg.credentials,
            &cfg.pair_id,
            link,
            cfg.io_timeout,
        ) {
            Ok(mut s) => {
                last_refusal.clear();
                info!("replication stream to {} for link {link}", cfg.connect);
                events(&ReplicaEvent::Connected {
                    peer: Some(cfg.connect),
                    link,
                });
                match receive(&mut s, &cfg, vm.as_ref(), &shared, &events) {
                    End::Lost(why) => {
                        warn!("replication stream ended: {why}");
                        events(&ReplicaEvent::Lost { why });
                    }
                    End::Fatal(why) => {
                        log::error!("replication stopped: {why}");
                        events(&ReplicaEvent::Failed { why });
                        return;
                    }
                }
            }
            Err(e) => {
                // Reported once per distinct reason: a source that is down is dialled every
                // `retry` until it comes back or the link goes.
                let why = e.to_string();
                if why != last_refusal {
                    warn!("replication stream: {why}");
                    events(&ReplicaEvent::Refused { why: why.clone() });
                    last_refusal = why;
                }
            }
        }
        let st = shared.lock();
        let _ = shared.cv.wait_timeout(st, cfg.retry);
    }
}

/// A checkpoint being received.
struct Staging {
    seq: u64,
    cp: Checkpoint,
}

/// How a stream ended.
enum End {
    /// Dial again.
    Lost(String),
    /// Never again: the source's guest cannot be held here.
    Fatal(String),
}

/// Receives checkpoints until the stream fails, the link changes, or a takeover froze us.
fn receive(
    s: &mut Stream,
    cfg: &BackupReplicaConfig,
    vm: &dyn Replicable,
    shared: &Shared,
    events: &EventSink,
) -> End {
    let link = s.link();
    // Bulk copy plus the pages dirtied meanwhile: a full checkpoint may carry a page twice.
    let max_pages = 2 * vm.page_count() as usize;
    let mut expect = 1u64;
    let mut staging: Option<Staging> = None;
    let discard = |st: Option<Staging>, why: &str| {
        if let Some(st) = st {
            warn!("checkpoint {} discarded: {why}", st.seq);
            events(&ReplicaEvent::Discarded {
                seq: st.seq,
                pages: st.cp.pages.len(),
                why: why.to_string(),
            });
        }
    };
    loop {
        let m = match s.recv(cfg.idle_timeout) {
            Ok(m) => m,
            Err(e) => {
                let why = e.to_string();
                discard(
                    staging.take(),
                    &format!("the stream ended before its COMMIT ({why})"),
                );
                return End::Lost(why);
            }
        };
        let fail = |why: String, staging: &mut Option<Staging>| -> End {
            discard(staging.take(), &why);
            End::Lost(why)
        };
        match m {
            Message::Begin {
                seq,
                reset,
                guest_pages,
            } => {
                if guest_pages != vm.page_count() {
                    let mib = |p: u32| (u64::from(p) * crate::PAGE_SIZE as u64) >> 20;
                    return End::Fatal(format!(
                        "the source's guest has {guest_pages} pages ({} MiB), this standby {} \
                         ({} MiB): give both the same --guest-mem",
                        mib(guest_pages),
                        vm.page_count(),
                        mib(vm.page_count())
                    ));
                }
                if staging.is_some() || seq != expect || reset != (seq == 1) {
                    return fail(
                        format!("BEGIN {seq} (reset {reset}) out of order: expected {expect}"),
                        &mut staging,
                    );
                }
                staging = Some(Staging {
                    seq,
                    cp: Checkpoint {
                        reset,
                        ..Checkpoint::default()
                    },
                });
            }
            Message::Pages { index, data } => {
                let Some(st) = staging.as_mut() else {
                    return fail("PAGES outside a checkpoint".into(), &mut staging);
                };
                if let Some(&bad) = index.iter().find(|&&i| i >= vm.page_count()) {
                    return fail(
                        format!(
                            "page {bad} is outside the guest ({} pages)",
                            vm.page_count()
                        ),
                        &mut staging,
                    );
                }
                if st.cp.pages.len() + index.len() > max_pages {
                    return fail(
                        format!("checkpoint {} carries more than {max_pages} pages", st.seq),
                        &mut staging,
                    );
                }
                st.cp.pages.extend_from_slice(&index);
                st.cp.data.extend_from_slice(&data);
            }
            Message::Commit {
                seq,
                mark,
                pages,
                state,
            } => {
                let Some(mut st) = staging.take() else {
                    return fail("COMMIT outside a checkpoint".into(), &mut staging);
                };
                if seq != st.seq || pages as usize != st.cp.pages.len() {
                    let why = format!(
                        "COMMIT {seq} for {pages} pages does not close checkpoint {} of {} pages",
                        st.seq,
                        st.cp.pages.len()
                    );
                    return fail(why, &mut Some(st));
                }
                st.cp.mark = mark;
                st.cp.state = state;
                {
                    let mut g = shared.lock();
                    if g.frozen {
                        return End::Lost("the standby took over: nothing more is applied".into());
                    }
                    if shared.link() != Some(link) {
                        return fail(format!("link {link} is no longer armed"), &mut Some(st));
                    }
                    // Applied under the lock: a takeover waits for it, then sees it. Until it
                    // succeeds the standby holds no known state (an apply that fails half way
                    // must not leave the previous checkpoint's record on a mixed image).
                    g.applied = None;
                    if let Err(e) = vm.apply(&st.cp) {
                        return fail(format!("cannot apply: {e}"), &mut Some(st));
                    }
                    g.applied = Some(Applied { link, seq, mark });
                }
                if let Err(e) = s.send(&Message::Ack { seq }) {
                    return End::Lost(e.to_string());
                }
                if seq == 1 || seq % cfg.report_every.max(1) == 0 {
                    events(&ReplicaEvent::Applied {
                        seq,
                        full: st.cp.reset,
                        pages: st.cp.pages.len(),
                        mark,
                    });
                }
                expect = seq + 1;
            }
            Message::Ack { .. } => {
                return fail("ACK from the source".into(), &mut staging);
            }
        }
    }
}

/// The backup's `vm_start` with replication: resumes the standby only from a checkpoint of the
/// lost link ([`ReplicaBackup::freeze`]); otherwise fails and starts nothing.
pub struct ReplicaStart<H> {
    inner: H,
    replica: ReplicaBackup,
    refused: Arc<Mutex<Option<NoReplica>>>,
    verify: Option<Verifier>,
}

impl<H: VmStart> ReplicaStart<H> {
    /// Wraps the guest's own `vm_start`.
    pub fn new(inner: H, replica: ReplicaBackup) -> Self {
        ReplicaStart {
            inner,
            replica,
            refused: Arc::default(),
            verify: None,
        }
    }

    /// With an arbiter: before resuming, checks that the arbiter's replica of record (if it
    /// names one) is this standby's link.
    pub fn with_verifier(mut self, verify: Verifier) -> Self {
        self.verify = Some(verify);
        self
    }

    /// Where the reason for a refused start is kept (for the caller's report).
    pub fn refusal(&self) -> Arc<Mutex<Option<NoReplica>>> {
        self.refused.clone()
    }
}

impl<H: VmStart> VmStart for ReplicaStart<H> {
    fn vm_start(&mut self, record: &TakeoverRecord) -> Result<(), HookError> {
        let checked = self.replica.freeze(record.link).and_then(|a| {
            match self.verify.as_ref().map(|v| v()) {
                None | Some(Ok(None)) => Ok(a),
                Some(Ok(Some(recorded))) if recorded == a.link.to_hex() => Ok(a),
                Some(Ok(Some(recorded))) => Err(NoReplica::Superseded {
                    had: a.link,
                    recorded,
                }),
                Some(Err(e)) => Err(NoReplica::Unverified(e)),
            }
        });
        match checked {
            Ok(a) => {
                info!(
                    "resuming from checkpoint {} (output mark {}) of link {}",
                    a.seq, a.mark, a.link
                );
                self.inner.vm_start(record)
            }
            Err(e) => {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                Err(Box::new(e))
            }
        }
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        self.inner.abort_handle()
    }

    fn describe(&self) -> String {
        format!("{} (replica)", self.inner.describe())
    }
}
