// SPDX-License-Identifier: Apache-2.0
//! Real QEMU behind vm_start: the CLI resumes a paused QEMU over QMP when the source dies, and a
//! handoff stops the source's QEMU before the backup's runs.

mod common;

use common::*;
use vmm_takeover_guest::{QemuError, QemuProcess, QmpVm};

/// A paused QEMU, or `None` (with a SKIPPED line) where QEMU or KVM is missing.
fn qemu() -> Option<QemuProcess> {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip("no /dev/kvm: QEMU runs with accel=kvm");
        return None;
    }
    match QemuProcess::spawn_paused() {
        Ok(q) => Some(q),
        Err(QemuError::NotInstalled) => {
            skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
            None
        }
        Err(e) => panic!("QEMU failed to start: {e}"),
    }
}

fn status(q: &QemuProcess) -> String {
    QmpVm::new(q.socket_path()).query_status().unwrap()
}

#[test]
fn source_killed_resumes_the_backups_qemu() {
    let Some(standby) = qemu() else { return };
    assert_eq!(status(&standby), "prelaunch");
    let qmp = standby.socket_path().to_str().unwrap().to_string();
    let (source, addr) = start_source("source", "vm-qemu", &[]);
    let mut backup = start_backup("backup", addr, "vm-qemu", &["--qmp", &qmp]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(
        status(&standby),
        "prelaunch",
        "the standby ran before any failure"
    );
    source.signal(libc::SIGKILL);
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "peer-closed"
    );
    let started = backup.wait_event("vm-started", EVENT_TIMEOUT);
    println!("QMP cont -> running took {} us", started["took_us"]);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(status(&standby), "running");
}

#[test]
fn handoff_stops_the_source_qemu_before_the_backup_qemu_runs() {
    let Some(primary) = qemu() else { return };
    let Some(standby) = qemu() else { return };
    // The primary runs, as a source VM would.
    QmpVm::new(primary.socket_path()).cont().unwrap();
    assert_eq!(status(&primary), "running");
    let (pq, sq) = (
        primary.socket_path().to_str().unwrap().to_string(),
        standby.socket_path().to_str().unwrap().to_string(),
    );
    let (mut source, mut backup, _) = armed_pair("vm-qho", &["--qmp", &pq], &["--qmp", &sq]);
    source.signal(libc::SIGUSR1);
    let sent = source.wait_event("handoff-sent", EVENT_TIMEOUT);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
    // HANDOFF leaves only after `stop` was confirmed, so the primary is paused by now.
    assert_eq!(status(&primary), "paused");
    assert_eq!(
        backup.wait_event("takeover", EVENT_TIMEOUT)["reason"],
        "handoff"
    );
    let started = backup.wait_event("vm-started", EVENT_TIMEOUT);
    assert!(backup.wait_exit(EVENT_TIMEOUT).success());
    assert_eq!(status(&standby), "running");
    assert!(
        sent["at_unix_us"].as_u64() < started["at_unix_us"].as_u64(),
        "the standby ran before the primary was stopped"
    );
    assert_eq!(status(&primary), "paused", "never two running copies");
}

#[test]
fn missing_qmp_socket_fails_the_hook_with_exit_3() {
    let (source, addr) = start_source("source", "vm-noqmp", &[]);
    let mut backup = start_backup(
        "backup",
        addr,
        "vm-noqmp",
        &["--qmp", "/nonexistent/qmp.sock"],
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    let failed = backup.wait_event("vm-start-failed", EVENT_TIMEOUT);
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/qmp.sock"),
        "{failed}"
    );
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(3));
}
