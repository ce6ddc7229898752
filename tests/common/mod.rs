// SPDX-License-Identifier: Apache-2.0
//! Shared by the integration tests and the benchmarks: runs the real `vmm-takeover` binary and
//! waits on the JSON lifecycle events it prints.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Generous upper bound for events that should come quickly.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_vmm-takeover") {
        return PathBuf::from(p);
    }
    // Benches are not given CARGO_BIN_EXE_*: find it next to the bench executable.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("vmm-takeover")
}

/// Now, in microseconds since the epoch (the clock the events use).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A port that was free a moment ago (for "backup starts first" cases).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Shared {
    events: VecDeque<Value>,
    all: Vec<Value>,
    closed: bool,
}

/// A running `vmm-takeover` process. Killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `vmm-takeover ARGS...` through an optional prefix (e.g. `ip netns exec NS`).
    pub fn spawn_with_prefix(name: &str, prefix: &[&str], args: &[&str]) -> Proc {
        let mut cmd = if prefix.is_empty() {
            Command::new(bin())
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(bin());
            c
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let sh = shared.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("{tag}: stdout line is not JSON ({e}): {line}"));
                eprintln!("[{tag}] {line}");
                let (m, c) = &*sh;
                let mut s = m.lock().unwrap();
                s.events.push_back(v.clone());
                s.all.push(v);
                c.notify_all();
            }
            let (m, c) = &*sh;
            m.lock().unwrap().closed = true;
            c.notify_all();
        });
        Proc {
            name: name.to_string(),
            child,
            shared,
            status: None,
        }
    }

    /// Spawns `vmm-takeover ARGS...`.
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Self::spawn_with_prefix(name, &[], args)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the next event named `name` (events before it are consumed), panicking after
    /// `timeout` with everything seen so far.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Value {
        self.try_wait_event(name, timeout).unwrap_or_else(|| {
            panic!(
                "{}: no {name:?} event within {timeout:?}; events: {:?}",
                self.name,
                self.all_events()
            )
        })
    }

    /// Like `wait_event` but returns `None` on timeout or when the process closed stdout.
    pub fn try_wait_event(&self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let (m, c) = &*self.shared;
        let mut s = m.lock().unwrap();
        loop {
            while let Some(v) = s.events.pop_front() {
                if v["event"] == name {
                    return Some(v);
                }
            }
            if s.closed {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            s = c.wait_timeout(s, left).unwrap().0;
        }
    }

    /// Every event printed so far.
    pub fn all_events(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().all.clone()
    }

    /// Names of every event printed so far.
    pub fn event_names(&self) -> Vec<String> {
        self.all_events()
            .iter()
            .map(|v| v["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// How many events named `name` were printed so far.
    pub fn count(&self, name: &str) -> usize {
        self.all_events()
            .iter()
            .filter(|v| v["event"] == name)
            .count()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill {} {sig}", self.name);
    }

    /// Waits for exit with an upper bound; panics if it does not exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                // Let the reader thread drain what the process printed before it exited.
                let (m, c) = &*self.shared;
                let mut g = m.lock().unwrap();
                while !g.closed {
                    g = c.wait_timeout(g, Duration::from_secs(5)).unwrap().0;
                }
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; events: {:?}",
                    self.name,
                    self.event_names()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.status.is_none() && self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a source on an ephemeral loopback port; returns it and its address.
pub fn start_source(name: &str, pair: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["source", "--listen", "127.0.0.1:0", "--pair-id", pair];
    args.extend_from_slice(extra);
    let p = Proc::spawn(name, &args);
    let ev = p.wait_event("listening", EVENT_TIMEOUT);
    let addr = ev["addr"].as_str().unwrap().parse().unwrap();
    (p, addr)
}

/// A unique scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vmm-takeover-{tag}-{}-{}",
            std::process::id(),
            now_us()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A hook command that appends `$VMM_TAKEOVER_REASON` to `file`.
pub fn record_hook(file: &std::path::Path) -> String {
    format!(
        "echo \"$VMM_TAKEOVER_REASON $VMM_TAKEOVER_PAIR_ID\" >> {}",
        file.display()
    )
}

/// Lines the record hook wrote (empty when it never ran).
pub fn hook_lines(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Starts `vmm-takeover backup --connect ADDR --pair-id PAIR EXTRA...`.
pub fn start_backup(name: &str, addr: impl std::fmt::Display, pair: &str, extra: &[&str]) -> Proc {
    let addr = addr.to_string();
    let mut args = vec!["backup", "--connect", &addr, "--pair-id", pair];
    args.extend_from_slice(extra);
    Proc::spawn(name, &args)
}

/// Starts a source and one backup for `pair`, and waits until the backup is armed and the source
/// has it joined. Returns both and the source's address.
pub fn armed_pair(
    pair: &str,
    source_extra: &[&str],
    backup_extra: &[&str],
) -> (Proc, Proc, SocketAddr) {
    let (source, addr) = start_source("source", pair, source_extra);
    let backup = start_backup("backup", addr, pair, backup_extra);
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    (source, backup, addr)
}
