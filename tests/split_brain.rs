// SPDX-License-Identifier: Apache-2.0
//! The split-brain guard end to end: three hosts in network namespaces on one switch (source,
//! backup, and a witness running a real etcd), the real binary on each, real KVM guests
//! (`--vm kvm-dummy`), faults made with iptables, `ip link` and signals (see `common/lab.rs`).
//!
//! Every pair runs with `--arbiter etcd://WITNESS:2379 --lease-ttl 2s`, the source with
//! `--heartbeat 50ms` (failsafe grace 150 ms). All times are read from the events'
//! `at_unix_us` and the test's own clock around each fault (one host, one clock).
//!
//! Needs root, iptables, etcd; otherwise each test prints `SKIPPED: <why>` and returns (and
//! fails under `CI=true`). Without a usable `/dev/kvm` the guests are `--vm simulated` (said as
//! `SKIPPED: ...` too, so that CI, which has KVM, fails).

mod common;
#[path = "../crates/arbiter-etcd/tests/common/etcd.rs"]
mod etcd;
#[path = "common/lab.rs"]
mod lab;

use std::time::{Duration, Instant};

use common::*;
use lab::*;
use serde_json::Value;

/// Exit code of a process that does not own the pair (fenced, or found it owned).
const EXIT_OWNED: i32 = 4;

/// Sends SIGCONT when dropped: a stopped process never outlives the test stopped.
struct ContGuard(i32);

impl Drop for ContGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// Asserts that `p`'s guest ran all through `from_us..to_us`: a report about every 500 ms, each
/// saying it runs, each counter larger than the one before.
fn assert_guest_runs(p: &Proc, from_us: u64, to_us: u64, ctx: &str) {
    let rs = reports(p, from_us, to_us);
    let expected = ((to_us - from_us) / 500_000).saturating_sub(2) as usize;
    assert!(
        rs.len() >= expected.max(1),
        "{ctx}: {} guest reports in {} ms (expected >= {expected}): {rs:?}",
        rs.len(),
        (to_us - from_us) / 1000
    );
    assert!(
        rs.iter().all(|r| r.running),
        "{ctx}: the guest stopped running: {rs:?}"
    );
    assert!(
        rs.windows(2).all(|w| w[1].counter > w[0].counter),
        "{ctx}: the guest counter did not grow from report to report: {rs:?}"
    );
}

/// Asserts that no backup took over or started anything, and that the source was not
/// fenced and still runs.
fn assert_single_copy_at_source(rig: &mut Rig, ctx: &str) {
    for b in &mut rig.backups {
        for ev in ["arbitration-won", "takeover", "vm-started"] {
            assert!(
                named(b, ev).is_empty(),
                "{ctx}: {} printed {ev}: {:?}",
                b.name,
                b.all_events()
            );
        }
        assert!(b.running(), "{ctx}: {} exited", b.name);
    }
    let fenced = named(&rig.source, "fenced");
    assert!(
        fenced.is_empty(),
        "{ctx}: the source was fenced: {fenced:?}; the backups' link losses (a heartbeat gap \
         ends the failsafe): {:?}; source events: {:?}",
        rig.backups
            .iter()
            .flat_map(|b| named(b, "link-lost"))
            .collect::<Vec<_>>(),
        rig.source.all_events()
    );
    assert!(rig.source.running(), "{ctx}: the source exited");
}

/// The guest logs where it stopped: `counter frozen at N` when the vCPU's run deadline stopped
/// it, `guest paused at counter N` when the fence's pause came first. `N` must be the counter
/// `fenced` reported: nothing ran between the two. (Log lines, read from stderr: no event says
/// it, and the source exits right after `fenced`.)
fn assert_frozen_at(p: &Proc, counter: u64, ctx: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let line = loop {
        let found = p.stderr_lines().into_iter().find(|l| {
            l.contains("counter frozen at ") || l.contains("kvm-dummy: guest paused at counter ")
        });
        if let Some(l) = found {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: the source's stderr does not say where its guest stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let n: u64 = line
        .rsplit(" at counter ")
        .next()
        .filter(|_| line.contains(" at counter "))
        .or_else(|| line.rsplit("counter frozen at ").next())
        .and_then(|t| t.trim_end_matches(')').trim().parse().ok())
        .unwrap_or_else(|| panic!("{ctx}: cannot read the counter in {line:?}"));
    assert_eq!(n, counter, "{ctx}: {line}");
}

/// Waits for `p` to exit with `code` within `timeout`.
fn assert_exit(p: &mut Proc, code: i32, timeout: Duration, ctx: &str) {
    let status = p.wait_exit(timeout);
    assert_eq!(
        status.code(),
        Some(code),
        "{ctx}: {} exited with {status}; events: {:?}",
        p.name,
        p.event_names()
    );
}

/// The backup's copy runs: `vm-started`, then a report of its guest running with a larger
/// counter.
fn assert_copy_runs(b: &Proc, started: &Value, ctx: &str) {
    let c0 = started["guest_counter"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if reports(b, at(started), u64::MAX)
            .iter()
            .any(|r| r.running && r.counter > c0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: the backup's guest does not run after vm-started: {:?}",
            reports(b, 0, u64::MAX)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A partition between source and backup, both still reaching etcd: the source keeps the pair
/// and its guest, the backup waits on the arbiter and starts nothing; healed, it arms again.
#[test]
fn partition_between_source_and_backup_starts_no_second_copy() {
    let Some(mut rig) = Rig::start("part", &["bak"]) else {
        return;
    };
    let fault = rig.lab.partition("src", "bak").unwrap();
    std::thread::sleep(TTL * 3);
    let end = now_us();
    let ctx = "partition src<->bak";
    // The partition was noticed, and the arbiter said no.
    let lost = expect_since(
        rig.backup(),
        "link-lost",
        fault.before_us,
        Duration::ZERO,
        ctx,
    );
    let wait = expect_since(
        rig.backup(),
        "arbitration-wait",
        fault.before_us,
        Duration::ZERO,
        ctx,
    );
    assert_eq!(wait["holder"], rig.holder(), "{ctx}: {wait}");
    println!(
        "{ctx}: link lost after {} ms ({}), the arbiter names the source as holder",
        (at(&lost) - fault.before_us) / 1000,
        lost["reason"]
    );
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, fault.after_us, end, ctx);

    let healed = rig.lab.heal().unwrap();
    let armed = expect_since(
        rig.backup(),
        "armed",
        healed.before_us,
        EVENT_TIMEOUT,
        "after healing",
    );
    println!(
        "{ctx}: healed; the backup armed again after {} ms",
        (at(&armed) - healed.before_us) / 1000
    );
    // A grant that comes late would be given back, never used: look a little longer.
    std::thread::sleep(Duration::from_secs(1));
    assert_single_copy_at_source(&mut rig, "after healing");
    assert_guest_runs(&rig.source, healed.after_us, now_us(), "after healing");
    assert_eq!(
        rig.etcd.owner(&rig.pair).unwrap().as_deref(),
        Some(rig.holder())
    );
}

/// The source host cut off from everyone (its cable pulled at the switch): it fences itself
/// before the arbiter can give the pair away, the backup's copy starts within TTL + 1.5 s of the
/// cut, and the fenced guest never runs again.
#[test]
fn isolated_source_host_fences_before_the_backup_starts() {
    let Some(mut rig) = Rig::start("isosrc", &["bak"]) else {
        return;
    };
    let ctx = "source host isolated";
    let cut = rig.lab.unplug("src").unwrap();
    let started = expect_since(
        rig.backup(),
        "vm-started",
        cut.before_us,
        EVENT_TIMEOUT,
        ctx,
    );
    let fenced = expect_since(&rig.source, "fenced", cut.before_us, EVENT_TIMEOUT, ctx);
    let takeover = named(rig.backup(), "takeover").pop().unwrap();
    let (t_fence, t_start) = (at(&fenced), at(&started));
    println!(
        "{ctx}: fenced {} ms after the cut, vm-started {} ms after the cut; gap {} ms; {fenced}",
        (t_fence as i64 - cut.before_us as i64) / 1000,
        (t_start as i64 - cut.before_us as i64) / 1000,
        (t_start as i64 - t_fence as i64) / 1000
    );
    assert!(
        t_fence < t_start,
        "{ctx}: the backup's copy started {} us BEFORE the source fenced itself",
        t_fence - t_start
    );
    let bound = TTL + Duration::from_millis(1500);
    assert!(
        t_start - cut.before_us <= us(bound),
        "{ctx}: vm-started {} ms after the cut (bound {bound:?})",
        (t_start - cut.before_us) / 1000
    );
    assert!(
        takeover["epoch"].as_u64().unwrap() > rig.epoch(),
        "{ctx}: {takeover} vs {}",
        rig.owner
    );
    assert_eq!(fenced["guest_running"], false, "{ctx}: {fenced}");
    assert_exit(&mut rig.source, EXIT_OWNED, EVENT_TIMEOUT, ctx);
    // Not one instruction after the fence. The source exits right after `fenced`, so there is
    // usually no later `guest` report to look at; the vCPU's own log line says where it froze.
    let c = fenced["guest_counter"].as_u64().expect("guest_counter");
    let later = reports(&rig.source, t_fence, u64::MAX);
    assert!(
        later.iter().all(|r| r.counter == c && !r.running),
        "{ctx}: the fenced guest moved after fenced (counter {c}): {later:?}"
    );
    assert_frozen_at(&rig.source, c, ctx);
    println!(
        "{ctx}: {} guest report(s) after fenced; the vCPU froze at {c}",
        later.len()
    );
    assert_copy_runs(rig.backup(), &started, ctx);
    assert_eq!(named(rig.backup(), "vm-started").len(), 1);
}

/// SIGKILL of the source process: one running copy again within TTL + 1 s.
#[test]
fn killed_source_is_replaced_within_ttl_plus_one_second() {
    let Some(rig) = Rig::start("kill", &["bak"]) else {
        return;
    };
    let ctx = "source SIGKILLed";
    let before_us = now_us();
    rig.source.signal(libc::SIGKILL);
    let started = expect_since(rig.backup(), "vm-started", before_us, EVENT_TIMEOUT, ctx);
    let took = at(&started) - before_us;
    println!("{ctx}: vm-started {} ms after the kill", took / 1000);
    assert!(
        took <= us(TTL + Duration::from_secs(1)),
        "{ctx}: vm-started {} ms after the kill (bound TTL + 1 s)",
        took / 1000
    );
    let takeover = named(rig.backup(), "takeover").pop().unwrap();
    assert_eq!(takeover["reason"], "peer-closed", "{takeover}");
    assert!(takeover["epoch"].as_u64().unwrap() > rig.epoch());
    assert_copy_runs(rig.backup(), &started, ctx);
}

/// A planned handoff: the source pauses its guest and passes the pair; the backup's copy runs
/// within milliseconds, under a larger epoch.
#[test]
fn planned_handoff_starts_the_copy_at_once_under_a_larger_epoch() {
    let Some(mut rig) = Rig::start("handoff", &["bak"]) else {
        return;
    };
    let ctx = "planned handoff";
    let before_us = now_us();
    rig.source.signal(libc::SIGUSR1);
    let started = expect_since(rig.backup(), "vm-started", before_us, EVENT_TIMEOUT, ctx);
    let complete = expect_since(
        &rig.source,
        "handoff-complete",
        before_us,
        EVENT_TIMEOUT,
        ctx,
    );
    let took = at(&started) - before_us;
    println!(
        "{ctx}: vm-started {:.3} ms after SIGUSR1 (goal ~100 ms); {complete}",
        took as f64 / 1000.0
    );
    assert!(
        took <= 1_000_000,
        "{ctx}: vm-started {} ms after the request",
        took / 1000
    );
    let takeover = named(rig.backup(), "takeover").pop().unwrap();
    assert_eq!(takeover["reason"], "handoff", "{takeover}");
    assert!(
        takeover["epoch"].as_u64().unwrap() > rig.epoch(),
        "{ctx}: backup {takeover} vs source {}",
        rig.owner
    );
    assert_exit(&mut rig.source, 0, EVENT_TIMEOUT, ctx);
    // The source's guest was paused before HANDOFF left and never ran again.
    // (The report that `handoff-paused` comes with is printed just before it.)
    let paused = expect_since(
        &rig.source,
        "handoff-paused",
        before_us,
        Duration::ZERO,
        ctx,
    );
    let all = reports(&rig.source, 0, u64::MAX);
    let from = all.iter().rposition(|r| r.at <= at(&paused)).unwrap();
    let after = &all[from..];
    assert!(
        !after.is_empty()
            && after
                .iter()
                .all(|r| !r.running && r.counter == after[0].counter),
        "{ctx}: the source's guest after the pause: {after:?}"
    );
    assert!(named(&rig.source, "fenced").is_empty());
    assert_copy_runs(rig.backup(), &started, ctx);
}

/// etcd hangs (SIGSTOP) for 3 × TTL on a healthy link: the failsafe keeps the source running
/// (its backup is heard from), nothing takes over; after SIGCONT the pair is the source's.
#[test]
fn paused_etcd_with_a_healthy_link_fences_nothing() {
    let Some(mut rig) = Rig::start("etcdstop", &["bak"]) else {
        return;
    };
    let ctx = "etcd SIGSTOPped";
    let fault = rig.etcd.pause();
    std::thread::sleep(TTL * 3);
    let cont_us = now_us();
    rig.etcd.resume();
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, fault.after_us, cont_us, ctx);
    // After the pause: the lease may have expired meanwhile; the source then owns the pair
    // again under a new lease and a larger epoch.
    std::thread::sleep(TTL * 2);
    let ctx = "after SIGCONT of etcd";
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, cont_us, now_us(), ctx);
    let owners = named(&rig.source, "owner");
    for o in &owners[1..] {
        assert!(
            o["epoch"].as_u64().unwrap() > rig.epoch(),
            "{ctx}: a new owner event without a larger epoch: {o}"
        );
    }
    println!(
        "{ctx}: owner events {:?}",
        owners.iter().map(|o| &o["epoch"]).collect::<Vec<_>>()
    );
    let owner = rig.etcd.owner(&rig.pair).unwrap();
    assert_eq!(owner.as_deref(), Some(rig.holder()), "{ctx}: etcd owner");
}

/// etcd killed and started again (same data): leases survive and are renewed by the new
/// leader; in the downtime the failsafe keeps the source running. Nothing fenced, no takeover.
#[test]
fn restarted_etcd_fences_nothing() {
    let Some(mut rig) = Rig::start("etcdrst", &["bak"]) else {
        return;
    };
    let ctx = "etcd restarted";
    let t = rig.etcd.restart();
    println!(
        "{ctx}: etcd answered again {} ms after the kill",
        (t.after_us - t.before_us) / 1000
    );
    std::thread::sleep(TTL * 2);
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, t.before_us, now_us(), ctx);
    let owner = rig.etcd.owner(&rig.pair).unwrap();
    assert_eq!(owner.as_deref(), Some(rig.holder()), "{ctx}: etcd owner");
}

/// A leader move in a three-member etcd cluster (MoveLeader, twice): nothing fenced, no takeover.
#[test]
fn etcd_leader_move_fences_nothing() {
    let lab = match Lab::new("leader", &["src", "wit", "bak"]) {
        Ok(l) => l,
        Err(why) => return skip(&why),
    };
    let Some(etcd) = lab.start_etcd_cluster("wit") else {
        return;
    };
    let vm = vm_kind();
    let pair = "vm-leader";
    let source = spawn_source(&lab, "leader/source", pair, &etcd.url(), vm);
    let owner = source.wait_event("owner", EVENT_TIMEOUT);
    let mut backup = spawn_backup(&lab, "bak", "leader/backup", pair, &etcd.url(), vm);
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    let ctx = "etcd leader moved";
    let start = now_us();
    let bound = Duration::from_secs(20);
    for _ in 0..2 {
        let from = etcd.leader(bound).expect("no etcd leader");
        let to = (from + 1) % 3;
        let t = etcd.move_leader(to, bound).unwrap();
        println!(
            "{ctx}: leader {from} -> {to} in {} ms",
            (t.after_us - t.before_us) / 1000
        );
        std::thread::sleep(TTL);
    }
    std::thread::sleep(TTL);
    for ev in ["arbitration-won", "takeover", "vm-started"] {
        assert!(named(&backup, ev).is_empty(), "{ctx}: backup {ev}");
    }
    assert!(backup.running());
    assert!(named(&source, "fenced").is_empty(), "{ctx}: fenced");
    assert_guest_runs(&source, start, now_us(), ctx);
    assert_eq!(
        etcd.owner(pair).unwrap().as_deref(),
        owner["holder"].as_str(),
        "{ctx}: etcd owner"
    );
}

/// The source process stopped (SIGSTOP) for 2 × TTL: the backup's copy starts once the lease
/// is gone, and the source's guest does not run one more instruction after SIGCONT.
#[test]
fn stopped_source_never_runs_its_guest_after_sigcont() {
    let Some(mut rig) = Rig::start("srcstop", &["bak"]) else {
        return;
    };
    let ctx = "source SIGSTOPped";
    let pid = rig.source.pid();
    let _cont = ContGuard(pid);
    // Stop right after a guest report, so that the counter at the stop is known closely.
    let report = expect_since(&rig.source, "guest", now_us(), EVENT_TIMEOUT, ctx);
    let stop_before = now_us();
    rig.source.signal(libc::SIGSTOP);
    let stop_after = now_us();
    let before = reports(&rig.source, 0, stop_before);
    let last = *before.last().unwrap();
    assert_eq!(
        last.at,
        at(&report),
        "{ctx}: a report came between the wait and the stop"
    );
    assert!(last.running, "{ctx}: {before:?}");
    // The guest's fastest pace so far (counts per µs), to bound what it did before the stop.
    let rate = before
        .windows(2)
        .map(|w| (w[1].counter - w[0].counter) as f64 / (w[1].at - w[0].at) as f64)
        .fold(0.0, f64::max);

    let started = expect_since(rig.backup(), "vm-started", stop_before, TTL * 2, ctx);
    println!(
        "{ctx}: backup vm-started {} ms after the stop",
        (at(&started) - stop_before) / 1000
    );
    let left = (stop_before + us(TTL * 2)).saturating_sub(now_us());
    std::thread::sleep(Duration::from_micros(left));
    let cont_us = now_us();
    rig.source.signal(libc::SIGCONT);
    let fenced = expect_since(&rig.source, "fenced", cont_us, EVENT_TIMEOUT, ctx);
    assert_exit(&mut rig.source, EXIT_OWNED, EVENT_TIMEOUT, ctx);
    let c = fenced["guest_counter"].as_u64().expect("guest_counter");
    assert_eq!(fenced["guest_running"], false, "{fenced}");
    let after = reports(&rig.source, cont_us, u64::MAX);
    println!(
        "{ctx}: last report before the stop {} (at -{} ms), fenced at {c}, after SIGCONT {:?}",
        last.counter,
        (stop_before - last.at) / 1000,
        after.iter().map(|r| r.counter).collect::<Vec<_>>()
    );
    // An exit the vCPU took before the stop may be recorded just after SIGCONT (so a report
    // may lag the fence by it); the bound below shows nothing ran after SIGCONT.
    assert!(
        after.iter().all(|r| r.counter <= c && !r.running),
        "{ctx}: the guest ran after SIGCONT (fenced at {c}): {after:?}"
    );
    // Between the last report and the stop the guest ran at most that long (at its fastest
    // pace, + 20 ms of slack): no room for a run after SIGCONT.
    assert!(
        c >= last.counter,
        "{ctx}: counter went back: {c} < {last:?}"
    );
    let allowed = rate * ((stop_after - last.at) as f64 + 20_000.0);
    assert!(
        (c - last.counter) as f64 <= allowed,
        "{ctx}: the counter grew by {} after the last report, more than the {allowed:.0} the \
         time to the stop allows at {rate:.3}/us: it ran after SIGCONT",
        c - last.counter
    );
    assert_frozen_at(&rig.source, c, ctx);
    assert!(at(&fenced) > at(&started));
    assert_copy_runs(rig.backup(), &started, ctx);
}

/// The backup host cut off from everyone (iptables DROP everywhere): the source keeps its
/// guest and the pair, the backup starts nothing for 3 × TTL; healed, it arms again.
#[test]
fn isolated_backup_host_starts_nothing_and_the_source_runs_on() {
    let Some(mut rig) = Rig::start("isobak", &["bak"]) else {
        return;
    };
    let ctx = "backup host isolated";
    let cut = rig.lab.isolate("bak").unwrap();
    std::thread::sleep(TTL * 3);
    let end = now_us();
    let lost = expect_since(
        rig.backup(),
        "link-lost",
        cut.before_us,
        Duration::ZERO,
        ctx,
    );
    println!(
        "{ctx}: backup saw link-lost after {} ms; arbitration-wait: {:?}",
        (at(&lost) - cut.before_us) / 1000,
        named(rig.backup(), "arbitration-wait")
            .iter()
            .map(|v| v["why"].clone())
            .collect::<Vec<_>>()
    );
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, cut.after_us, end, ctx);
    let healed = rig.lab.heal().unwrap();
    expect_since(
        rig.backup(),
        "armed",
        healed.before_us,
        EVENT_TIMEOUT,
        "after healing",
    );
    assert_single_copy_at_source(&mut rig, "after healing");
    assert_eq!(
        rig.etcd.owner(&rig.pair).unwrap().as_deref(),
        Some(rig.holder())
    );
}

/// Two backups, the source killed: exactly one copy starts; the other backup is told it lost
/// and exits 4 without starting anything.
#[test]
fn two_backups_exactly_one_copy_starts() {
    let Some(mut rig) = Rig::start("two", &["bak", "bak2"]) else {
        return;
    };
    let ctx = "two backups, source killed";
    let before_us = now_us();
    rig.source.signal(libc::SIGKILL);
    // Each backup either starts its copy or loses; wait for both verdicts.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let decided = rig
            .backups
            .iter()
            .filter(|b| {
                !named(b, "vm-started").is_empty() || !named(b, "arbitration-lost").is_empty()
            })
            .count();
        if decided == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: not both decided: {:?} / {:?}",
            rig.backups[0].all_events(),
            rig.backups[1].all_events()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A moment more: nothing else may start.
    std::thread::sleep(Duration::from_secs(1));
    let winners: Vec<usize> = (0..2)
        .filter(|&i| !named(&rig.backups[i], "vm-started").is_empty())
        .collect();
    assert_eq!(winners.len(), 1, "{ctx}: copies started in {winners:?}");
    let (w, l) = (winners[0], 1 - winners[0]);
    let started = named(&rig.backups[w], "vm-started").remove(0);
    let lost = named(&rig.backups[l], "arbitration-lost").remove(0);
    println!(
        "{ctx}: backup{w} started {} ms after the kill; backup{l}: {lost}",
        (at(&started) - before_us) / 1000
    );
    for ev in ["vm-started", "takeover", "arbitration-won"] {
        assert!(named(&rig.backups[l], ev).is_empty(), "{ctx}: loser {ev}");
    }
    assert!(
        named(&rig.backups[w], "arbitration-lost").is_empty(),
        "{ctx}: winner lost"
    );
    assert_exit(&mut rig.backups[l], EXIT_OWNED, EVENT_TIMEOUT, ctx);
    assert_copy_runs(&rig.backups[w], &started, ctx);
}

/// A second source for a pair that a live source owns exits 4 at start, naming the holder, and
/// never runs its guest; the owner runs on.
#[test]
fn second_source_for_an_owned_pair_exits_4_naming_the_holder() {
    let Some(mut rig) = Rig::start("second", &["bak"]) else {
        return;
    };
    let ctx = "second source";
    let addr = format!("{}:{PORT}", rig.lab.ip("bak"));
    let url = rig.etcd.url();
    let pair = rig.pair.clone();
    let t = Instant::now();
    let mut second = rig.lab.spawn(
        "bak",
        "second/source",
        &[
            "source",
            "--listen",
            &addr,
            "--pair-id",
            &pair,
            "--arbiter",
            &url,
            "--lease-ttl",
            TTL_ARG,
            "--vm",
            rig.vm,
        ],
    );
    assert_exit(&mut second, EXIT_OWNED, EVENT_TIMEOUT, ctx);
    println!("{ctx}: exited 4 after {:?}", t.elapsed());
    let holder = rig.holder().to_string();
    let line = second.wait_stderr(&holder, Duration::ZERO);
    assert!(
        line.is_some(),
        "{ctx}: stderr does not name the holder {holder}: {:?}",
        second.stderr_lines()
    );
    println!("{ctx}: {}", line.unwrap());
    assert!(
        named(&second, "guest").is_empty() && named(&second, "listening").is_empty(),
        "{ctx}: {:?}",
        second.all_events()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_single_copy_at_source(&mut rig, ctx);
}

/// Bad `--arbiter` values are usage errors (exit 2), on both sides, naming the value.
#[test]
fn malformed_arbiter_exits_2() {
    for (role, value) in [
        ("source", "http://x"),
        ("source", "etcd://host"),
        ("source", "etcd://"),
        ("backup", "http://x"),
        ("backup", "etcd://host"),
    ] {
        let args: Vec<&str> = match role {
            "source" => vec![
                "source",
                "--listen",
                "127.0.0.1:0",
                "--pair-id",
                "vm-bad",
                "--arbiter",
                value,
            ],
            _ => vec![
                "backup",
                "--connect",
                "127.0.0.1:9",
                "--pair-id",
                "vm-bad",
                "--arbiter",
                value,
            ],
        };
        let mut p = Proc::spawn_opts(role, &args, SpawnOpts::new().pipe_stderr());
        let status = p.wait_exit(EVENT_TIMEOUT);
        assert_eq!(status.code(), Some(2), "{role} --arbiter {value}: {status}");
        let err = p.stderr_lines().join("\n");
        assert!(err.contains(value), "{role} --arbiter {value}: {err}");
        assert!(p.all_events().is_empty(), "{:?}", p.all_events());
    }
}

/// Spawns `role` against an arbiter that cannot be reached; asserts a quick non-zero exit that
/// says so, and that nothing ran.
fn assert_fails_fast(lab: Option<&Lab>, host: &str, role: &str, arbiter: &str, ctx: &str) {
    let listen = lab.map_or("127.0.0.1:0".to_string(), |l| format!("{}:0", l.ip(host)));
    let args: Vec<&str> = match role {
        "source" => vec![
            "source",
            "--listen",
            &listen,
            "--pair-id",
            "vm-unreach",
            "--arbiter",
            arbiter,
            "--vm",
            "simulated",
        ],
        _ => vec![
            "backup",
            "--connect",
            "127.0.0.1:9",
            "--pair-id",
            "vm-unreach",
            "--arbiter",
            arbiter,
            "--vm",
            "simulated",
        ],
    };
    let t = Instant::now();
    let mut p = match lab {
        Some(l) => l.spawn(host, ctx, &args),
        None => Proc::spawn_opts(ctx, &args, SpawnOpts::new().pipe_stderr()),
    };
    // The session's first request has a quarter of the TTL (2 s → 500 ms).
    let bound = Duration::from_secs(5);
    let status = p.wait_exit(bound);
    let took = t.elapsed();
    let err = p.stderr_lines().join("\n");
    println!("{ctx}: {role} exited with {status} after {took:?}");
    assert!(!status.success(), "{ctx}: {role} succeeded");
    assert_ne!(status.code(), Some(2), "{ctx}: not a usage error: {err}");
    assert!(
        err.contains("cannot open a session on") && err.contains(arbiter),
        "{ctx}: unclear message: {err}"
    );
    assert!(
        named(&p, "guest").is_empty()
            && named(&p, "listening").is_empty()
            && named(&p, "armed").is_empty(),
        "{ctx}: {:?}",
        p.all_events()
    );
}

/// An arbiter that refuses connections (closed port) or swallows them (blackholed address) at
/// start: a quick non-zero exit with a clear message, never a hang, nothing started.
#[test]
fn unreachable_arbiter_at_start_fails_fast() {
    let closed = free_port();
    let url = format!("etcd://127.0.0.1:{closed}");
    for role in ["source", "backup"] {
        assert_fails_fast(None, "", role, &url, "closed port");
    }
    let lab = match Lab::new("unreach", &["src", "wit"]) {
        Ok(l) => l,
        Err(why) => return skip(&why),
    };
    if let Err(why) = lab.iptables_usable() {
        return skip(&why);
    }
    // The witness host drops everything: connects are never answered.
    lab.isolate("wit").unwrap();
    let url = format!("etcd://{}:{ETCD_CLIENT_PORT}", lab.ip("wit"));
    for role in ["source", "backup"] {
        assert_fails_fast(Some(&lab), "src", role, &url, "blackholed");
    }
}

/// The failsafe: etcd is out of everyone's reach (source and backup) for longer than the lease,
/// and etcd drops the lease meanwhile. Nobody can be granted the pair, so the source's guest
/// keeps running while its backup is heard. Then the link breaks too and etcd comes back for the
/// backup only (the outage that outlasts the lease, then a link failure): the source fences
/// itself before the backup's copy starts.
#[test]
fn failsafe_holds_through_an_outage_for_everyone_then_fences_before_the_copy_starts() {
    let Some(mut rig) = Rig::start("failsafe", &["bak"]) else {
        return;
    };
    let ctx = "etcd out of everyone's reach";
    let cut = rig.lab.partition("src", "wit").unwrap();
    rig.lab.partition("bak", "wit").unwrap();
    // Past the lease, and past etcd's expiry of it (TTL + reaping).
    std::thread::sleep(TTL * 2);
    let t2 = now_us();
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, cut.after_us, t2, ctx);
    assert_eq!(
        rig.etcd.owner(&rig.pair).unwrap(),
        None,
        "{ctx}: etcd should have dropped the source's lease"
    );
    let ctx = "then the link breaks and etcd answers the backup again";
    let cut2 = rig.lab.partition("src", "bak").unwrap();
    rig.lab.unpartition("bak", "wit").unwrap();
    let started = expect_since(
        rig.backup(),
        "vm-started",
        cut2.before_us,
        EVENT_TIMEOUT,
        ctx,
    );
    let fenced = expect_since(&rig.source, "fenced", cut2.before_us, EVENT_TIMEOUT, ctx);
    let (t_fence, t_start) = (at(&fenced), at(&started));
    println!(
        "{ctx}: fenced {} ms after the second cut, vm-started {} ms after it; gap {} ms",
        (t_fence as i64 - cut2.before_us as i64) / 1000,
        (t_start as i64 - cut2.before_us as i64) / 1000,
        (t_start as i64 - t_fence as i64) / 1000
    );
    assert!(
        t_fence < t_start,
        "{ctx}: the backup's copy started {} us BEFORE the source fenced itself",
        t_fence - t_start
    );
    assert_eq!(fenced["guest_running"], false, "{ctx}: {fenced}");
    assert_exit(&mut rig.source, EXIT_OWNED, EVENT_TIMEOUT, ctx);
    assert_copy_runs(rig.backup(), &started, ctx);
}

/// etcd out of the source's reach only: its backup still reaches etcd, so the failsafe's
/// premise ("nobody can take over without the arbiter") does not hold. The source fences itself
/// when its lease runs out; the backup, hearing no more heartbeats, is granted the pair and
/// takes over: one copy at every instant, and the VM moves to the side that sees the arbiter.
#[test]
fn source_cut_from_etcd_only_fences_and_the_backup_takes_over() {
    let Some(mut rig) = Rig::start("cut-etcd", &["bak"]) else {
        return;
    };
    let ctx = "source cut from etcd only";
    let cut = rig.lab.partition("src", "wit").unwrap();
    let fenced = expect_since(&rig.source, "fenced", cut.before_us, EVENT_TIMEOUT, ctx);
    let started = expect_since(
        rig.backup(),
        "vm-started",
        cut.before_us,
        EVENT_TIMEOUT,
        ctx,
    );
    let (t_fence, t_start) = (at(&fenced), at(&started));
    println!(
        "{ctx}: fenced {} ms after the cut, vm-started {} ms after it",
        (t_fence as i64 - cut.before_us as i64) / 1000,
        (t_start as i64 - cut.before_us as i64) / 1000
    );
    assert!(t_fence < t_start, "{ctx}: copy started before the fence");
    assert!(
        t_fence - cut.before_us <= us(TTL),
        "{ctx}: fenced {} ms after the cut, later than the lease",
        (t_fence - cut.before_us) / 1000
    );
    assert_exit(&mut rig.source, EXIT_OWNED, EVENT_TIMEOUT, ctx);
    assert_copy_runs(rig.backup(), &started, ctx);
}

/// The failsafe with two backups. etcd is out of everyone's reach and drops the source's lease;
/// the source's guest runs on the failsafe. Then backup2's host starts refusing the source's
/// packets with TCP resets (a firewall reload, say) and etcd answers backup2 again: the source
/// sees its connection to backup2 reset at once, backup2 only sees the heartbeats stop. A
/// backup that lost its link may be asking for the pair: the source must stop its guest before
/// backup2 can start its copy.
#[test]
fn failsafe_with_two_backups_never_runs_two_copies() {
    let Some(mut rig) = Rig::start("failsafe2", &["bak", "bak2"]) else {
        return;
    };
    let ctx = "etcd out of everyone's reach, two backups";
    let cut = rig.lab.partition("src", "wit").unwrap();
    rig.lab.partition("bak", "wit").unwrap();
    rig.lab.partition("bak2", "wit").unwrap();
    std::thread::sleep(TTL * 2);
    assert_single_copy_at_source(&mut rig, ctx);
    assert_guest_runs(&rig.source, cut.after_us, now_us(), ctx);
    assert_eq!(rig.etcd.owner(&rig.pair).unwrap(), None, "{ctx}: lease");
    let ctx = "then backup2 resets the source's packets and reaches etcd again";
    let src_ip = rig.lab.ip("src").to_string();
    let fault = FaultTime::around(|| {
        rig.lab.iptables(
            "bak2",
            &[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "-s",
                &src_ip,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        )?;
        rig.lab.unpartition("bak2", "wit").map(drop)
    })
    .unwrap();
    // backup2 decides within its heartbeat deadline + the failsafe wait (650 ms); look longer.
    std::thread::sleep(TTL * 2);
    let b2 = &rig.backups[1];
    let started = named(b2, "vm-started").pop();
    let fenced = named(&rig.source, "fenced").pop();
    let since = |v: &Value| (at(v) as i64 - fault.before_us as i64) / 1000;
    println!(
        "{ctx}: backup2 vm-started at {:?} ms, source fenced at {:?} ms; source events since: {:?}",
        started.as_ref().map(since),
        fenced.as_ref().map(since),
        rig.source
            .all_events()
            .iter()
            .filter(|v| at(v) >= fault.before_us && v["event"] != "guest")
            .map(|v| format!("{} at {} ms", v["event"], since(v)))
            .collect::<Vec<_>>()
    );
    match &started {
        Some(s) => {
            let running_after: Vec<Report> = reports(&rig.source, at(s), u64::MAX)
                .into_iter()
                .filter(|r| r.running)
                .collect();
            assert!(
                fenced.as_ref().is_some_and(|f| at(f) < at(s)) && running_after.is_empty(),
                "{ctx}: SPLIT BRAIN: backup2 started its copy {} ms after the fault while the \
                 source was not fenced (fenced: {fenced:?}); the source's guest still ran \
                 after it: {running_after:?}",
                since(s)
            );
        }
        None => {
            // Nothing started: then the source must still run its guest.
            assert!(fenced.is_none(), "{ctx}: fenced and nothing started");
            assert_guest_runs(&rig.source, fault.after_us, now_us(), ctx);
        }
    }
}

/// A second source started for the pair while the first is cut from etcd (and etcd dropped its
/// lease): it must never run a copy beside the first.
#[test]
fn second_source_during_the_failsafe_runs_no_second_copy() {
    let Some(rig) = Rig::start("failsafe3", &["bak", "other"]) else {
        return;
    };
    // The first source cannot reach etcd, its backup can: no failsafe, the first source fences
    // when its lease runs out (its backup takes over). Whatever a second source then does, two
    // copies never run.
    rig.lab.partition("src", "wit").unwrap();
    std::thread::sleep(TTL * 2);
    let ctx = "second source on another host";
    let addr = format!("{}:{PORT}", rig.lab.ip("other"));
    let url = rig.etcd.url();
    let t = now_us();
    let mut second = rig.lab.spawn(
        "other",
        "failsafe3/second",
        &[
            "source",
            "--listen",
            &addr,
            "--pair-id",
            &rig.pair,
            "--arbiter",
            &url,
            "--lease-ttl",
            TTL_ARG,
            "--heartbeat",
            HEARTBEAT,
            "--vm",
            rig.vm,
        ],
    );
    std::thread::sleep(TTL);
    let second_runs = reports(&second, t, u64::MAX)
        .into_iter()
        .any(|r| r.running && r.counter > 0);
    let first_runs = reports(&rig.source, t, u64::MAX)
        .into_iter()
        .filter(|r| r.running)
        .count()
        > 0
        && named(&rig.source, "fenced").is_empty();
    println!(
        "{ctx}: second source events {:?}; first still runs: {first_runs}",
        second.event_names()
    );
    assert!(
        !(second_runs && first_runs),
        "{ctx}: SPLIT BRAIN: a second source owns the pair and runs its guest ({:?}) while the \
         first runs on its failsafe ({:?})",
        named(&second, "owner"),
        reports(&rig.source, t, u64::MAX)
    );
    if second.running() {
        second.signal(libc::SIGKILL);
    }
}
