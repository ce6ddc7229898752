// SPDX-License-Identifier: Apache-2.0
//! One source, several backups.

mod common;

use common::*;

#[test]
fn killing_the_source_takes_over_in_both_backups() {
    let dir = TempDir::new("two");
    let (f1, f2) = (dir.path("b1"), dir.path("b2"));
    let (source, addr) = start_source("source", "vm-two", &[]);
    let addr = addr.to_string();
    let mut b1 = start_backup("b1", &addr, "vm-two", &["--on-takeover", &record_hook(&f1)]);
    let mut b2 = start_backup("b2", &addr, "vm-two", &["--on-takeover", &record_hook(&f2)]);
    b1.wait_event("armed", EVENT_TIMEOUT);
    b2.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    for b in [&b1, &b2] {
        assert_eq!(
            b.wait_event("takeover", EVENT_TIMEOUT)["reason"],
            "peer-closed"
        );
    }
    assert!(b1.wait_exit(EVENT_TIMEOUT).success());
    assert!(b2.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(hook_lines(&f1), vec!["peer-closed vm-two"]);
    assert_eq!(hook_lines(&f2), vec!["peer-closed vm-two"]);
}

#[test]
fn killing_a_backup_is_reported_and_nothing_else_happens() {
    let dir = TempDir::new("lost");
    let (f1, f2) = (dir.path("b1"), dir.path("b2"));
    let (mut source, addr) = start_source("source", "vm-lost", &[]);
    let addr = addr.to_string();
    let b1 = start_backup(
        "b1",
        &addr,
        "vm-lost",
        &["--on-takeover", &record_hook(&f1)],
    );
    let mut b2 = start_backup(
        "b2",
        &addr,
        "vm-lost",
        &["--on-takeover", &record_hook(&f2)],
    );
    b1.wait_event("armed", EVENT_TIMEOUT);
    b2.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    b1.signal(libc::SIGKILL);
    let lost = source.wait_event("backup-lost", EVENT_TIMEOUT);
    assert!(lost["why"].as_str().unwrap().contains("EOF"), "{lost}");
    assert!(
        source.running(),
        "source must keep running after a backup is lost"
    );
    // The other backup is still armed and still served: an orderly stop reaches it.
    source.signal(libc::SIGTERM);
    assert_eq!(
        source.wait_event("stand-down-sent", EVENT_TIMEOUT)["backups"],
        1
    );
    b2.wait_event("stand-down", EVENT_TIMEOUT);
    assert!(b2.wait_exit(EVENT_TIMEOUT).success());
    assert!(hook_lines(&f1).is_empty() && hook_lines(&f2).is_empty());
    assert_eq!(b2.count("takeover"), 0);
}
