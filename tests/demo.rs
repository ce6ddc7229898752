// SPDX-License-Identifier: Apache-2.0
//! The README's first command: `vmm-takeover demo` tells a true story and exits 0.

mod common;

use std::process::Command;

use common::bin;

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
