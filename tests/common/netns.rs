// SPDX-License-Identifier: Apache-2.0
//! Two hosts in network namespaces, joined by a veth pair, and the faults that kill one of them.
//!
//! Shared by `tests/netns_failures.rs`, `tests/data_in_flight.rs` and `benches/detection.rs`;
//! include it next to `common` with `#[path = "common/netns.rs"] mod netns;`.
//!
//! [`Hosts::new`] makes a "src" and a "bak" namespace (loopback up) and a veth pair between them
//! carrying `10.213.0.1/30` (source) and `10.213.0.2/30` (backup). Addresses only ever exist
//! inside these namespaces. Names carry the test process's pid, a counter and a tag, so parallel
//! tests never meet; `Drop` kills whatever still runs inside and deletes the veth pair and both
//! namespaces, also when the test panics. Namespaces left behind by a test process that was
//! killed outright are swept by the next [`Hosts::new`].
//!
//! [`Pair`] runs `vmm-takeover source` in src and `vmm-takeover backup` in bak (through
//! `ip netns exec NS`, which execs, so the pid is the binary's) until the link is armed, with a
//! takeover hook that appends to a file; [`run_scenario`] injects one [`Scenario`]'s fault and
//! measures the takeover.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{hook_lines, now_us, record_hook, skip, Proc, TempDir, EVENT_TIMEOUT};

/// The source host's address on the link.
pub const SRC_IP: &str = "10.213.0.1";
/// The backup host's address on the link.
pub const BAK_IP: &str = "10.213.0.2";
/// Prefix length of the link.
pub const PREFIX_LEN: u8 = 30;
/// The source's heartbeat port.
pub const PORT: u16 = 7070;
/// Every namespace this harness makes starts with this.
const NS_PREFIX: &str = "vtko-";
/// Slack for kernel timer granularity (jiffies) when checking that a keepalive verdict did not
/// come early.
pub const TIMER_SLACK_US: u64 = 50_000;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command to completion; `Err` carries its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Wall-clock bounds of a fault: it happened at some instant in `before_us..=after_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultTime {
    /// Just before the fault was injected (latencies are measured from here: pessimistic).
    pub before_us: u64,
    /// Just after the injecting command returned (the "never early" checks use this).
    pub after_us: u64,
}

impl FaultTime {
    /// Times `f`, which injects the fault.
    pub fn around(f: impl FnOnce() -> Result<(), String>) -> Result<FaultTime, String> {
        let before_us = now_us();
        f()?;
        Ok(FaultTime {
            before_us,
            after_us: now_us(),
        })
    }
}

/// Direction of a one-way partition, seen from the source host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source → backup is dropped (source's OUTPUT): the backup's keepalive probes arrive but
    /// their ACKs are lost.
    SourceToBackup,
    /// Backup → source is dropped (source's INPUT): the backup's probes are lost.
    BackupToSource,
}

/// Two namespaces joined by a veth pair. Everything is removed on drop.
pub struct Hosts {
    /// The source host's namespace.
    pub src: String,
    /// The backup host's namespace.
    pub bak: String,
    /// The veth end in `src`.
    pub src_if: String,
    /// The veth end in `bak`.
    pub bak_if: String,
}

impl Hosts {
    /// Makes both namespaces and the link. `Err` says why this machine cannot (the caller
    /// prints `SKIPPED: ...`).
    pub fn new(tag: &str) -> Result<Hosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN".into());
        }
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let base = format!("{NS_PREFIX}{pid}-{n}-{tag}");
        // Interface names are limited to 15 characters: "vk" + pid (≤ 6 hex) + "x" + n + end.
        let h = Hosts {
            src: format!("{base}-src"),
            bak: format!("{base}-bak"),
            src_if: format!("vk{pid:x}x{n:x}s"),
            bak_if: format!("vk{pid:x}x{n:x}b"),
        };
        assert!(h.src_if.len() <= 15, "{} too long", h.src_if);
        // From here on `h`'s Drop removes whatever part was made.
        ip(&["netns", "add", &h.src]).map_err(|e| format!("ip netns add failed: {e}"))?;
        ip(&["netns", "add", &h.bak]).map_err(|e| format!("ip netns add failed: {e}"))?;
        ip(&["-n", &h.src, "link", "set", "lo", "up"])?;
        ip(&["-n", &h.bak, "link", "set", "lo", "up"])?;
        h.make_link()
            .map_err(|e| format!("cannot make a veth pair between namespaces: {e}"))?;
        Ok(h)
    }

    /// Creates the veth pair (src end in src, bak end in bak), addresses it and brings it up.
    fn make_link(&self) -> Result<(), String> {
        ip(&[
            "-n",
            &self.src,
            "link",
            "add",
            &self.src_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.bak_if,
            "netns",
            &self.bak,
        ])?;
        let src_addr = format!("{SRC_IP}/{PREFIX_LEN}");
        let bak_addr = format!("{BAK_IP}/{PREFIX_LEN}");
        ip(&[
            "-n",
            &self.src,
            "addr",
            "add",
            &src_addr,
            "dev",
            &self.src_if,
        ])?;
        ip(&[
            "-n",
            &self.bak,
            "addr",
            "add",
            &bak_addr,
            "dev",
            &self.bak_if,
        ])?;
        ip(&["-n", &self.src, "link", "set", &self.src_if, "up"])?;
        ip(&["-n", &self.bak, "link", "set", &self.bak_if, "up"])?;
        Ok(())
    }

    /// `ip netns exec NS` for the source host.
    pub fn src_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.src]
    }

    /// `ip netns exec NS` for the backup host.
    pub fn bak_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.bak]
    }

    /// The source's listen/connect address.
    pub fn source_addr() -> String {
        format!("{SRC_IP}:{PORT}")
    }

    /// Runs `vmm-takeover source --listen 10.213.0.1:7070 --pair-id PAIR EXTRA...` in src and
    /// waits for `listening`.
    pub fn spawn_source(&self, name: &str, pair: &str, extra: &[&str]) -> Proc {
        let addr = Self::source_addr();
        let mut args = vec!["source", "--listen", &addr, "--pair-id", pair];
        args.extend_from_slice(extra);
        let p = Proc::spawn_with_prefix(name, &self.src_prefix(), &args);
        p.wait_event("listening", EVENT_TIMEOUT);
        p
    }

    /// Runs `vmm-takeover backup --connect 10.213.0.1:7070 --pair-id PAIR EXTRA...` in bak.
    pub fn spawn_backup(&self, name: &str, pair: &str, extra: &[&str]) -> Proc {
        let addr = Self::source_addr();
        let mut args = vec!["backup", "--connect", &addr, "--pair-id", pair];
        args.extend_from_slice(extra);
        Proc::spawn_with_prefix(name, &self.bak_prefix(), &args)
    }

    /// Checks that iptables works inside the source namespace.
    pub fn iptables_usable(&self) -> Result<(), String> {
        run("ip", &["netns", "exec", &self.src, "iptables", "-S"])
            .map(drop)
            .map_err(|e| format!("iptables unusable in a namespace: {e}"))
    }

    /// Power loss / cable cut: the source's end of the link goes down. Nothing reaches the
    /// backup any more and no FIN or RST can leave the source.
    pub fn cut_source_link(&self) -> Result<FaultTime, String> {
        FaultTime::around(|| ip(&["-n", &self.src, "link", "set", &self.src_if, "down"]).map(drop))
    }

    /// Brings the source's end of the link back up (end of a flap).
    pub fn restore_source_link(&self) -> Result<(), String> {
        ip(&["-n", &self.src, "link", "set", &self.src_if, "up"]).map(drop)
    }

    /// The backup host's end of the link goes down.
    pub fn cut_backup_link(&self) -> Result<FaultTime, String> {
        FaultTime::around(|| ip(&["-n", &self.bak, "link", "set", &self.bak_if, "down"]).map(drop))
    }

    /// One-way partition with an iptables DROP rule in the source namespace.
    pub fn partition(&self, dir: Direction) -> Result<FaultTime, String> {
        let (chain, flag) = match dir {
            Direction::SourceToBackup => ("OUTPUT", "-o"),
            Direction::BackupToSource => ("INPUT", "-i"),
        };
        FaultTime::around(|| {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.src,
                    "iptables",
                    "-A",
                    chain,
                    flag,
                    &self.src_if,
                    "-j",
                    "DROP",
                ],
            )
            .map(drop)
        })
    }

    /// Reboot of the source host: the link is cut (so the dying process's FIN is lost), the
    /// source is SIGKILLed, the src namespace and the link are deleted and made anew with the
    /// same addresses. The new "kernel" knows no connection: the backup's next keepalive probe
    /// is answered with RST. The returned time is the cut.
    pub fn reboot_source(&self, source: &mut Proc) -> Result<FaultTime, String> {
        let cut = self.cut_source_link()?;
        source.signal(libc::SIGKILL);
        source.wait_exit(EVENT_TIMEOUT);
        // Deleting the link explicitly: a namespace that still holds orphaned sockets (the
        // killed source's, in FIN_WAIT1) is dismantled only when they die, and its devices with it.
        ip(&["-n", &self.src, "link", "del", &self.src_if])?;
        kill_ns_pids(&self.src);
        ip(&["netns", "del", &self.src])?;
        ip(&["netns", "add", &self.src])?;
        ip(&["-n", &self.src, "link", "set", "lo", "up"])?;
        self.make_link()?;
        Ok(cut)
    }

    /// Kills a process (in either namespace) with `sig`.
    pub fn signal(proc: &Proc, sig: i32) -> FaultTime {
        let before_us = now_us();
        proc.signal(sig);
        FaultTime {
            before_us,
            after_us: now_us(),
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        kill_ns_pids(&self.src);
        kill_ns_pids(&self.bak);
        // Deleting one end deletes the pair; it may already be gone.
        let _ = ip(&["-n", &self.src, "link", "del", &self.src_if]);
        let _ = ip(&["-n", &self.bak, "link", "del", &self.bak_if]);
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.bak]);
    }
}

/// SIGCONT (a SIGSTOPped source must not stay stopped) then SIGKILL every process in a
/// namespace this harness made.
fn kill_ns_pids(ns: &str) {
    debug_assert!(ns.starts_with(NS_PREFIX));
    let Ok(out) = ip(&["netns", "pids", ns]) else {
        return;
    };
    for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: kill(2) on a process inside our own test namespace.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Removes namespaces of this harness whose test process no longer exists (it was killed before
/// its Drop could run).
fn sweep_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_ns_pids(name);
        let _ = ip(&["netns", "del", name]);
    }
}

/// Link configuration for a [`Pair`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `--keepalive` on the backup (and the source, unless `source_keepalive`), `IDLE:INTVL:CNT`
    /// in whole seconds.
    pub keepalive: String,
    /// `--keepalive` on the source when it differs.
    pub source_keepalive: Option<String>,
    /// `--heartbeat` on the source (and `--heartbeat-misses` on the backup).
    pub heartbeat: Option<Duration>,
    /// `--heartbeat-misses` on the backup.
    pub misses: u32,
    /// More source flags.
    pub source_extra: Vec<String>,
    /// More backup flags.
    pub backup_extra: Vec<String>,
}

impl Config {
    /// Kernel keepalive only.
    pub fn keepalive(spec: &str) -> Config {
        Config {
            keepalive: spec.to_string(),
            source_keepalive: None,
            heartbeat: None,
            misses: 3,
            source_extra: Vec::new(),
            backup_extra: Vec::new(),
        }
    }

    /// Keepalive plus application heartbeats every `interval`, `misses` allowed.
    pub fn heartbeat(spec: &str, interval: Duration, misses: u32) -> Config {
        Config {
            heartbeat: Some(interval),
            misses,
            ..Config::keepalive(spec)
        }
    }

    /// Adds source flags.
    pub fn source_flags(mut self, flags: &[&str]) -> Config {
        self.source_extra
            .extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// (idle, interval, count) of the keepalive spec, in microseconds and probes.
    pub fn keepalive_parts(&self) -> (u64, u64, u64) {
        let p: Vec<u64> = self
            .keepalive
            .split(':')
            .map(|s| {
                s.parse()
                    .expect("keepalive spec IDLE:INTVL:CNT in whole seconds")
            })
            .collect();
        assert_eq!(p.len(), 3, "keepalive spec IDLE:INTVL:CNT");
        (p[0] * 1_000_000, p[1] * 1_000_000, p[2])
    }

    /// Worst case for an idle dead peer: `idle + intvl × cnt`.
    pub fn keepalive_bound_us(&self) -> u64 {
        let (idle, intvl, cnt) = self.keepalive_parts();
        idle + intvl * cnt
    }

    /// Best case for an idle dead peer, counted from the fault. On a healthy idle link the
    /// backup probes (and hears back) every `idle`, so the last thing it heard came less than
    /// `idle` before the fault, and the verdict comes `idle + intvl × cnt` after that: at least
    /// `intvl × cnt` after the fault. (For `1:1:3` that is `idle + intvl × (cnt - 1)` = 3 s; for
    /// `2:1:2` it is 2 s, not 3 s: the fault can land late in the 2 s idle period.)
    pub fn keepalive_floor_us(&self) -> u64 {
        let (_, intvl, cnt) = self.keepalive_parts();
        intvl * cnt
    }

    /// `interval × misses` in heartbeat mode.
    pub fn heartbeat_deadline_us(&self) -> Option<u64> {
        self.heartbeat
            .map(|h| h.as_micros() as u64 * u64::from(self.misses))
    }

    /// The keepalive spec as `idle:intvl:cnt`, or with the heartbeat, e.g. `1:1:3+hb10ms×3`.
    pub fn label(&self) -> String {
        match self.heartbeat {
            None => self.keepalive.clone(),
            Some(h) => format!("{} hb {}ms×{}", self.keepalive, h.as_millis(), self.misses),
        }
    }
}

/// A source in src and a backup in bak with an armed link. Fields drop in order: processes
/// first, then the namespaces.
pub struct Pair {
    /// The backup process (in bak).
    pub backup: Proc,
    /// The source process (in src).
    pub source: Proc,
    /// The two hosts.
    pub hosts: Hosts,
    /// The backup's `armed` event.
    pub armed: Value,
    /// The source's `backup-joined` event.
    pub joined: Value,
    /// The pair id both sides use.
    pub pair_id: String,
    /// The file the backup's `--on-takeover` hook appends `REASON PAIR_ID` to.
    pub hook_file: PathBuf,
    /// Scratch directory of the hook file.
    pub dir: TempDir,
    /// The configuration it was started with.
    pub cfg: Config,
}

impl Pair {
    /// Makes the hosts, starts both sides and waits until the backup is armed and the source
    /// saw it join. `Err` only when namespaces cannot be made (skip); anything else panics.
    pub fn start(tag: &str, cfg: &Config) -> Result<Pair, String> {
        let hosts = Hosts::new(tag)?;
        let dir = TempDir::new(&format!("netns-{tag}"));
        let hook_file = dir.path("hook");
        let pair_id = format!("vm-{tag}");
        let hb = cfg.heartbeat.map(|h| format!("{}us", h.as_micros()));
        let src_keepalive = cfg.source_keepalive.as_ref().unwrap_or(&cfg.keepalive);
        let mut src_args: Vec<&str> = vec!["--keepalive", src_keepalive];
        if let Some(hb) = hb.as_deref() {
            src_args.extend(["--heartbeat", hb]);
        }
        src_args.extend(cfg.source_extra.iter().map(String::as_str));
        let source = hosts.spawn_source(&format!("{tag}/source"), &pair_id, &src_args);
        let hook = record_hook(&hook_file);
        let misses = cfg.misses.to_string();
        let mut bak_args: Vec<&str> = vec![
            "--keepalive",
            &cfg.keepalive,
            "--heartbeat-misses",
            &misses,
            "--on-takeover",
            &hook,
        ];
        bak_args.extend(cfg.backup_extra.iter().map(String::as_str));
        let backup = hosts.spawn_backup(&format!("{tag}/backup"), &pair_id, &bak_args);
        let armed = backup.wait_event("armed", EVENT_TIMEOUT);
        let joined = source.wait_event("backup-joined", EVENT_TIMEOUT);
        let bound_ms = armed["keepalive"]["bound_ms"].as_u64();
        assert_eq!(
            bound_ms,
            Some(cfg.keepalive_bound_us() / 1000),
            "{tag}: keepalive read back from the backup's socket: {armed}"
        );
        if let Some(d) = cfg.heartbeat_deadline_us() {
            assert_eq!(armed["deadline_us"].as_u64(), Some(d), "{tag}: {armed}");
        }
        Ok(Pair {
            backup,
            source,
            hosts,
            armed,
            joined,
            pair_id,
            hook_file,
            dir,
            cfg: cfg.clone(),
        })
    }

    /// Lines the takeover hook wrote.
    pub fn hook_lines(&self) -> Vec<String> {
        hook_lines(&self.hook_file)
    }

    /// Asserts that nothing was taken over: no `takeover` event, the hook never ran, the
    /// backup still runs.
    pub fn assert_no_takeover(&mut self, what: &str) {
        assert_eq!(
            self.backup.count("takeover"),
            0,
            "{what}: takeover; backup events: {:?}",
            self.backup.all_events()
        );
        assert!(
            self.hook_lines().is_empty(),
            "{what}: vm_start ran: {:?}",
            self.hook_lines()
        );
        assert!(
            self.backup.running(),
            "{what}: backup exited; events: {:?}",
            self.backup.event_names()
        );
    }
}

/// Sends SIGCONT to a process when dropped: a SIGSTOPped source never outlives the test stopped.
pub struct ContGuard(pub i32);

impl Drop for ContGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// The faults whose detection is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// SIGKILL of the source VMM, host alive: FIN → `peer-closed`.
    Kill,
    /// The source's link goes down: silence → `timed-out`.
    PowerLoss,
    /// Link cut, source killed, src namespace rebuilt: the next probe meets RST → `reset`.
    Reboot,
    /// iptables DROP of source → backup: the probes' ACKs are lost → `timed-out`.
    PartitionSourceToBackup,
    /// iptables DROP of backup → source: the probes are lost → `timed-out`.
    PartitionBackupToSource,
    /// Heartbeat mode, the source's link goes down → `heartbeat-timeout`.
    HeartbeatLinkDown,
    /// Heartbeat mode, SIGSTOP of the source (hung VMM) → `heartbeat-timeout`.
    HeartbeatStop,
}

impl Scenario {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::PowerLoss => "power-loss",
            Scenario::Reboot => "reboot",
            Scenario::PartitionSourceToBackup => "partition-src>bak",
            Scenario::PartitionBackupToSource => "partition-bak>src",
            Scenario::HeartbeatLinkDown => "hb-link-down",
            Scenario::HeartbeatStop => "hb-sigstop",
        }
    }

    /// The takeover reason it must produce.
    pub fn expected_reason(self) -> &'static str {
        match self {
            Scenario::Kill => "peer-closed",
            Scenario::PowerLoss
            | Scenario::PartitionSourceToBackup
            | Scenario::PartitionBackupToSource => "timed-out",
            Scenario::Reboot => "reset",
            Scenario::HeartbeatLinkDown | Scenario::HeartbeatStop => "heartbeat-timeout",
        }
    }

    /// The errno the takeover must carry, if any.
    pub fn expected_errno(self) -> Option<i64> {
        match self {
            Scenario::PowerLoss
            | Scenario::PartitionSourceToBackup
            | Scenario::PartitionBackupToSource => Some(i64::from(libc::ETIMEDOUT)),
            Scenario::Reboot => Some(i64::from(libc::ECONNRESET)),
            _ => None,
        }
    }

    /// Whether it needs heartbeat mode.
    pub fn needs_heartbeat(self) -> bool {
        matches!(self, Scenario::HeartbeatLinkDown | Scenario::HeartbeatStop)
    }

    /// Whether it needs iptables.
    pub fn needs_iptables(self) -> bool {
        matches!(
            self,
            Scenario::PartitionSourceToBackup | Scenario::PartitionBackupToSource
        )
    }

    /// The configuration to run it with. When backup → source is dropped, the source's own
    /// keepalive runs out at the same moment as the backup's (both last heard from each other at
    /// the same time), and the RST the source then sends still reaches the backup: whichever
    /// kernel timer fires first decides between `timed-out` and `reset`. So that the run measures
    /// the backup's own keepalive, the source there gets two more probes.
    pub fn adapt(self, cfg: &Config) -> Config {
        let mut cfg = cfg.clone();
        if self == Scenario::PartitionBackupToSource && cfg.source_keepalive.is_none() {
            let (idle, intvl, cnt) = cfg.keepalive_parts();
            cfg.source_keepalive = Some(format!(
                "{}:{}:{}",
                idle / 1_000_000,
                intvl / 1_000_000,
                cnt + 2
            ));
        }
        cfg
    }

    /// The configured worst case for this fault: the keepalive bound, or `interval × misses` in
    /// heartbeat mode.
    pub fn bound_us(self, cfg: &Config) -> u64 {
        match (self.needs_heartbeat(), cfg.heartbeat_deadline_us()) {
            (true, Some(d)) => d,
            _ => cfg.keepalive_bound_us(),
        }
    }

    /// The earliest the takeover may come after the fault (counted from its end, with timer
    /// slack): a silent failure cannot be noticed before the keepalive has run out, the others
    /// only must not precede the fault.
    pub fn floor_us(self, cfg: &Config) -> u64 {
        match self {
            Scenario::PowerLoss
            | Scenario::PartitionSourceToBackup
            | Scenario::PartitionBackupToSource => {
                cfg.keepalive_floor_us().saturating_sub(TIMER_SLACK_US)
            }
            _ => 0,
        }
    }
}

/// What one run of a scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// When the fault was injected.
    pub fault: FaultTime,
    /// The backup's `takeover` event.
    pub takeover: Value,
    /// Its `detected_at_unix_us`.
    pub detected_us: u64,
    /// Lines the hook wrote by the time the backup exited.
    pub hook_lines: Vec<String>,
    /// `takeover` events the backup printed in all.
    pub takeovers: usize,
    /// The configured bound for this fault.
    pub bound_us: u64,
    /// The earliest legitimate detection, counted from `fault.after_us`.
    pub floor_us: u64,
}

impl Outcome {
    /// Fault → takeover, counted from just before the fault (pessimistic). Negative if early.
    pub fn latency_us(&self) -> i64 {
        self.detected_us as i64 - self.fault.before_us as i64
    }

    /// True when the takeover came before the fault, or before the keepalive could have run out.
    pub fn early(&self) -> bool {
        self.detected_us < self.fault.before_us
            || self.detected_us < self.fault.after_us + self.floor_us
    }

    /// The takeover reason.
    pub fn reason(&self) -> &str {
        self.takeover["reason"].as_str().unwrap_or("?")
    }

    /// Panics unless the run is what the scenario must produce: expected reason and errno, not
    /// early, within `bound + slack`, vm_start run exactly once.
    pub fn assert_ok(&self, slack: Duration) {
        let sc = self.scenario;
        assert_eq!(
            self.reason(),
            sc.expected_reason(),
            "{}: {}",
            sc.name(),
            self.takeover
        );
        if let Some(errno) = sc.expected_errno() {
            assert_eq!(
                self.takeover["errno"].as_i64(),
                Some(errno),
                "{}: {}",
                sc.name(),
                self.takeover
            );
        }
        assert!(
            self.detected_us >= self.fault.before_us,
            "{}: takeover detected {} us BEFORE the fault",
            sc.name(),
            self.fault.before_us - self.detected_us
        );
        assert!(
            !self.early(),
            "{}: takeover {} us after the fault, earlier than the floor of {} us",
            sc.name(),
            self.detected_us as i64 - self.fault.after_us as i64,
            self.floor_us
        );
        let ceiling = self.bound_us + slack.as_micros() as u64;
        assert!(
            self.latency_us() <= ceiling as i64,
            "{}: takeover {} us after the fault, later than bound {} us + slack {slack:?}",
            sc.name(),
            self.latency_us(),
            self.bound_us
        );
        assert_eq!(self.takeovers, 1, "{}: takeover events", sc.name());
        assert_eq!(
            self.hook_lines.len(),
            1,
            "{}: vm_start must run exactly once: {:?}",
            sc.name(),
            self.hook_lines
        );
        assert!(
            self.hook_lines[0].starts_with(sc.expected_reason()),
            "{}: hook saw {:?}",
            sc.name(),
            self.hook_lines
        );
    }
}

/// Starts a pair, waits `settle` (to vary where in the keepalive cycle the fault lands), injects
/// the scenario's fault and waits for the takeover, `vm-started` and the backup's exit.
///
/// `Ok(None)` means this machine cannot run it (the reason was printed as `SKIPPED: ...`);
/// `Err` is a failed run, with everything both sides printed.
pub fn run_scenario(
    tag: &str,
    scenario: Scenario,
    cfg: &Config,
    settle: Duration,
) -> Result<Option<Outcome>, String> {
    assert_eq!(
        scenario.needs_heartbeat(),
        cfg.heartbeat.is_some(),
        "{}: heartbeat configuration",
        scenario.name()
    );
    let cfg = &scenario.adapt(cfg);
    let mut pair = match Pair::start(tag, cfg) {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return Ok(None);
        }
    };
    if scenario.needs_iptables() {
        if let Err(why) = pair.hosts.iptables_usable() {
            skip(&why);
            return Ok(None);
        }
    }
    std::thread::sleep(settle);
    let mut _cont = None;
    let fault = match scenario {
        Scenario::Kill => Hosts::signal(&pair.source, libc::SIGKILL),
        Scenario::PowerLoss | Scenario::HeartbeatLinkDown => pair.hosts.cut_source_link()?,
        Scenario::Reboot => pair.hosts.reboot_source(&mut pair.source)?,
        Scenario::PartitionSourceToBackup => pair.hosts.partition(Direction::SourceToBackup)?,
        Scenario::PartitionBackupToSource => pair.hosts.partition(Direction::BackupToSource)?,
        Scenario::HeartbeatStop => {
            _cont = Some(ContGuard(pair.source.pid()));
            Hosts::signal(&pair.source, libc::SIGSTOP)
        }
    };
    let bound_us = scenario.bound_us(cfg);
    let wait = Duration::from_micros(2 * cfg.keepalive_bound_us()) + EVENT_TIMEOUT;
    let started = Instant::now();
    let takeover = pair
        .backup
        .try_wait_event("takeover", wait)
        .ok_or_else(|| {
            format!(
                "{tag} {}: no takeover within {:?}; backup events: {:?}; source events: {:?}",
                scenario.name(),
                started.elapsed(),
                pair.backup.all_events(),
                pair.source.all_events()
            )
        })?;
    let detected_us = takeover["detected_at_unix_us"]
        .as_u64()
        .ok_or_else(|| format!("{tag}: takeover without detected_at_unix_us: {takeover}"))?;
    pair.backup
        .try_wait_event("vm-started", EVENT_TIMEOUT)
        .ok_or_else(|| {
            format!(
                "{tag}: no vm-started; backup events: {:?}",
                pair.backup.all_events()
            )
        })?;
    let status = pair.backup.wait_exit(EVENT_TIMEOUT);
    if !status.success() {
        return Err(format!("{tag}: backup exited with {status}"));
    }
    Ok(Some(Outcome {
        scenario,
        fault,
        detected_us,
        hook_lines: pair.hook_lines(),
        takeovers: pair.backup.count("takeover"),
        takeover,
        bound_us,
        floor_us: scenario.floor_us(cfg),
    }))
}
