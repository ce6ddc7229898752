// SPDX-License-Identifier: Apache-2.0
//! The session lease against a real etcd: granted TTL, renewal, expiry, revocation.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{EtcdOptions, EtcdServer};
use common::{arbiter, pair, wait_for};
use vmm_takeover_arbiter_etcd::{Acquire, Arbiter, ArbiterError};

#[test]
fn granted_ttl_is_raised_to_etcds_minimum_at_default_settings() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let granted = a.open_session(Duration::from_secs(1)).unwrap();
    // ceil(1.5 × 1000 ms election timeout) = 2 s.
    assert!(granted >= Duration::from_secs(2), "granted {granted:?}");
    assert_eq!(a.granted_ttl(), Some(granted));
    // What etcd keeps is what it said it granted.
    assert_eq!(a.renew().unwrap(), granted);
}

#[test]
fn one_second_ttl_is_granted_with_fast_elections() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::fast()) else {
        return;
    };
    let mut a = arbiter(&[etcd.client_addr()], "a");
    assert_eq!(
        a.open_session(Duration::from_secs(1)).unwrap(),
        Duration::from_secs(1)
    );
    // Sub-second asks round up: etcd counts whole seconds.
    assert_eq!(
        a.open_session(Duration::from_millis(300)).unwrap(),
        Duration::from_secs(1)
    );
}

#[test]
fn renewing_keeps_the_pair_for_many_ttls() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::fast()) else {
        return;
    };
    let p = pair("renew");
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let ttl = a.open_session(Duration::from_secs(1)).unwrap();
    let Acquire::Won { epoch } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };
    let until = Instant::now() + ttl * 4;
    while Instant::now() < until {
        assert_eq!(a.renew().unwrap(), ttl);
        std::thread::sleep(ttl / 4);
    }
    let (owner, ttl_left) = a.owner(&p).unwrap().expect("pair still owned");
    assert_eq!((owner.holder.as_str(), owner.epoch), ("a", epoch));
    assert!(ttl_left.is_some());
}

#[test]
fn a_session_that_stops_renewing_loses_the_pair_after_its_ttl() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::fast()) else {
        return;
    };
    let p = pair("expiry");
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let mut b = arbiter(&[etcd.client_addr()], "b");
    let ttl = a.open_session(Duration::from_secs(1)).unwrap();
    b.open_session(Duration::from_secs(30)).unwrap();
    let Acquire::Won { epoch: epoch_a } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };
    // The last renewal: etcd restarts the TTL when it handles it, which is after this instant.
    let last_renew_sent = Instant::now();
    a.renew().unwrap();

    let won = wait_for(
        ttl + Duration::from_secs(10),
        Duration::from_millis(20),
        || match b.acquire(&p).unwrap() {
            Acquire::Won { epoch } => Some((epoch, last_renew_sent.elapsed())),
            Acquire::Held { owner, .. } => {
                assert_eq!(owner.holder, "a");
                None
            }
            other => panic!("unexpected {other:?}"),
        },
    );
    let (epoch_b, after) = won.expect("the pair never became free");
    println!("pair freed {after:?} after the last renewal was sent (TTL {ttl:?})");
    assert!(
        after >= ttl,
        "freed after {after:?}, before the TTL {ttl:?}"
    );
    assert!(epoch_b > epoch_a, "epoch {epoch_b} not above {epoch_a}");

    // The old session learns it is gone, and cannot take the pair back.
    assert!(matches!(a.renew(), Err(ArbiterError::LeaseLost(_))));
    match a.acquire(&p).unwrap() {
        Acquire::Held { owner, .. } => {
            assert_eq!((owner.holder.as_str(), owner.epoch), ("b", epoch_b));
        }
        other => panic!("unexpected {other:?}"),
    }
    // A free pair under a dead lease: etcd refuses the put, which is LeaseLost too.
    assert!(matches!(
        a.acquire(&pair("other")),
        Err(ArbiterError::LeaseLost(_))
    ));
    // A new session works again.
    a.open_session(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        a.acquire(&pair("fresh")).unwrap(),
        Acquire::Won { .. }
    ));
}

#[test]
fn closing_the_session_frees_its_pairs_at_once() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let p = pair("close");
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let mut b = arbiter(&[etcd.client_addr()], "b");
    a.open_session(Duration::from_secs(60)).unwrap();
    b.open_session(Duration::from_secs(60)).unwrap();
    assert!(matches!(a.acquire(&p).unwrap(), Acquire::Won { .. }));
    a.close_session().unwrap();
    assert_eq!(a.lease_id(), None);
    // No waiting for a TTL: revoke deleted the owner key.
    assert!(matches!(b.acquire(&p).unwrap(), Acquire::Won { .. }));
    assert_eq!(a.renew(), Err(ArbiterError::NoSession));
    // Closing twice is fine.
    a.close_session().unwrap();
}

#[test]
fn reopening_a_session_revokes_the_previous_one() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let p = pair("reopen");
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let mut b = arbiter(&[etcd.client_addr()], "b");
    a.open_session(Duration::from_secs(60)).unwrap();
    b.open_session(Duration::from_secs(60)).unwrap();
    let first = a.lease_id().unwrap();
    assert!(matches!(a.acquire(&p).unwrap(), Acquire::Won { .. }));
    a.open_session(Duration::from_secs(60)).unwrap();
    assert_ne!(a.lease_id(), Some(first));
    assert!(matches!(b.acquire(&p).unwrap(), Acquire::Won { .. }));
}
