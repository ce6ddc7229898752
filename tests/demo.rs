// SPDX-License-Identifier: Apache-2.0
//! The README's first command: `vmm-takeover demo` tells a true story and exits 0.

mod common;

use std::process::Command;

use common::{bin, skip};

fn demo(fault: &str) -> String {
    let out = Command::new(bin())
        .args(["demo", "--fault", fault])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo --fault {fault} failed: {stdout}"
    );
    stdout
}

#[test]
fn demo_kill_takes_over_and_the_guest_runs() {
    let out = demo("kill");
    assert!(out.contains("reason peer-closed"), "{out}");
    assert!(out.contains("guest instructions execute"), "{out}");
    assert!(out.contains("RESULT: takeover verified"), "{out}");
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
