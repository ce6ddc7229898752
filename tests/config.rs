// SPDX-License-Identifier: Apache-2.0
//! Config files (`--config`, `check-config`), `man`, `completions`, `--version`, `--log-level`:
//! the real binary, as an operator runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `text` to `name` in `dir` and returns its path as a string.
fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `check-config ARGS...` must succeed: its one stdout line is the `config-ok` event.
fn check_ok(args: &[&str]) -> Value {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["event"], "config-ok", "{v}");
    v
}

/// Runs `args` and expects exit 2 with every one of `wanted` in stderr.
fn refused(args: &[&str], wanted: &[&str]) {
    let o = run(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert!(o.stdout.is_empty(), "{args:?}: stdout {:?}", o.stdout);
    for w in wanted {
        assert!(e.contains(w), "{args:?}: stderr {e:?} lacks {w:?}");
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Files that together give every key of both tables (keys that conflict are in different
/// files). `KEY` is replaced by the test key file.
const EVERY_KEY: &[&str] = &[
    r#"
[source]
listen = "127.0.0.1:7070"
pair-id = "vm1"
keepalive = "2:1:3"
arbiter = "etcd://127.0.0.1:2379,127.0.0.1:2380"
lease-ttl = "3s"
psk-file = "KEY"
max-pending = 10
max-pending-per-addr = 2
user-timeout = "3s"
heartbeat = "10ms"
on-handoff = "virsh suspend vm1"
on-resume = "virsh resume vm1"
hook-timeout = "5s"
handoff-timeout = "60s"
log-level = "debug"
metrics = "127.0.0.1:9465"
control = "/run/vmm-takeover/vm1.sock"
vmm = ["sleep", "1000"]

[backup]
connect = "[::1]:7070"
pair-id = "vm1"
keepalive = "off"
arbiter = "etcd://127.0.0.1:2379"
lease-ttl = "3s"
psk-file = "KEY"
heartbeat-misses = 5
kernel-keepalive-only = true
retry-rejected = true
on-takeover = "echo up"
hook-timeout = "1m"
log-level = "trace"
metrics = "[::1]:9466"
control = "/run/vmm-takeover/vm1-backup.sock"
"#,
    r#"
[source]
listen = "localhost:7070"
pair-id = "vm1"
insecure-no-auth = true
qmp = "/run/vm1/qmp.sock"
health-interval = "2s"
migrate-to = "tcp:192.0.2.20:4444"

[backup]
connect = "127.0.0.1:7070"
pair-id = "vm1"
insecure-no-auth = true
qmp = "/run/vm1/qmp.sock"
"#,
    r#"
[source]
listen = "127.0.0.1:7070"
pair-id = "vm1"
insecure-no-auth = false
psk-file = "KEY"
vm = "simulated"

[backup]
connect = "127.0.0.1:7070"
pair-id = "vm1"
psk-file = "KEY"
vm = "kvm-dummy"
then-listen = "127.0.0.1:7071"
then-heartbeat = "20ms"
"#,
    r#"
[source]
listen = "127.0.0.1:7070"
pair-id = "vm1"
psk-file = "KEY"
vm = "kvm-dummy"
guest-mem = "64MiB"
guest-dirty-rate = "10MiB/s"
checkpoint = "25ms"
replica-listen = "127.0.0.1:7072"

[backup]
connect = "127.0.0.1:7070"
pair-id = "vm1"
psk-file = "KEY"
vm = "kvm-dummy"
guest-mem = "64MiB"
replica-from = "127.0.0.1:7072"
then-listen = "127.0.0.1:7071"
then-checkpoint = "25ms"
then-replica-listen = "127.0.0.1:7073"
guest-dirty-rate = "1MiB/s"
"#,
];

/// The keys `check-config` allows in `[table]`, from its own unknown-key message.
fn allowed_keys(dir: &TempDir, table: &str) -> Vec<String> {
    let f = write(
        dir,
        "unknown.toml",
        &format!("[{table}]\nno-such-key = 1\n"),
    );
    let o = run(&["check-config", &f]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    let list = e
        .split("allowed: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{e}"))
        .trim();
    list.split(", ").map(str::to_string).collect()
}

#[test]
fn every_key_of_both_tables_passes_check_config() {
    let dir = TempDir::new("config-every-key");
    let mut seen: Vec<(String, String)> = Vec::new();
    for (i, text) in EVERY_KEY.iter().enumerate() {
        let text = text.replace("KEY", test_key());
        let f = write(&dir, &format!("every-{i}.toml"), &text);
        let v = check_ok(&["--keys", &f]);
        assert_eq!(v["tables"], serde_json::json!(["source", "backup"]), "{v}");
        assert_eq!(v["key_files_checked"], true, "{v}");
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        for (table, item) in doc.iter() {
            for (k, _) in item.as_table().unwrap().iter() {
                seen.push((table.to_string(), k.to_string()));
            }
        }
    }
    // A flag added later gets a key at once; this test wants a value for it here too.
    for table in ["source", "backup"] {
        let allowed = allowed_keys(&dir, table);
        assert!(allowed.len() > 10, "[{table}]: {allowed:?}");
        let missing: Vec<&String> = allowed
            .iter()
            .filter(|k| !seen.iter().any(|(t, s)| t == table && s == *k))
            .collect();
        assert!(
            missing.is_empty(),
            "[{table}] keys with no value in EVERY_KEY: {missing:?}"
        );
    }
}

#[test]
fn the_contrib_examples_are_valid() {
    let dir = TempDir::new("config-contrib");
    for (name, table) in [("source", "source"), ("backup", "backup")] {
        let orig = repo_file(&format!("contrib/config/{name}.toml"));
        let orig_s = orig.display().to_string();
        let v = check_ok(&[&orig_s]);
        assert_eq!(v["tables"], serde_json::json!([table]), "{v}");
        assert_eq!(v["key_files_checked"], false, "{v}");
        // With --keys the key file must exist: it does not here, and the error says where.
        let text = std::fs::read_to_string(&orig).unwrap();
        let line = text
            .lines()
            .position(|l| l.starts_with("psk-file"))
            .unwrap()
            + 1;
        refused(
            &["check-config", "--keys", &orig_s],
            &[&orig_s, &format!("line {line}"), "key `psk-file`"],
        );
        // A copy that names a real key file passes with --keys too.
        let copy = write(
            &dir,
            &format!("{name}.toml"),
            &text.replace("/etc/vmm-takeover/vm1.psk", test_key()),
        );
        check_ok(&["--keys", &copy]);
    }
}

#[test]
fn a_source_runs_with_the_files_values_and_flags_override_them() {
    let dir = TempDir::new("config-run");
    let port = free_port();
    let f = write(
        &dir,
        "pair.toml",
        &format!(
            "[source]\nlisten = \"127.0.0.1:{port}\"\npair-id = \"cfg-pair\"\n\
             psk-file = \"{key}\"\nheartbeat = \"10ms\"\nkeepalive = \"2:1:3\"\n\n\
             [backup]\nconnect = \"127.0.0.1:{port}\"\npair-id = \"cfg-pair\"\n\
             psk-file = \"{key}\"\nheartbeat-misses = 7\n",
            key = test_key()
        ),
    );
    let source = Proc::spawn("source", &["source", "--config", &f]);
    let l = source.wait_event("listening", EVENT_TIMEOUT);
    assert_eq!(l["addr"], format!("127.0.0.1:{port}"), "{l}");
    assert_eq!(l["pair_id"], "cfg-pair", "{l}");
    assert_eq!(l["heartbeat_us"], 10_000, "{l}");
    assert_eq!(l["keepalive"]["idle_s"], 2, "{l}");
    assert_eq!(l["auth"]["mode"], "psk", "{l}");

    // The backup reads its own table of the same file, and arms on the source's link.
    let backup = Proc::spawn("backup", &["backup", "--config", &f]);
    let a = backup.wait_event("armed", EVENT_TIMEOUT);
    assert_eq!(a["heartbeat_us"], 10_000, "{a}");
    assert_eq!(a["deadline_us"], 70_000, "{a}");
    assert_eq!(a["auth"]["mode"], "psk", "{a}");
    drop(backup);
    drop(source);

    // Flags win over the file: another port, heartbeat and authentication.
    let port2 = free_port();
    let listen = format!("127.0.0.1:{port2}");
    let source = Proc::spawn(
        "source",
        &[
            "source",
            "--heartbeat",
            "20ms",
            "--config",
            &f,
            "--listen",
            &listen,
            "--insecure-no-auth",
        ],
    );
    let l = source.wait_event("listening", EVENT_TIMEOUT);
    assert_eq!(l["addr"], listen, "{l}");
    assert_eq!(l["heartbeat_us"], 20_000, "{l}");
    assert_eq!(l["keepalive"]["idle_s"], 2, "{l}");
    assert_eq!(l["auth"]["mode"], "none", "{l}");
}

#[test]
fn the_files_vmm_command_runs_unless_the_command_line_has_its_own() {
    let dir = TempDir::new("config-vmm");
    let f = write(
        &dir,
        "vmm.toml",
        "[source]\nlisten = \"127.0.0.1:0\"\npair-id = \"v\"\ninsecure-no-auth = true\n\
         vmm = [\"sh\", \"-c\", \"exit 0\", \"from-file\"]\n",
    );
    let mut p = Proc::spawn("source", &["source", "--config", &f]);
    let v = p.wait_event("vmm-started", EVENT_TIMEOUT);
    assert_eq!(
        v["argv"],
        serde_json::json!(["sh", "-c", "exit 0", "from-file"]),
        "{v}"
    );
    assert_eq!(p.wait_exit(EVENT_TIMEOUT).code(), Some(8));

    let mut p = Proc::spawn(
        "source",
        &[
            "source", "--config", &f, "--", "sh", "-c", "exit 0", "from-cli",
        ],
    );
    let v = p.wait_event("vmm-started", EVENT_TIMEOUT);
    assert_eq!(v["argv"][3], "from-cli", "{v}");
    assert_eq!(p.wait_exit(EVENT_TIMEOUT).code(), Some(8));
}

#[test]
fn bad_files_exit_2_naming_file_key_and_line() {
    let dir = TempDir::new("config-bad");
    let head = "[source]\nlisten = \"127.0.0.1:0\"\npair-id = \"a\"\ninsecure-no-auth = true\n";
    // (file, what stderr must say); the bad line is line 5 unless the case says otherwise.
    let cases: &[(&str, &[&str])] = &[
        // unknown key: what is allowed, and the likely intended key
        (
            "pair_id = \"b\"\n",
            &[
                "line 5",
                "key `pair_id`",
                "unknown key",
                "did you mean `pair-id`",
                "allowed: ",
            ],
        ),
        (
            "colour = \"red\"\n",
            &["line 5", "key `colour`", "allowed: listen, "],
        ),
        // wrong TOML type
        (
            "max-pending = \"ten\"\n",
            &[
                "line 5",
                "key `max-pending`",
                "expected a whole number",
                "got a string",
            ],
        ),
        (
            "heartbeat = 10\n",
            &[
                "line 5",
                "key `heartbeat`",
                "expected a string (`DURATION`)",
                "got an integer",
            ],
        ),
        (
            "kernel-keepalive-only = true\n",
            &[
                "line 5",
                "key `kernel-keepalive-only`",
                "unknown key in [source]",
            ],
        ),
        (
            "vmm = \"qemu -m 1\"\n",
            &["line 5", "key `vmm`", "expected an array of strings"],
        ),
        // bad duration: the flag's own words
        (
            "heartbeat = \"soon\"\n",
            &[
                "line 5",
                "key `heartbeat`",
                "\"soon\" is not a duration like 10ms or 1s",
            ],
        ),
        (
            "hook-timeout = \"2h\"\n",
            &["line 5", "key `hook-timeout`", "a timeout must be 1ms..=1h"],
        ),
        // out of range
        (
            "max-pending = 0\n",
            &["line 5", "key `max-pending`", "0 is not in 1..=65536"],
        ),
        (
            "max-pending = -1\n",
            &["line 5", "key `max-pending`", "1..=65536"],
        ),
        // bad choice
        (
            "vm = \"qemu\"\n",
            &["line 5", "key `vm`", "kvm-dummy, simulated"],
        ),
        // keys that conflict
        (
            "psk-file = \"/k\"\n",
            &[
                "line 4",
                "key `insecure-no-auth`",
                "cannot be used with key `psk-file` (line 5)",
            ],
        ),
    ];
    for (i, (extra, wanted)) in cases.iter().enumerate() {
        let f = write(&dir, &format!("bad-{i}.toml"), &format!("{head}{extra}"));
        let mut w: Vec<&str> = wanted.to_vec();
        w.push(&f);
        refused(&["check-config", &f], &w);
        refused(&["source", "--config", &f], &w);
    }

    // bad address (replacing the file's listen)
    let f = write(
        &dir,
        "bad-addr.toml",
        "[source]\npair-id = \"a\"\n\nlisten = \"7070\"\ninsecure-no-auth = true\n",
    );
    let w = [
        f.as_str(),
        "line 4",
        "key `listen`",
        "has no port; expected HOST:PORT",
    ];
    refused(&["check-config", &f], &w);
    refused(&["source", "--config", &f], &w);
    // IPv6 without brackets
    let f = write(
        &dir,
        "bad-v6.toml",
        "[backup]\nconnect = \"::1:7070\"\npair-id = \"a\"\ninsecure-no-auth = true\n",
    );
    refused(
        &["backup", "--config", &f],
        &[&f, "line 2", "key `connect`", "needs brackets"],
    );

    // missing table: for the role asked, and for check-config with no table at all
    let f = write(&dir, "backup-only.toml", "[backup]\npair-id = \"a\"\n");
    refused(
        &["source", "--config", &f],
        &[&f, "no [source] table", "has [backup]"],
    );
    let f = write(&dir, "empty.toml", "# nothing\n");
    refused(
        &["check-config", &f],
        &[&f, "no [source] or [backup] table"],
    );
    // unknown table, key outside a table
    let f = write(&dir, "sorce.toml", "[sorce]\nlisten = \"x\"\n");
    refused(
        &["check-config", &f],
        &[&f, "line 1", "key `sorce`", "allowed: [source], [backup]"],
    );
    let f = write(&dir, "top.toml", "# a\nlisten = \"x\"\n");
    refused(
        &["check-config", &f],
        &[&f, "line 2", "key `listen`", "in a table"],
    );

    // missing required key: the table's line, and every missing key
    let f = write(
        &dir,
        "missing.toml",
        "# pair\n\n[source]\nlisten = \"127.0.0.1:0\"\n",
    );
    let w = [
        f.as_str(),
        "line 3",
        "table [source]",
        "missing required key",
        "`pair-id`",
        "one of `psk-file`, `insecure-no-auth`",
    ];
    refused(&["check-config", &f], &w);
    refused(&["source", "--config", &f], &w);
    // ... which the command line may give instead
    let o = run(&[
        "source",
        "--config",
        &f,
        "--pair-id",
        "a",
        "--insecure-no-auth",
        "--listen",
        "nonsense",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("\"nonsense\" has no port"),
        "{}",
        stderr(&o)
    );
    // A key that needs another
    let f = write(
        &dir,
        "requires.toml",
        &format!("{head}on-resume = \"true\"\n"),
    );
    refused(
        &["check-config", &f],
        &[&f, "table [source]", "missing required key", "`on-handoff`"],
    );

    // TOML syntax error: line and column
    let f = write(
        &dir,
        "syntax.toml",
        "[source]\nlisten = \"127.0.0.1:0\npair-id = \"a\"\n",
    );
    refused(
        &["check-config", &f],
        &[&f, "line 2, column", "not valid TOML"],
    );
    refused(
        &["source", "--config", &f],
        &[&f, "line 2, column", "not valid TOML"],
    );
    let f = write(
        &dir,
        "dup.toml",
        "[source]\nlisten = \"a\"\nlisten = \"b\"\n",
    );
    refused(&["check-config", &f], &[&f, "line 3", "not valid TOML"]);

    // no such file
    let f = dir.path("absent.toml").display().to_string();
    refused(&["check-config", &f], &[&f, "cannot read config file"]);
    refused(
        &["backup", "--config", &f],
        &[&f, "cannot read config file"],
    );
}

#[test]
fn man_page_and_completions() {
    let o = run(&["man"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let page = String::from_utf8(o.stdout).unwrap();
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page:.200}");
    assert!(page.contains("\n.TH vmm-takeover 1"), "{page:.400}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}");
    }
    assert!(
        page.contains("check\\-config"),
        "no check-config in the page"
    );

    let o = run(&["man", "source"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let page = String::from_utf8(o.stdout).unwrap();
    assert!(page.contains("\n.TH vmm-takeover-source 1"), "{page:.400}");
    assert!(page.contains("\\-\\-config"), "source page lacks --config");
    refused(
        &["man", "nonsense"],
        &["no subcommand \"nonsense\"", "source"],
    );

    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef vmm-takeover"),
        ("fish", "complete -c vmm-takeover"),
        ("elvish", "vmm-takeover"),
        ("powershell", "vmm-takeover"),
    ] {
        let o = run(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", stderr(&o));
        let s = String::from_utf8(o.stdout).unwrap();
        assert!(s.contains(marker), "{shell}: {s:.300}");
        assert!(
            s.contains("check-config") && s.contains("pair-id"),
            "{shell}"
        );
    }
    refused(&["completions", "tcsh"], &["invalid value 'tcsh'", "bash"]);
}

#[test]
fn version_names_crate_protocol_and_git_revision() {
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    let v = String::from_utf8(o.stdout).unwrap();
    let want_rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let want = format!(
        "vmm-takeover {} (protocol {}, git {want_rev})\n",
        env!("CARGO_PKG_VERSION"),
        vmm_takeover_core::auth::VERSION
    );
    assert_eq!(v, want);
}

#[test]
fn log_level_overrides_rust_log_from_the_command_line_or_the_file() {
    let dir = TempDir::new("config-log");
    let f = write(
        &dir,
        "log.toml",
        "[source]\nlisten = \"127.0.0.1:0\"\npair-id = \"log\"\ninsecure-no-auth = true\n\
         log-level = \"info\"\nvmm = [\"true\"]\n",
    );
    // Runs a source until it ends by itself (its VMM exits at once: exit 8, after flushing its
    // output; a signal could come before its handlers are installed), and returns its stderr.
    let logs = |args: &[&str], rust_log: &str| {
        let mut p = Proc::spawn_opts(
            "source",
            args,
            SpawnOpts::new().pipe_stderr().env("RUST_LOG", rust_log),
        );
        assert_eq!(p.wait_exit(EVENT_TIMEOUT).code(), Some(8));
        assert_eq!(p.count("vmm-exited"), 1, "{:?}", p.event_names());
        p.stderr_lines().join("\n")
    };
    // RUST_LOG=error, the file says info: info lines come.
    let l = logs(&["source", "--config", &f], "error");
    assert!(l.contains(" INFO ") && l.contains("listening on"), "{l}");
    // The command line's --log-level (before or after the subcommand) beats the file's.
    for args in [
        &["--log-level", "error", "source", "--config", &f][..],
        &["source", "--config", &f, "--log-level=error"][..],
    ] {
        let l = logs(args, "info");
        assert!(
            !l.contains(" INFO ") && !l.contains(" WARN "),
            "{args:?}: {l}"
        );
    }
    // warn: the --insecure-no-auth warning, nothing below it.
    let l = logs(&["source", "--config", &f, "--log-level", "warn"], "trace");
    assert!(
        l.contains(" WARN ") && l.contains("not authenticated"),
        "{l}"
    );
    assert!(!l.contains(" INFO ") && !l.contains(" DEBUG "), "{l}");
    refused(
        &["--log-level", "loud", "demo"],
        &["invalid value 'loud'", "error, warn, info, debug, trace"],
    );
}
