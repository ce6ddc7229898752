// SPDX-License-Identifier: Apache-2.0
//! What must never cause a takeover, and hooks that never return.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use event_manager::{EventManager, SubscriberOps};
use vmm_takeover_core::link::backup::{Outcome, Phase};
use vmm_takeover_core::vmm_keepalive::KeepaliveSpec;

/// A backup whose loop stalls while its receive buffer is full is the backup's problem: the
/// source keeps its connection (heartbeats skipped, not queued; `TCP_USER_TIMEOUT` lifted so the
/// kernel does not abort a live peer) and, once the backup reads again, it carries on. A
/// STAND_DOWN sent while it is stalled still arrives whole. On the old code the source dropped
/// the connection (short write, then the kernel's zero-window abort) and the backup, reading the
/// reset, started a second copy of a live source's guest.
#[test]
fn a_stalled_backup_with_a_full_buffer_never_takes_over() {
    let mut notices = Notices::default();
    // 1:1:2 gives TCP_USER_TIMEOUT = 3 s: the stall below outlasts it.
    let ka = KeepaliveSpec::new(
        Some(Duration::from_secs(1)),
        Some(Duration::from_secs(1)),
        Some(2),
    )
    .unwrap();
    let (src, addr) = source(&notices, |c| {
        c.heartbeat = Some(Duration::from_millis(5));
        c.keepalive = ka;
    });
    let src_handle = src.handle();
    let src_loop = LoopThread::spawn(vec![Arc::new(Mutex::new(src))]);
    let hook = Counting::default();
    let bak = backup(&notices, addr, hook.clone(), |c| {
        c.keepalive = ka;
        c.recv_buffer = Some(4096);
        // Generous, so that only a false verdict could fire (not the stall's own lateness).
        c.heartbeat_misses = 200;
    });
    let bak = Arc::new(Mutex::new(bak));
    let bak_loop = LoopThread::spawn(vec![bak.clone()]);
    notices.wait(None, "bak: armed");

    let stall = Duration::from_secs(10);
    let t = Instant::now();
    bak_loop.stall(stall);
    notices.wait(None, "src: slow");
    notices.run_for(
        None,
        stall.saturating_sub(t.elapsed()) + Duration::from_millis(500),
    );
    // Either the link lived through it (the source saw the backup read again), or one of the
    // kernels dropped it while the backup's receive queue overflowed: then the backup, knowing
    // its own loop stalled, redialled before judging, found the source alive and armed again.
    let deadline = Instant::now() + BOUND;
    let rearmed = |n: &Notices| n.seen.iter().filter(|s| *s == "bak: armed").count() >= 2;
    while !notices.saw("src: caught-up") && !rearmed(&notices) {
        assert!(
            Instant::now() < deadline,
            "no recovery: {:#?}",
            notices.seen
        );
        notices.run_for(None, Duration::from_millis(50));
    }
    notices.run_for(None, Duration::from_millis(300));
    assert!(!notices.saw("bak: link-lost"), "{:#?}", notices.seen);
    assert!(!notices.saw("bak: takeover"), "{:#?}", notices.seen);
    let before = bak.lock().unwrap().heartbeat_stats().received;
    notices.run_for(None, Duration::from_millis(300));
    assert!(bak.lock().unwrap().state().armed(), "{:#?}", notices.seen);
    assert!(
        bak.lock().unwrap().heartbeat_stats().received > before,
        "no heartbeats after the stall: {:#?}",
        notices.seen
    );

    // Stalled again, full again; the source stands down meanwhile.
    let t = Instant::now();
    bak_loop.stall(Duration::from_secs(3));
    notices.wait(None, "src: slow");
    src_handle.stand_down();
    notices.wait(None, "bak: stand-down");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the backup was not stalled"
    );
    assert_eq!(hook.calls(), 0, "{:#?}", notices.seen);
    assert!(!notices.saw("bak: link-lost"));
    drop(src_loop);
}

/// A `vm_start` that never returns ends as `hook-timeout` after its deadline, and is aborted.
#[test]
fn a_hook_that_never_returns_times_out_and_is_aborted() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    let id = em.add_subscriber(Arc::new(Mutex::new(src)));
    let hanging = Hanging::default();
    let m = add(
        &mut em,
        backup(&notices, addr, hanging.clone(), |c| {
            c.hook_timeout = Duration::from_millis(400);
        }),
    );
    notices.wait(Some(&mut em), "bak: armed");
    // The backup arms on the WELCOME; the source joins it on the AUTH that follows. Dropped
    // before it read the AUTH, the source's socket would close with a reset, not an EOF.
    notices.wait(Some(&mut em), "src: joined");
    drop(em.remove_subscriber(id).unwrap());
    notices.wait(Some(&mut em), "bak: takeover peer-closed");
    let t = Instant::now();
    notices.wait(Some(&mut em), "bak: hook-timeout");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        hanging.aborted.load(Ordering::SeqCst),
        "the hook was not aborted"
    );
    assert_eq!(
        m.lock().unwrap().state().phase,
        Phase::Done(Outcome::StartTimedOut)
    );
    // Its late result changes nothing.
    notices.run_for(Some(&mut em), Duration::from_millis(100));
    assert!(!notices.saw("bak: hook-finished"));
}

/// Stopping the backup while `vm_start` runs aborts the hook and says so.
#[test]
fn a_stop_during_the_hook_aborts_it_and_reports_it() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    let id = em.add_subscriber(Arc::new(Mutex::new(src)));
    let hanging = Hanging::default();
    let bak = backup(&notices, addr, hanging.clone(), |_| {});
    let h = bak.handle();
    add(&mut em, bak);
    notices.wait(Some(&mut em), "bak: armed");
    drop(em.remove_subscriber(id).unwrap());
    notices.wait(Some(&mut em), "bak: takeover");
    h.stop();
    notices.wait(Some(&mut em), "bak: stopped aborted=true");
    assert!(hanging.aborted.load(Ordering::SeqCst));
}

/// A source announcing 1 ms heartbeats cannot push the backup's deadline below its local floor.
#[test]
fn the_heartbeat_deadline_has_a_local_floor() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |c| c.heartbeat = Some(Duration::from_millis(1)));
    add(&mut em, src);
    let m = add(&mut em, backup(&notices, addr, Counting::default(), |_| {}));
    notices.wait(Some(&mut em), "bak: armed");
    assert_eq!(
        m.lock().unwrap().deadline(),
        Some(Duration::from_millis(20))
    );
}
