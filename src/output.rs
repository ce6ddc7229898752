// SPDX-License-Identifier: Apache-2.0
//! Non-blocking stdout and stderr: the event loop only queues lines, a writer thread per stream
//! does the (blocking) writes.
//!
//! A supervisor that stops reading our stdout or stderr must not stall the loop: a stalled loop
//! sends no heartbeats and the backup takes over a healthy source. So the producer side
//! ([`Queue::push`], [`stdout_line`], the logger) never blocks: each stream has a bounded queue
//! of whole lines ([`BACKLOG_ENV`], default [`DEFAULT_BACKLOG`]); when it is full the line is
//! dropped and counted. Once the writer can write again it writes a notice in the place of the
//! dropped lines: the `events-dropped` event on stdout, a log line on stderr. Lines that are not
//! dropped keep their order, and each is written whole by one writer, so none is cut or
//! interleaved with another.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

/// Environment variable that sets each stream's queue capacity, in lines.
pub const BACKLOG_ENV: &str = "VMM_TAKEOVER_OUTPUT_BACKLOG";
/// Queue capacity (lines per stream) when [`BACKLOG_ENV`] is not set.
pub const DEFAULT_BACKLOG: usize = 4096;
/// Largest accepted [`BACKLOG_ENV`]: bounds the memory a stuck pipe can pin.
pub const MAX_BACKLOG: usize = 1 << 20;
/// How long the process waits for queued lines at exit: a stuck pipe must not keep it alive.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Why the output could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`BACKLOG_ENV`] is not a number in range.
    #[error("{BACKLOG_ENV}={value:?} is not allowed: expected a whole number of lines in 1..={MAX_BACKLOG} (default {DEFAULT_BACKLOG})")]
    BadBacklog {
        /// The value as given.
        value: String,
    },
    /// The writer thread could not be started.
    #[error("cannot start the {stream} writer thread: {source}")]
    Thread {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// From `thread::Builder::spawn`.
        source: io::Error,
    },
    /// Another logger was installed first.
    #[error("cannot install the logger: {0}")]
    Logger(#[from] log::SetLoggerError),
}

/// One queued item: a whole line (with its `\n`), or how many lines were dropped at this point.
enum Item {
    Line(Vec<u8>),
    Dropped(u64),
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// `Line` items in `items` (the `Dropped` markers between them do not count).
    lines: usize,
    /// The writer holds an item it has not finished writing.
    busy: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when an item is queued (the writer waits on it).
    queued: Condvar,
    /// Signalled when the writer finished an item (`flush` waits on it).
    written: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded queue of lines with a writer thread draining it into a blocking sink.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Starts a writer thread named `vmm-out-NAME` that writes queued lines to `sink`, and
    /// `notice(n)` (a whole line) where `n` lines were dropped.
    pub fn spawn(
        name: &'static str,
        sink: impl Write + Send + 'static,
        capacity: usize,
        notice: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> Result<Queue, Error> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            queued: Condvar::new(),
            written: Condvar::new(),
            capacity: capacity.max(1),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("vmm-out-{name}"))
            .spawn(move || writer(&sh, sink, notice))
            .map_err(|source| Error::Thread {
                stream: name,
                source,
            })?;
        Ok(Queue { shared })
    }

    /// Queues one whole line (ending in `\n`). Never blocks on I/O; returns false when the queue
    /// was full and the line was dropped (and counted).
    pub fn push(&self, line: Vec<u8>) -> bool {
        let mut s = self.shared.lock();
        if s.lines >= self.shared.capacity {
            match s.items.back_mut() {
                Some(Item::Dropped(n)) => *n += 1,
                _ => s.items.push_back(Item::Dropped(1)),
            }
            return false;
        }
        s.items.push_back(Item::Line(line));
        s.lines += 1;
        drop(s);
        self.shared.queued.notify_one();
        true
    }

    /// Waits until everything queued so far is written, or until `deadline`. True if all was.
    pub fn flush(&self, deadline: Instant) -> bool {
        let mut s = self.shared.lock();
        while !s.items.is_empty() || s.busy {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            s = self
                .shared
                .written
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

fn writer(sh: &Shared, mut sink: impl Write, notice: impl Fn(u64) -> Vec<u8>) {
    loop {
        let item = {
            let mut s = sh.lock();
            loop {
                if let Some(item) = s.items.pop_front() {
                    if matches!(item, Item::Line(_)) {
                        s.lines -= 1;
                    }
                    s.busy = true;
                    break item;
                }
                s = sh.queued.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        let bytes = match item {
            Item::Line(l) => l,
            Item::Dropped(n) => notice(n),
        };
        // An error (EPIPE: the reader is gone) loses this line; there is nobody left to tell.
        let _ = write_whole(&mut sink, &bytes);
        sh.lock().busy = false;
        sh.written.notify_all();
    }
}

/// Writes all of `bytes` and flushes. A non-blocking fd (shared with a parent that set
/// O_NONBLOCK) is waited on rather than given up: this thread may wait, the loop may not.
fn write_whole(sink: &mut impl Write, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match sink.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    loop {
        match sink.flush() {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Writes through the std handle, so its lock keeps our lines whole next to any direct
/// `println!`/`eprintln!` (clap's messages, a panic).
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().lock().flush()
    }
}

/// The `events-dropped` event.
fn events_dropped(n: u64) -> Vec<u8> {
    crate::events::line("events-dropped", json!({ "count": n })).into_bytes()
}

/// A log-style line (env_logger's default layout) saying how many log lines were lost.
fn logs_dropped(n: u64) -> Vec<u8> {
    format!(
        "[{} WARN  {}] {n} log line(s) dropped: stderr was not read fast enough\n",
        humantime::format_rfc3339_micros(SystemTime::now()),
        module_path!()
    )
    .into_bytes()
}

struct Output {
    stdout: Queue,
    stderr: Queue,
}

impl Output {
    fn start(capacity: usize) -> Result<Output, Error> {
        Ok(Output {
            stdout: Queue::spawn("stdout", Stdout, capacity, events_dropped)?,
            stderr: Queue::spawn("stderr", Stderr, capacity, logs_dropped)?,
        })
    }
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

fn output() -> &'static Output {
    // Started by `init`; a caller that skipped it (a unit test) gets the defaults.
    OUTPUT.get_or_init(|| {
        Output::start(backlog().unwrap_or(DEFAULT_BACKLOG)).expect("start output writer threads")
    })
}

/// The queue capacity from [`BACKLOG_ENV`], or [`DEFAULT_BACKLOG`] when unset.
pub fn backlog() -> Result<usize, Error> {
    let Some(v) = std::env::var_os(BACKLOG_ENV) else {
        return Ok(DEFAULT_BACKLOG);
    };
    let v = v.to_string_lossy();
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BACKLOG).contains(&n) => Ok(n),
        _ => Err(Error::BadBacklog {
            value: v.into_owned(),
        }),
    }
}

/// Starts both writer threads and installs env_logger on the stderr queue (`RUST_LOG`, default
/// `warn`, microsecond timestamps).
pub fn try_init() -> Result<(), Error> {
    let out = Output::start(backlog()?)?;
    let _ = OUTPUT.set(out);
    log::set_logger(&LOGGER)?;
    set_log_level(None);
    Ok(())
}

/// The installed logger: env_logger behind a lock, so that `--log-level` (known only once the
/// flags and the config file are parsed, after logging started) can replace its filter.
struct SwitchLogger(RwLock<Option<env_logger::Logger>>);

static LOGGER: SwitchLogger = SwitchLogger(RwLock::new(None));

impl log::Log for SwitchLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        let l = self.0.read().unwrap_or_else(|e| e.into_inner());
        l.as_ref().is_some_and(|l| l.enabled(m))
    }

    fn log(&self, r: &log::Record<'_>) {
        let l = self.0.read().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = l.as_ref() {
            l.log(r);
        }
    }

    fn flush(&self) {}
}

/// Sets the log filter: `Some(level)` replaces `RUST_LOG` entirely (`--log-level`); `None` is
/// `RUST_LOG`, default `warn`.
pub fn set_log_level(level: Option<log::LevelFilter>) {
    let mut b = match level {
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")),
        Some(l) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(l);
            if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
                b.parse_write_style(&style);
            }
            b
        }
    };
    let logger = b
        .format_timestamp_micros()
        .target(env_logger::Target::Pipe(Box::new(LogPipe::default())))
        .build();
    let max = logger.filter();
    *LOGGER.0.write().unwrap_or_else(|e| e.into_inner()) = Some(logger);
    log::set_max_level(max);
}

/// [`try_init`], or the error on stderr and exit code 2 (as for a bad flag).
pub fn init() {
    if let Err(e) = try_init() {
        eprintln!("vmm-takeover: {e}");
        std::process::exit(2);
    }
}

/// Queues one whole line (ending in `\n`) for stdout; dropped and counted if the queue is full.
pub fn stdout_line(line: String) {
    if !output().stdout.push(line.into_bytes()) {
        if let Some(o) = crate::ops::get() {
            o.events_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Queues one whole line (ending in `\n`) for stderr, beside the log lines.
pub fn stderr_line(line: String) {
    output().stderr.push(line.into_bytes());
}

/// Waits up to `timeout` until everything queued on stdout and stderr is written. True if all
/// was; false if a pipe stayed full (the process may then exit with lines unwritten).
pub fn flush(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let o = output();
    // Both, even if the first times out: the second may well be readable.
    let a = o.stdout.flush(deadline);
    let b = o.stderr.flush(deadline);
    a && b
}

/// env_logger's pipe target: it writes each record with one `write_all` and then `flush`es, so
/// a record (one or more lines) is queued whole at `flush`.
#[derive(Default)]
struct LogPipe {
    record: Vec<u8>,
}

impl Write for LogPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.record.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.record.is_empty() {
            let mut rec = std::mem::take(&mut self.record);
            if rec.last() != Some(&b'\n') {
                rec.push(b'\n');
            }
            output().stderr.push(rec);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks every write until the test lets it through, and records what it got.
    struct Gated {
        go: mpsc::Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.go
                .recv()
                .map_err(|_| io::Error::from(ErrorKind::BrokenPipe))?;
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gated(capacity: usize) -> (Queue, mpsc::Sender<()>, Arc<Mutex<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let q = Queue::spawn(
            "test",
            Gated {
                go: rx,
                out: out.clone(),
            },
            capacity,
            |n| format!("dropped {n}\n").into_bytes(),
        )
        .unwrap();
        (q, tx, out)
    }

    #[test]
    fn a_full_queue_drops_and_counts_then_says_so_in_place() {
        let (q, go, out) = gated(2);
        // The writer takes "a" and blocks in write; "b" and "c" fill the queue.
        assert!(q.push(b"a\n".to_vec()));
        let t = Instant::now();
        while q.shared.lock().lines != 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "writer never took a");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(q.push(b"b\n".to_vec()));
        assert!(q.push(b"c\n".to_vec()));
        let t = Instant::now();
        for _ in 0..3 {
            assert!(!q.push(b"lost\n".to_vec()));
        }
        assert!(t.elapsed() < Duration::from_secs(1), "push must not block");
        for _ in 0..10 {
            go.send(()).unwrap();
        }
        assert!(q.flush(Instant::now() + Duration::from_secs(10)));
        assert!(q.push(b"d\n".to_vec()));
        go.send(()).unwrap();
        assert!(q.flush(Instant::now() + Duration::from_secs(10)));
        assert_eq!(
            String::from_utf8(out.lock().unwrap().clone()).unwrap(),
            "a\nb\nc\ndropped 3\nd\n"
        );
    }

    #[test]
    fn flush_gives_up_at_the_deadline_when_the_sink_is_stuck() {
        let (q, _go, _out) = gated(4);
        q.push(b"stuck\n".to_vec());
        let t = Instant::now();
        assert!(!q.flush(Instant::now() + Duration::from_millis(200)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backlog_env_values() {
        // One test touches the variable, so parallel tests do not race on it.
        std::env::remove_var(BACKLOG_ENV);
        assert_eq!(backlog().unwrap(), DEFAULT_BACKLOG);
        std::env::set_var(BACKLOG_ENV, "4");
        assert_eq!(backlog().unwrap(), 4);
        for bad in ["0", "-1", "lots", "", "99999999999"] {
            std::env::set_var(BACKLOG_ENV, bad);
            let e = backlog().unwrap_err().to_string();
            assert!(
                e.contains(BACKLOG_ENV) && e.contains("1..="),
                "{bad:?}: {e}"
            );
        }
        std::env::remove_var(BACKLOG_ENV);
    }

    #[test]
    fn the_stderr_notice_is_one_log_style_line() {
        let l = String::from_utf8(logs_dropped(7)).unwrap();
        assert!(l.starts_with('[') && l.ends_with('\n'), "{l}");
        assert_eq!(l.matches('\n').count(), 1, "{l}");
        assert!(
            l.contains(" WARN ") && l.contains("7 log line(s) dropped"),
            "{l}"
        );
    }
}
