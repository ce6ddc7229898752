// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover demo --guest linux`: the planned handoff as a QEMU live migration of a real
//! Linux guest, on loopback.
//!
//! The guest is the one the tests boot (`scripts/build-linux-guest.sh`: Debian's cloud kernel
//! and a busybox `/init` printing `counter N uptime S` on the serial console every 100 ms) under
//! QEMU TCG. The source QEMU runs it; the backup's QEMU waits with `-S -incoming`. The source runs
//! with `--qmp --migrate-to`, the backup with `--qmp`; on SIGUSR1 the guest migrates, HANDOFF
//! follows and the backup resumes it with `cont`. The two consoles are the evidence: the backup's
//! first line continues the source's last one (the same boot, a later uptime).
//!
//! `--fault kill` is refused before anything starts (see `DemoArgs::fault`): the standby QEMU
//! holds no image before a migration, so a crash leaves nothing to resume.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_takeover_guest::qemu::{find_qemu, QemuError};
use vmm_takeover_guest::QmpClient;

use super::{armed_line, inject, signal, throwaway_key, us, Demo, KeyDir, Who};
use crate::cli::Fault;
use crate::events::unix_us;

/// The image builder, embedded: an installed binary has no source tree to find the script in, and
/// running the very script the tests run keeps one definition of the guest (and its checks, which
/// name the Debian package of whatever is missing). It is run with `bash -c`, so no copy of it is
/// written anywhere.
const BUILD_SCRIPT: &str = include_str!("../../scripts/build-linux-guest.sh");

/// Bound for the guest's boot under TCG (≈ 2-4 s on an idle machine), for the live migration of
/// its 256 MiB and for the migrated guest's first line: generous for a loaded 2-CPU machine.
const SLOW_STEP: Duration = Duration::from_secs(60);

/// Bound for a QMP socket to answer and for one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the console files and QMP sockets are looked at again.
const POLL: Duration = Duration::from_millis(20);

/// How many lines the source's guest prints before anything else starts: proof that it booted.
const BOOT_TICKS: usize = 3;

/// How many lines the migrated guest prints before the demo reads its first one: proof that it
/// carries on, not just that one line got out.
const RESUMED_TICKS: usize = 3;

/// One `counter N uptime S` line of the guest.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tick {
    counter: u64,
    uptime: f64,
}

impl std::fmt::Display for Tick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "counter {} uptime {:.2}", self.counter, self.uptime)
    }
}

/// The complete `counter N uptime S` lines of a console, in order. A last line without its
/// newline is left out: QEMU writes the console as the guest does, so it may be cut anywhere (in
/// the uptime's digits, say) — and on the source it stays cut, the rest of it being printed by the
/// migrated guest on the backup. Text before `counter` on a line (terminal escapes, the rest of
/// such a cut line) is ignored.
fn ticks(text: &str) -> Vec<Tick> {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|line| {
            let mut w = line[line.rfind("counter ")?..].split_whitespace();
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

/// A QEMU of the demo (TCG, the guest's serial console into a file, two QMP sockets: 0 for
/// vmm-takeover, 1 for the demo's own checks, as QEMU serves one client per socket). Killed and
/// reaped on drop, whatever happened; its files go with the demo's private directory.
struct Qemu {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
    serial: PathBuf,
    stderr: PathBuf,
    qmp: [PathBuf; 2],
}

impl Qemu {
    /// Starts QEMU on the guest image, its files in `dir`; with `incoming`, paused and waiting for
    /// a live migration on that loopback port instead of booting.
    fn spawn(
        name: &'static str,
        qemu: &Path,
        dir: &Path,
        image: &(PathBuf, PathBuf),
        incoming: Option<u16>,
    ) -> Result<Qemu, String> {
        std::fs::create_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let serial = dir.join("serial.log");
        let stderr = dir.join("stderr.log");
        let qmp = [dir.join("qmp0.sock"), dir.join("qmp1.sock")];
        let mut cmd = Command::new(qemu);
        // TCG, not KVM: the demo must run where the cloud kernel hangs under nested KVM, and
        // without /dev/kvm at all. The options match on both sides, as a migration needs.
        cmd.args(["-machine", "pc,accel=tcg", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-monitor", "none"])
            .arg("-kernel")
            .arg(&image.0)
            .arg("-initrd")
            .arg(&image.1)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        for q in &qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", q.display()));
        }
        if let Some(port) = incoming {
            cmd.arg("-S")
                .arg("-incoming")
                .arg(format!("tcp:127.0.0.1:{port}"));
        }
        let err = std::fs::File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A file, not a pipe: nobody reads QEMU's stderr while it runs.
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {} ({name}): {e}", qemu.display()))?;
        Ok(Qemu {
            name,
            child,
            status: None,
            serial,
            stderr,
            qmp,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The path of QMP socket 0, vmm-takeover's.
    fn qmp_for_vmm_takeover(&self) -> String {
        self.qmp[0].to_string_lossy().into_owned()
    }

    /// The exit status once QEMU has exited (reaps it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Why QEMU is no help any more, for an error: it exited, with what it said.
    fn exited_error(&self, status: ExitStatus) -> String {
        let said = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("the {} exited ({status}): {}", self.name, said.trim())
    }

    /// The complete guest lines on its console so far.
    fn ticks(&self) -> Vec<Tick> {
        let text = std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        ticks(&text)
    }

    /// Polls the console until it holds `n` guest lines, and returns them.
    fn wait_ticks(&mut self, n: usize, bound: Duration, what: &str) -> Result<Vec<Tick>, String> {
        let deadline = Instant::now() + bound;
        loop {
            let t = self.ticks();
            if t.len() >= n {
                return Ok(t);
            }
            if let Some(st) = self.exited() {
                return Err(self.exited_error(st));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{what}: the guest on the {} printed {} of {n} lines within {bound:?}",
                    self.name,
                    t.len()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// A QMP session on the demo's own socket, once QEMU answers there.
    fn qmp(&mut self) -> Result<QmpClient, String> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            match QmpClient::connect(&self.qmp[1], QMP_TIMEOUT) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if let Some(st) = self.exited() {
                        return Err(self.exited_error(st));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("the {}'s QMP socket: {e}", self.name));
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// `query-status`'s `status` (`running`, `inmigrate`, `postmigrate`, ...).
    fn status(&mut self) -> Result<String, String> {
        let name = self.name;
        self.qmp()?
            .query_status()
            .map(|s| s.status)
            .map_err(|e| format!("the {name}'s query-status: {e}"))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds the guest image into `out` with the embedded script; returns `(kernel, initramfs)`.
fn build_image(out: &Path) -> Result<(PathBuf, PathBuf), String> {
    let run = Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("build-linux-guest.sh")
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run bash (install the Debian package bash): {e}"))?;
    if !run.status.success() {
        // The script names the Debian package of whatever is missing.
        let said = String::from_utf8_lossy(&run.stderr);
        return Err(format!(
            "cannot build the Linux guest image ({}): {}",
            run.status,
            said.trim()
        ));
    }
    Ok((out.join("vmlinuz"), out.join("initramfs.img")))
}

/// A free loopback port for the destination's `-incoming` (QEMU cannot report one it picked).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

fn now_us() -> u64 {
    unix_us(std::time::SystemTime::now())
}

/// The demo's story with the Linux guest; returns the result line.
pub(super) fn story(d: &mut Demo, fault: Fault) -> Result<String, String> {
    // Checked first: without QEMU nothing else is worth doing (the error names the package).
    let qemu = find_qemu().ok_or_else(|| QemuError::NotInstalled.to_string())?;
    println!(
        "vmm-takeover demo: fault = {}, guest = a real Linux guest under QEMU (TCG): Debian's \
         cloud kernel and a busybox /init printing `counter N uptime S` every 100 ms\n",
        fault.as_str()
    );

    // Everything lives in one private directory removed when the demo ends: the key, the image,
    // the consoles and the QMP sockets. Declared first, so that it is removed last.
    let dir = KeyDir::new()?;
    let key = throwaway_key(&dir)?;
    let image = build_image(&dir.dir.join("guest"))?;
    println!(
        "guest image built by the embedded scripts/build-linux-guest.sh: {} + {}\n",
        image.0.display(),
        image.1.display()
    );

    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut src = Qemu::spawn("source QEMU", &qemu, &dir.dir.join("src"), &image, None)?;
    d.line(
        now_us(),
        "source",
        &format!("QEMU pid {} boots the Linux guest (TCG)", src.pid()),
    );
    let mut dst = Qemu::spawn(
        "backup QEMU",
        &qemu,
        &dir.dir.join("dst"),
        &image,
        Some(port),
    )?;
    d.line(
        now_us(),
        "backup",
        &format!(
            "QEMU pid {} waits for a live migration (-S -incoming {uri}): no guest image yet",
            dst.pid()
        ),
    );
    let booted = src.wait_ticks(BOOT_TICKS, SLOW_STEP, "boot")?;
    let last = booted[booted.len() - 1];
    d.line(
        now_us(),
        "source",
        &format!("guest booted and runs: {last}"),
    );

    let src_qmp = src.qmp_for_vmm_takeover();
    let src_pid = d.start(
        Who::Source,
        &[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            "demo",
            "--psk-file",
            &key,
            "--qmp",
            &src_qmp,
            "--migrate-to",
            &uri,
        ],
    )?;
    let l = d.event(Who::Source, "listening")?;
    let addr = l["addr"].as_str().unwrap_or_default().to_string();
    d.line(
        us(&l, "at_unix_us"),
        "source",
        &format!("listening on {addr}, pid {src_pid}: --qmp {src_qmp} --migrate-to {uri}"),
    );
    let dst_qmp = dst.qmp_for_vmm_takeover();
    let bak_pid = d.start(
        Who::Backup,
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            "demo",
            "--psk-file",
            &key,
            "--qmp",
            &dst_qmp,
        ],
    )?;
    let armed = d.event(Who::Backup, "armed")?;
    armed_line(d, &armed, bak_pid);
    // The source must count the backup before SIGUSR1, or it refuses the handoff (no-backup).
    d.event(Who::Source, "backup-joined")?;

    // Evidence before the fault: the guest runs at the source, nothing runs at the backup.
    let s = src.status()?;
    let t = dst.status()?;
    if s != "running" || t != "inmigrate" || !dst.ticks().is_empty() {
        return Err(format!(
            "before the fault the source QEMU must run and the backup's wait idle: source {s}, \
             backup {t}, backup console lines {}",
            dst.ticks().len()
        ));
    }
    d.line(
        now_us(),
        "backup",
        "standby QEMU: status inmigrate, no guest line on its console (nothing runs there)",
    );

    let (sig, name) = signal(fault);
    let fault_us = inject(d, src_pid, sig, name)?;
    match fault {
        Fault::Handoff => handoff(d, &mut src, &mut dst, fault_us, bak_pid),
        Fault::Stop => stop(d, &mut src, &mut dst),
        // Refused by `DemoArgs::fault` before anything started.
        Fault::Kill => Err("--fault kill cannot be shown with --guest linux".into()),
    }
}

/// SIGUSR1: the guest migrates, HANDOFF follows, the backup resumes it; the consoles show that
/// it carried on.
fn handoff(
    d: &Demo,
    src: &mut Qemu,
    dst: &mut Qemu,
    fault_us: u64,
    bak_pid: i32,
) -> Result<String, String> {
    let r = d.event(Who::Source, "handoff-requested")?;
    d.line(
        us(&r, "at_unix_us"),
        "source",
        &format!(
            "handoff requested: {}",
            r["pause"].as_str().unwrap_or("pause the guest")
        ),
    );
    let p = d.wait_within(SLOW_STEP, Who::Source, "a completed migration", |v| {
        v["event"] == "handoff-paused" || v["event"] == "handoff-failed"
    })?;
    if p["event"] == "handoff-failed" {
        return Err(format!("the migration failed: {p}"));
    }
    // QEMU's own figures; shown if it gives them, never a condition.
    let m = src
        .qmp()?
        .execute("query-migrate", None)
        .unwrap_or(Value::Null);
    let figures = match (m["total-time"].as_u64(), m["downtime"].as_u64()) {
        (Some(total), Some(down)) => {
            format!(": {total} ms in all, the guest stopped for {down} ms (QEMU's downtime)")
        }
        _ => String::new(),
    };
    d.line(
        us(&p, "at_unix_us"),
        "source",
        &format!("live migration to the backup's QEMU completed{figures}"),
    );
    let h = d.event(Who::Source, "handoff-sent")?;
    d.line(us(&h, "at_unix_us"), "source", "sent HANDOFF to the backup");

    let t = d.event(Who::Backup, "takeover")?;
    let reason = t["reason"].as_str().unwrap_or("?").to_string();
    if reason != "handoff" {
        return Err(format!("expected reason handoff, got {reason}"));
    }
    let detected = us(&t, "detected_at_unix_us");
    d.line(
        detected,
        "backup",
        &format!(
            "HANDOFF received {:.3} ms after the signal: reason handoff",
            detected.saturating_sub(fault_us) as f64 / 1e3
        ),
    );
    let st = d.event(Who::Backup, "vm-started")?;
    d.line(
        us(&st, "at_unix_us"),
        "backup",
        &format!(
            "migrated guest resumed with QMP cont (vm_start took {:.3} ms)",
            us(&st, "took_us") as f64 / 1e3
        ),
    );
    let c = d.event(Who::Source, "handoff-complete")?;
    d.line(
        us(&c, "at_unix_us"),
        "source",
        "the backup reports its copy runs: handoff complete, exiting",
    );

    // The consoles: the source's is final (its QEMU never runs the guest again), the backup's
    // grows from where it stopped.
    let src_status = src.status()?;
    let src_last = *src
        .ticks()
        .last()
        .ok_or("the source's console holds no guest line")?;
    d.line(
        now_us(),
        "source",
        &format!("guest on source: {src_last} (its last line; QEMU now {src_status})"),
    );
    let resumed = dst.wait_ticks(RESUMED_TICKS, SLOW_STEP, "after the handoff")?;
    let first = resumed[0];
    let later = resumed[resumed.len() - 1];
    let continues = first.counter > src_last.counter
        && first.counter <= src_last.counter + 10
        && first.uptime > src_last.uptime
        && !resumed.iter().any(|t| t.counter == 1);
    d.line(
        now_us(),
        "backup",
        &format!(
            "guest on backup: {first} — {} (then {later})",
            if continues {
                "continues, no reboot"
            } else {
                "does NOT continue the source's lines"
            }
        ),
    );
    if src_status != "postmigrate" {
        return Err(format!(
            "the source QEMU is {src_status}, not postmigrate: the guest may run twice"
        ));
    }
    if !continues {
        return Err(format!(
            "the guest on the backup starts at {first}, the source's ended at {src_last}: \
             not a continuation of the same boot"
        ));
    }
    // SAFETY: kill(2) on our own child (it has exited or is about to, having done its part).
    unsafe { libc::kill(bak_pid, libc::SIGTERM) };
    Ok(format!(
        "live handoff verified. The Linux guest migrated to the backup's QEMU and carries on \
         there ({src_last} on the source, {first} on the backup, the same boot); the source \
         QEMU is {src_status}."
    ))
}

/// SIGTERM: the backup stands down; its QEMU never receives a migration nor runs anything.
fn stop(d: &Demo, src: &mut Qemu, dst: &mut Qemu) -> Result<String, String> {
    d.expect_stand_down()?;
    // Once the backup has exited, nothing can make its QEMU run: what it shows now is final.
    let status = dst.status()?;
    let lines = dst.ticks().len();
    let src_status = src.status()?;
    d.line(
        now_us(),
        "backup",
        &format!(
            "backup exited; its QEMU: status {status}, {lines} guest lines on its console \
             (the source's QEMU: {src_status})"
        ),
    );
    if status != "inmigrate" || lines != 0 {
        return Err(format!(
            "after an orderly stop the backup's QEMU is {status} with {lines} guest lines: it \
             should still wait (inmigrate) and never have printed"
        ));
    }
    Ok(format!(
        "orderly stop. The backup stood down and exited; its QEMU still waits for a migration \
         (inmigrate) and never ran the guest. The source's QEMU is {src_status}: an orderly stop \
         of vmm-takeover leaves the guest alone."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_last_line_is_not_a_tick() {
        let t = ticks("\x1b[0mcounter 1 uptime 0.51\r\ncounter 2 uptime 0.6\r\ncounter 3 upt");
        assert_eq!(
            t,
            vec![
                Tick {
                    counter: 1,
                    uptime: 0.51
                },
                Tick {
                    counter: 2,
                    uptime: 0.6
                }
            ]
        );
        // The rest of a line cut at the source, then whole lines.
        let t = ticks("ime 0.71\ncounter 4 uptime 0.81\n");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].counter, 4);
        assert!(ticks("").is_empty());
    }
}
