// SPDX-License-Identifier: Apache-2.0
//! Detection latency per failure mode: fault → the backup's `takeover` (`detected_at_unix_us`).
//!
//! Real processes in network namespaces (the harness of `tests/common/netns.rs`): each run gets
//! fresh namespaces, arms a pair, waits a random fraction of the keepalive cycle (so the fault
//! lands anywhere in it), injects the fault and reads the takeover time. Scenarios: SIGKILL,
//! power loss (link down), reboot (namespace rebuilt → RST), one-way partitions both ways, and in
//! heartbeat mode (10 ms and 50 ms × 3 misses) link down and SIGSTOP; at keepalive `1:1:3` and
//! `2:1:2` (both bound 4 s).
//!
//! `cargo bench --bench detection`; `DETECTION_RUNS` (default 5) runs per row, `DETECTION_JOBS`
//! (default 4) keepalive-bound runs at a time. Short runs (kill, heartbeat) go one at a time so
//! that their sub-millisecond figures are not measuring the other runs' setup.
//! Prints a table and writes `target/bench-detection.json` (or `$CARGO_TARGET_DIR/...`).
//! Needs root; prints `SKIPPED: <why>` otherwise (and fails under `CI=true`).
//!
//! Goals: kill → takeover p99 ≤ 1 ms; silent failures ≤ bound + 100 ms and never early (before
//! `intvl × cnt` after the fault: the last ACK came less than `idle` before it); heartbeat
//! verdicts ≤ `interval × misses` + 10 ms; a reboot is seen (RST) before the keepalive bound.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::skip;
use netns::{run_scenario, Config, Hosts, Outcome, Scenario};
use serde_json::json;

const KEEPALIVES: [&str; 2] = ["1:1:3", "2:1:2"];
const HEARTBEATS_MS: [u64; 2] = [10, 50];
const MISSES: u32 = 3;
/// Silent failures must be detected within bound + this.
const SILENT_GOAL_SLACK_US: u64 = 100_000;
/// Heartbeat verdicts: `interval × misses` after the last heartbeat, plus timer and loop slack.
const HEARTBEAT_GOAL_SLACK_US: u64 = 10_000;
/// SIGKILL must be detected within this (p99).
const KILL_GOAL_US: u64 = 1_000;

#[derive(Clone)]
struct Job {
    scenario: Scenario,
    cfg: Config,
    run: usize,
}

struct Sample {
    job: Job,
    result: Result<Outcome, String>,
}

static SEED: AtomicU64 = AtomicU64::new(0);

/// A small xorshift: the settle time only has to spread faults over the keepalive cycle.
fn random_below(limit_us: u64) -> u64 {
    if limit_us == 0 {
        return 0;
    }
    let mut x = SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ common::now_us();
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x % limit_us
}

fn settle(job: &Job) -> Duration {
    let base = Duration::from_millis(100);
    let spread_us = match (job.scenario, job.cfg.heartbeat) {
        (Scenario::Kill, _) => 0,
        (_, Some(hb)) => hb.as_micros() as u64,
        // On an idle healthy link the probe cycle repeats every `idle` seconds.
        _ => job.cfg.keepalive_parts().0,
    };
    base + Duration::from_micros(random_below(spread_us))
}

fn run_job(job: Job) -> Sample {
    let tag = format!(
        "b{}-{}",
        match job.scenario {
            Scenario::Kill => "kill",
            Scenario::PowerLoss => "pwr",
            Scenario::Reboot => "rbt",
            Scenario::PartitionSourceToBackup => "pso",
            Scenario::PartitionBackupToSource => "psi",
            Scenario::HeartbeatLinkDown => "hbd",
            Scenario::HeartbeatStop => "hbs",
        },
        job.run
    );
    let wait = settle(&job);
    let r = catch_unwind(AssertUnwindSafe(|| {
        run_scenario(&tag, job.scenario, &job.cfg, wait)
    }));
    let result = match r {
        Ok(Ok(Some(o))) => Ok(o),
        Ok(Ok(None)) => Err("skipped".to_string()),
        Ok(Err(e)) => Err(e),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string())),
    };
    let line = match &result {
        Ok(o) => format!(
            "{} {} run {}: {} after {:.3} ms",
            job.scenario.name(),
            job.cfg.label(),
            job.run,
            o.reason(),
            o.latency_us() as f64 / 1000.0
        ),
        Err(e) => format!(
            "{} {} run {}: FAILED: {e}",
            job.scenario.name(),
            job.cfg.label(),
            job.run
        ),
    };
    eprintln!("detection: {line}");
    Sample { job, result }
}

/// Runs `jobs` with at most `parallel` at a time.
fn run_all(jobs: Vec<Job>, parallel: usize) -> Vec<Sample> {
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let out = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let (q, o) = (queue.clone(), out.clone());
            std::thread::spawn(move || loop {
                let Some(job) = q.lock().unwrap().pop_front() else {
                    return;
                };
                let s = run_job(job);
                o.lock().unwrap().push(s);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap()
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&dir).ok();
    dir.canonicalize().unwrap_or(dir)
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; with harness = false there is nothing else to parse.
    let runs = env_usize("DETECTION_RUNS", 5).max(1);
    let parallel = env_usize("DETECTION_JOBS", 4).max(1);
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the children's logs to real problems; the table is the output. (Before any thread.)
        std::env::set_var("RUST_LOG", "error");
    }
    let iptables = match Hosts::new("bench-probe") {
        Err(why) => return skip(&why),
        Ok(h) => h.iptables_usable(),
    };
    if let Err(why) = &iptables {
        skip(&format!("partition scenarios: {why}"));
    }

    let mut quick = Vec::new();
    let mut slow = Vec::new();
    for ka in KEEPALIVES {
        for run in 0..runs {
            quick.push(Job {
                scenario: Scenario::Kill,
                cfg: Config::keepalive(ka),
                run,
            });
            for hb in HEARTBEATS_MS {
                for sc in [Scenario::HeartbeatLinkDown, Scenario::HeartbeatStop] {
                    quick.push(Job {
                        scenario: sc,
                        cfg: Config::heartbeat(ka, Duration::from_millis(hb), MISSES),
                        run,
                    });
                }
            }
            for sc in [
                Scenario::PowerLoss,
                Scenario::Reboot,
                Scenario::PartitionSourceToBackup,
                Scenario::PartitionBackupToSource,
            ] {
                if sc.needs_iptables() && iptables.is_err() {
                    continue;
                }
                slow.push(Job {
                    scenario: sc,
                    cfg: Config::keepalive(ka),
                    run,
                });
            }
        }
    }
    let started = Instant::now();
    let mut samples = run_all(quick, 1);
    samples.extend(run_all(slow, parallel));
    let elapsed = started.elapsed();

    // Group by (scenario, configuration), in a stable order.
    let order = |s: Scenario| match s {
        Scenario::Kill => 0,
        Scenario::PowerLoss => 1,
        Scenario::Reboot => 2,
        Scenario::PartitionSourceToBackup => 3,
        Scenario::PartitionBackupToSource => 4,
        Scenario::HeartbeatLinkDown => 5,
        Scenario::HeartbeatStop => 6,
    };
    let mut groups: BTreeMap<(u8, String, u64), Vec<&Sample>> = BTreeMap::new();
    for s in &samples {
        let hb = s.job.cfg.heartbeat.map_or(0, |h| h.as_millis() as u64);
        groups
            .entry((order(s.job.scenario), s.job.cfg.keepalive.clone(), hb))
            .or_default()
            .push(s);
    }

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut bad = false;
    println!();
    println!(
        "{:<18} {:<6} {:>8} {:>8} {:>3} {:>10} {:>10} {:>10} {:>10} {:>7} {:>5} {:>4}  goal",
        "scenario",
        "ka",
        "hb",
        "bound",
        "n",
        "min ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "max/bnd",
        "early",
        "err"
    );
    for group in groups.values() {
        let job = &group[0].job;
        let sc = job.scenario;
        let bound_us = sc.bound_us(&job.cfg);
        let mut lat = Vec::new();
        let mut early = 0;
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut errors = 0;
        for s in group {
            match &s.result {
                Ok(o) => {
                    *reasons.entry(o.reason().to_string()).or_default() += 1;
                    if o.reason() != sc.expected_reason() || o.takeovers != 1 {
                        errors += 1;
                        failures.push(format!(
                            "{} {} run {}: reason {} (expected {}), {} takeover(s), hook {:?}",
                            sc.name(),
                            job.cfg.label(),
                            s.job.run,
                            o.reason(),
                            sc.expected_reason(),
                            o.takeovers,
                            o.hook_lines
                        ));
                    } else if o.hook_lines.len() != 1 {
                        errors += 1;
                        failures.push(format!(
                            "{} {}: vm_start ran {} times",
                            sc.name(),
                            job.cfg.label(),
                            o.hook_lines.len()
                        ));
                    }
                    if o.early() {
                        early += 1;
                    }
                    lat.push(o.latency_us());
                }
                Err(e) => {
                    errors += 1;
                    failures.push(format!(
                        "{} {} run {}: {e}",
                        sc.name(),
                        job.cfg.label(),
                        s.job.run
                    ));
                }
            }
        }
        lat.sort_unstable();
        let ms = |us: i64| us as f64 / 1000.0;
        let (min, p50, p99, max) = if lat.is_empty() {
            (0, 0, 0, 0)
        } else {
            (
                lat[0],
                percentile(&lat, 0.50),
                percentile(&lat, 0.99),
                lat[lat.len() - 1],
            )
        };
        let ratio = max as f64 / bound_us as f64;
        let (goal, met) = match sc {
            Scenario::Kill => (
                "p99<=1ms".to_string(),
                p99 <= KILL_GOAL_US as i64 && early == 0,
            ),
            Scenario::PowerLoss
            | Scenario::PartitionSourceToBackup
            | Scenario::PartitionBackupToSource => (
                "<=bound+100ms".to_string(),
                max <= (bound_us + SILENT_GOAL_SLACK_US) as i64 && early == 0,
            ),
            Scenario::HeartbeatLinkDown | Scenario::HeartbeatStop => (
                "<=bound+10ms".to_string(),
                max <= (bound_us + HEARTBEAT_GOAL_SLACK_US) as i64 && early == 0,
            ),
            Scenario::Reboot => ("<=bound".to_string(), max <= bound_us as i64 && early == 0),
        };
        if early > 0 || errors > 0 {
            bad = true;
        }
        let hb = job.cfg.heartbeat.map_or("-".to_string(), |h| {
            format!("{}ms×{}", h.as_millis(), MISSES)
        });
        println!(
            "{:<18} {:<6} {:>8} {:>6}ms {:>3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>7.3} {:>5} {:>4}  {} {}",
            sc.name(),
            job.cfg.keepalive,
            hb,
            bound_us / 1000,
            lat.len(),
            ms(min),
            ms(p50),
            ms(p99),
            ms(max),
            ratio,
            early,
            errors,
            goal,
            if met { "ok" } else { "MISSED" }
        );
        rows.push(json!({
            "scenario": sc.name(),
            "keepalive": job.cfg.keepalive,
            "heartbeat_ms": job.cfg.heartbeat.map(|h| h.as_millis() as u64),
            "misses": job.cfg.heartbeat.map(|_| MISSES),
            "expected_reason": sc.expected_reason(),
            "reasons": reasons,
            "bound_ms": bound_us as f64 / 1000.0,
            "floor_ms": sc.floor_us(&job.cfg) as f64 / 1000.0,
            "n": lat.len(),
            "errors": errors,
            "min_ms": ms(min),
            "p50_ms": ms(p50),
            "p99_ms": ms(p99),
            "max_ms": ms(max),
            "max_over_bound": ratio,
            "early": early,
            "goal": goal,
            "goal_met": met,
            "latencies_us": lat,
        }));
    }
    println!(
        "\n{} runs in {:.1} s (keepalive-bound runs {parallel} at a time); latency = fault \
         (just before the injecting command) → backup's detected_at",
        samples.len(),
        elapsed.as_secs_f64()
    );
    for f in &failures {
        println!("FAILED: {f}");
    }

    let path = target_dir().join("bench-detection.json");
    let doc = json!({
        "bench": "detection",
        "runs_per_row": runs,
        "parallel": parallel,
        "elapsed_s": elapsed.as_secs_f64(),
        "rows": rows,
        "failures": failures,
    });
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
    if bad {
        println!("detection: early takeovers or failed runs (see above)");
        std::process::exit(1);
    }
}
