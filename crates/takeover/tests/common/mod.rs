// SPDX-License-Identifier: Apache-2.0
//! Shared by the core's integration tests: subscribers in real `EventManager`s on loopback, their
//! notices as short strings on one channel, and hooks that count, fail, hang or pause.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_takeover_core::auth::{Credentials, Key, KeyRing};
use vmm_takeover_core::{
    AbortHandle, BackupConfig, BackupHandle, BackupMonitor, BackupNotice, HookError, SourceConfig,
    SourceHandle, SourceListener, SourceNotice, TakeoverRecord, VmPause, VmStart,
};

/// Subscribers shared the way Firecracker-style VMMs share them.
pub type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Generous bound for anything that should take milliseconds.
pub const BOUND: Duration = Duration::from_secs(20);

/// Notices of both sides as `"src: …"` / `"bak: …"` strings.
pub struct Notices {
    rx: mpsc::Receiver<String>,
    tx: mpsc::Sender<String>,
    /// Everything seen so far, for failure messages and "never happened" checks.
    pub seen: Vec<String>,
}

impl Default for Notices {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Notices {
            rx,
            tx,
            seen: Vec::new(),
        }
    }
}

impl Notices {
    /// Waits (driving `em` if given, else just receiving) until a notice starts with `prefix`;
    /// returns it. Panics after [`BOUND`] with everything seen.
    pub fn wait(&mut self, mut em: Option<&mut EventManager<Sub>>, prefix: &str) -> String {
        let t = Instant::now();
        loop {
            while let Ok(s) = self.rx.try_recv() {
                self.seen.push(s.clone());
                if s.starts_with(prefix) {
                    return s;
                }
            }
            assert!(
                t.elapsed() < BOUND,
                "no {prefix:?} within {BOUND:?}; seen: {:#?}",
                self.seen
            );
            match em.as_deref_mut() {
                Some(em) => {
                    em.run_with_timeout(10).unwrap();
                }
                None => {
                    if let Ok(s) = self.rx.recv_timeout(Duration::from_millis(50)) {
                        self.seen.push(s.clone());
                        if s.starts_with(prefix) {
                            return s;
                        }
                    }
                }
            }
        }
    }

    /// Waits for a notice of each prefix, in any order (counting those seen already).
    pub fn wait_all(&mut self, mut em: Option<&mut EventManager<Sub>>, prefixes: &[&str]) {
        for p in prefixes {
            if !self.saw(p) {
                self.wait(em.as_deref_mut(), p);
            }
        }
    }

    /// Drives `em` (if given) for `d`, collecting notices.
    pub fn run_for(&mut self, mut em: Option<&mut EventManager<Sub>>, d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            match em.as_deref_mut() {
                Some(em) => {
                    em.run_with_timeout(10).unwrap();
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
            while let Ok(s) = self.rx.try_recv() {
                self.seen.push(s);
            }
        }
    }

    /// Whether a notice starting with `prefix` was seen.
    pub fn saw(&self, prefix: &str) -> bool {
        self.seen.iter().any(|s| s.starts_with(prefix))
    }

    /// An observer for a source.
    pub fn source_observer(&self) -> Box<dyn FnMut(&SourceNotice<'_>) + Send> {
        let tx = self.tx.clone();
        Box::new(move |n| {
            let _ = tx.send(format!("src: {}", source_text(n)));
        })
    }

    /// An observer for a backup.
    pub fn backup_observer(&self) -> Box<dyn FnMut(&BackupNotice<'_>) + Send> {
        let tx = self.tx.clone();
        Box::new(move |n| {
            let _ = tx.send(format!("bak: {}", backup_text(n)));
        })
    }
}

pub fn source_text(n: &SourceNotice) -> String {
    use SourceNotice as N;
    match n {
        N::BackupJoined { .. } => "joined".into(),
        N::BackupRejected { why, .. } => format!("rejected {why}"),
        N::BackupLost { why, .. } => format!("lost {why}"),
        N::BackupEvicted { why, .. } => format!("evicted {why}"),
        N::BackupSlow { unsent, .. } => format!("slow {unsent}"),
        N::BackupCaughtUp { skipped, .. } => format!("caught-up {skipped}"),
        N::AcceptFailed { error, .. } => format!("accept-failed {error}"),
        N::HandoffRefused { why } => format!("handoff-refused {why:?}"),
        N::HandoffPaused => "handoff-paused".into(),
        N::HandoffSent { others, .. } => format!("handoff-sent others={others}"),
        N::HandoffComplete { .. } => "handoff-complete".into(),
        N::HandoffFailed {
            stage,
            error,
            resumed,
        } => format!("handoff-failed {stage} resumed={resumed}: {error}"),
        N::HandoffUncertain { why } => format!("handoff-uncertain {why}"),
        N::StandDownDeferred => "stand-down-deferred".into(),
        N::StandDownSent { backups } => format!("stand-down-sent {backups}"),
        N::StoodDown { told, confirmed } => format!("stood-down {confirmed}/{told}"),
        N::Owner { epoch, .. } => format!("owner {epoch}"),
        N::Fenced { why, .. } => format!("fenced {why}"),
    }
}

pub fn backup_text(n: &BackupNotice) -> String {
    use BackupNotice as N;
    match n {
        N::Connecting { .. } => "connecting".into(),
        N::Retrying { why, .. } => format!("retrying {why}"),
        N::Armed { .. } => "armed".into(),
        N::LinkLost { reason, detail } => format!("link-lost {reason}: {detail}"),
        N::Takeover(r) => format!("takeover {}", r.reason),
        N::HookFinished { result, .. } => format!("hook-finished {result:?}"),
        N::HookTimedOut { .. } => "hook-timeout".into(),
        N::StandDown => "stand-down".into(),
        N::Rejected { reason } => format!("rejected {reason}"),
        N::Stopped { aborted_hook, .. } => format!("stopped aborted={aborted_hook}"),
        N::ArbitrationWait { holder, why, .. } => format!("arbitration-wait {holder:?} {why}"),
        N::ArbitrationWon { epoch, .. } => format!("arbitration-won {epoch}"),
        N::ArbitrationLost { winner } => format!("arbitration-lost {winner}"),
        N::LinkUntrusted { why } => format!("link-untrusted {why}"),
    }
}

/// The key every test's source and backup share (a fixed test key: the tests run the real
/// authenticated handshake and sealed frames).
pub fn test_credentials() -> Credentials {
    let key = Key::new(1, &[0x5a; 32]).unwrap();
    Credentials::Keys(Arc::new(KeyRing::new([key]).unwrap()))
}

/// A source on an ephemeral loopback port, as configured by `tweak`.
pub fn source(
    notices: &Notices,
    tweak: impl FnOnce(&mut SourceConfig),
) -> (SourceListener, SocketAddr) {
    let mut cfg = SourceConfig::new("127.0.0.1:0".parse().unwrap(), "pair");
    cfg.credentials = test_credentials();
    tweak(&mut cfg);
    let s = SourceListener::new(cfg, notices.source_observer()).unwrap();
    let addr = s.local_addr();
    (s, addr)
}

/// A backup of the source at `addr` with `hook`, as configured by `tweak`.
pub fn backup(
    notices: &Notices,
    addr: SocketAddr,
    hook: impl VmStart + 'static,
    tweak: impl FnOnce(&mut BackupConfig),
) -> BackupMonitor {
    let mut cfg = BackupConfig::new(addr, "pair");
    cfg.credentials = test_credentials();
    tweak(&mut cfg);
    BackupMonitor::new(cfg, Box::new(hook), notices.backup_observer()).unwrap()
}

/// Adds a subscriber; returns its shared handle.
pub fn add<T: MutEventSubscriber + Send + 'static>(
    em: &mut EventManager<Sub>,
    s: T,
) -> Arc<Mutex<T>> {
    let s = Arc::new(Mutex::new(s));
    em.add_subscriber(s.clone());
    s
}

/// A source and a backup in one `EventManager`, armed.
pub struct Pair {
    pub em: EventManager<Sub>,
    pub notices: Notices,
    pub source: SourceHandle,
    pub backup: BackupHandle,
    pub starts: Arc<AtomicUsize>,
}

/// A source (with `pause` as its pause hook, if any) and a backup whose `vm_start` is `hook`.
pub fn armed_pair(
    hook: impl VmStart + 'static,
    pause: Option<Box<dyn VmPause>>,
    tweak_source: impl FnOnce(&mut SourceConfig),
    tweak_backup: impl FnOnce(&mut BackupConfig),
) -> Pair {
    let mut em = EventManager::<Sub>::new().unwrap();
    let mut notices = Notices::default();
    let (mut src, addr) = source(&notices, tweak_source);
    if let Some(p) = pause {
        src.set_pause_hook(p);
    }
    let source = src.handle();
    add(&mut em, src);
    let bak = backup(&notices, addr, hook, tweak_backup);
    let backup = bak.handle();
    add(&mut em, bak);
    notices.wait_all(Some(&mut em), &["bak: armed", "src: joined"]);
    Pair {
        em,
        notices,
        source,
        backup,
        starts: Arc::new(AtomicUsize::new(0)),
    }
}

/// A `vm_start` that counts its calls and succeeds.
#[derive(Clone, Default)]
pub struct Counting(pub Arc<AtomicUsize>);

impl VmStart for Counting {
    fn vm_start(&mut self, _: &TakeoverRecord) -> Result<(), HookError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

impl Counting {
    pub fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A `vm_start` that fails.
pub struct Failing;

impl VmStart for Failing {
    fn vm_start(&mut self, _: &TakeoverRecord) -> Result<(), HookError> {
        Err("no such VM".into())
    }
    fn describe(&self) -> String {
        "failing".into()
    }
}

/// A `vm_start` that blocks until aborted (its abort handle), then fails; counts aborts.
#[derive(Clone, Default)]
pub struct Hanging {
    pub aborted: Arc<AtomicBool>,
}

impl VmStart for Hanging {
    fn vm_start(&mut self, _: &TakeoverRecord) -> Result<(), HookError> {
        let t = Instant::now();
        while !self.aborted.load(Ordering::SeqCst) && t.elapsed() < BOUND * 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        Err("aborted".into())
    }
    fn describe(&self) -> String {
        "hanging".into()
    }
    fn abort_handle(&self) -> Option<AbortHandle> {
        let a = self.aborted.clone();
        Some(Arc::new(move || a.store(true, Ordering::SeqCst)))
    }
}

/// A pause hook recording pauses and resumes; `fail_pauses` first pauses fail.
#[derive(Clone, Default)]
pub struct Pauser {
    pub pauses: Arc<AtomicUsize>,
    pub resumes: Arc<AtomicUsize>,
    pub fail_pauses: Arc<AtomicUsize>,
    pub delay: Duration,
}

impl VmPause for Pauser {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        std::thread::sleep(self.delay);
        if self
            .fail_pauses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("pause refused".into());
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn vm_resume(&mut self) -> Result<(), HookError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "pauser".into()
    }
}

impl Pauser {
    pub fn pauses(&self) -> usize {
        self.pauses.load(Ordering::SeqCst)
    }
    pub fn resumes(&self) -> usize {
        self.resumes.load(Ordering::SeqCst)
    }
}

/// An `EventManager` on a thread of its own, which the test can stall (a hung VMM loop, on
/// purpose) and stop.
pub struct LoopThread {
    cmd: mpsc::Sender<Option<Duration>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl LoopThread {
    pub fn spawn(subs: Vec<Sub>) -> LoopThread {
        let (cmd, rx) = mpsc::channel::<Option<Duration>>();
        let join = std::thread::spawn(move || {
            let mut em = EventManager::<Sub>::new().unwrap();
            for s in subs {
                em.add_subscriber(s);
            }
            loop {
                match rx.try_recv() {
                    Ok(Some(stall)) => std::thread::sleep(stall),
                    Ok(None) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                em.run_with_timeout(5).unwrap();
            }
        });
        LoopThread {
            cmd,
            join: Some(join),
        }
    }

    /// Stalls the loop for `d` (it does nothing at all meanwhile), asynchronously.
    pub fn stall(&self, d: Duration) {
        let _ = self.cmd.send(Some(d));
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        let _ = self.cmd.send(None);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}
