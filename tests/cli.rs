// SPDX-License-Identifier: Apache-2.0
//! The command line: bad flags are refused with exit 2 and a message naming what is allowed;
//! the keepalive in force on the real socket is what was asked for.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(with_auth(args)).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["source", "--pair-id", "a"], "--listen"),
        (
            &["source", "--listen", "nonsense", "--pair-id", "a"],
            "\"nonsense\" has no port; expected HOST:PORT, e.g. 127.0.0.1:7070 or localhost:7070",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--keepalive",
                "1:0:5",
            ],
            "interval",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--keepalive",
                "0.5:1:1",
            ],
            "whole seconds",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--keepalive",
                "1:1:200",
            ],
            "127",
        ),
        (
            &[
                "source",
                "--listen",
                "127.0.0.1:0",
                "--pair-id",
                "a",
                "--user-timeout",
                "soon",
            ],
            "auto, off or a duration",
        ),
        // The kernel keeps TCP_USER_TIMEOUT as an int of milliseconds: 2^31 ms and more cannot be.
        (
            &[
                "source",
                "--listen",
                "127.0.0.1:0",
                "--pair-id",
                "a",
                "--user-timeout",
                "30days",
            ],
            "2147483647",
        ),
        // The same limit reached through the automatic user timeout: refused at start (exit 2),
        // not as a retry of every accepted connection.
        (
            &[
                "source",
                "--listen",
                "127.0.0.1:0",
                "--pair-id",
                "a",
                "--keepalive",
                "32767:32767:127",
            ],
            "2147483647",
        ),
        // A backup sets no TCP_USER_TIMEOUT at all (its own kernel would cut a stalled link).
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--user-timeout",
                "3s",
            ],
            "unexpected argument '--user-timeout'",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--hook-timeout",
                "0s",
            ],
            "1ms..=1h",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--heartbeat-misses",
                "0",
            ],
            "heartbeat-misses",
        ),
        (
            &[
                "backup",
                "--connect",
                "127.0.0.1:1",
                "--pair-id",
                "a",
                "--on-takeover",
                "x",
                "--vm",
                "kvm-dummy",
            ],
            "cannot be used with",
        ),
        (
            &[
                "source",
                "--listen",
                "127.0.0.1:0",
                "--pair-id",
                "a",
                "--heartbeat",
                "10us",
            ],
            "1ms..=60s",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, want) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}: {err}");
    }
}

#[test]
fn bad_pair_id_is_refused() {
    let (code, err) = run(&[
        "source",
        "--listen",
        "127.0.0.1:0",
        "--pair-id",
        "no spaces",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("pair id may only contain"), "{err}");
}

#[test]
fn armed_event_reports_the_keepalive_read_back_from_the_socket() {
    let (source, addr) = start_source("source", "vm-ka", &[]);
    let backup = start_backup("backup", addr, "vm-ka", &["--keepalive", "3:2:4"]);
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    let k = &armed["keepalive"];
    assert_eq!(k["enabled"], true);
    assert_eq!(k["idle_s"], 3);
    assert_eq!(k["interval_s"], 2);
    assert_eq!(k["count"], 4);
    assert_eq!(k["bound_ms"], 11_000);
    // A backup sets no TCP_USER_TIMEOUT: its own kernel would cut the link while its loop stalls.
    assert_eq!(k["user_timeout_ms"], serde_json::Value::Null);
    let joined = source.wait_event("backup-joined", EVENT_TIMEOUT);
    // The source applies its own (default 1:1:5) spec to its side of the link.
    assert_eq!(joined["keepalive"]["count"], 5, "{joined}");
    assert_eq!(joined["keepalive"]["user_timeout_ms"], 6_000, "{joined}");
}

/// Settings that switch detection off are said loudly; a user timeout below the keepalive bound
/// is reported as the bound the kernel applies (the next probe time after it, measured: 2:1:3
/// with 2500 ms ends the connection at 3 s, not 5 s).
#[test]
fn keepalive_off_warns_and_an_explicit_user_timeout_is_the_kernels_bound() {
    let (source, addr) = start_source(
        "source",
        "vm-ka2",
        &["--keepalive", "2:1:3", "--user-timeout", "2500ms"],
    );
    let off = start_backup("off", addr, "vm-ka2", &["--keepalive", "off"]);
    let k = off.wait_event("armed", EVENT_TIMEOUT)["keepalive"].clone();
    assert_eq!(k["enabled"], false, "{k}");
    assert_eq!(k["bound_ms"], serde_json::Value::Null, "{k}");
    assert_eq!(k["user_timeout_ms"], serde_json::Value::Null, "{k}");
    let w = off.wait_event("warning", EVENT_TIMEOUT);
    assert_eq!(w["what"], "no-detection", "{w}");

    let k = source.wait_event("backup-joined", EVENT_TIMEOUT)["keepalive"].clone();
    assert_eq!(k["enabled"], true, "{k}");
    assert_eq!(k["user_timeout_ms"], 2_500, "{k}");
    assert_eq!(k["bound_ms"], 3_000, "{k}");

    // A source with no detection at all says so at start.
    let (quiet, _) = start_source("quiet", "vm-ka3", &["--keepalive", "off"]);
    assert_eq!(
        quiet.wait_event("warning", EVENT_TIMEOUT)["what"],
        "no-detection"
    );
}

#[test]
fn a_host_name_works_end_to_end() {
    let source = Proc::spawn(
        "source",
        &["source", "--listen", "localhost:0", "--pair-id", "vm-name"],
    );
    let addr: std::net::SocketAddr = source.wait_event("listening", EVENT_TIMEOUT)["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    let backup = start_backup(
        "backup",
        format!("localhost:{}", addr.port()),
        "vm-name",
        &[],
    );
    let armed = backup.wait_event("armed", EVENT_TIMEOUT);
    // The name was resolved to the same (first) address on both sides.
    assert_eq!(armed["peer"], addr.to_string(), "{armed}");
    source.wait_event("backup-joined", EVENT_TIMEOUT);
}

#[test]
fn an_unresolvable_name_or_a_missing_port_exits_2_naming_value_and_form() {
    const FORM: &str = "expected HOST:PORT, e.g. 127.0.0.1:7070 or localhost:7070";
    let cases: &[(&[&str], &str)] = &[
        (
            // `.invalid` never resolves (RFC 6761).
            &[
                "backup",
                "--connect",
                "no-such-host.invalid:7070",
                "--pair-id",
                "a",
            ],
            "cannot resolve \"no-such-host.invalid\" in \"no-such-host.invalid:7070\"",
        ),
        (
            &[
                "source",
                "--listen",
                "no-such-host.invalid:0",
                "--pair-id",
                "a",
            ],
            "cannot resolve \"no-such-host.invalid\"",
        ),
        (
            &["backup", "--connect", "localhost", "--pair-id", "a"],
            "\"localhost\" has no port",
        ),
        (
            &["source", "--listen", "localhost:", "--pair-id", "a"],
            "\"localhost:\" has no port",
        ),
        (
            &["backup", "--connect", "localhost:70000", "--pair-id", "a"],
            "the port must be a number in 0..=65535",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}: {err}");
        assert!(err.contains(FORM), "{args:?}: stderr lacks {FORM:?}: {err}");
    }
}

#[test]
fn a_bad_output_backlog_exits_2_naming_what_is_allowed() {
    let out = Command::new(bin())
        .args(with_auth(&[
            "source",
            "--listen",
            "127.0.0.1:0",
            "--pair-id",
            "a",
        ]))
        .env("VMM_TAKEOVER_OUTPUT_BACKLOG", "lots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("VMM_TAKEOVER_OUTPUT_BACKLOG=\"lots\"") && err.contains("1..=1048576"),
        "{err}"
    );
}
