// SPDX-License-Identifier: Apache-2.0
//! Live migration with a takeover safety net, on a real Linux guest: two real QEMUs (TCG, the
//! kernel and busybox image of `scripts/build-linux-guest.sh`), `vmm-takeover source --qmp
//! --migrate-to` and `vmm-takeover backup --qmp` between them. Every failure point has one right
//! answer (docs/live-migration.md); each test is one of them.

mod common;

use common::linux::{guest_image, Qemu, QemuOpts, Qmp, Tick, BOOT_TIMEOUT};
use common::{free_port, Proc, SpawnOpts, EVENT_TIMEOUT};
use serde_json::json;

/// A migration pair: the source QEMU running the guest, the destination waiting with
/// `-S -incoming`, and vmm-takeover on both (QMP socket 0 each; socket 1 is the test's).
struct Pair {
    src_qemu: Qemu,
    dst_qemu: Qemu,
    source: Proc,
    backup: Proc,
}

fn start(pair: &str, source_extra: &[&str]) -> Option<Pair> {
    let (kernel, initrd) = guest_image()?;
    let mut src_qemu = Qemu::spawn("src", &kernel, &initrd, QemuOpts::default());
    let port = free_port();
    let dst_qemu = Qemu::spawn("dst", &kernel, &initrd, QemuOpts::incoming(port));
    src_qemu.wait_counter(3, BOOT_TIMEOUT);
    let uri = format!("tcp:127.0.0.1:{port}");
    let src_qmp = src_qemu.qmp_path(0).to_str().unwrap().to_string();
    let mut args = vec![
        "source",
        "--listen",
        "127.0.0.1:0",
        "--pair-id",
        pair,
        "--qmp",
        &src_qmp,
        "--migrate-to",
        &uri,
    ];
    args.extend_from_slice(source_extra);
    let source = Proc::spawn("source", &args);
    let addr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let dst_qmp = dst_qemu.qmp_path(0).to_str().unwrap().to_string();
    let backup = Proc::spawn_opts(
        "backup",
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            pair,
            "--qmp",
            &dst_qmp,
        ],
        SpawnOpts::new().pipe_stderr(),
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    Some(Pair {
        src_qemu,
        dst_qemu,
        source,
        backup,
    })
}

/// The destination QEMU gave up its incoming migration: it exited and never ran the guest.
fn assert_destination_gave_up(dst: &mut Qemu) {
    assert!(
        dst.wait_exit(EVENT_TIMEOUT).is_some(),
        "destination still up"
    );
    assert!(dst.ticks().is_empty(), "{}", dst.serial_text());
}

/// The source QEMU runs and its guest goes on counting.
fn assert_runs_on(src: &mut Qemu, qmp: &mut Qmp) {
    assert_eq!(qmp.status(), "running");
    let before = src.last_tick().unwrap();
    src.wait_counter(before.counter + 3, BOOT_TIMEOUT);
}

/// The destination's first tick continues the source's last: same boot, later uptime.
fn assert_continues(src_last: Tick, dst: &Qemu) {
    let dst_ticks = dst.ticks();
    let first = dst_ticks.first().expect("the destination printed nothing");
    assert!(
        first.counter > src_last.counter && first.counter <= src_last.counter + 10,
        "destination starts at {first:?}, source ended at {src_last:?}: not a continuation"
    );
    assert!(
        first.uptime > src_last.uptime,
        "uptime went back: {first:?} after {src_last:?} (a reboot?)"
    );
    assert!(
        !dst.serial_text().contains("counter 1 "),
        "the destination booted on its own"
    );
}

#[test]
fn a_planned_handoff_migrates_the_running_linux_guest_and_it_carries_on_at_the_backup() {
    let Some(mut p) = start("mig1", &[]) else {
        return;
    };
    p.source.signal(libc::SIGUSR1);
    let done = p.source.wait_event("handoff-complete", BOOT_TIMEOUT);
    let started = p.backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert!(p.source.wait_exit(EVENT_TIMEOUT).success());
    assert!(p.backup.wait_exit(EVENT_TIMEOUT).success());
    let took = p
        .backup
        .all_events()
        .into_iter()
        .find(|e| e["event"] == "takeover")
        .unwrap();
    assert_eq!(took["reason"], "handoff");
    // The source QEMU is left in postmigrate, never resumed; the destination runs on.
    let mut sq = p.src_qemu.qmp();
    assert_eq!(sq.status(), "postmigrate");
    let mut dq = p.dst_qemu.qmp();
    assert_eq!(dq.status(), "running");
    let src_last = p.src_qemu.last_tick().unwrap();
    p.dst_qemu.wait_counter(src_last.counter + 3, BOOT_TIMEOUT);
    assert_continues(src_last, &p.dst_qemu);
    let m = sq.query_migrate();
    println!(
        "handoff took {} µs (migration total {} ms, QEMU downtime {} ms); vm_start {} µs",
        done["took_us"], m["total-time"], m["downtime"], started["took_us"]
    );
}

#[test]
fn when_the_source_host_dies_during_the_migration_no_half_migrated_guest_runs() {
    // Keepalive only: the test decides when the link breaks.
    let Some(mut p) = start("mig2", &["--keepalive", "1:1:5"]) else {
        return;
    };
    let mut sq = p.src_qemu.qmp();
    // Slow enough to stop it half way (a 256 MiB guest at 1 MiB/s: minutes).
    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    p.source.signal(libc::SIGUSR1);
    p.source.wait_event("handoff-requested", EVENT_TIMEOUT);
    sq.wait_migration(&["active"], EVENT_TIMEOUT);
    // The source host dies: first vmm-takeover (the backup takes over at once and finds its
    // QEMU still receiving), then the source QEMU (the migration stream breaks).
    p.source.signal(libc::SIGKILL);
    p.backup.wait_event("takeover", EVENT_TIMEOUT);
    p.backup
        .wait_stderr("receiving a live migration", EVENT_TIMEOUT)
        .expect("the backup waits for the incoming migration");
    p.src_qemu.kill();
    let ev = p.backup.wait_event("migration-incomplete", EVENT_TIMEOUT);
    assert!(ev["error"].as_str().unwrap().contains("incomplete"), "{ev}");
    assert_eq!(p.backup.wait_exit(EVENT_TIMEOUT).code(), Some(9));
    assert_eq!(p.backup.count("vm-started"), 0);
    // The destination gave up its incoming migration and exited; it never ran the guest.
    assert_destination_gave_up(&mut p.dst_qemu);
}

#[test]
fn when_the_source_dies_after_the_migration_completed_but_before_handoff_the_backup_resumes_it() {
    let Some(mut p) = start("mig3", &["--keepalive", "1:1:5"]) else {
        return;
    };
    let mut sq = p.src_qemu.qmp();
    // Slow at first, so that vmm-takeover can be stopped while it runs.
    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    p.source.signal(libc::SIGUSR1);
    sq.wait_migration(&["active"], EVENT_TIMEOUT);
    // vmm-takeover stops (never to send HANDOFF). QEMU copies the rest and waits at the point
    // of no return (`pre-switchover`), where the test does what the stopped source would have
    // done next: `migrate-continue`. Then QEMU finishes the migration on its own.
    p.source.signal(libc::SIGSTOP);
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    );
    sq.wait_migration(&["pre-switchover"], BOOT_TIMEOUT);
    sq.execute("migrate-continue", json!({"state": "pre-switchover"}));
    sq.wait_migration(&["completed"], BOOT_TIMEOUT);
    // `completed` can come a moment before the run state leaves `finish-migrate`.
    sq.wait_status("postmigrate", EVENT_TIMEOUT);
    let src_last = p.src_qemu.last_tick().unwrap();
    // Then the source host dies.
    p.source.signal(libc::SIGKILL);
    p.src_qemu.kill();
    let took = p.backup.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(took["reason"], "peer-closed");
    p.backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert!(p.backup.wait_exit(EVENT_TIMEOUT).success());
    p.dst_qemu.wait_counter(src_last.counter + 3, BOOT_TIMEOUT);
    assert_continues(src_last, &p.dst_qemu);
    assert_eq!(p.source.count("handoff-sent"), 0);
}

#[test]
fn a_failed_migration_leaves_the_guest_running_at_the_source_and_the_pair_protected() {
    let Some(mut p) = start("mig4", &[]) else {
        return;
    };
    let mut sq = p.src_qemu.qmp();
    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    p.source.signal(libc::SIGUSR1);
    sq.wait_migration(&["active"], EVENT_TIMEOUT);
    // The destination QEMU dies mid-way: QEMU fails the migration.
    p.dst_qemu.kill();
    let failed = p.source.wait_event("handoff-failed", EVENT_TIMEOUT);
    assert_eq!(failed["stage"], "pause", "{failed}");
    assert_eq!(failed["resumed"], true, "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("failed"),
        "{failed}"
    );
    assert_runs_on(&mut p.src_qemu, &mut sq);
    // Still protected: the backup stays armed, nothing was taken over.
    let mut p = p;
    assert!(p.source.running() && p.backup.running());
    assert_eq!(p.backup.count("takeover"), 0);
    assert_eq!(p.backup.count("link-lost"), 0);
}

#[test]
fn when_the_backup_dies_during_the_migration_the_source_cancels_it_and_runs_on() {
    let Some(mut p) = start("mig5", &[]) else {
        return;
    };
    let mut sq = p.src_qemu.qmp();
    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    p.source.signal(libc::SIGUSR1);
    sq.wait_migration(&["active"], EVENT_TIMEOUT);
    // The backup process dies; its QEMU would still take the migration.
    p.backup.signal(libc::SIGKILL);
    let failed = p.source.wait_event("handoff-failed", EVENT_TIMEOUT);
    assert_eq!(failed["resumed"], true, "{failed}");
    let m = sq.wait_migration(&["cancelled", "failed"], EVENT_TIMEOUT);
    assert_eq!(m["status"], "cancelled", "{m}");
    assert_runs_on(&mut p.src_qemu, &mut sq);
    // The destination's incoming migration broke off: it exited and never ran the guest.
    assert_destination_gave_up(&mut p.dst_qemu);
}

#[test]
fn a_crash_before_any_migration_leaves_the_waiting_destination_alone() {
    let Some(mut p) = start("mig6", &[]) else {
        return;
    };
    // The source host dies with no migration under way: the destination holds no image.
    p.source.signal(libc::SIGKILL);
    p.src_qemu.kill();
    let ev = p.backup.wait_event("migration-incomplete", EVENT_TIMEOUT);
    assert!(
        ev["error"]
            .as_str()
            .unwrap()
            .contains("no migration is arriving"),
        "{ev}"
    );
    assert_eq!(p.backup.wait_exit(EVENT_TIMEOUT).code(), Some(9));
    let mut dq = p.dst_qemu.qmp();
    assert_eq!(dq.status(), "inmigrate", "the destination was not resumed");
    assert!(p.dst_qemu.ticks().is_empty());
}
