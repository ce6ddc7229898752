// SPDX-License-Identifier: Apache-2.0
//! Helpers of this crate's integration tests (each test binary uses a subset). The etcd harness
//! itself is in `etcd.rs`, usable on its own by other suites.
#![allow(dead_code)]

pub mod etcd;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_takeover_arbiter_etcd::{Endpoint, EtcdArbiter};

/// The request timeout of the tests: short enough to keep the suite quick, long enough for a
/// loaded 2-core CI machine.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// An arbiter named `holder` on these endpoints, under a prefix of its own test.
pub fn arbiter(addrs: &[SocketAddr], holder: &str) -> EtcdArbiter {
    arbiter_with_timeout(addrs, holder, TIMEOUT)
}

/// Like [`arbiter`] with another request timeout.
pub fn arbiter_with_timeout(addrs: &[SocketAddr], holder: &str, timeout: Duration) -> EtcdArbiter {
    let endpoints: Vec<Endpoint> = addrs.iter().copied().map(Endpoint::from).collect();
    EtcdArbiter::new(endpoints, holder, timeout)
}

/// A pair name no other test uses.
pub fn pair(tag: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback port with nothing listening: connections are refused at once.
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Polls `f` every `every` until it returns `Some`, for at most `bound`.
pub fn wait_for<T>(
    bound: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
