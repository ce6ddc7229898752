// SPDX-License-Identifier: Apache-2.0
//! What an operator (or supervisor) does to a running pair: reads its output, stops it during a
//! hook, sends SIGHUP, asks for a handoff that cannot complete. None of it may start a second
//! guest, leave a hook's processes behind, or stop a guest that should keep running.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_secs(2);

/// A hook that records its process group (its shell's pid: the hook leads a group of its own),
/// then never returns.
fn hanging_hook(pgid_file: &Path) -> String {
    format!("echo $$ > {}; exec sleep 1000", pgid_file.display())
}

/// Waits until the hook wrote its process group id (its shell's pid) and returns it.
fn hook_pgid(pgid_file: &Path) -> i32 {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let s = std::fs::read_to_string(pgid_file).unwrap_or_default();
        // Written by one `echo`: a complete line means a complete number.
        if s.ends_with('\n') {
            return s.trim().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the hook never wrote its pgid");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks that group `pgid` runs the hook's `sleep 1000` (the shell exec'd it: same pid), so
/// that the test watches the right group.
fn assert_hook_sleeping(pgid: i32) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let cmdline = std::fs::read(format!("/proc/{pgid}/cmdline")).unwrap_or_default();
        if cmdline == b"sleep\x001000\x00" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process {pgid} is not `sleep 1000`: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(group_alive(pgid), "hook group {pgid} not found");
}

/// Whether any process of group `pgid` exists (`kill(-pgid, 0)`; EPERM also means it exists).
fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 checks for existence only.
    let r = unsafe { libc::kill(-pgid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Asserts that group `pgid` is gone within a generous bound (the abort's SIGKILL grace is 1 s).
fn assert_group_gone(pgid: i32) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while group_alive(pgid) {
        assert!(
            Instant::now() < deadline,
            "the hook's process group {pgid} is still there {EVENT_TIMEOUT:?} after the backup \
             exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn at_us(ev: &Value) -> u64 {
    ev["at_unix_us"].as_u64().unwrap()
}

fn counter(ev: &Value) -> u64 {
    ev["counter"].as_u64().unwrap()
}

/// The source's `guest` reports from its pause on: the one it prints just before
/// `handoff-paused` (evidence of the pause), then every later one.
fn guest_reports_from_pause(p: &Proc) -> Vec<Value> {
    let all = p.all_events();
    let at = all
        .iter()
        .position(|v| v["event"] == "handoff-paused")
        .unwrap_or_else(|| panic!("{}: no handoff-paused", p.name));
    assert!(
        at > 0 && all[at - 1]["event"] == "guest",
        "no guest report just before handoff-paused: {:?}",
        p.event_names()
    );
    all[at - 1..]
        .iter()
        .filter(|v| v["event"] == "guest")
        .cloned()
        .collect()
}

/// Starts a source with a `--vm simulated` guest and waits for its guest to report running.
fn source_with_guest(pair: &str) -> (Proc, std::net::SocketAddr) {
    let (source, addr) = start_source("source", pair, &["--vm", "simulated"]);
    let g = source.wait_event("guest", EVENT_TIMEOUT);
    assert_eq!(g["running"], true, "{g}");
    (source, addr)
}

/// A hook writes to its stdout; the backup's stdout must still be one JSON object per line, with
/// the hook's text on stderr instead.
#[test]
fn a_hook_that_prints_leaves_stdout_pure_json() {
    let (source, addr) = start_source("source", "vm-print", &[]);
    let addr = addr.to_string();
    let mut backup = Proc::spawn_opts(
        "backup",
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            "vm-print",
            "--on-takeover",
            "echo hello from the hook; echo more; printf 'no newline'",
        ],
        SpawnOpts::new().pipe_stderr(),
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    // Joined on the source's side too: killed before it read the AUTH, its kernel would answer
    // with a RST (`reset`), not the EOF asserted below.
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "peer-closed"
    );
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(0));

    // Checked after exit, once every line was read: waiting on events checks only what came
    // before the awaited one.
    assert!(
        backup.non_json_lines().is_empty(),
        "stdout lines that are not JSON objects: {:?}",
        backup.non_json_lines()
    );
    // Whole lines where the hook ended them; the unterminated one may share a line with what
    // the backup logs next.
    let stderr = backup.stderr_lines();
    for line in ["hello from the hook", "more"] {
        assert!(
            stderr.iter().any(|l| l == line),
            "{line:?} not a line of the backup's stderr: {stderr:?}"
        );
    }
    assert!(
        stderr.iter().any(|l| l.contains("no newline")),
        "the hook's last output not on the backup's stderr: {stderr:?}"
    );
    for needle in ["hello from the hook", "no newline"] {
        assert!(
            !backup
                .all_events()
                .iter()
                .any(|v| v.to_string().contains(needle)),
            "{needle:?} in a stdout event"
        );
    }
}

/// SIGTERM while `vm_start` runs: the hook is aborted, the backup says so (`aborted_hook`, exit 7)
/// and nothing of the hook's process group survives it.
#[test]
fn sigterm_during_a_hook_leaves_no_process_behind() {
    let dir = TempDir::new("term-hook");
    let pgid_file = dir.path("pgid");
    let (source, mut backup, _) = armed_pair(
        "vm-abort",
        &[],
        &[
            "--on-takeover",
            &hanging_hook(&pgid_file),
            "--hook-timeout",
            "10m",
        ],
    );
    source.signal(libc::SIGKILL);
    backup.wait_event("takeover", EVENT_TIMEOUT);
    let pgid = hook_pgid(&pgid_file);
    assert_hook_sleeping(pgid);

    backup.signal(libc::SIGTERM);
    let stopped = backup.wait_event("stopped", EVENT_TIMEOUT);
    assert_eq!(stopped["aborted_hook"], true, "{stopped}");
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(7));
    assert_eq!(backup.count("vm-started"), 0, "{:?}", backup.event_names());
    assert_group_gone(pgid);
}

/// A hook that never returns: `hook-timeout` after the bound (not before), exit 6, the hook's
/// process group ended.
#[test]
fn a_hook_that_never_returns_times_out_and_is_killed() {
    let dir = TempDir::new("hang-hook");
    let pgid_file = dir.path("pgid");
    let (source, mut backup, _) = armed_pair(
        "vm-hang",
        &[],
        &[
            "--on-takeover",
            &hanging_hook(&pgid_file),
            "--hook-timeout",
            "500ms",
        ],
    );
    source.signal(libc::SIGKILL);
    let takeover = backup.wait_event("takeover", EVENT_TIMEOUT);
    let pgid = hook_pgid(&pgid_file);

    let timeout = backup.wait_event("hook-timeout", EVENT_TIMEOUT);
    let after = at_us(&timeout) - at_us(&takeover);
    println!("hook-timeout {after} us after the takeover (bound 500 ms)");
    assert!(after >= 400_000, "hook-timeout after only {after} us");
    assert_eq!(timeout["after_us"], 500_000, "{timeout}");
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(6));
    for e in ["vm-started", "vm-start-failed"] {
        assert_eq!(backup.count(e), 0, "{:?}", backup.event_names());
    }
    assert_group_gone(pgid);
}

/// SIGHUP reloads nothing and must end nothing: neither side leaves, the link stays armed, and an
/// orderly stop afterwards still stands the backup down.
#[test]
fn sighup_is_ignored_by_both_sides() {
    let dir = TempDir::new("hup");
    let hook_file = dir.path("hook");
    // With heartbeats, a source that stalled or dropped the link would show within 150 ms.
    let (mut source, mut backup, _) = armed_pair(
        "vm-hup",
        &["--heartbeat", "50ms"],
        &["--on-takeover", &record_hook(&hook_file)],
    );
    for p in [&source, &backup] {
        p.signal(libc::SIGHUP);
        let ev = p.wait_event("signal-ignored", EVENT_TIMEOUT);
        assert_eq!(ev["signal"], "SIGHUP", "{}: {ev}", p.name);
    }
    // Watched for QUIET: the backup must see no loss at all.
    assert!(
        backup.try_wait_event("link-lost", QUIET).is_none(),
        "link lost after SIGHUP: {:?}",
        backup.event_names()
    );
    for e in ["link-lost", "takeover", "retrying"] {
        assert_eq!(backup.count(e), 0, "{:?}", backup.event_names());
    }
    assert_eq!(source.count("backup-lost"), 0, "{:?}", source.event_names());
    assert!(source.running(), "source exited on SIGHUP");
    assert!(backup.running(), "backup exited on SIGHUP");

    source.signal(libc::SIGTERM);
    assert_eq!(
        source.wait_event("stand-down-sent", EVENT_TIMEOUT)["backups"],
        1
    );
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    backup.wait_event("stand-down", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    assert!(hook_lines(&hook_file).is_empty(), "the hook ran");
}

/// A handoff with nobody to hand off to is refused before anything is paused: the guest runs on.
#[test]
fn handoff_with_no_backup_keeps_the_guest_running() {
    let (mut source, _) = source_with_guest("vm-alone");
    source.signal(libc::SIGUSR1);
    let refused = source.wait_event("handoff-refused", EVENT_TIMEOUT);
    assert_eq!(refused["why"], "no-backup", "{refused}");

    // Two reports after the refusal: running, and counting.
    let a = source.wait_event("guest", EVENT_TIMEOUT);
    let b = source.wait_event("guest", EVENT_TIMEOUT);
    for g in [&a, &b] {
        assert_eq!(g["running"], true, "{g}");
    }
    assert!(counter(&b) > counter(&a), "counter stuck: {a} then {b}");
    assert_eq!(
        source.count("handoff-paused"),
        0,
        "{:?}",
        source.event_names()
    );
    assert!(
        source.running(),
        "source exited: {:?}",
        source.event_names()
    );

    source.signal(libc::SIGTERM);
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
}

/// The chosen backup's `vm_start` fails: the backup says so (exit 3), the source hears it
/// (HANDOFF_RESULT) and resumes its own guest, which counts on; the source keeps serving.
#[test]
fn a_handoff_whose_backup_fails_to_start_resumes_the_source_guest() {
    let (mut source, addr) = source_with_guest("vm-hofail");
    let mut backup = start_backup("backup", addr, "vm-hofail", &["--on-takeover", "exit 1"]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);

    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-paused", EVENT_TIMEOUT);
    let paused = guest_reports_from_pause(&source).remove(0);
    assert_eq!(paused["running"], false, "{paused}");
    source.wait_event("handoff-sent", EVENT_TIMEOUT);
    let failed = source.wait_event("handoff-failed", EVENT_TIMEOUT);
    assert_eq!(failed["stage"], "backup-start", "{failed}");
    assert_eq!(failed["resumed"], true, "{failed}");

    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "handoff"
    );
    backup.wait_event("vm-start-failed", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(3));

    // Counting again, past where it was paused.
    let a = source.wait_event("guest", EVENT_TIMEOUT);
    let b = source.wait_event("guest", EVENT_TIMEOUT);
    for g in [&a, &b] {
        assert_eq!(g["running"], true, "{g}");
    }
    assert!(
        counter(&b) > counter(&a) && counter(&a) >= counter(&paused),
        "counter not growing after the resume: paused {paused}, then {a}, {b}"
    );
    assert!(
        source.running(),
        "source exited: {:?}",
        source.event_names()
    );
    assert_eq!(source.count("handoff-complete"), 0);

    source.signal(libc::SIGTERM);
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
}

/// The chosen backup's `vm_start` times out: whether its copy runs is unknown, so the source must
/// neither resume its guest nor claim success: `handoff-uncertain`, exit 6, guest stays paused.
#[test]
fn a_handoff_whose_backup_start_times_out_leaves_the_source_paused() {
    let dir = TempDir::new("ho-hang");
    let pgid_file = dir.path("pgid");
    let (mut source, addr) = source_with_guest("vm-hohang");
    let mut backup = start_backup(
        "backup",
        addr,
        "vm-hohang",
        &[
            "--on-takeover",
            &hanging_hook(&pgid_file),
            "--hook-timeout",
            "500ms",
        ],
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);

    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-paused", EVENT_TIMEOUT);
    source.wait_event("handoff-sent", EVENT_TIMEOUT);
    let uncertain = source.wait_event("handoff-uncertain", EVENT_TIMEOUT);
    println!("handoff-uncertain: {uncertain}");
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(6));
    for e in ["handoff-failed", "handoff-complete"] {
        assert_eq!(source.count(e), 0, "{:?}", source.event_names());
    }

    // Every report from the pause on: paused, and the counter frozen where the pause left it.
    let reports = guest_reports_from_pause(&source);
    for g in &reports {
        assert_eq!(g["running"], false, "{g}");
        assert_eq!(
            counter(g),
            counter(&reports[0]),
            "counter moved: {reports:?}"
        );
    }
    println!(
        "{} guest report(s) after the pause, counter {}",
        reports.len(),
        counter(&reports[0])
    );

    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "handoff"
    );
    let pgid = hook_pgid(&pgid_file);
    backup.wait_event("hook-timeout", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(6));
    assert_group_gone(pgid);
}

/// With two armed backups a planned handoff goes to exactly one; the other is stood down.
#[test]
fn two_backups_planned_handoff_exactly_one_takes_over() {
    let dir = TempDir::new("ho-two");
    let (mut source, addr) = start_source("source", "vm-two", &["--on-handoff", "true"]);
    let mut backups: Vec<(Proc, std::path::PathBuf)> = ["a", "b"]
        .iter()
        .map(|n| {
            let f = dir.path(n);
            let b = start_backup(n, addr, "vm-two", &["--on-takeover", &record_hook(&f)]);
            b.wait_event("armed", EVENT_TIMEOUT);
            (b, f)
        })
        .collect();
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);

    source.signal(libc::SIGUSR1);
    let sent = source.wait_event("handoff-sent", EVENT_TIMEOUT);
    assert_eq!(sent["others_stood_down"], 1, "{sent}");
    source.wait_event("handoff-complete", EVENT_TIMEOUT);
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));

    let mut took_over = Vec::new();
    for (b, f) in backups.iter_mut() {
        assert_eq!(b.wait_exit(EVENT_TIMEOUT).code(), Some(0), "{}", b.name);
        match (b.count("takeover"), b.count("stand-down")) {
            (1, 0) => {
                assert_eq!(b.count("vm-started"), 1, "{:?}", b.event_names());
                assert_eq!(hook_lines(f), vec!["handoff vm-two"], "{}", b.name);
                took_over.push(b.name.clone());
            }
            (0, 1) => assert!(hook_lines(f).is_empty(), "{}: the hook ran", b.name),
            _ => panic!("{}: {:?}", b.name, b.event_names()),
        }
    }
    assert_eq!(took_over.len(), 1, "took over: {took_over:?}");
}

/// A pause hook slower than the backup's heartbeat deadline (300 ms against 3 × 10 ms): the
/// loop keeps sending heartbeats while the hook runs, so the backup waits for HANDOFF instead of
/// taking over for want of heartbeats (which, with the pause then failing for lack of a backup,
/// would resume the source beside the backup's copy).
#[test]
fn a_slow_pause_keeps_the_heartbeat_and_the_backup_waits_for_handoff() {
    let (mut source, addr) = start_source(
        "source",
        "vm-slowpause",
        &["--heartbeat", "10ms", "--on-handoff", "sleep 0.3"],
    );
    let mut backup = start_backup(
        "backup",
        addr,
        "vm-slowpause",
        &["--heartbeat-misses", "3", "--on-takeover", "true"],
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-complete", EVENT_TIMEOUT);
    let t = backup.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(t["reason"], "handoff", "{t}");
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
}

/// A pause hook that fails: the source serves on, and its backup keeps getting heartbeats (the
/// heartbeat timer survives the failed handoff), so it stays armed and never takes over.
#[test]
fn after_a_failed_pause_the_backup_still_gets_heartbeats() {
    let (mut source, addr) = start_source(
        "source",
        "vm-pausefail",
        &["--heartbeat", "10ms", "--on-handoff", "exit 1"],
    );
    let backup = start_backup("backup", addr, "vm-pausefail", &["--heartbeat-misses", "3"]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    source.signal(libc::SIGUSR1);
    let failed = source.wait_event("handoff-failed", EVENT_TIMEOUT);
    assert_eq!(failed["stage"], "pause", "{failed}");
    // Asserting an absence needs a wait: 50 heartbeat intervals, 17 deadlines.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(backup.count("link-lost"), 0, "{:?}", backup.event_names());
    assert_eq!(backup.count("takeover"), 0, "{:?}", backup.event_names());
    source.signal(libc::SIGTERM);
    backup.wait_event("stand-down", EVENT_TIMEOUT);
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
}
