// SPDX-License-Identifier: Apache-2.0
//! The source side: an event-manager subscriber that owns the heartbeat listen socket, accepts and
//! handshakes backups, sends heartbeats, and carries out the orderly stop and the planned handoff
//! that the state machines of [`crate::link::source`] decide.
//!
//! Two promises shape this file:
//! - **A live source never looks dead to an armed backup.** It never closes a joined backup's
//!   connection without telling it first (STAND_DOWN, HANDOFF, EVICT), every frame it writes
//!   arrives whole (a short write is finished later, never cut), heartbeats to a backup that stops
//!   reading are skipped rather than queued (so there is always room for the final frame), and while
//!   a backup does not read, the connection's `TCP_USER_TIMEOUT` is lifted so the kernel does not
//!   abort it (since Linux 5.x the user timeout also ends zero-window probing of a live peer).
//! - **The loop never spins or blocks.** Out of descriptors, it sheds connections and pauses
//!   accepting instead of spinning on a readable listener; hooks run off the loop with deadlines.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use socket2::{Domain, Protocol, Socket, Type};
use vmm_keepalive::{EffectiveKeepalive, KeepaliveSpec};
use vmm_sys_util::epoll::EventSet;

use crate::arbiter::{Acquire, ArbiterError};
use crate::auth::{
    self, AwaitingAuth, Credentials, LinkId, OsEntropy, Reader, Session, SourceHandshake,
    WelcomeInfo,
};
use crate::counters::{Closed, LinkCounters, RejectKind};
use crate::hook::{AbortHandle, VmPause};
use crate::link::source::{
    self as machine, Action, Conn as ConnState, ConnAction, ConnInput, HandoffStatus, Input,
    Policy, Refusal, State,
};
use crate::mailbox::{offload, Done, Mailbox, Sender};
use crate::protocol::{
    self, validate_node, validate_pair_id, Frame, ProtocolError, RejectCode, MAX_HEARTBEAT,
    MIN_HEARTBEAT,
};
use crate::session::{ArbiterSession, SessionEvent};
use crate::timer::Timer;
use crate::Error;

const TOKEN_LISTEN: u32 = 0;
const TOKEN_HEARTBEAT: u32 = 1;
const TOKEN_SWEEP: u32 = 2;
const TOKEN_MAILBOX: u32 = 3;
const TOKEN_JOB: u32 = 4;
const TOKEN_ACCEPT: u32 = 5;
const TOKEN_FENCE: u32 = 6;
/// Connection `i` uses token `TOKEN_CONN_BASE + i`.
const TOKEN_CONN_BASE: u32 = 16;

/// How long accepting pauses after `accept` failed for lack of resources (EMFILE and friends).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Reports of rejected connections per second, at most.
pub const REJECT_REPORTS_PER_SECOND: u32 = 10;

/// Failed handshakes from one address within a second after which its new connections are
/// closed at once, for the rest of that second. A real backup never fails its handshake; a
/// flood of garbage from one host then costs an accept and a close per connection.
pub const PENALTY_FAILURES: u32 = 16;

/// At most [`REJECT_REPORTS_PER_SECOND`] reports a second; the others are counted and the count
/// goes with the next report.
#[derive(Debug, Default)]
struct RateLimit {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed so far)` when this one may be reported.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window < REJECT_REPORTS_PER_SECOND {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// How often (in heartbeats) a backup's unsent bytes are looked at while it reads.
const UNSENT_CHECK_EVERY: u64 = 8;

/// Connections accepted per readiness of the listener, at most.
const ACCEPT_BATCH: usize = 32;

/// How often, at most, a run of accept failures is reported.
const ACCEPT_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Configuration of a [`SourceListener`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Address to listen on (port 0 picks a free one; see [`SourceListener::local_addr`]).
    pub listen: SocketAddr,
    /// The VM pair this source serves; backups with another id are refused.
    pub pair_id: String,
    /// This source's name in the arbiter (announced in WELCOME); empty without an arbiter.
    pub node: String,
    /// Keepalive applied to every accepted backup connection.
    pub keepalive: KeepaliveSpec,
    /// A backup that has not completed its handshake (HELLO, then AUTH) within this time is dropped;
    /// a backup told to go (STAND_DOWN, EVICT) that has not closed its side within it is closed.
    pub handshake_timeout: Duration,
    /// Send HEARTBEAT frames from the event loop at this interval (`None`: keepalive only).
    pub heartbeat: Option<Duration>,
    /// Most backups served at once; more are refused (REJECT busy).
    pub max_backups: usize,
    /// Most connections still in their handshake; beyond it the oldest is refused. Idle or
    /// garbage connections cannot crowd out a real backup, whose HELLO comes at once.
    pub max_pending: usize,
    /// Most connections in their handshake from one remote address; more from it are refused
    /// at once (REJECT busy), so one flooding host cannot hold the pending slots.
    pub max_pending_per_addr: usize,
    /// How backups prove they hold the key (`--psk-file`), or [`Credentials::Insecure`]
    /// (`--insecure-no-auth`, the library's default: say so loudly where it is chosen).
    pub credentials: Credentials,
    /// A backup whose connection holds more than this many unsent bytes is not reading: its
    /// heartbeats are skipped (never queued), so a final frame always fits.
    pub slow_unsent: usize,
    /// The pause hook must return within this time, and so must the resume hook.
    pub pause_timeout: Duration,
    /// After HANDOFF, the chosen backup must report its `vm_start` within this time; after it the
    /// handoff is uncertain and the guest stays paused. Longer than the backups' hook timeout.
    pub handoff_timeout: Duration,
    /// After STAND_DOWN, how long to wait for backups to close their side before reporting the
    /// stop as done.
    pub drain_timeout: Duration,
}

impl SourceConfig {
    /// Defaults for everything but the address and pair id.
    pub fn new(listen: SocketAddr, pair_id: impl Into<String>) -> Self {
        SourceConfig {
            listen,
            pair_id: pair_id.into(),
            node: String::new(),
            keepalive: KeepaliveSpec::DEFAULT,
            handshake_timeout: Duration::from_secs(2),
            heartbeat: None,
            max_backups: 4096,
            max_pending: 64,
            max_pending_per_addr: 8,
            credentials: Credentials::Insecure,
            slow_unsent: 512,
            pause_timeout: Duration::from_secs(30),
            handoff_timeout: Duration::from_secs(90),
            drain_timeout: Duration::from_secs(2),
        }
    }

    /// Checks every value, including the keepalive spec against the kernel's limits.
    pub fn validate(&self) -> Result<(), Error> {
        validate_pair_id(&self.pair_id).map_err(Error::Config)?;
        if !self.node.is_empty() {
            validate_node(&self.node).map_err(Error::Config)?;
        }
        if let Some(hb) = self.heartbeat {
            if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&hb) {
                return Err(Error::Config(format!(
                    "heartbeat interval must be {MIN_HEARTBEAT:?}..={MAX_HEARTBEAT:?}, got {hb:?}"
                )));
            }
        }
        for (what, d) in [
            ("handshake timeout", self.handshake_timeout),
            ("pause timeout", self.pause_timeout),
            ("handoff timeout", self.handoff_timeout),
            ("drain timeout", self.drain_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{what} must be above zero")));
            }
        }
        if self.max_backups == 0 || self.max_pending == 0 || self.max_pending_per_addr == 0 {
            return Err(Error::Config(
                "max backups and max pending connections (in total and per address) must be at \
                 least 1"
                    .into(),
            ));
        }
        crate::check_keepalive(&self.keepalive, self.listen)
    }
}

/// What the source reports to its owner. Always called on the event loop.
#[derive(Debug)]
pub enum SourceNotice<'a> {
    /// A backup completed the handshake.
    BackupJoined {
        /// Its address.
        peer: SocketAddr,
        /// Keepalive read back from its socket.
        keepalive: Option<&'a EffectiveKeepalive>,
        /// Its name in the arbiter, if it gave one.
        node: &'a str,
        /// The key it proved it holds (`None` on an insecure link).
        key_id: Option<u16>,
        /// Names this link on both ends: a stream attached to it (replication) is bound to it.
        link: Option<LinkId>,
    },
    /// A connection was refused during the handshake (bad frame, wrong pair id, timeout, limits).
    /// Rate-limited ([`REJECT_REPORTS_PER_SECOND`]): a flood of bad connections is one report
    /// a few times a second, with the count of those not reported.
    BackupRejected {
        /// Its address.
        peer: SocketAddr,
        /// Why.
        why: String,
        /// Rejections not reported since the last report.
        suppressed: u64,
    },
    /// A joined backup went away: redundancy is degraded, nothing else happens.
    BackupLost {
        /// Its address.
        peer: SocketAddr,
        /// How it went.
        why: String,
        /// The link that went (as [`SourceNotice::BackupJoined`] named it).
        link: Option<LinkId>,
    },
    /// A joined backup misbehaved and was told to redial (EVICT).
    BackupEvicted {
        /// Its address.
        peer: SocketAddr,
        /// Why.
        why: String,
        /// The link that goes (as [`SourceNotice::BackupJoined`] named it).
        link: Option<LinkId>,
    },
    /// A joined backup stopped reading: its heartbeats are skipped and its connection's
    /// `TCP_USER_TIMEOUT` is lifted until it reads again. The source keeps it.
    BackupSlow {
        /// Its address.
        peer: SocketAddr,
        /// Bytes written but not yet sent.
        unsent: usize,
    },
    /// A slow backup reads again.
    BackupCaughtUp {
        /// Its address.
        peer: SocketAddr,
        /// Heartbeats it missed.
        skipped: u64,
    },
    /// `accept` failed for lack of resources; accepting pauses for [`ACCEPT_PAUSE`] at a time.
    /// Rate-limited.
    AcceptFailed {
        /// The error.
        error: String,
        /// Failures since the last report (this one included).
        count: u64,
    },
    /// A handoff was refused; the guest keeps running here.
    HandoffRefused {
        /// Why.
        why: Refusal,
    },
    /// The guest is paused (confirmed); HANDOFF follows.
    HandoffPaused,
    /// HANDOFF went to one backup; the others were stood down.
    HandoffSent {
        /// The chosen backup.
        to: SocketAddr,
        /// Other backups told STAND_DOWN.
        others: usize,
    },
    /// The chosen backup reported that its copy runs. The guest stays paused here for good.
    HandoffComplete {
        /// The chosen backup.
        to: SocketAddr,
        /// From the handoff request to the backup's report.
        took: Duration,
    },
    /// The handoff failed before the backup's copy ran.
    HandoffFailed {
        /// Where: `pause`, `hand-over`, `send`, `backup-start`, `reclaim` or `resume`.
        stage: &'static str,
        /// What went wrong.
        error: String,
        /// Whether the guest runs here again (the resume hook succeeded).
        resumed: bool,
    },
    /// Whether the backup's copy runs is unknown (no answer, its start timed out, or its link
    /// died after HANDOFF): the guest stays paused here, for the operator to decide.
    HandoffUncertain {
        /// Why.
        why: String,
    },
    /// A stand-down arrived during a handoff; it is carried out if the handoff fails.
    StandDownDeferred,
    /// STAND_DOWN went to every joined backup.
    StandDownSent {
        /// How many.
        backups: usize,
    },
    /// This source owns the pair in the arbiter (at start, after a handoff failed, or again
    /// after its lease was lost while the failsafe held).
    Owner {
        /// The fencing epoch of this ownership.
        epoch: u64,
        /// The lease TTL the arbiter granted.
        ttl: Duration,
    },
    /// The lease ran out and no failsafe held: the guest was stopped here for good (its run
    /// deadline passed, then the pause hook), so that a backup may take the pair. Final.
    Fenced {
        /// Why.
        why: String,
        /// The pause hook's error, if it failed (the run deadline still stopped an in-process
        /// guest).
        pause_error: Option<String>,
    },
    /// The stop is complete: every told backup closed its side, or the drain time passed.
    StoodDown {
        /// Backups told STAND_DOWN.
        told: usize,
        /// Of those, how many closed their side (the frame surely arrived).
        confirmed: usize,
    },
}

/// Receives [`SourceNotice`]s on the event loop. Must not block.
pub type SourceObserver = Box<dyn FnMut(&SourceNotice<'_>) + Send>;

/// Messages from other threads to the listener's loop.
enum Msg {
    StandDown,
    Handoff,
    Paused(Done<Result<(), String>>),
    Resumed(Done<Result<(), String>>),
    Fenced(Done<Result<(), String>>),
    Session(SessionEvent),
    HandedOver(Result<(), ArbiterError>),
    Reclaimed(Result<Acquire, ArbiterError>),
    Reacquired(Result<Acquire, ArbiterError>),
}

/// Wraps a pause or resume hook's result into its message.
type HookReport = fn(Done<Result<(), String>>) -> Msg;

/// Calls into a [`SourceListener`] from any thread (an API thread, a signal handler's
/// subscriber); they are carried out on its loop, and their outcome arrives as notices.
#[derive(Clone)]
pub struct SourceHandle(Sender<Msg>);

impl SourceHandle {
    /// Orderly stop: STAND_DOWN to every backup, then [`SourceNotice::StoodDown`]. `false` when
    /// the listener is gone.
    pub fn stand_down(&self) -> bool {
        self.0.send(Msg::StandDown)
    }

    /// Planned switchover, as a transaction: the pause hook runs off the loop; once the pause is
    /// confirmed HANDOFF goes to one backup (the others are stood down); the guest is resumed if
    /// the handoff fails before that backup's copy runs. Refused while no backup is armed.
    /// `false` when the listener is gone.
    pub fn begin_handoff(&self) -> bool {
        self.0.send(Msg::Handoff)
    }
}

/// Where a connection is in the version 2 handshake (all of it is `ConnState::Handshaking`).
enum Hs {
    /// Waiting for HELLO.
    Hello,
    /// WELCOME sent, waiting for AUTH.
    Auth(AwaitingAuth),
    /// The handshake failed after WELCOME: the same answer goes out at `answer_at`, whatever
    /// failed (see [`auth::auth_failure_answer`]).
    Failed { answer_at: Instant, why: String },
    /// Joined: frames are sealed.
    Done,
}

struct Conn {
    sock: Socket,
    peer: SocketAddr,
    reader: Reader,
    hs: Hs,
    /// Seals and opens this link's frames once the handshake succeeded.
    session: Option<Session>,
    /// The key the backup authenticated with (`None` on an insecure link).
    key_id: Option<u16>,
    /// Refused for the source's own limits, not for anything it sent: no penalty for its address.
    blameless: bool,
    state: ConnState,
    /// Handshake deadline, or the deadline for a told backup to close its side.
    deadline: Option<Instant>,
    accepted: Instant,
    joined_at: Option<Instant>,
    keepalive: Option<EffectiveKeepalive>,
    node: String,
    /// Frame bytes not yet written: a frame is never cut, its rest goes out on `EPOLLOUT`.
    outbox: Vec<u8>,
    /// Half-close once the outbox is empty.
    shutdown_after_flush: bool,
    /// Heartbeats skipped since the backup stopped reading, `Some` while it does not read.
    slow: Option<u64>,
    /// Told STAND_DOWN: its close confirms the stop.
    stood_down: bool,
    /// What the backup last said of its own arbiter session (ARBITER_STATUS).
    arbiter_ok: Option<bool>,
    /// The last REJECT/EVICT/close reason, for the report.
    why: String,
    /// The REJECT code it was refused with, for the rejection counter.
    refused: Option<RejectCode>,
}

/// The source's event-manager subscriber.
pub struct SourceListener {
    cfg: SourceConfig,
    entropy: OsEntropy,
    policy: Policy,
    state: State,
    listener: Socket,
    local_addr: SocketAddr,
    listener_registered: bool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    joined: usize,
    handshaking: usize,
    heartbeat_timer: Timer,
    /// Drops stalled handshakes and backups that do not close after being told to.
    sweep_timer: Timer,
    /// The deadline of the hook or wait under way (pause, result, resume, drain).
    job_timer: Timer,
    /// Re-enables accepting after [`ACCEPT_PAUSE`].
    accept_timer: Timer,
    seq: u64,
    observer: SourceObserver,
    mailbox: Mailbox<Msg>,
    /// Shared with the thread running it, so a hook that overruns its deadline is never lost.
    pause: Option<Arc<Mutex<Box<dyn VmPause>>>>,
    pause_abort: Option<AbortHandle>,
    target: Option<usize>,
    handoff_started: Option<Instant>,
    /// Why the handoff under way failed (the first cause), for the report.
    failure: Option<(&'static str, String)>,
    /// Whether the resume after a failed handoff succeeded.
    resumed: bool,
    stand_down_deferred: bool,
    /// Backups told STAND_DOWN by the orderly stop, and how many of them closed their side.
    told: usize,
    confirmed: usize,
    /// The stop's report went out.
    stood_down_reported: bool,
    /// Backups stood down by the handoff under way.
    others_told: usize,
    /// Closed and reopened to shed one connection when descriptors run out.
    spare_fd: Option<File>,
    accept_failures: u64,
    accept_reported: Option<Instant>,
    /// The pair's ownership in the arbiter, when there is one.
    arbiter: Option<Arbitration>,
    /// Fires at the fencing deadline (and more often while the failsafe holds).
    fence_timer: Timer,
    /// When the next heartbeat is due, while heartbeats go out.
    next_beat: Option<Instant>,
    /// Backups whose armed link ended without an orderly goodbye and that have not joined again:
    /// any of them may be waiting for the pair, so the failsafe is off while one is listed.
    lost_backups: std::collections::HashSet<String>,
    /// Rate limit of `BackupRejected` reports.
    rejects: RateLimit,
    counters: Arc<LinkCounters>,
    /// Failed handshakes per remote address in the current second: an address past
    /// [`PENALTY_FAILURES`] has its new connections closed at once until the second is over.
    penalty: std::collections::HashMap<std::net::IpAddr, (Instant, u32)>,
    /// Tells the local guest the instant it must not be entered after.
    run_deadline_hook: Option<RunDeadlineHook>,
}

/// Told the instant after which the local guest must not run (its vCPUs check it before every
/// entry), whenever it moves. Called on the loop: must not block.
pub type RunDeadlineHook = Box<dyn Fn(Option<Instant>) + Send>;

/// How much before the lease's earliest end the source fences itself: room for the pause, the
/// clock-rate difference between this host and the arbiter, and the timer's lateness.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200))
}

struct Arbitration {
    session: ArbiterSession,
    epoch: u64,
    /// The fencing deadline the lease gives: its earliest end less the margin. `None` once lost.
    lease_until: Option<Instant>,
    /// Failsafe grace announced to backups (zero: no failsafe).
    grace: Duration,
    /// A renewal failed since the last success: the failsafe may be what keeps the guest running.
    troubled: bool,
    /// The deadline last given to the guest: once it passed, nothing brings the guest back.
    told: Option<Instant>,
    /// Reclaiming after a failed handoff: give up at this instant.
    reclaim_until: Option<Instant>,
    /// A backup reaches the arbiter again while this source still cannot: the failsafe holds
    /// until then so that our own session gets one prompt try (renew, or a new lease and the
    /// pair again). Once per outage, so a flapping backup cannot stretch it.
    rejoin_until: Option<Instant>,
    rejoin_spent: bool,
}

impl SourceListener {
    /// Binds the listen socket (non-blocking) so that errors surface before the loop starts.
    pub fn new(cfg: SourceConfig, observer: SourceObserver) -> Result<Self, Error> {
        cfg.validate()?;
        let bind = |a: SocketAddr| -> io::Result<Socket> {
            let s = Socket::new(
                Domain::for_address(a),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.bind(&a.into())?;
            s.listen(1024)?;
            Ok(s)
        };
        let listener = bind(cfg.listen).map_err(|e| Error::Bind(cfg.listen, e))?;
        let local_addr = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(cfg.listen);
        let entropy = OsEntropy::new().map_err(Error::Resource)?;
        if !cfg.credentials.is_keyed() {
            warn!(
                "pair {}: the heartbeat link is NOT authenticated (no key): anyone who reaches \
                 {local_addr} can speak for a backup",
                cfg.pair_id
            );
        }
        Ok(SourceListener {
            entropy,
            policy: Policy::default(),
            cfg,
            state: State::Serving,
            listener,
            local_addr,
            listener_registered: false,
            conns: Vec::new(),
            free: Vec::new(),
            joined: 0,
            handshaking: 0,
            heartbeat_timer: Timer::new().map_err(Error::Resource)?,
            sweep_timer: Timer::new().map_err(Error::Resource)?,
            job_timer: Timer::new().map_err(Error::Resource)?,
            accept_timer: Timer::new().map_err(Error::Resource)?,
            seq: 0,
            observer,
            mailbox: Mailbox::new().map_err(Error::Resource)?,
            pause: None,
            pause_abort: None,
            target: None,
            handoff_started: None,
            failure: None,
            resumed: false,
            stand_down_deferred: false,
            told: 0,
            confirmed: 0,
            stood_down_reported: false,
            others_told: 0,
            spare_fd: File::open("/dev/null").ok(),
            accept_failures: 0,
            accept_reported: None,
            arbiter: None,
            fence_timer: Timer::new().map_err(Error::Resource)?,
            next_beat: None,
            lost_backups: Default::default(),
            rejects: RateLimit::default(),
            counters: Arc::default(),
            penalty: Default::default(),
            run_deadline_hook: None,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters for metrics (heartbeats sent, rejections by kind): lock-free, readable from
    /// any thread.
    pub fn counters(&self) -> Arc<LinkCounters> {
        self.counters.clone()
    }

    /// Backups that completed the handshake and are still connected.
    pub fn backups(&self) -> usize {
        self.joined
    }

    /// Where the source is.
    pub fn state(&self) -> State {
        self.state
    }

    /// A handle for calls from other threads: stand down, hand off.
    pub fn handle(&self) -> SourceHandle {
        SourceHandle(self.mailbox.sender())
    }

    /// Sets the hook that pauses the local guest before a planned handoff (and resumes it if the
    /// handoff fails). Without one, a handoff assumes the caller paused the guest itself and
    /// cannot resume it.
    pub fn set_pause_hook(&mut self, pause: Box<dyn VmPause>) {
        self.pause_abort = pause.abort_handle();
        self.pause = Some(Arc::new(Mutex::new(pause)));
    }

    /// Puts the pair under `session`'s arbiter. `epoch` is the ownership the caller already
    /// acquired (at start, before the guest runs). From now on the source fences itself when its
    /// lease runs out (`LeaseExpired`, [`SourceNotice::Fenced`]), passes the pair to the chosen
    /// backup before HANDOFF, takes it back before resuming after a failed handoff, and only
    /// admits backups that use an arbiter too. With heartbeats, the failsafe keeps the guest
    /// running through an arbiter outage while every armed backup is heard from (see
    /// `docs/split-brain.md`).
    pub fn set_arbiter(&mut self, session: ArbiterSession, epoch: u64) {
        self.policy.arbitrated = true;
        self.cfg.node = session.holder().to_string();
        let grace = self
            .cfg
            .heartbeat
            .map_or(Duration::ZERO, |hb| (hb * 3).max(Duration::from_millis(30)));
        let tx = self.mailbox.sender();
        session.subscribe(move |ev| {
            tx.send(Msg::Session(ev.clone()));
        });
        let margin = fence_margin(session.ttl());
        let lease_until = session.valid_until().map(|t| t - margin);
        self.arbiter = Some(Arbitration {
            session,
            epoch,
            lease_until,
            grace,
            troubled: false,
            told: None,
            reclaim_until: None,
            rejoin_until: None,
            rejoin_spent: false,
        });
        self.update_fence();
    }

    /// Sets the hook told the instant after which the local guest must not run (the fencing
    /// deadline), e.g. `DummyVm::set_run_deadline`. A guest whose vCPUs check it cannot run past
    /// the lease even when the whole process was stopped and wakes late.
    pub fn set_run_deadline_hook(&mut self, hook: RunDeadlineHook) {
        self.run_deadline_hook = Some(hook);
        self.update_fence();
    }

    /// The fencing epoch of this source's ownership, with an arbiter.
    pub fn epoch(&self) -> Option<u64> {
        self.arbiter.as_ref().map(|a| a.epoch)
    }

    /// When the guest must stop at the latest, now: the lease's deadline, or later while the
    /// failsafe holds (every armed backup heard from within the grace). `None` without arbiter.
    fn fence_deadline(&self) -> Option<Instant> {
        let a = self.arbiter.as_ref()?;
        let failsafe = if a.grace > Duration::ZERO && (a.troubled || a.lease_until.is_none()) {
            self.failsafe_until(a.grace)
        } else {
            None
        };
        Some(match (a.lease_until, failsafe) {
            (Some(l), Some(f)) => l.max(f),
            (Some(l), None) => l,
            (None, Some(f)) => f,
            // Neither lease nor failsafe: now.
            (None, None) => Instant::now(),
        })
    }

    /// The failsafe: the earliest of "last heard from this armed backup + grace" over every
    /// armed backup; `None` without one. A backup that lost the link waits at least as long after
    /// it last heard from us before it may start, so while this holds no copy can start.
    fn failsafe_until(&self, grace: Duration) -> Option<Instant> {
        // A backup that lost its link may be asking the arbiter for the pair: with it around,
        // no failsafe (it comes back by joining again).
        if !self.lost_backups.is_empty() {
            return None;
        }
        let now = Instant::now();
        let armed: Vec<&Conn> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| matches!(c.state, ConnState::Joined | ConnState::Target))
            .collect();
        // Only an outage for everyone: a backup that still reaches the arbiter could be granted
        // the pair (the premise of the failsafe, "nobody can take over without the arbiter",
        // does not hold); then the source fences and that backup takes over properly.
        if armed.is_empty() {
            return None;
        }
        let mut cap = None;
        if armed.iter().any(|c| c.arbiter_ok != Some(false)) {
            // Only our own prompt retry (see `rejoin_until`) keeps it, and not past it.
            match self.arbiter.as_ref().and_then(|a| a.rejoin_until) {
                Some(r) if r > now => cap = Some(r),
                _ => return None,
            }
        }
        let acked = armed
            .iter()
            .map(|c| {
                let silent = crate::tcp_info(&c.sock).map_or(Duration::MAX, |i| {
                    Duration::from_millis(i.tcpi_last_ack_recv.min(i.tcpi_last_data_recv).into())
                });
                now.checked_sub(silent).unwrap_or(now - grace) + grace
            })
            .min()?;
        Some(cap.map_or(acked, |c| c.min(acked)))
    }

    /// Moves the fencing deadline: tells the guest, arms the timer, or fences when it passed.
    /// Never moves a deadline that already passed: a guest told to stop stays stopped.
    fn update_fence(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let deadline = self.fence_deadline()?;
        let a = self.arbiter.as_mut()?;
        if a.told.is_some_and(|t| t <= now) || self.state == State::Fenced {
            return None;
        }
        a.told = Some(deadline);
        let check = if a.troubled || a.lease_until.is_none() {
            // The failsafe moves with every ACK: look again soon.
            (a.grace / 3).max(Duration::from_millis(10))
        } else {
            Duration::MAX
        };
        if let Some(hook) = &self.run_deadline_hook {
            hook(Some(deadline));
        }
        let next = deadline.saturating_duration_since(now).min(check);
        let _ = self.fence_timer.arm(next, None);
        Some(deadline)
    }

    fn on_fence_timer(&mut self, ops: &mut EventOps) {
        if self.fence_timer.expirations() == 0 {
            return;
        }
        self.check_fence(ops);
    }

    /// Fences when the deadline passed; else moves it.
    fn check_fence(&mut self, ops: &mut EventOps) {
        let Some(a) = self.arbiter.as_ref() else {
            return;
        };
        let now = Instant::now();
        let passed =
            a.told.is_some_and(|t| t <= now) || self.fence_deadline().is_some_and(|d| d <= now);
        if passed && !self.state.is_done() {
            self.feed(ops, Input::LeaseExpired);
        } else {
            self.update_fence();
        }
    }

    fn on_session(&mut self, ops: &mut EventOps, ev: SessionEvent) {
        // A deadline that passed is final, whatever this event says.
        self.check_fence(ops);
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let margin = fence_margin(a.session.ttl());
        match ev {
            SessionEvent::Renewed { valid_until } => {
                if a.lease_until.is_some() {
                    a.lease_until = Some(valid_until - margin);
                    // The pair is ours again: the outage is over.
                    a.rejoin_until = None;
                    a.rejoin_spent = false;
                }
                a.troubled = false;
            }
            SessionEvent::Trouble { error, .. } => {
                if !a.troubled {
                    warn!("lease renewal failing ({error}); the failsafe decides until it works");
                    // Ask the backups whether they reach the arbiter: the failsafe holds only
                    // if none of them does.
                    a.troubled = true;
                    self.ask_arbiter_status();
                }
            }
            SessionEvent::Lost { error } => {
                warn!("lease lost: {error}");
                a.lease_until = None;
                a.troubled = true;
            }
            // A new lease: take the pair again, if nobody took it meanwhile (nobody can while
            // the failsafe holds: a backup starts only after it lost the link).
            SessionEvent::Reopened { .. } => {
                if a.lease_until.is_none() && !self.state.is_done() {
                    let tx = self.mailbox.sender();
                    let pair = self.cfg.pair_id.clone();
                    a.session.acquire(&pair, Instant::now(), move |r| {
                        tx.send(Msg::Reacquired(r));
                    });
                }
            }
        }
        self.check_fence(ops);
    }

    fn ask_arbiter_status(&mut self) {
        let idx: Vec<usize> = self.joined_indices().collect();
        for i in idx {
            let _ = self.write_frame(i, &Frame::ArbiterCheck);
        }
    }

    fn on_reacquired(&mut self, ops: &mut EventOps, r: Result<Acquire, ArbiterError>) {
        match r {
            Ok(Acquire::Won { epoch }) => {
                if let Some(a) = self.arbiter.as_mut() {
                    let margin = fence_margin(a.session.ttl());
                    a.epoch = epoch;
                    a.lease_until = a.session.valid_until().map(|t| t - margin);
                    a.troubled = false;
                    a.rejoin_until = None;
                    a.rejoin_spent = false;
                    let ttl = a.session.ttl();
                    info!("pair owned again after a lost lease (epoch {epoch})");
                    (self.observer)(&SourceNotice::Owner { epoch, ttl });
                }
                self.check_fence(ops);
            }
            other => {
                warn!("cannot take the pair again after a lost lease: {other:?}");
                if !self.state.is_done() {
                    self.feed(ops, Input::LeaseExpired);
                }
            }
        }
    }

    fn reclaim(&mut self) {
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        let until = *a
            .reclaim_until
            .get_or_insert_with(|| Instant::now() + a.session.ttl() + Duration::from_secs(2));
        let _ = until;
        let tx = self.mailbox.sender();
        a.session
            .acquire(&self.cfg.pair_id, Instant::now(), move |r| {
                tx.send(Msg::Reclaimed(r));
            });
    }

    fn on_reclaimed(&mut self, ops: &mut EventOps, r: Result<Acquire, ArbiterError>) {
        if self.state != State::Reclaiming {
            return;
        }
        let Some(a) = self.arbiter.as_mut() else {
            return;
        };
        match r {
            Ok(Acquire::Won { epoch }) => {
                a.epoch = epoch;
                a.reclaim_until = None;
                let ttl = a.session.ttl();
                info!("pair taken back after the failed handoff (epoch {epoch})");
                (self.observer)(&SourceNotice::Owner { epoch, ttl });
                self.feed(ops, Input::Reclaimed);
            }
            other => {
                let now = Instant::now();
                if a.reclaim_until.is_some_and(|t| now < t) {
                    // The failed successor may still hold it for a moment (it releases after
                    // its failure, or its lease runs out): ask again shortly.
                    let tx = self.mailbox.sender();
                    a.session.acquire(
                        &self.cfg.pair_id,
                        now + Duration::from_millis(100),
                        move |r| {
                            tx.send(Msg::Reclaimed(r));
                        },
                    );
                } else {
                    a.reclaim_until = None;
                    self.note_failure(
                        "reclaim",
                        format!("the pair could not be taken back: {other:?}"),
                    );
                    self.feed(ops, Input::ReclaimFailed);
                }
            }
        }
    }

    /// Feeds one input through the handoff/stop machine and carries out its actions, in order.
    fn feed(&mut self, ops: &mut EventOps, input: Input) {
        let before = self.state;
        let (next, actions) = machine::step(before, input, self.policy);
        if next != before {
            info!("source {before:?} + {input:?} -> {next:?}");
        }
        self.state = next;
        for a in actions.iter() {
            self.act(ops, a);
        }
        if self.state == State::Serving && self.stand_down_deferred {
            self.stand_down_deferred = false;
            self.feed(ops, Input::StandDownRequested);
        }
    }

    fn act(&mut self, ops: &mut EventOps, a: Action) {
        match a {
            Action::Refuse(why) => {
                warn!("handoff refused: {why:?}");
                (self.observer)(&SourceNotice::HandoffRefused { why });
            }
            Action::Pause => {
                self.handoff_started = Some(Instant::now());
                self.failure = None;
                self.run_pause_hook(ops, true);
            }
            Action::AbortPause => {
                if let Some(abort) = &self.pause_abort {
                    abort();
                }
            }
            Action::HandOver => {
                let target = self.choose_target();
                let node = target
                    .and_then(|t| self.conns[t].as_ref())
                    .map(|c| c.node.clone())
                    .unwrap_or_default();
                match self.arbiter.as_ref() {
                    Some(a) if !node.is_empty() => {
                        let tx = self.mailbox.sender();
                        a.session
                            .hand_over(&self.cfg.pair_id, a.epoch, &node, move |r| {
                                tx.send(Msg::HandedOver(r));
                            });
                        let _ = self.job_timer.arm(self.cfg.pause_timeout, None);
                    }
                    _ => {
                        self.note_failure(
                            "hand-over",
                            "the chosen backup has no arbiter name".into(),
                        );
                        self.feed(ops, Input::HandOverFailed);
                    }
                }
            }
            Action::Reclaim => self.reclaim(),
            Action::Fence => self.fence(),
            Action::StandDownOthers => {
                let target = self.choose_target();
                self.target = target;
                let others: Vec<usize> = self
                    .joined_indices()
                    .filter(|&i| Some(i) != target)
                    .collect();
                self.others_told = others.len();
                for &idx in &others {
                    self.send_stand_down(ops, idx);
                }
                if let Some(t) = target {
                    let to = self.conns[t].as_ref().map(|c| c.peer);
                    debug!(
                        "handoff target {to:?}, {} other(s) stood down",
                        others.len()
                    );
                }
            }
            Action::SendHandoff => self.send_handoff(ops),
            Action::Resume => self.run_pause_hook(ops, false),
            Action::ReportFailed => {
                let _ = self.job_timer.disarm();
                let (stage, error) = self
                    .failure
                    .take()
                    .unwrap_or(("pause", "unknown".to_string()));
                let resumed = self.resumed;
                error!("handoff failed at {stage}: {error} (guest resumed: {resumed})");
                (self.observer)(&SourceNotice::HandoffFailed {
                    stage,
                    error,
                    resumed,
                });
            }
            Action::StandDownAll => {
                let _ = self.heartbeat_timer.disarm();
                let idx: Vec<usize> = self.joined_indices().collect();
                self.told = idx.len();
                self.confirmed = 0;
                for &i in &idx {
                    self.send_stand_down(ops, i);
                }
                // Handshaking connections never armed: a REJECT is enough.
                let pending: Vec<usize> = self.indices(ConnState::Handshaking).collect();
                for i in pending {
                    self.reject(
                        ops,
                        i,
                        RejectCode::Stopping,
                        "the source is stopping".into(),
                    );
                }
                info!("STAND_DOWN sent to {} backup(s)", idx.len());
                (self.observer)(&SourceNotice::StandDownSent { backups: idx.len() });
                let _ = self.job_timer.arm(self.cfg.drain_timeout, None);
                self.check_drained();
            }
            Action::DeferStandDown => {
                self.stand_down_deferred = true;
                (self.observer)(&SourceNotice::StandDownDeferred);
            }
            Action::Finish => {
                let _ = self.job_timer.disarm();
                let _ = self.heartbeat_timer.disarm();
                let to = self
                    .target
                    .and_then(|t| self.conns[t].as_ref().map(|c| c.peer));
                match self.state {
                    State::HandedOff => {
                        let took = self.handoff_started.map_or(Duration::ZERO, |t| t.elapsed());
                        let to = to.unwrap_or(self.local_addr);
                        info!("handoff to {to} complete in {took:?}");
                        (self.observer)(&SourceNotice::HandoffComplete { to, took });
                    }
                    _ => {
                        let why = self
                            .failure
                            .take()
                            .map(|(_, e)| e)
                            .unwrap_or_else(|| "unknown".into());
                        error!("handoff uncertain: {why}; the guest stays paused here");
                        (self.observer)(&SourceNotice::HandoffUncertain { why });
                    }
                }
            }
        }
    }

    /// Joined backups, excluding those being told to go.
    fn joined_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.indices(ConnState::Joined)
    }

    fn indices(&self, state: ConnState) -> impl Iterator<Item = usize> + '_ {
        self.conns
            .iter()
            .enumerate()
            .filter(move |(_, c)| c.as_ref().is_some_and(|c| c.state == state))
            .map(|(i, _)| i)
    }

    /// The backup that has been armed longest: the likeliest to be in sync.
    fn choose_target(&self) -> Option<usize> {
        self.joined_indices()
            .min_by_key(|&i| self.conns[i].as_ref().and_then(|c| c.joined_at))
    }

    /// Runs the pause (or resume) hook off the loop with its deadline; without a hook, reports at
    /// once (the caller paused the guest; nothing can resume it).
    fn run_pause_hook(&mut self, ops: &mut EventOps, pause: bool) {
        let Some(hook) = self.pause.clone() else {
            if pause {
                let joined = self.joined;
                return self.feed(ops, Input::Paused { joined });
            }
            self.resumed = false;
            self.note_failure(
                "resume",
                "no pause hook: the guest cannot be resumed".into(),
            );
            return self.feed(ops, Input::ResumeFailed);
        };
        let (name, wrap): (&str, HookReport) = if pause {
            ("vm-pause", Msg::Paused)
        } else {
            ("vm-resume", Msg::Resumed)
        };
        let job = move || {
            let mut h = hook.lock().unwrap_or_else(|e| e.into_inner());
            if pause { h.vm_pause() } else { h.vm_resume() }.map_err(|e| e.to_string())
        };
        match offload(name, &self.mailbox.sender(), job, wrap) {
            Ok(()) => {
                let _ = self.job_timer.arm(self.cfg.pause_timeout, None);
            }
            Err(e) => {
                let error = format!("cannot spawn the {name} thread: {e}");
                if pause {
                    self.note_failure("pause", error);
                    self.feed(ops, Input::PauseFailed);
                } else {
                    self.resumed = false;
                    self.note_failure("resume", error);
                    self.feed(ops, Input::ResumeFailed);
                }
            }
        }
    }

    /// Stops the guest for good: its run deadline now (an in-process guest's vCPUs stop at
    /// their next entry), then the pause hook off the loop; [`SourceNotice::Fenced`] follows.
    fn fence(&mut self) {
        let _ = self.heartbeat_timer.disarm();
        let _ = self.fence_timer.disarm();
        let now = Instant::now();
        if let Some(hook) = &self.run_deadline_hook {
            hook(Some(now));
        }
        if let Some(a) = self.arbiter.as_mut() {
            a.told = Some(now);
        }
        if self.failure.is_none() {
            self.failure = Some(("fence", "the lease ran out and no failsafe held".into()));
        }
        let tx = self.mailbox.sender();
        match self.pause.clone() {
            Some(hook) => {
                let job = move || {
                    hook.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .vm_fence()
                        .map_err(|e| e.to_string())
                };
                if let Err(e) = offload("vm-fence", &tx, job, Msg::Fenced) {
                    tx.send(Msg::Fenced((
                        Ok(Err(format!("cannot spawn: {e}"))),
                        Duration::ZERO,
                    )));
                }
            }
            None => {
                tx.send(Msg::Fenced((Ok(Ok(())), Duration::ZERO)));
            }
        }
    }

    /// Keeps the first cause of a failed handoff; later ones are appended.
    fn note_failure(&mut self, stage: &'static str, error: String) {
        match &mut self.failure {
            None => self.failure = Some((stage, error)),
            Some((_, e)) => {
                e.push_str("; then ");
                e.push_str(stage);
                e.push_str(": ");
                e.push_str(&error);
            }
        }
    }

    /// HANDOFF to the chosen backup. Written whole or not at all (it fits: see `slow_unsent`).
    fn send_handoff(&mut self, ops: &mut EventOps) {
        let Some(t) = self.target else {
            self.note_failure("send", "no backup to hand off to".into());
            return self.feed(ops, Input::HandoffNotDelivered);
        };
        let others = self.others_told;
        match self.write_frame(t, &Frame::Handoff) {
            Ok(()) => {
                let _ = self.heartbeat_timer.disarm();
                self.conn_input(ops, t, ConnInput::HandoffSent, String::new());
                let to = self.conns[t].as_ref().map_or(self.local_addr, |c| c.peer);
                info!("HANDOFF sent to {to}");
                (self.observer)(&SourceNotice::HandoffSent { to, others });
                let _ = self.job_timer.arm(self.cfg.handoff_timeout, None);
            }
            Err(e) => {
                self.note_failure("send", format!("HANDOFF could not be written: {e}"));
                self.feed(ops, Input::HandoffNotDelivered);
            }
        }
    }

    /// STAND_DOWN to one joined backup, then half-close once it is out.
    fn send_stand_down(&mut self, ops: &mut EventOps, idx: usize) {
        if let Err(e) = self.write_frame(idx, &Frame::StandDown) {
            warn!("STAND_DOWN to backup {idx}: {e}");
        }
        if let Some(c) = self.conns[idx].as_mut() {
            c.shutdown_after_flush = true;
            c.deadline =
                Some(Instant::now() + self.cfg.drain_timeout.max(self.cfg.handshake_timeout));
        }
        self.flush(ops, idx);
        if let Some(c) = self.conns[idx].as_mut() {
            c.stood_down = true;
        }
        self.conn_input(ops, idx, ConnInput::StandDownSent, String::new());
        self.arm_sweep();
    }

    /// Queues a frame whole and writes what the socket takes now; the rest goes out on
    /// `EPOLLOUT`. An error means nothing of it can ever arrive.
    fn write_frame(&mut self, idx: usize, frame: &Frame) -> io::Result<()> {
        let Some(c) = self.conns[idx].as_mut() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let Some(session) = c.session.as_mut() else {
            // Only a joined link has a session; nothing else is written through here.
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let was_empty = c.outbox.is_empty();
        session.seal_into(frame, &mut c.outbox);
        if was_empty {
            write_out(c)?;
        }
        Ok(())
    }

    /// Queues handshake bytes (a WELCOME) and writes what the socket takes now.
    fn write_raw(&mut self, idx: usize, bytes: &[u8]) -> io::Result<()> {
        let Some(c) = self.conns[idx].as_mut() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let was_empty = c.outbox.is_empty();
        c.outbox.extend_from_slice(bytes);
        if was_empty {
            write_out(c)?;
        }
        Ok(())
    }

    /// Writes the outbox; watches `EPOLLOUT` while bytes remain; half-closes when asked and done.
    fn flush(&mut self, ops: &mut EventOps, idx: usize) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        if let Err(e) = write_out(c) {
            debug!("backup {}: write: {e}", c.peer);
        }
        let mut set = EventSet::IN | EventSet::READ_HANG_UP;
        if !c.outbox.is_empty() {
            set |= EventSet::OUT;
        } else if c.shutdown_after_flush {
            c.shutdown_after_flush = false;
            let _ = c.sock.shutdown(Shutdown::Write);
        }
        let _ = ops.modify(Events::with_data(
            &c.sock,
            TOKEN_CONN_BASE + idx as u32,
            set,
        ));
    }

    /// REJECT a connection that never armed, and close it. The REJECT is tagged when the HELLO
    /// named this source's key and pair (the backup can trust its code), else untagged.
    fn reject(&mut self, ops: &mut EventOps, idx: usize, code: RejectCode, why: String) {
        let bytes = match self.conns[idx].as_ref().map(|c| &c.hs) {
            Some(Hs::Auth(aw)) => aw.reject(code, &why),
            _ => auth::unauthenticated_reject(code, &why),
        };
        self.reject_with(ops, idx, &bytes, code, why);
    }

    /// Writes `bytes` (a REJECT with `code`) to a connection that never armed, and closes it.
    fn reject_with(
        &mut self,
        ops: &mut EventOps,
        idx: usize,
        bytes: &[u8],
        code: RejectCode,
        why: String,
    ) {
        if let Some(c) = self.conns[idx].as_mut() {
            // Best effort: the peer may be no backup at all; it never armed, so a reset is fine.
            let _ = (&c.sock).write(bytes);
            c.why = why;
            c.refused = Some(code);
        }
        self.conn_input(ops, idx, ConnInput::HelloBad, String::new());
    }

    /// Feeds a connection's machine and carries out its action.
    fn conn_input(&mut self, ops: &mut EventOps, idx: usize, input: ConnInput, why: String) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        let before = c.state;
        let (next, action) = machine::conn_step(before, input);
        c.state = next;
        if !why.is_empty() {
            c.why = why;
        }
        match (before, next) {
            (ConnState::Handshaking, s) if s != ConnState::Handshaking => {
                self.handshaking -= 1;
                if s == ConnState::Closed && !c.blameless {
                    let ip = c.peer.ip();
                    self.note_failure_from(ip);
                }
            }
            _ => {}
        }
        match (before, next) {
            (ConnState::Joined | ConnState::Target, s)
                if !matches!(s, ConnState::Joined | ConnState::Target) =>
            {
                self.joined -= 1;
                if self.joined == 0 && self.state == State::Pausing {
                    self.feed(ops, Input::BackupsGone);
                }
            }
            (s, ConnState::Joined) if s != ConnState::Joined => self.joined += 1,
            _ => {}
        }
        match action {
            None => {}
            Some(ConnAction::Welcome) => self.welcome(ops, idx),
            Some(ConnAction::Reject) => {
                let c = self.conns[idx].as_ref().expect("present");
                let (peer, why) = (c.peer, c.why.clone());
                let kind = RejectKind::Code(c.refused.unwrap_or(RejectCode::Malformed));
                self.report_rejected(peer, kind, why);
            }
            Some(ConnAction::Evict) => {
                let why = self.conns[idx]
                    .as_ref()
                    .map(|c| c.why.clone())
                    .unwrap_or_default();
                let _ = self.write_frame(
                    idx,
                    &Frame::Evict {
                        reason: why.clone(),
                    },
                );
                if let Some(c) = self.conns[idx].as_mut() {
                    c.shutdown_after_flush = true;
                    c.deadline = Some(Instant::now() + self.cfg.handshake_timeout);
                }
                self.flush(ops, idx);
                self.arm_sweep();
                let c = self.conns[idx].as_ref();
                let peer = c.map_or(self.local_addr, |c| c.peer);
                let link = c.and_then(|c| c.session.as_ref()).map(Session::link_id);
                warn!("backup {peer} evicted: {why}");
                (self.observer)(&SourceNotice::BackupEvicted { peer, why, link });
            }
            Some(ConnAction::Close) => {
                let c = self.conns[idx].as_ref().expect("present");
                let (peer, why) = (c.peer, c.why.clone());
                match before {
                    ConnState::Handshaking => {
                        let kind = match (c.refused, input) {
                            (Some(code), _) => RejectKind::Code(code),
                            (None, ConnInput::Eof) => RejectKind::Closed(Closed::Closed),
                            (None, ConnInput::HandshakeTimeout) => {
                                RejectKind::Closed(Closed::Timeout)
                            }
                            (None, _) => RejectKind::Closed(Closed::Error),
                        };
                        self.report_rejected(peer, kind, why);
                    }
                    ConnState::Closing => {
                        debug!("backup {peer} closed after being told to go");
                        if c.stood_down && self.state == State::StoodDown {
                            self.confirmed += 1;
                        }
                    }
                    _ => {
                        warn!("backup {peer} lost: {why}");
                        if !c.node.is_empty() {
                            self.lost_backups.insert(c.node.clone());
                        }
                        let link = c.session.as_ref().map(Session::link_id);
                        (self.observer)(&SourceNotice::BackupLost { peer, why, link });
                    }
                }
            }
            Some(ConnAction::ToHandoff) => {
                if !matches!(input, ConnInput::HandoffResult) {
                    self.note_failure(
                        "backup-start",
                        "the chosen backup's link ended after HANDOFF, before its result: its \
                         copy may run"
                            .into(),
                    );
                }
                let status = self.conns[idx]
                    .as_ref()
                    .map(|c| c.why.clone())
                    .unwrap_or_default();
                let input = match input {
                    ConnInput::HandoffResult => match status.as_str() {
                        "started" => Input::Result(HandoffStatus::Started),
                        "failed" => Input::Result(HandoffStatus::Failed),
                        _ => Input::Result(HandoffStatus::Uncertain),
                    },
                    _ => Input::TargetLost,
                };
                self.feed(ops, input);
            }
        }
        if self.conns[idx]
            .as_ref()
            .is_some_and(|c| c.state == ConnState::Closed)
        {
            self.remove(ops, idx);
        }
        self.check_drained();
    }

    fn report_rejected(&mut self, peer: SocketAddr, kind: RejectKind, why: String) {
        // Counted whether or not the report is rate-limited away.
        self.counters.rejected(kind);
        if let Some(suppressed) = self.rejects.allow(Instant::now()) {
            warn!("backup {peer} rejected: {why} ({suppressed} more not reported)");
            (self.observer)(&SourceNotice::BackupRejected {
                peer,
                why,
                suppressed,
            });
        }
    }

    fn remove(&mut self, ops: &mut EventOps, idx: usize) {
        if let Some(c) = self.conns[idx].take() {
            let _ = ops.remove(Events::empty(&c.sock));
            self.free.push(idx);
        }
    }

    /// After a stand-down: done once every told backup closed its side.
    fn check_drained(&mut self) {
        if self.state != State::StoodDown || self.stood_down_reported {
            return;
        }
        let waiting = self.indices(ConnState::Closing).count();
        if waiting == 0 {
            self.finish_stand_down();
        }
    }

    fn finish_stand_down(&mut self) {
        let (told, confirmed) = (self.told, self.confirmed);
        self.stood_down_reported = true;
        let _ = self.job_timer.disarm();
        info!("stand-down complete: {confirmed} of {told} backup(s) confirmed");
        (self.observer)(&SourceNotice::StoodDown { told, confirmed });
    }

    /// The handshake completed (the backup's AUTH verified; the WELCOME went out before it).
    fn welcome(&mut self, ops: &mut EventOps, idx: usize) {
        self.flush(ops, idx);
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        c.deadline = None;
        c.joined_at = Some(Instant::now());
        c.keepalive = EffectiveKeepalive::read_from(&c.sock).ok();
        info!("backup {} joined (pair {})", c.peer, self.cfg.pair_id);
        (self.observer)(&SourceNotice::BackupJoined {
            peer: c.peer,
            keepalive: c.keepalive.as_ref(),
            node: &c.node,
            key_id: c.key_id,
            link: c.session.as_ref().map(Session::link_id),
        });
        if self.joined == 1 && self.state == State::Serving {
            if let Some(hb) = self.cfg.heartbeat {
                let _ = self.heartbeat_timer.arm(hb, Some(hb));
                self.next_beat = Some(Instant::now() + hb);
            }
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        // A bounded batch per readiness: the listener is level-triggered, so the rest waits for
        // the next turn of the loop, and the loop's other work (heartbeats) goes on in between.
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((sock, addr)) => {
                    let peer = addr.as_socket().unwrap_or(self.local_addr);
                    self.admit(ops, sock, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up before we accepted: nothing to do.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    let resources = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if resources && self.spare_fd.is_some() {
                        // Linux takes the descriptor before it looks at the queue: EMFILE does not
                        // say that anyone waits. The spare descriptor tells.
                        self.spare_fd = None;
                        let waiting = self.listener.accept();
                        match waiting {
                            Err(w) if w.kind() == io::ErrorKind::WouldBlock => {
                                self.spare_fd = File::open("/dev/null").ok();
                                return;
                            }
                            Ok((sock, addr)) => {
                                // Someone waits: the cheapest handshake to give up makes room.
                                let evicted =
                                    self.evict_oldest_handshake(ops, "out of descriptors");
                                if evicted {
                                    self.spare_fd = File::open("/dev/null").ok();
                                    let peer = addr.as_socket().unwrap_or(self.local_addr);
                                    self.admit(ops, sock, peer);
                                    continue;
                                }
                                // Nothing to give up: shed it, and stop polling the listener
                                // for a while (a level-triggered listener whose accept fails
                                // would make the loop spin).
                                drop(sock);
                                self.spare_fd = File::open("/dev/null").ok();
                                return self.pause_accept(ops, e);
                            }
                            Err(_) => {
                                self.spare_fd = File::open("/dev/null").ok();
                                return self.pause_accept(ops, e);
                            }
                        }
                    }
                    if resources && self.evict_oldest_handshake(ops, "out of descriptors") {
                        continue;
                    }
                    if resources {
                        self.shed_one();
                    }
                    return self.pause_accept(ops, e);
                }
            }
        }
    }

    fn shed_one(&mut self) {
        if self.spare_fd.take().is_some() {
            if let Ok((sock, _)) = self.listener.accept() {
                drop(sock);
            }
            self.spare_fd = File::open("/dev/null").ok();
        }
    }

    fn pause_accept(&mut self, ops: &mut EventOps, e: io::Error) {
        if self.listener_registered {
            let _ = ops.remove(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN));
            self.listener_registered = false;
        }
        let _ = self.accept_timer.arm(ACCEPT_PAUSE, None);
        self.accept_failures += 1;
        let now = Instant::now();
        if self
            .accept_reported
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_REPORT_EVERY)
        {
            let count = std::mem::take(&mut self.accept_failures);
            self.accept_reported = Some(now);
            error!("accept: {e} ({count} failure(s)); pausing accept for {ACCEPT_PAUSE:?}");
            (self.observer)(&SourceNotice::AcceptFailed {
                error: e.to_string(),
                count,
            });
        }
    }

    fn resume_accept(&mut self, ops: &mut EventOps) {
        if self.accept_timer.expirations() == 0 || self.listener_registered {
            return;
        }
        match ops.add(Events::with_data_raw(
            self.listener.as_raw_fd(),
            TOKEN_LISTEN,
            EventSet::IN,
        )) {
            Ok(()) => self.listener_registered = true,
            Err(e) => {
                error!("cannot re-register the listener: {e:?}");
                let _ = self.accept_timer.arm(ACCEPT_PAUSE, None);
            }
        }
    }

    /// Refuses a connection still in its handshake, preferring the oldest of those that have not
    /// said HELLO yet (a backup's HELLO comes at once); `false` if there is none.
    fn evict_oldest_handshake(&mut self, ops: &mut EventOps, why: &str) -> bool {
        let oldest = self.indices(ConnState::Handshaking).min_by_key(|&i| {
            self.conns[i]
                .as_ref()
                .map(|c| (!matches!(c.hs, Hs::Hello), c.accepted))
        });
        match oldest {
            Some(i) => {
                if let Some(c) = self.conns[i].as_mut() {
                    c.blameless = true;
                }
                self.reject(ops, i, RejectCode::Busy, format!("refused: {why}"));
                true
            }
            None => false,
        }
    }

    /// Notes a failed handshake from `ip`.
    fn note_failure_from(&mut self, ip: std::net::IpAddr) {
        let now = Instant::now();
        if self.penalty.len() > 4096 {
            self.penalty
                .retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
        }
        let e = self.penalty.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Whether `ip` failed too many handshakes this second.
    fn penalized(&self, ip: std::net::IpAddr) -> bool {
        self.penalty
            .get(&ip)
            .is_some_and(|(t, n)| *n >= PENALTY_FAILURES && t.elapsed() < Duration::from_secs(1))
    }

    fn admit(&mut self, ops: &mut EventOps, sock: Socket, peer: SocketAddr) {
        if self.penalized(peer.ip()) {
            // Closed unread (a reset): the address keeps failing handshakes.
            self.report_rejected(
                peer,
                RejectKind::Closed(Closed::Flood),
                format!(
                    "{} failed {PENALTY_FAILURES} handshakes within a second: closed at once \
                     for the rest of it",
                    peer.ip()
                ),
            );
            return;
        }
        // A stopping source still takes the HELLO: its REJECT `stopping` must be tagged, or a
        // keyed backup could not tell it from a forged one (it reads it as a missed STAND_DOWN).
        if self.joined >= self.cfg.max_backups {
            let why = format!("at the limit of {} backups", self.cfg.max_backups);
            let _ = (&sock).write(&auth::unauthenticated_reject(RejectCode::Busy, &why));
            self.report_rejected(peer, RejectKind::Code(RejectCode::Busy), why);
            return;
        }
        let from_peer = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.state == ConnState::Handshaking && c.peer.ip() == peer.ip())
            .count();
        if from_peer >= self.cfg.max_pending_per_addr {
            let why = format!(
                "more than {} handshakes pending from {}",
                self.cfg.max_pending_per_addr,
                peer.ip()
            );
            let _ = (&sock).write(&auth::unauthenticated_reject(RejectCode::Busy, &why));
            self.report_rejected(peer, RejectKind::Code(RejectCode::Busy), why);
            return;
        }
        if self.handshaking >= self.cfg.max_pending {
            let limit = self.cfg.max_pending;
            self.evict_oldest_handshake(ops, &format!("more than {limit} handshakes pending"));
        }
        // The socket is tuned (keepalive, user timeout) only once its HELLO is good: a flood of
        // garbage connections costs an accept, a read and a close each, not the tuning too.
        if let Err(e) = sock.set_nonblocking(true) {
            error!("backup {peer}: cannot set up socket: {e}");
            return;
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = ops.add(Events::with_data(
            &sock,
            TOKEN_CONN_BASE + idx as u32,
            EventSet::IN | EventSet::READ_HANG_UP,
        )) {
            error!("backup {peer}: cannot register: {e:?}");
            self.free.push(idx);
            return;
        }
        debug!("backup {peer} connected, waiting for HELLO");
        let now = Instant::now();
        self.conns[idx] = Some(Conn {
            sock,
            peer,
            reader: Reader::new(),
            hs: Hs::Hello,
            session: None,
            key_id: None,
            blameless: false,
            state: ConnState::Handshaking,
            deadline: Some(now + self.cfg.handshake_timeout),
            accepted: now,
            joined_at: None,
            keepalive: None,
            node: String::new(),
            outbox: Vec::new(),
            shutdown_after_flush: false,
            slow: None,
            stood_down: false,
            arbiter_ok: None,
            why: String::new(),
            refused: None,
        });
        self.handshaking += 1;
        self.arm_sweep();
        // A real backup's HELLO is usually queued already: read it now, so that a flood of
        // connections accepted after it cannot push it out before it is seen.
        self.on_conn(ops, idx, EventSet::IN);
    }

    fn on_conn(&mut self, ops: &mut EventOps, idx: usize, set: EventSet) {
        if set.contains(EventSet::OUT) {
            self.flush(ops, idx);
        }
        let mut buf = [0u8; 512];
        loop {
            let Some(conn) = self.conns.get_mut(idx).and_then(|c| c.as_mut()) else {
                return;
            };
            match (&conn.sock).read(&mut buf) {
                Ok(0) => {
                    // A backup that cannot verify our WELCOME hangs up without AUTH; when the
                    // HELLO already doomed the handshake, say why (locally).
                    let why = match &conn.hs {
                        Hs::Auth(aw) => match aw.doomed() {
                            Some(d) => format!("hung up during the handshake: {d}"),
                            None => "hung up during the handshake (after WELCOME)".to_string(),
                        },
                        _ => "EOF".to_string(),
                    };
                    return self.conn_input(ops, idx, ConnInput::Eof, why);
                }
                Ok(n) => {
                    if conn.state == ConnState::Closing {
                        // Told to go: whatever it still says no longer matters.
                        continue;
                    }
                    conn.reader.push(&buf[..n]);
                    loop {
                        let Some(conn) = self.conns[idx].as_mut() else {
                            return;
                        };
                        if conn.state == ConnState::Closing {
                            break;
                        }
                        if conn.state == ConnState::Handshaking {
                            if matches!(conn.hs, Hs::Failed { .. }) {
                                // Its answer is fixed; nothing it adds changes it.
                                conn.reader = Reader::new();
                                break;
                            }
                            match conn.reader.next_handshake() {
                                Ok(None) => break,
                                Ok(Some(bytes)) => self.on_handshake(ops, idx, &bytes),
                                Err(e) => self.on_handshake_error(ops, idx, e),
                            }
                            continue;
                        }
                        let Some(session) = conn.session.as_mut() else {
                            break;
                        };
                        match conn.reader.next_frame(session) {
                            Ok(None) => break,
                            Ok(Some(frame)) => self.on_frame(ops, idx, frame),
                            Err(e) => {
                                error!("protocol error from {}: {e}", conn.peer);
                                self.on_protocol_error(ops, idx, &e);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.conn_input(ops, idx, ConnInput::Failed, e.to_string()),
            }
        }
    }

    /// One whole handshake frame: HELLO (answered with WELCOME or a REJECT), then AUTH.
    fn on_handshake(&mut self, ops: &mut EventOps, idx: usize, bytes: &[u8]) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        match std::mem::replace(&mut c.hs, Hs::Done) {
            Hs::Hello => {
                let hs = match SourceHandshake::on_hello(
                    &self.cfg.credentials,
                    &self.cfg.pair_id,
                    bytes,
                    &mut self.entropy,
                ) {
                    Ok(hs) => hs,
                    Err(e) => {
                        c.hs = Hs::Hello;
                        let why = e.to_string();
                        let code = e.reject_code();
                        return self.reject_with(ops, idx, &auth::reject_for_error(&e), code, why);
                    }
                };
                let node = hs.peer_node().to_string();
                let refusal = if self.state.is_done() || self.state.handing_off() {
                    Some((
                        RejectCode::Stopping,
                        "the source is stopping or handing off",
                    ))
                } else if self.policy.arbitrated == node.is_empty() {
                    // Arbitration guards a pair only when both sides use it: a backup without
                    // it would start its copy on the link's word alone.
                    Some((
                        RejectCode::Arbiter,
                        if node.is_empty() {
                            "this source uses an arbiter; the backup must use one too"
                        } else {
                            "this source has no arbiter; the backup must not use one either"
                        },
                    ))
                } else {
                    None
                };
                if let Some((code, why)) = refusal {
                    let bytes = hs.reject(code, why);
                    return self.reject_with(ops, idx, &bytes, code, why.to_string());
                }
                let info = WelcomeInfo {
                    heartbeat: self.cfg.heartbeat,
                    node: self.cfg.node.clone(),
                    fence_grace: self.arbiter.as_ref().map_or(Duration::ZERO, |a| a.grace),
                };
                if let Err(e) = crate::tune_socket(&c.sock, &self.cfg.keepalive) {
                    let why = format!("cannot set up the socket: {e}");
                    return self.conn_input(ops, idx, ConnInput::Failed, why);
                }
                let (awaiting, welcome) = hs.welcome(&info);
                c.hs = Hs::Auth(awaiting);
                if let Err(e) = self.write_raw(idx, &welcome) {
                    // The backup never saw WELCOME, so it never armed: closing is safe.
                    let why = format!("WELCOME could not be sent: {e}");
                    return self.conn_input(ops, idx, ConnInput::Failed, why);
                }
                self.flush(ops, idx);
            }
            Hs::Auth(awaiting) => match awaiting.on_auth(bytes) {
                Ok(accepted) => {
                    c.session = Some(accepted.session);
                    c.key_id = accepted.key_id;
                    self.lost_backups.remove(&accepted.node);
                    c.node = accepted.node;
                    self.conn_input(ops, idx, ConnInput::HelloOk, String::new());
                }
                Err(f) => self.auth_failed(idx, f.to_string()),
            },
            other => c.hs = other,
        }
    }

    /// Bytes that do not decode during the handshake: before WELCOME a REJECT saying what was
    /// wrong; after it, the one answer every failure gets.
    fn on_handshake_error(&mut self, ops: &mut EventOps, idx: usize, e: ProtocolError) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        if matches!(c.hs, Hs::Auth(_)) {
            return self.auth_failed(idx, format!("no valid AUTH: {e}"));
        }
        debug!("handshake error from {}: {e}", c.peer);
        let why = e.to_string();
        let code = e.reject_code();
        self.reject_with(ops, idx, &auth::reject_for_error(&e), code, why);
    }

    /// The handshake failed after WELCOME: the same answer whatever failed, after the same
    /// delay from the arrival of the bytes (the handshake deadline still applies). Why it failed
    /// is for the local report only.
    fn auth_failed(&mut self, idx: usize, why: String) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        let (_, delay) = auth::auth_failure_answer();
        let answer_at = Instant::now() + delay;
        c.hs = Hs::Failed { answer_at, why };
        if c.deadline.is_none_or(|d| d > answer_at) {
            c.deadline = Some(answer_at);
        }
        self.arm_sweep();
    }

    fn on_protocol_error(&mut self, ops: &mut EventOps, idx: usize, e: &ProtocolError) {
        let state = self.conns[idx].as_ref().map(|c| c.state);
        match state {
            Some(ConnState::Handshaking) => self.reject(ops, idx, e.reject_code(), e.to_string()),
            Some(_) => self.conn_input(ops, idx, ConnInput::Unexpected, e.to_string()),
            None => {}
        }
    }

    fn on_frame(&mut self, ops: &mut EventOps, idx: usize, frame: Frame) {
        let Some(c) = self.conns[idx].as_mut() else {
            return;
        };
        match (c.state, frame) {
            (
                ConnState::Joined | ConnState::Target | ConnState::Closing,
                Frame::ArbiterStatus { reachable },
            ) => {
                c.arbiter_ok = Some(reachable);
                debug!("backup {} reaches its arbiter: {reachable}", c.peer);
                if let Some(a) = self.arbiter.as_mut() {
                    let troubled = a.troubled || a.lease_until.is_none();
                    if reachable && troubled && !a.rejoin_spent {
                        // The arbiter is back for that backup: try ours now, briefly, before
                        // the failsafe gives way (a takeover for an arbiter blip is a nuisance).
                        let window = a.session.ttl() / 2;
                        a.rejoin_until = Some(Instant::now() + window);
                        a.rejoin_spent = true;
                        a.session.renew_now();
                        info!("a backup reaches the arbiter again; retrying ours for {window:?}");
                    }
                }
                self.check_fence(ops);
            }
            (ConnState::Target, Frame::HandoffResult { status, detail }) => {
                let s = match status {
                    protocol::HandoffStatus::Started => "started",
                    protocol::HandoffStatus::Failed => "failed",
                    protocol::HandoffStatus::Uncertain => "uncertain",
                };
                info!("backup {} reports its start: {s} {detail}", c.peer);
                if status != protocol::HandoffStatus::Started {
                    let stage = "backup-start";
                    let error = if detail.is_empty() {
                        s.to_string()
                    } else {
                        detail
                    };
                    self.note_failure(stage, error);
                }
                self.conn_input(ops, idx, ConnInput::HandoffResult, s.to_string());
            }
            (_, f) => {
                let why = format!("unexpected {} from a joined backup", f.name());
                self.conn_input(ops, idx, ConnInput::Unexpected, why);
            }
        }
    }

    fn on_heartbeat_tick(&mut self, ops: &mut EventOps) {
        // Expirations coalesce: a loop that was late sends one heartbeat, not a burst.
        if self.heartbeat_timer.expirations() == 0 {
            return;
        }
        self.beat_if_due(ops);
    }

    /// Sends the heartbeat if it is due. Called from the heartbeat timer and at the start of
    /// every event this subscriber handles, so that a long batch of other events (a connection
    /// burst) cannot hold a heartbeat back until the batch is done.
    fn beat_if_due(&mut self, ops: &mut EventOps) {
        let (Some(due), Some(every)) = (self.next_beat, self.cfg.heartbeat) else {
            return;
        };
        let now = Instant::now();
        if now < due {
            return;
        }
        if self.state.is_done() || self.joined == 0 {
            self.next_beat = None;
            let _ = self.heartbeat_timer.disarm();
            return;
        }
        // Keep the timer's phase: the next beat is the first tick after now.
        let mut next = due + every;
        while next <= now {
            next += every;
        }
        self.next_beat = Some(next);
        // The timer stays armed through a handoff, so that backups still joined after a failed
        // one get heartbeats again; while HANDOFF is out, nothing is sent.
        if !self.state.beats() {
            return;
        }
        for idx in self.send_heartbeats() {
            // A beat the socket did not take whole waits in the outbox: watch EPOLLOUT for it.
            self.flush(ops, idx);
        }
    }

    /// Sends a sealed HEARTBEAT to every joined backup that reads; returns the connections
    /// left with bytes in their outbox.
    fn send_heartbeats(&mut self) -> Vec<usize> {
        self.seq += 1;
        let limit = self.cfg.slow_unsent;
        let mut notices = Vec::new();
        let mut pending = Vec::new();
        let mut sent = 0;
        for (idx, c) in self
            .conns
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_mut()?)))
        {
            if c.state != ConnState::Joined {
                continue;
            }
            // A backup that does not read gets no more heartbeats queued: there stays room for
            // the final frame.
            // Asked every `UNSENT_CHECK_EVERY` beats (and every beat while it does not read):
            // a syscall per link per beat is what 1,000 links cannot afford, and a few beats
            // more in the queue change nothing (they stay far below the send buffer).
            let check = c.slow.is_some() || self.seq.is_multiple_of(UNSENT_CHECK_EVERY);
            let unsent = if !c.outbox.is_empty() {
                usize::MAX
            } else if check {
                unsent_bytes(&c.sock)
            } else {
                0
            };
            // It is alive and not reading (not dead) when everything sent was acknowledged and
            // only its closed window holds the rest back: then the kernel must not abort it.
            let alive_not_reading = unsent > limit && acked_all(&c.sock);
            match (c.slow, alive_not_reading) {
                (None, false) if unsent > limit => continue,
                (None, true) => {
                    c.slow = Some(1);
                    // Since Linux 5.x TCP_USER_TIMEOUT also ends zero-window probing of a peer
                    // that answers: lift it while this backup does not read.
                    let _ = c.sock.set_tcp_user_timeout(None);
                    notices.push(SourceNotice::BackupSlow {
                        peer: c.peer,
                        unsent,
                    });
                    continue;
                }
                (Some(n), true) => {
                    c.slow = Some(n + 1);
                    continue;
                }
                (Some(skipped), false) if unsent > limit => {
                    // Unacknowledged data again: no longer surely "alive and not reading", so the
                    // user timeout applies again; still no beat queued.
                    c.slow = None;
                    let ut = c.keepalive.and_then(|k| k.user_timeout);
                    let _ = c.sock.set_tcp_user_timeout(ut);
                    debug!(
                        "backup {}: data unacknowledged after {skipped} skipped",
                        c.peer
                    );
                    continue;
                }
                (Some(skipped), false) => {
                    c.slow = None;
                    let ut = c.keepalive.and_then(|k| k.user_timeout);
                    let _ = c.sock.set_tcp_user_timeout(ut);
                    notices.push(SourceNotice::BackupCaughtUp {
                        peer: c.peer,
                        skipped,
                    });
                }
                (None, false) => {}
            }
            let Some(session) = c.session.as_mut() else {
                continue;
            };
            // Sealed only when it is sent: every sealed frame must arrive, in order (a gap is a
            // protocol violation at the backup).
            let bytes = session.seal_heartbeat(self.seq);
            match (&c.sock).write(&bytes) {
                Ok(n) if n == bytes.len() => sent += 1,
                // A frame is never cut: the rest waits in the outbox (and further heartbeats are
                // skipped until it is out).
                Ok(n) => {
                    c.outbox.extend_from_slice(&bytes[n..]);
                    pending.push(idx);
                    sent += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.outbox.extend_from_slice(&bytes);
                    pending.push(idx);
                    sent += 1;
                }
                // The reading side sees the same error and reports it.
                Err(e) => debug!("heartbeat to {}: {e}", c.peer),
            }
        }
        if sent > 0 {
            self.counters.sent(sent);
        }
        for n in &notices {
            match n {
                SourceNotice::BackupSlow { peer, unsent } => {
                    warn!(
                        "backup {peer} does not read ({unsent} bytes unsent): heartbeats skipped"
                    );
                }
                SourceNotice::BackupCaughtUp { peer, skipped } => {
                    info!("backup {peer} reads again ({skipped} heartbeats skipped)");
                }
                _ => {}
            }
            (self.observer)(n);
        }
        pending
    }

    fn arm_sweep(&mut self) {
        let next = self.conns.iter().flatten().filter_map(|c| c.deadline).min();
        if let Some(d) = next {
            let _ = self
                .sweep_timer
                .arm(d.saturating_duration_since(Instant::now()), None);
        }
    }

    fn on_sweep(&mut self, ops: &mut EventOps) {
        if self.sweep_timer.expirations() == 0 {
            return;
        }
        let now = Instant::now();
        let stale: Vec<(usize, ConnState)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                (c.deadline? <= now).then_some((i, c.state))
            })
            .collect();
        let t = self.cfg.handshake_timeout;
        for (idx, state) in stale {
            let failed = self.conns[idx].as_mut().and_then(|c| match &mut c.hs {
                Hs::Failed { answer_at, why } if *answer_at <= now => Some(std::mem::take(why)),
                _ => None,
            });
            if let Some(why) = failed {
                let (bytes, _) = auth::auth_failure_answer();
                let why = format!("authentication failed: {why}");
                self.reject_with(ops, idx, bytes, RejectCode::Auth, why);
                continue;
            }
            match state {
                ConnState::Handshaking => self.conn_input(
                    ops,
                    idx,
                    ConnInput::HandshakeTimeout,
                    format!("no complete handshake within {t:?}"),
                ),
                // Told to go and still not closed: the frame went out long ago; close.
                _ => {
                    if let Some(c) = self.conns[idx].as_mut() {
                        c.state = ConnState::Closed;
                    }
                    self.remove(ops, idx);
                }
            }
        }
        self.check_drained();
        self.arm_sweep();
    }

    fn on_job_timer(&mut self, ops: &mut EventOps) {
        if self.job_timer.expirations() == 0 {
            return;
        }
        match self.state {
            State::Pausing => {
                let t = self.cfg.pause_timeout;
                self.note_failure(
                    "pause",
                    format!("the pause hook did not return within {t:?}"),
                );
                self.feed(ops, Input::PauseTimeout);
            }
            State::AwaitingBackup => {
                let t = self.cfg.handoff_timeout;
                self.note_failure(
                    "backup-start",
                    format!("no result from the backup within {t:?}"),
                );
                self.feed(ops, Input::ResultTimeout);
            }
            State::HandingOver => {
                let t = self.cfg.pause_timeout;
                self.note_failure(
                    "hand-over",
                    format!("no answer from the arbiter within {t:?}"),
                );
                self.feed(ops, Input::HandOverFailed);
            }
            State::Resuming => {
                self.resumed = false;
                let t = self.cfg.pause_timeout;
                self.note_failure(
                    "resume",
                    format!("the resume hook did not return within {t:?}"),
                );
                self.feed(ops, Input::ResumeFailed);
            }
            State::StoodDown if !self.stood_down_reported => self.finish_stand_down(),
            _ => {}
        }
    }

    fn on_mailbox(&mut self, ops: &mut EventOps) {
        for msg in self.mailbox.drain() {
            match msg {
                Msg::StandDown => self.feed(ops, Input::StandDownRequested),
                Msg::Handoff => {
                    let joined = self.joined;
                    self.feed(ops, Input::HandoffRequested { joined });
                }
                // A result that comes after its deadline finds the machine elsewhere: ignored.
                Msg::Paused((r, took)) if self.state == State::Pausing => {
                    let _ = self.job_timer.disarm();
                    match r.and_then(|x| x) {
                        Ok(()) => {
                            info!("guest paused in {took:?}");
                            (self.observer)(&SourceNotice::HandoffPaused);
                            let joined = self.joined;
                            self.feed(ops, Input::Paused { joined });
                            if self.state == State::Resuming {
                                self.note_failure(
                                    "pause",
                                    "every backup left during the pause".into(),
                                );
                            }
                        }
                        Err(e) => {
                            self.note_failure("pause", e);
                            self.feed(ops, Input::PauseFailed);
                        }
                    }
                }
                Msg::Resumed((r, _)) if self.state == State::Resuming => {
                    let _ = self.job_timer.disarm();
                    match r.and_then(|x| x) {
                        Ok(()) => {
                            self.resumed = true;
                            self.feed(ops, Input::Resumed);
                        }
                        Err(e) => {
                            self.resumed = false;
                            self.note_failure("resume", e);
                            self.feed(ops, Input::ResumeFailed);
                        }
                    }
                }
                Msg::Paused(_) | Msg::Resumed(_) => debug!("late hook result ignored"),
                Msg::Fenced((r, _)) => {
                    let pause_error = r.and_then(|x| x).err();
                    let why = self
                        .failure
                        .take()
                        .map(|(_, e)| e)
                        .unwrap_or_else(|| "the lease ran out".into());
                    error!("fenced: {why}");
                    (self.observer)(&SourceNotice::Fenced { why, pause_error });
                }
                Msg::Session(ev) => self.on_session(ops, ev),
                Msg::HandedOver(r) if self.state == State::HandingOver => {
                    let _ = self.job_timer.disarm();
                    match r {
                        Ok(()) => self.feed(ops, Input::HandedOver),
                        Err(e) => {
                            self.note_failure("hand-over", e.to_string());
                            self.feed(ops, Input::HandOverFailed);
                        }
                    }
                }
                Msg::HandedOver(_) => debug!("late hand-over result ignored"),
                Msg::Reclaimed(r) => self.on_reclaimed(ops, r),
                Msg::Reacquired(r) => self.on_reacquired(ops, r),
            }
        }
    }
}

/// Writes the outbox; an error means the connection is dead (its reader reports it).
fn write_out(c: &mut Conn) -> io::Result<()> {
    while !c.outbox.is_empty() {
        match (&c.sock).write(&c.outbox) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                c.outbox.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether the peer of `sock` is alive though it does not read: everything sent was acknowledged
/// (a closed window holds the rest back), or it acknowledged something within [`ALIVE_WINDOW`]
/// (a full receive queue drops new segments but still answers). A dead peer does neither.
fn acked_all(sock: &Socket) -> bool {
    crate::tcp_info(sock).is_ok_and(|i| {
        i.tcpi_unacked == 0 || Duration::from_millis(i.tcpi_last_ack_recv.into()) < ALIVE_WINDOW
    })
}

/// A peer that acknowledged something this recently is alive, even with data unacknowledged:
/// a receiver whose queue is full drops new segments but still answers.
const ALIVE_WINDOW: Duration = Duration::from_secs(1);

/// Bytes written to `sock` that the kernel has not sent yet (`SIOCOUTQNSD`): above zero only while
/// the peer's window is closed, i.e. while the backup does not read.
fn unsent_bytes(sock: &Socket) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCOUTQNSD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

impl MutEventSubscriber for SourceListener {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.listener.as_raw_fd(), TOKEN_LISTEN),
            (self.heartbeat_timer.as_raw_fd(), TOKEN_HEARTBEAT),
            (self.sweep_timer.as_raw_fd(), TOKEN_SWEEP),
            (self.mailbox.as_raw_fd(), TOKEN_MAILBOX),
            (self.job_timer.as_raw_fd(), TOKEN_JOB),
            (self.accept_timer.as_raw_fd(), TOKEN_ACCEPT),
            (self.fence_timer.as_raw_fd(), TOKEN_FENCE),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                error!("cannot register source fd {fd}: {e:?}");
            } else if token == TOKEN_LISTEN {
                self.listener_registered = true;
            }
        }
        info!(
            "listening on {} (pair {})",
            self.local_addr, self.cfg.pair_id
        );
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.beat_if_due(ops);
        match events.data() {
            TOKEN_LISTEN => self.accept_all(ops),
            TOKEN_HEARTBEAT => self.on_heartbeat_tick(ops),
            TOKEN_SWEEP => self.on_sweep(ops),
            TOKEN_MAILBOX => self.on_mailbox(ops),
            TOKEN_JOB => self.on_job_timer(ops),
            TOKEN_ACCEPT => self.resume_accept(ops),
            TOKEN_FENCE => self.on_fence_timer(ops),
            t if t >= TOKEN_CONN_BASE => {
                self.on_conn(ops, (t - TOKEN_CONN_BASE) as usize, events.event_set());
            }
            t => warn!("source: event for unknown token {t}"),
        }
    }
}
