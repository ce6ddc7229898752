// SPDX-License-Identifier: Apache-2.0
//! Bad peers: garbage, wrong ids and versions, oversized frames, stalled handshakes. None of them
//! may cause a takeover or disturb a real backup.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use vmm_takeover_core::auth::{
    BackupHandshake, HandshakeFailure, OsEntropy, Reader, SourceHandshake, WelcomeInfo,
};
use vmm_takeover_core::protocol::{Frame, FrameReader, ProtocolError, RejectCode};

/// A version 2 HELLO for `pair` with the test key (and a fresh nonce).
fn hello(pair: &str) -> Vec<u8> {
    BackupHandshake::start(
        &test_credentials(),
        pair,
        "",
        &mut OsEntropy::new().unwrap(),
    )
    .1
}

/// `frame` sealed in a session of its own (a handshake run in memory with the test key): a
/// well-formed version 2 frame of a kind that is only ever sent after the handshake.
fn sealed(frame: &Frame) -> Vec<u8> {
    let creds = test_credentials();
    let rng = &mut OsEntropy::new().unwrap();
    let (backup, hello) = BackupHandshake::start(&creds, "elsewhere", "", rng);
    let info = WelcomeInfo {
        heartbeat: None,
        node: String::new(),
        fence_grace: Duration::ZERO,
    };
    let (awaiting, welcome) = SourceHandshake::on_hello(&creds, "elsewhere", &hello, rng)
        .unwrap()
        .welcome(&info);
    let auth = backup.on_welcome(&welcome).unwrap().auth;
    awaiting.on_auth(&auth).unwrap().session.seal(frame)
}

/// Sends `bytes` to the source and returns what it answered before closing.
fn poke(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The text of the REJECT `answer` starts with: version 2, or version 1 framing when the source
/// answers a version 1 peer (so that it can read it).
fn reject_reason(answer: &[u8]) -> String {
    if answer.get(4) == Some(&1) {
        let mut r = FrameReader::new();
        r.push(answer);
        match r.next_frame() {
            Ok(Some(Frame::Reject { reason, .. })) => reason,
            other => panic!("expected a version 1 REJECT, got {other:?} from {answer:02x?}"),
        }
    } else {
        reject_of(answer).1
    }
}

#[test]
fn bad_clients_are_rejected_and_a_real_backup_keeps_working() {
    let dir = TempDir::new("neg");
    let hook_file = dir.path("hook");
    let (source, mut backup, addr) = armed_pair(
        "vm-neg",
        &["--keepalive", "1:1:2"],
        &["--on-takeover", &record_hook(&hook_file)],
    );
    let addr = addr.to_string();

    let mut wrong_version = hello("vm-neg");
    wrong_version[4] = 3;
    let version_1 = Frame::Hello {
        pair_id: "vm-neg".into(),
        node: String::new(),
        auth_tag: vec![],
    }
    .encode();
    let mut oversized = hello("vm-neg");
    oversized[6..8].copy_from_slice(&4000u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"GET / HTTP/1.0\r\n\r\n".to_vec(), "bad magic"),
        (
            "wrong version",
            wrong_version,
            "peer speaks protocol version 3",
        ),
        // A version 1 backup is told in version 1 framing, so that it can read why and give up.
        ("version 1", version_1, "peer speaks protocol version 1"),
        ("oversized", oversized, "oversized frame"),
        (
            "frame out of place",
            sealed(&Frame::StandDown),
            "unexpected STAND_DOWN",
        ),
    ];
    for (what, bytes, want) in cases {
        let answer = poke(&addr, &bytes);
        let reason = reject_reason(&answer);
        assert!(reason.contains(want), "{what}: REJECT says {reason:?}");
        // A wrong client learns nothing about what the source serves.
        assert!(
            !reason.contains("vm-neg"),
            "{what}: REJECT names the pair: {reason:?}"
        );
        let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
        assert!(ev["why"].as_str().unwrap().contains(want), "{what}: {ev}");
    }
    // A wrong pair id is not even told so (version 2): the source answers with a WELCOME whose
    // MAC no key verifies, like any WELCOME to a backup without its key. The client cannot
    // verify it and hangs up, as a real backup does; only the source's own report says why.
    let mut s = TcpStream::connect(&addr).unwrap();
    match fake_backup_handshake(&mut s, "vm-other") {
        Err(HandshakeFailure::Protocol(ProtocolError::WelcomeNotAuthentic { .. })) => {}
        Err(e) => panic!("wrong pair id: {e}"),
        Ok(_) => panic!("wrong pair id: the WELCOME verified"),
    }
    drop(s);
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    let why = ev["why"].as_str().unwrap();
    assert!(
        why.contains("\"vm-other\", which this source does not serve"),
        "wrong pair id: {ev}"
    );
    // A client that connects and says nothing is dropped after the handshake timeout.
    let silent = TcpStream::connect(&addr).unwrap();
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    assert!(
        ev["why"]
            .as_str()
            .unwrap()
            .contains("no complete handshake within"),
        "{ev}"
    );
    drop(silent);

    assert_eq!(source.count("backup-lost"), 0);
    assert_eq!(backup.count("takeover"), 0);
    assert!(backup.running());
    // The real backup is still armed on the same source: a crash is still taken over.
    source.signal(libc::SIGKILL);
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "peer-closed"
    );
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(hook_lines(&hook_file).len(), 1);
}

/// A fake source: accepts three connections and runs `script(n, stream)` on the `n`th, then
/// closes it.
fn fake_source<F>(script: F) -> (String, std::thread::JoinHandle<usize>)
where
    F: Fn(usize, &mut TcpStream) + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let mut served = 0;
        for s in l.incoming().take(3) {
            let mut s = s.unwrap();
            s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
            script(served, &mut s);
            served += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    });
    (addr, h)
}

/// Runs a backup (pair `vm-fake`) against a fake source running `script` on each connection: the
/// backup must retry with a reason containing `expect_in_why`, arm only if `arms` (a valid
/// WELCOME came first), and never take over.
fn run_against_fake<F>(script: F, expect_in_why: &str, arms: bool)
where
    F: Fn(usize, &mut TcpStream) + Send + 'static,
{
    let dir = TempDir::new("fake");
    let hook_file = dir.path("hook");
    let (addr, server) = fake_source(script);
    let mut backup = start_backup(
        "backup",
        &addr,
        "vm-fake",
        &["--on-takeover", &record_hook(&hook_file)],
    );
    let r = backup.wait_event("retrying", EVENT_TIMEOUT);
    assert!(
        r["why"].as_str().unwrap().contains(expect_in_why),
        "retry reason {r} lacks {expect_in_why:?}"
    );
    // It keeps retrying against the same address.
    backup.wait_event("retrying", EVENT_TIMEOUT);
    assert_eq!(server.join().unwrap(), 3);
    backup.signal(libc::SIGTERM);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(backup.count("takeover"), 0, "{:?}", backup.event_names());
    assert_eq!(
        backup.count("armed") > 0,
        arms,
        "{:?}",
        backup.event_names()
    );
    assert!(hook_lines(&hook_file).is_empty());
}

/// Reads the backup's HELLO on `s` and returns the handshake, for a fake source to answer.
fn hello_from_backup(s: &mut TcpStream) -> SourceHandshake {
    fake_source_hello(s, "vm-fake", &mut Reader::new())
}

#[test]
fn fake_source_sending_garbage_never_causes_takeover() {
    run_against_fake(
        |_, s| {
            hello_from_backup(s);
            s.write_all(b"\x00\xffgarbage").unwrap();
        },
        "bad magic",
        false,
    );
}

/// A busy source's REJECT (authenticated: it answers this backup's HELLO with the key) is a
/// refusal that heals by waiting.
#[test]
fn fake_source_rejecting_as_busy_is_retried() {
    run_against_fake(
        |_, s| {
            let hs = hello_from_backup(s);
            s.write_all(&hs.reject(RejectCode::Busy, "go away"))
                .unwrap();
        },
        "rejected by the source (busy): go away",
        false,
    );
}

/// A wrong pair id cannot heal by waiting: the backup says so and exits 5 (unless asked to retry).
///
/// In version 2 the source does not tell a wrong pair apart (its WELCOME just fails to verify),
/// so the backup's reason is the WELCOME that failed authentication, which names the pair it
/// asked for among the possible causes; it is permanent because the backup never armed.
#[test]
fn a_wrong_pair_id_ends_the_backup_with_exit_5() {
    let (source, addr) = start_source("source", "vm-right", &[]);
    let mut backup = start_backup("backup", addr, "vm-wrong", &[]);
    let r = backup.wait_event("rejected", EVENT_TIMEOUT);
    let why = r["why"].as_str().unwrap();
    assert!(
        why.contains("WELCOME failed authentication")
            && why.contains("another pair than \"vm-wrong\""),
        "{r}"
    );
    assert!(!r["why"].as_str().unwrap().contains("vm-right"), "{r}");
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(5));
    assert_eq!(backup.count("takeover"), 0);
    drop(source);

    let (_source, addr) = start_source("source", "vm-right", &[]);
    let mut backup = start_backup("backup", addr, "vm-wrong", &["--retry-rejected"]);
    backup.wait_event("retrying", EVENT_TIMEOUT);
    let again = backup.wait_event("retrying", EVENT_TIMEOUT);
    assert!(again["attempt"].as_u64().unwrap() >= 2, "{again}");
    assert!(backup.running());
}

/// An authentic WELCOME announcing a heartbeat no backup can keep up with is still refused (the
/// backup closes without its AUTH).
#[test]
fn welcome_with_unsafe_heartbeat_interval_is_refused() {
    run_against_fake(
        |_, s| {
            let info = WelcomeInfo {
                fence_grace: Duration::ZERO,
                heartbeat: Some(Duration::ZERO),
                node: String::new(),
            };
            let (_, welcome) = hello_from_backup(s).welcome(&info);
            s.write_all(&welcome).unwrap();
        },
        "heartbeat interval of 0ns",
        false,
    );
}

/// Garbage on a link armed with an authentic WELCOME (and the backup's AUTH accepted) drops the
/// link, never takes over.
#[test]
fn armed_link_with_garbage_after_welcome_retries_not_takes_over() {
    run_against_fake(
        |_, s| {
            let info = WelcomeInfo {
                fence_grace: Duration::ZERO,
                heartbeat: None,
                node: String::new(),
            };
            fake_source_handshake(s, "vm-fake", &info);
            s.write_all(b"garbage").unwrap();
        },
        "bad magic",
        true,
    );
}
