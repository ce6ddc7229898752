// SPDX-License-Identifier: Apache-2.0
//! Start-up order: the backup may come up before the source.

mod common;

use common::*;

#[test]
fn backup_started_first_retries_then_arms_without_takeover() {
    let dir = TempDir::new("early");
    let hook_file = dir.path("hook");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut backup = start_backup(
        "backup",
        &addr,
        "vm-early",
        &["--on-takeover", &record_hook(&hook_file)],
    );
    // Refused attempts are retries, never takeovers.
    for _ in 0..3 {
        let r = backup.wait_event("retrying", EVENT_TIMEOUT);
        assert!(r["why"].as_str().unwrap().contains("refused"), "{r}");
    }
    let mut source = Proc::spawn(
        "source",
        &["source", "--listen", &addr, "--pair-id", "vm-early"],
    );
    source.wait_event("listening", EVENT_TIMEOUT);
    backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(backup.count("takeover"), 0);
    assert!(hook_lines(&hook_file).is_empty());
    // Armed for real: a stop now stands the backup down.
    source.signal(libc::SIGTERM);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
    backup.wait_event("stand-down", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
}
