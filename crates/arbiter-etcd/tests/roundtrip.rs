// SPDX-License-Identifier: Apache-2.0
//! Round-trip times of the calls a holder makes in its loop, on a local etcd. Printed, not
//! asserted (see them with `cargo nextest run -p vmm-takeover-arbiter-etcd --test roundtrip
//! --no-capture`): timing depends on the machine.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{EtcdOptions, EtcdServer};
use common::{arbiter, pair};
use vmm_takeover_arbiter_etcd::{Acquire, Arbiter};

const CALLS: usize = 300;

fn measure(what: &str, mut call: impl FnMut(usize)) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..CALLS)
        .map(|i| {
            let t = Instant::now();
            call(i);
            t.elapsed()
        })
        .collect();
    times.sort();
    let p50 = times[CALLS / 2];
    let p99 = times[CALLS * 99 / 100];
    println!(
        "ROUNDTRIP {what:<34} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  ({CALLS} calls)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        times[CALLS - 1].as_secs_f64() * 1e3
    );
    (p50, p99)
}

#[test]
fn prints_round_trip_times_of_keepalive_and_acquire() {
    let Some(etcd) = EtcdServer::start(EtcdOptions::default()) else {
        return;
    };
    let mut a = arbiter(&[etcd.client_addr()], "a");
    let mut b = arbiter(&[etcd.client_addr()], "b");
    a.open_session(Duration::from_secs(60)).unwrap();
    b.open_session(Duration::from_secs(60)).unwrap();
    // Warm up the connection pool and etcd.
    for _ in 0..10 {
        a.renew().unwrap();
    }

    measure("renew (lease/keepalive)", |_| {
        a.renew().unwrap();
    });
    let pairs: Vec<String> = (0..CALLS).map(|_| pair("rt")).collect();
    measure("acquire, free pair (1 txn, write)", |i| {
        assert!(matches!(a.acquire(&pairs[i]).unwrap(), Acquire::Won { .. }));
    });
    measure("acquire, own pair (1 txn, read)", |i| {
        assert!(matches!(a.acquire(&pairs[i]).unwrap(), Acquire::Won { .. }));
    });
    measure("acquire, held (txn + timetolive)", |i| {
        assert!(matches!(
            b.acquire(&pairs[i]).unwrap(),
            Acquire::Held { .. }
        ));
    });
    measure("owner (range + timetolive)", |i| {
        assert!(a.owner(&pairs[i]).unwrap().is_some());
    });
}
