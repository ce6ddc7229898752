// SPDX-License-Identifier: Apache-2.0
//! Orderly stops and planned handoffs are never mistaken for crashes.

mod common;

use common::*;

#[test]
fn sigterm_stands_down_and_never_runs_the_hook() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = TempDir::new("term");
        let hook_file = dir.path("hook");
        let hook = record_hook(&hook_file);
        let (mut source, mut backup, _) = armed_pair("vm-term", &[], &["--on-takeover", &hook]);

        source.signal(sig);
        assert_eq!(
            source.wait_event("stand-down-sent", EVENT_TIMEOUT)["backups"],
            1
        );
        assert!(source.wait_exit(EVENT_TIMEOUT).success());
        backup.wait_event("stand-down", EVENT_TIMEOUT);
        assert!(backup.wait_exit(EVENT_TIMEOUT).success());
        assert_eq!(backup.count("takeover"), 0, "{:?}", backup.event_names());
        assert!(
            hook_lines(&hook_file).is_empty(),
            "hook ran on an orderly stop"
        );
    }
}

#[test]
fn sigusr1_pauses_the_source_then_hands_off() {
    let dir = TempDir::new("handoff");
    let hook_file = dir.path("hook");
    let order = dir.path("order");
    // Both hooks append to one file, so the order they ran in is on record.
    let pause = format!("echo paused >> {}", order.display());
    let start = format!(
        "echo \"started $VMM_TAKEOVER_REASON\" >> {} && {}",
        order.display(),
        record_hook(&hook_file)
    );
    let (mut source, mut backup, _) = armed_pair(
        "vm-ho",
        &["--on-handoff", &pause],
        &["--on-takeover", &start],
    );

    source.signal(libc::SIGUSR1);
    let sent = source.wait_event("handoff-sent", EVENT_TIMEOUT);
    assert_eq!(sent["others_stood_down"], 0, "{sent}");
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "handoff"
    );
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    // The source leaves only once the backup said its copy runs.
    source.wait_event("handoff-complete", EVENT_TIMEOUT);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(hook_lines(&order), vec!["paused", "started handoff"]);
    assert_eq!(hook_lines(&hook_file), vec!["handoff vm-ho"]);
}

#[test]
fn failed_pause_does_not_hand_off() {
    let dir = TempDir::new("handoff-fail");
    let hook_file = dir.path("hook");
    let hook = record_hook(&hook_file);
    let (mut source, mut backup, _) = armed_pair(
        "vm-hof",
        &["--on-handoff", "exit 1"],
        &["--on-takeover", &hook],
    );
    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-failed", EVENT_TIMEOUT);
    // Still the source: an orderly stop afterwards stands the backup down.
    source.signal(libc::SIGTERM);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
    backup.wait_event("stand-down", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert!(hook_lines(&hook_file).is_empty());
}

#[test]
fn a_failed_pause_can_be_retried_and_then_hands_off() {
    let dir = TempDir::new("handoff-retry");
    let hook_file = dir.path("hook");
    let flag = dir.path("first-try-done");
    // Fails the first time (and leaves a flag), succeeds the second.
    let pause = format!(
        "if [ -e {f} ]; then exit 0; else touch {f}; exit 1; fi",
        f = flag.display()
    );
    let (mut source, mut backup, _) = armed_pair(
        "vm-hor",
        &["--on-handoff", &pause],
        &["--on-takeover", &record_hook(&hook_file)],
    );
    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-failed", EVENT_TIMEOUT);
    assert_eq!(backup.count("takeover"), 0);
    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-sent", EVENT_TIMEOUT);
    source.wait_event("handoff-complete", EVENT_TIMEOUT);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "handoff"
    );
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(hook_lines(&hook_file), vec!["handoff vm-hor"]);
}
