// SPDX-License-Identifier: Apache-2.0
//! The authenticated link against a hostile network: wrong keys, a version 1 peer, rotation,
//! and an attacker on the path (a transparent TCP proxy) that injects, alters, drops and replays
//! frames. In every case: no takeover, no disarm without notice, and a clear event.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use proxy::{kind, Proxy, Verdict};
use serde_json::Value;
use vmm_takeover_core::protocol::{Frame, FrameReader};

/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_secs(2);

/// Frame kinds (docs/protocol.md).
const HEARTBEAT: u8 = 4;
const HANDOFF: u8 = 6;

/// A new key file at `path` via `vmm-takeover keygen` (`add`: one more key in it).
fn keygen(path: &Path, add: bool) {
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("keygen");
    if add {
        cmd.arg("--add");
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(out.status.success(), "keygen: {out:?}");
}

/// A copy of `from` holding only the key with id `id` (mode 0600).
fn only_key(from: &Path, id: u16, to: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let text = std::fs::read_to_string(from).unwrap();
    let line: String = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!line.is_empty(), "no key {id} in {}", from.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// No takeover, no start and no stand-down in the backup's events.
fn assert_untouched(backup: &Proc, ctx: &str) {
    for e in ["link-lost", "takeover", "vm-started", "stand-down"] {
        assert_eq!(
            backup.count(e),
            0,
            "{ctx}: the backup printed {e}: {:?}",
            backup.event_names()
        );
    }
}

/// Waits until `proc` printed `name` at least `n` times.
fn wait_count(proc: &Proc, name: &str, n: usize, ctx: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while proc.count(name) < n {
        assert!(
            Instant::now() < deadline,
            "{ctx}: {n} x {name} not seen within {EVENT_TIMEOUT:?}: {:?}",
            proc.event_names()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A source and a backup (both with `--vm simulated`, heartbeats every 20 ms) joined through
/// `proxy`, armed.
fn pair_through_proxy(tag: &str) -> (Proc, Proxy, Proc, SocketAddr) {
    let (source, addr) = start_source(
        &format!("{tag}/source"),
        tag,
        &["--heartbeat", "20ms", "--vm", "simulated"],
    );
    let proxy = Proxy::start(addr);
    let backup = start_backup(
        &format!("{tag}/backup"),
        proxy.addr(),
        tag,
        &["--vm", "simulated"],
    );
    backup.wait_event("armed", EVENT_TIMEOUT);
    source.wait_event("backup-joined", EVENT_TIMEOUT);
    (source, proxy, backup, addr)
}

/// The backup dropped the link as untrusted (saying why), armed again, and nothing else.
fn assert_dropped_and_rearmed(source: &Proc, backup: &Proc, needle: &str, ctx: &str) {
    let ev = backup.wait_event("link-untrusted", EVENT_TIMEOUT);
    let why = ev["why"].as_str().unwrap_or_default();
    assert!(why.contains(needle), "{ctx}: link-untrusted says {ev}");
    wait_count(backup, "armed", 2, ctx);
    wait_count(source, "backup-joined", 2, ctx);
    std::thread::sleep(QUIET);
    assert_untouched(backup, ctx);
    println!("{ctx}: link-untrusted: {why}");
}

#[test]
fn a_backup_with_another_key_never_arms_and_exits_5() {
    let dir = TempDir::new("authkey");
    let other = dir.path("other.psk");
    keygen(&other, false);
    let (source, addr) = start_source("wrongkey/source", "vm-wk", &[]);
    let mut backup = start_backup(
        "wrongkey/backup",
        addr,
        "vm-wk",
        &["--psk-file", &s(&other)],
    );
    let rejected = backup.wait_event("rejected", EVENT_TIMEOUT);
    let status = backup.wait_exit(EVENT_TIMEOUT);
    assert_eq!(status.code(), Some(5), "{rejected}");
    let reason = rejected["why"].as_str().unwrap_or_default();
    assert!(
        reason.contains("WELCOME failed authentication"),
        "{rejected}"
    );
    assert_eq!(backup.count("armed"), 0);
    // The source says what happened, locally; it keeps serving.
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    assert!(
        ev["why"].as_str().unwrap_or_default().contains("handshake"),
        "{ev}"
    );
    assert_eq!(source.count("backup-joined"), 0);
    println!("backup: {reason}\nsource: {}", ev["why"]);
}

#[test]
fn a_backup_with_a_key_id_the_source_lacks_never_arms() {
    let dir = TempDir::new("authid");
    let both = dir.path("both.psk");
    keygen(&both, false);
    keygen(&both, true);
    let one = dir.path("one.psk");
    let two = dir.path("two.psk");
    only_key(&both, 1, &one);
    only_key(&both, 2, &two);
    let (source, addr) = start_source("unknownid/source", "vm-id", &["--psk-file", &s(&one)]);
    let mut backup = start_backup("unknownid/backup", addr, "vm-id", &["--psk-file", &s(&two)]);
    backup.wait_event("rejected", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(5));
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    assert!(
        ev["why"].as_str().unwrap_or_default().contains("key 2"),
        "the source's own report names the unknown key: {ev}"
    );
}

#[test]
fn rotation_a_source_with_two_keys_arms_backups_on_either() {
    let dir = TempDir::new("authrot");
    let both = dir.path("both.psk");
    keygen(&both, false);
    keygen(&both, true);
    let old = dir.path("old.psk");
    only_key(&both, 1, &old);
    let (source, addr) = start_source("rotation/source", "vm-rot", &["--psk-file", &s(&both)]);
    let b_old = start_backup("rotation/old", addr, "vm-rot", &["--psk-file", &s(&old)]);
    let b_new = start_backup("rotation/new", addr, "vm-rot", &["--psk-file", &s(&both)]);
    for (b, id) in [(&b_old, 1), (&b_new, 2)] {
        let armed = b.wait_event("armed", EVENT_TIMEOUT);
        assert_eq!(armed["auth"]["key_id"], id, "{armed}");
    }
    wait_count(&source, "backup-joined", 2, "rotation");
    let mut ids: Vec<u64> = source
        .all_events()
        .iter()
        .filter(|e| e["event"] == "backup-joined")
        .map(|e| e["key_id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2]);
}

#[test]
fn keyed_and_unauthenticated_sides_refuse_each_other() {
    let (_source, addr) = start_source("mode/source", "vm-mode", &[]);
    let mut backup = start_backup("mode/backup", addr, "vm-mode", &["--insecure-no-auth"]);
    let ev = backup.wait_event("rejected", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(5));
    assert!(
        ev["why"]
            .as_str()
            .unwrap_or_default()
            .contains("authentication"),
        "{ev}"
    );
    let (_source, addr) = start_source("mode2/source", "vm-mode2", &["--insecure-no-auth"]);
    let mut backup = start_backup("mode2/backup", addr, "vm-mode2", &[]);
    backup.wait_event("rejected", EVENT_TIMEOUT);
    assert_eq!(backup.wait_exit(EVENT_TIMEOUT).code(), Some(5));
}

#[test]
fn a_version_1_peer_is_told_which_version_to_run() {
    let (_source, addr) = start_source("v1/source", "vm-v1", &[]);
    let mut s = TcpStream::connect(addr).unwrap();
    let hello = Frame::Hello {
        pair_id: "vm-v1".into(),
        node: String::new(),
        auth_tag: vec![],
    };
    s.write_all(&hello.encode()).unwrap();
    s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let mut r = FrameReader::new();
    r.push(&answer);
    match r.next_frame() {
        Ok(Some(Frame::Reject { reason, .. })) => {
            assert!(reason.contains("version 1"), "{reason}");
            assert!(reason.contains("requires 2"), "{reason}");
            println!("a v1 backup reads: {reason}");
        }
        other => panic!("expected a version 1 REJECT, got {other:?} from {answer:02x?}"),
    }
}

#[test]
fn the_link_works_without_keys_when_asked_for_explicitly() {
    let source = Proc::spawn_opts(
        "insecure/source",
        &[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            "vm-ins",
            "--insecure-no-auth",
        ],
        SpawnOpts::new().pipe_stderr(),
    );
    let addr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let backup = start_backup("insecure/backup", addr, "vm-ins", &["--insecure-no-auth"]);
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(armed["auth"]["mode"], "none");
    let joined = source.wait_event("backup-joined", EVENT_TIMEOUT);
    assert_eq!(joined["key_id"], Value::Null);
    assert!(
        source
            .wait_stderr("NOT authenticated", EVENT_TIMEOUT)
            .is_some(),
        "no warning at start"
    );
}

/// A STAND_DOWN forged by a process on the path (it does not have the key): the backup drops the
/// link as untrusted and dials again; it never stands down.
#[test]
fn a_stand_down_injected_into_a_live_link_is_refused() {
    let (source, proxy, backup, _) = pair_through_proxy("inject");
    let mut forged = vec![b'V', b'M', b'T', b'K', 2, 5, 0, 24];
    forged.extend_from_slice(&1000u64.to_be_bytes());
    forged.extend_from_slice(&[0xa5; 16]);
    proxy.inject(forged);
    assert_dropped_and_rearmed(
        &source,
        &backup,
        "failed authentication",
        "forged STAND_DOWN",
    );
}

/// A sealed heartbeat dropped on the path: the next frame's sequence number is not the next one.
#[test]
fn a_frame_with_a_skipped_sequence_number_drops_the_link_not_the_source() {
    let (source, proxy, backup, _) = pair_through_proxy("skip");
    proxy.set_rule(|conn, _, f| {
        static DROPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if conn == 0
            && kind(f) == HEARTBEAT
            && !DROPPED.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    });
    assert_dropped_and_rearmed(&source, &backup, "missing", "skipped sequence number");
}

/// A HANDOFF with one bit flipped on the path: the backup starts nothing; the source, which
/// cannot know whether its HANDOFF took effect, keeps its guest paused and says so.
#[test]
fn a_handoff_with_one_flipped_bit_starts_nothing() {
    let (mut source, proxy, backup, _) = pair_through_proxy("flip");
    proxy.set_rule(|_, _, f| {
        if kind(f) == HANDOFF {
            let mut g = f.to_vec();
            g[9] ^= 0x01;
            Verdict::Replace(g)
        } else {
            Verdict::Pass
        }
    });
    source.signal(libc::SIGUSR1);
    source.wait_event("handoff-sent", EVENT_TIMEOUT);
    let ev = backup.wait_event("link-untrusted", EVENT_TIMEOUT);
    assert!(
        ev["why"]
            .as_str()
            .unwrap_or_default()
            .contains("failed authentication"),
        "{ev}"
    );
    let end = source.wait_event("handoff-uncertain", EVENT_TIMEOUT);
    println!("source: {end}");
    let _ = source.wait_exit(EVENT_TIMEOUT);
    std::thread::sleep(QUIET);
    assert_untouched(&backup, "flipped HANDOFF");
    let last = backup
        .all_events()
        .into_iter()
        .rfind(|e| e["event"] == "guest")
        .expect("guest reports");
    assert_eq!(last["running"], false, "the standby guest runs: {last}");
}

/// A HANDOFF recorded from an earlier session (a real handoff of the same pair, same key) and
/// replayed into a later session's live link: refused, nothing starts.
#[test]
fn a_handoff_replayed_from_an_earlier_session_is_refused() {
    let (mut source, proxy, backup, _) = pair_through_proxy("replay");
    source.signal(libc::SIGUSR1);
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    source.wait_event("handoff-complete", EVENT_TIMEOUT);
    let _ = source.wait_exit(EVENT_TIMEOUT);
    let recorded = proxy.sent_by_source(HANDOFF);
    assert_eq!(recorded.len(), 1, "the proxy saw the handoff");
    let handoff = recorded[0].1.clone();
    drop((source, backup));

    let (source, proxy, backup, _) = pair_through_proxy("replay");
    proxy.inject(handoff);
    assert_dropped_and_rearmed(
        &source,
        &backup,
        "failed authentication",
        "replayed HANDOFF",
    );
}

/// Reads one frame (header, then payload) from a raw stream.
fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let len = u16::from_be_bytes([h[6], h[7]]) as usize;
    let mut f = h.to_vec();
    f.resize(8 + len, 0);
    s.read_exact(&mut f[8..]).unwrap();
    f
}

/// HELLO and AUTH recorded from a real handshake, replayed on a new connection: the source's
/// fresh nonce makes the recorded AUTH worthless. Nothing joins; the answer comes after the
/// fixed delay.
#[test]
fn a_replayed_handshake_does_not_join() {
    let (source, proxy, _backup, addr) = pair_through_proxy("hsreplay");
    let b2s = proxy.sent_by_backup();
    let hello = b2s.iter().find(|(_, f)| kind(f) == 1).unwrap().1.clone();
    let auth = b2s.iter().find(|(_, f)| kind(f) == 9).unwrap().1.clone();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    s.write_all(&hello).unwrap();
    let welcome = read_frame(&mut s);
    assert_eq!(kind(&welcome), 2, "WELCOME expected");
    let t = Instant::now();
    s.write_all(&auth).unwrap();
    let answer = read_frame(&mut s);
    let waited = t.elapsed();
    assert_eq!(kind(&answer), 3, "REJECT expected");
    assert!(
        waited >= Duration::from_millis(200),
        "answered after {waited:?}"
    );
    let ev = source.wait_event("backup-rejected", EVENT_TIMEOUT);
    assert!(
        ev["why"].as_str().unwrap_or_default().contains("AUTH"),
        "{ev}"
    );
    assert_eq!(source.count("backup-joined"), 1);
    println!("replayed AUTH answered after {waited:?}: {}", ev["why"]);
}

/// The answer to a failed handshake tells nothing about what failed: a HELLO for another pair
/// and a HELLO with a key the source lacks get byte-identical answers, after the same delay.
#[test]
fn a_wrong_pair_and_an_unknown_key_get_the_same_answer() {
    use vmm_takeover_core::auth::{BackupHandshake, Credentials, Key, KeyRing, OsEntropy};
    let (_source, addr) = start_source("same/source", "vm-same", &[]);
    let ring = KeyRing::load(Path::new(test_key())).unwrap();
    let known = Credentials::Keys(std::sync::Arc::new(ring));
    let stranger = Credentials::Keys(std::sync::Arc::new(
        KeyRing::new([Key::new(7, &[0x11; 32]).unwrap()]).unwrap(),
    ));
    let mut answers = Vec::new();
    for (creds, pair) in [(&known, "vm-other"), (&stranger, "vm-same")] {
        let (_hs, hello) = BackupHandshake::start(creds, pair, "", &mut OsEntropy::new().unwrap());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        s.write_all(&hello).unwrap();
        let welcome = read_frame(&mut s);
        assert_eq!(kind(&welcome), 2, "a WELCOME in both cases");
        // An AUTH we cannot compute.
        let mut auth = vec![b'V', b'M', b'T', b'K', 2, 9, 0, 32];
        auth.extend_from_slice(&[0x42; 32]);
        let t = Instant::now();
        s.write_all(&auth).unwrap();
        let answer = read_frame(&mut s);
        answers.push((answer, t.elapsed()));
    }
    assert_eq!(answers[0].0, answers[1].0, "the answers differ");
    println!(
        "wrong pair answered after {:?}, unknown key after {:?}",
        answers[0].1, answers[1].1
    );
    for (_, waited) in &answers {
        assert!(*waited >= Duration::from_millis(200), "{waited:?}");
    }
}

/// CPU time (user + system) a process used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the state field.
    let ticks = f[11] + f[12];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Hundreds of idle connections plus a stream of garbage, all from 127.0.0.2, while a real
/// backup connects from 127.0.0.1: it arms; the source's CPU during the flood is printed.
#[test]
fn a_flood_from_one_address_does_not_keep_a_backup_from_arming() {
    use socket2::{Domain, Socket, Type};
    const IDLE: usize = 300;
    let (source, addr) = start_source("flood/source", "vm-flood", &["--heartbeat", "20ms"]);
    let from = move |ip: &str| -> Option<Socket> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
        s.bind(&format!("{ip}:0").parse::<SocketAddr>().unwrap().into())
            .ok()?;
        s.connect_timeout(&addr.into(), Duration::from_secs(1))
            .ok()?;
        Some(s)
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut idle = Vec::new();
        let mut garbage = 0u64;
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            if idle.len() < IDLE {
                if let Some(s) = from("127.0.0.2") {
                    idle.push(s);
                }
            }
            if let Some(mut s) = from("127.0.0.2") {
                let _ = s.write_all(b"GARBAGE GARBAGE GARBAGE\r\n");
                garbage += 1;
            }
        }
        (idle.len(), garbage)
    });
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = cpu_time(source.pid());
    let t0 = Instant::now();
    let backup = start_backup("flood/backup", addr, "vm-flood", &[]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    let armed_after = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let window = t0.elapsed();
    let cpu = cpu_time(source.pid()) - cpu0;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (idle, garbage) = flood.join().unwrap();
    let rejected: u64 = source
        .all_events()
        .iter()
        .filter(|e| e["event"] == "backup-rejected")
        .map(|e| 1 + e["suppressed"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "flood from 127.0.0.2: {idle} idle connections held, {garbage} garbage connections; the \
         backup from 127.0.0.1 armed after {armed_after:?}; source CPU {:.1} % of a core over \
         {window:?}; {rejected} refusals reported (rate-limited)",
        100.0 * cpu.as_secs_f64() / window.as_secs_f64()
    );
    assert_untouched(&backup, "flood");
    assert!(rejected > 0, "the source reported no refusal");
}
