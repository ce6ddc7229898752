// SPDX-License-Identifier: Apache-2.0
//! A real Linux guest under QEMU (TCG) for the tests: the image that
//! `scripts/build-linux-guest.sh` builds (Debian's cloud kernel and a busybox initramfs whose
//! `/init` prints `counter N uptime S` on the serial console every 100 ms), a QEMU process that
//! boots it with its serial console in a file and QMP sockets, and a tiny blocking QMP client.
//!
//! TCG, not KVM: on these machines (nested virtualization) the cloud kernel hangs at boot under
//! KVM, and boots under TCG (see docs: design notes, section 7).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{skip, TempDir};

/// Generous upper bound for a boot under TCG on a loaded 2-CPU machine (≈ 2-4 s when idle).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Generous upper bound for a QMP answer, a socket to appear or a state change.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the polling helpers look again.
const POLL: Duration = Duration::from_millis(20);

/// The QEMU binary the tests run.
pub const QEMU: &str = "qemu-system-x86_64";

fn in_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Builds the guest image once per test process (into `$CARGO_TARGET_TMPDIR/linux-guest`, by
/// `scripts/build-linux-guest.sh`) and returns `(kernel, initramfs)`; or `Err(why)` when this
/// machine lacks QEMU, the cloud kernel or a static busybox. A failure of the script for any
/// other reason panics.
pub fn try_guest_image() -> Result<(PathBuf, PathBuf), String> {
    static IMAGE: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if !in_path(QEMU) {
                return Err(format!(
                    "{QEMU} is not installed (apt-get install qemu-system-x86)"
                ));
            }
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-guest");
            let script =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-linux-guest.sh");
            let run = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            let stderr = String::from_utf8_lossy(&run.stderr).trim().to_string();
            if !run.status.success() {
                // The script names the Debian package when something is not installed.
                if stderr.contains("install the Debian package") {
                    return Err(stderr);
                }
                panic!("{} failed ({}): {stderr}", script.display(), run.status);
            }
            Ok((out.join("vmlinuz"), out.join("initramfs.img")))
        })
        .clone()
}

/// [`try_guest_image`], or `None` after printing `SKIPPED: why` (see [`skip`]): a test starts
/// with `let Some((kernel, initrd)) = guest_image() else { return };`.
pub fn guest_image() -> Option<(PathBuf, PathBuf)> {
    match try_guest_image() {
        Ok(img) => Some(img),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// How [`Qemu::spawn`] starts QEMU. The default: running at once, two QMP sockets.
#[derive(Debug, Clone)]
pub struct QemuOpts {
    /// `-S`: the CPUs stay stopped until `cont`.
    pub paused: bool,
    /// `-incoming tcp:127.0.0.1:PORT`: waits for a live migration on that port.
    pub incoming_port: Option<u16>,
    /// How many `-qmp` unix sockets (at least 1; the tests use the last one to observe, the
    /// others are for the code under test).
    pub qmp_sockets: usize,
    /// Extra arguments, appended last.
    pub extra: Vec<String>,
}

impl Default for QemuOpts {
    fn default() -> Self {
        QemuOpts {
            paused: false,
            incoming_port: None,
            qmp_sockets: 2,
            extra: Vec::new(),
        }
    }
}

impl QemuOpts {
    /// A destination for a live migration to `127.0.0.1:port`, with `-S`.
    pub fn incoming(port: u16) -> Self {
        QemuOpts {
            paused: true,
            incoming_port: Some(port),
            ..Self::default()
        }
    }
}

/// One `counter N uptime S` line of the guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// N: 1 for the first line after boot.
    pub counter: u64,
    /// S: the guest's `/proc/uptime`, in seconds.
    pub uptime: f64,
}

/// The `counter N uptime S` lines in `text`, in order. Other text on a line before `counter`
/// (terminal escapes, a line the source QEMU began before a migration) is ignored; a line
/// without both numbers is skipped.
pub fn parse_ticks(text: &str) -> Vec<Tick> {
    text.lines()
        .filter_map(|line| {
            let rest = &line[line.rfind("counter ")?..];
            let mut w = rest.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("counter"), Some(n), Some("uptime"), Some(s)) => Some(Tick {
                    counter: n.parse().ok()?,
                    uptime: s.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// A QEMU booting the test guest under TCG: serial console into a file, QMP unix sockets,
/// stderr into a file. SIGKILLed, reaped and its files removed on drop (a failing test too).
pub struct Qemu {
    /// For messages.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
    serial: PathBuf,
    stderr: PathBuf,
    qmp: Vec<PathBuf>,
    /// When the process was spawned.
    pub started: Instant,
    // Last: removed after the process is gone.
    dir: TempDir,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -machine pc,accel=tcg -m 256` on `kernel` and `initrd` as
    /// `opts` says. Does not wait for anything.
    pub fn spawn(name: &str, kernel: &Path, initrd: &Path, opts: QemuOpts) -> Qemu {
        assert!(opts.qmp_sockets >= 1, "a Qemu needs a QMP socket");
        let dir = TempDir::new(&format!("qemu-{name}"));
        let serial = dir.path("serial.log");
        let stderr = dir.path("stderr.log");
        let qmp: Vec<PathBuf> = (0..opts.qmp_sockets)
            .map(|i| dir.path(&format!("qmp{i}.sock")))
            .collect();
        let mut cmd = Command::new(QEMU);
        cmd.args(["-machine", "pc,accel=tcg", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-monitor", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        for q in &qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", q.display()));
        }
        if opts.paused {
            cmd.arg("-S");
        }
        if let Some(port) = opts.incoming_port {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        cmd.args(&opts.extra);
        let err = std::fs::File::create(&stderr).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {QEMU} ({name}): {e}"));
        Qemu {
            name: name.to_string(),
            child,
            status: None,
            serial,
            stderr,
            qmp,
            started: Instant::now(),
            dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Path of QMP socket `i` (in `0..qmp_sockets`).
    pub fn qmp_path(&self, i: usize) -> &Path {
        &self.qmp[i]
    }

    /// Connects a [`Qmp`] client to the test's own QMP socket (the last one), waiting for it
    /// to appear; panics (with QEMU's stderr) if QEMU exits or it does not appear in time.
    pub fn qmp(&mut self) -> Qmp {
        let path = self.qmp.last().unwrap().clone();
        self.qmp_at(&path)
    }

    /// Like [`Qemu::qmp`] for socket `i`.
    pub fn qmp_on(&mut self, i: usize) -> Qmp {
        let path = self.qmp[i].clone();
        self.qmp_at(&path)
    }

    fn qmp_at(&mut self, path: &Path) -> Qmp {
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    return Qmp::handshake(s)
                        .unwrap_or_else(|e| panic!("{}: QMP handshake: {e}", self.name))
                }
                Err(e) => {
                    if let Some(st) = self.try_wait() {
                        panic!(
                            "{} exited ({st}) before its QMP socket answered; stderr: {}",
                            self.name,
                            self.stderr_text()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{}: QMP socket {} not there within {QMP_TIMEOUT:?}: {e}",
                        self.name,
                        path.display()
                    );
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Everything the guest wrote on its serial console so far.
    pub fn serial_text(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// What QEMU wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Every `counter N uptime S` line so far.
    pub fn ticks(&self) -> Vec<Tick> {
        parse_ticks(&self.serial_text())
    }

    /// The last `counter N uptime S` line so far.
    pub fn last_tick(&self) -> Option<Tick> {
        self.ticks().last().copied()
    }

    /// Polls the serial file until the counter reaches `at_least`, and returns that line;
    /// panics after `timeout` (or when QEMU exits) with the console and QEMU's stderr.
    pub fn wait_counter(&mut self, at_least: u64, timeout: Duration) -> Tick {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.last_tick().filter(|t| t.counter >= at_least) {
                return t;
            }
            let exited = self.try_wait();
            if exited.is_some() || Instant::now() > deadline {
                let why = match exited {
                    Some(st) => format!("exited ({st})"),
                    None => format!("not within {timeout:?}"),
                };
                panic!(
                    "{}: counter did not reach {at_least}: {why}; last {:?}\n\
                     --- serial ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.last_tick(),
                    self.serial_text(),
                    self.stderr_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGKILL.
    pub fn kill(&self) {
        // Once reaped, the pid may belong to another process: never signal it then.
        if self.status.is_none() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            let r = unsafe { libc::kill(self.pid(), libc::SIGKILL) };
            assert_eq!(r, 0, "kill {}", self.name);
        }
    }

    /// The exit status if QEMU has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Polls until QEMU exits; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // `dir` (serial, stderr, sockets) is removed when it drops, right after this.
    }
}

/// A tiny blocking QMP client for the tests: the greeting and `qmp_capabilities` on connect,
/// then one command at a time; asynchronous events read on the way are kept in `events`.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events (`{"event": ..., "data": ..., "timestamp": ...}`) seen so far, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (which must be there) and negotiates capabilities.
    pub fn connect(path: &Path) -> std::io::Result<Qmp> {
        Self::handshake(UnixStream::connect(path)?)
    }

    fn handshake(stream: UnixStream) -> std::io::Result<Qmp> {
        stream.set_read_timeout(Some(QMP_TIMEOUT))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::other(format!(
                "not a QMP greeting: {greeting}"
            )));
        }
        q.try_execute("qmp_capabilities", Value::Null)?
            .map_err(|e| std::io::Error::other(format!("qmp_capabilities: {e}")))?;
        Ok(q)
    }

    fn read_message(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(|e| std::io::Error::other(format!("{e}: {line:?}")))
    }

    /// Runs `cmd` with `args` (`Value::Null` for none): `Ok(Ok(return))`, `Ok(Err(error))`
    /// when QEMU refused it (`{"class": ..., "desc": ...}`), `Err` when the connection failed.
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> std::io::Result<Result<Value, Value>> {
        let msg = if args.is_null() {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let v = self.read_message()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            } else if let Some(e) = v.get("error") {
                return Ok(Err(e.clone()));
            } else {
                return Err(std::io::Error::other(format!("unexpected QMP message {v}")));
            }
        }
    }

    /// Runs `cmd` and returns its `return` value; panics if QEMU refuses it or the
    /// connection fails.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        match self.try_execute(cmd, args.clone()) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("QMP {cmd} {args}: refused: {e}"),
            Err(e) => panic!("QMP {cmd} {args}: {e}"),
        }
    }

    /// `query-status`'s `status` (`running`, `paused`, `prelaunch`, `inmigrate`,
    /// `postmigrate`, ...).
    pub fn status(&mut self) -> String {
        self.execute("query-status", Value::Null)["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Polls `query-status` until it is `want`; panics after `timeout` with the last one.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "status still {s:?}, not {want:?}, after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Polls `query-status` while it is `from`, and returns the first other status; panics
    /// after `timeout`.
    pub fn wait_status_change(&mut self, from: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s != from {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status still {from:?} after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `query-migrate`'s whole answer.
    pub fn query_migrate(&mut self) -> Value {
        self.execute("query-migrate", Value::Null)
    }

    /// Polls `query-migrate` until its status is one of `want` and returns the answer; panics
    /// after `timeout` with the last answer.
    pub fn wait_migration(&mut self, want: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.query_migrate();
            if want.iter().any(|w| m["status"] == *w) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "migration not {want:?} after {timeout:?}: {m}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Turns on the `events` migration capability (a `MIGRATION` event per state change).
    pub fn enable_migration_events(&mut self) {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "events", "state": true }] }),
        );
    }

    /// The `status` of every `MIGRATION` event seen so far, in order.
    pub fn migration_event_statuses(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}
