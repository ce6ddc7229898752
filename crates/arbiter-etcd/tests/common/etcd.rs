// SPDX-License-Identifier: Apache-2.0
//! A real etcd for tests: one member ([`EtcdServer`]) or a three-member cluster ([`EtcdCluster`])
//! on loopback (or any listen IP, optionally inside `ip netns exec NS`), each in its own
//! temporary directory that is removed on drop, even when the test panicked.
//!
//! Self-contained on purpose: it needs only `std` and `libc`, so any test suite of the workspace
//! can include it with `#[path = "…/arbiter-etcd/tests/common/etcd.rs"] mod etcd;`.
//!
//! When no `etcd` binary is found (`$ETCD_BIN`, else `etcd` on `$PATH`), `start` prints
//! `SKIPPED: etcd not installed` on stdout and stderr and returns `None`, except under `CI=true`,
//! where it panics: in CI everything must exist (Debian: `apt-get install etcd-server`).
#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How to start etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Run etcd through this, e.g. `["ip", "netns", "exec", "ns1"]` (the prefix must `exec` etcd,
    /// as `ip netns exec` does, so that signals reach etcd itself).
    pub command_prefix: Vec<String>,
    /// The IP to listen on (client and peer), 127.0.0.1 by default. Readiness is polled from the
    /// test process, so with a namespace prefix this must be reachable from here (e.g. the
    /// namespace's end of a veth pair); checked with `ip netns exec NS` + a veth address.
    pub listen_ip: IpAddr,
    /// Fixed client port; by default a free one is picked (inside a network namespace of its
    /// own, set both ports: a free port here says nothing about that namespace).
    pub client_port: Option<u16>,
    /// Fixed peer port; see `client_port`.
    pub peer_port: Option<u16>,
    /// `--heartbeat-interval` in ms (etcd's default: 100).
    pub heartbeat_interval_ms: Option<u32>,
    /// `--election-timeout` in ms (etcd's default: 1000). The minimum lease TTL etcd grants is
    /// ceil(1.5 × this).
    pub election_timeout_ms: Option<u32>,
    /// More arguments for etcd.
    pub extra_args: Vec<String>,
    /// How long to wait for etcd to answer `/health` with a leader.
    pub ready_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            command_prefix: Vec::new(),
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_port: None,
            peer_port: None,
            heartbeat_interval_ms: None,
            election_timeout_ms: None,
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl EtcdOptions {
    /// `--heartbeat-interval 50 --election-timeout 500`: elections in about a second, and etcd
    /// grants lease TTLs down to 1 s.
    pub fn fast() -> Self {
        EtcdOptions {
            heartbeat_interval_ms: Some(50),
            election_timeout_ms: Some(500),
            ..Self::default()
        }
    }
}

/// Prints why a test does not run, on stdout and stderr (visible with and without capture); under
/// `CI=true` panics instead.
pub fn skip_or_panic(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}, and CI=true: in CI every test must run");
    }
    println!("SKIPPED: {why}");
    eprintln!("SKIPPED: {why}");
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `$PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

/// Two distinct ports that were free on `ip` a moment ago.
fn free_ports(ip: IpAddr) -> (u16, u16) {
    // Both listeners are open at once, so the two ports differ.
    let a = TcpListener::bind((ip, 0)).expect("bind a free port");
    let b = TcpListener::bind((ip, 0)).expect("bind a free port");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

fn url(ip: IpAddr, port: u16) -> String {
    format!("http://{}", SocketAddr::new(ip, port))
}

fn temp_root(tag: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "etcd-test-{tag}-{}-{}-{nanos:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create etcd temp dir");
    dir
}

/// A minimal HTTP/1.0 exchange with etcd, std only: `(status, body)`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The string value of `"field":"…"` in a flat JSON answer (enough for etcd's status answers).
pub fn json_field(body: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":");
    let rest = &body[body.find(&key)? + key.len()..];
    let rest = rest.trim_start();
    if let Some(quoted) = rest.strip_prefix('"') {
        Some(quoted[..quoted.find('"')?].to_string())
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    }
}

/// One etcd member process.
pub struct EtcdServer {
    name: String,
    opts: EtcdOptions,
    root: PathBuf,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    child: Option<Child>,
    /// Whether the temp root is ours to remove (a cluster member's root belongs to the cluster).
    owns_root: bool,
}

impl fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EtcdServer({} at {})", self.name, self.client_url())
    }
}

impl EtcdServer {
    /// Starts a single-member etcd and waits until it answers with a leader. `None` (after
    /// printing SKIPPED) when etcd is not installed; panics under `CI=true` then, and whenever
    /// etcd does not come up.
    pub fn start(opts: EtcdOptions) -> Option<EtcdServer> {
        let Some(bin) = etcd_binary() else {
            skip_or_panic("etcd not installed");
            return None;
        };
        // A port picked free can be taken by a parallel test before etcd binds it: try again
        // with new ports when etcd dies early.
        let mut last_error = String::new();
        for _ in 0..5 {
            let (client_port, peer_port) = match (opts.client_port, opts.peer_port) {
                (Some(c), Some(p)) => (c, p),
                _ => {
                    let (c, p) = free_ports(opts.listen_ip);
                    (opts.client_port.unwrap_or(c), opts.peer_port.unwrap_or(p))
                }
            };
            let root = temp_root("single");
            let mut server = EtcdServer {
                name: "default".into(),
                initial_cluster: format!("default={}", url(opts.listen_ip, peer_port)),
                opts: opts.clone(),
                root,
                client_port,
                peer_port,
                child: None,
                owns_root: true,
            };
            server.spawn(&bin);
            match server.wait_ready() {
                Ok(()) => return Some(server),
                Err(e) => {
                    last_error = e;
                    let fixed = opts.client_port.is_some() && opts.peer_port.is_some();
                    if fixed || !last_error.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join(format!("{}.data", self.name))
    }

    fn log_path(&self) -> PathBuf {
        self.root.join(format!("{}.log", self.name))
    }

    fn spawn(&mut self, bin: &Path) {
        let o = &self.opts;
        let ip = o.listen_ip;
        let mut args: Vec<String> = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir().display()),
            format!("--listen-client-urls={}", url(ip, self.client_port)),
            format!("--advertise-client-urls={}", url(ip, self.client_port)),
            format!("--listen-peer-urls={}", url(ip, self.peer_port)),
            format!("--initial-advertise-peer-urls={}", url(ip, self.peer_port)),
            format!("--initial-cluster={}", self.initial_cluster),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=etcd-test".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        if let Some(ms) = o.heartbeat_interval_ms {
            args.push(format!("--heartbeat-interval={ms}"));
        }
        if let Some(ms) = o.election_timeout_ms {
            args.push(format!("--election-timeout={ms}"));
        }
        args.extend(o.extra_args.iter().cloned());
        let (program, pre): (String, Vec<String>) = match o.command_prefix.split_first() {
            Some((first, rest)) => {
                let mut pre = rest.to_vec();
                pre.push(bin.display().to_string());
                (first.clone(), pre)
            }
            None => (bin.display().to_string(), Vec::new()),
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd log");
        let child = Command::new(program)
            .args(pre)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup etcd log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    /// Polls `/health` until etcd reports a leader; an error names why (with the log's tail).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("etcd exited with {status}: {}", self.log_tail(20)));
                }
            }
            if self.healthy(Duration::from_millis(500)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd at {} not healthy within {:?}: {}",
                    self.client_addr(),
                    self.opts.ready_timeout,
                    self.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `/health` says `true` (etcd has a leader and answers) within `timeout`.
    pub fn healthy(&self, timeout: Duration) -> bool {
        matches!(http(self.client_addr(), "GET", "/health", "", timeout),
            Ok((200, body)) if body.contains("\"health\":\"true\""))
    }

    /// The last `n` lines of etcd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://IP:PORT`.
    pub fn client_url(&self) -> String {
        url(self.opts.listen_ip, self.client_port)
    }

    /// The client address, for the arbiter's endpoint list.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.opts.listen_ip, self.client_port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("etcd is not running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The process state letter from /proc (`T` = stopped).
    fn proc_state(&self) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // The state follows the parenthesised command name.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// SIGSTOP: the process hangs, its sockets stay open (connections are accepted by the kernel,
    /// requests are never answered). Returns once the process is seen stopped.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.proc_state() != Some('T') {
            assert!(
                Instant::now() < deadline,
                "etcd not stopped 5 s after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, and waits for the process to be gone. The data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data dir (same member, same data);
    /// returns once it answers with a leader.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
        if let Err(e) = self.wait_ready() {
            panic!("etcd did not come back after a restart: {e}");
        }
    }

    /// Starts a killed member again without waiting (a cluster member needs its peers).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        let bin = etcd_binary().expect("etcd binary vanished");
        self.spawn(&bin);
    }

    /// `POST /v3/maintenance/status`: `(member_id, leader_id)`, decimal, as etcd writes them.
    pub fn status(&self, timeout: Duration) -> Option<(String, String)> {
        let (code, body) = http(
            self.client_addr(),
            "POST",
            "/v3/maintenance/status",
            "{}",
            timeout,
        )
        .ok()?;
        if code != 200 {
            return None;
        }
        Some((
            json_field(&body, "member_id")?,
            json_field(&body, "leader")?,
        ))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process still dies of SIGKILL.
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- etcd {} log tail ---\n{}", self.name, self.log_tail(30));
        }
        if self.owns_root {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// A three-member etcd cluster on one IP.
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdServer>,
    root: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each answers with a leader. `None` (after printing
    /// SKIPPED) when etcd is not installed.
    pub fn start(n: usize, opts: EtcdOptions) -> Option<EtcdCluster> {
        let Some(bin) = etcd_binary() else {
            skip_or_panic("etcd not installed");
            return None;
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            let root = temp_root("cluster");
            let ports: Vec<(u16, u16)> = {
                // Hold all listeners at once so no two members get the same port.
                let listeners: Vec<TcpListener> = (0..2 * n)
                    .map(|_| TcpListener::bind((opts.listen_ip, 0)).expect("bind a free port"))
                    .collect();
                listeners
                    .chunks(2)
                    .map(|c| {
                        (
                            c[0].local_addr().unwrap().port(),
                            c[1].local_addr().unwrap().port(),
                        )
                    })
                    .collect()
            };
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer))| format!("m{i}={}", url(opts.listen_ip, *peer)))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = EtcdCluster {
                members: Vec::new(),
                root: root.clone(),
            };
            for (i, (client_port, peer_port)) in ports.into_iter().enumerate() {
                let mut m = EtcdServer {
                    name: format!("m{i}"),
                    opts: opts.clone(),
                    root: root.clone(),
                    client_port,
                    peer_port,
                    initial_cluster: initial_cluster.clone(),
                    child: None,
                    owns_root: false,
                };
                m.spawn(&bin);
                cluster.members.push(m);
            }
            match cluster
                .members
                .iter_mut()
                .try_for_each(EtcdServer::wait_ready)
            {
                Ok(()) => return Some(cluster),
                Err(e) => {
                    last_error = e;
                    if !last_error.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("etcd cluster did not start: {last_error}");
    }

    /// The client addresses of all members.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(EtcdServer::client_addr).collect()
    }

    /// The index of the member every running member names as leader, once they agree (bounded
    /// by `timeout`).
    pub fn wait_leader(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.agreed_leader() {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agreed_leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for m in self.members.iter().filter(|m| m.pid().is_some()) {
            let (id, l) = m.status(Duration::from_millis(500))?;
            if l == "0" || leader.as_ref().is_some_and(|x| *x != l) {
                return None;
            }
            leader = Some(l);
            ids.push(id);
        }
        let leader = leader?;
        self.members.iter().position(|m| {
            m.pid().is_some()
                && m.status(Duration::from_millis(500))
                    .is_some_and(|(id, _)| id == leader)
        })
    }

    /// Moves leadership to member `to` (etcd's MoveLeader, asked of the current leader), then
    /// waits until every running member agrees that `to` leads.
    pub fn move_leader(&self, to: usize, timeout: Duration) -> Result<(), String> {
        let from = self.wait_leader(timeout).ok_or("no leader to move from")?;
        if from == to {
            return Ok(());
        }
        let (target, _) = self.members[to]
            .status(timeout)
            .ok_or("target member does not answer")?;
        let (code, body) = http(
            self.members[from].client_addr(),
            "POST",
            "/v3/maintenance/transfer-leadership",
            &format!("{{\"targetID\":\"{target}\"}}"),
            timeout,
        )
        .map_err(|e| e.to_string())?;
        if code != 200 {
            return Err(format!("transfer-leadership: HTTP {code}: {body}"));
        }
        let deadline = Instant::now() + timeout;
        while self.agreed_leader() != Some(to) {
            if Instant::now() >= deadline {
                return Err(format!("member {to} not leader within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Members first (they print their logs on panic), then the shared root.
        self.members.clear();
        let _ = fs::remove_dir_all(&self.root);
    }
}
