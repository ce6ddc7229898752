// SPDX-License-Identifier: Apache-2.0
//! The subscribers in one `EventManager`, as a VMM embeds them: real sockets on loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use event_manager::{EventManager, SubscriberOps};
use vmm_takeover_core::auth::{BackupHandshake, HandshakeFailure, OsEntropy, Reader};
use vmm_takeover_core::link::backup::{Outcome, Phase};
use vmm_takeover_core::protocol::{Frame, RejectCode};
use vmm_takeover_core::vmm_keepalive::{KeepaliveSpec, UserTimeout};
use vmm_takeover_core::{
    BackupConfig, BackupMonitor, SourceConfig, SourceListener, TakeoverReason,
};

#[test]
fn stand_down_in_process_runs_no_hook() {
    let hook = Counting::default();
    let mut p = armed_pair(hook.clone(), None, |_| {}, |_| {});
    assert!(p.source.stand_down());
    p.notices.wait(Some(&mut p.em), "bak: stand-down");
    // The backup closed its side: the stop is confirmed, not just sent.
    assert_eq!(
        p.notices.wait(Some(&mut p.em), "src: stood-down"),
        "src: stood-down 1/1"
    );
    assert_eq!(hook.calls(), 0);
}

#[test]
fn dropping_the_source_subscriber_takes_over_once() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    let id = em.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(src)));
    let hook = Counting::default();
    let m = add(&mut em, backup(&notices, addr, hook.clone(), |_| {}));
    // The backup arms on the WELCOME, as it sends its AUTH; the source joins it once it has read
    // that AUTH. Dropped before then, the source's socket would close with the AUTH unread, which
    // sends a reset (a takeover too, but for "reset"): this test is about a clean close.
    notices.wait_all(Some(&mut em), &["bak: armed", "src: joined"]);
    // The source VMM vanishes: its subscriber and sockets are dropped without a STAND_DOWN.
    drop(em.remove_subscriber(id).unwrap());
    notices.wait(Some(&mut em), "bak: link-lost peer-closed");
    notices.wait(Some(&mut em), "bak: takeover peer-closed");
    notices.wait(Some(&mut em), "bak: hook-finished Ok(())");
    assert_eq!(hook.calls(), 1);
    let m = m.lock().unwrap();
    assert_eq!(m.state().phase, Phase::Done(Outcome::Started));
    let r = m.record().cloned().unwrap();
    assert_eq!(r.reason, TakeoverReason::PeerClosed);
    assert_eq!(r.pair_id, "pair");
    assert_eq!(r.keepalive.unwrap().bound(), Some(Duration::from_secs(6)));
}

/// The VMM loop keeps serving while `vm_start` takes its time on its own thread.
#[test]
fn a_slow_hook_never_blocks_the_event_loop() {
    let hook_time = Duration::from_millis(1500);
    let slow = move |_: &vmm_takeover_core::TakeoverRecord| {
        std::thread::sleep(hook_time);
        Ok(())
    };
    let mut p = armed_pair(
        slow,
        None,
        |c| c.heartbeat = Some(Duration::from_millis(5)),
        |_| {},
    );
    p.source.begin_handoff();
    p.notices.wait(Some(&mut p.em), "bak: takeover handoff");
    // While the hook sleeps, every turn of the loop returns within its own timeout.
    let t = Instant::now();
    let mut longest = Duration::ZERO;
    while !p.notices.saw("bak: hook-finished") {
        let turn = Instant::now();
        p.notices.run_for(Some(&mut p.em), Duration::from_millis(1));
        longest = longest.max(turn.elapsed());
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
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |c| c.heartbeat = Some(Duration::from_millis(10)));
    let src_loop = LoopThread::spawn(vec![std::sync::Arc::new(std::sync::Mutex::new(src))]);
    let mut em = EventManager::<Sub>::new().unwrap();
    let hook = Counting::default();
    // 100 ms: generous for a loaded machine; a blocked loop stops heartbeats for good.
    let m = add(
        &mut em,
        backup(&notices, addr, hook.clone(), |c| c.heartbeat_misses = 10),
    );
    notices.wait(Some(&mut em), "bak: armed");
    // Healthy for a while: heartbeats keep the deadline away.
    notices.run_for(Some(&mut em), Duration::from_millis(200));
    assert!(m.lock().unwrap().state().armed());
    assert!(m.lock().unwrap().heartbeat_stats().received > 0);
    src_loop.stall(BOUND);
    notices.wait(Some(&mut em), "bak: takeover heartbeat-timeout");
    notices.wait(Some(&mut em), "bak: hook-finished Ok(())");
    assert_eq!(hook.calls(), 1);
}

/// A source refuses a heartbeat interval every backup would refuse in its WELCOME.
#[test]
fn source_refuses_heartbeat_intervals_backups_would_refuse() {
    for hb in [Duration::from_micros(500), Duration::from_secs(61)] {
        let mut cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
        cfg.heartbeat = Some(hb);
        let e = SourceListener::new(cfg, Box::new(|_| {}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1ms..=60s"), "{hb:?}: {e}");
    }
}

/// A keepalive the kernel cannot hold fails when the subscriber is built, naming the limit,
/// instead of failing every accept forever. (The backup sets no `TCP_USER_TIMEOUT`, so the same
/// spec is valid there.)
#[test]
fn a_keepalive_beyond_the_kernels_limits_fails_at_start() {
    let huge = KeepaliveSpec::new(
        Some(KeepaliveSpec::MAX_IDLE),
        Some(KeepaliveSpec::MAX_INTERVAL),
        Some(KeepaliveSpec::MAX_COUNT),
    )
    .unwrap();
    let mut cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
    cfg.keepalive = huge.with_user_timeout(UserTimeout::Auto);
    let e = SourceListener::new(cfg, Box::new(|_| {}))
        .err()
        .expect("accepted a keepalive the kernel refuses")
        .to_string();
    assert!(e.contains("keepalive") && e.contains("2147483647"), "{e}");
    let mut cfg = BackupConfig::new("127.0.0.1:9".parse().unwrap(), "pair");
    cfg.keepalive = huge;
    assert!(BackupMonitor::new(cfg, Box::new(Counting::default()), Box::new(|_| {})).is_ok());
}

/// A wrong pair id cannot heal by waiting: the backup ends with a clear reason (and the source
/// never says which pair it serves).
///
/// In version 2 the source does not even say that the pair is wrong: it answers with a WELCOME
/// whose MAC no key verifies (see `SourceHandshake`), so the backup's reason is the WELCOME that
/// failed authentication, naming the pair it asked for as a possible cause.
#[test]
fn a_wrong_pair_id_ends_the_backup() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |c| c.pair_id = "secret-pair".into());
    add(&mut em, src);
    let hook = Counting::default();
    let m = add(
        &mut em,
        backup(&notices, addr, hook.clone(), |c| c.pair_id = "other".into()),
    );
    let why = notices.wait(Some(&mut em), "bak: rejected");
    assert!(
        why.contains("WELCOME failed authentication")
            && why.contains("another pair than \"other\""),
        "{why}"
    );
    assert!(
        !why.contains("secret-pair"),
        "REJECT names the source's pair: {why}"
    );
    assert_eq!(
        m.lock().unwrap().state().phase,
        Phase::Done(Outcome::Rejected)
    );
    assert_eq!(hook.calls(), 0);

    // Asked to, it keeps retrying instead (with backoff).
    let m = add(
        &mut em,
        backup(&notices, addr, hook.clone(), |c| {
            c.pair_id = "other".into();
            c.retry_rejected = true;
        }),
    );
    notices.wait(Some(&mut em), "bak: retrying");
    notices.wait(Some(&mut em), "bak: retrying");
    assert_eq!(m.lock().unwrap().state().phase, Phase::Watching);
}

/// Reads what `s` (non-blocking) has into `reader`, after turning the source's loop for a moment:
/// the source runs in `em`, on this thread. `false` once the source closed the connection.
fn pump(
    em: &mut EventManager<Sub>,
    notices: &mut Notices,
    s: &mut TcpStream,
    reader: &mut Reader,
) -> bool {
    notices.run_for(Some(em), Duration::from_millis(20));
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => false,
        Ok(n) => {
            reader.push(&buf[..n]);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
        Err(e) => panic!("the source reset the connection: {e}"),
    }
}

/// The next handshake frame (WELCOME or REJECT) the source sends on `s`, driving `em` meanwhile.
fn next_handshake(
    em: &mut EventManager<Sub>,
    notices: &mut Notices,
    s: &mut TcpStream,
    reader: &mut Reader,
) -> Vec<u8> {
    let t = Instant::now();
    loop {
        if let Some(frame) = reader.next_handshake().unwrap() {
            return frame;
        }
        assert!(
            pump(em, notices, s, reader),
            "the source closed before answering"
        );
        assert!(t.elapsed() < BOUND, "no answer within {BOUND:?}");
    }
}

/// A joined peer that sends bytes a backup never sends is told EVICT before the connection
/// ends: an armed backup must never read a bare close from a live source.
///
/// The peer completes the version 2 handshake (HELLO, WELCOME, AUTH) with the source's key, so
/// it is joined when it misbehaves; the EVICT it gets is sealed with its session.
#[test]
fn a_misbehaving_joined_peer_is_evicted_not_dropped() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    add(&mut em, src);
    let mut s = TcpStream::connect(addr).unwrap();
    let (hs, hello) = BackupHandshake::start(
        &test_credentials(),
        "pair",
        "",
        &mut OsEntropy::new().unwrap(),
    );
    s.write_all(&hello).unwrap();
    let mut r = Reader::new();
    let welcome = next_handshake(&mut em, &mut notices, &mut s, &mut r);
    let w = hs
        .on_welcome(&welcome)
        .unwrap_or_else(|e| panic!("the source did not welcome: {e}"));
    let mut session = w.session;
    s.write_all(&w.auth).unwrap();
    notices.wait(Some(&mut em), "src: joined");
    s.write_all(b"garbage!").unwrap();
    notices.wait(Some(&mut em), "src: evicted");
    let mut frames = Vec::new();
    let t = Instant::now();
    // The source's loop must turn for the rest to go out; drive it between reads.
    while pump(&mut em, &mut notices, &mut s, &mut r) {
        while let Some(f) = r
            .next_frame(&mut session)
            .unwrap_or_else(|e| panic!("after {frames:?}: {e}"))
        {
            frames.push(f);
        }
        if frames.iter().any(|f| matches!(f, Frame::Evict { .. })) {
            // Told; now close our side, as a backup would.
            break;
        }
        assert!(t.elapsed() < BOUND, "no EVICT within {BOUND:?}: {frames:?}");
    }
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Evict { .. })),
        "no EVICT before the close: {frames:?}"
    );
}

/// A handshaking peer that says something wrong gets a REJECT with a code it can act on.
///
/// Version 2 REJECTs carry a tag; they are decoded here as a backup decodes them, through its
/// handshake (`on_welcome`). No key can tag this one (nothing was understood), so it is
/// unauthenticated, and the code is for the peer's information only.
#[test]
fn a_bad_hello_gets_a_reject_code() {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (src, addr) = source(&notices, |_| {});
    add(&mut em, src);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    notices.wait(Some(&mut em), "src: rejected");
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let mut r = Reader::new();
    r.push(&bytes);
    let frame = r
        .next_handshake()
        .unwrap_or_else(|e| panic!("{e}: {bytes:02x?}"))
        .unwrap_or_else(|| panic!("no whole frame: {bytes:02x?}"));
    // A keyed backup's handshake, though this peer never sent its HELLO: the REJECT answers
    // no HELLO, so it cannot carry a tag that verifies.
    let (hs, _) = BackupHandshake::start(
        &test_credentials(),
        "pair",
        "",
        &mut OsEntropy::new().unwrap(),
    );
    match hs.on_welcome(&frame) {
        Err(HandshakeFailure::Rejected {
            code,
            authenticated,
            ..
        }) => {
            assert_eq!(code, RejectCode::Malformed);
            assert!(!authenticated);
        }
        other => panic!("expected REJECT, got {other:?}"),
    }
}
