// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover`: run the source or backup side of a heartbeat link, or the demo.
//!
//! Thin by design: parses flags, wires the library's subscribers into an `EventManager`, and prints
//! lifecycle events as JSON lines on stdout. Logs go to stderr (`RUST_LOG`).

mod cli;
mod demo;
mod events;
mod guest_report;
mod hooks;
mod output;
mod signals;

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use clap::Parser;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use log::error;
use serde_json::json;
use vmm_takeover_core::{
    BackupConfig, BackupMonitor, BackupNotice, SourceConfig, SourceListener, SourceNotice,
};

use cli::{BackupArgs, Cli, Command, SourceArgs};
use events::{emit, unix_us};
use guest_report::GuestReport;
use signals::{SignalKind, Signals};

type Subscriber = Rc<RefCell<dyn MutEventSubscriber>>;

/// Exit code when the takeover hook failed.
const EXIT_HOOK_FAILED: u8 = 3;

fn main() -> ExitCode {
    output::init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Source(a) => run_source(a),
        Command::Backup(a) => run_backup(a),
        Command::Demo(a) => demo::run(a).map(|()| 0),
    };
    let code = match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            error!("{e}");
            eprintln!("vmm-takeover: {e}");
            ExitCode::from(1)
        }
    };
    output::flush(output::EXIT_FLUSH);
    code
}

/// The exit code an observer asks for. Shared with the observers, which must be `Send`.
#[derive(Clone, Default)]
struct Exit(Arc<Mutex<Option<u8>>>);

impl Exit {
    fn set(&self, code: u8) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
    }

    fn get(&self) -> Option<u8> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the loop until an observer sets the exit code.
fn run_loop(em: &mut EventManager<Subscriber>, exit: &Exit) -> Result<u8, String> {
    loop {
        if let Some(code) = exit.get() {
            return Ok(code);
        }
        em.run().map_err(|e| format!("event loop: {e:?}"))?;
    }
}

/// Reports a local guest every 500 ms, so its counter can be watched from outside.
fn add_guest_report(
    em: &mut EventManager<Subscriber>,
    guest: Option<vmm_takeover_guest::StandbyGuest>,
) -> Result<(), String> {
    if let Some(g) = guest {
        let r = GuestReport::new(g, std::time::Duration::from_millis(500))
            .map_err(|e| format!("guest report timer: {e}"))?;
        em.add_subscriber(Rc::new(RefCell::new(r)));
    }
    Ok(())
}

fn run_source(a: SourceArgs) -> Result<u8, String> {
    let mut cfg = SourceConfig::new(a.listen, a.pair_id.clone());
    cfg.keepalive = a.keepalive.spec();
    cfg.heartbeat = a.heartbeat;
    let (pause, guest) = hooks::pause_hook(&a)?;
    let exit = Exit::default();
    let (ex, g) = (exit.clone(), guest.clone());
    let mut listener = SourceListener::new(
        cfg,
        Box::new(move |n: &SourceNotice| match n {
            SourceNotice::BackupJoined { peer, keepalive } => emit(
                "backup-joined",
                json!({"peer": peer.to_string(), "keepalive": keepalive.map(|k| k.to_string())}),
            ),
            SourceNotice::BackupLost { peer, why } => {
                emit("backup-lost", json!({"peer": peer.to_string(), "why": why}))
            }
            SourceNotice::BackupRejected { peer, why } => emit(
                "backup-rejected",
                json!({"peer": peer.to_string(), "why": why}),
            ),
            SourceNotice::HandoffSent { backups } => {
                if let Some(g) = &g {
                    // Evidence for the record: the local guest was paused before HANDOFF left.
                    GuestReport::report(g);
                }
                emit("handoff-sent", json!({"backups": backups}));
                ex.set(0);
            }
            // The source keeps serving; SIGUSR1 may try again.
            SourceNotice::HandoffFailed { error } => {
                emit("handoff-failed", json!({"error": error}))
            }
        }),
    )
    .map_err(|e| e.to_string())?;
    let pause_name = pause.as_ref().map(|p| p.describe());
    if let Some(p) = pause {
        listener.set_pause_hook(p);
    }
    emit(
        "listening",
        json!({"addr": listener.local_addr().to_string(), "pair_id": a.pair_id,
               "heartbeat_us": a.heartbeat.map(|h| h.as_micros() as u64)}),
    );
    let source = Rc::new(RefCell::new(listener));
    let mut em = EventManager::<Subscriber>::new().map_err(|e| format!("{e:?}"))?;
    em.add_subscriber(source.clone());
    add_guest_report(&mut em, guest)?;

    let ex = exit.clone();
    let sigs = Signals::install(Box::new(move |kind| match kind {
        SignalKind::Stop => {
            let n = source.borrow_mut().stand_down();
            emit("stand-down", json!({"backups": n}));
            ex.set(0);
        }
        SignalKind::Handoff => {
            emit("handoff-requested", json!({"pause": pause_name}));
            // The pause runs off the loop; HANDOFF follows only if it succeeds.
            if let Err(e) = source.borrow_mut().begin_handoff() {
                log::warn!("{e}");
            }
        }
    }))
    .map_err(|e| format!("signals: {e}"))?;
    em.add_subscriber(Rc::new(RefCell::new(sigs)));
    run_loop(&mut em, &exit)
}

fn run_backup(a: BackupArgs) -> Result<u8, String> {
    let mut cfg = BackupConfig::new(a.connect, a.pair_id.clone());
    cfg.keepalive = a.keepalive.spec();
    cfg.heartbeat_misses = a.heartbeat_misses;
    cfg.keepalive_watchdog = !a.kernel_keepalive_only;
    let (hook, guest) = hooks::start_hook(&a)?;
    // A local guest keeps running in this process after the takeover: the backup is now the VMM.
    let keep_running = guest.is_some();
    let g = guest.clone();
    let exit = Exit::default();
    let ex = exit.clone();
    let monitor = BackupMonitor::new(
        cfg,
        hook,
        Box::new(move |n: &BackupNotice| match n {
            BackupNotice::Connecting { addr, attempt } => emit(
                "connecting",
                json!({"addr": addr.to_string(), "attempt": attempt}),
            ),
            BackupNotice::Retrying { why, delay } => emit(
                "retrying",
                json!({"why": why, "delay_us": delay.as_micros() as u64}),
            ),
            BackupNotice::Armed {
                peer,
                keepalive,
                heartbeat,
                deadline,
            } => emit(
                "armed",
                json!({
                    "peer": peer.to_string(),
                    "keepalive": keepalive.map(|k| json!({
                        "enabled": k.enabled,
                        "idle_s": k.idle.as_secs(),
                        "interval_s": k.interval.as_secs(),
                        "count": k.count,
                        "user_timeout_ms": k.user_timeout.map(|u| u.as_millis() as u64),
                        "bound_ms": k.bound().map(|b| b.as_millis() as u64),
                    })),
                    "heartbeat_us": heartbeat.map(|h| h.as_micros() as u64),
                    "deadline_us": deadline.map(|d| d.as_micros() as u64),
                }),
            ),
            BackupNotice::StandDown => {
                emit("stand-down", json!({}));
                ex.set(0);
            }
            BackupNotice::Takeover(r) => emit(
                "takeover",
                json!({
                    "reason": r.reason.as_str(),
                    "pair_id": r.pair_id,
                    "errno": r.errno,
                    "detail": r.detail,
                    "armed_at_unix_us": unix_us(r.armed_at),
                    "detected_at_unix_us": unix_us(r.detected_at),
                }),
            ),
            BackupNotice::HookFinished { result, took } => {
                let took_us = took.as_micros() as u64;
                match result {
                    Ok(()) => {
                        emit(
                            "vm-started",
                            json!({"took_us": took_us,
                                   "guest_counter": g.as_ref().map(|g| g.counter())}),
                        );
                        if !keep_running {
                            ex.set(0);
                        }
                    }
                    Err(e) => {
                        emit("vm-start-failed", json!({"error": e, "took_us": took_us}));
                        ex.set(EXIT_HOOK_FAILED);
                    }
                }
            }
        }),
    )
    .map_err(|e| e.to_string())?;
    let mut em = EventManager::<Subscriber>::new().map_err(|e| format!("{e:?}"))?;
    let monitor = Rc::new(RefCell::new(monitor));
    em.add_subscriber(monitor.clone());
    add_guest_report(&mut em, guest)?;
    let ex = exit.clone();
    // A stopped backup simply leaves (the source sees `backup-lost`), saying how close its
    // heartbeats came to the deadline: the margin against false takeovers.
    let sigs = Signals::install(Box::new(move |kind| {
        if kind == SignalKind::Stop {
            let m = monitor.borrow();
            let st = m.heartbeat_stats();
            emit(
                "stopped",
                json!({"state": format!("{:?}", m.state()), "heartbeats": st.received,
                       "max_gap_us": st.max_gap.as_micros() as u64,
                       "deadline_us": m.deadline().map(|d| d.as_micros() as u64)}),
            );
            ex.set(0)
        }
    }))
    .map_err(|e| format!("signals: {e}"))?;
    em.add_subscriber(Rc::new(RefCell::new(sigs)));
    run_loop(&mut em, &exit)
}
