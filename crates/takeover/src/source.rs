// SPDX-License-Identifier: Apache-2.0
//! The source side: an event-manager subscriber that owns the heartbeat listen socket, accepts and
//! handshakes backups, sends heartbeats, and tells backups about orderly stops and handoffs.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use socket2::{Domain, Protocol, Socket, Type};
use vmm_keepalive::{EffectiveKeepalive, KeepaliveSpec};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::hook::VmPause;
use crate::protocol::{
    validate_pair_id, Frame, FrameReader, ProtocolError, MAX_HEARTBEAT, MIN_HEARTBEAT,
};
use crate::timer::Timer;
use crate::Error;

const TOKEN_LISTEN: u32 = 0;
const TOKEN_HEARTBEAT: u32 = 1;
const TOKEN_SWEEP: u32 = 2;
const TOKEN_HANDOFF: u32 = 3;
/// Connection `i` uses token `TOKEN_CONN_BASE + i`.
const TOKEN_CONN_BASE: u32 = 16;

/// Configuration of a [`SourceListener`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Address to listen on (port 0 picks a free one; see [`SourceListener::local_addr`]).
    pub listen: SocketAddr,
    /// The VM pair this source serves; backups with another id are refused.
    pub pair_id: String,
    /// Keepalive applied to every accepted backup connection.
    pub keepalive: KeepaliveSpec,
    /// A backup that has not completed HELLO within this time is dropped.
    pub handshake_timeout: Duration,
    /// Send HEARTBEAT frames from the event loop at this interval (`None`: keepalive only).
    pub heartbeat: Option<Duration>,
    /// Most backups served at once; more are refused.
    pub max_backups: usize,
}

impl SourceConfig {
    /// Defaults for everything but the address and pair id.
    pub fn new(listen: SocketAddr, pair_id: impl Into<String>) -> Self {
        SourceConfig {
            listen,
            pair_id: pair_id.into(),
            keepalive: KeepaliveSpec::DEFAULT,
            handshake_timeout: Duration::from_secs(2),
            heartbeat: None,
            max_backups: 4096,
        }
    }
}

/// What the source reports to its owner.
#[derive(Debug)]
pub enum SourceNotice<'a> {
    /// A backup completed the handshake.
    BackupJoined {
        /// Its address.
        peer: SocketAddr,
        /// Keepalive read back from its socket.
        keepalive: Option<&'a EffectiveKeepalive>,
    },
    /// A connection was refused during the handshake (bad frame, wrong pair id, timeout...).
    BackupRejected {
        /// Its address.
        peer: SocketAddr,
        /// Why.
        why: String,
    },
    /// A joined backup went away: redundancy is degraded, nothing else happens.
    BackupLost {
        /// Its address.
        peer: SocketAddr,
        /// How it went.
        why: String,
    },
    /// [`SourceListener::begin_handoff`]: the guest is paused and HANDOFF went out.
    HandoffSent {
        /// How many backups were told.
        backups: usize,
    },
    /// [`SourceListener::begin_handoff`]: pausing the guest failed, so no HANDOFF was sent (the
    /// guest may still run: handing off now would risk two running copies). The source keeps
    /// serving and the handoff may be tried again.
    HandoffFailed {
        /// The pause hook's error.
        error: String,
    },
}

/// The pause hook, handed back with its result by the thread that ran it.
type PauseOutcome = (Box<dyn VmPause>, Result<(), String>);

/// Receives [`SourceNotice`]s on the event loop. Must not block. `Send`, like [`crate::backup::BackupObserver`].
pub type SourceObserver = Box<dyn FnMut(&SourceNotice<'_>) + Send>;

#[derive(Debug)]
struct Conn {
    sock: Socket,
    peer: SocketAddr,
    reader: FrameReader,
    /// `Some(deadline)` until HELLO has been accepted.
    handshake_deadline: Option<Instant>,
    keepalive: Option<EffectiveKeepalive>,
}

/// The source's event-manager subscriber.
pub struct SourceListener {
    cfg: SourceConfig,
    listener: Socket,
    local_addr: SocketAddr,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    joined: usize,
    heartbeat_timer: Timer,
    /// Drops stalled handshakes; armed only while some connection is handshaking.
    sweep_timer: Timer,
    handshaking: usize,
    seq: u64,
    observer: SourceObserver,
    stopping: bool,
    /// Pauses the local guest before HANDOFF; lent to a thread while a handoff is under way.
    pause: Option<Box<dyn VmPause>>,
    handoff_done: EventFd,
    /// `Some` while a handoff's pause hook runs.
    handoff_rx: Option<mpsc::Receiver<PauseOutcome>>,
}

impl SourceListener {
    /// Binds the listen socket (non-blocking) so that errors surface before the loop starts.
    pub fn new(cfg: SourceConfig, observer: SourceObserver) -> Result<Self, Error> {
        validate_pair_id(&cfg.pair_id).map_err(Error::Config)?;
        if let Some(hb) = cfg.heartbeat {
            if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&hb) {
                return Err(Error::Config(format!(
                    "heartbeat interval must be {MIN_HEARTBEAT:?}..={MAX_HEARTBEAT:?}, got {hb:?}"
                )));
            }
        }
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
        Ok(SourceListener {
            cfg,
            listener,
            local_addr,
            conns: Vec::new(),
            free: Vec::new(),
            joined: 0,
            heartbeat_timer: Timer::new().map_err(Error::Resource)?,
            sweep_timer: Timer::new().map_err(Error::Resource)?,
            handshaking: 0,
            seq: 0,
            observer,
            stopping: false,
            pause: None,
            handoff_done: EventFd::new(EFD_NONBLOCK).map_err(Error::Resource)?,
            handoff_rx: None,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Backups that completed the handshake and are still connected.
    pub fn backups(&self) -> usize {
        self.joined
    }

    /// Sends STAND_DOWN to every joined backup and half-closes each link, so the FIN follows the
    /// frame: an orderly stop is never mistaken for a crash. Returns how many backups were told.
    /// The listener stops heartbeats; call it right before the VMM exits.
    pub fn stand_down(&mut self) -> usize {
        self.broadcast_final(Frame::StandDown)
    }

    /// Sends HANDOFF to every joined backup (call after pausing the local guest). Returns how many
    /// backups were told. [`begin_handoff`](Self::begin_handoff) does the pause too.
    pub fn handoff(&mut self) -> usize {
        self.broadcast_final(Frame::Handoff)
    }

    /// Sets the hook that pauses the local guest before a planned handoff.
    pub fn set_pause_hook(&mut self, pause: Box<dyn VmPause>) {
        self.pause = Some(pause);
    }

    /// Planned switchover, the whole of it: pauses the local guest with the pause hook on a thread
    /// of its own (it may take a while: QMP `stop`, a vCPU kick) and, once it reports success on
    /// the loop, sends HANDOFF ([`SourceNotice::HandoffSent`]). If the pause fails nothing is
    /// sent ([`SourceNotice::HandoffFailed`]). Without a pause hook it hands off at once. Callable
    /// from outside the loop (an API thread holding the subscriber's mutex).
    pub fn begin_handoff(&mut self) -> Result<(), Error> {
        if self.handoff_rx.is_some() {
            return Err(Error::Busy("a handoff is already under way"));
        }
        let Some(mut pause) = self.pause.take() else {
            let backups = self.handoff();
            (self.observer)(&SourceNotice::HandoffSent { backups });
            return Ok(());
        };
        let done = self.handoff_done.try_clone().map_err(Error::Resource)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("vm-pause".into())
            .spawn(move || {
                // A panicking hook is a failed pause, never a silent success.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pause.vm_pause().map_err(|e| e.to_string())
                }))
                .unwrap_or_else(|_| Err("the pause hook panicked".to_string()));
                // The hook comes back with the result, so a failed handoff can be tried again.
                let _ = tx.send((pause, r));
                let _ = done.write(1);
            })
            .map_err(Error::Resource)?;
        self.handoff_rx = Some(rx);
        Ok(())
    }

    fn on_handoff_done(&mut self) {
        let _ = self.handoff_done.read();
        let Some(Ok((pause, result))) = self.handoff_rx.as_ref().map(|rx| rx.try_recv()) else {
            return;
        };
        self.handoff_rx = None;
        self.pause = Some(pause);
        match result {
            Ok(()) => {
                let backups = self.handoff();
                (self.observer)(&SourceNotice::HandoffSent { backups });
            }
            Err(error) => {
                error!("pause before handoff failed, not handing off: {error}");
                (self.observer)(&SourceNotice::HandoffFailed { error });
            }
        }
    }

    fn broadcast_final(&mut self, frame: Frame) -> usize {
        self.stopping = true;
        let _ = self.heartbeat_timer.disarm();
        let bytes = frame.encode();
        let mut told = 0;
        for conn in self.conns.iter().flatten() {
            if conn.handshake_deadline.is_some() {
                let _ = conn.sock.shutdown(Shutdown::Both);
                continue;
            }
            // The link is otherwise idle (or carries 16-byte heartbeats), so the send buffer has
            // room: a non-blocking write of a few bytes goes through whole.
            match (&conn.sock).write(&bytes) {
                Ok(n) if n == bytes.len() => told += 1,
                Ok(n) => warn!("{} to {}: short write {n}", frame.name(), conn.peer),
                Err(e) => warn!("{} to {}: {e}", frame.name(), conn.peer),
            }
            let _ = conn.sock.shutdown(Shutdown::Write);
        }
        info!("{} sent to {told} backup(s)", frame.name());
        told
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let (sock, addr) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and leave the connection queued. The listener is
                    // level-triggered, so while fds stay exhausted the loop keeps coming back here.
                    error!("accept: {e}");
                    return;
                }
            };
            let peer = addr.as_socket().unwrap_or(self.local_addr);
            if self.stopping || self.conns.len() - self.free.len() >= self.cfg.max_backups {
                warn!(
                    "refusing backup {peer}: stopping or at the limit of {} backups",
                    self.cfg.max_backups
                );
                continue;
            }
            if let Err(e) = self.setup(&sock) {
                error!("backup {peer}: cannot set up socket: {e}");
                continue;
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
                continue;
            }
            debug!("backup {peer} connected, waiting for HELLO");
            self.conns[idx] = Some(Conn {
                sock,
                peer,
                reader: FrameReader::new(),
                handshake_deadline: Some(Instant::now() + self.cfg.handshake_timeout),
                keepalive: None,
            });
            self.handshaking += 1;
            if self.handshaking == 1 {
                let _ = self.sweep_timer.arm(self.cfg.handshake_timeout, None);
            }
        }
    }

    fn setup(&self, sock: &Socket) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        crate::tune_socket(sock, &self.cfg.keepalive)
    }

    /// Removes connection `idx` from the loop and reports why.
    fn drop_conn(&mut self, ops: &mut EventOps, idx: usize, why: String) {
        let Some(conn) = self.conns[idx].take() else {
            return;
        };
        let _ = ops.remove(Events::empty(&conn.sock));
        self.free.push(idx);
        if conn.handshake_deadline.is_some() {
            self.handshaking -= 1;
            warn!("backup {} rejected: {why}", conn.peer);
            (self.observer)(&SourceNotice::BackupRejected {
                peer: conn.peer,
                why,
            });
        } else {
            self.joined -= 1;
            warn!("backup {} lost: {why}", conn.peer);
            (self.observer)(&SourceNotice::BackupLost {
                peer: conn.peer,
                why,
            });
        }
    }

    fn on_conn(&mut self, ops: &mut EventOps, idx: usize) {
        let mut buf = [0u8; 256];
        loop {
            let Some(conn) = self.conns.get_mut(idx).and_then(|c| c.as_mut()) else {
                return;
            };
            match (&conn.sock).read(&mut buf) {
                Ok(0) => {
                    let why = if self.stopping {
                        "closed after stop"
                    } else {
                        "EOF"
                    };
                    return self.drop_conn(ops, idx, why.to_string());
                }
                Ok(n) => {
                    conn.reader.push(&buf[..n]);
                    loop {
                        let conn = self.conns[idx].as_mut().unwrap();
                        match conn.reader.next_frame() {
                            Ok(None) => break,
                            Ok(Some(frame)) => {
                                if let Err(e) = self.on_frame(idx, frame) {
                                    self.reject(idx, &e);
                                    return self.drop_conn(ops, idx, e.to_string());
                                }
                            }
                            Err(e) => {
                                self.reject(idx, &e);
                                return self.drop_conn(ops, idx, e.to_string());
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_conn(ops, idx, e.to_string()),
            }
        }
    }

    /// Tells a handshaking peer why it is refused (best effort: it may be no backup at all).
    fn reject(&self, idx: usize, e: &ProtocolError) {
        if let Some(conn) = self.conns[idx].as_ref() {
            error!("protocol error from {}: {e}", conn.peer);
            if conn.handshake_deadline.is_some() {
                let _ = (&conn.sock).write(
                    &Frame::Reject {
                        reason: e.to_string(),
                    }
                    .encode(),
                );
            }
        }
    }

    fn on_frame(&mut self, idx: usize, frame: Frame) -> Result<(), ProtocolError> {
        let conn = self.conns[idx].as_mut().unwrap();
        match frame {
            Frame::Hello { pair_id, auth_tag } if conn.handshake_deadline.is_some() => {
                if pair_id != self.cfg.pair_id {
                    return Err(ProtocolError::PairIdMismatch {
                        got: pair_id,
                        want: self.cfg.pair_id.clone(),
                    });
                }
                if !auth_tag.is_empty() {
                    return Err(ProtocolError::BadPayload {
                        kind: crate::protocol::Kind::Hello,
                        why: "authentication tags are not supported by this source".into(),
                    });
                }
                let welcome = Frame::Welcome {
                    heartbeat: self.cfg.heartbeat,
                }
                .encode();
                if (&conn.sock).write(&welcome).ok() != Some(welcome.len()) {
                    return Err(ProtocolError::Unexpected("WELCOME", "could not be sent"));
                }
                conn.handshake_deadline = None;
                conn.keepalive = EffectiveKeepalive::read_from(&conn.sock).ok();
                self.handshaking -= 1;
                self.joined += 1;
                info!("backup {} joined (pair {})", conn.peer, self.cfg.pair_id);
                (self.observer)(&SourceNotice::BackupJoined {
                    peer: conn.peer,
                    keepalive: conn.keepalive.as_ref(),
                });
                if self.joined == 1 {
                    if let Some(hb) = self.cfg.heartbeat {
                        if !self.stopping {
                            let _ = self.heartbeat_timer.arm(hb, Some(hb));
                        }
                    }
                }
                Ok(())
            }
            f if conn.handshake_deadline.is_some() => Err(ProtocolError::Unexpected(
                f.name(),
                "during the handshake (expected HELLO)",
            )),
            f => Err(ProtocolError::Unexpected(f.name(), "from a joined backup")),
        }
    }

    fn on_heartbeat_tick(&mut self, ops: &mut EventOps) {
        // Expirations coalesce: a loop that was late sends one heartbeat, not a burst.
        if self.heartbeat_timer.expirations() == 0 || self.stopping {
            return;
        }
        if self.joined == 0 {
            let _ = self.heartbeat_timer.disarm();
            return;
        }
        self.seq += 1;
        let bytes = Frame::Heartbeat { seq: self.seq }.encode();
        let mut dead = Vec::new();
        for (idx, conn) in self.conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            if conn.handshake_deadline.is_some() {
                continue;
            }
            match (&conn.sock).write(&bytes) {
                Ok(n) if n == bytes.len() => {}
                // A full send buffer means the backup is not reading; skip this beat rather than
                // buffer, and let TCP_USER_TIMEOUT decide whether the link is dead.
                Ok(_) => dead.push((idx, "short heartbeat write".to_string())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    debug!("backup {}: send buffer full, heartbeat skipped", conn.peer)
                }
                Err(e) => dead.push((idx, e.to_string())),
            }
        }
        for (idx, why) in dead {
            self.drop_conn(ops, idx, why);
        }
    }

    fn on_sweep(&mut self, ops: &mut EventOps) {
        if self.sweep_timer.expirations() == 0 {
            return;
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut stale = Vec::new();
        for (idx, conn) in self.conns.iter().enumerate() {
            if let Some(Conn {
                handshake_deadline: Some(d),
                ..
            }) = conn
            {
                if *d <= now {
                    stale.push(idx);
                } else {
                    next = Some(next.map_or(*d, |n| n.min(*d)));
                }
            }
        }
        let t = self.cfg.handshake_timeout;
        for idx in stale {
            self.drop_conn(ops, idx, format!("no HELLO within {t:?}"));
        }
        if let Some(n) = next {
            let _ = self.sweep_timer.arm(n - now, None);
        }
    }
}

impl MutEventSubscriber for SourceListener {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.listener.as_raw_fd(), TOKEN_LISTEN),
            (self.heartbeat_timer.as_raw_fd(), TOKEN_HEARTBEAT),
            (self.sweep_timer.as_raw_fd(), TOKEN_SWEEP),
            (self.handoff_done.as_raw_fd(), TOKEN_HANDOFF),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                error!("cannot register source fd {fd}: {e:?}");
            }
        }
        info!(
            "listening on {} (pair {})",
            self.local_addr, self.cfg.pair_id
        );
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTEN => self.accept_all(ops),
            TOKEN_HEARTBEAT => self.on_heartbeat_tick(ops),
            TOKEN_SWEEP => self.on_sweep(ops),
            TOKEN_HANDOFF => self.on_handoff_done(),
            t if t >= TOKEN_CONN_BASE => self.on_conn(ops, (t - TOKEN_CONN_BASE) as usize),
            t => warn!("source: event for unknown token {t}"),
        }
    }
}
