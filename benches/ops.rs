// SPDX-License-Identifier: Apache-2.0
//! Operations benchmark: what `status` and metrics scrapes cost, and that they cost the heartbeat
//! nothing. A source and a backup at 10 ms × 3 on loopback; the backup has `--control` and
//! `--metrics`.
//!
//! `cargo bench --bench ops`. Knobs: `OPS_BENCH_SECS` (default 5). Results go to stdout and
//! `target/bench-ops.json`. Goal (issue "operations"): `status` answers in under 10 ms while the
//! loop runs 10 ms heartbeats, and neither a status flood nor stuck scrapers move the largest
//! heartbeat gap toward the deadline.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{armed_pair, TempDir};

const STATUS_GOAL: Duration = Duration::from_millis(10);

/// One status call; a "busy" answer (more callers than the process serves at once) is retried.
fn status(path: &Path) -> (Value, Duration) {
    let t = Instant::now();
    loop {
        let mut c = UnixStream::connect(path).unwrap();
        let _ = c.write_all(b"status\n");
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["error"].as_str().is_some_and(|e| e.contains("retry")) {
            continue;
        }
        assert!(v["error"].is_null(), "{v}");
        return (v, t.elapsed());
    }
}

/// One scrape: its time, or `None` for a 503 (every slot busy).
fn scrape(addr: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    let _ = write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    if s.starts_with("HTTP/1.1 503") {
        std::thread::sleep(Duration::from_millis(10));
        return None;
    }
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    Some(t.elapsed())
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The backup's largest gap (fraction of the deadline) and heartbeats since `base`.
fn gap(ctl: &Path) -> (f64, u64) {
    let (v, _) = status(ctl);
    (
        v["heartbeat_gap_max_ratio"].as_f64().unwrap(),
        v["heartbeats_received"].as_u64().unwrap(),
    )
}

fn main() {
    let secs = std::env::var("OPS_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u64);
    let dir = TempDir::new("bench-ops");
    let ctl = dir.path("backup.sock");
    let (_source, backup, _) = armed_pair(
        "bench-ops",
        &["--heartbeat", "10ms"],
        &[
            "--on-takeover",
            "true",
            "--control",
            ctl.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = backup
        .all_events()
        .into_iter()
        .find(|e| e["event"] == "metrics")
        .unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rows = Vec::new();

    // 1. One caller, one call at a time.
    let mut lat: Vec<Duration> = (0..500).map(|_| status(&ctl).1).collect();
    let (p50, p99, max) = (pct(&mut lat, 50), pct(&mut lat, 99), pct(&mut lat, 100));
    println!(
        "status, one caller: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal < {} ms: p99 at {:.2} of it)",
        ms(p50),
        ms(p99),
        ms(max),
        STATUS_GOAL.as_millis(),
        p99.as_secs_f64() / STATUS_GOAL.as_secs_f64()
    );
    rows.push(
        json!({"case": "status-one-caller", "p50_ms": ms(p50), "p99_ms": ms(p99),
                     "max_ms": ms(max), "goal_ms": ms(STATUS_GOAL)}),
    );

    // 2. A flood: 4 callers as fast as they can.
    let (_, base) = gap(&ctl);
    let end = Instant::now() + Duration::from_secs(secs);
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                while Instant::now() < end {
                    v.push(status(&ctl).1);
                }
                v
            })
        })
        .collect();
    let mut lat: Vec<Duration> = callers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let (g, received) = gap(&ctl);
    let n = lat.len();
    let (p50, p99) = (pct(&mut lat, 50), pct(&mut lat, 99));
    println!(
        "status flood, 4 callers for {secs} s: {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms; \
         {} heartbeats (due {}), largest gap {g:.2} of the deadline",
        n as f64 / secs as f64,
        ms(p50),
        ms(p99),
        received - base,
        secs * 100
    );
    rows.push(
        json!({"case": "status-flood", "callers": 4, "calls_per_s": n as f64 / secs as f64,
                     "p50_ms": ms(p50), "p99_ms": ms(p99), "largest_gap_ratio": g,
                     "heartbeats": received - base}),
    );

    // 3. Stuck scrapers and one that scrapes as fast as it can.
    let mut held = Vec::new();
    for i in 0..32 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(1024).unwrap();
        s.connect(&metrics.parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        let mut c: TcpStream = s.into();
        if i % 2 == 1 {
            write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        held.push(c);
    }
    let (_, base) = gap(&ctl);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut lat = Vec::new();
    // The stuck ones hold the 8 scrape slots for their timeouts (2 s) while this one gets 503s
    // or, once a slot frees, its answer; then back to back.
    let first = Instant::now();
    let mut first_ok_after = None;
    while Instant::now() < end {
        if let Some(t) = scrape(&metrics) {
            lat.push(t);
            first_ok_after.get_or_insert(first.elapsed());
        }
    }
    drop(held);
    let (g, received) = gap(&ctl);
    let n = lat.len();
    let (p50, p99) = (pct(&mut lat, 50), pct(&mut lat, 99));
    println!(
        "metrics: 32 stuck scrapers + one scraping back to back for {secs} s: {n} scrapes \
         (first after {first_ok_after:?}), p50 {:.2} ms, p99 {:.2} ms; {} heartbeats (due {}), \
         largest gap {g:.2} of the deadline",
        ms(p50),
        ms(p99),
        received - base,
        secs * 100
    );
    rows.push(
        json!({"case": "metrics-stuck-and-busy", "scrapes": n, "p50_ms": ms(p50),
                     "p99_ms": ms(p99), "first_ok_ms": first_ok_after.map(ms),
                     "largest_gap_ratio": g, "heartbeats": received - base}),
    );
    assert_eq!(backup.count("link-lost"), 0, "a false takeover");

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-ops.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap());
    println!("results: {}", out.display());
}
