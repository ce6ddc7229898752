// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover backup`: the library's `BackupMonitor` in an `EventManager`, its notices as JSON
//! events, signals as calls through its handle.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventManager, SubscriberOps};
use log::warn;
use serde_json::json;
use vmm_takeover_core::{BackupConfig, BackupMonitor, BackupNotice};

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
    let auth = crate::auth_json(&cfg.credentials, true);
    let incomplete = Arc::new(AtomicBool::new(false));
    let (hook, guest) = hooks::start_hook(&a, &incomplete)?;
    let session = open_arbiter(&a.arbiter)?;
    // A local guest keeps running in this process after the takeover: the backup is now the VMM.
    // With an arbiter the process also stays to hold the pair's lease for the guest it started:
    // were it to leave, the lease would run out under a running guest.
    let keep_running = guest.is_some() || session.is_some();
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
            } => {
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
            BackupNotice::LinkUntrusted { why } => emit("link-untrusted", json!({"why": why})),
            BackupNotice::LinkLost { reason, detail } => emit(
                "link-lost",
                json!({"reason": reason.as_str(), "detail": detail}),
            ),
            BackupNotice::Takeover(r) => {
                to.store(true, Ordering::SeqCst);
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
                    emit(
                        "vm-started",
                        json!({"took_us": us(*took),
                               "guest_counter": g.as_ref().map(|g| g.counter())}),
                    );
                    if keep_running && !sa.load(Ordering::SeqCst) {
                        sv.store(true, Ordering::SeqCst);
                    } else {
                        ex.set(exit::OK);
                    }
                }
                // The standby QEMU was receiving a live migration that did not complete:
                // nothing was started, and nothing will be.
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
    add_guest_report(&mut em, guest)?;
    let ex = exit.clone();
    let started = serving.clone();
    let sigs = Signals::install(Box::new(move |kind| match kind {
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
    }))
    .map_err(|e| format!("signals: {e}"))?;
    em.add_subscriber(Rc::new(RefCell::new(sigs)));
    let code = run_loop(&mut em, &[&exit])?;
    drop(ops.control);
    // A backup that started a guest keeps the pair to the end: its lease runs out on its own
    // (TTL), never revoked from under a guest that may still run. Otherwise it holds nothing.
    if !took_over.load(Ordering::SeqCst) {
        close_arbiter(session.as_ref());
    }
    Ok(code)
}
