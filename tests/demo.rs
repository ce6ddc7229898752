// SPDX-License-Identifier: Apache-2.0
//! The README's first command: `vmm-takeover demo` tells a true story and exits 0.

mod common;

use std::process::Command;

use common::{bin, skip};

fn demo(fault: &str) -> String {
    demo_with(&["--fault", fault])
}

/// `vmm-takeover demo ARGS`: its stdout, after checking it exited 0.
fn demo_with(args: &[&str]) -> String {
    let out = Command::new(bin()).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo {args:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether this machine can run the Linux guest (QEMU, the cloud kernel, busybox-static): the
/// same checks as the Linux guest tests; prints SKIPPED (fails in CI) when not.
fn linux_guest_available() -> bool {
    match common::linux::try_guest_image() {
        Ok(_) => true,
        Err(why) => {
            skip(&why);
            false
        }
    }
}

/// With a real KVM guest the demo replicates it: the backup resumes the source's guest, at or
/// above everything the source showed (the demo itself checks and fails otherwise).
fn assert_continued(out: &str) {
    if vmm_takeover_guest::DummyVm::probe().is_ok() {
        assert!(
            out.contains("full checkpoint applied to the paused standby"),
            "{out}"
        );
        assert!(out.contains("nothing it showed is taken back"), "{out}");
        assert!(
            out.contains("continuing the source's guest from counter"),
            "{out}"
        );
    }
}

#[test]
fn demo_kill_takes_over_and_the_guest_runs() {
    let out = demo("kill");
    assert!(out.contains("reason peer-closed"), "{out}");
    assert!(out.contains("guest instructions execute"), "{out}");
    assert!(out.contains("RESULT: takeover verified"), "{out}");
    assert_continued(&out);
}

#[test]
fn demo_stop_does_not_take_over() {
    let out = demo("stop");
    assert!(
        out.contains("received STAND_DOWN: not taking over"),
        "{out}"
    );
    assert!(out.contains("RESULT: orderly stop"), "{out}");
    assert!(!out.contains("resumed"), "{out}");
}

#[test]
fn demo_handoff_pauses_then_takes_over() {
    let out = demo("handoff");
    assert!(out.contains("guest paused at counter"), "{out}");
    assert!(out.contains("reason handoff"), "{out}");
    assert!(out.contains("RESULT: takeover verified"), "{out}");
    assert_continued(&out);
}

/// Without a usable /dev/kvm the demo says so and runs a clearly labelled simulation. /dev/kvm is
/// hidden by bind-mounting /dev/null over it in a private mount namespace (root only).
#[test]
fn demo_without_kvm_falls_back_to_a_labelled_simulation() {
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount --bind /dev/null /dev/kvm"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip("cannot hide /dev/kvm (needs root and unshare -m)");
        return;
    }
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} demo --fault kill",
        bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("/dev/kvm is not usable"), "{stdout}");
    assert!(stdout.contains("SIMULATED guest"), "{stdout}");
    assert!(stdout.contains("RESULT: takeover verified"), "{stdout}");
}

/// `--guest linux` (default fault: handoff): the real Linux guest migrates to the backup's QEMU
/// and its console carries on there, same boot; the source's QEMU is left in postmigrate.
#[test]
fn demo_linux_handoff_migrates_the_guest_and_it_carries_on() {
    if !linux_guest_available() {
        return;
    }
    let out = demo_with(&["--guest", "linux"]);
    assert!(out.contains("fault = handoff"), "{out}");
    assert!(
        out.contains("live migration to the backup's QEMU completed"),
        "{out}"
    );
    assert!(out.contains("reason handoff"), "{out}");
    assert!(out.contains("guest on source: counter "), "{out}");
    assert!(out.contains("QEMU now postmigrate"), "{out}");
    assert!(out.contains("— continues, no reboot"), "{out}");
    assert!(out.contains("RESULT: live handoff verified"), "{out}");
}

/// `--guest linux --fault stop`: the backup stands down; its QEMU never gets an image nor runs.
#[test]
fn demo_linux_stop_leaves_the_waiting_qemu_alone() {
    if !linux_guest_available() {
        return;
    }
    let out = demo_with(&["--guest", "linux", "--fault", "stop"]);
    assert!(
        out.contains("received STAND_DOWN: not taking over"),
        "{out}"
    );
    assert!(
        out.contains("its QEMU: status inmigrate, 0 guest lines"),
        "{out}"
    );
    assert!(out.contains("RESULT: orderly stop"), "{out}");
}

/// `--guest linux --fault kill` is a usage error, refused before anything starts (so no QEMU is
/// needed to check it): a standby QEMU waiting for a migration has nothing to resume after a
/// crash.
#[test]
fn demo_linux_refuses_kill_and_says_why() {
    let out = Command::new(bin())
        .args(["demo", "--guest", "linux", "--fault", "kill"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "it started anyway");
    assert!(
        stderr.contains("--fault kill is refused with --guest linux"),
        "{stderr}"
    );
    assert!(stderr.contains("holds no guest image"), "{stderr}");
    assert!(stderr.contains("nothing to resume"), "{stderr}");
    assert!(stderr.contains("exit 9, migration-incomplete"), "{stderr}");
}
