// SPDX-License-Identifier: Apache-2.0
//! The planned handoff as a transaction: paused first, one backup, resumed only when the backup
//! says its copy does not run.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use event_manager::EventManager;

#[test]
fn handoff_pauses_off_the_loop_then_completes_when_the_backup_runs() {
    let pauser = Pauser {
        delay: Duration::from_millis(300),
        ..Pauser::default()
    };
    let hook = Counting::default();
    let mut p = armed_pair(hook.clone(), Some(Box::new(pauser.clone())), |_| {}, |_| {});
    p.source.begin_handoff();
    // A second request while the first runs is refused, not queued.
    p.source.begin_handoff();
    p.notices.wait(Some(&mut p.em), "src: handoff-refused Busy");
    // The loop keeps turning while the pause runs, and nothing is handed off before it ends.
    p.notices
        .run_for(Some(&mut p.em), Duration::from_millis(150));
    assert_eq!(pauser.pauses(), 0);
    assert_eq!(hook.calls(), 0);
    p.notices.wait(Some(&mut p.em), "src: handoff-paused");
    p.notices.wait(Some(&mut p.em), "bak: takeover handoff");
    assert_eq!(pauser.pauses(), 1, "HANDOFF before the pause ended");
    p.notices.wait(Some(&mut p.em), "bak: hook-finished Ok(())");
    p.notices.wait(Some(&mut p.em), "src: handoff-complete");
    assert_eq!(hook.calls(), 1);
    assert_eq!(pauser.resumes(), 0);
}

#[test]
fn handoff_without_an_armed_backup_is_refused_and_the_guest_keeps_running() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let pauser = Pauser::default();
    let (mut src, _) = source(&notices, |_| {});
    src.set_pause_hook(Box::new(pauser.clone()));
    let h = src.handle();
    add(&mut em, src);
    h.begin_handoff();
    notices.wait(Some(&mut em), "src: handoff-refused NoBackup");
    assert_eq!(pauser.pauses(), 0, "paused a guest with nowhere to go");
}

#[test]
fn a_backup_that_fails_to_start_gets_the_source_guest_resumed() {
    let pauser = Pauser::default();
    let mut p = armed_pair(Failing, Some(Box::new(pauser.clone())), |_| {}, |_| {});
    p.source.begin_handoff();
    p.notices.wait(Some(&mut p.em), "bak: hook-finished Err");
    let failed = p.notices.wait(Some(&mut p.em), "src: handoff-failed");
    assert!(
        failed.starts_with("src: handoff-failed backup-start resumed=true"),
        "{failed}"
    );
    assert!(failed.contains("no such VM"), "{failed}");
    assert_eq!((pauser.pauses(), pauser.resumes()), (1, 1));
}

#[test]
fn a_panicking_backup_hook_is_a_failed_start_and_the_source_resumes() {
    let boom = |_: &vmm_takeover_core::TakeoverRecord| -> Result<(), vmm_takeover_core::HookError> {
        panic!("boom")
    };
    let pauser = Pauser::default();
    let mut p = armed_pair(boom, Some(Box::new(pauser.clone())), |_| {}, |_| {});
    p.source.begin_handoff();
    let r = p.notices.wait(Some(&mut p.em), "bak: hook-finished");
    assert!(r.contains("vm-start panicked: boom"), "{r}");
    p.notices.wait(
        Some(&mut p.em),
        "src: handoff-failed backup-start resumed=true",
    );
}

/// The pause hook is never lost: a failed pause leaves it in place, and the next request pauses
/// again (today's alternative — skipping the pause — would hand off a running guest).
#[test]
fn a_failed_pause_keeps_the_hook_and_can_be_retried() {
    let pauser = Pauser::default();
    pauser
        .fail_pauses
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let hook = Counting::default();
    let mut p = armed_pair(hook.clone(), Some(Box::new(pauser.clone())), |_| {}, |_| {});
    p.source.begin_handoff();
    let f = p.notices.wait(Some(&mut p.em), "src: handoff-failed");
    assert!(
        f.starts_with("src: handoff-failed pause resumed=true"),
        "{f}"
    );
    assert_eq!(hook.calls(), 0);
    p.source.begin_handoff();
    p.notices.wait(Some(&mut p.em), "src: handoff-complete");
    assert_eq!((pauser.pauses(), hook.calls()), (1, 1));
}

#[test]
fn handoff_after_a_stand_down_is_refused() {
    let pauser = Pauser::default();
    let mut p = armed_pair(
        Counting::default(),
        Some(Box::new(pauser.clone())),
        |_| {},
        |_| {},
    );
    p.source.stand_down();
    p.notices.wait(Some(&mut p.em), "src: stood-down");
    p.source.begin_handoff();
    p.notices
        .wait(Some(&mut p.em), "src: handoff-refused Finished");
    assert_eq!(pauser.pauses(), 0);
}

/// When the backup cannot say whether its copy runs, the source never resumes on a guess.
#[test]
fn a_backup_start_that_times_out_leaves_the_source_paused() {
    let pauser = Pauser::default();
    let hanging = Hanging::default();
    let mut p = armed_pair(
        hanging.clone(),
        Some(Box::new(pauser.clone())),
        |_| {},
        |c| c.hook_timeout = Duration::from_millis(300),
    );
    p.source.begin_handoff();
    p.notices.wait(Some(&mut p.em), "bak: hook-timeout");
    assert!(hanging.aborted.load(std::sync::atomic::Ordering::SeqCst));
    p.notices.wait(Some(&mut p.em), "src: handoff-uncertain");
    assert_eq!((pauser.pauses(), pauser.resumes()), (1, 0));
}

/// Two backups: exactly one is handed the guest, the other is stood down before it.
#[test]
fn with_two_backups_exactly_one_takes_over() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    let h = src.handle();
    add(&mut em, src);
    let (a, b) = (Counting::default(), Counting::default());
    let first: Arc<Mutex<_>> = add(&mut em, backup(&notices, addr, a.clone(), |_| {}));
    notices.wait(Some(&mut em), "src: joined");
    add(&mut em, backup(&notices, addr, b.clone(), |_| {}));
    notices.wait(Some(&mut em), "src: joined");
    h.begin_handoff();
    assert_eq!(
        notices.wait(Some(&mut em), "src: handoff-sent"),
        "src: handoff-sent others=1"
    );
    notices.wait(Some(&mut em), "bak: stand-down");
    notices.wait(Some(&mut em), "src: handoff-complete");
    notices.run_for(Some(&mut em), Duration::from_millis(200));
    assert_eq!(a.calls() + b.calls(), 1);
    // The backup armed longest is the one chosen.
    assert_eq!(a.calls(), 1);
    assert!(first.lock().unwrap().record().is_some());
}
