// SPDX-License-Identifier: Apache-2.0
//! Heartbeat mode on loopback: a hung source VMM is caught; late-but-in-time heartbeats are not a
//! failure.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmm_takeover_core::auth::WelcomeInfo;

#[test]
fn sigstopped_source_is_taken_over_with_heartbeat_timeout() {
    let dir = TempDir::new("hb-stop");
    let hook_file = dir.path("hook");
    let (source, addr) = start_source("source", "vm-hb", &["--heartbeat", "20ms"]);
    let backup = start_backup(
        "backup",
        addr,
        "vm-hb",
        &[
            "--heartbeat-misses",
            "3",
            "--on-takeover",
            &record_hook(&hook_file),
        ],
    );
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(armed["heartbeat_us"], 20_000);
    assert_eq!(armed["deadline_us"], 60_000);
    // SIGSTOP: the kernel keeps the socket alive and ACKs keepalive probes; only the missing
    // heartbeats reveal the hung VMM.
    let stopped_at = now_us();
    source.signal(libc::SIGSTOP);
    let ev = backup.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(ev["reason"], "heartbeat-timeout");
    let detected = ev["detected_at_unix_us"].as_u64().unwrap();
    assert!(detected >= stopped_at);
    println!(
        "SIGSTOP -> heartbeat-timeout after {} us (deadline 60000 us)",
        detected - stopped_at
    );
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert_eq!(hook_lines(&hook_file), vec!["heartbeat-timeout vm-hb"]);
    source.signal(libc::SIGCONT);
}

/// A scripted source for `pair` that welcomes with `interval` and sends heartbeats every `every`
/// until told to stop; then holds the connection open in silence. It speaks version 2 with the
/// test key: the backup authenticates it, and every heartbeat is sealed.
fn scripted_source(
    pair: &'static str,
    interval: Duration,
    every: Duration,
    beats: usize,
) -> (String, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let info = WelcomeInfo {
            fence_grace: Duration::ZERO,
            node: String::new(),
            heartbeat: Some(interval),
        };
        let (mut session, _) = fake_source_handshake(&mut s, pair, &info);
        for tick in 0..beats as u64 {
            std::thread::sleep(every);
            s.write_all(&session.seal_heartbeat(tick)).unwrap();
        }
        d.store(true, Ordering::SeqCst);
        // Keep the socket open (no FIN) until the backup gives up on it.
        let mut buf = [0u8; 128];
        s.set_read_timeout(None).unwrap();
        let _ = s.read(&mut buf);
    });
    (addr, done, h)
}

#[test]
fn late_heartbeats_within_the_deadline_do_not_take_over() {
    // Announced 100 ms × 3 misses = 300 ms deadline; sent every 200 ms: each one is late by a
    // whole interval, yet within the deadline with 100 ms to spare.
    let (addr, done, server) = scripted_source(
        "vm-late",
        Duration::from_millis(100),
        Duration::from_millis(200),
        10,
    );
    let backup = start_backup("backup", &addr, "vm-late", &[]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    // While late heartbeats flow, no takeover; once they stop, the deadline takes over.
    let ev = backup.wait_event("takeover", EVENT_TIMEOUT);
    assert!(
        done.load(Ordering::SeqCst),
        "took over while heartbeats were still flowing: {ev}"
    );
    assert_eq!(ev["reason"], "heartbeat-timeout");
    drop(backup);
    server.join().unwrap();
}

#[test]
fn stopped_backup_reports_heartbeats_and_the_longest_gap() {
    let (_source, addr) = start_source("source", "vm-stats", &["--heartbeat", "20ms"]);
    let mut backup = start_backup("backup", addr, "vm-stats", &[]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    // Nothing announces a heartbeat, so let about 25 of them flow; the assertions below only
    // need a fifth of that.
    std::thread::sleep(Duration::from_millis(500));
    backup.signal(libc::SIGTERM);
    let st = backup.wait_event("stopped", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(st["armed"], true);
    assert_eq!(st["deadline_us"], 60_000);
    let n = st["heartbeats"].as_u64().unwrap();
    let gap = st["max_gap_us"].as_u64().unwrap();
    assert!(n >= 5, "only {n} heartbeats in 500 ms at 20 ms: {st}");
    assert!(gap > 0 && gap < 60_000, "longest gap {gap} us: {st}");
    assert_eq!(backup.count("takeover"), 0);
}
