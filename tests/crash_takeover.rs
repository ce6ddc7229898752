// SPDX-License-Identifier: Apache-2.0
//! A source that dies is taken over: real processes on loopback, real signals.

mod common;

use common::*;

#[test]
fn sigkill_of_source_takes_over_once_with_peer_closed() {
    let dir = TempDir::new("kill");
    let hook_file = dir.path("hook");
    let (source, mut backup, _) =
        armed_pair("vm-kill", &[], &["--on-takeover", &record_hook(&hook_file)]);
    assert!(
        hook_lines(&hook_file).is_empty(),
        "hook ran before the kill"
    );

    let killed_at = now_us();
    source.signal(libc::SIGKILL);
    let ev = backup.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(ev["reason"], "peer-closed");
    assert_eq!(ev["pair_id"], "vm-kill");
    let detected = ev["detected_at_unix_us"].as_u64().unwrap();
    assert!(detected >= killed_at, "takeover detected before the kill");
    println!(
        "kill -> takeover detection latency: {} us",
        detected - killed_at
    );
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(hook_lines(&hook_file), vec!["peer-closed vm-kill"]);
    assert_eq!(backup.count("takeover"), 1);
}

#[test]
fn failing_hook_exits_3() {
    let (source, addr) = start_source("source", "vm-hookfail", &[]);
    let mut backup = start_backup("backup", addr, "vm-hookfail", &["--on-takeover", "exit 7"]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    // Killed before it read the backup's AUTH, the source's kernel would answer with a RST
    // (`reset`): the source must have the backup joined first for the EOF this test expects.
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "peer-closed"
    );
    let failed = backup.wait_event("vm-start-failed", EVENT_TIMEOUT);
    assert!(
        failed["error"].as_str().unwrap().contains("exit status 7"),
        "{failed}"
    );
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(3));
}

#[test]
fn ipv6_loopback_link_works_end_to_end() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip("no IPv6 loopback on this machine");
        return;
    }
    let source = Proc::spawn(
        "source",
        &["source", "--listen", "[::1]:0", "--pair-id", "vm-v6"],
    );
    let addr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(addr.starts_with("[::1]:"), "{addr}");
    let mut backup = start_backup("backup", &addr, "vm-v6", &[]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    // As above: joined on the source's side too, so that the kill is an EOF, not a RST.
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "peer-closed"
    );
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
}
