// SPDX-License-Identifier: Apache-2.0
//! Re-protection: a backup that took over becomes the pair's source (`--then-listen`), a new
//! backup joins it, and that backup takes over in turn. Real processes on loopback, real
//! signals, real KVM guests (`--vm kvm-dummy`; `--vm simulated` without a usable /dev/kvm, said
//! as `SKIPPED: ...`, which fails under `CI=true`).

mod common;
#[path = "../crates/arbiter-etcd/tests/common/etcd.rs"]
mod etcd;

use std::process::Command;

use common::*;
use serde_json::Value;

/// The guest to run: a real KVM guest where `/dev/kvm` works, else the simulated one.
fn vm_kind() -> &'static str {
    match vmm_takeover_guest::DummyVm::probe() {
        Ok(()) => "kvm-dummy",
        Err(e) => {
            skip(&format!(
                "no usable KVM ({e}): the kvm-dummy variant does not run; using --vm simulated"
            ));
            "simulated"
        }
    }
}

/// A source (`--heartbeat 10ms`) and a backup with `--then-listen`; the source is SIGKILLed and
/// the backup takes over and is promoted. Returns the dead source, the promoted process, its
/// address, and its `takeover` and `promoted` events.
fn promoted(pair: &str, kind: &str, arbiter: &[&str], extra: &[&str]) -> Promoted {
    let mut src_args = vec!["--vm", kind, "--heartbeat", "10ms"];
    src_args.extend_from_slice(arbiter);
    let (source, addr) = start_source("source", pair, &src_args);
    // `owner` comes before `listening`, which start_source waited for.
    let owner = source
        .all_events()
        .into_iter()
        .find(|e| e["event"] == "owner");
    assert_eq!(owner.is_some(), !arbiter.is_empty(), "{owner:?}");
    let mut b_args = vec![
        "--vm",
        kind,
        "--then-listen",
        "127.0.0.1:0",
        "--heartbeat-misses",
        "3",
    ];
    b_args.extend_from_slice(arbiter);
    b_args.extend_from_slice(extra);
    let b1 = start_backup("backup1", addr, pair, &b_args);
    let armed = b1.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(armed["heartbeat_us"], 10_000, "{armed}");
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    assert_eq!(b1.count("promoted"), 0, "promoted before any takeover");

    source.signal(libc::SIGKILL);
    let takeover = b1.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(takeover["role"], "backup", "{takeover}");
    let started = b1.wait_event("vm-started", EVENT_TIMEOUT);
    assert_eq!(started["role"], "backup", "{started}");
    let promoted = b1.wait_event("promoted", EVENT_TIMEOUT);
    assert_eq!(promoted["role"], "source", "{promoted}");
    assert_eq!(promoted["pair_id"], pair, "{promoted}");
    let listening = b1.wait_event("listening", EVENT_TIMEOUT);
    assert_eq!(listening["role"], "source", "{listening}");
    assert_eq!(
        listening["addr"], promoted["addr"],
        "{listening} {promoted}"
    );
    // The default heartbeat: the one the old source announced.
    assert_eq!(listening["heartbeat_us"], 10_000, "{listening}");
    let addr = promoted["addr"].as_str().unwrap().to_string();
    Promoted {
        _source: source,
        b1,
        addr,
        owner,
        takeover,
        promoted,
    }
}

struct Promoted {
    _source: Proc,
    b1: Proc,
    addr: String,
    owner: Option<Value>,
    takeover: Value,
    promoted: Value,
}

/// A second backup joins the promoted process and arms.
fn second_backup(p: &Promoted, pair: &str, kind: &str, arbiter: &[&str]) -> Proc {
    let mut args = vec!["--vm", kind, "--heartbeat-misses", "3"];
    args.extend_from_slice(arbiter);
    let b2 = start_backup("backup2", &p.addr, pair, &args);
    let armed = b2.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(armed["heartbeat_us"], 10_000, "{armed}");
    let joined = p.b1.wait_event("backup-joined", EVENT_TIMEOUT);
    assert_eq!(joined["role"], "source", "{joined}");
    b2
}

/// Every event of `p` up to `promoted` says `backup`, every one from it on says `source`.
fn assert_roles(p: &Proc) {
    let evs = p.all_events();
    let at = evs
        .iter()
        .position(|e| e["event"] == "promoted")
        .expect("a promoted event");
    for e in &evs[..at] {
        assert_eq!(e["role"], "backup", "before promotion: {e}");
    }
    for e in &evs[at..] {
        assert_eq!(e["role"], "source", "after promotion: {e}");
    }
}

fn status(control: &std::path::Path) -> Value {
    let out = Command::new(bin())
        .args(["status", "--control"])
        .arg(control)
        .output()
        .expect("run vmm-takeover status");
    assert!(out.status.success(), "status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

#[test]
fn a_promoted_backup_is_taken_over_by_the_next_backup() {
    let kind = vm_kind();
    let dir = TempDir::new("reprotect");
    let control = dir.path("b1.sock");
    let control_arg = control.display().to_string();
    let p = promoted("vm-re", kind, &[], &["--control", &control_arg]);
    assert_eq!(p.promoted["epoch"], Value::Null, "{}", p.promoted);
    let s = status(&control);
    assert_eq!(s["role"], "source", "{s}");
    assert_eq!(s["state"], "unprotected", "{s}");
    assert!(s["promoted_at_unix_us"].as_u64().is_some(), "{s}");
    assert_eq!(s["takeovers"]["peer-closed"], 1, "{s}");

    let mut b2 = second_backup(&p, "vm-re", kind, &[]);
    let s = status(&control);
    assert_eq!(
        (&s["state"], &s["backups"]),
        (&"protected".into(), &1.into()),
        "{s}"
    );
    // A source's figures, from the listener's counters: heartbeats sent, none received.
    assert!(s["heartbeats_sent"].is_u64(), "{s}");
    assert!(s["heartbeats_received"].is_null(), "{s}");

    let killed_at = now_us();
    p.b1.signal(libc::SIGKILL);
    let t = b2.wait_event("takeover", EVENT_TIMEOUT);
    assert!(
        t["detected_at_unix_us"].as_u64().unwrap() >= killed_at,
        "{t}"
    );
    b2.wait_event("vm-started", EVENT_TIMEOUT);
    assert_eq!(b2.count("takeover"), 1);
    // b2 has no --then-listen: it stays a backup running the guest.
    assert_eq!(b2.count("promoted"), 0);
    assert!(b2.running(), "the backup running the guest exited");
    assert_roles(&p.b1);
}

#[test]
fn sigterm_on_the_promoted_process_stands_the_next_backup_down() {
    let kind = vm_kind();
    let mut p = promoted("vm-re-stop", kind, &[], &[]);
    let mut b2 = second_backup(&p, "vm-re-stop", kind, &[]);
    p.b1.signal(libc::SIGTERM);
    b2.wait_event("stand-down", EVENT_TIMEOUT);
    assert!(b2.wait_exit(EVENT_TIMEOUT).success());
    for ev in ["takeover", "vm-started"] {
        assert_eq!(b2.count(ev), 0, "{ev}: {:?}", b2.event_names());
    }
    let stood = p.b1.wait_event("stood-down", EVENT_TIMEOUT);
    assert_eq!(stood["role"], "source", "{stood}");
    assert!(p.b1.wait_exit(EVENT_TIMEOUT).success());
    assert_roles(&p.b1);
}

#[test]
fn then_listen_needs_a_guest_this_process_runs() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "--connect",
            "127.0.0.1:1",
            "--pair-id",
            "x",
            "--insecure-no-auth",
        ];
        args.extend_from_slice(extra);
        Command::new(bin()).args(&args).output().unwrap()
    };
    for extra in [
        &["--then-listen", "127.0.0.1:0", "--on-takeover", "true"][..],
        &["--then-listen", "127.0.0.1:0"][..],
    ] {
        let out = run(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains("--vm") && err.contains("--qmp"),
            "{extra:?}: the error names what is allowed: {err}"
        );
    }
    let out = run(&["--vm", "simulated", "--then-heartbeat", "10ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--then-listen"), "{err}");
    let out = run(&[
        "--vm",
        "simulated",
        "--then-listen",
        "127.0.0.1:0",
        "--then-heartbeat",
        "1ns",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn with_an_arbiter_the_epoch_grows_across_both_takeovers() {
    let Some(server) = etcd::EtcdServer::start(etcd::EtcdOptions::fast()) else {
        return;
    };
    let kind = vm_kind();
    let url = format!("etcd://{}", server.client_addr());
    let arbiter = ["--arbiter", url.as_str(), "--lease-ttl", "2s"];
    let p = promoted("vm-re-arb", kind, &arbiter, &[]);
    let e0 = p.owner.as_ref().unwrap()["epoch"].as_u64().unwrap();
    let e1 = p.takeover["epoch"].as_u64().expect("takeover epoch");
    assert!(e1 > e0, "first takeover: {e1} after the source's {e0}");
    assert_eq!(p.promoted["epoch"], e1, "{}", p.promoted);

    let b2 = second_backup(&p, "vm-re-arb", kind, &arbiter);
    p.b1.signal(libc::SIGKILL);
    let t = b2.wait_event("takeover", EVENT_TIMEOUT);
    let e2 = t["epoch"].as_u64().expect("takeover epoch");
    assert!(e2 > e1, "second takeover: {e2} after the promoted {e1}");
    b2.wait_event("vm-started", EVENT_TIMEOUT);
    assert_eq!(b2.count("takeover"), 1);
    assert_roles(&p.b1);
    drop(b2);
    drop(server);
}

#[test]
fn a_promotion_that_cannot_bind_leaves_the_guest_running_unprotected() {
    let kind = vm_kind();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let (source, addr) = start_source("source", "vm-re-busy", &["--vm", kind]);
    let mut b1 = start_backup(
        "backup1",
        addr,
        "vm-re-busy",
        &["--vm", kind, "--then-listen", &busy],
    );
    b1.wait_event("armed", EVENT_TIMEOUT);
    source.signal(libc::SIGKILL);
    b1.wait_event("vm-started", EVENT_TIMEOUT);
    let w = b1.wait_event("warning", EVENT_TIMEOUT);
    assert_eq!(w["what"], "promotion-failed", "{w}");
    assert_eq!(w["role"], "backup", "{w}");
    // The guest keeps running here.
    let g = b1.wait_event("guest", EVENT_TIMEOUT);
    assert_eq!(g["running"], true, "{g}");
    assert!(b1.running(), "the process running the guest exited");
    assert_eq!(b1.count("promoted") + b1.count("listening"), 0);
    // SIGTERM ends it as a backup that runs its guest.
    b1.signal(libc::SIGTERM);
    let s = b1.wait_event("stopped", EVENT_TIMEOUT);
    assert_eq!(s["after_takeover"], true, "{s}");
    assert!(b1.wait_exit(EVENT_TIMEOUT).success());
}
