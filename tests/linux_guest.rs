// SPDX-License-Identifier: Apache-2.0
//! The facts about QEMU live migration that a takeover safety net around it relies on, proven
//! on a real Linux guest (Debian's cloud kernel and a busybox initramfs printing
//! `counter N uptime S` every 100 ms, under TCG: see `tests/common/linux.rs`).
//!
//! Every test skips (prints `SKIPPED: why`) where QEMU, the kernel or busybox-static is missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::linux::*;
use common::*;
use serde_json::{json, Value};

/// Upper bound for a whole migration on loopback (≈ 0.7 s when idle).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// A migration slowed to take several seconds, so that a test can kill one side in the middle.
const SLOW_BANDWIDTH: u64 = 1 << 20; // bytes per second

/// A source guest that runs and has printed a few lines, its QMP client, and the image.
fn running_source() -> Option<(Qemu, Qmp, PathBuf, PathBuf)> {
    let (kernel, initrd) = guest_image()?;
    let mut src = Qemu::spawn("source", &kernel, &initrd, QemuOpts::default());
    src.wait_counter(5, BOOT_TIMEOUT);
    let mut qmp = src.qmp();
    qmp.enable_migration_events();
    Some((src, qmp, kernel, initrd))
}

/// A destination waiting (`-S -incoming`) on a free port, its QMP client and the port.
fn destination(kernel: &Path, initrd: &Path) -> (Qemu, Qmp, u16) {
    let port = free_port();
    let mut dst = Qemu::spawn("destination", kernel, initrd, QemuOpts::incoming(port));
    let mut qmp = dst.qmp();
    qmp.enable_migration_events();
    (dst, qmp, port)
}

fn migrate(src: &mut Qmp, port: u16) {
    src.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }));
}

/// Slows the source's migration down and starts it; returns once RAM is flowing (the
/// destination is then mid-migration).
fn start_slow_migration(src: &mut Qmp, port: u16) -> Value {
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": SLOW_BANDWIDTH }),
    );
    migrate(src, port);
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let m = src.query_migrate();
        assert_ne!(
            m["status"], "completed",
            "the slowed migration completed at once: {m}"
        );
        assert_ne!(m["status"], "failed", "{m}");
        if m["status"] == "active" && m["ram"]["transferred"].as_u64().unwrap_or(0) > 0 {
            return m;
        }
        assert!(Instant::now() < deadline, "migration not under way: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_boots_under_tcg_and_counts_on_the_serial_console() {
    let Some((kernel, initrd)) = guest_image() else {
        return;
    };
    let mut q = Qemu::spawn("guest", &kernel, &initrd, QemuOpts::default());
    let first = q.wait_counter(1, BOOT_TIMEOUT);
    let boot = q.started.elapsed();
    let fifth = q.wait_counter(5, BOOT_TIMEOUT);
    println!(
        "first line after {boot:?} wall ({first:?}), counter 5 after {:?} ({fifth:?})",
        q.started.elapsed()
    );
    let ticks = q.ticks();
    assert_eq!(ticks[0].counter, 1, "the counter starts at 1: {ticks:?}");
    for w in ticks.windows(2) {
        assert_eq!(
            w[1].counter,
            w[0].counter + 1,
            "a line went missing: {ticks:?}"
        );
        assert!(w[1].uptime >= w[0].uptime, "uptime went back: {ticks:?}");
    }
    assert_eq!(q.qmp().status(), "running");
}

#[test]
fn live_migration_hands_the_running_guest_to_a_paused_destination() {
    let Some((src, mut sq, kernel, initrd)) = running_source() else {
        return;
    };
    let (mut dst, mut dq, port) = destination(&kernel, &initrd);
    assert_eq!(dq.status(), "inmigrate", "-incoming before any migration");

    let t0 = Instant::now();
    migrate(&mut sq, port);
    let done = sq.wait_migration(&["completed", "failed"], MIGRATION_TIMEOUT);
    let wall = t0.elapsed();
    assert_eq!(done["status"], "completed", "{done}");
    println!(
        "migration: {wall:?} wall; QEMU: total-time {} ms, downtime {} ms, setup-time {} ms, \
         ram transferred {} B",
        done["total-time"], done["downtime"], done["setup-time"], done["ram"]["transferred"]
    );
    assert!(done["downtime"].as_u64().is_some(), "no downtime in {done}");

    // The source stopped for good: postmigrate (`completed` can come a moment before the run
    // state leaves `finish-migrate`), and its console says no more.
    sq.wait_status("postmigrate", Duration::from_secs(10));
    let last = src.last_tick().expect("the source printed lines");

    // The destination loads the last of the state after the source says "completed": it is
    // `inmigrate` until then, and with -S it then stays paused.
    let after = dq.wait_status_change("inmigrate", MIGRATION_TIMEOUT);
    assert_eq!(
        after, "paused",
        "destination status after an incoming migration with -S"
    );
    println!(
        "MIGRATION events: source {:?}, destination {:?}",
        sq.migration_event_statuses(),
        dq.migration_event_statuses()
    );
    assert_eq!(dq.query_migrate()["status"], "completed");
    assert!(
        dst.ticks().is_empty(),
        "the paused destination ran the guest"
    );

    // After `cont` the same guest goes on: the counter carries on past the source's last line
    // and its uptime with it; no reboot (no BIOS, no counter 1).
    dq.execute("cont", Value::Null);
    assert_eq!(dq.status(), "running");
    dst.wait_counter(last.counter + 3, BOOT_TIMEOUT);
    let ticks = dst.ticks();
    let first = ticks[0];
    println!("source's last line {last:?}, destination's first {first:?}");
    assert!(first.counter > last.counter, "{last:?} then {first:?}");
    assert!(
        first.counter <= last.counter + 2,
        "lines lost: {last:?} then {first:?}"
    );
    assert!(
        first.uptime >= last.uptime,
        "uptime went back: {last:?} then {first:?}"
    );
    assert!(
        !dst.serial_text().contains("SeaBIOS"),
        "the destination booted"
    );
    // The source stays stopped.
    assert_eq!(sq.status(), "postmigrate");
    assert_eq!(src.last_tick(), Some(last));
}

#[test]
fn cont_on_a_postmigrate_source_is_accepted_and_runs_it_again() {
    let Some((mut src, mut sq, kernel, initrd)) = running_source() else {
        return;
    };
    let (_dst, _dq, port) = destination(&kernel, &initrd);
    migrate(&mut sq, port);
    let done = sq.wait_migration(&["completed", "failed"], MIGRATION_TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}");
    // `completed` can come a moment before the run state leaves `finish-migrate`.
    sq.wait_status("postmigrate", Duration::from_secs(10));
    let last = src.last_tick().unwrap();
    // Nothing in QEMU stops a second copy of the guest from running: a handoff must never
    // `cont` the source after the migration completed.
    let r = sq.try_execute("cont", Value::Null).unwrap();
    println!("cont on a postmigrate source: {r:?}");
    assert_eq!(r, Ok(json!({})));
    assert_eq!(sq.status(), "running");
    src.wait_counter(last.counter + 3, BOOT_TIMEOUT);
}

#[test]
fn source_killed_mid_migration_ends_the_destination_qemu() {
    let Some((src, mut sq, kernel, initrd)) = running_source() else {
        return;
    };
    let (mut dst, mut dq, port) = destination(&kernel, &initrd);
    let m = start_slow_migration(&mut sq, port);
    println!("source mid-migration: {m}");
    assert_eq!(
        dq.status(),
        "inmigrate",
        "destination during an incoming migration"
    );
    // `cont` while inmigrate is accepted (it only asks for the guest to run once it is here).
    let r = dq.try_execute("cont", Value::Null).unwrap();
    println!("cont on an inmigrate destination: {r:?}");
    assert_eq!(r, Ok(json!({})));
    assert_eq!(dq.status(), "inmigrate");

    src.kill();
    let t0 = Instant::now();
    let exit = dst.wait_exit(MIGRATION_TIMEOUT);
    println!(
        "destination after the source was killed: {exit:?} after {:?}; stderr: {}",
        t0.elapsed(),
        dst.stderr_text()
    );
    let exit = exit.expect("the destination QEMU still runs");
    assert_eq!(exit.code(), Some(1), "{exit:?}");
    assert!(
        dst.stderr_text().contains("load of migration failed"),
        "{}",
        dst.stderr_text()
    );
    assert!(dst.ticks().is_empty(), "the half-migrated guest ran");
}

#[test]
fn destination_killed_mid_migration_fails_it_and_the_source_runs_on() {
    let Some((mut src, mut sq, kernel, initrd)) = running_source() else {
        return;
    };
    let (dst, _dq, port) = destination(&kernel, &initrd);
    start_slow_migration(&mut sq, port);
    assert_eq!(
        sq.status(),
        "running",
        "the source runs during the iterative phase"
    );
    dst.kill();
    let t0 = Instant::now();
    let failed = sq.wait_migration(&["failed", "completed"], MIGRATION_TIMEOUT);
    println!(
        "source after the destination was killed: {failed} after {:?}; events {:?}",
        t0.elapsed(),
        sq.migration_event_statuses()
    );
    assert_eq!(failed["status"], "failed");
    assert_eq!(sq.status(), "running", "without a cont");
    let last = src.last_tick().unwrap();
    src.wait_counter(last.counter + 3, BOOT_TIMEOUT);
}

#[test]
fn cont_during_an_incoming_migration_runs_the_destination_when_it_completes() {
    let Some((_src, mut sq, kernel, initrd)) = running_source() else {
        return;
    };
    let (mut dst, mut dq, port) = destination(&kernel, &initrd);
    dq.execute("cont", Value::Null);
    assert_eq!(dq.status(), "inmigrate");
    migrate(&mut sq, port);
    let done = sq.wait_migration(&["completed", "failed"], MIGRATION_TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}");
    let after = dq.wait_status_change("inmigrate", MIGRATION_TIMEOUT);
    assert_eq!(after, "running", "a cont while inmigrate sets autostart");
    dst.wait_counter(1, BOOT_TIMEOUT);
}
