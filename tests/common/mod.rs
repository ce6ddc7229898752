// SPDX-License-Identifier: Apache-2.0
//! Shared by the integration tests and the benchmarks: runs the real `vmm-takeover` binary and
//! waits on the JSON lifecycle events it prints.
#![allow(dead_code)]

/// A real Linux guest under QEMU (TCG): image, process, QMP client.
pub mod linux;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// The key file every test's source and backup share unless a test says otherwise: written
/// once per test process by `vmm-takeover keygen` (so keygen itself runs in every test run).
pub fn test_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join(format!("test-{}.psk", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let out = Command::new(bin())
            .arg("keygen")
            .arg(&path)
            .output()
            .expect("run vmm-takeover keygen");
        assert!(out.status.success(), "keygen failed: {out:?}");
        path.to_string_lossy().into_owned()
    })
}

/// `args` with `--psk-file <test key>` added after a `source`/`backup` subcommand that says
/// nothing about authentication (a `--config` file is left to say it).
pub fn with_auth(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if matches!(args.first(), Some(&"source") | Some(&"backup"))
        && !args.iter().take_while(|a| **a != "--").any(|a| {
            *a == "--psk-file"
                || *a == "--insecure-no-auth"
                || *a == "--config"
                || a.starts_with("--config=")
        })
    {
        v.insert(1, test_key().to_string());
        v.insert(1, "--psk-file".to_string());
    }
    v
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

/// Says why a test or bench cannot run on this machine; the caller then returns. Prints
/// `SKIPPED: why` on stdout and stderr (so it shows with and without `--nocapture`). In CI
/// (`CI=true`) everything the tests need is installed, so a skip there means something is
/// broken: it panics, and green keeps meaning "it ran".
pub fn skip(why: &str) {
    println!("SKIPPED: {why}");
    eprintln!("SKIPPED: {why}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("SKIPPED in CI (CI=true), where everything the tests need is installed: {why}");
    }
}

/// One of a child's output pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    Stdout,
    Stderr,
}

/// How [`Proc::spawn_opts`] starts the binary. Builder-style; the default is what
/// [`Proc::spawn`] does: stdout piped, stderr inherited, `RUST_LOG=info` unless set.
#[derive(Debug, Clone, Default)]
pub struct SpawnOpts {
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    pipe_stderr: bool,
    pipe_size: Option<usize>,
    nofile: Option<u64>,
}

impl SpawnOpts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the binary through `prefix` (e.g. `ip netns exec NS`).
    pub fn prefix(mut self, prefix: &[&str]) -> Self {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets an environment variable for the child (overrides the `RUST_LOG` default too).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Pipes stderr too, keeping its lines (see [`Proc::stderr_lines`]) and echoing them.
    pub fn pipe_stderr(mut self) -> Self {
        self.pipe_stderr = true;
        self
    }

    /// Sets the child's `RLIMIT_NOFILE` (soft and hard) before it execs, so a test can run it out
    /// of descriptors without an extra tool.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// Sets the capacity of the child's output pipes (`F_SETPIPE_SZ`; the kernel rounds up to
    /// a page), so a test that stops reading sees them fill quickly.
    pub fn pipe_size(mut self, bytes: usize) -> Self {
        self.pipe_size = Some(bytes);
        self
    }
}

#[derive(Default)]
struct Shared {
    events: VecDeque<Value>,
    all: Vec<Value>,
    /// Stdout lines that were not JSON objects.
    bad: Vec<String>,
    closed: bool,
    stderr: Vec<String>,
    stderr_closed: bool,
}

type SharedRef = Arc<(Mutex<Shared>, Condvar)>;

/// Lets a reader thread read, or holds it before its next read.
#[derive(Default)]
struct Gate {
    paused: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn set(&self, paused: bool) {
        *self.paused.lock().unwrap() = paused;
        self.cv.notify_all();
    }

    fn wait_open(&self) {
        let mut p = self.paused.lock().unwrap();
        while *p {
            p = self.cv.wait(p).unwrap();
        }
    }
}

/// The test's end of one of the child's output pipes.
struct PipeEnd {
    file: Arc<File>,
    gate: Arc<Gate>,
    size: usize,
}

/// A pipe whose write end goes to the child; `O_CLOEXEC` so no other child inherits it.
fn make_pipe(size: Option<usize>) -> (File, OwnedFd, usize) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let size = match size {
        // SAFETY: fcntl on a pipe fd we own.
        Some(want) => unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETPIPE_SZ, want as i32) },
        // SAFETY: as above.
        None => unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_GETPIPE_SZ) },
    };
    assert!(
        size > 0,
        "F_SETPIPE_SZ/F_GETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    (File::from(rd), wr, size as usize)
}

/// Reads `file` line by line (waiting at `gate` before each line) and hands each to `each`.
fn read_lines(file: Arc<File>, gate: Arc<Gate>, mut each: impl FnMut(String)) {
    let mut r = BufReader::new(&*file);
    let mut buf = Vec::new();
    loop {
        gate.wait_open();
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        each(String::from_utf8_lossy(&buf).into_owned());
    }
}

/// A running `vmm-takeover` process. Killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    shared: SharedRef,
    status: Option<ExitStatus>,
    stdout: PipeEnd,
    stderr: Option<PipeEnd>,
}

impl Proc {
    /// Spawns `vmm-takeover ARGS...` through an optional prefix (e.g. `ip netns exec NS`).
    pub fn spawn_with_prefix(name: &str, prefix: &[&str], args: &[&str]) -> Proc {
        Self::spawn_opts(name, args, SpawnOpts::new().prefix(prefix))
    }

    /// Spawns `vmm-takeover ARGS...` as `opts` says.
    pub fn spawn_opts(name: &str, args: &[&str], opts: SpawnOpts) -> Proc {
        let mut cmd = if opts.prefix.is_empty() {
            Command::new(bin())
        } else {
            let mut c = Command::new(&opts.prefix[0]);
            c.args(&opts.prefix[1..]).arg(bin());
            c
        };
        let (out_rd, out_wr, out_size) = make_pipe(opts.pipe_size);
        cmd.args(with_auth(args))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_wr));
        let mut err_rd = None;
        if opts.pipe_stderr {
            let (rd, wr, size) = make_pipe(opts.pipe_size);
            cmd.stderr(Stdio::from(wr));
            err_rd = Some((rd, size));
        } else {
            cmd.stderr(Stdio::inherit());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(n) = opts.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only this stack value; nothing
            // else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        // The Command holds our copy of the write ends: close them, or EOF never comes.
        drop(cmd);
        let shared: SharedRef = Arc::new((Mutex::new(Shared::default()), Condvar::new()));

        let stdout = PipeEnd {
            file: Arc::new(out_rd),
            gate: Arc::default(),
            size: out_size,
        };
        let (sh, tag) = (shared.clone(), name.to_string());
        let (file, gate) = (stdout.file.clone(), stdout.gate.clone());
        std::thread::spawn(move || {
            read_lines(file, gate, |line| {
                eprintln!("[{tag}] {line}");
                let (m, c) = &*sh;
                let mut s = m.lock().unwrap();
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => {
                        s.events.push_back(v.clone());
                        s.all.push(v);
                    }
                    _ => {
                        eprintln!("[{tag}] ^ stdout line is not a JSON object");
                        s.bad.push(line);
                    }
                }
                c.notify_all();
            });
            let (m, c) = &*sh;
            m.lock().unwrap().closed = true;
            c.notify_all();
        });

        let stderr = err_rd.map(|(rd, size)| {
            let end = PipeEnd {
                file: Arc::new(rd),
                gate: Arc::default(),
                size,
            };
            let (sh, tag) = (shared.clone(), name.to_string());
            let (file, gate) = (end.file.clone(), end.gate.clone());
            std::thread::spawn(move || {
                read_lines(file, gate, |line| {
                    eprintln!("[{tag} stderr] {line}");
                    let (m, c) = &*sh;
                    m.lock().unwrap().stderr.push(line);
                    c.notify_all();
                });
                let (m, c) = &*sh;
                m.lock().unwrap().stderr_closed = true;
                c.notify_all();
            });
            end
        });
        Proc {
            name: name.to_string(),
            child,
            shared,
            status: None,
            stdout,
            stderr,
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
            assert!(
                s.bad.is_empty(),
                "{}: stdout lines that are not JSON objects: {:?}",
                self.name,
                s.bad
            );
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

    /// Stdout lines that were not JSON objects (every line must be one).
    pub fn non_json_lines(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().bad.clone()
    }

    /// Every stderr line read so far (only with [`SpawnOpts::pipe_stderr`]).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().stderr.clone()
    }

    /// Waits for a stderr line containing `needle` (any seen so far counts), up to `timeout`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> Option<String> {
        assert!(self.stderr.is_some(), "{}: stderr is not piped", self.name);
        let deadline = Instant::now() + timeout;
        let (m, c) = &*self.shared;
        let mut s = m.lock().unwrap();
        loop {
            if let Some(l) = s.stderr.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            if s.stderr_closed {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            s = c.wait_timeout(s, left).unwrap().0;
        }
    }

    fn pipe_end(&self, pipe: Pipe) -> &PipeEnd {
        match pipe {
            Pipe::Stdout => &self.stdout,
            Pipe::Stderr => self
                .stderr
                .as_ref()
                .unwrap_or_else(|| panic!("{}: stderr is not piped", self.name)),
        }
    }

    /// Stops reading `pipe` (before the next line): the child's writes then fill the pipe and
    /// block, as with a supervisor that stopped reading. A read already under way completes.
    pub fn pause(&self, pipe: Pipe) {
        self.pipe_end(pipe).gate.set(true);
    }

    /// Reads `pipe` again.
    pub fn resume(&self, pipe: Pipe) {
        self.pipe_end(pipe).gate.set(false);
    }

    /// Bytes written by the child into `pipe` and not read yet (`FIONREAD`).
    pub fn pipe_pending(&self, pipe: Pipe) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int for a pipe fd we own.
        let r =
            unsafe { libc::ioctl(self.pipe_end(pipe).file.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    }

    /// The capacity of `pipe` in bytes.
    pub fn pipe_capacity(&self, pipe: Pipe) -> usize {
        self.pipe_end(pipe).size
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
                // Let the reader threads drain what the process printed before it exited.
                self.resume(Pipe::Stdout);
                if self.stderr.is_some() {
                    self.resume(Pipe::Stderr);
                }
                let piped_stderr = self.stderr.is_some();
                let (m, c) = &*self.shared;
                let mut g = m.lock().unwrap();
                while !g.closed || (piped_stderr && !g.stderr_closed) {
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
        // Let paused readers run to EOF and end.
        self.stdout.gate.set(false);
        if let Some(e) = &self.stderr {
            e.gate.set(false);
        }
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

// Version 2 peers played by the tests themselves: fake sources and fake backups that speak the
// authenticated protocol with the key in `test_key()`, to send what a real peer never would.

/// The credentials in [`test_key`], as the processes the tests start load them.
pub fn test_credentials() -> vmm_takeover_core::auth::Credentials {
    let ring = vmm_takeover_core::auth::KeyRing::load(std::path::Path::new(test_key()))
        .expect("load the test key");
    vmm_takeover_core::auth::Credentials::Keys(Arc::new(ring))
}

/// Reads from `s` (blocking; `EVENT_TIMEOUT` unless it has a read timeout) until `reader` holds a
/// whole handshake frame (HELLO, WELCOME, AUTH or REJECT), and returns it. Panics on EOF, a read
/// error or bytes that are no handshake frame.
pub fn read_handshake(
    s: &mut std::net::TcpStream,
    reader: &mut vmm_takeover_core::auth::Reader,
) -> Vec<u8> {
    use std::io::Read;
    if s.read_timeout().unwrap().is_none() {
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    }
    let mut buf = [0u8; 512];
    loop {
        match reader.next_handshake() {
            Ok(Some(frame)) => return frame,
            Ok(None) => {}
            Err(e) => panic!("not a handshake frame: {e}"),
        }
        match s.read(&mut buf) {
            Ok(0) => panic!("the peer closed during the handshake"),
            Ok(n) => reader.push(&buf[..n]),
            Err(e) => panic!("reading a handshake frame: {e}"),
        }
    }
}

/// A fake backup's handshake on `s` for `pair`, with the test key: sends the HELLO, reads the
/// answer and, if it is a WELCOME that verifies, sends the AUTH. Returns the session and the
/// reader (which may already hold sealed frames), or why the source's answer failed.
pub fn fake_backup_handshake(
    s: &mut std::net::TcpStream,
    pair: &str,
) -> Result<
    (
        vmm_takeover_core::auth::Session,
        vmm_takeover_core::auth::Reader,
    ),
    vmm_takeover_core::auth::HandshakeFailure,
> {
    use std::io::Write;
    use vmm_takeover_core::auth::{BackupHandshake, OsEntropy, Reader};
    let (hs, hello) = BackupHandshake::start(
        &test_credentials(),
        pair,
        "",
        &mut OsEntropy::new().unwrap(),
    );
    s.write_all(&hello).unwrap();
    let mut reader = Reader::new();
    let answer = read_handshake(s, &mut reader);
    let w = hs.on_welcome(&answer)?;
    s.write_all(&w.auth).unwrap();
    Ok((w.session, reader))
}

/// A fake source's first step on `s` for `pair`, with the test key: reads the HELLO (into
/// `reader`, which the connection keeps) and returns the handshake, for the test to answer with
/// [`SourceHandshake::welcome`](vmm_takeover_core::auth::SourceHandshake::welcome) or
/// [`SourceHandshake::reject`](vmm_takeover_core::auth::SourceHandshake::reject).
pub fn fake_source_hello(
    s: &mut std::net::TcpStream,
    pair: &str,
    reader: &mut vmm_takeover_core::auth::Reader,
) -> vmm_takeover_core::auth::SourceHandshake {
    use vmm_takeover_core::auth::{OsEntropy, SourceHandshake};
    let hello = read_handshake(s, reader);
    SourceHandshake::on_hello(
        &test_credentials(),
        pair,
        &hello,
        &mut OsEntropy::new().unwrap(),
    )
    .unwrap_or_else(|e| panic!("not a HELLO this source accepts: {e}"))
}

/// A fake source's whole handshake on `s` for `pair`, with the test key: reads the HELLO,
/// answers a WELCOME announcing `info`, and checks the backup's AUTH. Returns the session and the
/// reader. Panics if the backup does not authenticate.
pub fn fake_source_handshake(
    s: &mut std::net::TcpStream,
    pair: &str,
    info: &vmm_takeover_core::auth::WelcomeInfo,
) -> (
    vmm_takeover_core::auth::Session,
    vmm_takeover_core::auth::Reader,
) {
    use std::io::Write;
    let mut reader = vmm_takeover_core::auth::Reader::new();
    let (awaiting, welcome) = fake_source_hello(s, pair, &mut reader).welcome(info);
    s.write_all(&welcome).unwrap();
    let auth = read_handshake(s, &mut reader);
    let accepted = awaiting
        .on_auth(&auth)
        .unwrap_or_else(|e| panic!("the backup's AUTH: {e}"));
    (accepted.session, reader)
}

/// The code and text of the version 2 REJECT that `answer` starts with, decoded as a backup
/// decodes it (through its handshake; whether its tag verifies does not matter here). Panics on
/// anything but a version 2 REJECT.
pub fn reject_of(answer: &[u8]) -> (vmm_takeover_core::protocol::RejectCode, String) {
    use vmm_takeover_core::auth::{BackupHandshake, HandshakeFailure, OsEntropy, Reader};
    let mut reader = Reader::new();
    reader.push(answer);
    let frame = match reader.next_handshake() {
        Ok(Some(frame)) => frame,
        other => panic!("expected a version 2 REJECT, got {other:?} from {answer:02x?}"),
    };
    let (hs, _) = BackupHandshake::start(
        &test_credentials(),
        "reject-of",
        "",
        &mut OsEntropy::new().unwrap(),
    );
    match hs.on_welcome(&frame) {
        Err(HandshakeFailure::Rejected { code, reason, .. }) => (code, reason),
        other => panic!("expected a REJECT, got {other:?} from {answer:02x?}"),
    }
}
