// SPDX-License-Identifier: Apache-2.0
//! The source's side: a thread that serves one replication stream at a time, to the armed backup.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vmm_takeover_core::auth::{Credentials, LinkId};

use crate::message::{Message, MAX_PAGES_PER_MESSAGE};
use crate::stream::{self, Stream, StreamError};
use crate::{CaptureError, EventSink, ReplicaEvent, Replicable, PAGE_SIZE};

/// A deliberate fault, for tests: stop sending in the middle of checkpoint `seq` of the first
/// stream (after its BEGIN and, if it has pages, its first PAGES), and send nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The checkpoint to cut.
    pub stall_at: u64,
}

/// How the source replicates.
#[derive(Clone)]
pub struct SourceReplicaConfig {
    /// Where the backup's replication stream connects.
    pub listen: SocketAddr,
    /// The pair (as the heartbeat link's).
    pub pair_id: String,
    /// The heartbeat link's credentials.
    pub credentials: Credentials,
    /// Time between checkpoints (from the start of one capture to the next).
    pub interval: Duration,
    /// A checkpoint not acknowledged within this ends the stream (the backup must sync again).
    pub ack_timeout: Duration,
    /// Bound on the handshake and on each write.
    pub io_timeout: Duration,
    /// Tests only.
    pub fault: Option<Fault>,
    /// With an arbiter: records a stream's link as the pair's replica of record before the first
    /// output its checkpoints cover is released (see [`Recorder`]).
    pub record: Option<Recorder>,
}

/// Records a link as the pair's replica of record in the arbiter (atomic with the check that
/// this source still owns the pair). A backup that wins the pair resumes only a checkpoint of
/// the recorded link: so once output was released on a new link's acknowledgements, a backup
/// still holding an older link's checkpoint (it lost its link to a live source and waited for
/// the lease) can no longer take that output back.
pub type Recorder = Arc<dyn Fn(LinkId) -> Result<(), String> + Send + Sync>;

impl SourceReplicaConfig {
    /// Defaults: ack timeout max(20 × interval, 2 s), I/O timeout 2 s.
    pub fn new(
        listen: SocketAddr,
        pair_id: String,
        credentials: Credentials,
        interval: Duration,
    ) -> Self {
        SourceReplicaConfig {
            listen,
            pair_id,
            credentials,
            interval,
            ack_timeout: (interval * 20).max(Duration::from_secs(2)),
            io_timeout: Duration::from_secs(2),
            fault: None,
            record: None,
        }
    }
}

struct Shared {
    /// The armed backup's link, as the heartbeat listener announced it.
    link: Mutex<Option<LinkId>>,
    cv: Condvar,
    /// The output position released: covered by a checkpoint the backup acknowledged.
    released: AtomicU64,
    stop: AtomicBool,
    /// A stream is up and its backup acknowledged a checkpoint.
    synced: AtomicBool,
    /// A final checkpoint asked for ([`ReplicaSource::final_checkpoint`]), and where to answer.
    final_req: Mutex<Option<mpsc::Sender<Result<u64, String>>>>,
}

/// The source's replication: a handle to its thread. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaSource {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl ReplicaSource {
    /// Binds `cfg.listen` (an error here is a start-up error) and starts the thread. `released`
    /// starts at `start_mark`: output the guest produced before replication began (a promoted
    /// backup's resumed position, which its own backup's takeover covered).
    pub fn start(
        cfg: SourceReplicaConfig,
        vm: Arc<dyn Replicable>,
        start_mark: u64,
        events: EventSink,
    ) -> std::io::Result<ReplicaSource> {
        let listener = TcpListener::bind(cfg.listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            link: Mutex::new(None),
            cv: Condvar::new(),
            released: AtomicU64::new(start_mark),
            stop: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            final_req: Mutex::new(None),
        });
        let sh = shared.clone();
        events(&ReplicaEvent::Listening { addr });
        std::thread::Builder::new()
            .name("replica-source".into())
            .spawn(move || serve(listener, cfg, vm, sh, events))?;
        Ok(ReplicaSource { shared, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The armed backup's link (`None`: none is armed). A stream bound to another link ends at
    /// its next checkpoint.
    pub fn bind_link(&self, link: Option<LinkId>) {
        *self.shared.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
        self.shared.cv.notify_all();
    }

    /// The output position released so far: every output up to it is covered by a checkpoint the
    /// backup acknowledged. Output past it must be held (output commit).
    pub fn released(&self) -> u64 {
        self.shared.released.load(Ordering::Acquire)
    }

    /// The backup of `link` went: the stream stops serving it, unless another link is bound by
    /// now (a backup that goes must not unbind the one that replaced it).
    pub fn unbind_link(&self, link: LinkId) {
        let mut cur = self.shared.link.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == Some(link) {
            *cur = None;
        }
        drop(cur);
        self.shared.cv.notify_all();
    }

    /// Before a planned handoff: takes a last checkpoint that leaves the guest paused right
    /// after it (not one instruction later) and waits until the backup acknowledged it, so that
    /// the backup resumes exactly where the guest stopped. Bounded by `timeout`; an error (no
    /// synced stream, guest not running, timeout) says why, and the caller pauses the guest
    /// itself: the backup then resumes from its last checkpoint (output is safe either way).
    pub fn final_checkpoint(&self, timeout: Duration) -> Result<u64, String> {
        if !self.shared.synced.load(Ordering::SeqCst) {
            return Err("no backup holds a replica yet".into());
        }
        let (tx, rx) = mpsc::channel();
        *self
            .shared
            .final_req
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.shared.cv.notify_all();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the replication stream ended before the final checkpoint".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Withdrawn, so that it never runs late (a request already taken runs on).
                self.shared
                    .final_req
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                Err(format!(
                    "no final checkpoint acknowledged within {timeout:?} (the stream ended or \
                     the backup is slow)"
                ))
            }
        }
    }

    /// Stops the thread at its next step.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }
}

impl Shared {
    fn current(&self) -> Option<LinkId> {
        *self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `link` is (or, within `wait`, becomes) the armed backup's: the backup may dial
    /// the stream a moment before the heartbeat listener's loop has seen its AUTH.
    fn wait_current(&self, link: LinkId, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut cur = self.link.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *cur == Some(link) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stop.load(Ordering::SeqCst) {
                return false;
            }
            cur = self
                .cv
                .wait_timeout(cur, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

/// Handshakes under way at once; a connection beyond them is closed at once. Each is bounded by
/// the I/O timeout, on a thread of its own, so that clients without the key (a flood, or one
/// that says nothing) cannot hold the real backup's handshake back.
const MAX_HANDSHAKES: usize = 8;

fn serve(
    listener: TcpListener,
    cfg: SourceReplicaConfig,
    vm: Arc<dyn Replicable>,
    shared: Arc<Shared>,
    events: EventSink,
) {
    let cfg = Arc::new(cfg);
    let fault = Arc::new(Mutex::new(cfg.fault));
    // One stream replicates at a time: a newer one waits until the older ends (its link is no
    // longer the armed one, or it failed).
    let serving = Arc::new(Mutex::new(()));
    let pending = Arc::new(AtomicUsize::new(0));
    while !shared.stop.load(Ordering::SeqCst) {
        if !readable(listener.as_raw_fd(), Duration::from_millis(200)) {
            continue;
        }
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("replication: accept failed: {e}");
                // EMFILE and the like: do not spin on a listener that stays readable.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if pending.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            debug!("replication: {MAX_HANDSHAKES} handshakes under way; a connection closed");
            continue;
        }
        pending.fetch_add(1, Ordering::SeqCst);
        let (cfg, vm, shared, events) = (cfg.clone(), vm.clone(), shared.clone(), events.clone());
        let (fault, serving, p) = (fault.clone(), serving.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("replica-conn".into())
            .spawn(move || {
                let s = stream::accept(
                    sock,
                    &cfg.credentials,
                    &cfg.pair_id,
                    cfg.io_timeout,
                    |link| shared.wait_current(link, cfg.io_timeout / 2),
                );
                p.fetch_sub(1, Ordering::SeqCst);
                match s {
                    Ok(s) => serve_stream(s, &cfg, vm.as_ref(), &shared, &events, &fault, &serving),
                    Err(e) => {
                        warn!("replication stream refused: {e}");
                        events(&ReplicaEvent::Refused { why: e.to_string() });
                    }
                }
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::SeqCst);
            warn!("replication: cannot spawn a connection thread: {e}");
        }
    }
}

/// Replicates over one authenticated stream, once no other does and if its link is still the
/// armed backup's.
fn serve_stream(
    mut s: Stream,
    cfg: &SourceReplicaConfig,
    vm: &dyn Replicable,
    shared: &Shared,
    events: &EventSink,
    fault: &Mutex<Option<Fault>>,
    serving: &Mutex<()>,
) {
    let _one = serving.lock().unwrap_or_else(|e| e.into_inner());
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    if shared.current() != Some(s.link()) {
        let why = format!("link {} is no longer the armed backup's", s.link());
        events(&ReplicaEvent::Refused { why });
        return;
    }
    info!(
        "replication stream from {:?} for link {}",
        s.peer().ok(),
        s.link()
    );
    events(&ReplicaEvent::Connected {
        peer: s.peer().ok(),
        link: s.link(),
    });
    let mut fault = fault.lock().unwrap_or_else(|e| e.into_inner());
    let why = match replicate(&mut s, cfg, vm, shared, events, &mut fault) {
        Ok(()) => "stopped".to_string(),
        Err(e) => e,
    };
    shared.synced.store(false, Ordering::SeqCst);
    warn!("replication stream ended: {why}");
    events(&ReplicaEvent::Lost { why });
}

/// Sends `pages` (their bytes in `data`) in PAGES messages of at most
/// [`MAX_PAGES_PER_MESSAGE`]; returns how many pages.
fn send_pages(s: &mut Stream, pages: &[u32], data: &[u8]) -> Result<usize, StreamError> {
    for (idx, chunk) in pages
        .chunks(MAX_PAGES_PER_MESSAGE)
        .zip(data.chunks(MAX_PAGES_PER_MESSAGE * PAGE_SIZE))
    {
        s.send(&Message::Pages {
            index: idx.to_vec(),
            data: chunk.to_vec(),
        })?;
    }
    Ok(pages.len())
}

/// Serves one stream until it fails, its link is no longer the armed one, or a stop.
fn replicate(
    s: &mut Stream,
    cfg: &SourceReplicaConfig,
    vm: &dyn Replicable,
    shared: &Shared,
    events: &EventSink,
    fault: &mut Option<Fault>,
) -> Result<(), String> {
    let link = s.link();
    let err = |e: StreamError| e.to_string();
    let mut seq = 1u64;
    let mut next = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if shared.current() != Some(link) {
            return Err(format!("link {link} is no longer the armed backup's"));
        }
        // A final checkpoint (before a handoff) goes at once; otherwise wait for the next tick,
        // woken early by a final request or a change of link.
        let final_tx = if seq > 1 {
            shared
                .final_req
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        } else {
            None
        };
        let now = Instant::now();
        if final_tx.is_none() && now < next {
            let g = shared.link.lock().unwrap_or_else(|e| e.into_inner());
            let _ = shared.cv.wait_timeout(g, next - now);
            continue;
        }
        if final_tx.is_none() {
            next += cfg.interval;
            if next < Instant::now() {
                // A late checkpoint (slow network or backup): the next one is one interval
                // away, not a burst to catch up.
                next = Instant::now() + cfg.interval;
            }
        }
        let full = seq == 1;
        let sent_before = s.bytes_sent;
        let mut pages = 0usize;
        if full {
            // Full: a live bulk copy of every non-zero page, then the pages written meanwhile
            // come with the first capture. Applied only as a whole, at its COMMIT.
            vm.begin_tracking()?;
            s.send(&Message::Begin {
                seq,
                reset: true,
                guest_pages: vm.page_count(),
            })
            .map_err(err)?;
            let mut index = Vec::with_capacity(MAX_PAGES_PER_MESSAGE);
            let mut data = Vec::with_capacity(MAX_PAGES_PER_MESSAGE * PAGE_SIZE);
            let mut page = [0u8; PAGE_SIZE];
            for i in 0..vm.page_count() {
                if vm.read_page(i, &mut page)? {
                    index.push(i);
                    data.extend_from_slice(&page);
                }
                if index.len() == MAX_PAGES_PER_MESSAGE {
                    pages += send_pages(s, &index, &data).map_err(err)?;
                    index.clear();
                    data.clear();
                }
            }
            pages += send_pages(s, &index, &data).map_err(err)?;
        }
        let started = Instant::now();
        let bound = cfg.interval.max(Duration::from_millis(100));
        let captured = if final_tx.is_some() {
            vm.capture_and_pause(bound)
        } else {
            vm.capture(bound)
        };
        let c = match captured {
            Ok(c) => c,
            Err(CaptureError::NotRunning) if !full => {
                debug!("replication: the guest is not running; checkpoint {seq} skipped");
                if let Some(tx) = final_tx {
                    let _ = tx.send(Err("the guest is not running: no final checkpoint".into()));
                }
                continue;
            }
            Err(CaptureError::NotRunning) => {
                // The full copy waits for a running guest; its BEGIN is answered by a new one.
                return Err("the guest is not running: no full checkpoint can be taken".into());
            }
            Err(CaptureError::Failed(e)) => return Err(format!("capture failed: {e}")),
        };
        if !full {
            s.send(&Message::Begin {
                seq,
                reset: false,
                guest_pages: vm.page_count(),
            })
            .map_err(err)?;
        }
        if fault.is_some_and(|f| f.stall_at == seq) {
            *fault = None;
            let cut = c.pages.len().min(MAX_PAGES_PER_MESSAGE);
            send_pages(s, &c.pages[..cut], &c.data[..cut * PAGE_SIZE]).map_err(err)?;
            warn!("fault injected: checkpoint {seq} cut after {cut} page(s)");
            events(&ReplicaEvent::FaultInjected { seq });
            while !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        pages += send_pages(s, &c.pages, &c.data).map_err(err)?;
        s.send(&Message::Commit {
            seq,
            mark: c.mark,
            pages: pages as u32,
            state: c.state,
        })
        .map_err(err)?;
        // A full checkpoint takes the backup longer to apply (zeroing, then every page): one
        // more millisecond per 64 pages (256 MiB/s) on top.
        let ack_timeout = if full {
            cfg.ack_timeout + Duration::from_millis(pages as u64 / 64)
        } else {
            cfg.ack_timeout
        };
        match s.recv(ack_timeout).map_err(err)? {
            Message::Ack { seq: acked } if acked == seq => {}
            m => return Err(format!("expected ACK {seq}, got {}", m.name())),
        }
        if full {
            // Before any output is released on this link's acknowledgements, the arbiter must
            // name it: a backup holding another link's checkpoint then refuses to resume it.
            // Failing that, the stream ends and a new one syncs (and records) again.
            if let Some(record) = &cfg.record {
                record(link).map_err(|e| {
                    format!("cannot record link {link} as the replica of record: {e}")
                })?;
            }
        }
        // Output commit: only now may the world see the output this checkpoint covers.
        shared.released.fetch_max(c.mark, Ordering::AcqRel);
        shared.synced.store(true, Ordering::SeqCst);
        events(&ReplicaEvent::Acked {
            seq,
            full,
            last: final_tx.is_some(),
            pages,
            bytes: s.bytes_sent - sent_before,
            pause: c.pause,
            mark: c.mark,
            rtt: started.elapsed(),
        });
        if let Some(tx) = final_tx {
            let _ = tx.send(Ok(seq));
        }
        seq += 1;
    }
}
