// SPDX-License-Identifier: Apache-2.0
//! The subscribers in one `EventManager`, as a VMM embeds them: real sockets on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use vmm_takeover_core::{
    BackupConfig, BackupMonitor, BackupNotice, HookError, LinkState, SourceConfig, SourceListener,
    SourceNotice, TakeoverReason, TakeoverRecord,
};

type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Generous bound for anything that should take milliseconds.
const BOUND: Duration = Duration::from_secs(20);

fn source(
    em: &mut EventManager<Sub>,
    heartbeat: Option<Duration>,
) -> (Arc<Mutex<SourceListener>>, SubscriberId) {
    let mut cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
    cfg.heartbeat = heartbeat;
    let s = Arc::new(Mutex::new(
        SourceListener::new(cfg, Box::new(|_: &SourceNotice| {})).unwrap(),
    ));
    let id = em.add_subscriber(s.clone());
    (s, id)
}

/// A backup of the source at `addr` whose notices are forwarded as strings, and whose hook is
/// `hook`.
fn backup<H>(
    em: &mut EventManager<Sub>,
    addr: SocketAddr,
    hook: H,
) -> (Arc<Mutex<BackupMonitor>>, mpsc::Receiver<String>)
where
    H: FnMut(&TakeoverRecord) -> Result<(), HookError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let m = BackupMonitor::new(
        BackupConfig::new(addr, "pair"),
        Box::new(hook),
        Box::new(move |n: &BackupNotice| {
            let s = match n {
                BackupNotice::Armed { .. } => "armed".to_string(),
                BackupNotice::StandDown => "stand-down".to_string(),
                BackupNotice::Takeover(r) => format!("takeover {}", r.reason),
                BackupNotice::HookFinished { result, .. } => format!("hook-finished {result:?}"),
                _ => return,
            };
            let _ = tx.send(s);
        }),
    )
    .unwrap();
    let m = Arc::new(Mutex::new(m));
    em.add_subscriber(m.clone());
    (m, rx)
}

fn addr_of(src: &Arc<Mutex<SourceListener>>) -> SocketAddr {
    src.lock().unwrap().local_addr()
}

/// A hook that only counts its calls.
fn counting_hook() -> (
    Arc<AtomicUsize>,
    impl FnMut(&TakeoverRecord) -> Result<(), HookError> + Send + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    (calls, move |_: &TakeoverRecord| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
}

/// Runs the loop until `rx` yields `want`; panics after `BOUND`.
fn run_until(em: &mut EventManager<Sub>, rx: &mpsc::Receiver<String>, want: &str) {
    let t = Instant::now();
    loop {
        while let Ok(s) = rx.try_recv() {
            if s == want {
                return;
            }
        }
        assert!(t.elapsed() < BOUND, "no {want:?} within {BOUND:?}");
        em.run_with_timeout(50).unwrap();
    }
}

#[test]
fn stand_down_in_process_runs_no_hook() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let (src, _) = source(&mut em, None);
    let (calls, hook) = counting_hook();
    let (m, rx) = backup(&mut em, addr_of(&src), hook);
    run_until(&mut em, &rx, "armed");
    assert_eq!(src.lock().unwrap().stand_down(), 1);
    run_until(&mut em, &rx, "stand-down");
    assert_eq!(m.lock().unwrap().state(), LinkState::StoodDown);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn dropping_the_source_subscriber_takes_over_once() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let (src, id) = source(&mut em, None);
    let (calls, hook) = counting_hook();
    let (m, rx) = backup(&mut em, addr_of(&src), hook);
    run_until(&mut em, &rx, "armed");
    // The source VMM vanishes: its subscriber and sockets are dropped without a STAND_DOWN.
    drop(em.remove_subscriber(id).unwrap());
    drop(src);
    run_until(&mut em, &rx, "takeover peer-closed");
    run_until(&mut em, &rx, "hook-finished Ok(())");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let r = m.lock().unwrap().record().cloned().unwrap();
    assert_eq!(r.reason, TakeoverReason::PeerClosed);
    assert_eq!(r.pair_id, "pair");
    assert!(r.keepalive.unwrap().bound() == Some(Duration::from_secs(6)));
}

/// The VMM loop keeps serving while `vm_start` takes its time on its own thread.
#[test]
fn a_slow_hook_never_blocks_the_event_loop() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let (src, _) = source(&mut em, Some(Duration::from_millis(5)));
    let hook_time = Duration::from_millis(1500);
    let (_m, rx) = backup(&mut em, addr_of(&src), move |_| {
        std::thread::sleep(hook_time);
        Ok(())
    });
    run_until(&mut em, &rx, "armed");
    assert_eq!(src.lock().unwrap().handoff(), 1);
    run_until(&mut em, &rx, "takeover handoff");
    // While the hook sleeps, every turn of the loop returns within its own timeout.
    let t = Instant::now();
    let mut longest = Duration::ZERO;
    let mut finished = false;
    while !finished {
        let turn = Instant::now();
        em.run_with_timeout(10).unwrap();
        longest = longest.max(turn.elapsed());
        finished = rx.try_recv().is_ok_and(|s| s.starts_with("hook-finished"));
        assert!(t.elapsed() < BOUND);
    }
    assert!(t.elapsed() >= hook_time - Duration::from_millis(100));
    assert!(
        longest < hook_time / 2,
        "a loop turn took {longest:?}: the hook blocked the loop"
    );
}

/// A source VMM whose event loop blocks (a stuck device emulation, a deadlock) stops its
/// heartbeats; its kernel still answers keepalive, so only the heartbeat deadline sees it.
#[test]
fn a_blocked_source_loop_is_taken_over_with_heartbeat_timeout() {
    let mut src_cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
    src_cfg.heartbeat = Some(Duration::from_millis(10));
    let src = SourceListener::new(src_cfg, Box::new(|_: &SourceNotice| {})).unwrap();
    let addr = src.local_addr();
    let (block_tx, block_rx) = mpsc::channel::<()>();
    let source_loop = std::thread::spawn(move || {
        let mut em = EventManager::<Sub>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(src)));
        // Serve until told to block, then block the loop without closing anything.
        while block_rx.try_recv().is_err() {
            em.run_with_timeout(5).unwrap();
        }
        let _ = block_rx.recv_timeout(BOUND);
        drop(em);
    });

    let mut em = EventManager::<Sub>::new().unwrap();
    let (calls, hook) = counting_hook();
    let (m, rx) = backup(&mut em, addr, hook);
    run_until(&mut em, &rx, "armed");
    // Healthy for a while: heartbeats keep the deadline away.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(200) {
        em.run_with_timeout(10).unwrap();
    }
    assert_eq!(m.lock().unwrap().state(), LinkState::Armed);
    assert!(m.lock().unwrap().heartbeat_stats().received > 0);
    block_tx.send(()).unwrap();
    run_until(&mut em, &rx, "takeover heartbeat-timeout");
    run_until(&mut em, &rx, "hook-finished Ok(())");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    block_tx.send(()).unwrap();
    source_loop.join().unwrap();
}

/// Planned switchover through the library: the pause hook runs off the loop, then HANDOFF.
#[test]
fn begin_handoff_pauses_off_the_loop_then_hands_off() {
    struct SlowPause(Arc<AtomicUsize>);
    impl vmm_takeover_core::VmPause for SlowPause {
        fn vm_pause(&mut self) -> Result<(), HookError> {
            std::thread::sleep(Duration::from_millis(300));
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }
    let mut em = EventManager::<Sub>::new().unwrap();
    let (src, _) = source(&mut em, None);
    let paused = Arc::new(AtomicUsize::new(0));
    src.lock()
        .unwrap()
        .set_pause_hook(Box::new(SlowPause(paused.clone())));
    let (calls, hook) = counting_hook();
    let (_m, rx) = backup(&mut em, addr_of(&src), hook);
    run_until(&mut em, &rx, "armed");
    src.lock().unwrap().begin_handoff().unwrap();
    // A second request while the first runs is refused, not queued.
    assert!(src.lock().unwrap().begin_handoff().is_err());
    // The loop keeps turning while the pause runs, and nothing is handed off before it ends.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(150) {
        em.run_with_timeout(10).unwrap();
    }
    assert_eq!(paused.load(Ordering::SeqCst), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    run_until(&mut em, &rx, "takeover handoff");
    assert_eq!(
        paused.load(Ordering::SeqCst),
        1,
        "HANDOFF before the pause ended"
    );
    run_until(&mut em, &rx, "hook-finished Ok(())");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_hook_is_reported_as_a_failure() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let (src, _) = source(&mut em, None);
    let (_m, rx) = backup(&mut em, addr_of(&src), |_| panic!("boom"));
    run_until(&mut em, &rx, "armed");
    src.lock().unwrap().handoff();
    run_until(&mut em, &rx, "takeover handoff");
    run_until(&mut em, &rx, "hook-finished Err(\"vm_start panicked\")");
}

/// A source refuses a heartbeat interval every backup would refuse in its WELCOME.
#[test]
fn source_refuses_heartbeat_intervals_backups_would_refuse() {
    for hb in [Duration::from_micros(500), Duration::from_secs(61)] {
        let mut cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
        cfg.heartbeat = Some(hb);
        let e = SourceListener::new(cfg, Box::new(|_: &SourceNotice| {}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1ms..=60s"), "{hb:?}: {e}");
    }
}
