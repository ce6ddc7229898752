// SPDX-License-Identifier: Apache-2.0
//! Ownership of a pair against a real etcd: acquire, held, idempotence, release, handover, races.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::etcd::{EtcdOptions, EtcdServer};
use common::{arbiter, pair};
use vmm_takeover_arbiter_etcd::{Acquire, Arbiter, ArbiterError, EtcdArbiter, Ownership};

const TTL: Duration = Duration::from_secs(30);

fn won(a: &mut EtcdArbiter, p: &str) -> u64 {
    match a.acquire(p).unwrap() {
        Acquire::Won { epoch } => epoch,
        other => panic!("{} did not win {p}: {other:?}", a.holder()),
    }
}

fn ownership(holder: &str, epoch: u64) -> Ownership {
    Ownership {
        holder: holder.into(),
        epoch,
    }
}

/// One etcd and sessions named `names`.
fn setup(names: &[&str]) -> Option<(EtcdServer, Vec<EtcdArbiter>)> {
    let etcd = EtcdServer::start(EtcdOptions::default())?;
    let arbiters = names
        .iter()
        .map(|n| {
            let mut a = arbiter(&[etcd.client_addr()], n);
            a.open_session(TTL).unwrap();
            a
        })
        .collect();
    Some((etcd, arbiters))
}

#[test]
fn acquire_wins_and_owner_reports_the_epoch() {
    let Some((_etcd, mut s)) = setup(&["a"]) else {
        return;
    };
    let p = pair("acquire");
    assert_eq!(s[0].owner(&p).unwrap(), None);
    let epoch = won(&mut s[0], &p);
    assert!(epoch > 0);
    let (owner, ttl_left) = s[0].owner(&p).unwrap().unwrap();
    assert_eq!(owner, ownership("a", epoch));
    let left = ttl_left.expect("owner's lease has a TTL");
    assert!(left > Duration::ZERO && left <= TTL, "{left:?}");
}

#[test]
fn a_second_holder_is_told_who_holds_the_pair_and_for_how_long() {
    let Some((_etcd, mut s)) = setup(&["a", "b"]) else {
        return;
    };
    let p = pair("held");
    let epoch = won(&mut s[0], &p);
    match s[1].acquire(&p).unwrap() {
        Acquire::Held { owner, ttl_left } => {
            assert_eq!(owner, ownership("a", epoch));
            let left = ttl_left.expect("ttl_left from the owner's lease");
            assert!(
                left > TTL - Duration::from_secs(5) && left <= TTL,
                "{left:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn acquiring_again_returns_the_same_epoch() {
    let Some((_etcd, mut s)) = setup(&["a"]) else {
        return;
    };
    let p = pair("idem");
    let epoch = won(&mut s[0], &p);
    for _ in 0..3 {
        assert_eq!(won(&mut s[0], &p), epoch);
    }
}

#[test]
fn the_same_name_in_another_session_is_another_holder() {
    // A restarted process that reuses its name must not inherit its predecessor's ownership.
    let Some((_etcd, mut s)) = setup(&["a", "a"]) else {
        return;
    };
    let p = pair("samename");
    let epoch = won(&mut s[0], &p);
    assert!(matches!(s[1].acquire(&p).unwrap(),
        Acquire::Held { owner, .. } if owner == ownership("a", epoch)));
    assert!(matches!(
        s[1].release(&p, epoch),
        Err(ArbiterError::NotOwner(_))
    ));
}

#[test]
fn release_frees_the_pair_and_a_stale_release_is_refused() {
    let Some((_etcd, mut s)) = setup(&["a", "b"]) else {
        return;
    };
    let p = pair("release");
    let e1 = won(&mut s[0], &p);
    // Only the owner may release.
    assert_eq!(
        s[1].release(&p, e1),
        Err(ArbiterError::NotOwner(Some(ownership("a", e1))))
    );
    s[0].release(&p, e1).unwrap();
    assert_eq!(s[0].owner(&p).unwrap(), None);
    assert_eq!(s[0].release(&p, e1), Err(ArbiterError::NotOwner(None)));

    let e2 = won(&mut s[1], &p);
    assert!(e2 > e1);
    // a's old epoch cannot touch b's ownership.
    assert_eq!(
        s[0].release(&p, e1),
        Err(ArbiterError::NotOwner(Some(ownership("b", e2))))
    );
    assert_eq!(
        s[0].release(&p, 0),
        Err(ArbiterError::NotOwner(Some(ownership("b", e2))))
    );
    assert_eq!(s[0].owner(&p).unwrap().unwrap().0, ownership("b", e2));
}

#[test]
fn hand_over_lets_only_the_named_successor_in() {
    let Some((_etcd, mut s)) = setup(&["a", "b", "c"]) else {
        return;
    };
    let p = pair("handover");
    let e_a = won(&mut s[0], &p);
    s[0].hand_over(&p, e_a, "b").unwrap();
    // A retry of the same handover (its answer lost) is not an error.
    s[0].hand_over(&p, e_a, "b").unwrap();
    assert_eq!(s[0].owner(&p).unwrap(), None);
    assert_eq!(
        s[2].acquire(&p).unwrap(),
        Acquire::HandoverPending { to: "b".into() }
    );
    let e_b = won(&mut s[1], &p);
    assert!(e_b > e_a, "successor's epoch {e_b} not above {e_a}");
    assert!(matches!(s[2].acquire(&p).unwrap(),
        Acquire::Held { owner, .. } if owner == ownership("b", e_b)));
    // The handover was consumed: when b releases, anyone may take the pair.
    s[1].release(&p, e_b).unwrap();
    let e_c = won(&mut s[2], &p);
    assert!(e_c > e_b);
}

/// A handoff that failed before the successor took the pair: the handing-over session takes it
/// back (a new epoch), and the successor can no longer claim it.
#[test]
fn the_handing_over_session_takes_back_an_unclaimed_handover() {
    let Some((_etcd, mut s)) = setup(&["a", "b"]) else {
        return;
    };
    let p = pair("take-back");
    let e_a = won(&mut s[0], &p);
    s[0].hand_over(&p, e_a, "b").unwrap();
    let e_back = won(&mut s[0], &p);
    assert!(e_back > e_a, "{e_back} not above {e_a}");
    assert!(matches!(s[1].acquire(&p).unwrap(),
        Acquire::Held { owner, .. } if owner == ownership("a", e_back)));
}

#[test]
fn a_pending_handover_ends_with_the_handing_over_session() {
    let Some((_etcd, mut s)) = setup(&["a", "b", "c"]) else {
        return;
    };
    let p = pair("handover-end");
    let e_a = won(&mut s[0], &p);
    s[0].hand_over(&p, e_a, "b").unwrap();
    s[0].close_session().unwrap();
    // The handover key was on a's lease: the pair is free to anyone now.
    let e_c = won(&mut s[2], &p);
    assert!(e_c > e_a);
}

#[test]
fn hand_over_with_a_stale_epoch_is_refused() {
    let Some((_etcd, mut s)) = setup(&["a", "b"]) else {
        return;
    };
    let p = pair("stale");
    let e1 = won(&mut s[0], &p);
    s[0].release(&p, e1).unwrap();
    let e2 = won(&mut s[0], &p);
    assert!(e2 > e1);
    assert_eq!(
        s[0].hand_over(&p, e1, "b"),
        Err(ArbiterError::NotOwner(Some(ownership("a", e2))))
    );
    // Nothing changed: a still owns it, no handover is pending.
    assert_eq!(s[0].owner(&p).unwrap().unwrap().0, ownership("a", e2));
    // Someone else's session cannot hand a's pair over, even knowing the epoch.
    assert_eq!(
        s[1].hand_over(&p, e2, "b"),
        Err(ArbiterError::NotOwner(Some(ownership("a", e2))))
    );
    s[0].release(&p, e2).unwrap();
    assert_eq!(
        s[0].hand_over(&p, e2, "b"),
        Err(ArbiterError::NotOwner(None))
    );
}

#[test]
fn racing_holders_exactly_one_wins() {
    let Some((_etcd, s)) = setup(&["a", "b"]) else {
        return;
    };
    let mut s = s.into_iter();
    let (mut a, mut b) = (s.next().unwrap(), s.next().unwrap());
    for round in 0..50 {
        let p = pair("race");
        let barrier = Arc::new(Barrier::new(2));
        let (ra, rb) = std::thread::scope(|scope| {
            let ta = scope.spawn(|| {
                barrier.wait();
                a.acquire(&p).unwrap()
            });
            let tb = scope.spawn(|| {
                barrier.wait();
                b.acquire(&p).unwrap()
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        match (&ra, &rb) {
            (Acquire::Won { epoch }, Acquire::Held { owner, .. }) => {
                assert_eq!(owner, &ownership("a", *epoch), "round {round}");
            }
            (Acquire::Held { owner, .. }, Acquire::Won { epoch }) => {
                assert_eq!(owner, &ownership("b", *epoch), "round {round}");
            }
            _ => panic!("round {round}: not exactly one winner: {ra:?} / {rb:?}"),
        }
    }
}

#[test]
fn only_the_owner_records_the_replica_of_record_and_it_outlives_the_owner() {
    let Some((_etcd, mut s)) = setup(&["a", "b"]) else {
        return;
    };
    let p = pair("replica");
    assert_eq!(s[1].replica(&p).unwrap(), None);
    let e1 = won(&mut s[0], &p);
    // Not the owner, or not under this epoch: refused, nothing written.
    assert_eq!(
        s[1].set_replica(&p, e1, "bbbb"),
        Err(ArbiterError::NotOwner(Some(ownership("a", e1))))
    );
    assert_eq!(
        s[0].set_replica(&p, e1 + 1, "aaaa"),
        Err(ArbiterError::NotOwner(Some(ownership("a", e1))))
    );
    assert_eq!(s[1].replica(&p).unwrap(), None);
    s[0].set_replica(&p, e1, "aaaa").unwrap();
    s[0].set_replica(&p, e1, "cccc").unwrap();
    assert_eq!(s[1].replica(&p).unwrap().as_deref(), Some("cccc"));
    // The owner's session ends (as when it dies and its lease runs out): the record stays for
    // the backup that wins the pair next, and an old epoch can no longer change it.
    s[0].close_session().unwrap();
    let e2 = won(&mut s[1], &p);
    assert!(e2 > e1);
    assert_eq!(s[1].replica(&p).unwrap().as_deref(), Some("cccc"));
    assert!(s[0].set_replica(&p, e1, "dddd").is_err());
    s[1].set_replica(&p, e2, "eeee").unwrap();
    assert_eq!(s[1].replica(&p).unwrap().as_deref(), Some("eeee"));
}
