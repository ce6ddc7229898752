// SPDX-License-Identifier: Apache-2.0
//! Resource exhaustion on the source: running out of descriptors must neither make its event loop
//! spin (a spinning loop starves the heartbeat of every backup) nor lock a real backup out.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, SockAddr, Socket, Type};
use vmm_takeover_core::auth::{BackupHandshake, OsEntropy, Reader};

/// The source's descriptor limit: a few dozen above what it needs for itself.
const NOFILE: u64 = 64;
/// Connections opened at once: several times what the source can hold.
const FLOOD: usize = 300;
/// How long the source's CPU time is measured from the start of the flood.
const CPU_WINDOW: Duration = Duration::from_secs(3);
/// A spinning loop uses ~100 % of a core; an idle one a few per cent.
const CPU_MAX: f64 = 0.30;
/// Time for a real backup to arm while descriptors are short.
const ARM_MAX: Duration = Duration::from_secs(5);

/// The CPU time (user + system) `pid` has used so far, from `/proc/PID/stat`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may contain spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// CPU use of a process over a wall-clock window, as a share of one core.
struct CpuMeter {
    pid: i32,
    cpu: Duration,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: i32) -> CpuMeter {
        CpuMeter {
            pid,
            cpu: cpu_time(pid),
            at: Instant::now(),
        }
    }

    /// Waits until `window` has passed since the start (a measurement, nothing is awaited), then
    /// returns the share of one core used, printing it.
    fn share_over(&self, window: Duration, what: &str) -> f64 {
        std::thread::sleep(window.saturating_sub(self.at.elapsed()));
        let (cpu, wall) = (cpu_time(self.pid) - self.cpu, self.at.elapsed());
        let share = cpu.as_secs_f64() / wall.as_secs_f64();
        println!(
            "source CPU {what}: {cpu:?} in {wall:?} = {:.1} % of one core",
            share * 100.0
        );
        share
    }
}

/// Event names and how often each came: short enough for a failure message.
fn tally(p: &Proc) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in p.event_names() {
        *m.entry(n).or_insert(0) += 1;
    }
    m
}

fn spawn_source(pair: &str) -> (Proc, String) {
    let source = Proc::spawn_opts(
        "source",
        &[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            pair,
            "--heartbeat",
            "50ms",
        ],
        SpawnOpts::new().nofile(NOFILE),
    );
    let addr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    (source, addr)
}

/// Lets this test process hold `n` sockets (and its usual files): raises the soft descriptor
/// limit to the hard one. `false` if even that is too low.
fn room_for(n: usize) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let ok = lim.rlim_cur as usize >= n + 256;
    if !ok {
        skip(&format!(
            "RLIMIT_NOFILE hard limit {} is too low for {n} test connections",
            lim.rlim_max
        ));
    }
    ok
}

/// Connection `i` of a flood, each from a loopback address of its own (127.0.1.2 and up): a
/// flood from many hosts. From one address the source takes at most `--max-pending-per-addr`
/// (8) handshakes at a time and refuses the rest at once, so a flood from one address never
/// reaches its descriptor limit (`tests/auth.rs` covers that case).
fn connect(addr: &str, i: usize) -> TcpStream {
    let from = SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8], 0));
    let to: SocketAddr = addr.parse().unwrap();
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SockAddr::from(from))
        .and_then(|()| s.connect(&SockAddr::from(to)))
        .unwrap_or_else(|e| panic!("connection {i} from {from}: {e}"));
    s.into()
}

/// The source's first answer to a HELLO on `s`: `None` if none comes within `wait` (the
/// connection waits in its accept queue) or the connection ends first (shed from that queue).
fn answer(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut reader = Reader::new();
    let mut buf = [0u8; 512];
    loop {
        if let Some(frame) = reader.next_handshake().unwrap() {
            return Some(frame);
        }
        match s.read(&mut buf) {
            Ok(n) if n > 0 => reader.push(&buf[..n]),
            _ => return None,
        }
    }
}

/// `n` clients (from [`connect`]) for `pair` that hold their connections open and read nothing.
/// They join as backups would (the whole version 2 handshake, with the test key), one after the
/// other (each once `source` reports it joined), until the source has no descriptor left for the
/// next; the rest send their HELLO and wait in its accept queue. (A holder whose AUTH the source
/// has not read yet is still a pending handshake, which the source gives up for a newcomer when
/// it is out of descriptors; all at once, they would push each other out through the queue.)
fn holders(source: &Proc, addr: &str, pair: &str, n: usize) -> Vec<TcpStream> {
    let creds = test_credentials();
    let mut rng = OsEntropy::new().unwrap();
    let mut full = false;
    let mut joined = 0;
    let holders = (0..n)
        .map(|i| {
            let mut s = connect(addr, i);
            let (hs, hello) = BackupHandshake::start(&creds, pair, "", &mut rng);
            s.write_all(&hello).unwrap();
            if !full {
                match answer(&mut s, Duration::from_millis(500)).map(|a| hs.on_welcome(&a)) {
                    Some(Ok(w)) => {
                        s.write_all(&w.auth).unwrap();
                        if source
                            .try_wait_event("backup-joined", Duration::from_secs(2))
                            .is_none()
                        {
                            let me = s.local_addr().unwrap().to_string();
                            let refused = source.all_events().into_iter().find(|v| {
                                v["event"] == "backup-rejected" && v["peer"] == me.as_str()
                            });
                            panic!(
                                "holder {i} ({me}) was welcomed but did not join, while no other \
                                 client was connecting: {refused:?}; {:?}",
                                tally(source)
                            );
                        }
                        joined += 1;
                    }
                    Some(Err(e)) => panic!("holder {i}: {e}"),
                    None => full = true,
                }
            }
            s
        })
        .collect();
    println!("{joined} holders joined");
    holders
}

/// A flood of idle connections (no HELLO) takes every descriptor the source has: it must give up
/// the oldest of them for newcomers, so a real backup arming in the middle of it gets in at once,
/// and the loop stays idle while it does.
#[test]
fn idle_connection_flood_neither_spins_nor_locks_out_a_backup() {
    if !room_for(FLOOD) {
        return;
    }
    let (mut source, addr) = spawn_source("vm-fd");

    let cpu = CpuMeter::start(source.pid());
    // The first ~50 take every descriptor the source has left; the rest wait in its accept
    // queue (backlog 1024). Held open for the whole test.
    let flood: Vec<TcpStream> = (0..FLOOD).map(|i| connect(&addr, i)).collect();

    let started = Instant::now();
    let mut backup = start_backup("backup", &addr, "vm-fd", &[]);
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    let took = started.elapsed();
    println!("a real backup armed {took:?} after it started, behind {FLOOD} idle connections");
    assert_eq!(armed["heartbeat_us"], 50_000, "{armed}");
    // Both figures first, then the verdicts: a failure then shows both.
    let share = cpu.share_over(CPU_WINDOW, "during an idle-connection flood");
    assert!(took <= ARM_MAX, "the backup took {took:?} to arm");
    assert!(
        share < CPU_MAX,
        "the source used {:.1} % of a core out of descriptors (spinning: ~100 %)",
        share * 100.0
    );

    // The shortage was real (the limit took effect) and is on record.
    let refused = source
        .all_events()
        .iter()
        .filter(|v| v["event"] == "backup-rejected" && v["why"] == "refused: out of descriptors")
        .count();
    println!("{refused} idle connections refused for lack of descriptors");
    assert!(refused > 0, "no descriptor shortage: {:?}", tally(&source));
    assert!(source.running(), "source exited: {:?}", tally(&source));
    assert!(backup.running(), "backup exited: {:?}", tally(&backup));
    for e in ["link-lost", "takeover"] {
        assert_eq!(backup.count(e), 0, "{:?}", tally(&backup));
    }
    drop(flood);

    // Still a working source: an orderly stop stands the backup down.
    source.signal(libc::SIGTERM);
    assert_eq!(
        source.wait_event("stand-down-sent", EVENT_TIMEOUT)["backups"],
        1
    );
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    backup.wait_event("stand-down", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(0));
}

/// When every descriptor belongs to a joined backup there is nothing to give up: the source must
/// pause accepting (not spin on a readable listener), say so once (`accept-failed`, rate-limited),
/// keep its armed backup's heartbeat going, and accept again once descriptors are free.
#[test]
fn out_of_descriptors_with_nothing_to_evict_pauses_accept_and_reports_it() {
    if !room_for(FLOOD) {
        return;
    }
    let (mut source, addr) = spawn_source("vm-fd2");
    // A 1 s deadline: this test is about running out of descriptors. When they come back, the
    // ~250 queued clients are taken in one go, which stalls the loop for longer than the default
    // 150 ms: a_connection_burst_does_not_starve_the_heartbeat covers that on its own.
    let mut backup = start_backup("backup", &addr, "vm-fd2", &["--heartbeat-misses", "20"]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);

    let cpu = CpuMeter::start(source.pid());
    // Clients that join: each keeps its descriptor; the rest find none.
    let holders = holders(&source, &addr, "vm-fd2", FLOOD);

    // Measured first, so that a spinning loop shows as such whatever else fails.
    let share = cpu.share_over(CPU_WINDOW, "with every descriptor held by a joined client");
    let window_end = now_us();
    let failed = source
        .try_wait_event("accept-failed", EVENT_TIMEOUT)
        .unwrap_or_else(|| panic!("no accept-failed: {:?}", tally(&source)));
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("Too many open files"),
        "{failed}"
    );
    assert!(failed["count"].as_u64().unwrap() >= 1, "{failed}");
    // The shortage covered most of the window (a holder is shed every 100 ms; ~250 wait).
    let short_for = window_end.saturating_sub(failed["at_unix_us"].as_u64().unwrap());
    assert!(
        short_for >= 2_000_000,
        "out of descriptors for only {short_for} us of the window"
    );
    assert!(
        share < CPU_MAX,
        "the source used {:.1} % of a core out of descriptors (spinning: ~100 %)",
        share * 100.0
    );
    // Rate-limited: failed accepts go on every pause (100 ms), the report at most every 10 s.
    let reports = source.count("accept-failed");
    assert!(
        reports <= 2,
        "{reports} accept-failed events in {CPU_WINDOW:?}"
    );
    assert!(source.running(), "source exited: {:?}", tally(&source));
    // The armed backup never missed its heartbeat while the source was out of descriptors.
    assert!(backup.running(), "backup exited: {:?}", tally(&backup));
    for e in ["link-lost", "takeover"] {
        assert_eq!(backup.count(e), 0, "{:?}", tally(&backup));
    }

    // Once descriptors are free again, a new backup gets in: accepting was paused, not given up.
    drop(holders);
    let started = Instant::now();
    let mut second = start_backup("second", &addr, "vm-fd2", &[]);
    second.wait_event("armed", EVENT_TIMEOUT);
    let took = started.elapsed();
    println!("a second backup armed {took:?} after the holders closed");
    assert!(took <= ARM_MAX, "the second backup took {took:?} to arm");

    source.signal(libc::SIGTERM);
    // At least the two real backups (a holder whose close is not processed yet may count too).
    let told = source.wait_event("stand-down-sent", EVENT_TIMEOUT)["backups"]
        .as_u64()
        .unwrap();
    assert!(told >= 2, "STAND_DOWN to {told} backups");
    assert_eq!(source.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    for b in [&mut backup, &mut second] {
        b.wait_event("stand-down", EVENT_TIMEOUT);
        assert_eq!(b.wait_exit(EVENT_TIMEOUT).code(), Some(0), "{}", b.name);
    }
}

/// Clients that connect at once and say nothing (no pair id needed: anyone who reaches the port)
/// must not delay the source's heartbeats past the backup's deadline: that would be a takeover
/// of a live source, a second copy of its guest.
#[test]
fn a_connection_burst_does_not_starve_the_heartbeat() {
    const BURST: usize = 1000; // within the listen backlog (1024)
    if !room_for(BURST) {
        return;
    }
    let (mut source, mut backup, addr) = armed_pair("vm-burst", &["--heartbeat", "50ms"], &[]);
    let deadline_us = 150_000; // 50 ms x the default 3 misses
    let addr = addr.to_string();

    let burst: Vec<TcpStream> = (0..BURST).map(|i| connect(&addr, i)).collect();
    // Held past the source's handshake timeout (2 s), so that it drops them all itself too.
    assert!(
        backup
            .try_wait_event("link-lost", Duration::from_secs(3))
            .is_none(),
        "link lost while {BURST} connections arrived and were dropped: {:?}",
        tally(&backup)
    );
    drop(burst);
    assert!(
        backup
            .try_wait_event("link-lost", Duration::from_secs(1))
            .is_none(),
        "link lost when {BURST} connections closed: {:?}",
        tally(&backup)
    );

    backup.signal(libc::SIGTERM);
    let stopped = backup.wait_event("stopped", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(0));
    let gap = stopped["max_gap_us"].as_u64().unwrap();
    println!(
        "longest heartbeat gap {gap} us during a burst of {BURST} (deadline {deadline_us} us)"
    );
    assert!(gap < deadline_us, "heartbeat gap {gap} us");
    assert!(source.running(), "source exited: {:?}", tally(&source));
}
