// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover backup`: the library's `BackupMonitor` in an `EventManager`, its notices as JSON
//! events, signals as calls through its handle. With `--then-listen`, a backup that took over is
//! then promoted to source on the same loop (re-protection; `docs/split-brain.md`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use log::warn;
use serde_json::json;
use vmm_keepalive::UserTimeout;
use vmm_takeover_core::auth::Credentials;
use vmm_takeover_core::{
    ArbiterSession, BackupConfig, BackupMonitor, BackupNotice, SourceConfig, SourceHandle,
    SourceListener, VmPause, VmStart,
};
use vmm_takeover_guest::{QmpVm, StandbyGuest};
use vmm_takeover_replica::ReplicaStart;

use crate::cli::BackupArgs;
use crate::events::{self, emit, unix_us};
use crate::signals::{SignalKind, Signals};
use crate::{
    add_guest_report, close_arbiter, exit, hooks, keepalive_json, open_arbiter, run_loop, us, Exit,
    Failure,
};

/// Runs the backup until it took over, stood down, was refused or was stopped.
pub fn run(a: BackupArgs) -> Result<u8, Failure> {
    events::set_context("backup", &a.pair_id);
    let mut cfg = BackupConfig::new(a.connect, a.pair_id.clone());
    cfg.keepalive = a.keepalive.keepalive;
    cfg.heartbeat_misses = a.heartbeat_misses;
    cfg.keepalive_watchdog = !a.kernel_keepalive_only;
    cfg.hook_timeout = a.hook_timeout;
    cfg.retry_rejected = a.retry_rejected;
    cfg.credentials = crate::credentials(&a.auth)?;
    let credentials = cfg.credentials.clone();
    let auth = crate::auth_json(&cfg.credentials, true);
    let incomplete = Arc::new(AtomicBool::new(false));
    let (hook, guest) = hooks::start_hook(&a, &incomplete)?;
    let session = open_arbiter(&a.arbiter)?;
    // With --replica-from the standby is resumed only from a checkpoint of the link it lost.
    let (hook, replica, refusal): (Box<dyn VmStart>, _, _) = match a.replica_from {
        Some(from) => {
            let vm = crate::replica::dummy(guest.as_ref(), "--replica-from")?;
            let r = crate::replica::start_backup(from, &a.pair_id, &credentials, vm)?;
            let mut start = ReplicaStart::new(vm.clone(), r.clone());
            if let Some(s) = &session {
                start = start.with_verifier(crate::replica::verifier(s.clone(), &a.pair_id));
            }
            let refusal = start.refusal();
            (Box::new(start), Some(r), Some(refusal))
        }
        None => (hook, None, None),
    };
    if a.then_checkpoint.is_some() {
        crate::replica::dummy(guest.as_ref(), "--then-checkpoint")?;
    }
    let rp = replica.clone();
    // A local guest keeps running in this process after the takeover: the backup is now the VMM.
    // With an arbiter the process also stays to hold the pair's lease for the guest it started:
    // were it to leave, the lease would run out under a running guest.
    // With --then-listen it stays to serve as the pair's source.
    let keep_running = guest.is_some() || session.is_some() || a.then_listen.is_some();
    // Set once the guest runs here and promotion is asked (--then-listen): the loop returns,
    // the listener is added, the loop runs again.
    let promote = Exit::default();
    let pr = promote.clone();
    let promote_asked = a.then_listen.is_some();
    // The heartbeat interval the source announced on the last armed link, and the epoch won:
    // what a promoted source carries over.
    let announced: Arc<Mutex<Option<Duration>>> = Arc::default();
    let an = announced.clone();
    let won: Arc<Mutex<Option<u64>>> = Arc::default();
    let wo = won.clone();
    let g = guest.clone();
    let exit = Exit::default();
    let ex = exit.clone();
    // Once the standby guest runs here, a stop ends this process (the guest's VMM) directly.
    let serving = Arc::new(AtomicBool::new(false));
    let sv = serving.clone();
    // A takeover began: from then on the pair may hold a running guest, so the lease is never
    // revoked (it runs out on its own).
    let took_over = Arc::new(AtomicBool::new(false));
    let to = took_over.clone();
    // A stop asked for while vm_start ran, which the hook won: honoured once it reports.
    let stop_asked = Arc::new(AtomicBool::new(false));
    let sa = stop_asked.clone();
    let inc = incomplete.clone();
    let monitor = BackupMonitor::new(
        cfg,
        hook,
        Box::new(move |n: &BackupNotice| match n {
            BackupNotice::Connecting { addr } => {
                emit("connecting", json!({"addr": addr.to_string()}));
            }
            BackupNotice::Retrying {
                why,
                delay,
                attempt,
                suppressed,
            } => emit(
                "retrying",
                json!({"why": why, "delay_us": us(*delay), "attempt": attempt,
                       "suppressed": suppressed}),
            ),
            BackupNotice::Armed {
                peer,
                keepalive,
                heartbeat,
                deadline,
                link,
            } => {
                if let Some(r) = &rp {
                    r.set_link(*link);
                }
                *an.lock().unwrap_or_else(|e| e.into_inner()) = *heartbeat;
                emit(
                    "armed",
                    json!({
                        "peer": peer.to_string(),
                        "keepalive": keepalive_json(keepalive.as_ref()),
                        "heartbeat_us": heartbeat.map(us),
                        "deadline_us": deadline.map(us),
                        "auth": auth,
                    }),
                );
                if deadline.is_none() && keepalive.and_then(|k| k.bound()).is_none() {
                    let message = "this link detects nothing but the source's process exit: no \
                                   keepalive and no heartbeat, so a dead host or a cut link is \
                                   never noticed";
                    warn!("{message}");
                    emit(
                        "warning",
                        json!({"what": "no-detection", "message": message}),
                    );
                }
            }
            BackupNotice::LinkUntrusted { why } => {
                // The link is gone (it redials): nothing more of it is applied.
                if let Some(r) = &rp {
                    r.set_link(None);
                }
                emit("link-untrusted", json!({"why": why}));
            }
            BackupNotice::LinkLost { reason, detail } => {
                // No checkpoint is applied past the link's end: the takeover sees what it had.
                if let Some(r) = &rp {
                    r.set_link(None);
                }
                emit(
                    "link-lost",
                    json!({"reason": reason.as_str(), "detail": detail}),
                );
            }
            BackupNotice::Takeover(r) => {
                to.store(true, Ordering::SeqCst);
                *wo.lock().unwrap_or_else(|e| e.into_inner()) = r.epoch;
                emit(
                    "takeover",
                    json!({
                        "reason": r.reason.as_str(),
                        "errno": r.errno,
                        "epoch": r.epoch,
                        "detail": r.detail,
                        "armed_at_unix_us": unix_us(r.armed_at),
                        "detected_at_unix_us": unix_us(r.detected_at),
                    }),
                );
            }
            BackupNotice::HookFinished { result, took } => match result {
                Ok(()) => {
                    let applied = rp.as_ref().and_then(|r| r.applied());
                    emit(
                        "vm-started",
                        json!({"took_us": us(*took),
                               "guest_counter": g.as_ref().map(|g| g.counter()),
                               "checkpoint_seq": applied.map(|c| c.seq),
                               "checkpoint_mark": applied.map(|c| c.mark)}),
                    );
                    if keep_running && !sa.load(Ordering::SeqCst) {
                        sv.store(true, Ordering::SeqCst);
                        if promote_asked {
                            pr.set(exit::OK);
                        }
                    } else {
                        ex.set(exit::OK);
                    }
                }
                // The standby QEMU was receiving a live migration that did not complete:
                // nothing was started, and nothing will be.
                // Replicating, but no checkpoint of the lost link: nothing was started.
                Err(e)
                    if refusal
                        .as_ref()
                        .is_some_and(|r| r.lock().unwrap_or_else(|p| p.into_inner()).is_some()) =>
                {
                    emit("replica-missing", json!({"error": e, "took_us": us(*took)}));
                    ex.set(exit::NO_REPLICA);
                }
                Err(e) if inc.load(Ordering::SeqCst) => {
                    emit(
                        "migration-incomplete",
                        json!({"error": e, "took_us": us(*took)}),
                    );
                    ex.set(exit::INCOMPLETE);
                }
                Err(e) => {
                    emit("vm-start-failed", json!({"error": e, "took_us": us(*took)}));
                    ex.set(exit::HOOK_FAILED);
                }
            },
            BackupNotice::HookTimedOut { after } => {
                emit("hook-timeout", json!({"after_us": us(*after)}));
                ex.set(exit::UNCERTAIN);
            }
            BackupNotice::StandDown => {
                emit("stand-down", json!({}));
                ex.set(exit::OK);
            }
            BackupNotice::Rejected { reason } => {
                emit("rejected", json!({"why": reason}));
                ex.set(exit::REJECTED);
            }
            BackupNotice::ArbitrationWait {
                holder,
                ttl_left,
                why,
            } => emit(
                "arbitration-wait",
                json!({"holder": holder, "ttl_left_ms": ttl_left.map(|t| t.as_millis() as u64),
                       "why": why}),
            ),
            BackupNotice::ArbitrationWon { epoch, waited } => emit(
                "arbitration-won",
                json!({"epoch": epoch, "waited_ms": waited.as_millis() as u64}),
            ),
            BackupNotice::ArbitrationLost { winner } => {
                emit("arbitration-lost", json!({"winner": winner}));
                ex.set(exit::OWNED);
            }
            // A stopped backup simply leaves (the source sees `backup-lost`), saying how close
            // its heartbeats came to the deadline: the margin against false takeovers.
            BackupNotice::Stopped {
                aborted_hook,
                was_armed,
                heartbeats,
                deadline,
            } => {
                emit(
                    "stopped",
                    json!({"aborted_hook": aborted_hook, "armed": was_armed,
                           "heartbeats": heartbeats.received,
                           "max_gap_us": us(heartbeats.max_gap),
                           "deadline_us": deadline.map(us), "after_takeover": false}),
                );
                ex.set(if *aborted_hook {
                    exit::ABORTED
                } else {
                    exit::OK
                });
            }
        }),
    )
    .map_err(Failure::core)?;
    let mut monitor = monitor;
    if let Some(s) = &session {
        emit(
            "arbiter",
            json!({"holder": s.holder(), "arbiter": s.describe(),
                   "ttl_ms": s.ttl().as_millis() as u64}),
        );
        monitor.set_arbiter(s.clone());
    }
    let handle = monitor.handle();
    let ops = crate::ops::setup(&a.ops, monitor.counters(), session.as_ref())?;
    let mut em = EventManager::<crate::Subscriber>::new().map_err(|e| format!("{e:?}"))?;
    em.add_subscriber(Rc::new(RefCell::new(monitor)));
    for s in ops.subscribers {
        em.add_subscriber(s);
    }
    add_guest_report(&mut em, guest.clone())?;
    let ex = exit.clone();
    let started = serving.clone();
    // Once promoted, signals go to the listener, as for any source.
    let promoted: Rc<RefCell<Option<SourceSignals>>> = Rc::default();
    let pm = promoted.clone();
    let sigs = Signals::install(Box::new(move |kind| {
        if let Some((handle, pause_name)) = pm.borrow().as_ref() {
            crate::source_cmd::on_signal(kind, handle, pause_name.as_deref());
            return;
        }
        on_signal(kind, &handle, &stop_asked, &started, &ex);
    }))
    .map_err(|e| format!("signals: {e}"))?;
    em.add_subscriber(Rc::new(RefCell::new(sigs)));
    let mut code = run_loop(&mut em, &[&exit, &promote])?;
    if exit.get().is_none() && promote.get().is_some() {
        let epoch = *won.lock().unwrap_or_else(|e| e.into_inner());
        let heartbeat = a
            .then_heartbeat
            .or(*announced.lock().unwrap_or_else(|e| e.into_inner()));
        let listen = a
            .then_listen
            .expect("promotion is asked with --then-listen");
        let p = Promotion {
            a: &a,
            listen,
            heartbeat,
            credentials,
            guest,
            session: session.as_ref(),
            epoch,
        };
        match p.start(&mut em) {
            Ok(p) => {
                *promoted.borrow_mut() = Some((p.handle, p.pause_name));
                code = run_loop(&mut em, &[&p.exit, &p.vmm_exit, &exit])?;
            }
            // The guest runs here and keeps running: unprotected, said loudly, never stopped
            // for want of a backup.
            Err(why) => {
                let message = format!(
                    "cannot become the pair's source on {listen}: {why}; the guest keeps \
                     running here, unprotected"
                );
                log::error!("{message}");
                emit(
                    "warning",
                    json!({"what": "promotion-failed", "message": message}),
                );
                code = run_loop(&mut em, &[&exit])?;
            }
        }
    }
    drop(ops.control);
    // A backup that started a guest keeps the pair to the end: its lease runs out on its own
    // (TTL), never revoked from under a guest that may still run. Otherwise it holds nothing.
    // A promoted source too: after a handoff the pair is already the new backup's, after a
    // stand-down a `--qmp` guest may still run.
    if !took_over.load(Ordering::SeqCst) {
        close_arbiter(session.as_ref());
    }
    Ok(code)
}

/// The backup's signals: SIGTERM/SIGINT stop it (once its guest runs here, they end this
/// process, the guest's VMM), SIGUSR1 is ignored.
fn on_signal(
    kind: SignalKind,
    handle: &vmm_takeover_core::BackupHandle,
    stop_asked: &AtomicBool,
    started: &AtomicBool,
    ex: &Exit,
) {
    match kind {
        SignalKind::Stop => {
            stop_asked.store(true, Ordering::SeqCst);
            // After a takeover with --vm the monitor is done; this process is the guest's VMM.
            if started.load(Ordering::SeqCst) || !handle.stop() {
                emit(
                    "stopped",
                    json!({"aborted_hook": false, "armed": false, "heartbeats": null,
                           "max_gap_us": null, "deadline_us": null, "after_takeover": true}),
                );
                ex.set(exit::OK);
            }
        }
        // A backup has no handoff to start; SIGUSR1 must not end it either.
        SignalKind::Handoff => warn!("SIGUSR1 ignored: a backup has nothing to hand off"),
        SignalKind::Hangup => crate::source_cmd::signal_ignored(),
    }
}

/// Where a promoted source's signals go: its listener, and the name of its pause hook.
type SourceSignals = (SourceHandle, Option<String>);

/// What a backup that took over needs to become the pair's source (`--then-listen`).
struct Promotion<'a> {
    a: &'a BackupArgs,
    listen: SocketAddr,
    heartbeat: Option<Duration>,
    credentials: Credentials,
    guest: Option<StandbyGuest>,
    session: Option<&'a ArbiterSession>,
    epoch: Option<u64>,
}

/// A promoted source on the loop: the handle its signals go to, and its exit codes.
struct Promoted {
    handle: SourceHandle,
    pause_name: Option<String>,
    exit: Exit,
    vmm_exit: Exit,
}

impl Promotion<'_> {
    /// Binds the listener and adds it to `em`, for the guest that already runs here: nothing
    /// new starts. From then on the events and `status` say `source`.
    fn start(self, em: &mut EventManager<crate::Subscriber>) -> Result<Promoted, String> {
        let a = self.a;
        let epoch = match (self.session, self.epoch) {
            (Some(_), None) => {
                return Err("the fencing epoch won at the takeover is unknown".to_string())
            }
            (_, e) => e,
        };
        let mut cfg = SourceConfig::new(self.listen, a.pair_id.clone());
        cfg.keepalive = a.keepalive.keepalive.with_user_timeout(UserTimeout::Auto);
        cfg.heartbeat = self.heartbeat;
        cfg.pause_timeout = a.hook_timeout;
        if a.then_checkpoint.is_some() {
            // Replication keeps one replica, the armed backup's (as the source's --checkpoint).
            cfg.max_backups = 1;
        }
        let auth = crate::auth_json(&self.credentials, false);
        cfg.credentials = self.credentials;
        let keepalive = cfg.keepalive;
        // The guest that runs here is what a handoff pauses: the standby guest (`--vm`) or the
        // QEMU (`--qmp`, `stop`; `cont` if the handoff fails).
        let pause: Box<dyn VmPause> = match (&self.guest, &a.qmp) {
            (Some(g), _) => Box::new(g.clone()),
            (None, Some(path)) => Box::new(QmpVm::new(path.clone()).with_timeout(a.hook_timeout)),
            (None, None) => return Err("no guest to pause for a handoff".to_string()),
        };
        // The promoted source's own replica (--then-checkpoint): the output already shown
        // stays released; what the guest does from now on waits for the new backup's ACKs.
        let replica = match (a.then_checkpoint, a.then_replica_listen, &self.guest) {
            (Some(every), Some(listen), Some(g)) => {
                let vm =
                    crate::replica::dummy(Some(g), "--then-checkpoint").map_err(|f| f.message)?;
                let record = match (self.session, epoch) {
                    (Some(s), Some(e)) => Some(crate::replica::recorder(s.clone(), &a.pair_id, e)),
                    _ => None,
                };
                Some(crate::replica::start_source(
                    listen,
                    &a.pair_id,
                    &cfg.credentials,
                    every,
                    vm,
                    g.counter(),
                    record,
                )?)
            }
            _ => None,
        };
        // A replicated guest is paused by a final checkpoint before a handoff.
        let pause = match (&replica, &self.guest) {
            (Some(r), Some(g)) => {
                crate::replica::ReplicatedPause::boxed(g.clone(), r.clone(), a.hook_timeout / 2)
            }
            _ => pause,
        };
        let exit = Exit::default();
        let mut listener = SourceListener::new(
            cfg,
            crate::source_cmd::observer(
                exit.clone(),
                self.guest.clone(),
                self.session.map(|s| s.holder().to_string()),
                self.session.map(|s| s.describe().to_string()),
                replica,
            ),
        )
        .map_err(|e| e.to_string())?;
        let pause_name = Some(pause.describe());
        listener.set_pause_hook(pause);
        if let (Some(s), Some(epoch)) = (self.session, epoch) {
            // The new owner's epoch carries over: the listener renews and fences as any source.
            listener.set_arbiter(s.clone(), epoch);
            if let Some(g) = self.guest.clone() {
                listener.set_run_deadline_hook(Box::new(move |d| g.set_run_deadline(d)));
            }
        }
        // QEMU's health, as a source with --qmp watches it (at its default interval).
        let (watch, vmm_exit) =
            crate::source_cmd::watch_vmm(&[], a.qmp.clone(), Duration::from_secs(1))
                .map_err(|f| f.message)?;
        events::set_role("source");
        crate::ops::promote(listener.counters());
        emit(
            "promoted",
            json!({"addr": listener.local_addr().to_string(), "epoch": epoch,
                   "heartbeat_us": self.heartbeat.map(us)}),
        );
        crate::source_cmd::announce(&listener, self.heartbeat, &keepalive, auth);
        let handle = listener.handle();
        em.add_subscriber(Rc::new(RefCell::new(listener)));
        if let Some(w) = watch {
            em.add_subscriber(Rc::new(RefCell::new(w)));
        }
        Ok(Promoted {
            handle,
            pause_name,
            exit,
            vmm_exit,
        })
    }
}
