// SPDX-License-Identifier: Apache-2.0
//! Replication between two real dummy KVM guests over real loopback sockets: the standby resumes
//! from the last acknowledged checkpoint of the lost link, never from a partial one, never from
//! another link's, and never below the output the source released.

// The guest crate's test helpers (the visible skip, the dummy VM or a skip).
#[path = "../../guest/tests/common/mod.rs"]
mod guest_common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use vmm_takeover_core::auth::{Credentials, Key, KeyRing, LinkId};
use vmm_takeover_core::{TakeoverReason, TakeoverRecord, VmStart};
use vmm_takeover_guest::{DummyVm, DummyVmConfig};
use vmm_takeover_replica::{
    BackupReplicaConfig, EventSink, Fault, NoReplica, Recorder, ReplicaBackup, ReplicaEvent,
    ReplicaSource, ReplicaStart, SourceReplicaConfig,
};

const BOUND: Duration = Duration::from_secs(20);
const PAIR: &str = "replica-test";

/// A 4 MiB dirty-logging guest, or `None` (said as `SKIPPED`, failing under `CI=true`) without
/// `/dev/kvm`.
fn vm(dirty_rate: u64) -> Option<DummyVm> {
    guest_common::vm_or_skip(DummyVmConfig {
        mem_size: 4 << 20,
        dirty_rate,
        dirty_log: true,
    })
}

fn creds() -> Credentials {
    Credentials::Keys(Arc::new(
        KeyRing::new([Key::new(1, &[7u8; 32]).unwrap()]).unwrap(),
    ))
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<ReplicaEvent>>>);

impl Log {
    fn sink(&self) -> EventSink {
        let l = self.0.clone();
        Arc::new(move |e: &ReplicaEvent| l.lock().unwrap().push(e.clone()))
    }

    fn wait(&self, what: &str, f: impl Fn(&ReplicaEvent) -> bool) -> ReplicaEvent {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(e) = self.0.lock().unwrap().iter().find(|e| f(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {BOUND:?}: {:?}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn acked(&self) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                ReplicaEvent::Acked { seq, mark, .. } => Some((*seq, *mark)),
                _ => None,
            })
            .collect()
    }
}

fn link(n: u8) -> LinkId {
    LinkId([n; 16])
}

fn record(link: Option<LinkId>) -> TakeoverRecord {
    TakeoverRecord {
        reason: TakeoverReason::PeerClosed,
        pair_id: PAIR.into(),
        armed_at: SystemTime::now(),
        detected_at: SystemTime::now(),
        detected_instant: Instant::now(),
        keepalive: None,
        heartbeat: None,
        errno: None,
        epoch: None,
        link,
        detail: "test".into(),
    }
}

struct Pair {
    src_vm: DummyVm,
    src: ReplicaSource,
    src_log: Log,
    bak_vm: DummyVm,
    bak: ReplicaBackup,
    bak_log: Log,
}

fn pair(fault: Option<Fault>) -> Option<Pair> {
    pair_with(fault, None)
}

fn pair_with(fault: Option<Fault>, record: Option<Recorder>) -> Option<Pair> {
    let src_vm = vm(4 << 20)?;
    let bak_vm = vm(4 << 20)?;
    src_vm.start().unwrap();
    let src_log = Log::default();
    let mut cfg = SourceReplicaConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        PAIR.into(),
        creds(),
        Duration::from_millis(20),
    );
    cfg.fault = fault;
    cfg.record = record;
    let src = ReplicaSource::start(cfg, Arc::new(src_vm.clone()), 0, src_log.sink()).unwrap();
    let bak_log = Log::default();
    let addr: SocketAddr = src.local_addr();
    let bak = ReplicaBackup::start(
        BackupReplicaConfig::new(addr, PAIR.into(), creds()),
        Arc::new(bak_vm.clone()),
        bak_log.sink(),
    )
    .unwrap();
    src.bind_link(Some(link(1)));
    bak.set_link(Some(link(1)));
    Some(Pair {
        src_vm,
        src,
        src_log,
        bak_vm,
        bak,
        bak_log,
    })
}

#[test]
fn standby_resumes_from_the_last_acked_checkpoint_at_or_above_released_output() {
    let Some(p) = pair(None) else { return };
    p.bak_log.wait("a full checkpoint applied", |e| {
        matches!(
            e,
            ReplicaEvent::Applied {
                seq: 1,
                full: true,
                ..
            }
        )
    });
    p.src_log.wait("checkpoint 5 acked", |e| {
        matches!(e, ReplicaEvent::Acked { seq: 5, .. })
    });
    // The source dies (its guest stops, its stream goes quiet).
    p.src.stop();
    p.src_vm.pause().unwrap();
    let released = p.src.released();
    let source_at = p.src_vm.counter();
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone());
    start.vm_start(&record(Some(link(1)))).unwrap();
    let applied = p.bak.applied().unwrap();
    assert!(
        applied.mark >= released,
        "resumed from {applied:?}, below released output {released}"
    );
    assert!(applied.mark <= source_at);
    // The guest continues from the checkpoint, not from 0.
    assert!(p.bak_vm.wait_for_counter(applied.mark + 1000, BOUND));
    let acked = p.src_log.acked();
    assert!(
        acked
            .windows(2)
            .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1),
        "{acked:?}"
    );
}

#[test]
fn a_checkpoint_cut_in_half_is_never_applied() {
    let Some(p) = pair(Some(Fault { stall_at: 4 })) else {
        return;
    };
    p.src_log.wait("the fault", |e| {
        matches!(e, ReplicaEvent::FaultInjected { seq: 4 })
    });
    p.src.stop();
    p.src_vm.pause().unwrap();
    // The stream breaks (the source host dies): drop the backup's link, as its takeover would.
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone());
    // Checkpoint 3 is the last whole one; the half of 4 stays staged and is never applied.
    let applied = p.bak.applied().unwrap();
    assert_eq!(applied.seq, 3);
    start.vm_start(&record(Some(link(1)))).unwrap();
    assert_eq!(p.bak.applied().unwrap().seq, 3);
    let acked = p.src_log.acked();
    assert_eq!(acked.last().unwrap().0, 3);
    assert!(p.bak_vm.counter() >= acked.last().unwrap().1);
}

#[test]
fn no_checkpoint_or_another_links_checkpoint_starts_nothing() {
    let Some(p) = pair(None) else { return };
    p.bak_log.wait("a full checkpoint applied", |e| {
        matches!(e, ReplicaEvent::Applied { seq: 1, .. })
    });
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone());
    let e = start.vm_start(&record(Some(link(2)))).unwrap_err();
    assert!(
        e.to_string()
            .contains("another backup may have acknowledged"),
        "{e}"
    );
    assert!(matches!(
        *start.refusal().lock().unwrap(),
        Some(NoReplica::OtherLink { .. })
    ));
    assert!(!p.bak_vm.is_running());
    assert_eq!(p.bak_vm.starts(), 0);

    let Some(fresh) = vm(0) else { return };
    let b = ReplicaBackup::start(
        BackupReplicaConfig::new("127.0.0.1:9".parse().unwrap(), PAIR.into(), creds()),
        Arc::new(fresh.clone()),
        Log::default().sink(),
    )
    .unwrap();
    let mut start = ReplicaStart::new(fresh.clone(), b);
    let e = start.vm_start(&record(Some(link(1)))).unwrap_err();
    assert!(
        e.to_string().contains("no checkpoint was ever applied"),
        "{e}"
    );
    assert_eq!(fresh.starts(), 0);
}

#[test]
fn a_stream_for_a_link_that_is_not_armed_is_refused() {
    let Some(p) = pair(None) else { return };
    p.bak_log.wait("synced", |e| {
        matches!(e, ReplicaEvent::Applied { seq: 1, .. })
    });
    // The source's armed link changes (another backup armed): the stream ends at its next step,
    // and the backup's redial for its old link is refused.
    p.src.bind_link(Some(link(9)));
    p.bak_log.wait("the stream ends", |e| {
        matches!(e, ReplicaEvent::Lost { .. })
    });
    p.bak_log.wait("the redial is refused", |e| {
        matches!(e, ReplicaEvent::Refused { .. })
    });
    p.src_log.wait("the source refuses it", |e| {
        matches!(e, ReplicaEvent::Refused { why } if why.contains("not the armed backup's link"))
    });
}

/// The replica of record, with a recorder standing in for the arbiter (a test double: the real
/// one is etcd, tested in `tests/replication.rs` of the binary): nothing is released on a
/// stream's acknowledgements before its link is recorded, and a failed record ends the stream.
#[test]
fn output_is_released_only_once_the_link_is_recorded() {
    let calls = Arc::new(Mutex::new(Vec::<LinkId>::new()));
    let c = calls.clone();
    let record: Recorder = Arc::new(move |l: LinkId| {
        let mut c = c.lock().unwrap();
        c.push(l);
        // The first try fails (the arbiter did not answer).
        if c.len() == 1 {
            Err("arbiter unavailable (test double)".into())
        } else {
            Ok(())
        }
    });
    let Some(p) = pair_with(None, Some(record)) else {
        return;
    };
    p.src_log.wait(
        "the failed record ends the stream",
        |e| matches!(e, ReplicaEvent::Lost { why } if why.contains("replica of record")),
    );
    p.src_log
        .wait("a new stream's full checkpoint acknowledged", |e| {
            matches!(e, ReplicaEvent::Acked { full: true, .. })
        });
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls, vec![link(1), link(1)]);
    // Every Acked (hence every release) came after the successful record.
    assert!(p.src.released() > 0);
}

/// With a verifier (the arbiter's replica of record), a standby whose link is not the recorded
/// one starts nothing; the recorded one, or none recorded, resumes.
#[test]
fn the_standby_resumes_only_if_the_arbiter_records_its_link() {
    let Some(p) = pair(None) else { return };
    p.bak_log.wait("synced", |e| {
        matches!(e, ReplicaEvent::Applied { seq: 1, .. })
    });
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone())
        .with_verifier(Box::new(|| Ok(Some(link(7).to_hex()))));
    let e = start.vm_start(&record(Some(link(1)))).unwrap_err();
    assert!(e.to_string().contains("replica of record"), "{e}");
    assert!(matches!(
        *start.refusal().lock().unwrap(),
        Some(NoReplica::Superseded { .. })
    ));
    assert_eq!(p.bak_vm.starts(), 0);
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone())
        .with_verifier(Box::new(|| Err("etcd unreachable (test double)".into())));
    assert!(start.vm_start(&record(Some(link(1)))).is_err());
    assert_eq!(p.bak_vm.starts(), 0);
    let mut start = ReplicaStart::new(p.bak_vm.clone(), p.bak.clone())
        .with_verifier(Box::new(|| Ok(Some(link(1).to_hex()))));
    start.vm_start(&record(Some(link(1)))).unwrap();
    assert_eq!(p.bak_vm.starts(), 1);
}

/// Clients without the key that connect and say nothing hold a handshake slot each, for at most
/// the I/O timeout, on threads of their own: the real backup syncs beside them.
#[test]
fn silent_clients_do_not_hold_the_backup_back() {
    let Some(src_vm) = vm(4 << 20) else { return };
    let Some(bak_vm) = vm(4 << 20) else { return };
    src_vm.start().unwrap();
    let src_log = Log::default();
    let src = ReplicaSource::start(
        SourceReplicaConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PAIR.into(),
            creds(),
            Duration::from_millis(20),
        ),
        Arc::new(src_vm.clone()),
        0,
        src_log.sink(),
    )
    .unwrap();
    src.bind_link(Some(link(1)));
    let silent: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(src.local_addr()).unwrap())
        .collect();
    let started = Instant::now();
    let bak_log = Log::default();
    let bak = ReplicaBackup::start(
        BackupReplicaConfig::new(src.local_addr(), PAIR.into(), creds()),
        Arc::new(bak_vm.clone()),
        bak_log.sink(),
    )
    .unwrap();
    bak.set_link(Some(link(1)));
    bak_log.wait("synced beside the silent clients", |e| {
        matches!(e, ReplicaEvent::Applied { seq: 1, .. })
    });
    // Serially, six silent clients would have held it back 6 × 2 s; a generous bound below that.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}
