// SPDX-License-Identifier: Apache-2.0
//! Cost of protocol version 2's authentication: seal + open per frame, and a whole handshake.
//!
//! `cargo bench -p vmm-takeover-core --bench auth` (release build). Knobs: `AUTH_BENCH_FRAMES`
//! (default 1,000,000), `AUTH_BENCH_HANDSHAKES` (20,000). Prints one line per figure: the best of
//! five rounds (the least disturbed by other load) and the median.
//!
//! Goal: seal + open of a HEARTBEAT at most 2 µs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_takeover_core::auth::{
    BackupHandshake, Credentials, Key, KeyRing, OsEntropy, Reader, Session, SourceHandshake,
    WelcomeInfo,
};
use vmm_takeover_core::protocol::Frame;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn info() -> WelcomeInfo {
    WelcomeInfo {
        heartbeat: Some(Duration::from_millis(10)),
        node: "host-a/1".into(),
        fence_grace: Duration::from_millis(1500),
    }
}

/// One handshake, both sides, no network. Returns (source session, backup session) and the time
/// spent in each side's computation.
fn handshake(creds: &Credentials, rng: &mut OsEntropy) -> (Session, Session, Duration, Duration) {
    let t0 = Instant::now();
    let (b, hello) = BackupHandshake::start(creds, "vm-42", "host-b/1", rng);
    let t1 = Instant::now();
    let s = SourceHandshake::on_hello(creds, "vm-42", &hello, rng).expect("HELLO");
    let (s, welcome) = s.welcome(&info());
    let t2 = Instant::now();
    let w = b.on_welcome(&welcome).expect("WELCOME");
    let t3 = Instant::now();
    let a = s.on_auth(&w.auth).expect("AUTH");
    let t4 = Instant::now();
    (
        a.session,
        w.session,
        (t2 - t1) + (t4 - t3),
        (t1 - t0) + (t3 - t2),
    )
}

/// Five rounds of `f`, each of `n` iterations: (best, median) per iteration.
fn rounds(n: u64, mut f: impl FnMut(u64) -> Duration) -> (f64, f64) {
    let mut per: Vec<f64> = (0..5)
        .map(|_| f(n).as_secs_f64() * 1e6 / n as f64)
        .collect();
    per.sort_by(f64::total_cmp);
    (per[0], per[2])
}

fn main() {
    let frames = env_num("AUTH_BENCH_FRAMES", 1_000_000);
    let handshakes = env_num("AUTH_BENCH_HANDSHAKES", 20_000);
    let mut rng = OsEntropy::new().expect("OS random number generator");
    let key = Key::new(1, &[0x5a; 32]).expect("key");
    let creds = Credentials::Keys(Arc::new(KeyRing::new([key]).expect("ring")));

    // Keep one pair of sessions: sequence numbers simply go on.
    let (mut source, mut backup, _, _) = handshake(&creds, &mut rng);
    let (best, median) = rounds(frames, |n| {
        let t = Instant::now();
        for tick in 0..n {
            let sealed = source.seal_heartbeat(black_box(tick));
            let f = backup.open(black_box(&sealed)).expect("open");
            black_box(f);
        }
        t.elapsed()
    });
    println!(
        "seal_heartbeat + open (HEARTBEAT, {} bytes): best {best:.3} µs, median {median:.3} µs \
         per frame ({frames} frames per round)",
        vmm_takeover_core::auth::SEALED_HEARTBEAT_LEN
    );

    // The subscribers' path: seal into an outbox, feed a Reader, take the frame out.
    let mut outbox = Vec::with_capacity(4096);
    let mut reader = Reader::new();
    let (best, median) = rounds(frames, |n| {
        let t = Instant::now();
        for tick in 0..n {
            outbox.clear();
            source.seal_into(&Frame::Heartbeat { seq: tick }, &mut outbox);
            reader.push(&outbox);
            let f = reader.next_frame(&mut backup).expect("open");
            black_box(f);
        }
        t.elapsed()
    });
    println!(
        "seal_into + Reader::next_frame (HEARTBEAT): best {best:.3} µs, median {median:.3} µs \
         per frame"
    );

    let insecure = Credentials::Insecure;
    let (mut source, mut backup, _, _) = handshake(&insecure, &mut rng);
    let (best, median) = rounds(frames, |n| {
        let t = Instant::now();
        for tick in 0..n {
            let sealed = source.seal_heartbeat(black_box(tick));
            black_box(backup.open(black_box(&sealed)).expect("open"));
        }
        t.elapsed()
    });
    println!(
        "for comparison, --insecure-no-auth seal_heartbeat + open: best {best:.3} µs, median \
         {median:.3} µs per frame"
    );

    let mut src_cpu = Duration::ZERO;
    let mut bk_cpu = Duration::ZERO;
    let (best, median) = rounds(handshakes, |n| {
        let t = Instant::now();
        for _ in 0..n {
            let (s, b, sc, bc) = handshake(&creds, &mut rng);
            src_cpu += sc;
            bk_cpu += bc;
            black_box((s, b));
        }
        t.elapsed()
    });
    let total = 5 * handshakes;
    println!(
        "handshake, both sides (HELLO, WELCOME, AUTH, session keys, nonces from getrandom): best \
         {best:.2} µs, median {median:.2} µs; of which source {:.2} µs, backup {:.2} µs on \
         average ({handshakes} handshakes per round)",
        src_cpu.as_secs_f64() * 1e6 / total as f64,
        bk_cpu.as_secs_f64() * 1e6 / total as f64,
    );
}
