// SPDX-License-Identifier: Apache-2.0
//! Bad peers: garbage, wrong ids and versions, oversized frames, stalled handshakes. None of them
//! may cause a takeover or disturb a real backup.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use vmm_takeover_core::protocol::{Frame, FrameReader, RejectCode};

fn hello(pair: &str) -> Vec<u8> {
    Frame::Hello {
        pair_id: pair.into(),
        node: String::new(),
        auth_tag: vec![],
    }
    .encode()
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

fn reject_reason(answer: &[u8]) -> String {
    let mut r = FrameReader::new();
    r.push(answer);
    match r.next_frame() {
        Ok(Some(Frame::Reject { reason, .. })) => reason,
        other => panic!("expected REJECT, got {other:?} from {answer:02x?}"),
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
    wrong_version[4] = 2;
    let mut oversized = hello("vm-neg");
    oversized[6..8].copy_from_slice(&4000u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"GET / HTTP/1.0\r\n\r\n".to_vec(), "bad magic"),
        ("wrong pair id", hello("vm-other"), "pair id mismatch"),
        (
            "wrong version",
            wrong_version,
            "unsupported protocol version 2",
        ),
        ("oversized", oversized, "oversized frame"),
        (
            "frame out of place",
            Frame::StandDown.encode(),
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
    // A client that connects and says nothing is dropped after the handshake timeout.
    let silent = TcpStream::connect(&addr).unwrap();
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    assert!(
        ev["why"].as_str().unwrap().contains("no HELLO within"),
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

/// A fake source: accepts connections and answers each with `answer(n)`, then closes.
fn fake_source<F>(answer: F) -> (String, std::thread::JoinHandle<usize>)
where
    F: Fn(usize) -> Vec<u8> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let mut served = 0;
        for s in l.incoming().take(3) {
            let mut s = s.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&answer(served));
            served += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    });
    (addr, h)
}

/// Runs a backup against a fake source answering with `answer`: the backup must retry with a
/// reason containing `expect_in_why`, arm only if `arms` (a valid WELCOME came first), and never
/// take over.
fn run_against_fake<F>(answer: F, expect_in_why: &str, arms: bool)
where
    F: Fn(usize) -> Vec<u8> + Send + 'static,
{
    let dir = TempDir::new("fake");
    let hook_file = dir.path("hook");
    let (addr, server) = fake_source(answer);
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

#[test]
fn fake_source_sending_garbage_never_causes_takeover() {
    run_against_fake(|_| b"\x00\xffgarbage".to_vec(), "bad magic", false);
}

#[test]
fn fake_source_rejecting_as_busy_is_retried() {
    run_against_fake(
        |_| {
            Frame::Reject {
                code: RejectCode::Busy,
                reason: "go away".into(),
            }
            .encode()
        },
        "rejected by the source (busy): go away",
        false,
    );
}

/// A wrong pair id cannot heal by waiting: the backup says so and exits 5 (unless asked to retry).
#[test]
fn a_wrong_pair_id_ends_the_backup_with_exit_5() {
    let (source, addr) = start_source("source", "vm-right", &[]);
    let mut backup = start_backup("backup", addr, "vm-wrong", &[]);
    let r = backup.wait_event("rejected", EVENT_TIMEOUT);
    assert!(r["why"].as_str().unwrap().contains("pair-mismatch"), "{r}");
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

#[test]
fn welcome_with_unsafe_heartbeat_interval_is_refused() {
    run_against_fake(
        |_| {
            Frame::Welcome {
                fence_grace: Duration::ZERO,
                heartbeat: Some(Duration::ZERO),
                node: String::new(),
            }
            .encode()
        },
        "heartbeat interval of 0ns",
        false,
    );
}

#[test]
fn armed_link_with_garbage_after_welcome_retries_not_takes_over() {
    run_against_fake(
        |_| {
            let mut b = Frame::Welcome {
                fence_grace: Duration::ZERO,
                heartbeat: None,
                node: String::new(),
            }
            .encode();
            b.extend_from_slice(b"garbage");
            b
        },
        "bad magic",
        true,
    );
}
