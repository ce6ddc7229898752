// SPDX-License-Identifier: Apache-2.0
//! The backup side: an event-manager subscriber that connects to the source, arms the link, and
//! calls the `VmStart` hook exactly once when the armed link is lost.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use socket2::{Domain, Protocol, Socket, Type};
use vmm_keepalive::{EffectiveKeepalive, KeepaliveSpec};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::hook::{TakeoverReason, TakeoverRecord, VmStart};
use crate::link::{step, LinkEvent, LinkState, SocketFailure, Verdict};
use crate::protocol::{
    validate_pair_id, Frame, FrameReader, ProtocolError, MAX_HEARTBEAT, MIN_HEARTBEAT,
};
use crate::timer::Timer;
use crate::Error;

const TOKEN_SOCK: u32 = 0;
const TOKEN_TIMER: u32 = 1;
const TOKEN_HOOK_DONE: u32 = 2;

/// Configuration of a [`BackupMonitor`].
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The source's heartbeat address.
    pub connect: SocketAddr,
    /// The VM pair this backup stands in for.
    pub pair_id: String,
    /// Keepalive applied to the socket before connect.
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
    /// Enforce the keepalive bound with a precise timer of our own as well (takes over as
    /// `timed-out` once no data or ACK arrived for `idle + intvl × cnt`). The kernel's keepalive
    /// timers run on jiffies and their lateness adds up over `cnt + 1` hops: up to ~200 ms past
    /// the bound at HZ=250. The watchdog checks the kernel's own `TCP_INFO` timestamps, so it
    /// never fires while probes are being answered.
    pub keepalive_watchdog: bool,
}

impl BackupConfig {
    /// Defaults for everything but the address and pair id.
    pub fn new(connect: SocketAddr, pair_id: impl Into<String>) -> Self {
        BackupConfig {
            connect,
            pair_id: pair_id.into(),
            keepalive: KeepaliveSpec::DEFAULT,
            handshake_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            heartbeat_misses: 3,
            heartbeat_min: MIN_HEARTBEAT,
            heartbeat_max: MAX_HEARTBEAT,
            keepalive_watchdog: true,
        }
    }

    /// Checks the values that can be wrong.
    pub fn validate(&self) -> Result<(), Error> {
        validate_pair_id(&self.pair_id).map_err(Error::Config)?;
        if self.heartbeat_misses == 0 {
            return Err(Error::Config(
                "heartbeat misses must be at least 1".to_string(),
            ));
        }
        if self.handshake_timeout.is_zero() || self.backoff_min.is_zero() {
            return Err(Error::Config(
                "handshake timeout and backoff must be above zero".to_string(),
            ));
        }
        Ok(())
    }
}

/// What the backup reports to its owner.
#[derive(Debug)]
pub enum BackupNotice<'a> {
    /// A connect attempt started.
    Connecting {
        /// Source address.
        addr: SocketAddr,
        /// 1 for the first attempt.
        attempt: u64,
    },
    /// The attempt failed; the next starts after `delay`.
    Retrying {
        /// What went wrong.
        why: String,
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// The link armed: from now on its loss means takeover.
    Armed {
        /// The source's address.
        peer: SocketAddr,
        /// Keepalive values read back from the socket.
        keepalive: Option<EffectiveKeepalive>,
        /// Heartbeat interval announced by the source.
        heartbeat: Option<Duration>,
        /// The heartbeat deadline (`interval × misses`), in heartbeat mode.
        deadline: Option<Duration>,
    },
    /// The source stood down in order: nothing runs.
    StandDown,
    /// Takeover decided; `vm_start` is being called off the loop.
    Takeover(&'a TakeoverRecord),
    /// `vm_start` returned.
    HookFinished {
        /// `Err` carries the hook's error text.
        result: Result<(), String>,
        /// How long `vm_start` took.
        took: Duration,
    },
}

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

/// Receives [`BackupNotice`]s on the event loop. Must not block. `Send`, so that the subscriber
/// can live in an `Arc<Mutex<_>>` shared with a VMM's API thread, as Firecracker's do.
pub type BackupObserver = Box<dyn FnMut(&BackupNotice<'_>) + Send>;

type HookResult = (Result<(), String>, Duration);

/// The backup's event-manager subscriber.
pub struct BackupMonitor {
    cfg: BackupConfig,
    state: LinkState,
    sock: Option<Socket>,
    reader: FrameReader,
    /// One timer per link, its meaning given by the state: retry backoff or handshake timeout
    /// before arming, heartbeat deadline after. Two fds per idle link, not four, at 1,000 links.
    timer: Timer,
    hook: Option<Box<dyn VmStart>>,
    /// Created at takeover only: an idle link needs no eventfd.
    hook_done: Option<EventFd>,
    hook_rx: Option<mpsc::Receiver<HookResult>>,
    observer: BackupObserver,
    attempt: u64,
    backoff: Duration,
    armed_at: Option<SystemTime>,
    keepalive: Option<EffectiveKeepalive>,
    heartbeat: Option<Duration>,
    last_rx: Instant,
    /// The keepalive bound the watchdog enforces, while armed.
    watchdog: Option<Duration>,
    stats: HeartbeatStats,
    record: Option<TakeoverRecord>,
    last_errno: Option<i32>,
}

impl BackupMonitor {
    /// Creates the monitor; it starts connecting when registered with an `EventManager`.
    pub fn new(
        cfg: BackupConfig,
        hook: Box<dyn VmStart>,
        observer: BackupObserver,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        Ok(BackupMonitor {
            backoff: cfg.backoff_min,
            cfg,
            state: LinkState::Connecting,
            sock: None,
            reader: FrameReader::new(),
            timer: Timer::new().map_err(Error::Resource)?,
            hook: Some(hook),
            hook_done: None,
            hook_rx: None,
            observer,
            attempt: 0,
            armed_at: None,
            keepalive: None,
            heartbeat: None,
            last_rx: Instant::now(),
            watchdog: None,
            stats: HeartbeatStats::default(),
            record: None,
            last_errno: None,
        })
    }

    /// Where the link is.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Heartbeats received on the current link and the longest gap between them.
    pub fn heartbeat_stats(&self) -> HeartbeatStats {
        self.stats
    }

    /// The heartbeat deadline in force (`interval × misses`), in heartbeat mode.
    pub fn deadline(&self) -> Option<Duration> {
        self.heartbeat.map(|hb| hb * self.cfg.heartbeat_misses)
    }

    /// The takeover record, once the backup took over.
    pub fn record(&self) -> Option<&TakeoverRecord> {
        self.record.as_ref()
    }

    fn connect(&mut self, ops: &mut EventOps) {
        self.attempt += 1;
        (self.observer)(&BackupNotice::Connecting {
            addr: self.cfg.connect,
            attempt: self.attempt,
        });
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
                self.handle(ops, LinkEvent::Failed(f), &format!("connect: {e}"));
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
        crate::tune_socket(&sock, &self.cfg.keepalive)?;
        match sock.connect(&self.cfg.connect.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(sock)
    }

    /// Closes the link and stops its timer.
    fn drop_socket(&mut self, ops: &mut EventOps) {
        if let Some(sock) = self.sock.take() {
            // Deregister before close so that a recycled fd number never meets a stale entry.
            let _ = ops.remove(Events::empty(&sock));
        }
        self.reader = FrameReader::new();
        let _ = self.timer.disarm();
    }

    /// Feeds an event through the state machine and carries out the verdict.
    fn handle(&mut self, ops: &mut EventOps, ev: LinkEvent, detail: &str) {
        let (next, verdict) = step(self.state, ev);
        debug!(
            "link {:?} + {ev:?} -> {next:?}, {verdict:?} ({detail})",
            self.state
        );
        self.state = next;
        match verdict {
            Verdict::Nothing => {}
            Verdict::Arm => self.arm(),
            Verdict::Retry => {
                self.drop_socket(ops);
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
                (self.observer)(&BackupNotice::Retrying {
                    why: detail.to_string(),
                    delay,
                });
                let _ = self.timer.arm(delay, None);
            }
            Verdict::StandDown => {
                info!("source stood down in order: not taking over");
                self.drop_socket(ops);
                (self.observer)(&BackupNotice::StandDown);
            }
            Verdict::TakeOver(reason) => {
                let errno = match ev {
                    LinkEvent::Failed(_) => self.last_errno,
                    _ => None,
                };
                self.take_over(ops, reason, errno, detail);
            }
        }
    }

    fn arm(&mut self) {
        let _ = self.timer.disarm();
        self.backoff = self.cfg.backoff_min;
        self.armed_at = Some(SystemTime::now());
        let sock = self.sock.as_ref().expect("armed without a socket");
        self.keepalive = match EffectiveKeepalive::read_from(sock) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("cannot read keepalive back: {e}");
                None
            }
        };
        self.watchdog = self
            .keepalive
            .and_then(|k| k.bound())
            .filter(|_| self.cfg.keepalive_watchdog);
        self.stats = HeartbeatStats::default();
        self.last_rx = Instant::now();
        let deadline = self.deadline();
        if deadline.is_some() || self.watchdog.is_some() {
            let _ = self.timer.arm(self.next_check(), None);
        }
        let peer = self.cfg.connect;
        info!("link to {peer} armed (pair {})", self.cfg.pair_id);
        (self.observer)(&BackupNotice::Armed {
            peer,
            keepalive: self.keepalive,
            heartbeat: self.heartbeat,
            deadline,
        });
    }

    fn take_over(
        &mut self,
        ops: &mut EventOps,
        reason: TakeoverReason,
        errno: Option<i32>,
        detail: &str,
    ) {
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
            epoch: None,
            detail: detail.to_string(),
        };
        // The guest first: everything else (closing the link, logs, the owner's notice, which
        // may print) happens while vm_start already runs.
        let spawn_error = self.spawn_hook(ops, &record);
        self.drop_socket(ops);
        warn!("taking over: {reason} ({detail})");
        (self.observer)(&BackupNotice::Takeover(&record));
        if let Some(e) = spawn_error {
            error!("{e}");
            (self.observer)(&BackupNotice::HookFinished {
                result: Err(e),
                took: Duration::ZERO,
            });
        }
        self.record = Some(record);
    }

    /// Runs the hook on a thread of its own; its result comes back through an eventfd. Returns
    /// why it could not be started, if so. Should the eventfd be unavailable (fd exhaustion),
    /// the hook still runs: a guest started without a report beats a guest not started.
    fn spawn_hook(&mut self, ops: &mut EventOps, record: &TakeoverRecord) -> Option<String> {
        // `take` makes the hook unreachable after its first use, whatever the state machine says.
        let mut hook = self.hook.take()?;
        let done = match self.completion_fd(ops) {
            Ok(done) => Some(done),
            Err(e) => {
                error!("vm_start runs, but its result cannot be reported: {e}");
                None
            }
        };
        let (tx, rx) = mpsc::channel();
        self.hook_rx = Some(rx);
        let rec = record.clone();
        std::thread::Builder::new()
            .name("vm-start".into())
            .spawn(move || {
                let t = Instant::now();
                // A panicking hook is a failed start that is still reported, never silence.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    hook.vm_start(&rec).map_err(|e| e.to_string())
                }))
                .unwrap_or_else(|_| Err("vm_start panicked".to_string()));
                match &r {
                    Ok(()) => info!("vm_start done in {:?}", t.elapsed()),
                    Err(e) => error!("vm_start failed after {:?}: {e}", t.elapsed()),
                }
                let _ = tx.send((r, t.elapsed()));
                if let Some(done) = done {
                    let _ = done.write(1);
                }
            })
            .err()
            .map(|e| format!("cannot spawn the vm_start thread: {e}"))
    }

    /// The eventfd the hook thread signals, registered on the loop; returns the thread's copy.
    fn completion_fd(&mut self, ops: &mut EventOps) -> io::Result<EventFd> {
        let evt = EventFd::new(EFD_NONBLOCK)?;
        let theirs = evt.try_clone()?;
        ops.add(Events::with_data(&evt, TOKEN_HOOK_DONE, EventSet::IN))
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.hook_done = Some(evt);
        Ok(theirs)
    }

    fn on_socket(&mut self, ops: &mut EventOps, set: EventSet) {
        if self.sock.is_none() {
            return;
        }
        if self.state == LinkState::Connecting {
            if !set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                return;
            }
            let sock = self.sock.as_ref().unwrap();
            match sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                    return self.handle(ops, LinkEvent::Failed(f), &format!("connect: {e}"));
                }
            }
            let hello = Frame::Hello {
                pair_id: self.cfg.pair_id.clone(),
                auth_tag: Vec::new(),
            }
            .encode();
            match (&*sock).write(&hello) {
                Ok(n) if n == hello.len() => {}
                Ok(n) => {
                    return self.handle(
                        ops,
                        LinkEvent::Failed(SocketFailure::Other),
                        &format!("short HELLO write ({n} of {} bytes)", hello.len()),
                    )
                }
                Err(e) => {
                    let f = SocketFailure::from_errno(e.raw_os_error().unwrap_or(0));
                    return self.handle(ops, LinkEvent::Failed(f), &format!("send HELLO: {e}"));
                }
            }
            // Connected: from now on only readability (data, EOF, error) matters.
            let _ = ops.modify(Events::with_data(
                sock,
                TOKEN_SOCK,
                EventSet::IN | EventSet::READ_HANG_UP,
            ));
            self.handle(ops, LinkEvent::Connected, "connected, HELLO sent");
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
                Ok(0) => return self.handle(ops, LinkEvent::PeerClosed, "EOF from source"),
                Ok(n) => {
                    self.reader.push(&buf[..n]);
                    let drained = n < buf.len();
                    loop {
                        match self.reader.next_frame() {
                            Ok(Some(f)) => {
                                // No allocation on the heartbeat path: the detail of a good
                                // frame is its static name.
                                match self.frame_event(&f) {
                                    Ok(ev) => self.handle(ops, ev, f.name()),
                                    Err(e) => {
                                        error!("protocol error from {}: {e}", self.cfg.connect);
                                        self.handle(ops, LinkEvent::ProtocolError, &e.to_string());
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                error!("protocol error from {}: {e}", self.cfg.connect);
                                return self.handle(ops, LinkEvent::ProtocolError, &e.to_string());
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
                    let f = SocketFailure::from_errno(errno);
                    return self.handle(ops, LinkEvent::Failed(f), &format!("{e} (errno {errno})"));
                }
            }
        }
    }

    /// Maps a frame to a link event, checking it fits the current state.
    fn frame_event(&mut self, f: &Frame) -> Result<LinkEvent, ProtocolError> {
        match (self.state, f) {
            (LinkState::Handshaking, Frame::Welcome { heartbeat }) => {
                if let Some(hb) = heartbeat {
                    if *hb < self.cfg.heartbeat_min || *hb > self.cfg.heartbeat_max {
                        return Err(ProtocolError::BadPayload {
                            kind: f.kind(),
                            why: format!(
                                "source announced a heartbeat interval of {hb:?}; this backup \
                                 accepts {:?}..={:?}",
                                self.cfg.heartbeat_min, self.cfg.heartbeat_max
                            ),
                        });
                    }
                }
                self.heartbeat = *heartbeat;
                Ok(LinkEvent::Welcomed)
            }
            (LinkState::Handshaking, Frame::Reject { reason }) => {
                Err(ProtocolError::Rejected(reason.clone()))
            }
            (LinkState::Armed, Frame::Heartbeat { .. }) if self.heartbeat.is_some() => {
                let now = Instant::now();
                self.stats.record(now - self.last_rx);
                self.last_rx = now;
                Ok(LinkEvent::Heartbeat)
            }
            (LinkState::Armed, Frame::StandDown) => Ok(LinkEvent::StandDown),
            (LinkState::Armed, Frame::Handoff) => Ok(LinkEvent::Handoff),
            (LinkState::Handshaking, _) => {
                Err(ProtocolError::Unexpected(f.name(), "during the handshake"))
            }
            _ => Err(ProtocolError::Unexpected(f.name(), "on an armed link")),
        }
    }

    fn on_timer(&mut self, ops: &mut EventOps) {
        if self.state == LinkState::Armed {
            // No read(2) here: the deadline path either re-arms the timer (timerfd_settime clears
            // the expiration count) or ends the link. One syscall per deadline on a healthy link.
            return self.on_deadline(ops);
        }
        if self.timer.expirations() == 0 {
            return;
        }
        match self.state {
            LinkState::Connecting if self.sock.is_none() => self.connect(ops),
            LinkState::Connecting | LinkState::Handshaking => {
                let t = self.cfg.handshake_timeout;
                self.handle(
                    ops,
                    LinkEvent::HandshakeTimeout,
                    &format!("handshake not done within {t:?}"),
                )
            }
            LinkState::Armed | LinkState::StoodDown | LinkState::TakenOver => {}
        }
    }

    /// The armed link's one timer: the heartbeat deadline and the keepalive watchdog, whichever
    /// comes first.
    fn on_deadline(&mut self, ops: &mut EventOps) {
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
            if self.state != LinkState::Armed {
                return;
            }
        }
        match self.overdue() {
            Some((ev, detail)) => {
                if ev == LinkEvent::Failed(SocketFailure::TimedOut) {
                    self.last_errno = Some(libc::ETIMEDOUT);
                }
                self.handle(ops, ev, &detail)
            }
            None => {
                let next = self.next_check();
                let _ = self.timer.arm(next, None);
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

    /// The verdict-worthy event if a deadline has passed.
    fn overdue(&self) -> Option<(LinkEvent, String)> {
        if let Some(d) = self.deadline() {
            let since = self.last_rx.elapsed();
            if since >= d {
                return Some((
                    LinkEvent::HeartbeatDeadline,
                    format!("no HEARTBEAT for {since:?} (deadline {d:?})"),
                ));
            }
        }
        if let Some(b) = self.watchdog {
            let quiet = self.silence(b);
            if quiet >= b {
                return Some((
                    LinkEvent::Failed(SocketFailure::TimedOut),
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

    fn on_hook_done(&mut self) {
        if let Some(evt) = self.hook_done.as_ref() {
            let _ = evt.read();
        }
        if let Some(rx) = self.hook_rx.as_ref() {
            if let Ok((result, took)) = rx.try_recv() {
                (self.observer)(&BackupNotice::HookFinished { result, took });
            }
        }
    }
}

/// How long the kernel has heard nothing on `sock`: the lesser of `TCP_INFO`'s time since the last
/// data and since the last ACK received — the same quantity the kernel's keepalive timer uses.
fn tcp_silence(sock: &Socket) -> io::Result<Duration> {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, a pointer to a properly sized buffer and its length.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let ms = info.tcpi_last_data_recv.min(info.tcpi_last_ack_recv);
    Ok(Duration::from_millis(ms as u64))
}

impl MutEventSubscriber for BackupMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            error!("cannot register the backup timer: {e:?}");
        }
        self.connect(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOCK => self.on_socket(ops, events.event_set()),
            TOKEN_TIMER => self.on_timer(ops),
            TOKEN_HOOK_DONE => self.on_hook_done(),
            t => warn!("backup: event for unknown token {t}"),
        }
    }
}
