// SPDX-License-Identifier: Apache-2.0
//! One arbiter session per process, run on a thread of its own: the lease, its renewals, and the
//! requests of every subscriber of the process (acquire, release, hand over), one at a time.
//!
//! The event loop never waits on the arbiter: requests carry a reply callback, which the
//! subscribers make post into their mailbox. Renewals happen here too, every third of the granted
//! TTL; each renewal's outcome is told to the listeners ([`SessionEvent`]), so that a source can
//! move its fencing deadline. That deadline counts from when the last successful renewal was
//! **sent**: etcd restarts the TTL when it receives the keepalive, which is later.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::arbiter::{Acquire, Arbiter, ArbiterError, Ownership};

/// What the session tells its listeners (on the session's thread: they must not block).
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The lease was renewed: it lasts at least until `valid_until` (the renewal's send time plus
    /// the granted TTL).
    Renewed {
        /// When the lease ends at the earliest, in this process's clock.
        valid_until: Instant,
    },
    /// A renewal failed but the lease may still run (the arbiter did not answer in time).
    Trouble {
        /// What failed.
        error: String,
        /// The end of the lease as of the last successful renewal.
        valid_until: Option<Instant>,
    },
    /// The lease is gone: every pair held under it is free for others.
    Lost {
        /// What the arbiter said.
        error: String,
    },
    /// A new lease replaces the lost one (pairs must be acquired anew).
    Reopened {
        /// When the new lease ends at the earliest.
        valid_until: Instant,
    },
}

/// A reply, run on the session's thread.
type Reply<T> = Box<dyn FnOnce(Result<T, ArbiterError>) + Send>;

enum Cmd {
    Acquire(String, Instant, Reply<Acquire>),
    Release(String, u64, Reply<()>),
    HandOver(String, u64, String, Reply<()>),
    Owner(String, Reply<Option<(Ownership, Option<Duration>)>>),
    SetReplica(String, u64, String, Reply<()>),
    Replica(String, Reply<Option<String>>),
    RenewNow,
    Close(mpsc::Sender<()>),
}

type Listener = Box<dyn Fn(&SessionEvent) + Send>;

struct Shared {
    holder: String,
    describe: String,
    ttl: Duration,
    valid_until: Mutex<Option<Instant>>,
    listeners: Mutex<Vec<Listener>>,
}

/// The process's arbiter session: cheap to clone, shared by every subscriber.
#[derive(Clone)]
pub struct ArbiterSession {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for ArbiterSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArbiterSession")
            .field("holder", &self.shared.holder)
            .field("arbiter", &self.shared.describe)
            .field("ttl", &self.shared.ttl)
            .finish()
    }
}

impl ArbiterSession {
    /// Opens the session (blocking: call it at start, before the loop runs) and starts its
    /// thread. An arbiter that cannot be reached fails here, within its request deadline.
    pub fn open(mut arbiter: Box<dyn Arbiter>, ttl: Duration) -> Result<Self, ArbiterError> {
        let sent = Instant::now();
        let granted = arbiter.open_session(ttl)?;
        let shared = Arc::new(Shared {
            holder: arbiter.holder().to_string(),
            describe: arbiter.describe(),
            ttl: granted,
            valid_until: Mutex::new(Some(sent + granted)),
            listeners: Mutex::new(Vec::new()),
        });
        info!(
            "arbiter session on {} as {}: TTL {granted:?} granted ({ttl:?} asked)",
            shared.describe, shared.holder
        );
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            arbiter,
            shared: shared.clone(),
            rx,
            pending: Vec::new(),
            last_sent: sent,
            next_renew: sent + granted / 3,
        };
        std::thread::Builder::new()
            .name("arbiter".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                ArbiterError::Unavailable(format!("cannot start the arbiter thread: {e}"))
            })?;
        Ok(ArbiterSession { shared, tx })
    }

    /// This process's name in the arbiter.
    pub fn holder(&self) -> &str {
        &self.shared.holder
    }

    /// The arbiter, for reports (`etcd://…`).
    pub fn describe(&self) -> &str {
        &self.shared.describe
    }

    /// The TTL the arbiter granted.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// When the lease ends at the earliest, as of the last successful renewal (`None` once lost).
    pub fn valid_until(&self) -> Option<Instant> {
        *self
            .shared
            .valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` with every later [`SessionEvent`], on the session's thread: it must not block.
    pub fn subscribe(&self, f: impl Fn(&SessionEvent) + Send + 'static) {
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// Asks for `pair`, not before `not_before`; `reply` gets the answer on the session's thread.
    pub fn acquire(
        &self,
        pair: &str,
        not_before: Instant,
        reply: impl FnOnce(Result<Acquire, ArbiterError>) + Send + 'static,
    ) {
        self.send(Cmd::Acquire(pair.into(), not_before, Box::new(reply)));
    }

    /// Gives `pair` up if still owned under `epoch`.
    pub fn release(
        &self,
        pair: &str,
        epoch: u64,
        reply: impl FnOnce(Result<(), ArbiterError>) + Send + 'static,
    ) {
        self.send(Cmd::Release(pair.into(), epoch, Box::new(reply)));
    }

    /// Passes `pair`, owned under `epoch`, to `successor`.
    pub fn hand_over(
        &self,
        pair: &str,
        epoch: u64,
        successor: &str,
        reply: impl FnOnce(Result<(), ArbiterError>) + Send + 'static,
    ) {
        self.send(Cmd::HandOver(
            pair.into(),
            epoch,
            successor.into(),
            Box::new(reply),
        ));
    }

    /// Who owns `pair`.
    pub fn owner(
        &self,
        pair: &str,
        reply: impl FnOnce(Result<Option<(Ownership, Option<Duration>)>, ArbiterError>) + Send + 'static,
    ) {
        self.send(Cmd::Owner(pair.into(), Box::new(reply)));
    }

    /// Records `link` as `pair`'s replica of record, if still owned under `epoch`
    /// ([`Arbiter::set_replica`]), waiting at most `timeout`. Off the event loop only (the
    /// replication thread calls it).
    pub fn set_replica_blocking(
        &self,
        pair: &str,
        epoch: u64,
        link: &str,
        timeout: Duration,
    ) -> Result<(), ArbiterError> {
        let (pair, link) = (pair.to_string(), link.to_string());
        self.wait_for(timeout, |r| {
            self.send(Cmd::SetReplica(pair, epoch, link, r));
        })
    }

    /// `pair`'s replica of record ([`Arbiter::replica`]), waiting at most `timeout`. Off the
    /// event loop only (a `vm_start` hook calls it).
    pub fn replica_blocking(
        &self,
        pair: &str,
        timeout: Duration,
    ) -> Result<Option<String>, ArbiterError> {
        self.wait_for(timeout, |r| self.send(Cmd::Replica(pair.into(), r)))
    }

    /// Renews the lease now rather than at its rhythm; the outcome comes as a [`SessionEvent`].
    pub fn renew_now(&self) {
        self.send(Cmd::RenewNow);
    }

    /// [`acquire`](Self::acquire), waiting for the answer at most `timeout`. For start-up only:
    /// never call it on an event loop.
    pub fn acquire_blocking(&self, pair: &str, timeout: Duration) -> Result<Acquire, ArbiterError> {
        self.wait_for(timeout, |r| self.acquire(pair, Instant::now(), r))
    }

    /// Makes a request with `ask`, whose reply it waits for at most `timeout` (then the arbiter
    /// counts as unavailable).
    fn wait_for<T: Send + 'static>(
        &self,
        timeout: Duration,
        ask: impl FnOnce(Reply<T>),
    ) -> Result<T, ArbiterError> {
        let (tx, rx) = mpsc::channel();
        ask(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv_timeout(timeout).unwrap_or_else(|_| {
            Err(ArbiterError::Unavailable(format!(
                "no answer from the arbiter within {timeout:?}"
            )))
        })
    }

    /// Ends the session (revokes the lease, freeing every pair held under it), waiting at most
    /// `timeout`. For shutdown: never call it on an event loop.
    pub fn close(&self, timeout: Duration) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }

    fn send(&self, cmd: Cmd) {
        if let Err(mpsc::SendError(cmd)) = self.tx.send(cmd) {
            let e = ArbiterError::Unavailable("the arbiter session has ended".into());
            match cmd {
                Cmd::Acquire(_, _, r) => r(Err(e)),
                Cmd::Release(_, _, r) | Cmd::HandOver(_, _, _, r) => r(Err(e)),
                Cmd::Owner(_, r) => r(Err(e)),
                Cmd::SetReplica(_, _, _, r) => r(Err(e)),
                Cmd::Replica(_, r) => r(Err(e)),
                Cmd::RenewNow | Cmd::Close(_) => {}
            }
        }
    }
}

struct Worker {
    arbiter: Box<dyn Arbiter>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    /// Requests that must wait (`not_before` in the future), in arrival order.
    pending: Vec<(Instant, Cmd)>,
    last_sent: Instant,
    next_renew: Instant,
}

impl Worker {
    fn run(mut self) {
        loop {
            let now = Instant::now();
            if now >= self.next_renew {
                self.renew();
            }
            self.run_due(Instant::now());
            let wake = self
                .pending
                .iter()
                .map(|(t, _)| *t)
                .fold(self.next_renew, Instant::min);
            match self
                .rx
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(Cmd::Close(ack)) => {
                    self.close();
                    let _ = ack.send(());
                    return;
                }
                Ok(Cmd::Acquire(pair, at, reply)) if at > Instant::now() => {
                    self.pending.push((at, Cmd::Acquire(pair, at, reply)));
                }
                Ok(cmd) => self.execute(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            }
        }
    }

    fn run_due(&mut self, now: Instant) {
        while let Some(i) = self.pending.iter().position(|(t, _)| *t <= now) {
            let (_, cmd) = self.pending.remove(i);
            self.execute(cmd);
        }
    }

    fn execute(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Acquire(pair, _, reply) => reply(self.arbiter.acquire(&pair)),
            Cmd::Release(pair, epoch, reply) => reply(self.arbiter.release(&pair, epoch)),
            Cmd::HandOver(pair, epoch, to, reply) => {
                reply(self.arbiter.hand_over(&pair, epoch, &to));
            }
            Cmd::Owner(pair, reply) => reply(self.arbiter.owner(&pair)),
            Cmd::SetReplica(pair, epoch, link, reply) => {
                reply(self.arbiter.set_replica(&pair, epoch, &link));
            }
            Cmd::Replica(pair, reply) => reply(self.arbiter.replica(&pair)),
            Cmd::RenewNow => self.renew(),
            Cmd::Close(ack) => {
                let _ = ack.send(());
            }
        }
    }

    fn renew(&mut self) {
        let sent = Instant::now();
        let every = self.shared.ttl / 3;
        match self.arbiter.renew() {
            Ok(ttl) => {
                let valid_until = sent + ttl;
                self.last_sent = sent;
                self.set_valid_until(Some(valid_until));
                self.next_renew = sent + every;
                debug!("lease renewed: valid for {ttl:?}");
                self.notify(&SessionEvent::Renewed { valid_until });
            }
            Err(ArbiterError::LeaseLost(e)) => {
                warn!("arbiter lease lost: {e}");
                self.set_valid_until(None);
                self.notify(&SessionEvent::Lost { error: e });
                self.reopen();
            }
            Err(e) => {
                warn!("lease renewal failed: {e}");
                let valid_until = self.valid_until();
                self.notify(&SessionEvent::Trouble {
                    error: e.to_string(),
                    valid_until,
                });
                // Try again sooner than the usual rhythm: the lease is running out.
                self.next_renew = Instant::now() + every / 2;
            }
        }
    }

    fn reopen(&mut self) {
        let sent = Instant::now();
        match self.arbiter.open_session(self.shared.ttl) {
            Ok(ttl) => {
                let valid_until = sent + ttl;
                self.set_valid_until(Some(valid_until));
                self.next_renew = sent + ttl / 3;
                info!("new arbiter lease of {ttl:?}");
                self.notify(&SessionEvent::Reopened { valid_until });
            }
            Err(e) => {
                warn!("cannot open a new arbiter lease: {e}");
                self.next_renew = Instant::now() + self.shared.ttl / 6;
            }
        }
    }

    fn close(&mut self) {
        if let Err(e) = self.arbiter.close_session() {
            warn!("closing the arbiter session: {e}");
        }
        self.set_valid_until(None);
    }

    fn valid_until(&self) -> Option<Instant> {
        *self
            .shared
            .valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_valid_until(&self, v: Option<Instant>) {
        *self
            .shared
            .valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = v;
    }

    fn notify(&self, ev: &SessionEvent) {
        for l in self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            l(ev);
        }
    }
}
