// SPDX-License-Identifier: Apache-2.0
//! Several hosts on one switch, each in a network namespace of its own, and the faults that cut
//! them apart: the lab of the split-brain tests (`tests/split_brain.rs`) and their benchmark
//! (`benches/split_brain.rs`).
//!
//! Include it next to `common` and the etcd harness of the arbiter crate:
//!
//! ```ignore
//! mod common;
//! #[path = "common/lab.rs"]
//! mod lab;
//! #[path = "../crates/arbiter-etcd/tests/common/etcd.rs"]
//! mod etcd;
//! ```
//!
//! [`Lab::new`] makes a "switch" namespace holding a bridge and one namespace per host (loopback
//! up), each joined to the bridge by a veth pair: `eth0` in the host, `p-HOST` on the switch.
//! Host `i` (in the order given) gets `10.77.0.{i+1}/24`. Addresses only ever exist inside these
//! namespaces: the test process itself reaches a host only from a thread that entered the host's
//! namespace ([`in_netns`]). Names carry the test process's pid, a counter and a tag, so parallel
//! tests never meet; `Drop` kills whatever still runs inside (SIGCONT first, so stopped processes
//! die too) and deletes every namespace, also when the test panics. Namespaces, and etcd data
//! directories, left behind by a test process that was killed outright are swept by the next
//! [`Lab::new`].
//!
//! Faults, all undone by [`Lab::heal`]:
//! - [`Lab::isolate`]: a host is cut off from everyone with iptables DROP rules on INPUT (in every
//!   other host, everything from its address; in the host, everything from `eth0`). Silent: no
//!   sender gets an error, packets just vanish.
//! - [`Lab::unplug`]: the host's cable is pulled at the switch (its switch port goes down): one
//!   step, both directions at once.
//! - [`Lab::partition`]: two hosts no longer hear each other (DROP on INPUT in both, by source
//!   address); both still reach every other host.
//!
//! [`Witness`] runs etcd in a host's namespace on that host's address (port 2379), with the
//! etcd harness's own temporary data directory, which it removes on drop.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{now_us, skip, Proc, SpawnOpts, EVENT_TIMEOUT};
use crate::etcd::{http, EtcdCluster, EtcdOptions, EtcdServer};

/// Every namespace of this harness starts with this (not `vtko-`: that is `netns.rs`'s).
const NS_PREFIX: &str = "vtkl-";
/// The hosts' subnet: host `i` is `10.77.0.{i+1}`.
const SUBNET: &str = "10.77.0";
/// The interface of every host on the switch.
pub const HOST_IF: &str = "eth0";
/// etcd's client port in the witness namespace (a namespace of its own: nothing else there).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port in the witness namespace.
pub const ETCD_PEER_PORT: u16 = 2380;

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
    /// Just after the injecting command(s) returned.
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

/// Runs `f` on a thread that entered network namespace `ns` (`/run/netns/NS`), and returns what
/// it returns (a panic in `f` is re-raised here). A namespace switch only affects the calling
/// thread, so the rest of the test process stays where it is.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a namespace fd we just opened; it affects this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct HostNs {
    /// The host's short name (as given to [`Lab::new`]).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub ip: String,
    /// Its port on the switch (in the switch namespace).
    pub port: String,
}

/// Hosts on one switch. Everything is removed on drop.
pub struct Lab {
    /// The switch's namespace (holds the bridge `br0` and the ports).
    pub switch: String,
    /// The hosts, in the order given.
    pub hosts: Vec<HostNs>,
}

impl Lab {
    /// Makes the switch and one namespace per host (e.g. `["src", "bak", "wit"]`). `Err` says
    /// why this machine cannot (the caller prints `SKIPPED: ...`).
    pub fn new(tag: &str, hosts: &[&str]) -> Result<Lab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN".into());
        }
        assert!(
            !hosts.is_empty() && hosts.len() < 200,
            "1..200 hosts, got {}",
            hosts.len()
        );
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let base = format!("{NS_PREFIX}{pid}-{n}-{tag}");
        let mut lab = Lab {
            switch: format!("{base}-sw"),
            hosts: Vec::new(),
        };
        // From here on `lab`'s Drop removes whatever part was made.
        ip(&["netns", "add", &lab.switch]).map_err(|e| format!("ip netns add failed: {e}"))?;
        ip(&["-n", &lab.switch, "link", "add", "br0", "type", "bridge"])
            .map_err(|e| format!("cannot make a bridge: {e}"))?;
        ip(&["-n", &lab.switch, "link", "set", "br0", "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            assert!(
                name.len() <= 8 && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "host name {name:?}: 1..=8 ASCII letters or digits"
            );
            let h = HostNs {
                name: name.to_string(),
                ns: format!("{base}-{name}"),
                ip: format!("{SUBNET}.{}", i + 1),
                port: format!("p-{name}"),
            };
            ip(&["netns", "add", &h.ns]).map_err(|e| format!("ip netns add failed: {e}"))?;
            lab.hosts.push(h.clone());
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &lab.switch,
                "link",
                "add",
                &h.port,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IF,
                "netns",
                &h.ns,
            ])
            .map_err(|e| format!("cannot make a veth pair between namespaces: {e}"))?;
            ip(&["-n", &lab.switch, "link", "set", &h.port, "master", "br0"])?;
            ip(&["-n", &lab.switch, "link", "set", &h.port, "up"])?;
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.ns, "addr", "add", &addr, "dev", HOST_IF])?;
            ip(&["-n", &h.ns, "link", "set", HOST_IF, "up"])?;
        }
        Ok(lab)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &HostNs {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in this lab"))
    }

    /// The namespace of host `name`.
    pub fn ns(&self, name: &str) -> &str {
        &self.host(name).ns
    }

    /// The address of host `name`.
    pub fn ip(&self, name: &str) -> &str {
        &self.host(name).ip
    }

    /// `ip netns exec NS` for host `name` (it execs: the pid is the program's).
    pub fn prefix(&self, name: &str) -> [&str; 4] {
        ["ip", "netns", "exec", self.ns(name)]
    }

    /// Runs `vmm-takeover ARGS...` on host `name`, stderr piped (see [`Proc::stderr_lines`]).
    pub fn spawn(&self, host: &str, proc_name: &str, args: &[&str]) -> Proc {
        Proc::spawn_opts(
            proc_name,
            args,
            SpawnOpts::new().prefix(&self.prefix(host)).pipe_stderr(),
        )
    }

    /// Runs `iptables ARGS...` in host `name`.
    pub fn iptables(&self, host: &str, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["netns", "exec", self.ns(host), "iptables", "-w"];
        a.extend_from_slice(args);
        run("ip", &a).map(drop)
    }

    /// Checks that iptables works inside the hosts' namespaces.
    pub fn iptables_usable(&self) -> Result<(), String> {
        self.iptables(&self.hosts[0].name.clone(), &["-S"])
            .map_err(|e| format!("iptables unusable in a namespace: {e}"))
    }

    /// Host `name` is cut off from everyone: DROP on INPUT, everything from its address in every
    /// other host, then everything from `eth0` in it. Silent both ways.
    ///
    /// The rules go in one host at a time (a few tens of ms each), the other hosts first: from
    /// the first rule on, nothing the isolated host sends arrives anywhere, so no request of its
    /// own can take effect without it seeing the answer (with its own rule first, a lease renewal
    /// sent meanwhile would reach etcd while its answer is dropped). [`Lab::unplug`] is a single
    /// step.
    pub fn isolate(&self, name: &str) -> Result<FaultTime, String> {
        let victim = self.host(name).clone();
        FaultTime::around(|| {
            for h in self.hosts.iter().filter(|h| h.name != name) {
                self.iptables(&h.name, &["-A", "INPUT", "-s", &victim.ip, "-j", "DROP"])?;
            }
            self.iptables(name, &["-A", "INPUT", "-i", HOST_IF, "-j", "DROP"])
        })
    }

    /// Host `name`'s cable is pulled at the switch: its switch port goes down.
    pub fn unplug(&self, name: &str) -> Result<FaultTime, String> {
        let port = self.host(name).port.clone();
        FaultTime::around(|| ip(&["-n", &self.switch, "link", "set", &port, "down"]).map(drop))
    }

    /// `a` and `b` no longer hear each other (both directions dropped, silently); both still
    /// reach every other host.
    pub fn partition(&self, a: &str, b: &str) -> Result<FaultTime, String> {
        let (ia, ib) = (self.ip(a).to_string(), self.ip(b).to_string());
        FaultTime::around(|| {
            self.iptables(a, &["-A", "INPUT", "-s", &ib, "-j", "DROP"])?;
            self.iptables(b, &["-A", "INPUT", "-s", &ia, "-j", "DROP"])
        })
    }

    /// Undoes [`Lab::partition`] of `a` and `b`.
    pub fn unpartition(&self, a: &str, b: &str) -> Result<FaultTime, String> {
        let (ia, ib) = (self.ip(a).to_string(), self.ip(b).to_string());
        FaultTime::around(|| {
            self.iptables(a, &["-D", "INPUT", "-s", &ib, "-j", "DROP"])?;
            self.iptables(b, &["-D", "INPUT", "-s", &ia, "-j", "DROP"])
        })
    }

    /// Undoes every fault: INPUT flushed in every host, every switch port up.
    pub fn heal(&self) -> Result<FaultTime, String> {
        FaultTime::around(|| {
            for h in &self.hosts {
                self.iptables(&h.name, &["-F", "INPUT"])?;
                ip(&["-n", &self.switch, "link", "set", &h.port, "up"])?;
            }
            Ok(())
        })
    }

    /// Starts a single-member etcd on host `name` (its address, ports 2379/2380), fast
    /// elections (`EtcdOptions::fast`). Panics when etcd does not come up; `None` (after
    /// printing SKIPPED) when it is not installed.
    pub fn start_etcd(&self, name: &str) -> Option<Witness> {
        let h = self.host(name).clone();
        let opts = EtcdOptions {
            command_prefix: self.prefix(name).iter().map(|s| s.to_string()).collect(),
            listen_ip: h.ip.parse().unwrap(),
            client_port: Some(ETCD_CLIENT_PORT),
            peer_port: Some(ETCD_PEER_PORT),
            ..EtcdOptions::fast()
        };
        // Readiness is polled over TCP from the test process: from inside the namespace.
        let server = in_netns(&h.ns, move || EtcdServer::start(opts))?;
        Some(Witness {
            server,
            ns: h.ns.clone(),
        })
    }

    /// Starts a three-member etcd cluster on host `name` (its address, ports picked free inside
    /// its namespace), fast elections. `None` (after printing SKIPPED) when etcd is missing.
    pub fn start_etcd_cluster(&self, name: &str) -> Option<WitnessCluster> {
        let h = self.host(name).clone();
        let opts = EtcdOptions {
            command_prefix: self.prefix(name).iter().map(|s| s.to_string()).collect(),
            listen_ip: h.ip.parse().unwrap(),
            ..EtcdOptions::fast()
        };
        let cluster = in_netns(&h.ns, move || EtcdCluster::start(3, opts))?;
        Some(WitnessCluster {
            cluster,
            ns: h.ns.clone(),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_ns_pids(&h.ns);
        }
        kill_ns_pids(&self.switch);
        // Deleting a namespace deletes its end of every veth pair, and so the pair.
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// SIGCONT (a stopped process must not stay stopped) then SIGKILL every process in a namespace
/// this harness made.
fn kill_ns_pids(ns: &str) {
    assert!(ns.starts_with(NS_PREFIX), "{ns} is not a lab namespace");
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

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces of this harness, and the etcd harness's data directories, whose test
/// process no longer exists (it was killed before its Drop could run).
fn sweep_stale() {
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || pid_alive(pid) {
                continue;
            }
            kill_ns_pids(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
    // `etcd-test-{single|cluster}-{pid}-{seq}-{nanos}` (the etcd harness's `temp_root`).
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("etcd-test-single-")
            .or_else(|| name.strip_prefix("etcd-test-cluster-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A base64 encoding (standard alphabet, padded), for etcd's JSON gateway.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let digits: Vec<u32> = s.bytes().filter_map(val).collect();
    let mut out = Vec::new();
    for c in digits.chunks(4) {
        let mut n = 0u32;
        for (i, d) in c.iter().enumerate() {
            n |= d << (18 - 6 * i);
        }
        for i in 0..c.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Who owns `pair` in the etcd at `addr` (the arbiter's default key prefix), read with a plain
/// range request from inside `ns`: the holder's name, or `None` when the pair is free.
fn read_owner(ns: &str, addr: SocketAddr, pair: &str) -> Result<Option<String>, String> {
    let key = format!("/vmm-takeover/pairs/{pair}/owner");
    let body = format!("{{\"key\":\"{}\"}}", b64(key.as_bytes()));
    let (code, answer) = in_netns(ns, move || {
        http(addr, "POST", "/v3/kv/range", &body, Duration::from_secs(2))
    })
    .map_err(|e| format!("range {key}: {e}"))?;
    if code != 200 {
        return Err(format!("range {key}: HTTP {code}: {answer}"));
    }
    let v: Value =
        serde_json::from_str(&answer).map_err(|e| format!("range {key}: {e}: {answer}"))?;
    Ok(v["kvs"][0]["value"]
        .as_str()
        .map(|s| String::from_utf8_lossy(&unb64(s)).into_owned()))
}

/// etcd on a lab host.
pub struct Witness {
    /// The member (pause, resume, its log).
    pub server: EtcdServer,
    ns: String,
}

impl Witness {
    /// `etcd://IP:PORT`, for `--arbiter`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.server.client_addr())
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        self.server.client_addr()
    }

    /// SIGSTOP (returns once the process is seen stopped); timed.
    pub fn pause(&self) -> FaultTime {
        let before_us = now_us();
        self.server.pause();
        FaultTime {
            before_us,
            after_us: now_us(),
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.server.resume();
    }

    /// Kills etcd and starts it again on the same address and data; returns once it answers
    /// with a leader. The time is the kill (`before_us`) and the moment it was healthy again
    /// (`after_us`).
    pub fn restart(&mut self) -> FaultTime {
        let before_us = now_us();
        let ns = self.ns.clone();
        let server = &mut self.server;
        in_netns(&ns, move || server.restart());
        FaultTime {
            before_us,
            after_us: now_us(),
        }
    }

    /// Whether etcd answers `/health` with a leader.
    pub fn healthy(&self) -> bool {
        let server = &self.server;
        in_netns(&self.ns, move || server.healthy(Duration::from_secs(1)))
    }

    /// Who owns `pair` now (the holder's name), read from etcd directly.
    pub fn owner(&self, pair: &str) -> Result<Option<String>, String> {
        read_owner(&self.ns, self.addr(), pair)
    }
}

/// A three-member etcd cluster on a lab host.
pub struct WitnessCluster {
    /// The members.
    pub cluster: EtcdCluster,
    ns: String,
}

impl WitnessCluster {
    /// `etcd://IP:P1,IP:P2,IP:P3`, for `--arbiter`.
    pub fn url(&self) -> String {
        let list: Vec<String> = self
            .cluster
            .client_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        format!("etcd://{}", list.join(","))
    }

    /// The index of the leader, once every member agrees.
    pub fn leader(&self, timeout: Duration) -> Option<usize> {
        let c = &self.cluster;
        in_netns(&self.ns, move || c.wait_leader(timeout))
    }

    /// Moves the leadership to member `to` (etcd's MoveLeader); timed from the request to the
    /// moment every member agrees.
    pub fn move_leader(&self, to: usize, timeout: Duration) -> Result<FaultTime, String> {
        let c = &self.cluster;
        in_netns(&self.ns, move || {
            FaultTime::around(|| c.move_leader(to, timeout))
        })
    }

    /// Who owns `pair` now, read from the first member.
    pub fn owner(&self, pair: &str) -> Result<Option<String>, String> {
        read_owner(&self.ns, self.cluster.client_addrs()[0], pair)
    }
}

// ---- An arbitrated pair on the lab: source, backup(s) and etcd ----

/// The lease TTL every process asks for.
pub const TTL: Duration = Duration::from_secs(2);
/// [`TTL`] as a flag value.
pub const TTL_ARG: &str = "2s";
/// The source's heartbeat interval (the backup's deadline is 3 of them).
pub const HEARTBEAT: &str = "50ms";
/// The source's heartbeat port.
pub const PORT: u16 = 7070;

/// Whole milliseconds.
pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Whole microseconds.
pub fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// `at_unix_us` of an event.
pub fn at(v: &Value) -> u64 {
    v["at_unix_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without at_unix_us: {v}"))
}

/// Every event named `name` printed so far.
pub fn named(p: &Proc, name: &str) -> Vec<Value> {
    p.all_events()
        .into_iter()
        .filter(|v| v["event"] == name)
        .collect()
}

/// The first event named `name` at or after `since_us`, waiting up to `timeout` (reads the whole
/// record, not the queue: other waits do not hide it).
pub fn wait_since(p: &Proc, name: &str, since_us: u64, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = named(p, name).into_iter().find(|v| at(v) >= since_us) {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`wait_since`], panicking with both processes' events when nothing comes.
pub fn expect_since(p: &Proc, name: &str, since_us: u64, timeout: Duration, ctx: &str) -> Value {
    wait_since(p, name, since_us, timeout).unwrap_or_else(|| {
        panic!(
            "{ctx}: {}: no {name:?} at or after {since_us} within {timeout:?}; events: {:?}",
            p.name,
            p.all_events()
        )
    })
}

/// One `guest` report.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub at: u64,
    pub counter: u64,
    pub running: bool,
}

/// The `guest` reports of `p` in `from_us..to_us`.
pub fn reports(p: &Proc, from_us: u64, to_us: u64) -> Vec<Report> {
    named(p, "guest")
        .iter()
        .map(|v| Report {
            at: at(v),
            counter: v["counter"].as_u64().expect("guest counter"),
            running: v["running"].as_bool().expect("guest running"),
        })
        .filter(|r| (from_us..to_us).contains(&r.at))
        .collect()
}

/// The guest to run: a real KVM guest where `/dev/kvm` works, else the simulated one (said
/// with `skip`, which fails under `CI=true`).
pub fn vm_kind() -> &'static str {
    match vmm_takeover_guest::DummyVm::probe() {
        Ok(()) => "kvm-dummy",
        Err(e) => {
            skip(&format!(
                "no usable KVM ({e}): the kvm-dummy variant does not run; using --vm simulated"
            ));
            "simulated"
        }
    }
}

/// Source, backup(s), etcd and the lab, dropped in this order.
pub struct Rig {
    /// `vmm-takeover source` on host `src`.
    pub source: Proc,
    /// `vmm-takeover backup`, one per backup host, in the order given.
    pub backups: Vec<Proc>,
    /// etcd on host `wit`.
    pub etcd: Witness,
    /// The hosts.
    pub lab: Lab,
    /// The pair id.
    pub pair: String,
    /// The `--vm` kind both sides run.
    pub vm: &'static str,
    /// The source's `owner` event at start.
    pub owner: Value,
}

impl Rig {
    /// A lab with hosts `src`, `wit` (etcd) and `backup_hosts`; a source with a running guest on
    /// `src`, and one armed backup per backup host. `None`: skipped (printed).
    pub fn start(tag: &str, backup_hosts: &[&str]) -> Option<Rig> {
        let mut hosts = vec!["src", "wit"];
        hosts.extend_from_slice(backup_hosts);
        let lab = match Lab::new(tag, &hosts) {
            Ok(l) => l,
            Err(why) => {
                skip(&why);
                return None;
            }
        };
        if let Err(why) = lab.iptables_usable() {
            skip(&why);
            return None;
        }
        let etcd = lab.start_etcd("wit")?;
        let vm = vm_kind();
        let pair = format!("vm-{tag}");
        let source = spawn_source(&lab, &format!("{tag}/source"), &pair, &etcd.url(), vm);
        let owner = source.wait_event("owner", EVENT_TIMEOUT);
        assert_eq!(owner["ttl_ms"], ms(TTL), "granted TTL: {owner}");
        assert!(owner["holder"].is_string(), "{owner}");
        println!("{tag}: etcd granted TTL {} ms", owner["ttl_ms"]);
        source.wait_event("listening", EVENT_TIMEOUT);
        let mut backups = Vec::new();
        for (i, host) in backup_hosts.iter().enumerate() {
            let b = spawn_backup(
                &lab,
                host,
                &format!("{tag}/backup{i}"),
                &pair,
                &etcd.url(),
                vm,
            );
            b.wait_event("armed", EVENT_TIMEOUT);
            source.wait_event("backup-joined", EVENT_TIMEOUT);
            backups.push(b);
        }
        // A guest report from a running source guest, so that its counter can be followed.
        let t = now_us();
        expect_since(&source, "guest", t, EVENT_TIMEOUT, tag);
        Some(Rig {
            source,
            backups,
            etcd,
            lab,
            pair,
            vm,
            owner,
        })
    }

    /// The first backup.
    pub fn backup(&self) -> &Proc {
        &self.backups[0]
    }

    /// The source's name in the arbiter.
    pub fn holder(&self) -> &str {
        self.owner["holder"].as_str().unwrap()
    }

    /// The source's fencing epoch at start.
    pub fn epoch(&self) -> u64 {
        self.owner["epoch"].as_u64().expect("owner epoch")
    }
}

/// The source's heartbeat address on host `src`.
pub fn source_addr(lab: &Lab) -> String {
    format!("{}:{PORT}", lab.ip("src"))
}

/// `vmm-takeover source` on host `src` under the arbiter, with heartbeats and a `--vm` guest.
pub fn spawn_source(lab: &Lab, name: &str, pair: &str, arbiter: &str, vm: &str) -> Proc {
    let addr = source_addr(lab);
    lab.spawn(
        "src",
        name,
        &[
            "source",
            "--listen",
            &addr,
            "--pair-id",
            pair,
            "--arbiter",
            arbiter,
            "--lease-ttl",
            TTL_ARG,
            "--heartbeat",
            HEARTBEAT,
            "--vm",
            vm,
        ],
    )
}

/// `vmm-takeover backup` on `host` under the arbiter, with a `--vm` standby guest.
pub fn spawn_backup(
    lab: &Lab,
    host: &str,
    name: &str,
    pair: &str,
    arbiter: &str,
    vm: &str,
) -> Proc {
    let addr = source_addr(lab);
    lab.spawn(
        host,
        name,
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            pair,
            "--arbiter",
            arbiter,
            "--lease-ttl",
            TTL_ARG,
            "--vm",
            vm,
        ],
    )
}
