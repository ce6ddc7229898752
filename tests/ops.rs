// SPDX-License-Identifier: Apache-2.0
//! Operations, as a supervisor and a monitoring system see a running process: systemd's notify
//! protocol (played for real on a Unix datagram socket), Prometheus scraping the metrics
//! endpoint (the real server when it is installed), and `status` over the control socket.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{armed_pair, skip, start_source, Proc, SpawnOpts, TempDir, EVENT_TIMEOUT};
use serde_json::Value;

/// The notify socket a test plays systemd on.
struct Systemd {
    sock: UnixDatagram,
    _dir: TempDir,
    path: String,
}

impl Systemd {
    fn new(tag: &str) -> Systemd {
        let dir = TempDir::new(tag);
        let path = dir.path("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Systemd {
            sock,
            path: path.to_string_lossy().into_owned(),
            _dir: dir,
        }
    }

    /// The next datagram within `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a datagram with a line equal to `line`; returns the datagram.
    fn wait_line(&self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(d) if d.lines().any(|l| l == line) => return d,
                Some(d) => seen.push(d),
                None => break,
            }
        }
        panic!("no {line:?} within {timeout:?}; got {seen:?}");
    }

    /// Counts `WATCHDOG=1` datagrams during `window` (other datagrams are ignored).
    fn watchdogs_during(&self, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut n = 0;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(d) if d.lines().any(|l| l == "WATCHDOG=1") => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        n
    }
}

#[test]
fn systemd_hears_ready_once_listening_a_watchdog_from_the_loop_and_none_when_it_is_stopped() {
    let sd = Systemd::new("sd-source");
    // systemd's WatchdogSec=200ms: a ping is due every 100 ms.
    let mut source = Proc::spawn_opts(
        "source",
        &[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            "sd1",
            "--heartbeat",
            "10ms",
        ],
        SpawnOpts::new()
            .env("NOTIFY_SOCKET", &sd.path)
            .env("WATCHDOG_USEC", "200000"),
    );
    let ready = sd.wait_line("READY=1", EVENT_TIMEOUT);
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=unprotected")),
        "READY=1 comes with a status: {ready:?}"
    );
    // READY means the listener takes backups: one connects and arms at once.
    let ev = source.wait_event("listening", EVENT_TIMEOUT);
    let addr = ev["addr"].as_str().unwrap().to_string();
    let backup = common::start_backup("backup", &addr, "sd1", &["--on-takeover", "true"]);
    backup.wait_event("armed", EVENT_TIMEOUT);
    let status = sd.wait_line("STATUS=protected: 1 backup(s) armed", EVENT_TIMEOUT);
    assert!(
        !status.contains("READY=1"),
        "READY=1 is sent once: {status:?}"
    );

    let pings = sd.watchdogs_during(Duration::from_secs(1));
    println!("WATCHDOG=1 in 1 s at WatchdogSec=200ms: {pings} (due: 10)");
    assert!(
        (3..=15).contains(&pings),
        "a ping every 100 ms expected, got {pings} in 1 s"
    );

    // A stopped loop sends nothing: systemd would restart it after WatchdogSec.
    source.signal(libc::SIGSTOP);
    // What was sent before the stop may still be queued on our socket.
    while sd.next(Duration::from_millis(50)).is_some() {}
    let stopped = sd.watchdogs_during(Duration::from_secs(1));
    source.signal(libc::SIGCONT);
    assert_eq!(stopped, 0, "WATCHDOG=1 while the process was stopped");
    let resumed = sd.watchdogs_during(Duration::from_millis(600));
    assert!(resumed >= 1, "the pings come back after SIGCONT");

    source.signal(libc::SIGTERM);
    sd.wait_line("STOPPING=1", EVENT_TIMEOUT);
    assert!(source.wait_exit(EVENT_TIMEOUT).success());
}

#[test]
fn systemd_hears_ready_from_a_backup_only_once_it_is_armed() {
    let sd = Systemd::new("sd-backup");
    // No source yet: the backup dials and is not ready.
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let backup = Proc::spawn_opts(
        "backup",
        &[
            "backup",
            "--connect",
            &addr,
            "--pair-id",
            "sd2",
            "--on-takeover",
            "true",
        ],
        SpawnOpts::new().env("NOTIFY_SOCKET", &sd.path),
    );
    backup.wait_event("connecting", EVENT_TIMEOUT);
    let end = Instant::now() + Duration::from_millis(500);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if let Some(d) = sd.next(left) {
            assert!(
                !d.contains("READY=1"),
                "READY=1 before the backup armed: {d:?}"
            );
        }
    }
    let listen = addr.clone();
    let _source = Proc::spawn(
        "source",
        &["source", "--listen", &listen, "--pair-id", "sd2"],
    );
    let ready = sd.wait_line("READY=1", EVENT_TIMEOUT);
    assert!(ready.contains("STATUS=armed"), "{ready:?}");
    backup.wait_event("armed", EVENT_TIMEOUT);
}

/// `GET /metrics` on `addr`, the whole answer.
fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    s
}

/// Scrapes until `pred` holds (bounded); returns that scrape.
fn scrape_until(addr: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let s = scrape(addr);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never held; last scrape:\n{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample whose line starts with `prefix` (name and labels), if present.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The metrics address a process printed (the `metrics` event comes before `listening` and
/// `connecting`, so it may already have been passed over).
fn metrics_addr(p: &Proc) -> String {
    let ev = p
        .all_events()
        .into_iter()
        .find(|e| e["event"] == "metrics")
        .unwrap_or_else(|| p.wait_event("metrics", EVENT_TIMEOUT));
    ev["addr"].as_str().unwrap().to_string()
}

#[test]
fn metrics_show_heartbeats_rejections_and_the_takeover_with_its_reason() {
    let (source, addr) = start_source(
        "source",
        "m1",
        &["--heartbeat", "10ms", "--metrics", "127.0.0.1:0"],
    );
    let src_metrics = metrics_addr(&source);
    let backup = common::start_backup(
        "backup",
        addr,
        "m1",
        &["--vm", "simulated", "--metrics", "127.0.0.1:0"],
    );
    let b_metrics = metrics_addr(&backup);
    backup.wait_event("armed", EVENT_TIMEOUT);
    // A backup with the wrong key is refused: counted under `auth`.
    let dir = TempDir::new("m1-keys");
    let other = dir.path("other.psk");
    let out = Command::new(common::bin())
        .arg("keygen")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let intruder = common::start_backup(
        "intruder",
        addr,
        "m1",
        &[
            "--psk-file",
            other.to_str().unwrap(),
            "--on-takeover",
            "true",
        ],
    );
    source.wait_event("backup-rejected", EVENT_TIMEOUT);
    drop(intruder);
    // And something that is no backup at all.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    source.wait_event("backup-rejected", EVENT_TIMEOUT);

    let lbl = r#"{role="source",pair="m1""#;
    // Once the first heartbeats went out.
    let s = scrape_until(&src_metrics, |s| {
        sample(s, &format!("vmm_takeover_heartbeats_sent_total{lbl}}}")) > Some(0.0)
    });
    assert_eq!(
        sample(
            &s,
            &format!(r#"vmm_takeover_link_state{lbl},state="protected"}}"#)
        ),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        sample(&s, &format!("vmm_takeover_backups_armed{lbl}}}")),
        Some(1.0)
    );
    assert!(sample(&s, &format!("vmm_takeover_heartbeats_sent_total{lbl}}}")).unwrap() > 0.0);
    // The intruder found the source's WELCOME not authentic and hung up: to the source, a
    // handshake closed before it armed.
    let rejected = |reason: &str| {
        sample(
            &s,
            &format!(r#"vmm_takeover_rejected_peers_total{lbl},reason="{reason}"}}"#),
        )
    };
    assert_eq!(rejected("closed"), Some(1.0), "{s}");
    assert_eq!(rejected("malformed"), Some(1.0), "{s}");
    assert_eq!(rejected("auth"), Some(0.0), "{s}");
    let blbl = r#"{role="backup",pair="m1""#;
    let b = scrape_until(&b_metrics, |s| {
        sample(
            s,
            &format!("vmm_takeover_heartbeats_received_total{blbl}}}"),
        ) > Some(0.0)
    });
    assert!(
        sample(
            &b,
            &format!("vmm_takeover_heartbeats_received_total{blbl}}}")
        )
        .unwrap()
            > 0.0
    );
    let max = sample(&b, &format!("vmm_takeover_heartbeat_gap_max_ratio{blbl}}}")).unwrap();
    assert!(max > 0.0 && max < 1.0, "gap ratio {max}");
    assert!(b.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");

    source.signal(libc::SIGKILL);
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    let b = scrape(&b_metrics);
    assert_eq!(
        sample(
            &b,
            &format!(r#"vmm_takeover_takeovers_total{blbl},reason="peer-closed"}}"#)
        ),
        Some(1.0),
        "{b}"
    );
    assert_eq!(
        sample(
            &b,
            &format!(r#"vmm_takeover_link_state{blbl},state="running"}}"#)
        ),
        Some(1.0)
    );
    assert!(sample(&b, &format!("vmm_takeover_last_vm_start_seconds{blbl}}}")).is_some());
    assert!(sample(&b, &format!("vmm_takeover_last_detection_seconds{blbl}}}")).is_some());
}

/// A real Prometheus server scraping both sides (Debian's `prometheus`).
struct Prometheus {
    child: std::process::Child,
    api: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(targets: &[&str]) -> Option<Prometheus> {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = TempDir::new("prometheus");
        let port = common::free_port();
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let cfg = format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - \
             job_name: vmm-takeover\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.path("prometheus.yml"), cfg).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let p = Prometheus {
            child,
            api: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while Instant::now() < deadline {
            if p.get("/-/ready").is_some_and(|r| r.contains(" 200 ")) {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus did not get ready within {EVENT_TIMEOUT:?}");
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut c = TcpStream::connect(&self.api).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.api
        )
        .ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        Some(s)
    }

    /// Instant query; the result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Some(r) = self.get(&format!("/api/v1/query?query={enc}")) else {
            return vec![];
        };
        let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
        // Chunked or not, the JSON object is the one line that starts with `{`.
        let json = body.lines().find(|l| l.starts_with('{')).unwrap_or("{}");
        let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `q` returns a sample whose value is `want`.
    fn wait_value(&self, q: &str, want: f64) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let mut last = vec![];
        while Instant::now() < deadline {
            last = self.query(q);
            if last
                .iter()
                .any(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) == Some(want))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus: {q} never became {want}; last result {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_both_sides_through_a_takeover() {
    if !std::path::Path::new("/usr/bin/prometheus").exists()
        && !std::path::Path::new("/usr/local/bin/prometheus").exists()
    {
        return skip("prometheus is not installed (Debian package `prometheus`)");
    }
    let (source, backup, _) = armed_pair(
        "pm1",
        &["--heartbeat", "10ms", "--metrics", "127.0.0.1:0"],
        &["--vm", "simulated", "--metrics", "127.0.0.1:0"],
    );
    let (sm, bm) = (metrics_addr(&source), metrics_addr(&backup));
    let prom = Prometheus::start(&[&sm, &bm]).expect("start prometheus");
    // Both targets up and parsed: the source protected, the backup armed.
    prom.wait_value(r#"up{job="vmm-takeover"}"#, 1.0);
    prom.wait_value(
        r#"vmm_takeover_link_state{role="source",state="protected"}"#,
        1.0,
    );
    prom.wait_value(
        r#"vmm_takeover_link_state{role="backup",state="armed"}"#,
        1.0,
    );
    prom.wait_value(
        r#"count(vmm_takeover_heartbeat_gap_ratio_bucket{le="+Inf"} > 0)"#,
        1.0,
    );

    source.signal(libc::SIGKILL);
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    prom.wait_value(
        r#"vmm_takeover_takeovers_total{role="backup",pair="pm1",reason="peer-closed"}"#,
        1.0,
    );
    prom.wait_value(
        r#"vmm_takeover_link_state{role="backup",state="running"}"#,
        1.0,
    );
    // The dead source's target is down now: what an alert on `up` sees.
    prom.wait_value(&format!(r#"up{{instance="{sm}"}}"#), 0.0);
}

/// The answer of `vmm-takeover status --control PATH` and how long it took.
fn status(path: &std::path::Path) -> (Value, Duration) {
    let t = Instant::now();
    let out = Command::new(common::bin())
        .args(["status", "--control"])
        .arg(path)
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), took)
}

/// One status call on the socket itself (no process start): the answer and its latency.
fn status_raw(path: &std::path::Path) -> (Value, Duration) {
    use std::io::BufRead;
    let t = Instant::now();
    let mut c = std::os::unix::net::UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    // A busy process answers without reading: the answer is still there.
    let _ = c.write_all(b"status\n");
    let mut line = String::new();
    std::io::BufReader::new(&c).read_line(&mut line).unwrap();
    (serde_json::from_str(&line).unwrap(), t.elapsed())
}

#[test]
fn scrapers_that_never_read_or_never_ask_do_not_delay_heartbeats() {
    let dir = TempDir::new("m2");
    let ctl = dir.path("backup.sock");
    // 10 ms heartbeats, 100 ms deadline: room for the scheduling delays of a loaded 2-core
    // machine, while a loop that waited on a scraper would miss it by far.
    let (source, backup, _) = armed_pair(
        "m2",
        &["--heartbeat", "10ms", "--metrics", "127.0.0.1:0"],
        &[
            "--on-takeover",
            "true",
            "--heartbeat-misses",
            "10",
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let sm = metrics_addr(&source);
    // Scrapers that connect and never ask, and scrapers that ask and never read (with a tiny
    // receive buffer, so that the answer cannot just land in it).
    let mut held = Vec::new();
    for i in 0..16 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if i % 2 == 1 {
            s.set_recv_buffer_size(1024).unwrap();
        }
        s.connect(&sm.parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        let mut c: TcpStream = s.into();
        if i % 2 == 1 {
            write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        held.push(c);
    }
    let (before, _) = status_raw(&ctl);
    let received_before = before["heartbeats_received"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (after, _) = status_raw(&ctl);
    let max = after["heartbeat_gap_max_ratio"].as_f64().unwrap();
    let received = after["heartbeats_received"].as_u64().unwrap() - received_before;
    println!(
        "16 stuck scrapers for 3 s: {received} heartbeats received (due ~300), largest gap \
         {max:.2} of the deadline"
    );
    assert_eq!(after["state"], "armed", "{after}");
    assert!(max < 1.0, "largest heartbeat gap {max} of the deadline");
    assert!(
        received >= 100,
        "only {received} heartbeats in 3 s at 10 ms"
    );
    assert_eq!(backup.count("link-lost"), 0, "{:?}", backup.event_names());
    drop(held);
    // The endpoint serves again once the stuck ones are gone.
    assert!(scrape(&sm).contains("vmm_takeover_heartbeats_sent_total"));
}

#[test]
fn status_tells_role_state_heartbeats_and_guest_through_the_loop() {
    let dir = TempDir::new("st1");
    let (sctl, bctl) = (dir.path("source.sock"), dir.path("backup.sock"));
    let (source, backup, _) = armed_pair(
        "st1",
        &[
            "--heartbeat",
            "10ms",
            "--vm",
            "simulated",
            "--control",
            sctl.to_str().unwrap(),
        ],
        &["--vm", "simulated", "--control", bctl.to_str().unwrap()],
    );
    let mode = std::fs::metadata(&sctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    source.wait_event("guest", EVENT_TIMEOUT);
    let (s, _) = status(&sctl);
    assert_eq!(s["role"], "source");
    assert_eq!(s["pair_id"], "st1");
    assert_eq!(s["state"], "protected");
    assert_eq!(s["backups"], 1);
    assert_eq!(s["protocol"], 2);
    assert_eq!(s["pid"], source.pid());
    assert_eq!(s["guest"]["kind"], "simulated");
    assert!(s["heartbeats_sent"].as_u64().unwrap() > 0, "{s}");
    assert!(s["last_heartbeat_unix_us"].as_u64().unwrap() > 0, "{s}");
    let (b, _) = status(&bctl);
    assert_eq!(b["role"], "backup");
    assert_eq!(b["state"], "armed");
    assert!(b["armed_since_unix_us"].as_u64().is_some(), "{b}");
    assert_eq!(b["guest"]["running"], false, "{b}");

    // A second process cannot take a live control socket.
    let err = refused_control("st1", &sctl);
    assert!(err.contains("another process is listening"), "{err}");
    // And the first one still answers.
    assert_eq!(status(&sctl).0["state"], "protected");

    // A stopped process cannot answer: `status` says so and fails, it does not hang. (The
    // backup is the one stopped: a stopped source would be taken over.)
    backup.signal(libc::SIGSTOP);
    let t = Instant::now();
    let out = Command::new(common::bin())
        .args(["status", "--timeout", "500ms", "--control"])
        .arg(&bctl)
        .output()
        .unwrap();
    backup.signal(libc::SIGCONT);
    assert_eq!(out.status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    source.signal(libc::SIGKILL);
    backup.wait_event("vm-started", EVENT_TIMEOUT);
    let (b, _) = status(&bctl);
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["takeovers"]["peer-closed"], 1, "{b}");
    assert_eq!(b["guest"]["running"], true, "{b}");
}

#[test]
fn a_flood_of_status_calls_does_not_disturb_the_heartbeat() {
    let dir = TempDir::new("st2");
    let ctl = dir.path("backup.sock");
    // 10 ms heartbeats, 100 ms deadline: room for the scheduling delays of a 2-core machine
    // that the flood itself saturates, while a loop that waited on status calls would miss it
    // by far. The figures against the 30 ms deadline are in `benches/ops.rs`.
    let (_source, backup, _) = armed_pair(
        "st2",
        &["--heartbeat", "10ms"],
        &[
            "--on-takeover",
            "true",
            "--heartbeat-misses",
            "10",
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let (before, _) = status_raw(&ctl);
    let base = before["heartbeats_received"].as_u64().unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let (v, took) = status_raw(&ctl);
                    if v["error"].as_str().is_some_and(|e| e.contains("retry")) {
                        continue;
                    }
                    assert_eq!(v["state"], "armed", "{v}");
                    lat.push(took);
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = callers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    lat.sort();
    let (after, _) = status_raw(&ctl);
    let max = after["heartbeat_gap_max_ratio"].as_f64().unwrap();
    let received = after["heartbeats_received"].as_u64().unwrap() - base;
    println!(
        "{} status calls in 3 s from 4 callers: p50 {:?}, p99 {:?}, max {:?}; {received} \
         heartbeats, largest gap {max:.2} of the deadline",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    assert!(lat.len() >= 100, "only {} calls answered", lat.len());
    assert!(max < 1.0, "largest heartbeat gap {max} of the deadline");
    assert_eq!(backup.count("link-lost"), 0, "{:?}", backup.event_names());
}

/// Starts a source with `--control path`, which must refuse to start; its stderr.
fn refused_control(pair: &str, path: &std::path::Path) -> String {
    let out = Command::new(common::bin())
        .args(["source", "--listen", "127.0.0.1:0", "--pair-id", pair])
        .args(["--insecure-no-auth", "--control"])
        .arg(path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_control_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let dir = TempDir::new("st3");
    let file = dir.path("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let err = refused_control("st3", &file);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

fn tool(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}

#[test]
fn the_example_alert_rules_load_and_fire_when_they_should() {
    let Some(promtool) = tool("promtool") else {
        return skip("promtool is not installed (Debian package `prometheus`)");
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return skip("systemd-analyze is not installed (Debian package `systemd`)");
    };
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let dir = TempDir::new("units");
    let bin = common::bin();
    let mut names = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        // verify wants the ExecStart binary to exist: the one under test stands in.
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/bin/vmm-takeover", bin.to_str().unwrap());
        assert!(
            text.contains("Type=notify") && text.contains("WatchdogSec="),
            "{name}"
        );
        std::fs::write(dir.path(&name), text).unwrap();
        names.push(dir.path(&name.replace("@.", "@vm1.")));
    }
    assert_eq!(names.len(), 2, "a source and a backup template");
    let out = Command::new(analyze)
        .arg("verify")
        .arg("--man=no")
        .args(&names)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
