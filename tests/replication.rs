// SPDX-License-Identifier: Apache-2.0
//! Remus-style replication through the CLI: real processes, real SIGKILL, real KVM guests that
//! dirty their memory, an authenticated replication stream on loopback.
//!
//! What a user relies on: after the source dies the backup's guest continues from the source's
//! state, at or above every output value the source ever showed (output commit), at most one
//! checkpoint behind; a checkpoint cut by the kill is never applied; a backup holding no
//! checkpoint of the link it lost starts nothing; the state survives a second failover.

mod common;
#[path = "../crates/arbiter-etcd/tests/common/etcd.rs"]
mod etcd;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Skips (visibly; fails under CI=true) without a usable /dev/kvm: replication needs KVM's
/// dirty log, which the simulated guest does not have.
fn kvm() -> bool {
    match vmm_takeover_guest::DummyVm::probe() {
        Ok(()) => true,
        Err(e) => {
            skip(&format!(
                "no usable KVM ({e}): replication needs KVM dirty logging"
            ));
            false
        }
    }
}

const GUEST: [&str; 6] = [
    "--vm",
    "kvm-dummy",
    "--guest-mem",
    "8MiB",
    "--guest-dirty-rate",
    "4MiB/s",
];

/// A replicating source; returns it, its heartbeat address and its replication address.
fn source(name: &str, pair: &str, opts: SpawnOpts, extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec![
        "source",
        "--listen",
        "127.0.0.1:0",
        "--pair-id",
        pair,
        // Detection is not what these tests measure (a kill is an EOF): a deadline of 200 ms
        // keeps a loaded machine from taking over early.
        "--heartbeat",
        "20ms",
        "--checkpoint",
        "25ms",
        "--replica-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(&GUEST);
    args.extend_from_slice(extra);
    let p = Proc::spawn_opts(name, &args, opts);
    let replica = p.wait_event("replica-listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = p.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    (p, addr, replica)
}

/// A backup replicating from `replica`, with `extra` flags.
fn backup(name: &str, addr: &str, replica: &str, pair: &str, extra: &[&str]) -> Proc {
    let mut args = if extra.contains(&"--guest-mem") {
        GUEST[..2].to_vec()
    } else {
        GUEST.to_vec()
    };
    args.extend_from_slice(&["--replica-from", replica, "--heartbeat-misses", "10"]);
    args.extend_from_slice(extra);
    start_backup(name, addr, pair, &args)
}

/// The first `name` event `p` printed, waiting for it; unlike `wait_event` it consumes nothing,
/// so events whose order is not fixed (the replication thread's and the loop's) can be awaited
/// in any order.
fn seen(p: &Proc, name: &str) -> Value {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(e) = p.all_events().into_iter().find(|e| e["event"] == name) {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: not within {EVENT_TIMEOUT:?}: {:?}",
            p.event_names()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Every `guest` counter `p` printed (its output, as released).
fn reported(p: &Proc) -> Vec<u64> {
    p.all_events()
        .iter()
        .filter(|e| e["event"] == "guest")
        .map(|e| e["counter"].as_u64().unwrap())
        .collect()
}

/// Every `checkpoint` event of `p` (checkpoints its backup acknowledged).
fn acked(p: &Proc) -> Vec<Value> {
    p.all_events()
        .into_iter()
        .filter(|e| e["event"] == "checkpoint")
        .collect()
}

/// Waits until `p` printed a `checkpoint` event with `seq >= n`.
fn wait_acked(p: &Proc, n: u64) {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while acked(p).last().map_or(0, |e| e["seq"].as_u64().unwrap()) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint {n} acknowledged: {:?}",
            p.event_names()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits until `p` reported a released counter above 0 in a `guest` event.
fn wait_output(p: &Proc) {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while !reported(p).iter().any(|&c| c > 0) {
        assert!(std::time::Instant::now() < deadline, "no output released");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn after_sigkill_the_backup_continues_the_guest_without_taking_back_output() {
    if !kvm() {
        return;
    }
    let pair = "repl-kill";
    let dir = TempDir::new("repl-kill");
    let control = dir.path("source.sock").display().to_string();
    let (src, addr, replica) = source("source", pair, SpawnOpts::new(), &["--control", &control]);
    // Output is held until a backup holds it: nothing is released without one.
    let first = src.wait_event("guest", EVENT_TIMEOUT);
    assert_eq!(first["output_commit"], true, "{first}");
    assert_eq!(first["counter"], 0, "{first}");
    // The guest runs (and dirties memory) before the backup joins: it must get a full copy.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let b = backup("backup", &addr, &replica, pair, &[]);
    let full = b.wait_event("checkpoint-applied", EVENT_TIMEOUT);
    assert_eq!(
        (&full["seq"], &full["full"]),
        (&1.into(), &true.into()),
        "{full}"
    );
    assert!(
        full["pages"].as_u64().unwrap() > 2,
        "the dirtied pages came: {full}"
    );
    wait_acked(&src, 10);
    wait_output(&src);
    // `status` shows the replica: up, acknowledged, and what is released.
    let out = Command::new(bin())
        .args(["status", "--control", &control])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &st["replica"];
    assert_eq!(r["connected"], true, "{st}");
    assert!(r["checkpoints"].as_u64().unwrap() >= 10, "{st}");
    assert!(r["last_pause_us"].as_u64().is_some(), "{st}");
    assert!(r["mark"].as_u64().unwrap() > 0, "{st}");

    src.signal(libc::SIGKILL);
    let started = seen(&b, "vm-started");
    let resumed = started["guest_counter"].as_u64().unwrap();
    let seq = started["checkpoint_seq"].as_u64().unwrap();
    let mark = started["checkpoint_mark"].as_u64().unwrap();
    assert!(resumed >= mark, "{started}");
    // Output commit: nothing the source ever showed is taken back.
    let shown = reported(&src).into_iter().max().unwrap();
    let acks = acked(&src);
    let released = acks
        .iter()
        .map(|e| e["released"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        mark >= shown && mark >= released,
        "resumed at {mark}, source showed {shown}, released {released}"
    );
    // At most one checkpoint behind: the last acknowledged one, or the one taken after it.
    let last = acks.last().unwrap();
    let last_seq = last["seq"].as_u64().unwrap();
    assert!(
        seq == last_seq || seq == last_seq + 1,
        "resumed {seq}, last acked {last}"
    );
    if seq == last_seq {
        assert_eq!(mark, last["released"].as_u64().unwrap(), "{last}");
    }
    // The same guest continues: its counter goes on from there, it does not restart at 0.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let g = b.wait_event("guest", EVENT_TIMEOUT);
        if g["running"] == true && g["counter"].as_u64().unwrap() > resumed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{g}");
    }
    // The kill may well cut the checkpoint under way: that one, and only that one, is dropped.
    for d in b
        .all_events()
        .iter()
        .filter(|e| e["event"] == "checkpoint-discarded")
    {
        assert_eq!(d["seq"].as_u64().unwrap(), seq + 1, "{d}");
    }
}

#[test]
fn a_checkpoint_cut_by_the_kill_is_never_applied() {
    if !kvm() {
        return;
    }
    let pair = "repl-cut";
    let opts = SpawnOpts::new().env("VMM_TAKEOVER_FAULT", "checkpoint-stall:6");
    let (src, addr, replica) = source("source", pair, opts, &[]);
    let b = backup("backup", &addr, &replica, pair, &[]);
    let fault = src.wait_event("fault-injected", EVENT_TIMEOUT);
    assert_eq!(fault["seq"], 6, "{fault}");
    // Killed in the middle of checkpoint 6: its BEGIN and first pages are on the wire.
    src.signal(libc::SIGKILL);
    let discarded = seen(&b, "checkpoint-discarded");
    assert_eq!(discarded["seq"], 6, "{discarded}");
    let started = seen(&b, "vm-started");
    assert_eq!(started["checkpoint_seq"], 5, "{started}");
    let five = acked(&src)
        .into_iter()
        .find(|e| e["seq"] == 5)
        .expect("checkpoint 5 acknowledged");
    assert_eq!(
        started["checkpoint_mark"], five["released"],
        "{started} {five}"
    );
    let shown = reported(&src).into_iter().max().unwrap_or(0);
    assert!(
        started["guest_counter"].as_u64().unwrap() >= shown,
        "{started}, shown {shown}"
    );
}

#[test]
fn a_backup_without_a_checkpoint_of_the_lost_link_starts_nothing() {
    if !kvm() {
        return;
    }
    let pair = "repl-none";
    let (src, addr, _replica) = source("source", pair, SpawnOpts::new(), &[]);
    // Its replication goes to a port where nothing listens: it never holds a checkpoint.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut b = backup("backup", &addr, &nowhere, pair, &[]);
    seen(&b, "armed");
    seen(&b, "replica-refused");
    src.signal(libc::SIGKILL);
    seen(&b, "takeover");
    let missing = seen(&b, "replica-missing");
    assert!(
        missing["error"]
            .as_str()
            .unwrap()
            .contains("no checkpoint was ever applied"),
        "{missing}"
    );
    assert_eq!(b.wait_exit(EVENT_TIMEOUT).code(), Some(10));
    assert_eq!(b.count("vm-started"), 0);
    assert!(
        reported(&b).is_empty()
            || b.all_events()
                .iter()
                .filter(|e| e["event"] == "guest")
                .all(|e| e["running"] == false),
        "the standby never ran"
    );
}

#[test]
fn a_standby_of_another_size_says_so_and_never_takes_over_from_it() {
    if !kvm() {
        return;
    }
    let pair = "repl-size";
    let (src, addr, replica) = source("source", pair, SpawnOpts::new(), &[]);
    let mut b = backup("backup", &addr, &replica, pair, &["--guest-mem", "4MiB"]);
    let failed = seen(&b, "replica-failed");
    let why = failed["why"].as_str().unwrap();
    assert!(
        why.contains("2048 pages (8 MiB)") && why.contains("--guest-mem"),
        "{failed}"
    );
    src.signal(libc::SIGKILL);
    seen(&b, "replica-missing");
    assert_eq!(b.wait_exit(EVENT_TIMEOUT).code(), Some(10));
    assert_eq!(b.count("replica-failed"), 1, "reported once, not retried");
}

#[test]
fn the_guest_state_survives_two_failovers_through_re_protection() {
    if !kvm() {
        return;
    }
    let pair = "repl-chain";
    let (a, addr_a, replica_a) = source("a", pair, SpawnOpts::new(), &[]);
    let b = backup(
        "b",
        &addr_a,
        &replica_a,
        pair,
        &[
            "--then-listen",
            "127.0.0.1:0",
            "--then-checkpoint",
            "25ms",
            "--then-replica-listen",
            "127.0.0.1:0",
        ],
    );
    b.wait_event("checkpoint-applied", EVENT_TIMEOUT);
    wait_acked(&a, 5);
    wait_output(&a);
    a.signal(libc::SIGKILL);
    let first = seen(&b, "vm-started");
    let a_shown = reported(&a).into_iter().max().unwrap();
    assert!(
        first["checkpoint_mark"].as_u64().unwrap() >= a_shown,
        "{first}, A showed {a_shown}"
    );
    let addr_b = seen(&b, "promoted")["addr"].as_str().unwrap().to_string();
    let replica_b = seen(&b, "replica-listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let c = backup("c", &addr_b, &replica_b, pair, &[]);
    let full = c.wait_event("checkpoint-applied", EVENT_TIMEOUT);
    // Replicating, the promoted source serves one backup (its replica's): another is refused.
    let _d = start_backup("d", &addr_b, pair, &["--heartbeat-misses", "10"]);
    let refused = seen(&b, "backup-rejected");
    assert_eq!(refused["role"], "source", "{refused}");
    assert_eq!(full["full"], true, "{full}");
    assert!(
        full["mark"].as_u64().unwrap() >= first["checkpoint_mark"].as_u64().unwrap(),
        "{full}"
    );
    wait_acked(&b, 5);
    b.signal(libc::SIGKILL);
    let second = seen(&c, "vm-started");
    let b_shown = reported(&b).into_iter().max().unwrap();
    let mark = second["checkpoint_mark"].as_u64().unwrap();
    assert!(mark >= b_shown, "{second}, B showed {b_shown}");
    // The same guest through both failovers: it never went back below where A left it.
    assert!(
        mark > first["checkpoint_mark"].as_u64().unwrap(),
        "{second} {first}"
    );
}

#[test]
fn replication_flags_are_checked_at_start() {
    let run = |args: &[&str]| Command::new(bin()).args(args).output().unwrap();
    let base = [
        "source",
        "--listen",
        "127.0.0.1:0",
        "--pair-id",
        "x",
        "--insecure-no-auth",
    ];
    let mut args = base.to_vec();
    args.extend_from_slice(&[
        "--vm",
        "simulated",
        "--checkpoint",
        "25ms",
        "--replica-listen",
        "127.0.0.1:0",
    ]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--checkpoint needs --vm kvm-dummy"),
        "{out:?}"
    );
    let mut args = base.to_vec();
    args.extend_from_slice(&["--vm", "kvm-dummy", "--checkpoint", "25ms"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replica-listen"),
        "{out:?}"
    );
    let mut args = base.to_vec();
    args.extend_from_slice(&["--vm", "kvm-dummy", "--guest-mem", "5G"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("128KiB..=4GiB"),
        "{out:?}"
    );
    let out = run(&[
        "backup",
        "--connect",
        "127.0.0.1:1",
        "--pair-id",
        "x",
        "--insecure-no-auth",
        "--vm",
        "simulated",
        "--replica-from",
        "127.0.0.1:2",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replica-from needs --vm kvm-dummy"),
        "{out:?}"
    );
}

#[test]
fn a_planned_handoff_resumes_exactly_where_the_guest_stopped() {
    if !kvm() {
        return;
    }
    let pair = "repl-handoff";
    let (mut src, addr, replica) = source("source", pair, SpawnOpts::new(), &[]);
    let b = backup("backup", &addr, &replica, pair, &[]);
    seen(&b, "checkpoint-applied");
    wait_acked(&src, 5);
    src.signal(libc::SIGUSR1);
    seen(&src, "handoff-complete");
    assert!(src.wait_exit(EVENT_TIMEOUT).success());
    // The last checkpoint was taken with the guest paused right after it, and acknowledged
    // before HANDOFF left: the backup resumes from exactly there, no progress lost.
    let last = acked(&src).pop().unwrap();
    assert_eq!(last["last"], true, "{last}");
    let started = seen(&b, "vm-started");
    assert_eq!(started["checkpoint_seq"], last["seq"], "{started} {last}");
    assert_eq!(
        started["checkpoint_mark"], last["released"],
        "{started} {last}"
    );
    // What the source showed when paused for the handoff (its `guest` report right before
    // `handoff-paused`) is that same position.
    let evs = src.all_events();
    let at = evs
        .iter()
        .position(|e| e["event"] == "handoff-paused")
        .unwrap();
    let paused = &evs[at - 1];
    assert_eq!(paused["event"], "guest", "{paused}");
    assert_eq!(paused["running"], false, "{paused}");
    assert_eq!(paused["counter"], last["released"], "{paused} {last}");
    let takeover = seen(&b, "takeover");
    assert_eq!(takeover["reason"], "handoff", "{takeover}");
}

/// `etcdctl` against `server`: the replica of record as the arbiter holds it.
fn etcdctl(server: &etcd::EtcdServer, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.client_addr()))
        .args(args)
        .output()
        .expect("etcdctl (package etcd-client) runs");
    assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A replicating source and backup, both under the arbiter at `server`; returns them, once the
/// backup holds a checkpoint and the source released output, with the stream's link id.
fn arbitrated(server: &etcd::EtcdServer, pair: &str) -> (Proc, Proc, String) {
    let url = format!("etcd://{}", server.client_addr());
    let arbiter = ["--arbiter", url.as_str(), "--lease-ttl", "2s"];
    let (src, addr, replica) = source("source", pair, SpawnOpts::new(), &arbiter);
    let b = backup("backup", &addr, &replica, pair, &arbiter);
    let link = seen(&src, "replica-connected")["link"]
        .as_str()
        .unwrap()
        .to_string();
    wait_acked(&src, 5);
    wait_output(&src);
    (src, b, link)
}

#[test]
fn with_an_arbiter_the_source_records_its_replica_and_the_standby_resumes_it() {
    if !kvm() {
        return;
    }
    let Some(server) = etcd::EtcdServer::start(etcd::EtcdOptions::fast()) else {
        return;
    };
    let pair = "repl-arb";
    let (src, b, link) = arbitrated(&server, pair);
    // The arbiter names the stream's link as the replica of record before output is released.
    let key = format!("/vmm-takeover/pairs/{pair}/replica");
    let got = etcdctl(&server, &["get", "--print-value-only", &key]);
    assert_eq!(got.trim(), link, "{got:?}");
    src.signal(libc::SIGKILL);
    // The lease runs out (2 s), the backup wins, reads the record, resumes its replica.
    let started = seen(&b, "vm-started");
    let shown = reported(&src).into_iter().max().unwrap();
    assert!(
        started["checkpoint_mark"].as_u64().unwrap() >= shown,
        "{started}, shown {shown}"
    );
    assert!(
        started["checkpoint_seq"].as_u64().unwrap() >= 5,
        "{started}"
    );
}

#[test]
fn with_an_arbiter_a_standby_whose_link_is_not_on_record_starts_nothing() {
    if !kvm() {
        return;
    }
    let Some(server) = etcd::EtcdServer::start(etcd::EtcdOptions::fast()) else {
        return;
    };
    let pair = "repl-arb-old";
    let (src, mut b, link) = arbitrated(&server, pair);
    // Another backup's link is now on record (as when this backup lost its link to a live
    // source, another one synced and output was released on its acknowledgements).
    let key = format!("/vmm-takeover/pairs/{pair}/replica");
    let other = "0123456789abcdef0123456789abcdef";
    assert_ne!(link, other);
    etcdctl(&server, &["put", &key, other]);
    src.signal(libc::SIGKILL);
    let missing = seen(&b, "replica-missing");
    let why = missing["error"].as_str().unwrap();
    assert!(
        why.contains("replica of record") && why.contains(other),
        "{missing}"
    );
    assert_eq!(b.wait_exit(EVENT_TIMEOUT).code(), Some(10));
    assert_eq!(b.count("vm-started"), 0);
    // The pair was won (the guest would have started there): the refusal is replication's.
    assert_eq!(seen(&b, "takeover")["reason"], "peer-closed");
}
