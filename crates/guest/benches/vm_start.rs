// SPDX-License-Identifier: Apache-2.0
//! How fast does a standby guest run after `vm_start`?
//!
//! `cargo bench -p vmm-takeover-guest --bench vm_start`
//!
//! - kvm-dummy: a fresh paused [`DummyVm`] per run; `start → first guest exit` is measured inside
//!   the VM (release of the vCPU thread → first `out` seen by the host), `vm_start() call` is the
//!   wall time of the hook as the takeover core sees it; `resume after pause` releases one warm
//!   VM again and again (thread wake-up without the first-`KVM_RUN` costs of a fresh vCPU).
//! - qemu: a fresh `qemu-system-x86_64 -S` per run, left to settle for 300 ms; `vm_start()` is the whole hook from
//!   `prelaunch` (connect + greeting + capabilities + `cont` + `query-status` until running);
//!   `cont → running` is the same on an already open QMP session, after a `stop`.
//!
//! Runs: `VM_START_BENCH_DUMMY_RUNS` (default 50), `VM_START_BENCH_QEMU_RUNS` (default 10).
//! Prints a table and writes `target/bench-vm_start.json` (or `$CARGO_TARGET_DIR/...`).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use vmm_takeover_core::{TakeoverReason, TakeoverRecord, VmStart};
use vmm_takeover_guest::qemu::find_qemu;
use vmm_takeover_guest::{DummyVm, QemuProcess, QmpClient, QmpVm};

// The tests' `skip`: one rule for the whole crate (prints SKIPPED, fails when CI=true).
#[path = "../tests/common/mod.rs"]
mod common;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each fresh QEMU may settle before it is measured.
const QEMU_SETTLE: Duration = Duration::from_millis(300);

fn runs(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn record() -> TakeoverRecord {
    TakeoverRecord {
        reason: TakeoverReason::TimedOut,
        pair_id: "bench".to_string(),
        armed_at: SystemTime::now(),
        detected_at: SystemTime::now(),
        detected_instant: Instant::now(),
        keepalive: None,
        heartbeat: None,
        errno: None,
        epoch: None,
        link: None,
        detail: "test".to_string(),
    }
}

/// One row of the result table.
enum Row {
    Measured {
        name: String,
        samples: Vec<Duration>,
    },
    Skipped {
        name: String,
        why: String,
    },
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Row {
    fn to_json(&self) -> Value {
        match self {
            Row::Measured { name, samples } => {
                let mut s = samples.clone();
                s.sort();
                let mean = s.iter().sum::<Duration>() / s.len() as u32;
                json!({
                    "name": name,
                    "runs": s.len(),
                    "min_us": us(s[0]),
                    "p50_us": us(percentile(&s, 0.50)),
                    "p99_us": us(percentile(&s, 0.99)),
                    "max_us": us(s[s.len() - 1]),
                    "mean_us": us(mean),
                })
            }
            Row::Skipped { name, why } => json!({ "name": name, "skipped": why }),
        }
    }

    fn print(&self) {
        match self {
            Row::Measured { name, samples } => {
                let mut s = samples.clone();
                s.sort();
                println!(
                    "{name:<44} {:>5} {:>12.1} {:>12.1} {:>12.1}",
                    s.len(),
                    us(percentile(&s, 0.50)),
                    us(percentile(&s, 0.99)),
                    us(s[s.len() - 1]),
                );
            }
            Row::Skipped { name, why } => println!("{name:<44} SKIPPED: {why}"),
        }
    }
}

fn bench_dummy(n: usize) -> Vec<Row> {
    let first_exit = "kvm-dummy: start -> first guest exit";
    let call = "kvm-dummy: vm_start() call";
    let resume = "kvm-dummy: resume after pause -> first exit";
    if let Err(e) = DummyVm::probe() {
        let why = e.to_string();
        common::skip(format!("kvm-dummy rows: {why}"));
        return [first_exit, call, resume]
            .into_iter()
            .map(|name| Row::Skipped {
                name: name.into(),
                why: why.clone(),
            })
            .collect();
    }
    let mut exit_samples = Vec::with_capacity(n);
    let mut call_samples = Vec::with_capacity(n);
    let rec = record();
    for _ in 0..n {
        let vm = DummyVm::new().expect("create the dummy VM");
        let mut hook = vm.clone();
        // Let the fresh vCPU thread reach its park point, as a standby VM would long before
        // any takeover.
        std::thread::sleep(Duration::from_millis(2));
        let t0 = Instant::now();
        hook.vm_start(&rec).expect("vm_start");
        call_samples.push(t0.elapsed());
        let started = vm.started_at().expect("started_at");
        let first = vm.first_exit_after_start().expect("first exit");
        exit_samples.push(first - started);
    }
    // Warm: the same VM paused and released again (vCPU thread wake-up without first-run costs).
    let vm = DummyVm::new().expect("create the dummy VM");
    let mut resume_samples = Vec::with_capacity(n);
    for _ in 0..n {
        vm.pause().expect("pause");
        std::thread::sleep(Duration::from_millis(2));
        vm.start().expect("start");
        let first = vm
            .wait_first_exit(Duration::from_secs(10))
            .expect("first exit");
        resume_samples.push(first - vm.started_at().expect("started_at"));
    }
    vec![
        Row::Measured {
            name: first_exit.into(),
            samples: exit_samples,
        },
        Row::Measured {
            name: call.into(),
            samples: call_samples,
        },
        Row::Measured {
            name: resume.into(),
            samples: resume_samples,
        },
    ]
}

fn bench_qemu(n: usize) -> Vec<Row> {
    let (hook, session) = (
        "qemu: vm_start() (connect+cont+running)",
        "qemu: cont -> running (open QMP session)",
    );
    let why = if find_qemu().is_none() {
        Some("qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)".to_string())
    } else {
        DummyVm::probe()
            .err()
            .map(|e| format!("QEMU needs KVM here: {e}"))
    };
    if let Some(why) = why {
        common::skip(format!("qemu rows: {why}"));
        return vec![
            Row::Skipped {
                name: hook.into(),
                why: why.clone(),
            },
            Row::Skipped {
                name: session.into(),
                why,
            },
        ];
    }
    let mut hook_samples = Vec::with_capacity(n);
    let mut session_samples = Vec::with_capacity(n);
    let rec = record();
    for _ in 0..n {
        let qemu = QemuProcess::spawn_paused().expect("start QEMU");
        // A standby QEMU has been up for a while when a takeover comes; right after start-up
        // it still finishes initializing and the first commands are slower.
        std::thread::sleep(QEMU_SETTLE);
        let mut vm = QmpVm::new(qemu.socket_path()).with_timeout(QMP_TIMEOUT);

        let t0 = Instant::now();
        vm.vm_start(&rec).expect("vm_start");
        hook_samples.push(t0.elapsed());

        let mut client = QmpClient::connect(qemu.socket_path(), QMP_TIMEOUT).expect("connect");
        client.execute("stop", None).expect("stop");
        let t0 = Instant::now();
        client.execute("cont", None).expect("cont");
        while !client.query_status().expect("query-status").running {
            assert!(
                t0.elapsed() < QMP_TIMEOUT,
                "QEMU did not run within {QMP_TIMEOUT:?}"
            );
        }
        session_samples.push(t0.elapsed());
    }
    vec![
        Row::Measured {
            name: hook.into(),
            samples: hook_samples,
        },
        Row::Measured {
            name: session.into(),
            samples: session_samples,
        },
    ]
}

fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    std::fs::create_dir_all(&dir).ok();
    dir.canonicalize().unwrap_or(dir)
}

fn main() {
    // `cargo bench` passes `--bench`; with harness = false there is nothing else to parse.
    let dummy_runs = runs("VM_START_BENCH_DUMMY_RUNS", 50);
    let qemu_runs = runs("VM_START_BENCH_QEMU_RUNS", 10);

    let mut rows = bench_dummy(dummy_runs);
    rows.extend(bench_qemu(qemu_runs));

    println!();
    println!(
        "{:<44} {:>5} {:>12} {:>12} {:>12}",
        "vm_start latency", "runs", "p50 (us)", "p99 (us)", "max (us)"
    );
    for row in &rows {
        row.print();
    }

    let report = json!({
        "bench": "vm_start",
        "unix_time": SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "results": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let dir = target_dir();
    let path = dir.join("bench-vm_start.json");
    match std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n"))
    {
        Ok(()) => println!("\nwrote {}", path.display()),
        Err(e) => eprintln!("\ncannot write {}: {e}", path.display()),
    }
}
