// SPDX-License-Identifier: Apache-2.0
//! Operations: what a running process tells its supervisor (systemd), its monitoring
//! (Prometheus) and its operator (`status`).
//!
//! One arrow in: every lifecycle event passes through [`observe`] (called by
//! [`crate::events::emit`], on the loop), which keeps [`Ops`] up to date with atomics only. The
//! heartbeat counters come from the core's [`LinkCounters`]. Everything that talks to the
//! outside (the notify socket, the metrics listener, the control socket) runs on its own thread
//! and reads these; none of it can hold up the loop.

pub mod control;
pub mod metrics;
pub mod notify;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};
use vmm_takeover_core::hook::TakeoverReason;
use vmm_takeover_core::{ArbiterSession, LinkCounters};

/// Where a process is, as `status`, `STATUS=` and the `link_state` metric name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Set up, loop not yet running.
    Starting = 0,
    /// Source: listening, no backup armed: the guest is not protected.
    Unprotected,
    /// Source: at least one backup armed.
    Protected,
    /// Source: SIGUSR1 taken, handoff under way.
    HandingOff,
    /// Source: STAND_DOWN sent, waiting for the backups to close.
    Stopping,
    /// Backup: dialling or redialling the source.
    Connecting,
    /// Backup: the link is armed (a loss is a verdict).
    Armed,
    /// Backup: the link was lost; the arbiter decides.
    Arbitrating,
    /// Backup: takeover decided, `vm_start` runs.
    TakingOver,
    /// Backup: the standby guest runs here.
    Running,
    /// Done: stood down, handed off, stopped.
    Done,
    /// Ended on a failure or uncertainty: fenced, rejected, hook failed, handoff uncertain.
    Failed,
}

impl LinkState {
    /// Every state, in order.
    pub const ALL: [LinkState; 12] = [
        LinkState::Starting,
        LinkState::Unprotected,
        LinkState::Protected,
        LinkState::HandingOff,
        LinkState::Stopping,
        LinkState::Connecting,
        LinkState::Armed,
        LinkState::Arbitrating,
        LinkState::TakingOver,
        LinkState::Running,
        LinkState::Done,
        LinkState::Failed,
    ];

    /// The name in `status` and in the metric's `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Starting => "starting",
            LinkState::Unprotected => "unprotected",
            LinkState::Protected => "protected",
            LinkState::HandingOff => "handing-off",
            LinkState::Stopping => "stopping",
            LinkState::Connecting => "connecting",
            LinkState::Armed => "armed",
            LinkState::Arbitrating => "arbitrating",
            LinkState::TakingOver => "taking-over",
            LinkState::Running => "running",
            LinkState::Done => "done",
            LinkState::Failed => "failed",
        }
    }

    /// The states a role can be in (the metric lists these).
    pub fn of_role(role: &str) -> &'static [LinkState] {
        use LinkState::*;
        if role == "source" {
            &[
                Starting,
                Unprotected,
                Protected,
                HandingOff,
                Stopping,
                Done,
                Failed,
            ]
        } else {
            &[
                Starting,
                Connecting,
                Armed,
                Arbitrating,
                TakingOver,
                Running,
                Done,
                Failed,
            ]
        }
    }

    fn from_u8(v: u8) -> LinkState {
        LinkState::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(LinkState::Failed)
    }
}

/// An optional number kept in an atomic (`u64::MAX` = none).
#[derive(Debug)]
pub struct Maybe(AtomicU64);

impl Default for Maybe {
    fn default() -> Self {
        Maybe(AtomicU64::new(u64::MAX))
    }
}

impl Maybe {
    fn set(&self, v: u64) {
        self.0.store(v.min(u64::MAX - 1), Relaxed);
    }

    /// The value, if one was set.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Relaxed)).filter(|&v| v != u64::MAX)
    }
}

/// What the process is and has done, for status and metrics (see the module docs).
#[derive(Debug)]
pub struct Ops {
    /// `source` (true) or `backup`; a backup promoted to source (`--then-listen`) changes it
    /// once.
    source: AtomicBool,
    /// The pair id.
    pub pair_id: String,
    /// When the process started.
    pub started: Instant,
    state: AtomicU8,
    /// When the state last changed, µs since the Unix epoch.
    pub state_since_unix_us: AtomicU64,
    /// Source: backups armed now.
    pub backups: AtomicU64,
    /// Links armed (source: backups joined) since start.
    pub links_armed: AtomicU64,
    /// Backup: when the current link armed, µs since the Unix epoch.
    pub armed_since_unix_us: Maybe,
    /// Takeovers per [`TakeoverReason::ALL`] index.
    pub takeovers: [AtomicU64; 7],
    /// The last takeover: from the source's last sign of life (last heartbeat, or arming) to the
    /// verdict, µs.
    pub last_detection_us: Maybe,
    /// The last `vm_start`, µs.
    pub last_vm_start_us: Maybe,
    /// The arbiter's fencing epoch held (source) or won (backup).
    pub epoch: Maybe,
    /// Event lines dropped because stdout was not read (counted by [`crate::output`]).
    pub events_dropped: AtomicU64,
    /// The local guest, from the `guest` events.
    pub guest_running: AtomicBool,
    /// Its counter.
    pub guest_counter: Maybe,
    /// Its kind, once reported.
    pub guest_kind: OnceLock<String>,
    /// The core's counters, once the subscriber exists.
    counters: OnceLock<Arc<LinkCounters>>,
    /// A backup promoted to source: its listener's counters, which replace the backup's.
    promoted_counters: OnceLock<Arc<LinkCounters>>,
    /// When a backup that took over was promoted to source, µs since the Unix epoch.
    pub promoted_at_unix_us: Maybe,
    /// The arbiter session, with `--arbiter`.
    pub session: OnceLock<ArbiterSession>,
    ready_sent: AtomicBool,
    /// Replication, once a stream was ever set up (see [`Replica`]).
    pub replica: Replica,
}

/// Replication as `status` and the metrics show it, from the replica events (a backup reports
/// its first and then every 10th applied checkpoint).
#[derive(Default, Debug)]
pub struct Replica {
    /// A stream was ever set up (or listened for): the rest means something.
    pub seen: AtomicBool,
    /// A stream is up.
    pub connected: AtomicBool,
    /// Source: checkpoints the backup acknowledged.
    pub checkpoints: AtomicU64,
    /// Source: bytes of acknowledged checkpoints.
    pub bytes: AtomicU64,
    /// Source: the last acknowledged checkpoint (backup: the last reported applied one).
    pub last_seq: Maybe,
    /// Source: how long the last checkpoint held the guest, µs.
    pub last_pause_us: Maybe,
    /// Source: the output released (backup: the last reported applied checkpoint's mark).
    pub mark: Maybe,
    /// Checkpoints dropped whole because they never completed.
    pub discarded: AtomicU64,
}

static OPS: OnceLock<Ops> = OnceLock::new();

/// Sets up the process's [`Ops`] (once, with the event context).
pub fn init(role: &'static str, pair_id: &str) {
    let _ = OPS.set(Ops {
        source: AtomicBool::new(role == "source"),
        pair_id: pair_id.to_string(),
        started: Instant::now(),
        state: AtomicU8::new(LinkState::Starting as u8),
        state_since_unix_us: AtomicU64::new(now_us()),
        backups: AtomicU64::new(0),
        links_armed: AtomicU64::new(0),
        armed_since_unix_us: Maybe::default(),
        takeovers: Default::default(),
        last_detection_us: Maybe::default(),
        last_vm_start_us: Maybe::default(),
        epoch: Maybe::default(),
        events_dropped: AtomicU64::new(0),
        guest_running: AtomicBool::new(false),
        guest_counter: Maybe::default(),
        guest_kind: OnceLock::new(),
        counters: OnceLock::new(),
        promoted_counters: OnceLock::new(),
        promoted_at_unix_us: Maybe::default(),
        session: OnceLock::new(),
        ready_sent: AtomicBool::new(false),
        replica: Replica::default(),
    });
}

/// A backup that took over becomes a source (`--then-listen`): from now on `status` and the
/// metrics show a source (role, state, its listener's `counters` instead of the backup's). The
/// per-link figures start again from zero (the metrics' `role` label changes too, so these are
/// new series); the takeover history (takeovers, detection, `vm_start` time, epoch) stays.
pub fn promote(counters: Arc<LinkCounters>) {
    let Some(o) = OPS.get() else {
        return;
    };
    let _ = o.promoted_counters.set(counters);
    o.backups.store(0, Relaxed);
    o.links_armed.store(0, Relaxed);
    o.armed_since_unix_us.0.store(u64::MAX, Relaxed);
    o.promoted_at_unix_us.set(now_us());
    o.source.store(true, Relaxed);
    o.set_state(LinkState::Starting);
}

/// The process's [`Ops`], once [`init`] ran (not for `keygen`, `demo`).
pub fn get() -> Option<&'static Ops> {
    OPS.get()
}

fn now_us() -> u64 {
    crate::events::unix_us(std::time::SystemTime::now())
}

impl Ops {
    /// `source` or `backup`.
    pub fn role(&self) -> &'static str {
        if self.source.load(Relaxed) {
            "source"
        } else {
            "backup"
        }
    }

    /// The core's counters of the link this process serves now (a promoted backup's: its
    /// listener's).
    pub fn counters(&self) -> Option<&Arc<LinkCounters>> {
        self.promoted_counters.get().or(self.counters.get())
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Relaxed))
    }

    fn set_state(&self, s: LinkState) {
        self.change_state(s);
    }

    /// Moves to `s` and tells systemd; false when it was there already (nothing sent).
    fn change_state(&self, s: LinkState) -> bool {
        let changed = self.state.swap(s as u8, Relaxed) != s as u8;
        if changed {
            self.state_since_unix_us.store(now_us(), Relaxed);
            notify::status(&self.status_line());
        }
        changed
    }

    /// One line for systemd's `STATUS=`: the state and what it means.
    pub fn status_line(&self) -> String {
        let s = self.state();
        match (self.role(), s) {
            ("source", LinkState::Unprotected) => {
                "unprotected: listening, no backup armed".to_string()
            }
            ("source", LinkState::Protected) => {
                format!("protected: {} backup(s) armed", self.backups.load(Relaxed))
            }
            _ => s.as_str().to_string(),
        }
    }

    /// Lease time left, with an arbiter (`None`: no arbiter; `Some(0)`: lost).
    pub fn lease_left_ms(&self) -> Option<u64> {
        let s = self.session.get()?;
        Some(s.valid_until().map_or(0, |t| {
            t.saturating_duration_since(Instant::now()).as_millis() as u64
        }))
    }

    /// The state as `status` answers it.
    pub fn status_json(&self) -> Value {
        let c = self.counters();
        let role = self.role();
        let source = role == "source";
        let gaps = c.map(|c| c.gaps());
        let takeovers: serde_json::Map<String, Value> = TakeoverReason::ALL
            .iter()
            .zip(&self.takeovers)
            .filter(|(_, n)| n.load(Relaxed) > 0)
            .map(|(r, n)| (r.as_str().to_string(), Value::from(n.load(Relaxed))))
            .collect();
        json!({
            "role": role,
            "pair_id": self.pair_id,
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": vmm_takeover_core::auth::VERSION,
            "at_unix_us": now_us(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "state": self.state().as_str(),
            "state_since_unix_us": self.state_since_unix_us.load(Relaxed),
            "backups": source.then(|| self.backups.load(Relaxed)),
            "links_armed": self.links_armed.load(Relaxed),
            "armed_since_unix_us": self.armed_since_unix_us.get(),
            "last_heartbeat_unix_us": c.map(|c| c.last_heartbeat_unix_us()).filter(|&t| t > 0),
            "heartbeats_sent": c.filter(|_| source).map(|c| c.heartbeats_sent()),
            "heartbeats_received": c.filter(|_| !source).map(|c| c.heartbeats_received()),
            "heartbeat_gap_max_ratio": gaps.filter(|_| !source).map(|g| g.max),
            "takeovers": takeovers,
            "lease": self.session.get().map(|s| json!({
                "arbiter": s.describe(),
                "holder": s.holder(),
                "epoch": self.epoch.get(),
                "ttl_ms": s.ttl().as_millis() as u64,
                "left_ms": self.lease_left_ms(),
            })),
            "guest": self.guest_kind.get().map(|k| json!({
                "kind": k,
                "running": self.guest_running.load(Relaxed),
                "counter": self.guest_counter.get(),
            })),
            "events_dropped": self.events_dropped.load(Relaxed),
            "promoted_at_unix_us": self.promoted_at_unix_us.get(),
            "replica": self.replica.seen.load(Relaxed).then(|| {
                let r = &self.replica;
                json!({
                    "connected": r.connected.load(Relaxed),
                    "last_seq": r.last_seq.get(),
                    // Source: the output released; backup: what a takeover resumes from.
                    "mark": r.mark.get(),
                    "checkpoints": source.then(|| r.checkpoints.load(Relaxed)),
                    "bytes": source.then(|| r.bytes.load(Relaxed)),
                    "last_pause_us": r.last_pause_us.get().filter(|_| source),
                    "discarded": r.discarded.load(Relaxed),
                })
            }),
        })
    }

    fn ready(&self) {
        if !self.ready_sent.swap(true, Relaxed) {
            notify::ready(&self.status_line());
        }
    }
}

/// Every lifecycle event passes here before it is printed (on the loop, or on the thread that
/// reports a hook's end): only atomics are touched.
pub fn observe(name: &str, f: &Value) {
    let Some(o) = OPS.get() else {
        return;
    };
    let u = |k: &str| f.get(k).and_then(Value::as_u64);
    use LinkState::*;
    match name {
        // Source.
        "listening" => {
            o.set_state(if o.backups.load(Relaxed) > 0 {
                Protected
            } else {
                Unprotected
            });
            o.ready();
        }
        "owner" | "promoted" => {
            if let Some(e) = u("epoch") {
                o.epoch.set(e);
            }
        }
        "backup-joined" => {
            o.links_armed.fetch_add(1, Relaxed);
            o.backups.fetch_add(1, Relaxed);
            // Protected already: the count in the status line changed.
            if (o.state() == Unprotected || o.state() == Protected) && !o.change_state(Protected) {
                notify::status(&o.status_line());
            }
        }
        "backup-lost" | "backup-evicted" => {
            let _ = o
                .backups
                .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
            if o.state() == Protected && o.backups.load(Relaxed) == 0 {
                o.set_state(Unprotected);
            } else {
                notify::status(&o.status_line());
            }
        }
        "handoff-requested" => o.set_state(HandingOff),
        // Not resumed: the guest runs nowhere (or its image is elsewhere): an operator decides.
        "handoff-failed" if f.get("resumed").and_then(Value::as_bool) == Some(false) => {
            o.set_state(Failed);
        }
        "handoff-failed" => o.set_state(if o.backups.load(Relaxed) > 0 {
            Protected
        } else {
            Unprotected
        }),
        "stand-down-sent" => o.set_state(Stopping),
        "handoff-complete" | "stood-down" => o.set_state(Done),
        "handoff-uncertain" | "vmm-exited" => o.set_state(Failed),
        "fenced" => {
            if let Some(r) = f.get("guest_running").and_then(Value::as_bool) {
                o.guest_running.store(r, Relaxed);
            }
            o.set_state(Failed);
        }
        "handoff-paused" => o.guest_running.store(false, Relaxed),
        // Backup.
        "connecting" => o.set_state(Connecting),
        "retrying" | "link-untrusted" if o.state() != Arbitrating => o.set_state(Connecting),
        "armed" => {
            o.links_armed.fetch_add(1, Relaxed);
            o.armed_since_unix_us.set(
                f.get("at_unix_us")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(now_us),
            );
            o.set_state(Armed);
            o.ready();
        }
        "link-lost" => {
            o.armed_since_unix_us.0.store(u64::MAX, Relaxed);
            if o.session.get().is_some() {
                o.set_state(Arbitrating);
            }
        }
        "arbitration-won" => {
            if let Some(e) = u("epoch") {
                o.epoch.set(e);
            }
        }
        "takeover" => {
            let reason = f.get("reason").and_then(Value::as_str).unwrap_or("");
            if let Some(i) = TakeoverReason::ALL
                .iter()
                .position(|r| r.as_str() == reason)
            {
                o.takeovers[i].fetch_add(1, Relaxed);
            }
            if let Some(e) = u("epoch") {
                o.epoch.set(e);
            }
            // From the last sign of the source to the verdict.
            if let Some(at) = u("detected_at_unix_us") {
                let last = o
                    .counters()
                    .map(|c| c.last_heartbeat_unix_us())
                    .filter(|&t| t > 0)
                    .into_iter()
                    .chain(u("armed_at_unix_us"))
                    .max();
                if let Some(last) = last {
                    o.last_detection_us.set(at.saturating_sub(last));
                }
            }
            o.set_state(TakingOver);
        }
        "vm-started" => {
            if let Some(t) = u("took_us") {
                o.last_vm_start_us.set(t);
            }
            // A local guest runs from now on (its next `guest` report may be 500 ms away).
            if o.guest_kind.get().is_some() {
                o.guest_running.store(true, Relaxed);
            }
            if let Some(c) = u("guest_counter") {
                o.guest_counter.set(c);
            }
            o.set_state(Running);
        }
        "vm-start-failed"
        | "migration-incomplete"
        | "hook-timeout"
        | "rejected"
        | "arbitration-lost" => {
            if let Some(t) = u("took_us") {
                o.last_vm_start_us.set(t);
            }
            o.set_state(Failed);
        }
        "stand-down" => o.set_state(Done),
        "stopped" if o.state() != Running => o.set_state(Done),
        // Replication (both).
        "replica-listening" => o.replica.seen.store(true, Relaxed),
        "replica-connected" => {
            o.replica.seen.store(true, Relaxed);
            o.replica.connected.store(true, Relaxed);
        }
        "replica-lost" | "replica-failed" => o.replica.connected.store(false, Relaxed),
        "checkpoint" => {
            let r = &o.replica;
            r.checkpoints.fetch_add(1, Relaxed);
            r.bytes.fetch_add(u("bytes").unwrap_or(0), Relaxed);
            if let (Some(seq), Some(mark)) = (u("seq"), u("released")) {
                r.last_seq.set(seq);
                r.mark.set(mark);
            }
            if let Some(p) = u("pause_us") {
                r.last_pause_us.set(p);
            }
        }
        "checkpoint-applied" => {
            if let (Some(seq), Some(mark)) = (u("seq"), u("mark")) {
                o.replica.last_seq.set(seq);
                o.replica.mark.set(mark);
            }
        }
        "checkpoint-discarded" => {
            o.replica.discarded.fetch_add(1, Relaxed);
        }
        // Both.
        "guest" => {
            if let Some(k) = f.get("kind").and_then(Value::as_str) {
                let _ = o.guest_kind.set(k.to_string());
            }
            o.guest_running.store(
                f.get("running").and_then(Value::as_bool).unwrap_or(false),
                Relaxed,
            );
            if let Some(c) = u("counter") {
                o.guest_counter.set(c);
            }
        }
        _ => {}
    }
}

/// The accept loop of the metrics and control threads: each connection of `incoming` is served
/// on a thread of its own, at most `max` at once, so that a stuck client holds only its own
/// connection (for its socket timeouts); past `max`, `busy` answers it at once. An accept error
/// (out of descriptors) pauses 100 ms rather than spin.
pub(crate) fn serve_bounded<S, I>(
    name: &'static str,
    incoming: I,
    max: usize,
    busy: impl Fn(S),
    serve: impl Fn(S) -> std::io::Result<()> + Clone + Send + 'static,
) where
    S: Send + 'static,
    I: Iterator<Item = std::io::Result<S>>,
{
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in incoming {
        match conn {
            Ok(c) => {
                if active.fetch_add(1, Relaxed) >= max {
                    active.fetch_sub(1, Relaxed);
                    busy(c);
                    continue;
                }
                let (done, serve) = (active.clone(), serve.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("{name}-conn"))
                    .spawn(move || {
                        if let Err(e) = serve(c) {
                            log::debug!("{name}: {e}");
                        }
                        done.fetch_sub(1, Relaxed);
                    });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Relaxed);
                    log::debug!("{name}: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                log::debug!("{name} accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// What [`setup`] started: the loop's subscribers to add, and the control socket to remove at
/// exit.
pub struct Started {
    /// Subscribers for the loop: the watchdog (under systemd) and the control responder.
    pub subscribers: Vec<crate::Subscriber>,
    /// The control socket, removed when dropped.
    pub control: Option<control::Socket>,
}

/// Starts what `--metrics`/`--control` and systemd ask for, once the subscriber exists (its
/// counters are read by the metrics) and before the first `listening`/`armed`.
pub fn setup(
    a: &crate::cli::OpsArgs,
    counters: Arc<LinkCounters>,
    session: Option<&ArbiterSession>,
) -> Result<Started, crate::Failure> {
    use std::cell::RefCell;
    use std::rc::Rc;
    let o = get().ok_or_else(|| crate::Failure::runtime("internal: ops used before init"))?;
    let _ = o.counters.set(counters);
    if let Some(s) = session {
        let _ = o.session.set(s.clone());
    }
    let mut subscribers: Vec<crate::Subscriber> = Vec::new();
    if let Some(w) = notify::Watchdog::from_env() {
        subscribers.push(Rc::new(RefCell::new(w)));
    }
    if let Some(addr) = a.metrics {
        let local = metrics::start(addr, o).map_err(|e| {
            crate::Failure::runtime(format!("--metrics {addr}: cannot listen: {e}"))
        })?;
        crate::events::emit("metrics", json!({"addr": local.to_string()}));
    }
    let control = match &a.control {
        None => None,
        Some(path) => {
            let (responder, tx) = control::Responder::new(o)
                .map_err(|e| crate::Failure::runtime(format!("control mailbox: {e}")))?;
            let socket =
                control::start(path, tx).map_err(|e| crate::Failure::runtime(e.to_string()))?;
            subscribers.push(Rc::new(RefCell::new(responder)));
            crate::events::emit("control", json!({"path": path.display().to_string()}));
            Some(socket)
        }
    };
    Ok(Started {
        subscribers,
        control,
    })
}
