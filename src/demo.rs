// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover demo`: the whole story in one command, on loopback, without root.
//!
//! Runs this very binary twice — a source with a running dummy guest and a backup holding a paused
//! one — arms the link, injects a fault, and prints a timeline built from the JSON events the two
//! processes print. It exits 0 only if what it shows really happened.
//!
//! `--guest linux` tells the same story with a real Linux guest under QEMU, live-migrated to the
//! backup's QEMU on a handoff: see [`linux`].

mod linux;

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_takeover_guest::DummyVm;

use crate::cli::{DemoArgs, DemoGuest, Fault};
use crate::events::unix_us;
use crate::{exit, Failure};

/// Upper bound for any one step; generous, the demo normally takes about two seconds.
const STEP: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Source,
    Backup,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Source => "source",
            Who::Backup => "backup",
        }
    }
}

struct Demo {
    rx: Receiver<(Who, Value)>,
    /// The timeline, printed sorted by time at the end: the two processes' events arrive in any
    /// order, and the demo waits for them in the order the story needs.
    timeline: std::cell::RefCell<Vec<(u64, String, String)>>,
    /// Events of the process not being waited on are kept for later, not dropped: the two
    /// processes' events interleave in any order.
    pending: std::cell::RefCell<[VecDeque<Value>; 2]>,
    tx: Sender<(Who, Value)>,
    t0_us: u64,
    children: Vec<Child>,
}

fn spawn(who: Who, args: &[&str], tx: Sender<(Who, Value)>) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the {}: {e}", who.name()))?;
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((who, v)).is_err() {
                    break;
                }
            }
        }
        let _ = tx.send((who, serde_json::json!({"event": "exited"})));
    });
    Ok(child)
}

impl Demo {
    fn at(&self, us: u64) -> String {
        format!("{:>8.3} s", us.saturating_sub(self.t0_us) as f64 / 1e6)
    }

    fn line(&self, us: u64, who: &str, text: &str) {
        self.timeline
            .borrow_mut()
            .push((us, who.to_string(), text.to_string()));
    }

    /// Prints the timeline in time order (a stable sort keeps same-instant lines as logged).
    fn print_timeline(&self) {
        let mut t = self.timeline.borrow_mut();
        t.sort_by_key(|(us, _, _)| *us);
        for (us, who, text) in t.iter() {
            println!("[{}] {who:<7} {text}", self.at(*us));
        }
    }

    /// Waits for an event of `who` that satisfies `pred`; `who`'s earlier events are skipped.
    fn wait(&self, who: Who, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
        self.wait_within(STEP, who, what, pred)
    }

    /// [`Demo::wait`] with another bound than [`STEP`] (a live migration under TCG is slower).
    fn wait_within(
        &self,
        bound: Duration,
        who: Who,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + bound;
        let timeout = || format!("{} never reported {what} within {bound:?}", who.name());
        loop {
            let next = self.pending.borrow_mut()[who as usize].pop_front();
            let v = match next {
                Some(v) => v,
                None => {
                    let left = deadline
                        .checked_duration_since(Instant::now())
                        .ok_or_else(timeout)?;
                    match self.rx.recv_timeout(left) {
                        Ok((w, v)) if w == who => v,
                        Ok((w, v)) => {
                            self.pending.borrow_mut()[w as usize].push_back(v);
                            continue;
                        }
                        Err(_) => return Err(timeout()),
                    }
                }
            };
            if pred(&v) {
                return Ok(v);
            }
            if v["event"] == "exited" {
                return Err(format!("{} exited before {what}", who.name()));
            }
        }
    }

    /// Starts this binary as `who`; the child is killed when the demo ends.
    fn start(&mut self, who: Who, args: &[&str]) -> Result<i32, String> {
        let child = spawn(who, args, self.tx.clone())?;
        let pid = child.id() as i32;
        self.children.push(child);
        Ok(pid)
    }

    /// After SIGTERM to the source: the source sends STAND_DOWN, the backup stands down and
    /// exits without starting its guest.
    fn expect_stand_down(&self) -> Result<(), String> {
        let sd = self.event(Who::Source, "stand-down-sent")?;
        self.line(us(&sd, "at_unix_us"), "source", "sent STAND_DOWN, exiting");
        let bd = self.wait(Who::Backup, "stand-down", |v| {
            v["event"] == "stand-down" || v["event"] == "takeover"
        })?;
        if bd["event"] == "takeover" {
            return Err(format!("an orderly stop was taken over: {bd}"));
        }
        self.line(
            us(&bd, "at_unix_us"),
            "backup",
            "received STAND_DOWN: not taking over",
        );
        let ex = self.wait(Who::Backup, "exit", |v| {
            v["event"] == "exited" || v["event"] == "vm-started"
        })?;
        if ex["event"] != "exited" {
            return Err("the backup started its guest after an orderly stop".into());
        }
        Ok(())
    }

    fn event(&self, who: Who, name: &str) -> Result<Value, String> {
        self.wait(who, name, |v| v["event"] == name)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The signal that injects `fault`, and how the timeline names it.
fn signal(fault: Fault) -> (i32, &'static str) {
    match fault {
        Fault::Kill => (libc::SIGKILL, "SIGKILL (crash)"),
        Fault::Stop => (libc::SIGTERM, "SIGTERM (orderly stop)"),
        Fault::Handoff => (libc::SIGUSR1, "SIGUSR1 (planned handoff)"),
    }
}

fn us(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn counter(v: &Value) -> u64 {
    us(v, "counter")
}

/// A private directory (0700) for the demo's key file (and, with `--guest linux`, the guest image
/// and the QEMUs' consoles and sockets), removed on drop.
struct KeyDir {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl KeyDir {
    fn new() -> Result<KeyDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!(
            "vmm-takeover-demo-{}-{}",
            std::process::id(),
            unix_us(std::time::SystemTime::now())
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("demo.psk");
        Ok(KeyDir { dir, path })
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo; `Ok` only if the story it told really happened. A fault the guest cannot show
/// is a usage error (exit 2), refused before anything starts.
pub fn run(a: DemoArgs) -> Result<(), Failure> {
    let fault = a.fault().map_err(|message| Failure {
        code: exit::USAGE,
        message,
    })?;
    let (tx, rx) = mpsc::channel();
    let mut d = Demo {
        rx,
        timeline: Default::default(),
        pending: Default::default(),
        tx,
        t0_us: unix_us(std::time::SystemTime::now()),
        children: Vec::new(),
    };
    let r = match a.guest {
        DemoGuest::Dummy => story(&mut d, fault),
        DemoGuest::Linux => linux::story(&mut d, fault),
    };
    d.print_timeline();
    match r {
        Ok(result) => {
            println!("\nRESULT: {result}");
            Ok(())
        }
        Err(e) => Err(Failure::runtime(e)),
    }
}

/// A throwaway key for this run in `keys`: the link is authenticated as in production, with
/// nothing to set up. Returns its path for `--psk-file`.
fn throwaway_key(keys: &KeyDir) -> Result<String, String> {
    let key = keys.path.to_string_lossy().into_owned();
    let id = vmm_takeover_core::auth::keygen(&keys.path)
        .map_err(|e| format!("cannot make the demo's throwaway key: {e}"))?;
    println!("throwaway key {id} written to {key} (both sides use it: --psk-file)\n");
    Ok(key)
}

/// The timeline line for the backup's `armed` event.
fn armed_line(d: &Demo, armed: &Value, bak_pid: i32) {
    let k = &armed["keepalive"];
    d.line(
        us(armed, "at_unix_us"),
        "backup",
        &format!(
            "link armed and authenticated with key {} (pid {bak_pid}): keepalive idle={}s \
             intvl={}s cnt={}, worst-case silent-failure bound {} ms (enforced by the backup's \
             watchdog)",
            armed["auth"]["key_id"], k["idle_s"], k["interval_s"], k["count"], k["bound_ms"]
        ),
    );
}

/// Sends `sig` to the source (our child) and puts the fault on the timeline; returns when.
fn inject(d: &Demo, src_pid: i32, sig: i32, name: &str) -> Result<u64, String> {
    let fault_us = unix_us(std::time::SystemTime::now());
    // SAFETY: kill(2) on our own child.
    if unsafe { libc::kill(src_pid, sig) } != 0 {
        return Err(format!(
            "kill {src_pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    d.line(
        fault_us,
        "FAULT",
        &format!("{name} -> source pid {src_pid}"),
    );
    Ok(fault_us)
}

/// The demo's story with the dummy guest; returns the result line.
fn story(d: &mut Demo, fault: Fault) -> Result<String, String> {
    let kind = match DummyVm::probe() {
        Ok(()) => "kvm-dummy",
        Err(e) => {
            println!("NOTE: /dev/kvm is not usable ({e}).");
            println!("      Falling back to a SIMULATED guest (a counting thread, not a VM).");
            "simulated"
        }
    };
    // The real KVM guest is replicated (Remus-style checkpoints with output commit): the backup
    // resumes the source's guest rather than a fresh one. The simulation has no dirty log.
    let replicate = kind == "kvm-dummy";
    let guest_label = if replicate {
        "a real KVM guest (kvm-ioctls) that writes a rising counter to an I/O port, replicated to \
         the backup every 25 ms (checkpoints, output commit)"
    } else {
        "SIMULATED guest"
    };
    println!(
        "vmm-takeover demo: fault = {}, guest = {guest_label}\n",
        fault.as_str()
    );

    // It lives in a private directory removed when the demo ends.
    let keys = KeyDir::new()?;
    let key = throwaway_key(&keys)?;

    let mut src_args = vec![
        "source",
        "--listen",
        "127.0.0.1:0",
        "--pair-id",
        "demo",
        "--psk-file",
        &key,
        "--vm",
        kind,
    ];
    if replicate {
        src_args.extend_from_slice(&[
            "--guest-dirty-rate",
            "1MiB/s",
            "--checkpoint",
            "25ms",
            "--replica-listen",
            "127.0.0.1:0",
        ]);
    }
    let src_pid = d.start(Who::Source, &src_args)?;
    let replica_addr = if replicate {
        let r = d.event(Who::Source, "replica-listening")?;
        r["addr"].as_str().unwrap_or_default().to_string()
    } else {
        String::new()
    };
    let l = d.event(Who::Source, "listening")?;
    let addr = l["addr"].as_str().unwrap_or_default().to_string();
    d.line(
        us(&l, "at_unix_us"),
        "source",
        &format!("listening on {addr}, pid {src_pid}"),
    );

    let mut bak_args = vec![
        "backup",
        "--connect",
        &addr,
        "--pair-id",
        "demo",
        "--psk-file",
        &key,
        "--vm",
        kind,
    ];
    if replicate {
        bak_args.extend_from_slice(&["--replica-from", &replica_addr]);
    }
    let bak_pid = d.start(Who::Backup, &bak_args)?;
    let armed = d.event(Who::Backup, "armed")?;
    armed_line(d, &armed, bak_pid);
    if replicate {
        let full = d.event(Who::Backup, "checkpoint-applied")?;
        d.line(
            us(&full, "at_unix_us"),
            "backup",
            &format!(
                "full checkpoint applied to the paused standby: {} pages, guest counter {}",
                us(&full, "pages"),
                us(&full, "mark")
            ),
        );
    }

    // Evidence before the fault: the source's guest runs, the backup's executes nothing.
    let sg = d.wait(Who::Source, "a running guest", |v| {
        v["event"] == "guest" && v["running"] == true && counter(v) > 0
    })?;
    d.line(
        us(&sg, "at_unix_us"),
        "source",
        &format!("guest running, counter {}", counter(&sg)),
    );
    let bg = d.wait(Who::Backup, "its paused guest", |v| v["event"] == "guest")?;
    // Replicated, the standby holds the source's state (its counter), but executes nothing.
    if bg["running"] != false || (!replicate && counter(&bg) != 0) || us(&bg, "exits") != 0 {
        return Err(format!(
            "the backup's standby guest is not paused and idle: {bg}"
        ));
    }
    d.line(
        us(&bg, "at_unix_us"),
        "backup",
        &if replicate {
            format!(
                "standby guest paused, holding the source's state (counter {}): 0 guest exits",
                counter(&bg)
            )
        } else {
            "standby guest paused: counter 0, 0 guest exits".to_string()
        },
    );

    // The highest output the source showed, for the output-commit check after a takeover.
    let shown = Cell::new(counter(&sg));
    let (sig, name) = signal(fault);
    let fault_us = inject(d, src_pid, sig, name)?;

    match fault {
        Fault::Stop => {
            d.expect_stand_down()?;
            return Ok(format!(
                "orderly stop. The backup stood down and exited; its standby guest never \
                 ran{}.",
                if replicate { "" } else { " (counter stayed 0)" }
            ));
        }
        Fault::Handoff => {
            let p = d.wait(Who::Source, "its paused guest", |v| {
                v["event"] == "guest" && v["running"] == false
            })?;
            shown.set(shown.get().max(counter(&p)));
            d.line(
                us(&p, "at_unix_us"),
                "source",
                &format!("guest paused at counter {} before HANDOFF", counter(&p)),
            );
            let h = d.event(Who::Source, "handoff-sent")?;
            d.line(us(&h, "at_unix_us"), "source", "sent HANDOFF to the backup");
            let c = d.event(Who::Source, "handoff-complete")?;
            d.line(
                us(&c, "at_unix_us"),
                "source",
                "the backup reports its copy runs: handoff complete, exiting",
            );
        }
        Fault::Kill => {}
    }

    let t = d.event(Who::Backup, "takeover")?;
    let reason = t["reason"].as_str().unwrap_or("?").to_string();
    let want = if fault == Fault::Kill {
        "peer-closed"
    } else {
        "handoff"
    };
    if reason != want {
        return Err(format!("expected reason {want}, got {reason}"));
    }
    let detected = us(&t, "detected_at_unix_us");
    if detected < fault_us {
        return Err("takeover detected before the fault".into());
    }
    d.line(
        detected,
        "backup",
        &format!(
            "{} {:.3} ms after the signal: reason {reason}",
            if fault == Fault::Kill {
                "loss detected"
            } else {
                "HANDOFF received"
            },
            (detected - fault_us) as f64 / 1e3
        ),
    );
    let st = d.event(Who::Backup, "vm-started")?;
    d.line(
        us(&st, "at_unix_us"),
        "backup",
        &format!(
            "standby guest resumed {:.3} ms after detection (vm_start took {:.3} ms)",
            us(&st, "at_unix_us").saturating_sub(detected) as f64 / 1e3,
            us(&st, "took_us") as f64 / 1e3
        ),
    );
    let g1 = d.wait(Who::Backup, "a running guest", |v| {
        v["event"] == "guest" && v["running"] == true && counter(v) > 0
    })?;
    let g2 = d.wait(Who::Backup, "a rising counter", |v| {
        v["event"] == "guest" && counter(v) > counter(&g1)
    })?;
    let from = if replicate {
        us(&st, "checkpoint_mark")
    } else {
        0
    };
    d.line(
        us(&g2, "at_unix_us"),
        "backup",
        &format!(
            "guest counter {from} -> {} -> {}: {}",
            counter(&g1),
            counter(&g2),
            if kind == "kvm-dummy" {
                "guest instructions execute"
            } else {
                "the simulation counts (a thread, not a VM: nothing about virtualization is shown)"
            }
        ),
    );
    let mut continued = String::new();
    if replicate {
        // Output commit: the resumed guest holds everything the source ever showed.
        d.wait(Who::Source, "its end", |v| {
            if v["event"] == "guest" {
                shown.set(shown.get().max(counter(v)));
            }
            v["event"] == "exited"
        })?;
        if from < shown.get() {
            return Err(format!(
                "output taken back: the source showed counter {}, the backup resumed at {from}",
                shown.get()
            ));
        }
        d.line(
            us(&st, "at_unix_us"),
            "backup",
            &format!(
                "resumed the source's guest at checkpoint #{} (counter {from}; the source had \
                 shown at most {}): the same guest continues, nothing it showed is taken back",
                us(&st, "checkpoint_seq"),
                shown.get()
            ),
        );
        continued = format!(", continuing the source's guest from counter {from}");
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(bak_pid, libc::SIGTERM) };
    Ok(format!(
        "takeover verified. Source got {name}; the backup took over {:.3} ms later \
         ({reason}) and its guest runs{continued}.",
        (detected - fault_us) as f64 / 1e3
    ))
}
