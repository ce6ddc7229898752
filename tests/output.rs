// SPDX-License-Identifier: Apache-2.0
//! A supervisor that stops reading our stdout and stderr must not stall the event loop: a
//! stalled source sends no heartbeats, and its backup would take over a healthy VM. Full pipes
//! drop lines and count them (`events-dropped` on stdout, a log line on stderr) instead.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Each stream's queue, in lines: small, so that drops come quickly.
const BACKLOG: usize = 4;
/// The smallest pipe the kernel makes (one page).
const PIPE: usize = 4096;
/// How long nothing is read from either process.
const STALL: Duration = Duration::from_secs(10);
/// Room left in a pipe that counts as full: more than the longest line the test expects
/// (a `guest` event is ~130 bytes, a debug log line ~150).
const FULL_SLACK: usize = 512;

fn spawn(name: &str, args: &[&str]) -> Proc {
    Proc::spawn_opts(
        name,
        args,
        SpawnOpts::new()
            .pipe_stderr()
            .pipe_size(PIPE)
            .env("VMM_TAKEOVER_OUTPUT_BACKLOG", &BACKLOG.to_string())
            .env("RUST_LOG", "trace"),
    )
}

/// Waits until `pipe` of `p` holds at least its capacity less [`FULL_SLACK`]: the child's
/// writer is then blocked on it.
fn wait_full(p: &Proc, pipe: Pipe, timeout: Duration) {
    let want = p.pipe_capacity(pipe) - FULL_SLACK;
    let deadline = Instant::now() + timeout;
    while p.pipe_pending(pipe) < want {
        assert!(
            Instant::now() < deadline,
            "{} {pipe:?}: only {} bytes unread after {timeout:?}, want {want}",
            p.name,
            p.pipe_pending(pipe)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unread_stdout_and_stderr_never_stall_the_heartbeat() {
    let source = spawn(
        "source",
        &[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            "vm-out",
            "--vm",
            "simulated",
            "--heartbeat",
            "10ms",
        ],
    );
    let addr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut backup = spawn(
        "backup",
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            "vm-out",
            // 200 ms: what is tested is output that blocks the loop for seconds, not the
            // scheduling of a loaded 2-core CI machine.
            "--heartbeat-misses",
            "20",
        ],
    );
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(armed["deadline_us"], 200_000, "{armed}");
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    assert_eq!(source.pipe_capacity(Pipe::Stdout), PIPE);

    // A supervisor that stops reading everything.
    for p in [&source, &backup] {
        p.pause(Pipe::Stdout);
        p.pause(Pipe::Stderr);
    }
    let stalled = Instant::now();
    // The backup logs every heartbeat at debug: its stderr fills within a second. With a
    // blocking logger its loop would now stop (and stop reading heartbeats).
    wait_full(&backup, Pipe::Stderr, STALL);
    std::thread::sleep(STALL.saturating_sub(stalled.elapsed()));
    backup.resume(Pipe::Stdout);
    backup.resume(Pipe::Stderr);
    source.resume(Pipe::Stderr);

    // Two `guest` events a second take longer than the stall to fill the source's stdout, so
    // that one stays unread until it is full, and then for longer than its queue of BACKLOG
    // lines lasts. With a blocking `emit` the source's loop would now stop sending heartbeats,
    // and the backup, reading again, would take over.
    wait_full(&source, Pipe::Stdout, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500) * (BACKLOG as u32 + 12));
    source.resume(Pipe::Stdout);

    // The heartbeat never stalled: no takeover, and the backup still runs.
    let takeovers: Vec<_> = backup
        .all_events()
        .into_iter()
        .filter(|v| v["event"] == "takeover")
        .collect();
    assert!(takeovers.is_empty(), "backup took over: {takeovers:?}");
    assert!(
        backup.running(),
        "backup exited: {:?}",
        backup.event_names()
    );

    let dropped = source.wait_event("events-dropped", EVENT_TIMEOUT);
    assert!(dropped["count"].as_u64().unwrap() > 0, "{dropped}");
    // Events keep coming after the notice, in order.
    source.wait_event("guest", EVENT_TIMEOUT);
    backup
        .wait_stderr("log line(s) dropped", EVENT_TIMEOUT)
        .unwrap_or_else(|| panic!("backup: no dropped-log-lines notice on stderr"));

    // Nor afterwards, by the backup's own account.
    assert!(
        backup.running(),
        "backup exited: {:?}",
        backup.event_names()
    );
    backup.signal(libc::SIGTERM);
    let stopped = backup.wait_event("stopped", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(backup.count("takeover"), 0, "{:?}", backup.event_names());
    assert_eq!(stopped["armed"], true, "{stopped}");
    let (gap, deadline) = (
        stopped["max_gap_us"].as_u64().unwrap(),
        stopped["deadline_us"].as_u64().unwrap(),
    );
    assert!(
        gap < deadline,
        "heartbeat gap {gap} us, deadline {deadline} us"
    );

    for p in [&source, &backup] {
        assert!(
            p.non_json_lines().is_empty(),
            "{}: {:?}",
            p.name,
            p.non_json_lines()
        );
    }
    // Lines that were not dropped keep their order (the notice is stamped when written).
    let times: Vec<u64> = source
        .all_events()
        .iter()
        .filter(|v| v["event"] != "events-dropped")
        .map(|v| v["at_unix_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}
