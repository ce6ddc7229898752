// SPDX-License-Identifier: Apache-2.0
//! The QMP hook against a real QEMU (`-S`, KVM, QMP on a unix socket), plus the error paths that
//! need no QEMU: a missing socket, a stale socket, a peer that is not QMP, a silent peer.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{record, skip, TempDir};
use vmm_takeover_core::{TakeoverReason, VmPause, VmStart};
use vmm_takeover_guest::qemu::find_qemu;
use vmm_takeover_guest::{DummyVm, QemuProcess, QmpClient, QmpError, QmpVm};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A paused QEMU, or `None` (after printing why) when QEMU or `/dev/kvm` is unavailable.
/// The returned process is killed and reaped on drop, also when the test panics.
fn qemu_or_skip() -> Option<QemuProcess> {
    if find_qemu().is_none() {
        skip("qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)");
        return None;
    }
    if let Err(e) = DummyVm::probe() {
        skip(format!("QEMU needs KVM here: {e}"));
        return None;
    }
    Some(QemuProcess::spawn_paused().expect("start qemu-system-x86_64"))
}

#[test]
fn cont_and_stop_drive_a_real_qemu() {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut vm = QmpVm::new(qemu.socket_path()).with_timeout(TIMEOUT);
    assert_eq!(vm.query_status().unwrap(), "prelaunch");

    vm.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert_eq!(vm.query_status().unwrap(), "running");
    // A second vm_start on a running guest is harmless.
    vm.vm_start(&record(TakeoverReason::PeerClosed, None))
        .unwrap();
    assert_eq!(vm.query_status().unwrap(), "running");

    vm.vm_pause().unwrap();
    assert_eq!(vm.query_status().unwrap(), "paused");
    vm.vm_pause().unwrap();
    assert_eq!(vm.query_status().unwrap(), "paused");

    vm.vm_start(&record(TakeoverReason::Handoff, None)).unwrap();
    assert_eq!(vm.query_status().unwrap(), "running");
    assert_eq!(
        VmStart::describe(&vm),
        format!("qmp:{}", qemu.socket_path().display())
    );
}

#[test]
fn qmp_error_surfaces_class_and_desc() {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut client = QmpClient::connect(qemu.socket_path(), TIMEOUT).unwrap();
    assert!(client.greeting().get("QMP").is_some());
    let err = client.execute("no-such-command", None).unwrap_err();
    match &err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QMP command error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("CommandNotFound"), "{msg}");
    // The session stays usable after an error reply.
    assert_eq!(client.query_status().unwrap().status, "prelaunch");
}

#[test]
fn dead_qemu_fails_vm_start_naming_the_socket() {
    let Some(mut qemu) = qemu_or_skip() else {
        return;
    };
    let path = qemu.socket_path().to_path_buf();
    qemu.kill().unwrap();
    let mut vm = QmpVm::new(&path).with_timeout(Duration::from_secs(2));
    let err = vm
        .vm_start(&record(TakeoverReason::Reset, None))
        .unwrap_err();
    // The socket file outlives a SIGKILLed QEMU: connecting is refused.
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(
        matches!(
            err.downcast_ref::<QmpError>(),
            Some(QmpError::Connect { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn missing_socket_names_the_path() {
    let dir = TempDir::new("qmp-missing");
    let path = dir.path("no-such.qmp");
    let mut vm = QmpVm::new(&path);
    let err = vm
        .vm_start(&record(TakeoverReason::TimedOut, None))
        .unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(matches!(
        err.downcast_ref::<QmpError>(),
        Some(QmpError::SocketMissing { .. })
    ));
    assert!(matches!(
        vm.query_status(),
        Err(QmpError::SocketMissing { .. })
    ));
}

#[test]
fn peer_that_is_not_qmp_is_rejected() {
    let dir = TempDir::new("qmp-notqmp");
    let path = dir.path("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    });
    let err = QmpClient::connect(&path, TIMEOUT).unwrap_err();
    assert!(matches!(err, QmpError::NotGreeting { .. }), "{err:?}");
    assert!(err.to_string().contains("SSH-2.0"), "{err}");
    server.join().unwrap();
}

#[test]
fn silent_peer_times_out() {
    let dir = TempDir::new("qmp-silent");
    let path = dir.path("silent.sock");
    // Bound but never accepted: the kernel completes the connection, nobody ever writes.
    let _listener = UnixListener::bind(&path).unwrap();
    let t0 = Instant::now();
    let err = QmpClient::connect(&path, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    assert!(t0.elapsed() < TIMEOUT);
}
