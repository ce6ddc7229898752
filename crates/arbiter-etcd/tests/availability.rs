// SPDX-License-Identifier: Apache-2.0
//! What the arbiter does when etcd is away, stopped, restarted: bounded answers, fail-over.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::etcd::{EtcdOptions, EtcdServer};
use common::{arbiter, arbiter_with_timeout, closed_port, pair, wait_for};
use vmm_takeover_arbiter_etcd::{Acquire, Arbiter, ArbiterError};

/// Scheduling noise allowed on top of a deadline.
const SLACK: Duration = Duration::from_millis(500);

#[test]
fn a_closed_port_is_unavailable_at_once_and_named() {
    let dead = closed_port();
    let timeout = Duration::from_secs(2);
    let mut a = arbiter_with_timeout(&[dead], "a", timeout);
    let t = Instant::now();
    let err = a.open_session(Duration::from_secs(5)).unwrap_err();
    let took = t.elapsed();
    match &err {
        ArbiterError::Unavailable(msg) => assert!(msg.contains(&dead.to_string()), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(took < timeout, "took {took:?}");
    println!("closed port: {err} after {took:?}");
}

#[test]
fn a_silent_endpoint_is_unavailable_within_the_request_timeout() {
    // Accepts connections (the kernel does) and never answers: a hung or stopped server.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let timeout = Duration::from_secs(1);
    let mut a = arbiter_with_timeout(&[addr], "a", timeout);
    let t = Instant::now();
    let err = a.open_session(Duration::from_secs(5)).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, ArbiterError::Unavailable(ref m) if m.contains("timed out")),
        "{err}"
    );
    assert!(
        took >= timeout - Duration::from_millis(50) && took < timeout + SLACK,
        "took {took:?}"
    );
    println!("silent endpoint: {err} after {took:?}");
}

#[test]
fn all_endpoints_silent_is_unavailable_within_one_timeout_naming_each() {
    let silent: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = silent.iter().map(|l| l.local_addr().unwrap()).collect();
    let timeout = Duration::from_secs(1);
    let mut a = arbiter_with_timeout(&addrs, "a", timeout);
    let t = Instant::now();
    let err = a.open_session(Duration::from_secs(5)).unwrap_err();
    let took = t.elapsed();
    let ArbiterError::Unavailable(msg) = &err else {
        panic!("unexpected {err:?}")
    };
    for addr in &addrs {
        assert!(msg.contains(&addr.to_string()), "{msg}");
    }
    assert!(took < timeout + SLACK, "took {took:?}");
    println!("three silent endpoints: {err} after {took:?}");
}

#[test]
fn fails_over_to_the_next_endpoint() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let p = pair("failover");
    // First endpoint refuses connections.
    let mut a = arbiter(&[closed_port(), etcd.client_addr()], "a");
    a.open_session(Duration::from_secs(30)).unwrap();
    let Acquire::Won { epoch } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };

    // First endpoint hangs: it gets half of the deadline, the live one the rest.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let timeout = Duration::from_secs(2);
    let mut b = arbiter_with_timeout(
        &[silent.local_addr().unwrap(), etcd.client_addr()],
        "b",
        timeout,
    );
    let t = Instant::now();
    b.open_session(Duration::from_secs(30)).unwrap();
    let first = t.elapsed();
    assert!(first < timeout, "first call took {first:?}");
    // Later calls start at the endpoint that answered.
    let t = Instant::now();
    match b.acquire(&p).unwrap() {
        Acquire::Held { owner, .. } => {
            assert_eq!((owner.holder.as_str(), owner.epoch), ("a", epoch));
        }
        other => panic!("unexpected {other:?}"),
    }
    let next = t.elapsed();
    assert!(next < timeout / 2, "second call took {next:?}");
    println!("fail-over past a silent endpoint: {first:?}, next call {next:?}");
}

#[test]
fn a_stopped_etcd_is_unavailable_within_the_timeout_and_answers_after_sigcont() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let p = pair("sigstop");
    let timeout = Duration::from_secs(1);
    let mut a = arbiter_with_timeout(&[etcd.client_addr()], "a", timeout);
    // A TTL far above the pause, so the lease outlives it.
    a.open_session(Duration::from_secs(30)).unwrap();
    let Acquire::Won { epoch } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };

    etcd.pause();
    for what in ["renew", "acquire"] {
        let t = Instant::now();
        let r = if what == "renew" {
            a.renew().map(|_| ())
        } else {
            a.acquire(&p).map(|_| ())
        };
        let took = t.elapsed();
        assert!(
            matches!(r, Err(ArbiterError::Unavailable(_))),
            "{what}: {r:?}"
        );
        assert!(took < timeout + SLACK, "{what} took {took:?}");
        println!(
            "{what} on a stopped etcd: {} after {took:?}",
            r.unwrap_err()
        );
    }
    etcd.resume();

    // The first call after SIGCONT may still meet etcd catching up: bounded retry.
    let ttl = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        a.renew().ok()
    })
    .expect("etcd did not answer after SIGCONT");
    assert!(ttl > Duration::ZERO);
    assert_eq!(a.acquire(&p).unwrap(), Acquire::Won { epoch });
}

#[test]
fn a_restart_keeps_ownership_and_lease_semantics() {
    let Some(mut etcd) = EtcdServer::start(EtcdOptions::fast()) else {
        return;
    };
    let p = pair("restart");
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let mut b = arbiter(&[etcd.client_addr()], "b");
    let ttl = a.open_session(Duration::from_secs(4)).unwrap();
    let Acquire::Won { epoch } = a.acquire(&p).unwrap() else {
        panic!("free pair not won")
    };
    a.renew().unwrap();
    // Deliberately let half the TTL run out, to see whether a restart gives it back.
    std::thread::sleep(ttl / 2);
    let (_, before) = a.owner(&p).unwrap().unwrap();

    etcd.restart();
    let restarted = Instant::now();

    // The lease and the key survived (both are in etcd's backend), pooled connections or not.
    let (owner, after) = a.owner(&p).unwrap().expect("ownership lost in a restart");
    assert_eq!((owner.holder.as_str(), owner.epoch), ("a", epoch));
    println!("restart: ttl_left before {before:?}, after {after:?} (granted {ttl:?})");
    // The new leader renewed the lease to its full TTL (more than was left).
    let after = after.expect("lease TTL after restart");
    assert!(
        after > before.unwrap(),
        "lease not refreshed: {before:?} -> {after:?}"
    );
    assert!(
        after >= ttl - Duration::from_secs(1),
        "lease not refreshed to its TTL: {after:?}"
    );

    // Without renewals, the lease still expires: the pair goes to b with a larger epoch.
    b.open_session(Duration::from_secs(30)).unwrap();
    let won = wait_for(
        ttl + Duration::from_secs(10),
        Duration::from_millis(20),
        || match b.acquire(&p).unwrap() {
            Acquire::Won { epoch } => Some(epoch),
            _ => None,
        },
    )
    .expect("lease never expired after the restart");
    let freed = restarted.elapsed();
    println!("restart: pair freed {freed:?} after the restart");
    assert!(
        freed >= ttl,
        "freed {freed:?} after the restart, before the TTL {ttl:?}"
    );
    assert!(won > epoch);
    assert!(matches!(a.renew(), Err(ArbiterError::LeaseLost(_))));
}
