// SPDX-License-Identifier: Apache-2.0
//! `vmm-takeover`: run the source or backup side of a heartbeat link, or the demo.
//!
//! Thin by design: parses flags, wires the library's subscribers into an `EventManager`, and prints
//! lifecycle events as JSON lines on stdout (`docs/events.md`). Logs go to stderr (`RUST_LOG`).
//! Neither stream can stall the loop: both are queued and written off the loop.

mod backup_cmd;
mod cli;
mod config;
mod demo;
mod events;
mod guest_report;
mod hooks;
mod ops;
mod output;
mod replica;
mod signals;
mod source_cmd;
mod vmm_child;

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_takeover_arbiter_etcd::{default_holder, EtcdArbiter};
use vmm_takeover_core::vmm_keepalive::EffectiveKeepalive;
use vmm_takeover_core::ArbiterSession;

use cli::Command;
use guest_report::GuestReport;

type Subscriber = Rc<RefCell<dyn MutEventSubscriber>>;

/// Exit codes (README, "The CLI").
pub mod exit {
    /// Done as asked: stood down, handed off, or the standby guest started.
    pub const OK: u8 = 0;
    /// A runtime error (printed on stderr).
    pub const ERROR: u8 = 1;
    /// Invalid flags or configuration (printed on stderr, naming what is allowed).
    pub const USAGE: u8 = 2;
    /// The backup's `vm_start` failed: the standby guest does not run.
    pub const HOOK_FAILED: u8 = 3;
    /// The pair belongs to someone else: the source found it owned at start or was fenced
    /// (its lease ran out), or another backup won it.
    pub const OWNED: u8 = 4;
    /// The source refused this backup for good (wrong pair id, protocol version).
    pub const REJECTED: u8 = 5;
    /// Whether a guest runs is unknown: the backup's `vm_start` timed out, or the source's
    /// handoff got no answer. Nothing is retried on a guess; an operator decides.
    pub const UNCERTAIN: u8 = 6;
    /// The backup was stopped while `vm_start` ran; the hook was aborted.
    pub const ABORTED: u8 = 7;
    /// The VMM the source served as its child (`-- CMD`) exited: its guest is gone.
    pub const VMM_EXITED: u8 = 8;
    /// The backup's QEMU was receiving a live migration that did not complete: its image is
    /// incomplete and nothing was started.
    pub const INCOMPLETE: u8 = 9;
    /// The backup replicates (`--replica-from`) but holds no checkpoint of the link it lost (or,
    /// with an arbiter, the replica of record names another link or cannot be read): resuming
    /// could take back output the source released, so nothing was started.
    pub const NO_REPLICA: u8 = 10;
}

/// Why a command ended before its loop ran: an exit code and a message.
pub struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::ERROR,
            message: message.into(),
        }
    }

    /// Errors of the core: configuration values are usage errors (exit 2), the rest runtime.
    fn core(e: vmm_takeover_core::Error) -> Failure {
        let code = match e {
            vmm_takeover_core::Error::Config(_) => exit::USAGE,
            _ => exit::ERROR,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::runtime(message)
    }
}

fn main() -> ExitCode {
    // Logging starts before parsing (a value parser may log); `--log-level`, which may come
    // from the config file, replaces the filter once known.
    output::init();
    let cli = match config::parse(std::env::args_os()) {
        Ok(cli) => cli,
        // clap prints its own errors (exit 2), and --help/--version (exit 0).
        Err(config::ParseError::Clap(e)) => e.exit(),
        Err(config::ParseError::Config(e)) => {
            output::stderr_line(format!("vmm-takeover: {e}\n"));
            output::flush(output::EXIT_FLUSH);
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Some(level) = cli.log_level {
        output::set_log_level(Some(level.filter()));
    }
    let r = match cli.command {
        Command::Source(a) => {
            ops::notify::start();
            source_cmd::run(a)
        }
        Command::Backup(a) => {
            ops::notify::start();
            backup_cmd::run(a)
        }
        Command::Status(a) => status(a),
        Command::Demo(a) => demo::run(a).map(|()| exit::OK),
        Command::Keygen(a) => keygen(a),
        Command::CheckConfig(a) => check_config(a),
        Command::Man(a) => man(a),
        Command::Completions(a) => completions(a),
    };
    let code = match r {
        Ok(code) => code,
        Err(f) => {
            // Once, on stderr, whatever RUST_LOG says: it is why the process ends.
            output::stderr_line(format!("vmm-takeover: {}\n", f.message));
            f.code
        }
    };
    ops::notify::stopping();
    output::flush(output::EXIT_FLUSH);
    ExitCode::from(code)
}

/// `vmm-takeover status`: one JSON object on stdout, or why not (exit 1).
fn status(a: cli::StatusArgs) -> Result<u8, Failure> {
    let v = ops::control::ask(&a.control, a.timeout).map_err(Failure::runtime)?;
    output::stdout_line(format!("{v}\n"));
    Ok(exit::OK)
}

/// `vmm-takeover keygen`: a new key file, or one more key in one.
fn keygen(a: cli::KeygenArgs) -> Result<u8, Failure> {
    use vmm_takeover_core::auth;
    let r = if a.add {
        auth::keygen_add(&a.path)
    } else {
        auth::keygen(&a.path)
    };
    let id = r.map_err(|e| Failure {
        code: exit::USAGE,
        message: e.to_string(),
    })?;
    events::emit(
        "key-written",
        json!({"path": a.path.display().to_string(), "key_id": id, "added": a.add}),
    );
    Ok(exit::OK)
}

/// `vmm-takeover check-config`: the `config-ok` event, or the first error (exit 2).
fn check_config(a: cli::CheckConfigArgs) -> Result<u8, Failure> {
    let checked = config::check(&a.path, a.keys).map_err(|e| Failure {
        code: exit::USAGE,
        message: match e {
            // An error clap renders (a value it refused late): one line of it.
            config::ParseError::Clap(e) => e.render().to_string().trim().to_string(),
            config::ParseError::Config(e) => e.to_string(),
        },
    })?;
    events::emit(
        "config-ok",
        json!({
            "path": a.path.display().to_string(),
            "tables": checked.tables,
            "key_files_checked": a.keys,
        }),
    );
    Ok(exit::OK)
}

/// `vmm-takeover man [SUBCOMMAND]`: the roff page on stdout.
fn man(a: cli::ManArgs) -> Result<u8, Failure> {
    let cmd = config::command();
    let page = match &a.subcommand {
        None => cmd,
        Some(name) => {
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| Failure {
                code: exit::USAGE,
                message: format!(
                    "no subcommand {name:?}; one of: {}",
                    cmd.get_subcommands()
                        .map(|s| s.get_name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
            // The page of `vmm-takeover source` is vmm-takeover-source(1), as git does it.
            let title = format!("vmm-takeover-{name}");
            sub.name(title.clone())
                .bin_name(title)
                .version(cli::version())
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .map_err(|e| Failure::runtime(format!("man page: {e}")))?;
    write_stdout(&roff)
}

/// `vmm-takeover completions SHELL`: the script on stdout.
fn completions(a: cli::CompletionsArgs) -> Result<u8, Failure> {
    let mut cmd = config::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "vmm-takeover", &mut script);
    write_stdout(&script)
}

/// Writes a generated document to stdout in one piece (it is not an event line; nothing else
/// is printed by these commands).
fn write_stdout(bytes: &[u8]) -> Result<u8, Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(exit::OK),
        // `vmm-takeover man | head`: the reader had what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(e) => Err(Failure::runtime(format!("cannot write to stdout: {e}"))),
    }
}

/// The link's credentials from `--psk-file` / `--insecure-no-auth` (a bad key file: exit 2).
fn credentials(a: &cli::AuthArgs) -> Result<vmm_takeover_core::auth::Credentials, Failure> {
    use vmm_takeover_core::auth::{Credentials, KeyRing};
    match &a.psk_file {
        Some(path) => {
            let ring = KeyRing::load(path).map_err(|e| Failure {
                code: exit::USAGE,
                message: e.to_string(),
            })?;
            Ok(Credentials::Keys(Arc::new(ring)))
        }
        None => {
            log::warn!(
                "--insecure-no-auth: the heartbeat link is not authenticated; anyone who reaches \
                 it can stand the backup down or make it start its copy"
            );
            Ok(Credentials::Insecure)
        }
    }
}

/// How the link is authenticated, for the `listening` and `armed` events: the key ids (never
/// the keys), or `null` for `--insecure-no-auth`.
/// A source accepts every key of its file (`key_ids`); a backup uses the newest (`key_id`).
fn auth_json(c: &vmm_takeover_core::auth::Credentials, backup: bool) -> Value {
    match c {
        vmm_takeover_core::auth::Credentials::Keys(ring) if backup => {
            json!({"mode": "psk", "key_id": ring.newest().id()})
        }
        vmm_takeover_core::auth::Credentials::Keys(ring) => {
            json!({"mode": "psk", "key_ids": ring.ids().collect::<Vec<_>>()})
        }
        vmm_takeover_core::auth::Credentials::Insecure => json!({"mode": "none"}),
    }
}

/// The exit code an observer asks for. Shared with the observers, which must be `Send`.
#[derive(Clone, Default)]
struct Exit(Arc<Mutex<Option<u8>>>);

impl Exit {
    fn set(&self, code: u8) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
    }

    fn get(&self) -> Option<u8> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the loop until one of the observers sets an exit code.
fn run_loop(em: &mut EventManager<Subscriber>, exits: &[&Exit]) -> Result<u8, Failure> {
    loop {
        if let Some(code) = exits.iter().find_map(|e| e.get()) {
            return Ok(code);
        }
        em.run()
            .map_err(|e| Failure::runtime(format!("event loop: {e:?}")))?;
    }
}

/// Reports a local guest every 500 ms, so its counter can be watched from outside.
fn add_guest_report(
    em: &mut EventManager<Subscriber>,
    guest: Option<vmm_takeover_guest::StandbyGuest>,
) -> Result<(), Failure> {
    if let Some(g) = guest {
        let r = GuestReport::new(g, Duration::from_millis(500))
            .map_err(|e| Failure::runtime(format!("guest report timer: {e}")))?;
        em.add_subscriber(Rc::new(RefCell::new(r)));
    }
    Ok(())
}

/// Opens this process's arbiter session when `--arbiter` is given. Requests get a quarter of the
/// TTL (at least 250 ms, at most 2 s), so that a silent arbiter cannot eat the lease.
fn open_arbiter(a: &cli::ArbiterArgs) -> Result<Option<ArbiterSession>, Failure> {
    let Some(cli::Endpoints(endpoints)) = &a.arbiter else {
        return Ok(None);
    };
    let timeout = (a.lease_ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    let url = endpoints
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let arbiter = EtcdArbiter::new(endpoints.clone(), default_holder(), timeout);
    ArbiterSession::open(Box::new(arbiter), a.lease_ttl)
        .map(Some)
        .map_err(|e| Failure::runtime(format!("cannot open a session on etcd://{url}: {e}")))
}

/// Ends the arbiter session at exit (bounded): revoking the lease frees what it held at once.
fn close_arbiter(session: Option<&ArbiterSession>) {
    if let Some(s) = session {
        s.close(Duration::from_secs(2));
    }
}

/// The keepalive in force on a socket, as every event shows it.
fn keepalive_json(k: Option<&EffectiveKeepalive>) -> Value {
    match k {
        None => Value::Null,
        Some(k) => json!({
            "enabled": k.enabled,
            "idle_s": k.idle.as_secs(),
            "interval_s": k.interval.as_secs(),
            "count": k.count,
            "user_timeout_ms": k.user_timeout.map(|u| u.as_millis() as u64),
            "bound_ms": k.bound().map(|b| b.as_millis() as u64),
        }),
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}
