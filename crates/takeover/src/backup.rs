// SPDX-License-Identifier: Apache-2.0
//! The backup side: an event-manager subscriber that connects to the source, arms the link, and
//! calls the `VmStart` hook at most once when the state machine ([`crate::link::backup`]) says so.
//!
//! This file does I/O only: it turns readiness, timers and messages into inputs of
//! [`link::backup::step`](crate::link::backup::step) and carries out the actions it returns.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use socket2::{Domain, Protocol, Socket, Type};
use vmm_keepalive::{EffectiveKeepalive, KeepaliveSpec, SystemDefaults, UserTimeout};
use vmm_sys_util::epoll::EventSet;

use crate::arbiter::{Acquire, ArbiterError};
use crate::auth::{
    BackupHandshake, Credentials, HandshakeFailure, LinkId, OsEntropy, Reader, Session,
};
use crate::counters::LinkCounters;
use crate::hook::{AbortHandle, TakeoverReason, TakeoverRecord, VmStart};
use crate::link::backup::{self as machine, Action, Input, Link, Outcome, Phase, Policy, State};
use crate::link::SocketFailure;
use crate::mailbox::{offload, Done, Mailbox, Sender};
use crate::protocol::{
    validate_node, validate_pair_id, Frame, HandoffStatus, ProtocolError, MAX_HEARTBEAT,
    MIN_HEARTBEAT,
};
use crate::session::{ArbiterSession, SessionEvent};
use crate::timer::Timer;
use crate::Error;

const TOKEN_SOCK: u32 = 0;
const TOKEN_TIMER: u32 = 1;
const TOKEN_MAILBOX: u32 = 2;

/// Configuration of a [`BackupMonitor`].
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The source's heartbeat address.
    pub connect: SocketAddr,
    /// The VM pair this backup stands in for.
    pub pair_id: String,
    /// This backup's name in the arbiter (sent in HELLO so a handoff can pass the pair to it);
    /// empty without an arbiter.
    pub node: String,
    /// Keepalive applied to the socket before connect. Its `TCP_USER_TIMEOUT` policy is not
    /// applied: see [`BackupConfig::link_keepalive`].
    pub keepalive: KeepaliveSpec,
    /// How long the handshake (connect + HELLO → WELCOME) may take.
    pub handshake_timeout: Duration,
    /// First retry delay; doubles per failed attempt.
    pub backoff_min: Duration,
    /// Cap on the retry delay.
    pub backoff_max: Duration,
    /// Heartbeat mode: take over after this many intervals without a HEARTBEAT.
    pub heartbeat_misses: u32,
    /// Smallest heartbeat interval this backup accepts in a WELCOME.
    pub heartbeat_min: Duration,
    /// Largest heartbeat interval this backup accepts in a WELCOME.
    pub heartbeat_max: Duration,
    /// The heartbeat deadline is never shorter than this, whatever the source announces: below a
    /// few scheduler ticks a busy host would take over on a hiccup.
    pub min_deadline: Duration,
    /// Enforce the keepalive bound with a precise timer of our own as well (takes over as
    /// `timed-out` once no data or ACK arrived for the bound the kernel applies). The kernel's
    /// keepalive timers run on jiffies and their lateness adds up over `cnt + 1` hops: up to
    /// ~200 ms past the bound at HZ=250. The watchdog checks the kernel's own `TCP_INFO`
    /// timestamps, so it never fires while probes are being answered.
    pub keepalive_watchdog: bool,
    /// `vm_start` must return within this time; after it the takeover is reported as timed out
    /// (whether the guest runs is unknown) and the hook is aborted through its handle.
    pub hook_timeout: Duration,
    /// After a stop during `vm_start`, how long to wait for the aborted hook to end.
    pub stop_timeout: Duration,
    /// Retry a REJECT that cannot heal by itself (wrong pair id, protocol version) instead of
    /// ending with [`BackupNotice::Rejected`].
    pub retry_rejected: bool,
    /// `SO_RCVBUF` of the link's socket; `None` leaves the kernel's autotuning.
    pub recv_buffer: Option<usize>,
    /// The key this backup proves it holds (`--psk-file`), or [`Credentials::Insecure`]
    /// (`--insecure-no-auth`, the library's default: say so loudly where it is chosen).
    pub credentials: Credentials,
}

impl BackupConfig {
    /// Defaults for everything but the address and pair id.
    pub fn new(connect: SocketAddr, pair_id: impl Into<String>) -> Self {
        BackupConfig {
            connect,
            pair_id: pair_id.into(),
            node: String::new(),
            keepalive: KeepaliveSpec::DEFAULT,
            handshake_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            heartbeat_misses: 3,
            heartbeat_min: MIN_HEARTBEAT,
            heartbeat_max: MAX_HEARTBEAT,
            min_deadline: Duration::from_millis(20),
            keepalive_watchdog: true,
            hook_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(3),
            retry_rejected: false,
            recv_buffer: None,
            credentials: Credentials::Insecure,
        }
    }

    /// Checks every value, including the keepalive spec against the kernel's limits (by applying
    /// it to a scratch socket), so a bad value fails at start and never as an endless retry.
    pub fn validate(&self) -> Result<(), Error> {
        validate_pair_id(&self.pair_id).map_err(Error::Config)?;
        if !self.node.is_empty() {
            validate_node(&self.node).map_err(Error::Config)?;
        }
        if self.heartbeat_misses == 0 {
            return Err(Error::Config(
                "heartbeat misses must be at least 1".to_string(),
            ));
        }
        for (what, d) in [
            ("handshake timeout", self.handshake_timeout),
            ("backoff", self.backoff_min),
            ("hook timeout", self.hook_timeout),
            ("stop timeout", self.stop_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{what} must be above zero")));
            }
        }
        if self.backoff_max < self.backoff_min {
            return Err(Error::Config(format!(
                "backoff cap {:?} is below the first backoff {:?}",
                self.backoff_max, self.backoff_min
            )));
        }
        crate::check_keepalive(&self.link_keepalive(), self.connect)
    }

    /// The keepalive the link's socket gets: the spec without `TCP_USER_TIMEOUT`. Measured on
    /// Linux 6.1: a backup whose own loop stalls with a full receive buffer has its connection
    /// aborted by its own kernel (`ETIMEDOUT`) once the user timeout passes, whatever the source
    /// does: a live source would be taken over. Without it the kernel's keepalive still bounds
    /// the detection of a dead source by `idle + intvl × cnt`, and the backup sends nothing that
    /// could sit unacknowledged on an armed link, which is what the user timeout is for.
    ///
    /// With the precise watchdog the kernel's probe count is also raised to its maximum: the
    /// watchdog enforces the configured bound from `TCP_INFO`, and only after reading what
    /// arrived, while the kernel would count unanswered probes even while this backup's own loop
    /// stalls with a full receive buffer (measured: it then drops the source's answers and
    /// aborts the link).
    pub fn link_keepalive(&self) -> KeepaliveSpec {
        let spec = self.keepalive.with_user_timeout(UserTimeout::Off);
        if self.keepalive_watchdog && spec.enabled {
            KeepaliveSpec {
                count: Some(KeepaliveSpec::MAX_COUNT),
                ..spec
            }
        } else {
            spec
        }
    }
}

/// What the backup reports to its owner. Always called on the event loop.
#[derive(Debug)]
pub enum BackupNotice<'a> {
    /// The first connect attempt started.
    Connecting {
        /// Source address.
        addr: SocketAddr,
    },
    /// An attempt failed; the next starts after `delay`. Rate-limited: the first few failures,
    /// then at most one report per [`RETRY_REPORT_EVERY`], with the count of those not reported.
    Retrying {
        /// What went wrong.
        why: String,
        /// Backoff before the next attempt.
        delay: Duration,
        /// Attempts since the link was last armed (or since start).
        attempt: u64,
        /// Failures not reported since the last report.
        suppressed: u64,
    },
    /// The link armed: from now on its loss is a verdict.
    Armed {
        /// The source's address.
        peer: SocketAddr,
        /// Keepalive values read back from the socket.
        keepalive: Option<EffectiveKeepalive>,
        /// Heartbeat interval announced by the source.
        heartbeat: Option<Duration>,
        /// The heartbeat deadline (`interval × misses`, at least the local floor).
        deadline: Option<Duration>,
        /// Names this link on both ends: a stream attached to it (replication) is bound to it,
        /// and the takeover it may cause carries it ([`TakeoverRecord::link`]).
        link: Option<LinkId>,
    },
    /// The armed link failed (or carried HANDOFF): without an arbiter, the takeover follows at
    /// once; with one, the arbiter decides.
    LinkLost {
        /// Why.
        reason: TakeoverReason,
        /// What exactly was seen.
        detail: &'a str,
    },
    /// The armed link carried something that cannot be trusted (a frame that fails
    /// authentication, a replay, a gap in the sequence numbers, garbage): it is dropped and
    /// dialled again. Never a verdict on the source: at most it delays protection.
    LinkUntrusted {
        /// What was wrong.
        why: &'a str,
    },
    /// With an arbiter: the pair is not granted yet. Rate-limited (at most one a second).
    ArbitrationWait {
        /// Who holds the pair, when the arbiter answered.
        holder: Option<&'a str>,
        /// Time left on the holder's lease, when known.
        ttl_left: Option<Duration>,
        /// Why this backup waits.
        why: &'a str,
    },
    /// With an arbiter: the pair is granted to this backup; the takeover follows.
    ArbitrationWon {
        /// The fencing epoch of the new ownership.
        epoch: u64,
        /// From the link's verdict to the grant.
        waited: Duration,
    },
    /// With an arbiter: someone other than the watched source won the pair (another backup).
    /// This backup ends and starts nothing, ever: the winner's guest may outlive its lease.
    ArbitrationLost {
        /// The winner and its epoch.
        winner: &'a str,
    },
    /// Takeover decided; `vm_start` is being called off the loop.
    Takeover(&'a TakeoverRecord),
    /// `vm_start` returned.
    HookFinished {
        /// `Err` carries the hook's error text.
        result: Result<(), String>,
        /// How long `vm_start` took.
        took: Duration,
    },
    /// `vm_start` did not return within [`BackupConfig::hook_timeout`]; it was aborted. Whether
    /// the guest runs is unknown.
    HookTimedOut {
        /// The deadline that passed.
        after: Duration,
    },
    /// The source stood down in order: nothing runs.
    StandDown,
    /// The source refused this backup for good.
    Rejected {
        /// The source's reason.
        reason: String,
    },
    /// The owner stopped the backup ([`BackupHandle::stop`]).
    Stopped {
        /// Whether a running `vm_start` had to be aborted (its outcome is unknown).
        aborted_hook: bool,
        /// Whether the link was armed when the stop came.
        was_armed: bool,
        /// What the heartbeats looked like on the last armed link.
        heartbeats: HeartbeatStats,
        /// The heartbeat deadline that was in force, in heartbeat mode.
        deadline: Option<Duration>,
    },
}

/// How often, at most, a run of failed connect attempts is reported.
pub const RETRY_REPORT_EVERY: Duration = Duration::from_secs(10);

/// What the backup saw of the source's heartbeats since the link armed: how close the link came
/// to a (false) takeover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatStats {
    /// HEARTBEAT frames received.
    pub received: u64,
    /// Longest gap between two heartbeats (or between arming and the first one).
    pub max_gap: Duration,
}

impl HeartbeatStats {
    fn record(&mut self, gap: Duration) {
        self.received += 1;
        self.max_gap = self.max_gap.max(gap);
    }
}

/// Receives [`BackupNotice`]s on the event loop. Must not block.
pub type BackupObserver = Box<dyn FnMut(&BackupNotice<'_>) + Send>;

/// Messages from other threads to the monitor's loop.
enum Msg {
    /// `vm_start` returned.
    Hook(Done<Result<(), String>>),
    /// The owner stops the backup.
    Stop,
    /// The arbiter answered an acquire of generation `.0`.
    Acquired(u64, Result<Acquire, ArbiterError>),
    /// The arbiter session renewed (or failed to).
    Session(SessionEvent),
}

/// How long after its own last sign of the source a backup that won the pair still waits, on top
/// of the source's announced failsafe grace: the delayed ACK that is the source's last sign of
/// this backup (≤ 200 ms), one-way delay, the pause, and clock-rate differences.
pub const FAILSAFE_MARGIN: Duration = Duration::from_millis(500);

/// How often a waiting backup asks the arbiter again, at most.
const ARBITER_PACE: Duration = Duration::from_millis(100);

struct Arbitration {
    session: ArbiterSession,
    /// Bumped when the link heals: answers to older requests no longer decide anything, except a
    /// grant, which is given back.
    generation: u64,
    /// The epoch of the ownership granted to this backup.
    epoch: Option<u64>,
    /// The source's name in the arbiter (from WELCOME) and its failsafe grace.
    source_node: String,
    grace: Duration,
    verdict_at: Option<Instant>,
    /// What the link's verdict saw (the takeover's detail, once granted).
    verdict_detail: String,
    /// When to ask again after a wait.
    retry_at: Option<Instant>,
    last_report: Option<Instant>,
    /// Whether this backup's session renews (told to the source: its failsafe needs every backup
    /// unable to reach the arbiter too).
    reachable: bool,
    /// The source asked for a fresh check: report the next renewal's outcome, changed or not.
    check_asked: bool,
}

/// Calls into a [`BackupMonitor`] from any thread; they are carried out on its loop.
#[derive(Clone)]
pub struct BackupHandle(Sender<Msg>);

impl BackupHandle {
    /// Stops the backup: the link closes and nothing more starts. A `vm_start` under way is
    /// aborted (its abort handle) and the stop waits at most [`BackupConfig::stop_timeout`] for
    /// it. Ends with [`BackupNotice::Stopped`] (or the hook's own result, if it won the race).
    /// `false` when the monitor is gone.
    pub fn stop(&self) -> bool {
        self.0.send(Msg::Stop)
    }
}

/// The backup's event-manager subscriber.
pub struct BackupMonitor {
    cfg: BackupConfig,
    policy: Policy,
    state: State,
    sock: Option<Socket>,
    reader: Reader,
    /// The handshake under way (HELLO sent, WELCOME awaited).
    handshake: Option<BackupHandshake>,
    /// Seals and opens the armed link's frames.
    session: Option<Session>,
    /// The last armed link's id: what a takeover reports in its record.
    link: Option<LinkId>,
    entropy: OsEntropy,
    /// A link armed at least once: an unauthenticated refusal after that is never permanent.
    ever_armed: bool,
    /// One timer; its meaning follows the state (see `docs/state-machines.md`): backoff,
    /// handshake deadline, heartbeat deadline and keepalive watchdog, hook deadline, stop deadline.
    timer: Timer,
    mailbox: Mailbox<Msg>,
    hook: Option<Box<dyn VmStart>>,
    abort: Option<AbortHandle>,
    hook_result: Option<Done<Result<(), String>>>,
    observer: BackupObserver,
    attempt: u64,
    backoff: Duration,
    retries: RetryReports,
    armed_at: Option<SystemTime>,
    keepalive: Option<EffectiveKeepalive>,
    heartbeat: Option<Duration>,
    last_rx: Instant,
    /// When the last link socket was closed: the source hears nothing of us after that (ACKs of
    /// its frames, our ARBITER_STATUS), so the failsafe wait counts from the later of the two.
    link_closed_at: Instant,
    /// The current socket sent HELLO.
    hello_sent: bool,
    /// The keepalive bound the watchdog enforces, while armed.
    watchdog: Option<Duration>,
    stats: HeartbeatStats,
    counters: Arc<LinkCounters>,
    record: Option<TakeoverRecord>,
    last_errno: Option<i32>,
    /// Whether the link was armed before the input being handled (for the stop report).
    was_armed: bool,
    /// The errno of the armed link's loss, if it was one.
    loss_errno: Option<i32>,
    arbiter: Option<Arbitration>,
    /// When the armed link's timer is due: a loss found well after it means this backup's own
    /// loop was stalled (see [`STALL_TOLERANCE`]).
    next_due: Option<Instant>,
    /// When this backup's loop was last found stalled: losses soon after are verified too (the
    /// link is still recovering from the stall: retransmissions, a reset from either kernel).
    stalled_at: Option<Instant>,
}

/// How late past its due time the armed link's timer may fire before a loss found then counts
/// as found after a stall of this backup's own loop (and is verified before it is a verdict).
pub const STALL_TOLERANCE: Duration = Duration::from_millis(250);

/// How long after a stall of this backup's loop a loss is still verified first: long enough for
/// the link to recover from what the stall did to it (retransmissions, a reset).
pub const STALL_RECOVERY: Duration = Duration::from_secs(3);

/// Rate limit for reports of failed attempts.
#[derive(Debug, Default)]
struct RetryReports {
    last: Option<Instant>,
    suppressed: u64,
}

impl BackupMonitor {
    /// Creates the monitor; it starts connecting when registered with an `EventManager`.
    pub fn new(
        cfg: BackupConfig,
        hook: Box<dyn VmStart>,
        observer: BackupObserver,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        let entropy = OsEntropy::new().map_err(Error::Resource)?;
        if !cfg.credentials.is_keyed() {
            warn!(
                "pair {}: the heartbeat link is NOT authenticated (no key): anyone on the path \
                 can speak for the source",
                cfg.pair_id
            );
        }
        Ok(BackupMonitor {
            handshake: None,
            session: None,
            link: None,
            entropy,
            ever_armed: false,
            backoff: cfg.backoff_min,
            policy: Policy::default(),
            cfg,
            state: State::INITIAL,
            sock: None,
            reader: Reader::new(),
            timer: Timer::new().map_err(Error::Resource)?,
            mailbox: Mailbox::new().map_err(Error::Resource)?,
            hook: Some(hook),
            abort: None,
            hook_result: None,
            observer,
            attempt: 0,
            retries: RetryReports::default(),
            armed_at: None,
            keepalive: None,
            heartbeat: None,
            last_rx: Instant::now(),
            link_closed_at: Instant::now(),
            hello_sent: false,
            watchdog: None,
            stats: HeartbeatStats::default(),
            counters: Arc::default(),
            record: None,
            last_errno: None,
            was_armed: false,
            loss_errno: None,
            arbiter: None,
            next_due: None,
            stalled_at: None,
        })
    }

    /// Puts the takeover under `session`'s arbiter: a verdict of the link only asks for the
    /// pair, and the guest starts once it is granted (and, if the source announced a failsafe
    /// grace, not before this backup's last sign of the source plus the grace and
    /// [`FAILSAFE_MARGIN`]). The backup's name in the arbiter goes to the source in HELLO, so a
    /// handoff can pass the pair to it. Call before the monitor is added to a loop.
    pub fn set_arbiter(&mut self, session: ArbiterSession) {
        self.policy.arbitrated = true;
        self.cfg.node = session.holder().to_string();
        self.arbiter = Some(Arbitration {
            session: session.clone(),
            generation: 0,
            epoch: None,
            source_node: String::new(),
            grace: Duration::ZERO,
            verdict_at: None,
            verdict_detail: String::new(),
            retry_at: None,
            last_report: None,
            reachable: session.valid_until().is_some(),
            check_asked: false,
        });
        let tx = self.mailbox.sender();
        if let Some(a) = self.arbiter.as_ref() {
            a.session.subscribe(move |ev| {
                tx.send(Msg::Session(ev.clone()));
            });
        }
    }

    /// A handle for calls from other threads (stop).
    pub fn handle(&self) -> BackupHandle {
        BackupHandle(self.mailbox.sender())
    }

    /// Where the backup is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The counters for metrics (heartbeats received, the gap histogram): lock-free, readable
    /// from any thread.
    pub fn counters(&self) -> Arc<LinkCounters> {
        self.counters.clone()
    }

    /// What the heartbeats looked like on the current (or last) armed link.
    pub fn heartbeat_stats(&self) -> HeartbeatStats {
        self.stats
    }

    /// The heartbeat deadline in force (`interval × misses`, at least the local floor), in
    /// heartbeat mode.
    pub fn deadline(&self) -> Option<Duration> {
        self.heartbeat
            .map(|hb| (hb * self.cfg.heartbeat_misses).max(self.cfg.min_deadline))
    }

    /// The takeover record, once the backup took over.
    pub fn record(&self) -> Option<&TakeoverRecord> {
        self.record.as_ref()
    }

    /// Feeds one input through the state machine and carries out its actions, in order.
    fn feed(&mut self, ops: &mut EventOps, input: Input, detail: &str) {
        let before = self.state;
        self.was_armed = before.armed();
        // The errno of the armed link's loss goes with the takeover, however long the verdict
        // takes to become a start (a verification, an arbiter's grant).
        if before.armed() {
            match input {
                Input::Failed(_) | Input::LossAfterStall(_) => self.loss_errno = self.last_errno,
                Input::PeerClosed | Input::HeartbeatDeadline => self.loss_errno = None,
                _ => {}
            }
        }
        let (next, actions) = machine::step(before, input, self.policy);
        if next != before {
            debug!("backup {before:?} + {input:?} -> {next:?} ({detail})");
        }
        if before.link == Link::Up && input == Input::ProtocolError {
            warn!("dropping the link to {}: {detail}", self.cfg.connect);
            (self.observer)(&BackupNotice::LinkUntrusted { why: detail });
        }
        self.state = next;
        for a in actions.iter() {
            self.act(ops, a, detail);
        }
        self.arm_timer();
    }

    fn act(&mut self, ops: &mut EventOps, a: Action, detail: &str) {
        match a {
            Action::Connect => self.connect(ops),
            Action::Redial => self.redial(ops, detail),
            Action::Arm => self.arm(),
            Action::DropLink => self.drop_socket(ops, true),
            Action::Verdict(reason) => {
                if let Some(a) = self.arbiter.as_mut() {
                    a.verdict_at = Some(Instant::now());
                    a.verdict_detail = detail.to_string();
                }
                warn!("link to {} lost: {reason} ({detail})", self.cfg.connect);
                (self.observer)(&BackupNotice::LinkLost { reason, detail });
            }
            Action::Arbitrate => self.arbitrate(),
            Action::CancelArbitration => {
                if let Some(a) = self.arbiter.as_mut() {
                    a.generation += 1;
                    a.retry_at = None;
                    a.verdict_at = None;
                }
            }
            Action::ReleasePair => self.release_pair(),
            Action::StartGuest(reason) => {
                let errno = if reason == TakeoverReason::Handoff {
                    None
                } else {
                    self.loss_errno
                };
                self.take_over(reason, errno, detail);
            }
            Action::AbortHook => {
                if let Some(abort) = &self.abort {
                    warn!("aborting vm_start");
                    abort();
                }
            }
            Action::Finish(outcome) => self.finish(ops, outcome, detail),
        }
    }

    /// The session renewed or not: tell the source when that changed, or when it asked.
    fn on_session(&mut self, ev: SessionEvent) {
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let reachable = matches!(
            ev,
            SessionEvent::Renewed { .. } | SessionEvent::Reopened { .. }
        );
        let changed = reachable != a.reachable;
        let asked = std::mem::take(&mut a.check_asked);
        a.reachable = reachable;
        if changed || asked {
            self.send_arbiter_status();
        }
    }

    fn send_arbiter_status(&mut self) {
        if let (Some(a), true) = (self.arbiter.as_ref(), self.state.link == Link::Up) {
            self.send(&Frame::ArbiterStatus {
                reachable: a.reachable,
            });
        }
    }

    /// The source cannot renew its lease: check ours now; the outcome goes back to it.
    fn on_arbiter_check(&mut self) {
        if let Some(a) = self.arbiter.as_mut() {
            a.check_asked = true;
            a.session.renew_now();
        }
    }

    /// Asks the arbiter for the pair (paced after a wait).
    fn arbitrate(&mut self) {
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let at = a.retry_at.take().unwrap_or_else(Instant::now);
        let tx = self.mailbox.sender();
        let generation = a.generation;
        a.session.acquire(&self.cfg.pair_id, at, move |r| {
            tx.send(Msg::Acquired(generation, r));
        });
    }

    fn release_pair(&mut self) {
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let Some(epoch) = a.epoch.take() else {
            return;
        };
        let pair = self.cfg.pair_id.clone();
        info!("giving pair {pair} back (epoch {epoch})");
        let p = pair.clone();
        a.session.release(&pair, epoch, move |r| {
            let pair = p;
            if let Err(e) = r {
                warn!("release of pair {pair} (epoch {epoch}): {e}");
            }
        });
    }

    fn on_acquired(
        &mut self,
        ops: &mut EventOps,
        generation: u64,
        r: Result<Acquire, ArbiterError>,
    ) {
        let reason = match self.state.phase {
            Phase::Arbitrating(r) => Some(r),
            _ => None,
        };
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let now = Instant::now();
        let current = generation == a.generation && reason.is_some();
        match r {
            Ok(Acquire::Won { epoch }) => {
                a.epoch = Some(epoch);
                if !current {
                    // Granted after the link healed (or after the end): give it back.
                    return self.feed(ops, Input::ArbiterWon, "late grant");
                }
                // The source may run on for its failsafe grace after it last heard from us,
                // which is no later than our link socket's close (a reset: nothing follows).
                let until = self.last_rx.max(self.link_closed_at) + a.grace + FAILSAFE_MARGIN;
                if reason != Some(TakeoverReason::Handoff)
                    && a.grace > Duration::ZERO
                    && now < until
                {
                    a.retry_at = Some(until);
                    let why = "the pair is granted; waiting out the source's failsafe grace";
                    self.report_wait(None, None, why, true);
                    return self.arbitrate();
                }
                let waited = a.verdict_at.map_or(Duration::ZERO, |t| now - t);
                info!("pair granted (epoch {epoch}) after {waited:?}");
                (self.observer)(&BackupNotice::ArbitrationWon { epoch, waited });
                self.feed(ops, Input::ArbiterWon, "granted by the arbiter");
            }
            _ if !current => {}
            Ok(Acquire::Held { owner, ttl_left }) => {
                let pace = ttl_left.map_or(ARBITER_PACE, |t| {
                    t.clamp(Duration::from_millis(20), ARBITER_PACE)
                });
                a.retry_at = Some(now + pace);
                if owner.holder != a.source_node {
                    // Another backup (or a new source) won. Giving up for good is what keeps a
                    // second copy from ever starting here, even once the winner's lease ends
                    // while its guest still runs.
                    let winner = owner.to_string();
                    warn!("{winner} won the pair: this backup gives up, starting nothing");
                    return self.feed(ops, Input::ArbiterLost, &winner);
                }
                self.report_wait(
                    Some(&owner.holder),
                    ttl_left,
                    "the source still holds the pair",
                    false,
                );
                self.feed(ops, Input::ArbiterWait, "pair held");
            }
            Ok(Acquire::HandoverPending { to }) => {
                // Handed to another backup: it will take the pair.
                let winner = format!("{to} (handover)");
                warn!("the pair is handed over to {to}: this backup gives up");
                self.feed(ops, Input::ArbiterLost, &winner);
            }
            Err(e) => {
                a.retry_at = Some(now + ARBITER_PACE);
                let why = format!("the arbiter could not be asked: {e}");
                self.report_wait(None, None, &why, false);
                self.feed(ops, Input::ArbiterWait, "arbiter unavailable");
            }
        }
    }

    /// `arbitration-wait`, at most once a second (or when `force`).
    fn report_wait(
        &mut self,
        holder: Option<&str>,
        ttl_left: Option<Duration>,
        why: &str,
        force: bool,
    ) {
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let now = Instant::now();
        if !force
            && a.last_report
                .is_some_and(|t| now - t < Duration::from_secs(1))
        {
            return;
        }
        a.last_report = Some(now);
        (self.observer)(&BackupNotice::ArbitrationWait {
            holder,
            ttl_left,
            why,
        });
    }

    /// The timer follows the state: one meaning at a time.
    fn arm_timer(&mut self) {
        let after = match (self.state.phase, self.state.link) {
            (Phase::Done(_), _) => None,
            (Phase::Starting(_), _) => self.remaining(self.cfg.hook_timeout),
            (Phase::Aborting, _) => self.remaining(self.cfg.stop_timeout),
            // The backoff and handshake deadlines were armed by the action that set them.
            (_, Link::Down | Link::Connecting | Link::Handshaking) => return,
            (Phase::Watching, Link::Up) => return,
            (_, Link::Up) => None,
        };
        match after {
            Some(d) => {
                let _ = self.timer.arm(d, None);
            }
            None => {
                let _ = self.timer.disarm();
            }
        }
    }

    /// Time left of `limit` since the hook started (the hook deadline and the stop deadline both
    /// count from there: a stop never extends a takeover).
    fn remaining(&self, limit: Duration) -> Option<Duration> {
        let started = self.record.as_ref()?.detected_instant;
        Some(limit.saturating_sub(started.elapsed()))
    }

    fn connect(&mut self, ops: &mut EventOps) {
        self.attempt += 1;
        if self.attempt == 1 {
            (self.observer)(&BackupNotice::Connecting {
                addr: self.cfg.connect,
            });
        }
        match self.try_connect() {
            Ok(sock) => {
                if let Err(e) = ops.add(Events::with_data(
                    &sock,
                    TOKEN_SOCK,
                    EventSet::OUT | EventSet::IN | EventSet::READ_HANG_UP,
                )) {
                    error!("cannot register the heartbeat socket: {e:?}");
                }
                self.sock = Some(sock);
                // The handshake deadline covers connect + HELLO → WELCOME.
                let _ = self.timer.arm(self.cfg.handshake_timeout, None);
            }
            Err(e) => {
                let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                self.feed(ops, Input::Failed(f), &format!("connect: {e}"));
            }
        }
    }

    fn try_connect(&self) -> io::Result<Socket> {
        let sock = Socket::new(
            Domain::for_address(self.cfg.connect),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        // Keepalive goes on before connect so that the very first idle period already counts.
        crate::tune_socket(&sock, &self.cfg.link_keepalive())?;
        if let Some(n) = self.cfg.recv_buffer {
            sock.set_recv_buffer_size(n)?;
        }
        match sock.connect(&self.cfg.connect.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(sock)
    }

    /// Closes the link, if any. `abort`: with a reset (no FIN, nothing of ours retransmitted
    /// later), so that the source's last news of us is no later than now; the failsafe wait after
    /// a grant counts from here (see `on_acquired`).
    fn drop_socket(&mut self, ops: &mut EventOps, abort: bool) {
        if let Some(sock) = self.sock.take() {
            if abort {
                let _ = sock.set_linger(Some(Duration::ZERO));
            }
            // Only a socket that said HELLO can have joined at the source.
            if std::mem::take(&mut self.hello_sent) {
                self.link_closed_at = Instant::now();
            }
            // Deregister before close so that a recycled fd number never meets a stale entry.
            let _ = ops.remove(Events::empty(&sock));
        }
        self.reader = Reader::new();
        self.handshake = None;
        self.session = None;
    }

    fn redial(&mut self, ops: &mut EventOps, why: &str) {
        self.drop_socket(ops, true);
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
        let now = Instant::now();
        let report = self.attempt <= 3
            || self
                .retries
                .last
                .is_none_or(|t| now.duration_since(t) >= RETRY_REPORT_EVERY);
        if report {
            let suppressed = std::mem::take(&mut self.retries.suppressed);
            self.retries.last = Some(now);
            info!(
                "link to {}: {why}; next attempt in {delay:?}",
                self.cfg.connect
            );
            (self.observer)(&BackupNotice::Retrying {
                why: why.to_string(),
                delay,
                attempt: self.attempt,
                suppressed,
            });
        } else {
            self.retries.suppressed += 1;
            debug!(
                "link to {}: {why}; next attempt in {delay:?}",
                self.cfg.connect
            );
        }
        let _ = self.timer.arm(delay, None);
    }

    fn arm(&mut self) {
        self.backoff = self.cfg.backoff_min;
        self.attempt = 0;
        self.retries = RetryReports::default();
        self.armed_at = Some(SystemTime::now());
        self.ever_armed = true;
        // What the kernel applies, with the count the watchdog enforces (the kernel's own is
        // raised out of the way: see `BackupConfig::link_keepalive`).
        let configured = self
            .cfg
            .keepalive
            .with_user_timeout(UserTimeout::Off)
            .resolve(&SystemDefaults::read_or_linux());
        self.keepalive = match self.sock.as_ref().map(EffectiveKeepalive::read_from) {
            Some(Ok(k)) if self.cfg.keepalive_watchdog => Some(EffectiveKeepalive {
                count: configured.count,
                ..k
            }),
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                warn!("cannot read keepalive back: {e}");
                None
            }
            None => None,
        };
        self.watchdog = self
            .keepalive
            .and_then(|k| k.bound())
            .filter(|_| self.cfg.keepalive_watchdog);
        self.stats = HeartbeatStats::default();
        self.counters.armed();
        self.last_rx = Instant::now();
        let deadline = self.deadline();
        if deadline.is_some() || self.watchdog.is_some() {
            self.arm_check(self.next_check());
        } else {
            self.next_due = None;
            let _ = self.timer.disarm();
        }
        self.send_arbiter_status();
        let peer = self.cfg.connect;
        info!("link to {peer} armed (pair {})", self.cfg.pair_id);
        self.link = self.session.as_ref().map(Session::link_id);
        (self.observer)(&BackupNotice::Armed {
            peer,
            keepalive: self.keepalive,
            heartbeat: self.heartbeat,
            deadline,
            link: self.link,
        });
    }

    fn take_over(&mut self, reason: TakeoverReason, errno: Option<i32>, detail: &str) {
        let detected_instant = Instant::now();
        let detected_at = SystemTime::now();
        let record = TakeoverRecord {
            reason,
            pair_id: self.cfg.pair_id.clone(),
            armed_at: self.armed_at.unwrap_or(detected_at),
            detected_at,
            detected_instant,
            keepalive: self.keepalive,
            heartbeat: self.heartbeat,
            errno,
            epoch: self.arbiter.as_ref().and_then(|a| a.epoch),
            link: self.link,
            // With an arbiter the start follows the grant; what the link saw is the detail.
            detail: match self.arbiter.as_ref() {
                Some(a) if !a.verdict_detail.is_empty() => a.verdict_detail.clone(),
                _ => detail.to_string(),
            },
        };
        // The guest first: everything else (closing the link, logs, the owner's notice, which
        // may print) happens while vm_start already runs.
        let spawned = self.spawn_hook(&record);
        self.record = Some(record);
        warn!("taking over: {reason} ({detail})");
        if let Some(r) = self.record.as_ref() {
            (self.observer)(&BackupNotice::Takeover(r));
        }
        if let Err(e) = spawned {
            error!("{e}");
            // Reported like any failed start: the loop sees it as the hook's result.
            self.mailbox
                .sender()
                .send(Msg::Hook((Ok(Err(e)), Duration::ZERO)));
        }
    }

    /// Runs the hook on a thread of its own; its result comes back through the mailbox.
    fn spawn_hook(&mut self, record: &TakeoverRecord) -> Result<(), String> {
        // `take` makes the hook unreachable after its first use, whatever the state machine says.
        let Some(mut hook) = self.hook.take() else {
            return Err("vm_start already ran".to_string());
        };
        self.abort = hook.abort_handle();
        let rec = record.clone();
        offload(
            "vm-start",
            &self.mailbox.sender(),
            move || hook.vm_start(&rec).map_err(|e| e.to_string()),
            Msg::Hook,
        )
        .map_err(|e| format!("cannot spawn the vm_start thread: {e}"))
    }

    fn finish(&mut self, ops: &mut EventOps, outcome: Outcome, detail: &str) {
        // A handoff's link is still up: tell the source whether our copy runs, so that it knows
        // whether it may resume its own.
        let handoff = self
            .record
            .as_ref()
            .is_some_and(|r| r.reason == TakeoverReason::Handoff);
        if handoff && self.sock.is_some() {
            let status = match &self.hook_result {
                Some((Ok(Ok(())), _)) => HandoffStatus::Started,
                Some(_) => HandoffStatus::Failed,
                None => HandoffStatus::Uncertain,
            };
            let detail = match &self.hook_result {
                Some((Ok(Err(e)) | Err(e), _)) => e.clone(),
                Some(_) => String::new(),
                None => format!(
                    "vm_start did not return within {:?}; whether the copy runs is unknown",
                    self.cfg.hook_timeout
                ),
            };
            self.send(&Frame::HandoffResult { status, detail });
        }
        self.drop_socket(ops, false);
        let _ = self.timer.disarm();
        // Our copy does not run: the pair goes back, so that the source (after a failed handoff)
        // or another backup can take it. After a timeout it may run: the pair stays ours.
        if !matches!(outcome, Outcome::Started | Outcome::StartTimedOut) {
            self.release_pair();
        }
        let result = self.hook_result.clone();
        match outcome {
            Outcome::Started | Outcome::StartFailed => {
                if let Some((r, took)) = result {
                    let result = r.and_then(|x| x);
                    (self.observer)(&BackupNotice::HookFinished { result, took });
                }
            }
            Outcome::StartTimedOut => {
                error!(
                    "vm_start did not return within {:?}: aborted, the guest's state is unknown",
                    self.cfg.hook_timeout
                );
                (self.observer)(&BackupNotice::HookTimedOut {
                    after: self.cfg.hook_timeout,
                });
            }
            Outcome::StoodDown => {
                info!("source stood down in order: not taking over");
                (self.observer)(&BackupNotice::StandDown);
            }
            Outcome::Rejected => {
                error!("the source refused this backup for good: {detail}");
                (self.observer)(&BackupNotice::Rejected {
                    reason: detail.to_string(),
                });
            }
            Outcome::Lost => {
                (self.observer)(&BackupNotice::ArbitrationLost { winner: detail });
            }
            Outcome::Stopped => {
                let aborted_hook = self.record.is_some();
                let deadline = self.deadline();
                (self.observer)(&BackupNotice::Stopped {
                    aborted_hook,
                    was_armed: self.was_armed,
                    heartbeats: self.stats,
                    deadline,
                });
            }
        }
    }

    /// Writes one small sealed frame; the link is otherwise idle on this side, so it goes
    /// through whole or not at all.
    fn send(&mut self, frame: &Frame) {
        let (Some(sock), Some(session)) = (self.sock.as_ref(), self.session.as_mut()) else {
            return;
        };
        let bytes = session.seal(frame);
        match (&*sock).write(&bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => warn!("{frame}: short write {n} of {}", bytes.len()),
            Err(e) => warn!("{frame}: {e}"),
        }
    }

    fn on_socket(&mut self, ops: &mut EventOps, set: EventSet) {
        if self.sock.is_none() {
            return;
        }
        if self.state.link == Link::Connecting {
            if !set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                return;
            }
            let sock = self.sock.as_ref().expect("checked above");
            match sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                    return self.feed(ops, Input::Failed(f), &format!("connect: {e}"));
                }
            }
            let (handshake, hello) = BackupHandshake::start(
                &self.cfg.credentials,
                &self.cfg.pair_id,
                &self.cfg.node,
                &mut self.entropy,
            );
            self.handshake = Some(handshake);
            match (&*sock).write(&hello) {
                Ok(n) if n == hello.len() => self.hello_sent = true,
                Ok(n) => {
                    let why = format!("short HELLO write ({n} of {} bytes)", hello.len());
                    return self.feed(ops, Input::Failed(SocketFailure::Other), &why);
                }
                Err(e) => {
                    let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                    return self.feed(ops, Input::Failed(f), &format!("send HELLO: {e}"));
                }
            }
            // Connected: from now on only readability (data, EOF, error) matters.
            let _ = ops.modify(Events::with_data(
                sock,
                TOKEN_SOCK,
                EventSet::IN | EventSet::READ_HANG_UP,
            ));
            self.feed(ops, Input::Connected, "connected, HELLO sent");
            // WELCOME may already be queued; fall through to read it.
        }
        self.read_frames(ops);
    }

    /// Reads what is queued, feeding every frame to the state machine before EOF or an error, so
    /// a STAND_DOWN followed by the close is seen as a stand-down, not a crash.
    ///
    /// The socket is level-triggered: a short read means the queue is empty for now, and whatever
    /// arrives later (more frames, the EOF, an error) makes epoll report the fd again. Not reading
    /// on to EAGAIN saves one syscall per heartbeat, half the backup's cost at 1,000 links.
    fn read_frames(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        loop {
            let Some(sock) = self.sock.as_ref() else {
                return;
            };
            match (&*sock).read(&mut buf) {
                Ok(0) => {
                    let input = self.judge_loss(Input::PeerClosed);
                    return self.feed(ops, input, "EOF from source");
                }
                Ok(n) => {
                    self.reader.push(&buf[..n]);
                    let drained = n < buf.len();
                    loop {
                        if self.state.link == Link::Handshaking {
                            match self.reader.next_handshake() {
                                Ok(Some(bytes)) => {
                                    let (input, why) = self.on_welcome(&bytes);
                                    self.feed(ops, input, &why);
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    let (input, why) = self.decode_error_input(&e);
                                    return self.feed(ops, input, &why);
                                }
                            }
                            if self.sock.is_none() {
                                return;
                            }
                            continue;
                        }
                        let Some(session) = self.session.as_mut() else {
                            break;
                        };
                        match self.reader.next_frame(session) {
                            Ok(Some(Frame::ArbiterCheck)) if self.state.link == Link::Up => {
                                self.on_arbiter_check();
                            }
                            Ok(Some(f)) => {
                                let (input, why) = self.frame_input(f);
                                match why {
                                    // No allocation on the heartbeat path.
                                    None => self.feed(ops, input, "frame"),
                                    Some(why) => self.feed(ops, input, &why),
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let (input, why) = self.decode_error_input(&e);
                                return self.feed(ops, input, &why);
                            }
                        }
                        if self.sock.is_none() {
                            return;
                        }
                    }
                    if drained {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    self.last_errno = Some(errno);
                    let input = self.judge_loss(Input::Failed(SocketFailure::from_errno(errno)));
                    return self.feed(ops, input, &format!("{e} (errno {errno})"));
                }
            }
        }
    }

    /// The input a decoded frame is, with a detail for anything but the common case.
    fn frame_input(&mut self, f: Frame) -> (Input, Option<String>) {
        let bad = |e: ProtocolError| {
            error!("protocol error: {e}");
            (Input::ProtocolError, Some(e.to_string()))
        };
        match (self.state.link, f) {
            (
                Link::Handshaking,
                Frame::Welcome {
                    heartbeat,
                    node,
                    fence_grace,
                },
            ) => {
                // Arbitration guards a pair only when both sides use it.
                if self.policy.arbitrated == node.is_empty() {
                    let why = if node.is_empty() {
                        "the source has no arbiter, this backup has one: refusing to arm"
                    } else {
                        "the source uses an arbiter, this backup has none: refusing to arm"
                    };
                    error!("{why}");
                    let input = if self.cfg.retry_rejected {
                        Input::RejectedTransient
                    } else {
                        Input::RejectedPermanent
                    };
                    return (input, Some(why.to_string()));
                }
                if let Some(a) = self.arbiter.as_mut() {
                    a.source_node = node;
                    a.grace = fence_grace;
                }
                if let Some(hb) = heartbeat {
                    if hb < self.cfg.heartbeat_min || hb > self.cfg.heartbeat_max {
                        return bad(ProtocolError::BadPayload {
                            kind: crate::protocol::Kind::Welcome,
                            why: format!(
                                "source announced a heartbeat interval of {hb:?}; this backup \
                                 accepts {:?}..={:?}",
                                self.cfg.heartbeat_min, self.cfg.heartbeat_max
                            ),
                        });
                    }
                }
                self.heartbeat = heartbeat;
                (Input::Welcomed, Some("WELCOME".into()))
            }
            (Link::Handshaking, Frame::Reject { code, reason }) => {
                let why = format!("rejected by the source ({}): {reason}", code.as_str());
                warn!("{why}");
                if code == crate::protocol::RejectCode::Stopping {
                    (Input::SourceStopping, Some(why))
                } else if code.is_permanent() && !self.cfg.retry_rejected {
                    (Input::RejectedPermanent, Some(why))
                } else {
                    (Input::RejectedTransient, Some(why))
                }
            }
            (Link::Up, Frame::Heartbeat { seq }) if self.heartbeat.is_some() => {
                log::trace!("HEARTBEAT {seq}");
                let now = Instant::now();
                self.stats.record(now - self.last_rx);
                self.counters.received(now - self.last_rx, self.deadline());
                self.last_rx = now;
                (Input::Heartbeat, None)
            }
            (Link::Up, Frame::StandDown) => (Input::StandDown, Some("STAND_DOWN".into())),
            (Link::Up, Frame::Handoff) => (Input::Handoff, Some("HANDOFF from source".into())),
            (Link::Up, Frame::Evict { reason }) => {
                warn!("the source dropped this link: {reason}");
                (
                    Input::Evicted,
                    Some(format!("evicted by the source: {reason}")),
                )
            }
            (Link::Handshaking, f) => {
                bad(ProtocolError::Unexpected(f.name(), "during the handshake"))
            }
            (_, f) => bad(ProtocolError::Unexpected(f.name(), "on an armed link")),
        }
    }

    /// The source's answer to our HELLO: a WELCOME that verifies arms the link (after our AUTH
    /// went out); a REJECT counts as the source's word only if it is authenticated (or the link
    /// runs without keys), since anyone on the path could have sent it.
    fn on_welcome(&mut self, bytes: &[u8]) -> (Input, String) {
        let Some(handshake) = self.handshake.take() else {
            return (
                Input::ProtocolError,
                "handshake frame without a handshake".into(),
            );
        };
        match handshake.on_welcome(bytes) {
            Ok(w) => {
                let welcome = Frame::Welcome {
                    heartbeat: w.welcome.heartbeat,
                    node: w.welcome.node,
                    fence_grace: w.welcome.fence_grace,
                };
                let (input, why) = self.frame_input(welcome);
                let why = why.unwrap_or_default();
                if input != Input::Welcomed {
                    // Refused by us: close without the AUTH.
                    return (input, why);
                }
                let Some(sock) = self.sock.as_ref() else {
                    return (Input::Failed(SocketFailure::Other), "no socket".into());
                };
                match sock.send(&w.auth) {
                    Ok(n) if n == w.auth.len() => {}
                    Ok(n) => {
                        let why = format!("short AUTH write ({n} of {} bytes)", w.auth.len());
                        return (Input::Failed(SocketFailure::Other), why);
                    }
                    Err(e) => {
                        let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                        return (Input::Failed(f), format!("send AUTH: {e}"));
                    }
                }
                self.session = Some(w.session);
                (input, why)
            }
            Err(HandshakeFailure::Rejected {
                code,
                reason,
                authenticated,
            }) => {
                if authenticated || !self.cfg.credentials.is_keyed() {
                    let (input, why) = self.frame_input(Frame::Reject { code, reason });
                    return (input, why.unwrap_or_default());
                }
                // Anyone on the path could have sent it: never a missed STAND_DOWN, and final only
                // before this backup ever armed (a misconfiguration the operator must see, such
                // as a source without keys), never once it has.
                if code.is_permanent() && !self.ever_armed && !self.cfg.retry_rejected {
                    let why = format!(
                        "rejected by the source ({}, unauthenticated): {reason}",
                        code.as_str()
                    );
                    warn!("{why}");
                    return (Input::RejectedPermanent, why);
                }
                let why = format!(
                    "unauthenticated REJECT ({}: {reason}): taken as a transient refusal, since \
                     anyone on the path could have sent it",
                    code.as_str()
                );
                warn!("{why}");
                (Input::RejectedTransient, why)
            }
            Err(HandshakeFailure::Protocol(e)) => self.decode_error_input(&e),
        }
    }

    /// Bytes the decoder refused, or a handshake that cannot succeed. A source speaking another
    /// version, or holding another key (or none where we have one, or the reverse), is a
    /// permanent refusal before this backup ever armed (the operator must fix it); after that,
    /// when an attacker could be the cause, it is retried.
    fn decode_error_input(&self, e: &ProtocolError) -> (Input, String) {
        error!("protocol error from {}: {e}", self.cfg.connect);
        let handshaking = self.state.link == Link::Handshaking;
        let why = match e {
            ProtocolError::BadVersion(v) | ProtocolError::PeerVersion { got: v } if handshaking => {
                format!(
                    "the source speaks protocol version {v}, this backup {}",
                    crate::auth::VERSION
                )
            }
            ProtocolError::WelcomeNotAuthentic { .. } | ProtocolError::AuthMode(_)
                if handshaking =>
            {
                e.to_string()
            }
            _ => return (Input::ProtocolError, e.to_string()),
        };
        let permanent = !self.ever_armed && !self.cfg.retry_rejected;
        let input = if permanent {
            Input::RejectedPermanent
        } else {
            Input::RejectedTransient
        };
        (input, why)
    }

    fn on_timer(&mut self, ops: &mut EventOps) {
        if self.state.armed() {
            // No read(2) here: the deadline path either re-arms the timer (timerfd_settime clears
            // the expiration count) or ends the link. One syscall per deadline on a healthy link.
            return self.on_deadline(ops);
        }
        if self.timer.expirations() == 0 {
            return;
        }
        match (self.state.phase, self.state.link) {
            (Phase::Starting(_), _) => self.feed(ops, Input::HookTimeout, "hook deadline"),
            (Phase::Aborting, _) => self.feed(ops, Input::StopDeadline, "stop deadline"),
            (_, Link::Down) => self.feed(ops, Input::BackoffElapsed, "backoff elapsed"),
            (_, Link::Connecting | Link::Handshaking) => {
                let t = self.cfg.handshake_timeout;
                self.feed(
                    ops,
                    Input::HandshakeTimeout,
                    &format!("handshake not done within {t:?}"),
                );
            }
            _ => {}
        }
    }

    /// The armed link's one timer: the heartbeat deadline and the keepalive watchdog, whichever
    /// comes first.
    fn on_deadline(&mut self, ops: &mut EventOps) {
        self.note_stall(Instant::now());
        if self.deadline().is_none() && self.watchdog.is_none() {
            // Nothing should be armed; clear a stale expiration.
            self.timer.expirations();
            return;
        }
        // Frames only stamp `last_rx`; the timer is re-armed here, lazily, so a healthy link
        // costs one timer syscall per deadline rather than one per heartbeat.
        if self.overdue().is_some() {
            // The timer and a frame (or an EOF, or an error) can be ready in the same epoll
            // batch, the timer first: drain the socket before judging, so a late loop neither
            // takes over on a heartbeat that already arrived nor hides the kernel's own verdict.
            self.read_frames(ops);
            if !self.state.armed() {
                return;
            }
        }
        match self.overdue() {
            Some((input, detail)) => {
                if input == Input::Failed(SocketFailure::TimedOut) {
                    self.last_errno = Some(libc::ETIMEDOUT);
                }
                let input = self.judge_loss(input);
                self.feed(ops, input, &detail);
            }
            None => {
                let next = self.next_check();
                self.arm_check(next);
            }
        }
    }

    /// Arms the armed link's timer and remembers when it is due.
    fn arm_check(&mut self, after: Duration) {
        self.next_due = Instant::now().checked_add(after);
        let _ = self.timer.arm(after, None);
    }

    /// An EOF or errno on the armed link found long after the link's timer was due was found
    /// after a stall of this loop: it is verified before it counts.
    fn judge_loss(&mut self, input: Input) -> Input {
        if !self.state.armed() {
            return input;
        }
        let Some(reason) = machine::verdict_reason(input) else {
            return input;
        };
        if reason == TakeoverReason::Handoff {
            return input;
        }
        let now = Instant::now();
        self.note_stall(now);
        let window = STALL_RECOVERY + self.deadline().unwrap_or_default();
        match self.stalled_at {
            Some(t) if now.saturating_duration_since(t) < window => {
                warn!("link loss ({reason}) soon after this backup's own loop stalled: verifying");
                Input::LossAfterStall(reason)
            }
            _ => input,
        }
    }

    /// Notes a stall of this loop: the armed link's timer is well past due.
    fn note_stall(&mut self, now: Instant) {
        if let Some(due) = self.next_due {
            if now > due + STALL_TOLERANCE {
                warn!(
                    "this backup's loop was stalled ({:?} past a timer)",
                    now - due
                );
                self.stalled_at = Some(now);
            }
        }
    }

    /// Time without a sign of life from the source: our own stamp, refined by the kernel's
    /// (`TCP_INFO`: last data or ACK received, which keepalive probe answers update) only when
    /// our stamp alone would say "overdue". Keeps the `getsockopt` off the healthy path.
    fn silence(&self, limit: Duration) -> Duration {
        let ours = self.last_rx.elapsed();
        if ours < limit {
            return ours;
        }
        match self.sock.as_ref().map(tcp_silence) {
            Some(Ok(kernel)) => ours.min(kernel),
            _ => ours,
        }
    }

    /// The verdict-worthy input if a deadline has passed.
    fn overdue(&self) -> Option<(Input, String)> {
        if let Some(d) = self.deadline() {
            let since = self.last_rx.elapsed();
            if since >= d {
                return Some((
                    Input::HeartbeatDeadline,
                    format!("no HEARTBEAT for {since:?} (deadline {d:?})"),
                ));
            }
        }
        if let Some(b) = self.watchdog {
            let quiet = self.silence(b);
            if quiet >= b {
                return Some((
                    Input::Failed(SocketFailure::TimedOut),
                    format!(
                        "no data or ACK from the source for {quiet:?}: keepalive bound {b:?} \
                         passed (precise watchdog)"
                    ),
                ));
            }
        }
        None
    }

    /// When to look again: the nearest deadline.
    fn next_check(&self) -> Duration {
        let mut next = Duration::MAX;
        if let Some(d) = self.deadline() {
            next = next.min(d.saturating_sub(self.last_rx.elapsed()));
        }
        if let Some(b) = self.watchdog {
            next = next.min(b.saturating_sub(self.silence(b)));
        }
        next
    }

    fn on_mailbox(&mut self, ops: &mut EventOps) {
        for msg in self.mailbox.drain() {
            match msg {
                Msg::Hook(done) => {
                    let (r, took) = &done;
                    let input = match r {
                        Ok(Ok(())) => Input::HookOk,
                        Ok(Err(e)) | Err(e) => {
                            error!("vm_start failed after {took:?}: {e}");
                            Input::HookFailed
                        }
                    };
                    if input == Input::HookOk {
                        info!("vm_start done in {took:?}");
                    }
                    self.hook_result = Some(done);
                    self.feed(ops, input, "vm_start returned");
                }
                Msg::Stop => self.feed(ops, Input::Stop, "stopped by the owner"),
                Msg::Acquired(generation, r) => self.on_acquired(ops, generation, r),
                Msg::Session(ev) => self.on_session(ev),
            }
        }
    }
}

/// How long the kernel has heard nothing on `sock`: the lesser of `TCP_INFO`'s time since the last
/// data and since the last ACK received — the same quantity the kernel's keepalive timer uses.
fn tcp_silence(sock: &Socket) -> io::Result<Duration> {
    let info = crate::tcp_info(sock)?;
    let ms = info.tcpi_last_data_recv.min(info.tcpi_last_ack_recv);
    Ok(Duration::from_millis(u64::from(ms)))
}

impl MutEventSubscriber for BackupMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.timer.as_raw_fd(), TOKEN_TIMER),
            (self.mailbox.as_raw_fd(), TOKEN_MAILBOX),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                error!("cannot register backup fd {fd}: {e:?}");
            }
        }
        self.feed(ops, Input::BackoffElapsed, "start");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOCK => self.on_socket(ops, events.event_set()),
            TOKEN_TIMER => self.on_timer(ops),
            TOKEN_MAILBOX => self.on_mailbox(ops),
            t => warn!("backup: event for unknown token {t}"),
        }
    }
}
