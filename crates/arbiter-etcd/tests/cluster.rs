// SPDX-License-Identifier: Apache-2.0
//! A three-member etcd cluster: leader changes keep ownership, renew leases, and the client
//! fails over from a dead member.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{EtcdCluster, EtcdOptions};
use common::{arbiter, pair, wait_for};
use vmm_takeover_arbiter_etcd::{Acquire, Arbiter};

const LEADER_BOUND: Duration = Duration::from_secs(20);

#[test]
fn leader_changes_keep_ownership_and_renew_leases() {
    let Some(mut cluster) = EtcdCluster::start(3, EtcdOptions::default()) else {
        return;
    };
    let p = pair("leader");
    let mut a = arbiter(&cluster.client_addrs(), "a");
    let ttl = a.open_session(Duration::from_secs(10)).unwrap();
    let Acquire::Won { epoch } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };
    a.renew().unwrap();
    // Deliberately let part of the TTL run out, to see whether a leader change gives it back.
    std::thread::sleep(Duration::from_secs(4));
    let (_, before) = a.owner(&p).unwrap().unwrap();
    let before = before.expect("ttl_left");

    // 1. A planned leader change (MoveLeader).
    let leader = cluster.wait_leader(LEADER_BOUND).expect("no leader");
    let to = (leader + 1) % 3;
    let t = Instant::now();
    cluster.move_leader(to, LEADER_BOUND).unwrap();
    println!("leader moved {leader} -> {to} in {:?}", t.elapsed());
    let (owner, after) = a
        .owner(&p)
        .unwrap()
        .expect("ownership lost in a leader change");
    assert_eq!((owner.holder.as_str(), owner.epoch), ("a", epoch));
    let after = after.expect("ttl_left");
    println!("leader change: ttl_left before {before:?}, after {after:?} (granted {ttl:?})");
    assert!(
        after > before,
        "lease not renewed by the new leader: {before:?} -> {after:?}"
    );
    assert!(
        after >= ttl - Duration::from_secs(1),
        "lease not renewed to its TTL: {after:?}"
    );

    // 2. The leader dies: a new one is elected, the client fails over past the dead member.
    // Renew right away, as a holder would, and record what it sees during the election.
    cluster.members[to].kill();
    let t = Instant::now();
    let mut failures = Vec::new();
    let renewed = wait_for(LEADER_BOUND, Duration::from_millis(100), || {
        match a.renew() {
            Ok(ttl) => Some(ttl),
            Err(e) => {
                failures.push(format!("{:?}: {e}", t.elapsed()));
                None
            }
        }
    })
    .expect("renew failed after the leader was killed");
    println!(
        "leader {to} killed: renew succeeded after {:?}, {} failed call(s) before: {failures:#?}",
        t.elapsed(),
        failures.len()
    );
    let new_leader = cluster
        .wait_leader(LEADER_BOUND)
        .expect("no leader after a kill");
    println!(
        "member {new_leader} leads, {:?} after the kill",
        t.elapsed()
    );
    assert_eq!(renewed, ttl);
    assert_eq!(a.acquire(&p).unwrap(), Acquire::Won { epoch });
    let mut b = arbiter(&cluster.client_addrs(), "b");
    b.open_session(Duration::from_secs(10)).unwrap();
    assert!(matches!(b.acquire(&p).unwrap(), Acquire::Held { owner, .. } if owner.epoch == epoch));

    // 3. The dead member comes back and catches up.
    cluster.members[to].start_again();
    assert!(
        wait_for(LEADER_BOUND, Duration::from_millis(100), || cluster.members
            [to]
            .healthy(Duration::from_millis(500))
            .then_some(()))
        .is_some(),
        "member {to} did not rejoin"
    );
    assert_eq!(a.acquire(&p).unwrap(), Acquire::Won { epoch });
}
