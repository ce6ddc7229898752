// SPDX-License-Identifier: Apache-2.0
//! The QMP hook against a real QEMU (`-S`, KVM, QMP on a unix socket), plus the error paths that
//! need no QEMU: a missing socket, a stale socket, a peer that is not QMP, a silent peer, a
//! listener whose backlog is full, and aborts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
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
fn vm_resume_conts_a_paused_qemu() {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut vm = QmpVm::new(qemu.socket_path()).with_timeout(TIMEOUT);
    // An abort while nothing runs changes nothing for later calls.
    let abort = VmPause::abort_handle(&vm).expect("the QMP hook can be aborted");
    abort();
    vm.vm_start(&record(TakeoverReason::Handoff, None)).unwrap();
    vm.vm_pause().unwrap();
    assert_eq!(vm.query_status().unwrap(), "paused");
    abort();
    vm.vm_resume().unwrap();
    assert_eq!(vm.query_status().unwrap(), "running");
    // Resuming a running guest is harmless.
    vm.vm_resume().unwrap();
    assert_eq!(vm.query_status().unwrap(), "running");
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

/// A unix listener with a listen backlog of 0 that never accepts, plus the one connection that
/// fills that backlog: any further `connect` waits for room that never comes.
fn full_listener(path: &Path) -> (UnixListener, UnixStream) {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr_un is valid; the path is short (a temp dir).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: `addr` is a valid sockaddr_un of the size passed.
    let rc = unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_un).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: listen(2) on our socket.
    let rc = unsafe { libc::listen(raw, 0) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    let listener = UnixListener::from(fd);
    // With a backlog of 0 the kernel queues exactly one connection.
    let filler = UnixStream::connect(path).expect("the first connection fits the backlog");
    (listener, filler)
}

#[test]
fn full_backlog_gives_a_connect_timeout_within_the_bound() {
    let dir = TempDir::new("qmp-backlog");
    let path = dir.path("full.sock");
    let (_listener, _filler) = full_listener(&path);
    let bound = Duration::from_millis(300);

    let t0 = Instant::now();
    let err = QmpClient::connect(&path, bound).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, QmpError::ConnectTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("backlog is full"), "{err}");
    assert!(took >= bound, "gave up after {took:?}, before {bound:?}");
    assert!(took < bound + TIMEOUT, "took {took:?}");

    // The hook: the same bound covers its whole call.
    let mut vm = QmpVm::new(&path).with_timeout(bound);
    let t0 = Instant::now();
    let err = vm
        .vm_start(&record(TakeoverReason::TimedOut, None))
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<QmpError>(),
            Some(QmpError::ConnectTimeout { .. })
        ),
        "{err:?}"
    );
    assert!(t0.elapsed() < bound + TIMEOUT);
}

#[test]
fn abort_ends_a_connect_blocked_on_a_full_backlog() {
    let dir = TempDir::new("qmp-backlog-abort");
    let path = dir.path("full.sock");
    let (_listener, _filler) = full_listener(&path);
    let mut vm = QmpVm::new(&path).with_timeout(Duration::from_secs(60));
    let abort = VmStart::abort_handle(&vm).unwrap();
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let runner = std::thread::spawn(move || {
        tx.send(vm.vm_start(&record(TakeoverReason::TimedOut, None)))
            .unwrap();
    });
    // The call cannot report when it is inside connect; an abort before the call began is a
    // no-op, so abort until the result arrives (bounded far below the 60 s timeout).
    let result = loop {
        abort();
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(result) => break result,
            Err(_) => assert!(t0.elapsed() < TIMEOUT, "the abort did not end the connect"),
        }
    };
    runner.join().unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<QmpError>(),
            Some(QmpError::Aborted { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn abort_handle_ends_a_call_waiting_for_a_reply() {
    let dir = TempDir::new("qmp-abort");
    let path = dir.path("mute.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (got_command, command_seen) = mpsc::channel();
    // A fake QMP server: greets, reads the first command, never answers; holds the connection
    // until the client goes.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        got_command.send(line).unwrap();
        let mut rest = String::new();
        let _ = reader.read_line(&mut rest); // EOF once the client has shut down
    });

    let mut vm = QmpVm::new(&path).with_timeout(Duration::from_secs(60));
    let abort = VmStart::abort_handle(&vm).unwrap();
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        tx.send(vm.vm_start(&record(TakeoverReason::TimedOut, None)))
            .unwrap();
    });
    let command = command_seen
        .recv_timeout(TIMEOUT)
        .expect("the client sent no command");
    assert!(command.contains("qmp_capabilities"), "{command}");
    // The client now blocks reading the reply; the abort must end that at once.
    let t0 = Instant::now();
    abort();
    let result = rx
        .recv_timeout(TIMEOUT)
        .expect("vm_start did not return after the abort");
    assert!(t0.elapsed() < TIMEOUT);
    runner.join().unwrap();
    server.join().unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<QmpError>(),
            Some(QmpError::Aborted { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("aborted"), "{err}");
}
