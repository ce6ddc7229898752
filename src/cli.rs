// SPDX-License-Identifier: Apache-2.0
//! Command-line flags. The contract here is relied on by tests and users.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmm_keepalive::{KeepaliveSpec, UserTimeout};
use vmm_takeover_arbiter_etcd::Endpoint;
use vmm_takeover_core::protocol::{MAX_HEARTBEAT, MIN_HEARTBEAT};

/// Backup-VM takeover over a keepalive-tuned TCP heartbeat link.
#[derive(Debug, Parser)]
#[command(name = "vmm-takeover", version = version(), about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log filter for stderr; overrides RUST_LOG when given (default: RUST_LOG, else `warn`).
    #[arg(long, value_name = "LEVEL", value_enum, global = true)]
    pub log_level: Option<LogLevel>,
}

/// `--version`: the crate version, the wire protocol version it speaks and the git revision it
/// was built from (`unknown` outside a git checkout; see build.rs).
pub fn version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        format!(
            "{} (protocol {}, git {})",
            env!("CARGO_PKG_VERSION"),
            vmm_takeover_core::auth::VERSION,
            env!("VMM_TAKEOVER_GIT_REV")
        )
    })
}

/// `--log-level`: the most verbose log level written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors (the default without RUST_LOG).
    Warn,
    /// Lifecycle information.
    Info,
    /// Details for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level as a log filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Source side: listen for backups, stand them down on SIGTERM/SIGINT, hand off on SIGUSR1.
    Source(SourceArgs),
    /// Backup side: connect to the source and run the vm_start hook when the source dies.
    Backup(BackupArgs),
    /// One-command demo on loopback: a source and a backup (dummy KVM or real Linux guests), a
    /// fault, a timeline.
    Demo(DemoArgs),
    /// Write a fresh key file for `--psk-file` (mode 0600), or add a key to one (rotation).
    Keygen(KeygenArgs),
    /// Ask a running source or backup for its state (its `--control` socket); prints JSON.
    Status(StatusArgs),
    /// Check a config file (`--config`) without starting anything: every table, every key.
    CheckConfig(CheckConfigArgs),
    /// Write the man page (roff) to stdout: `vmm-takeover man | man -l -`.
    Man(ManArgs),
    /// Write a shell completion script to stdout.
    Completions(CompletionsArgs),
}

/// `vmm-takeover check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file to check (TOML, with a `[source]` and/or a `[backup]` table).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Also load the key files the file names (`psk-file`), with the checks made at start
    /// (format, mode, owner). Off by default: key files are often installed separately.
    #[arg(long)]
    pub keys: bool,
}

/// `vmm-takeover man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The page of one subcommand (e.g. `source`) instead of the main page.
    #[arg(value_name = "SUBCOMMAND")]
    pub subcommand: Option<String>,
}

/// `vmm-takeover completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_name = "SHELL", value_enum)]
    pub shell: clap_complete::Shell,
}

/// `vmm-takeover keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key file to create (it must not exist), or with `--add` to extend.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Add a new key (the next id) to an existing file instead: rotation. Install the file on
    /// every source first, then on the backups (they use the newest key), then remove the old
    /// key's line everywhere.
    #[arg(long)]
    pub add: bool,
}

/// How the link is authenticated; one of the two is required on both sides.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct AuthArgs {
    /// The pre-shared key file (from `vmm-takeover keygen`; not readable by group or others).
    /// Both sides of a pair need a common key: backups use the file's newest key, sources
    /// accept every key in it.
    #[arg(long, value_name = "PATH")]
    pub psk_file: Option<PathBuf>,
    /// Run the link without authentication: anyone who reaches it can stand the backup down or
    /// make it start its copy. For tests on a trusted host only.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// The fault the demo injects into the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL: a crash; the backup takes over (`peer-closed`).
    Kill,
    /// SIGTERM: an orderly stop; the backup stands down and does NOT take over.
    Stop,
    /// SIGUSR1: a planned handoff; the source pauses its guest (with `--guest linux`: migrates it
    /// live to the backup's QEMU), then the backup takes over.
    Handoff,
}

impl Fault {
    /// The flag value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::Handoff => "handoff",
        }
    }
}

/// The guest the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoGuest {
    /// A dummy KVM guest inside each process (a labelled simulation without /dev/kvm): about
    /// two seconds.
    Dummy,
    /// A real Linux guest under QEMU (TCG, no KVM needed), live-migrated to the backup's QEMU on
    /// a handoff; needs qemu-system-x86, linux-image-cloud-amd64 and busybox-static (about ten
    /// seconds).
    Linux,
}

/// `vmm-takeover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which guest the source runs and the backup stands by with.
    #[arg(long, value_enum, default_value_t = DemoGuest::Dummy)]
    pub guest: DemoGuest,
    /// Which failure to inject into the source [default: kill with the dummy guest, handoff with
    /// linux, which refuses kill: its standby QEMU holds no image before a migration].
    #[arg(long, value_enum)]
    pub fault: Option<Fault>,
}

impl DemoArgs {
    /// The fault to inject: the one asked for, else the guest's default; `Err(why)` for a fault
    /// the guest cannot show.
    pub fn fault(&self) -> Result<Fault, String> {
        match (self.guest, self.fault) {
            (DemoGuest::Dummy, f) => Ok(f.unwrap_or(Fault::Kill)),
            (DemoGuest::Linux, None) => Ok(Fault::Handoff),
            (DemoGuest::Linux, Some(Fault::Kill)) => Err(
                "--fault kill is refused with --guest linux: the backup's standby QEMU waits for \
                 an incoming live migration (-incoming) and holds no guest image before one has \
                 run, so after a crash there is nothing to resume (the backup would exit 9, \
                 migration-incomplete). Use --fault handoff (a live migration, then HANDOFF) or \
                 --fault stop; crash takeover is shown by --guest dummy --fault kill."
                    .to_string(),
            ),
            (DemoGuest::Linux, Some(f)) => Ok(f),
        }
    }
}

/// Keepalive flag shared by both sides.
#[derive(Debug, Args, Clone)]
pub struct KeepaliveArgs {
    /// Keepalive spec in nginx's so_keepalive syntax: `on`, `off` or `IDLE:INTVL:CNT` (any part
    /// may be empty = system default; durations in whole seconds, units s/m/h).
    #[arg(long, value_name = "SPEC", default_value = "1:1:5", value_parser = parse_keepalive)]
    pub keepalive: KeepaliveSpec,
}

/// The endpoints of `--arbiter` (one flag value, a comma list).
#[derive(Debug, Clone)]
pub struct Endpoints(pub Vec<Endpoint>);

/// The arbiter flags shared by both sides.
#[derive(Debug, Args, Clone)]
pub struct ArbiterArgs {
    /// Decide who may run the pair's guest on etcd (`etcd://HOST:PORT[,HOST:PORT…]`): the
    /// guard against split brain. Both sides of a pair must use it. Without it, a partition
    /// between two live hosts starts a second copy of the guest.
    #[arg(long, value_name = "etcd://HOST:PORT[,…]", value_parser = parse_arbiter)]
    pub arbiter: Option<Endpoints>,
    /// The lease TTL asked of the arbiter (1s..=60s; etcd may grant more, reported in `owner`).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_lease_ttl, requires = "arbiter")]
    pub lease_ttl: Duration,
}

/// `vmm-takeover source`.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Address to listen on, `HOST:PORT`: `127.0.0.1:7070`, `[::1]:7070` or `localhost:7070`
    /// (a name is resolved now; the first address it resolves to is used). Port 0 picks one; see
    /// the `listening` event.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub listen: SocketAddr,
    /// The VM pair id (1..=64 of A-Z a-z 0-9 . _ -); backups must present the same.
    #[arg(long, value_name = "ID", value_parser = parse_pair_id)]
    pub pair_id: String,
    #[command(flatten)]
    pub keepalive: KeepaliveArgs,
    #[command(flatten)]
    pub arbiter: ArbiterArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    /// Most connections still in their handshake (a flood beyond it pushes out the oldest).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_pending: u32,
    /// Most connections in their handshake from one remote address; more are refused at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_pending_per_addr: u32,
    /// TCP_USER_TIMEOUT of the backups' connections: `auto` (= the keepalive bound), `off`
    /// (kernel default, ~15 min with unacknowledged data) or a duration such as `3s`. Lifted
    /// while a backup does not read, so a live but stalled backup is never cut off.
    #[arg(long, value_name = "auto|off|DURATION", default_value = "auto", value_parser = parse_user_timeout)]
    pub user_timeout: UserTimeout,
    /// Send a HEARTBEAT from the event loop at this interval (e.g. `10ms`); detects a hung VMM.
    #[arg(long, value_name = "DURATION", value_parser = parse_heartbeat)]
    pub heartbeat: Option<Duration>,
    /// On SIGUSR1, run this through `sh -c` to pause the local guest before HANDOFF.
    #[arg(long, value_name = "CMD", conflicts_with = "qmp")]
    pub on_handoff: Option<String>,
    /// With --on-handoff: run this through `sh -c` to resume the local guest when the handoff
    /// fails before the backup's copy runs.
    #[arg(long, value_name = "CMD", requires = "on_handoff")]
    pub on_resume: Option<String>,
    /// On SIGUSR1, send QMP `stop` to this QEMU socket before HANDOFF (`cont` if it fails).
    #[arg(long, value_name = "PATH", conflicts_with = "vm")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: a planned handoff is a live migration. On SIGUSR1 QEMU migrates to this URI
    /// (the backup's QEMU, started with `-S -incoming tcp:HOST:PORT`) and HANDOFF is sent once
    /// QEMU reports it completed; --hook-timeout bounds the migration.
    #[arg(long, value_name = "tcp:HOST:PORT", requires = "qmp", value_parser = parse_migrate_uri)]
    pub migrate_to: Option<String>,
    /// Run a built-in guest in this process (started now, paused on SIGUSR1 before HANDOFF):
    /// `kvm-dummy` (a real KVM guest) or `simulated` (a counting thread, no KVM needed).
    #[arg(long, value_name = "KIND", conflicts_with = "on_handoff", value_parser = ["kvm-dummy", "simulated"])]
    pub vm: Option<String>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Replicate the `kvm-dummy` guest to the backup every this often (Remus-style checkpoints,
    /// `1ms..=10s`), over a stream the backup dials at --replica-listen. Output commit: the
    /// guest's output (its counter, in `guest` events) is released only once the backup holds
    /// a checkpoint covering it. Serves one backup.
    #[arg(long, value_name = "DURATION", value_parser = parse_checkpoint, requires = "replica_listen")]
    pub checkpoint: Option<Duration>,
    /// With --checkpoint: where the backup's replication stream connects (`HOST:PORT`, port 0
    /// picks one; see the `replica-listening` event).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, requires = "checkpoint")]
    pub replica_listen: Option<SocketAddr>,
    /// The pause and resume hooks must return within this time.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub hook_timeout: Duration,
    /// After HANDOFF, the backup must report whether its copy runs within this time; after it
    /// the handoff is uncertain and the local guest stays paused (exit 6).
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = parse_timeout)]
    pub handoff_timeout: Duration,
    /// With --qmp: ask QEMU for its status this often (each answer due within the same time).
    /// Two failures in a row: QEMU is killed (so it can never resume its guest), the source
    /// says `fenced` and exits 4, and the backup takes over.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_timeout, requires = "qmp")]
    pub health_interval: Duration,
    /// The VMM this source serves, started as its child after the pair is owned: it dies with
    /// the source (PR_SET_PDEATHSIG), and its exit ends the source (exit 8), so that the backup
    /// takes over. Give it after `--`.
    #[arg(last = true, value_name = "VMM_COMMAND")]
    pub vmm: Vec<String>,
}

/// The built-in `kvm-dummy` guest's shape, and Remus-style replication (`docs/replication.md`).
#[derive(Debug, Args, Clone)]
pub struct GuestArgs {
    /// Memory of the `kvm-dummy` guest (`128KiB`..=`4GiB`, a multiple of 4 KiB; `K`/`M`/`G` and
    /// `KiB`/`MiB`/`GiB` are binary). A replica's must equal its source's.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_mem_size)]
    pub guest_mem: MemSize,
    /// How fast the `kvm-dummy` guest writes its memory, page by page (e.g. `10MiB/s`; `0`:
    /// never): the load replication carries.
    #[arg(long, value_name = "SIZE/s", default_value = "0", value_parser = parse_rate)]
    pub guest_dirty_rate: DirtyRate,
}

/// Guest memory in bytes (a string with a unit in config files, as on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub usize);

/// Bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRate(pub u64);

/// `vmm-takeover backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The source's heartbeat address, `HOST:PORT`: `127.0.0.1:7070`, `[::1]:7070` or
    /// `localhost:7070` (a name is resolved now; the first address it resolves to is used).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub connect: SocketAddr,
    /// The VM pair id; must match the source's.
    #[arg(long, value_name = "ID", value_parser = parse_pair_id)]
    pub pair_id: String,
    #[command(flatten)]
    pub keepalive: KeepaliveArgs,
    #[command(flatten)]
    pub arbiter: ArbiterArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    /// In heartbeat mode, take over after this many missed heartbeat intervals (1..=1000).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub heartbeat_misses: u32,
    /// Rely on the kernel's keepalive timers alone. By default a precise watchdog also enforces
    /// the keepalive bound from the kernel's own TCP_INFO timestamps: the kernel's jiffy-driven
    /// probe timers can run up to ~200 ms past the bound.
    #[arg(long)]
    pub kernel_keepalive_only: bool,
    /// Keep retrying when the source refuses this backup for a reason that cannot heal by
    /// itself (wrong pair id, protocol version); by default the backup then exits 5.
    #[arg(long)]
    pub retry_rejected: bool,
    /// On takeover, run this through `sh -c` (env: VMM_TAKEOVER_REASON, VMM_TAKEOVER_PAIR_ID,
    /// VMM_TAKEOVER_ERRNO, VMM_TAKEOVER_EPOCH). Its output goes to stderr.
    #[arg(long, value_name = "CMD", group = "hook")]
    pub on_takeover: Option<String>,
    /// Hold a built-in paused standby guest in this process and resume it on takeover (the
    /// process then keeps running the guest): `kvm-dummy` (a real KVM guest) or `simulated`.
    #[arg(long, value_name = "KIND", group = "hook", group = "pausable", value_parser = ["kvm-dummy", "simulated"])]
    pub vm: Option<String>,
    /// On takeover, send QMP `cont` to this QEMU socket and wait for `running`.
    #[arg(long, value_name = "PATH", group = "hook", group = "pausable")]
    pub qmp: Option<PathBuf>,
    /// Re-protection: after a takeover (`vm-started`), become the source of the pair on this
    /// address (`HOST:PORT`, port 0 picks one; see the `promoted` event), for a new backup,
    /// with the same pair id, key, keepalive and arbiter, the epoch won carrying over. Only
    /// with --vm or --qmp: the guest then runs under this process, which can pause it for a
    /// later handoff (SIGUSR1) and stands its backups down on SIGTERM.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, requires = "pausable")]
    pub then_listen: Option<SocketAddr>,
    /// With --then-listen: the heartbeat interval of the promoted source (as the source's
    /// --heartbeat) [default: the interval the old source announced, if any].
    #[arg(long, value_name = "DURATION", value_parser = parse_heartbeat, requires = "then_listen")]
    pub then_heartbeat: Option<Duration>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Keep the `kvm-dummy` standby a replica of the source's guest: dial the source's
    /// --replica-listen address, apply its checkpoints, and on takeover resume from the last
    /// one that came whole over the link just lost. Without one, nothing is started (exit 10).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub replica_from: Option<SocketAddr>,
    /// With --then-listen (and --vm kvm-dummy): the promoted source replicates its guest to its
    /// own backup every this often (as the source's --checkpoint); usually with --replica-from,
    /// so that the guest it protects is the one it resumed.
    #[arg(long, value_name = "DURATION", value_parser = parse_checkpoint, requires_all = ["then_listen", "then_replica_listen"])]
    pub then_checkpoint: Option<Duration>,
    /// With --then-checkpoint: the promoted source's --replica-listen.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, requires = "then_checkpoint")]
    pub then_replica_listen: Option<SocketAddr>,
    /// `vm_start` must return within this time; after it the takeover is reported as
    /// `hook-timeout` (exit 6) and the hook is aborted (a command's process group is killed).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub hook_timeout: Duration,
}

/// Operations flags shared by both sides.
#[derive(Debug, Args, Clone)]
pub struct OpsArgs {
    /// Serve Prometheus metrics (OpenMetrics text) on `HOST:PORT` at `/metrics`, from a thread
    /// off the event loop. Port 0 picks one; see the `metrics` event.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub metrics: Option<SocketAddr>,
    /// Answer `vmm-takeover status --control PATH` on this Unix socket (created mode 0600; a
    /// stale socket is replaced, a live one is an error).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `vmm-takeover status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The `--control` socket of the process to ask.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// How long to wait for the answer.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

const HOST_PORT: &str = "HOST:PORT, e.g. 127.0.0.1:7070 or localhost:7070";

/// `HOST:PORT` with an IP literal or a host name, resolved here (once, at start): the link then
/// always uses one fixed address, and a bad name fails at once with exit 2 like any bad flag.
fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port; expected {HOST_PORT}"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("{s:?} has no host; expected {HOST_PORT}"));
    }
    if host.contains(':') && !s.starts_with('[') {
        return Err(format!(
            "{s:?}: an IPv6 address needs brackets, as in [::1]:7070; expected {HOST_PORT}"
        ));
    }
    if port.is_empty() {
        return Err(format!("{s:?} has no port; expected {HOST_PORT}"));
    }
    let port: u16 = port.parse().map_err(|_| {
        format!("{s:?}: the port must be a number in 0..=65535; expected {HOST_PORT}")
    })?;
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?} in {s:?}: {e}; expected {HOST_PORT}"))?;
    let first = addrs
        .next()
        .ok_or_else(|| format!("{host:?} in {s:?} resolves to no address; expected {HOST_PORT}"))?;
    let rest = addrs.count();
    if rest > 0 {
        log::info!(
            "{s} resolves to {} addresses; using the first, {first}",
            rest + 1
        );
    }
    Ok(first)
}

fn parse_migrate_uri(s: &str) -> Result<String, String> {
    vmm_takeover_guest::migrate::check_uri(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_pair_id(s: &str) -> Result<String, String> {
    vmm_takeover_core::protocol::validate_pair_id(s)?;
    Ok(s.to_string())
}

fn parse_keepalive(s: &str) -> Result<KeepaliveSpec, String> {
    s.parse::<KeepaliveSpec>().map_err(|e| e.to_string())
}

fn parse_user_timeout(s: &str) -> Result<UserTimeout, String> {
    match s {
        "auto" => Ok(UserTimeout::Auto),
        "off" => Ok(UserTimeout::Off),
        _ => {
            let d = humantime::parse_duration(s).map_err(|e| {
                format!("{s:?} is not auto, off or a duration like 3s or 500ms: {e}")
            })?;
            UserTimeout::explicit(d).map_err(|e| e.to_string())
        }
    }
}

fn parse_arbiter(s: &str) -> Result<Endpoints, String> {
    vmm_takeover_arbiter_etcd::parse_endpoints(s)
        .map(Endpoints)
        .map_err(|e| e.to_string())
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 2s: {e}"))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&d) {
        return Err(format!("the lease TTL must be 1s..=60s, got {s:?}"));
    }
    Ok(d)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms or 30s: {e}"))?;
    let max = Duration::from_secs(3600);
    if d < Duration::from_millis(1) || d > max {
        return Err(format!("a timeout must be 1ms..=1h, got {s:?}"));
    }
    Ok(d)
}

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10ms or 1s: {e}"))?;
    if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&d) {
        return Err(format!(
            "heartbeat interval must be {MIN_HEARTBEAT:?}..={MAX_HEARTBEAT:?}, got {s:?}"
        ));
    }
    Ok(d)
}

/// Checkpoint intervals: Remus ran at 25 ms; below 1 ms the pause is most of the time.
fn parse_checkpoint(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 25ms or 1s: {e}"))?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(10) {
        return Err(format!(
            "a checkpoint interval must be 1ms..=10s, got {s:?}"
        ));
    }
    Ok(d)
}

/// `N`, `NK`/`NKiB`, `NM`/`NMiB`, `NG`/`NGiB` (binary multiples), in bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64MiB, 512KiB or 4096"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (allowed: B, K/KiB, M/MiB, G/GiB, all binary)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_mem_size(s: &str) -> Result<MemSize, String> {
    use vmm_takeover_guest::kvm_dummy::{MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE};
    let n = parse_size(s)?;
    if n < MIN_MEM_SIZE as u64 || n > MAX_MEM_SIZE as u64 || n % PAGE_SIZE as u64 != 0 {
        return Err(format!(
            "guest memory must be 128KiB..=4GiB and a multiple of 4KiB, got {s:?}"
        ));
    }
    Ok(MemSize(n as usize))
}

/// `SIZE/s` (or a bare `SIZE`, per second).
fn parse_rate(s: &str) -> Result<DirtyRate, String> {
    let size = s.strip_suffix("/s").unwrap_or(s);
    let n = parse_size(size)?;
    if n > 1 << 40 {
        return Err(format!("a dirty rate must be at most 1TiB/s, got {s:?}"));
    }
    Ok(DirtyRate(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_checkpoint_intervals_parse_or_say_what_is_allowed() {
        assert_eq!(parse_mem_size("64MiB").unwrap(), MemSize(64 << 20));
        assert_eq!(parse_mem_size("128K").unwrap(), MemSize(128 << 10));
        assert_eq!(parse_mem_size("4G").unwrap(), MemSize(4 << 30));
        for bad in ["64KiB", "5G", "131073", "12 parsecs", "", "MiB"] {
            let e = parse_mem_size(bad).unwrap_err();
            assert!(e.contains(bad) || e.contains("size like"), "{bad}: {e}");
        }
        assert!(parse_mem_size("1T")
            .unwrap_err()
            .contains("allowed: B, K/KiB"));
        assert_eq!(parse_rate("10MiB/s").unwrap(), DirtyRate(10 << 20));
        assert_eq!(parse_rate("0").unwrap(), DirtyRate(0));
        assert!(parse_rate("2048G/s").is_err());
        assert_eq!(parse_checkpoint("25ms").unwrap(), Duration::from_millis(25));
        assert!(parse_checkpoint("11s").unwrap_err().contains("1ms..=10s"));
        assert!(parse_checkpoint("500us").is_err());
    }

    #[test]
    fn ip_literals_pass_through_and_names_resolve() {
        for s in ["127.0.0.1:7070", "[::1]:7070", "0.0.0.0:0"] {
            assert_eq!(
                parse_host_port(s).unwrap(),
                s.parse::<SocketAddr>().unwrap()
            );
        }
        let a = parse_host_port("localhost:7070").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 7070, "{a}");
    }

    #[test]
    fn bad_addresses_name_the_value_and_the_form() {
        for s in [
            "",
            "7070",
            "localhost",
            ":7070",
            "::1:7070",
            "localhost:x",
            "a.invalid:1",
        ] {
            let e = parse_host_port(s).unwrap_err();
            assert!(e.contains(&format!("{s:?}")), "{s:?}: {e}");
            assert!(e.ends_with(HOST_PORT), "{s:?}: {e}");
        }
    }
}
