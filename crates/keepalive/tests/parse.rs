// SPDX-License-Identifier: Apache-2.0
//! The text syntax: accepted inputs and their values, rejected inputs and their messages.

use std::time::Duration;

use vmm_keepalive::{KeepaliveError, KeepaliveSpec, UserTimeout};

/// (input, enabled, idle s, interval s, count, canonical Display)
type Good = (
    &'static str,
    bool,
    Option<u64>,
    Option<u64>,
    Option<u32>,
    &'static str,
);

const GOOD: &[Good] = &[
    ("on", true, None, None, None, "on"),
    ("off", false, None, None, None, "off"),
    ("  on\n", true, None, None, None, "on"),
    ("1:1:5", true, Some(1), Some(1), Some(5), "1:1:5"),
    (" 1:1:5\t", true, Some(1), Some(1), Some(5), "1:1:5"),
    ("5s:1s:3", true, Some(5), Some(1), Some(3), "5:1:3"),
    ("30m::10", true, Some(1800), None, Some(10), "1800::10"),
    ("1800::10", true, Some(1800), None, Some(10), "1800::10"),
    ("::3", true, None, None, Some(3), "::3"),
    (":75:", true, None, Some(75), None, ":75:"),
    ("2h::", true, Some(7200), None, None, "7200::"),
    (
        "1m30s:2m:127",
        true,
        Some(90),
        Some(120),
        Some(127),
        "90:120:127",
    ),
    ("1h1m1s:1:1", true, Some(3661), Some(1), Some(1), "3661:1:1"),
    ("0h1s:0m2s:1", true, Some(1), Some(2), Some(1), "1:2:1"),
    (
        "32767:32767:127",
        true,
        Some(32767),
        Some(32767),
        Some(127),
        "32767:32767:127",
    ),
    ("9h6m7s::", true, Some(32767), None, None, "32767::"),
    ("007:010:005", true, Some(7), Some(10), Some(5), "7:10:5"),
];

#[test]
fn good_inputs_parse_to_their_values() {
    for &(input, enabled, idle, interval, count, canonical) in GOOD {
        let spec: KeepaliveSpec = input
            .parse()
            .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
        let expected = KeepaliveSpec {
            enabled,
            idle: idle.map(Duration::from_secs),
            interval: interval.map(Duration::from_secs),
            count,
            user_timeout: UserTimeout::Auto,
        };
        assert_eq!(spec, expected, "{input:?}");
        assert_eq!(spec.to_string(), canonical, "{input:?}");
        let back: KeepaliveSpec = canonical.parse().unwrap();
        assert_eq!(back, spec, "{input:?} -> {canonical:?} does not round-trip");
    }
}

const BAD: &[(&str, &str)] = &[
    ("", "empty; expected `on`, `off` or IDLE:INTVL:CNT"),
    ("   ", "empty"),
    ("On", "exactly three colon-separated fields"),
    ("yes", "got 1 field(s)"),
    ("30", "got 1 field(s)"),
    ("10:", "got 2 field(s)"),
    (
        "1:1",
        "exactly three colon-separated fields, each may be empty",
    ),
    ("1:1:5:", "got 4 field(s)"),
    ("1:1:5:7", "got 4 field(s)"),
    (
        "::",
        "at least one of IDLE, INTVL, CNT must be given (use `on`",
    ),
    ("0:1:5", "idle must be 1..=32767 whole seconds, got 0"),
    ("1:0:5", "interval must be 1..=32767 whole seconds, got 0"),
    ("0s::", "idle must be 1..=32767 whole seconds, got 0"),
    ("32768::", "idle must be 1..=32767 whole seconds, got 32768"),
    (
        ":32768:",
        "interval must be 1..=32767 whole seconds, got 32768",
    ),
    ("10h::", "idle must be 1..=32767 whole seconds, got 36000"),
    ("1:1:0", "count must be 1..=127 probes, got 0"),
    ("1:1:128", "count must be 1..=127 probes, got 128"),
    (
        "1:1:99999999999",
        "count must be a plain number of probes 1..=127",
    ),
    ("500ms:1:5", "sub-second units are not allowed"),
    ("1s500ms:1:5", "sub-second units are not allowed"),
    (":100us:", "interval must be 1..=32767 whole seconds"),
    ("1.5:1:5", "fractions are not allowed"),
    ("1:0.5s:5", "interval must be 1..=32767 whole seconds"),
    ("1:1:2.5", "count must be a plain number of probes 1..=127"),
    ("-1:1:5", "negative values are not allowed"),
    ("1:-1:5", "interval must be 1..=32767 whole seconds"),
    ("1:1:-5", "count must be a plain number of probes 1..=127"),
    ("+1:1:5", "expected a number"),
    (
        "abc:1:5",
        "idle must be 1..=32767 whole seconds, written as a bare number",
    ),
    ("1d::", "unknown unit"),
    ("1S::", "unknown unit"),
    (
        "1m30::",
        "a number without a unit is only allowed on its own",
    ),
    (
        "30s1m::",
        "each unit may appear once, largest first (h, m, s)",
    ),
    ("1m1m::", "each unit may appear once"),
    ("1: 1:5", "expected a number"),
    ("1:1:5s", "(no units or signs), got \"5s\""),
    ("99999999999999999999999::", "value is too large"),
    ("99999999999999999h::", "value is too large"),
];

#[test]
fn bad_inputs_are_rejected_with_a_reason() {
    for &(input, needle) in BAD {
        let err = match input.parse::<KeepaliveSpec>() {
            Ok(spec) => panic!("{input:?} should be rejected, parsed as {spec:?}"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, KeepaliveError::Parse { spec, .. } if spec == input),
            "{input:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("invalid keepalive spec {input:?}: ")),
            "{input:?}: {msg}"
        );
        assert!(msg.contains(needle), "{input:?}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn message_matches_the_documented_form() {
    let err = "1:0:5".parse::<KeepaliveSpec>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid keepalive spec \"1:0:5\": interval must be 1..=32767 whole seconds, got 0"
    );
}

#[test]
fn constructor_applies_the_parser_checks() {
    let s = Duration::from_secs;
    assert_eq!(
        KeepaliveSpec::new(Some(s(1)), Some(s(1)), Some(5)).unwrap(),
        KeepaliveSpec::DEFAULT
    );
    assert_eq!(
        KeepaliveSpec::new(None, None, None).unwrap(),
        KeepaliveSpec::ON
    );
    /// (idle, interval, count, expected message part)
    type Bad = (
        Option<Duration>,
        Option<Duration>,
        Option<u32>,
        &'static str,
    );
    let bad: &[Bad] = &[
        (
            Some(Duration::from_millis(500)),
            None,
            None,
            "invalid keepalive spec \"500ms::\": idle must be 1..=32767 whole seconds, got 500ms",
        ),
        (
            Some(Duration::from_millis(1500)),
            None,
            None,
            "idle must be 1..=32767 whole seconds, got 1.5s",
        ),
        (
            None,
            Some(s(0)),
            None,
            "interval must be 1..=32767 whole seconds, got 0",
        ),
        (
            None,
            Some(s(40000)),
            None,
            "interval must be 1..=32767 whole seconds, got 40000",
        ),
        (None, None, Some(0), "count must be 1..=127 probes, got 0"),
        (
            None,
            None,
            Some(200),
            "count must be 1..=127 probes, got 200",
        ),
    ];
    for &(idle, interval, count, needle) in bad {
        let msg = KeepaliveSpec::new(idle, interval, count)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
}

#[test]
fn user_timeout_is_not_part_of_the_text() {
    let explicit = UserTimeout::Explicit(Duration::from_millis(2500));
    let spec = KeepaliveSpec::DEFAULT.with_user_timeout(explicit);
    assert_eq!(spec.to_string(), "1:1:5");
    let back: KeepaliveSpec = spec.to_string().parse().unwrap();
    assert_eq!(back.user_timeout, UserTimeout::Auto);
    assert_eq!(back.with_user_timeout(explicit), spec);
}
