// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover source`: the library's `SourceListener` in an `EventManager`, its notices as
//! JSON events, signals as calls through its handle.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use event_manager::{EventManager, SubscriberOps};
use std::os::unix::process::ExitStatusExt;

use log::{error, warn};
use serde_json::{json, Value};
use std::time::Duration;

use vmm_takeover_core::auth::LinkId;
use vmm_takeover_core::link::source::Refusal;
use vmm_takeover_core::source::{fence_margin, SourceObserver};
use vmm_takeover_core::vmm_keepalive::{KeepaliveSpec, SystemDefaults};
use vmm_takeover_core::{
    Acquire, ArbiterSession, SourceConfig, SourceHandle, SourceListener, SourceNotice,
};
use vmm_takeover_guest::StandbyGuest;
use vmm_takeover_replica::ReplicaSource;

use crate::cli::SourceArgs;
use crate::events::{self, emit};
use crate::guest_report::GuestReport;
use crate::signals::{SignalKind, Signals};
use crate::vmm_child::{VmmEnd, VmmWatch};
use crate::{
    add_guest_report, close_arbiter, exit, hooks, keepalive_json, open_arbiter, run_loop, us, Exit,
    Failure,
};

/// Runs the source until it stood down or handed off.
pub fn run(a: SourceArgs) -> Result<u8, Failure> {
    events::set_context("source", &a.pair_id);
    let mut cfg = SourceConfig::new(a.listen, a.pair_id.clone());
    cfg.keepalive = a.keepalive.keepalive.with_user_timeout(a.user_timeout);
    cfg.heartbeat = a.heartbeat;
    cfg.pause_timeout = a.hook_timeout;
    cfg.handoff_timeout = a.handoff_timeout;
    cfg.credentials = crate::credentials(&a.auth)?;
    let auth = crate::auth_json(&cfg.credentials, false);
    cfg.max_pending = a.max_pending as usize;
    cfg.max_pending_per_addr = a.max_pending_per_addr as usize;
    if a.migrate_to.is_some() || a.checkpoint.is_some() {
        // HANDOFF must go to the backup whose QEMU receives the migration: there is one.
        // Replication keeps one replica, the armed backup's.
        cfg.max_backups = 1;
    }
    let (pause, guest) = hooks::pause_hook(&a)?;
    // With an arbiter the pair is ours before the guest runs: a source that finds it owned by a
    // live holder refuses to run a second copy.
    let session = open_arbiter(&a.arbiter)?;
    let epoch = match &session {
        None => None,
        Some(s) => Some(own_pair(s, &a.pair_id)?),
    };
    if let Some(g) = &guest {
        if let Some(s) = &session {
            // The vCPUs check it before every entry: not one instruction past the lease.
            g.set_run_deadline(s.valid_until().map(|t| t - fence_margin(s.ttl())));
        }
        g.start()
            .map_err(|e| Failure::runtime(format!("cannot start the local guest: {e}")))?;
    }
    // Replication starts with the guest: it holds the guest's output from its first value.
    let replica = match (a.checkpoint, a.replica_listen) {
        (Some(every), Some(listen)) => {
            let vm = crate::replica::dummy(guest.as_ref(), "--checkpoint")?;
            let record = match (&session, epoch) {
                (Some(s), Some(e)) => Some(crate::replica::recorder(s.clone(), &a.pair_id, e)),
                _ => None,
            };
            Some(
                crate::replica::start_source(
                    listen,
                    &a.pair_id,
                    &cfg.credentials,
                    every,
                    vm,
                    0,
                    record,
                )
                .map_err(Failure::runtime)?,
            )
        }
        _ => None,
    };
    // The VMM child starts after the pair is ours, and shares fate with this process.
    let (watch, vmm_exit) = watch_vmm(&a.vmm, a.qmp.clone(), a.health_interval)?;
    let exit = Exit::default();
    let holder = session.as_ref().map(|s| s.holder().to_string());
    let arbiter_url = session.as_ref().map(|s| s.describe().to_string());
    let mut listener = SourceListener::new(
        cfg,
        observer(
            exit.clone(),
            guest.clone(),
            holder,
            arbiter_url,
            replica.clone(),
        ),
    )
    .map_err(Failure::core)?;
    // A replicated guest is paused by a final checkpoint before a handoff.
    let pause = match (&replica, &guest) {
        (Some(r), Some(g)) => Some(crate::replica::ReplicatedPause::boxed(
            g.clone(),
            r.clone(),
            a.hook_timeout / 2,
        )),
        _ => pause,
    };
    let pause_name = pause.as_ref().map(|p| p.describe());
    if let Some(p) = pause {
        listener.set_pause_hook(p);
    }
    if let (Some(s), Some(epoch)) = (&session, epoch) {
        listener.set_arbiter(s.clone(), epoch);
        if let Some(g) = guest.clone() {
            listener.set_run_deadline_hook(Box::new(move |d| g.set_run_deadline(d)));
        }
    }
    let ops = crate::ops::setup(&a.ops, listener.counters(), session.as_ref())?;
    announce(
        &listener,
        a.heartbeat,
        &a.keepalive.keepalive.with_user_timeout(a.user_timeout),
        auth,
    );
    let handle = listener.handle();
    let mut em = EventManager::<crate::Subscriber>::new().map_err(|e| format!("{e:?}"))?;
    em.add_subscriber(Rc::new(RefCell::new(listener)));
    for s in ops.subscribers {
        em.add_subscriber(s);
    }
    add_guest_report(&mut em, guest)?;

    let sigs = Signals::install(Box::new(move |kind| {
        on_signal(kind, &handle, pause_name.as_deref());
    }))
    .map_err(|e| format!("signals: {e}"))?;
    em.add_subscriber(Rc::new(RefCell::new(sigs)));
    if let Some(w) = watch {
        em.add_subscriber(Rc::new(RefCell::new(w)));
    }
    let code = run_loop(&mut em, &[&exit, &vmm_exit]);
    drop(ops.control);
    // Stood down, handed off, fenced: the lease goes now rather than at its TTL.
    close_arbiter(session.as_ref());
    code
}

/// The listener's notices as JSON events; `exit` gets the code once it is done. Shared by the
/// source and by a backup promoted to source (`--then-listen`).
pub(crate) fn observer(
    exit: Exit,
    guest: Option<StandbyGuest>,
    holder: Option<String>,
    arbiter_url: Option<String>,
    replica: Option<ReplicaSource>,
) -> SourceObserver {
    let (ex, g) = (exit, guest);
    // The replication stream serves the armed backup's link only (one backup with --checkpoint);
    // a backup that goes unbinds only its own link.
    let r1 = replica.clone();
    let bind = move |link: Option<LinkId>| {
        if let Some(r) = &r1 {
            r.bind_link(link);
        }
    };
    let unbind = move |link: Option<LinkId>| {
        if let (Some(r), Some(l)) = (&replica, link) {
            r.unbind_link(l);
        }
    };
    Box::new(move |n: &SourceNotice| match n {
        SourceNotice::BackupJoined {
            peer,
            keepalive,
            node,
            key_id,
            link,
        } => {
            bind(*link);
            emit(
                "backup-joined",
                json!({"peer": peer.to_string(), "keepalive": keepalive_json(*keepalive),
                       "node": node, "key_id": key_id}),
            );
        }
        SourceNotice::BackupLost { peer, why, link } => {
            unbind(*link);
            emit("backup-lost", json!({"peer": peer.to_string(), "why": why}));
        }
        SourceNotice::BackupRejected {
            peer,
            why,
            suppressed,
        } => emit(
            "backup-rejected",
            json!({"peer": peer.to_string(), "why": why, "suppressed": suppressed}),
        ),
        SourceNotice::BackupEvicted { peer, why, link } => {
            unbind(*link);
            emit(
                "backup-evicted",
                json!({"peer": peer.to_string(), "why": why}),
            );
        }
        SourceNotice::BackupSlow { peer, unsent } => emit(
            "backup-slow",
            json!({"peer": peer.to_string(), "unsent_bytes": unsent}),
        ),
        SourceNotice::BackupCaughtUp { peer, skipped } => emit(
            "backup-caught-up",
            json!({"peer": peer.to_string(), "heartbeats_skipped": skipped}),
        ),
        SourceNotice::AcceptFailed { error, count } => {
            emit("accept-failed", json!({"error": error, "count": count}));
        }
        SourceNotice::HandoffRefused { why } => {
            let why = match why {
                Refusal::NoBackup => "no-backup",
                Refusal::Busy => "busy",
                Refusal::Finished => "finished",
            };
            emit("handoff-refused", json!({"why": why}));
        }
        SourceNotice::HandoffPaused => {
            if let Some(g) = &g {
                // Evidence for the record: the local guest is paused before HANDOFF leaves.
                GuestReport::report(g);
            }
            emit("handoff-paused", json!({}));
        }
        SourceNotice::HandoffSent { to, others } => emit(
            "handoff-sent",
            json!({"to": to.to_string(), "others_stood_down": others}),
        ),
        SourceNotice::HandoffComplete { to, took } => {
            emit(
                "handoff-complete",
                json!({"to": to.to_string(), "took_us": us(*took)}),
            );
            ex.set(exit::OK);
        }
        // The source keeps serving; SIGUSR1 may try again.
        SourceNotice::HandoffFailed {
            stage,
            error,
            resumed,
        } => {
            if let Some(g) = &g {
                GuestReport::report(g);
            }
            emit(
                "handoff-failed",
                json!({"stage": stage, "error": error, "resumed": resumed}),
            );
        }
        SourceNotice::HandoffUncertain { why } => {
            emit("handoff-uncertain", json!({"why": why}));
            ex.set(exit::UNCERTAIN);
        }
        SourceNotice::StandDownDeferred => emit("stand-down-deferred", json!({})),
        SourceNotice::StandDownSent { backups } => {
            emit("stand-down-sent", json!({"backups": backups}));
        }
        SourceNotice::StoodDown { told, confirmed } => {
            emit("stood-down", json!({"told": told, "confirmed": confirmed}));
            ex.set(exit::OK);
        }
        SourceNotice::Owner { epoch, ttl } => {
            // The replica of record is written under the epoch held now (it changes when a
            // failed handoff takes the pair back).
            crate::replica::note_epoch(*epoch);
            emit(
                "owner",
                json!({"epoch": epoch, "ttl_ms": ttl.as_millis() as u64,
                       "holder": holder, "arbiter": arbiter_url}),
            );
        }
        SourceNotice::Fenced { why, pause_error } => {
            emit(
                "fenced",
                json!({"why": why, "pause_error": pause_error,
                       "guest_counter": g.as_ref().map(crate::replica::reported_counter),
                       "guest_running": g.as_ref().map(|g| g.is_running())}),
            );
            ex.set(exit::OWNED);
        }
    })
}

/// The `listening` event (and the warning of a link that detects nothing).
pub(crate) fn announce(
    listener: &SourceListener,
    heartbeat: Option<Duration>,
    keepalive: &KeepaliveSpec,
    auth: Value,
) {
    emit(
        "listening",
        json!({"addr": listener.local_addr().to_string(),
               "heartbeat_us": heartbeat.map(us),
               "keepalive": keepalive_json(Some(&keepalive
                   .resolve(&SystemDefaults::read_or_linux()))),
               "auth": auth}),
    );
    if !keepalive.enabled && heartbeat.is_none() {
        let message = "keepalive is off and no --heartbeat is set: backups can only see this \
                       process exit (EOF), never a dead host or a cut link";
        warn!("{message}");
        emit(
            "warning",
            json!({"what": "no-detection", "message": message}),
        );
    }
}

/// SIGTERM/SIGINT: stand the backups down; SIGUSR1: hand off; SIGHUP: ignored.
pub(crate) fn on_signal(kind: SignalKind, handle: &SourceHandle, pause_name: Option<&str>) {
    match kind {
        SignalKind::Stop => {
            handle.stand_down();
        }
        SignalKind::Handoff => {
            emit("handoff-requested", json!({"pause": pause_name}));
            // The pause runs off the loop; HANDOFF follows only once it is confirmed.
            handle.begin_handoff();
        }
        SignalKind::Hangup => signal_ignored(),
    }
}

/// The VMM child (`-- CMD`) and/or the QEMU health watch (`--qmp`), if asked for, and the exit
/// code it sets when the VMM is gone or was killed as unhealthy.
pub(crate) fn watch_vmm(
    vmm: &[String],
    qmp: Option<PathBuf>,
    health_interval: Duration,
) -> Result<(Option<VmmWatch>, Exit), Failure> {
    let vmm_exit = Exit::default();
    let vx = vmm_exit.clone();
    let watch = if vmm.is_empty() && qmp.is_none() {
        None
    } else {
        let watch = VmmWatch::start(
            vmm,
            qmp,
            health_interval,
            Box::new(move |end| match end {
                VmmEnd::Exited(status) => {
                    emit(
                        "vmm-exited",
                        json!({"code": status.code(), "signal": status.signal()}),
                    );
                    vx.set(exit::VMM_EXITED);
                }
                // Killed: its guest is gone, the pair may go (at exit). Not killed: it may
                // resume; the pair stays held and nothing else starts (safe, not live).
                VmmEnd::Unhealthy { why, killed } => {
                    emit("vmm-unhealthy", json!({"why": why, "killed": killed}));
                    if killed {
                        emit(
                            "fenced",
                            json!({"why": format!("the VMM was unhealthy and was killed: {why}"),
                                   "pause_error": null, "guest_counter": null,
                                   "guest_running": false}),
                        );
                        vx.set(exit::OWNED);
                    } else {
                        error!("the VMM is unhealthy and could not be killed: holding the pair");
                    }
                }
            }),
        )?;
        if let Some(pid) = watch.child_pid() {
            emit("vmm-started", json!({"pid": pid, "argv": vmm}));
        }
        Some(watch)
    };
    Ok((watch, vmm_exit))
}

/// Takes the pair at start; exit 4 naming the holder if someone else has it.
fn own_pair(s: &ArbiterSession, pair: &str) -> Result<u64, Failure> {
    let timeout = s.ttl() + Duration::from_secs(2);
    match s.acquire_blocking(pair, timeout) {
        Ok(Acquire::Won { epoch }) => {
            emit(
                "owner",
                json!({"epoch": epoch, "ttl_ms": s.ttl().as_millis() as u64,
                       "holder": s.holder(), "arbiter": s.describe()}),
            );
            Ok(epoch)
        }
        Ok(Acquire::Held { owner, ttl_left }) => Err(Failure {
            code: exit::OWNED,
            message: format!(
                "pair {pair} is owned by {owner}{}: refusing to run a second copy",
                ttl_left.map_or(String::new(), |t| format!(", lease {t:?} left"))
            ),
        }),
        Ok(Acquire::HandoverPending { to }) => Err(Failure {
            code: exit::OWNED,
            message: format!("pair {pair} is being handed over to {to}: refusing to run"),
        }),
        Err(e) => Err(Failure::runtime(format!(
            "cannot acquire pair {pair} from the arbiter: {e}"
        ))),
    }
}

/// SIGHUP reloads nothing yet; it must never end the process (a failover).
pub fn signal_ignored() {
    warn!("SIGHUP ignored: there is no configuration to reload");
    emit(
        "signal-ignored",
        json!({"signal": "SIGHUP", "why": "nothing to reload"}),
    );
}
