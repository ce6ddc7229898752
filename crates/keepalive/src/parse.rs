// SPDX-License-Identifier: Apache-2.0
//! nginx `so_keepalive` syntax: `on`, `off` or `IDLE:INTVL:CNT`.
//!
//! Stricter than nginx on purpose: exactly three fields, durations only in h/m/s, and
//! ranges checked here rather than by a later `setsockopt` failing with EINVAL.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::{KeepaliveError, KeepaliveSpec};

const SYNTAX: &str = "expected `on`, `off` or IDLE:INTVL:CNT \
     (exactly three colon-separated fields, each may be empty for the system default)";

const DURATION_FORM: &str =
    "written as a bare number of seconds or with units h, m, s (e.g. 30, 90s, 1m30s, 2h)";

impl FromStr for KeepaliveSpec {
    type Err = KeepaliveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| KeepaliveError::Parse {
            spec: s.to_owned(),
            why,
        };
        let text = s.trim();
        match text {
            "" => return Err(err(format!("empty; {SYNTAX}"))),
            "on" => return Ok(KeepaliveSpec::ON),
            "off" => return Ok(KeepaliveSpec::OFF),
            _ => {}
        }
        let fields: Vec<&str> = text.split(':').collect();
        let [idle, interval, count] = fields[..] else {
            return Err(err(format!("{SYNTAX}, got {} field(s)", fields.len())));
        };
        // As in nginx: all-empty says nothing, and `on` is the one spelling for that.
        if fields.iter().all(|f| f.is_empty()) {
            return Err(err(
                "at least one of IDLE, INTVL, CNT must be given (use `on` for all system defaults)"
                    .to_owned(),
            ));
        }
        let idle = parse_secs("idle", idle, KeepaliveSpec::MAX_IDLE).map_err(err)?;
        let interval =
            parse_secs("interval", interval, KeepaliveSpec::MAX_INTERVAL).map_err(err)?;
        let count = parse_count(count).map_err(err)?;
        check_parts(idle, interval, count).map_err(err)?;
        Ok(KeepaliveSpec {
            idle,
            interval,
            count,
            ..KeepaliveSpec::ON
        })
    }
}

/// Canonical form: `on`, `off`, or bare seconds such as `1:1:5` and `1800::10`. The user
/// timeout policy is not part of the syntax and is not printed. Parts that are not whole
/// seconds print in `Duration`'s Debug form, which deliberately does not parse.
impl fmt::Display for KeepaliveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled {
            return f.write_str("off");
        }
        if self.idle.is_none() && self.interval.is_none() && self.count.is_none() {
            return f.write_str("on");
        }
        write_part(f, self.idle)?;
        f.write_str(":")?;
        write_part(f, self.interval)?;
        f.write_str(":")?;
        if let Some(count) = self.count {
            write!(f, "{count}")?;
        }
        Ok(())
    }
}

fn write_part(f: &mut fmt::Formatter<'_>, part: Option<Duration>) -> fmt::Result {
    match part {
        None => Ok(()),
        Some(d) if d.subsec_nanos() == 0 => write!(f, "{}", d.as_secs()),
        Some(d) => write!(f, "{d:?}"),
    }
}

/// Range checks shared by the parser, [`KeepaliveSpec::new`] and [`KeepaliveSpec::validate`].
pub(crate) fn check_parts(
    idle: Option<Duration>,
    interval: Option<Duration>,
    count: Option<u32>,
) -> Result<(), String> {
    check_secs("idle", idle, KeepaliveSpec::MAX_IDLE)?;
    check_secs("interval", interval, KeepaliveSpec::MAX_INTERVAL)?;
    match count {
        Some(c) if c == 0 || c > KeepaliveSpec::MAX_COUNT => Err(format!(
            "count must be 1..={} probes, got {c}",
            KeepaliveSpec::MAX_COUNT
        )),
        _ => Ok(()),
    }
}

fn check_secs(what: &str, value: Option<Duration>, max: Duration) -> Result<(), String> {
    let Some(d) = value else { return Ok(()) };
    let allowed = format!("{what} must be 1..={} whole seconds", max.as_secs());
    // The kernel takes whole seconds; socket2 would silently truncate the rest.
    if d.subsec_nanos() != 0 {
        Err(format!("{allowed}, got {d:?}"))
    } else if d.is_zero() || d > max {
        Err(format!("{allowed}, got {}", d.as_secs()))
    } else {
        Ok(())
    }
}

/// Parses an IDLE or INTVL field: empty, digits, or `<digits><unit>` groups with units h, m,
/// s, each at most once and largest first. Ranges are left to [`check_parts`].
fn parse_secs(what: &str, field: &str, max: Duration) -> Result<Option<Duration>, String> {
    if field.is_empty() {
        return Ok(None);
    }
    let fail = |reason: &str| {
        Err(format!(
            "{what} must be 1..={} whole seconds, {DURATION_FORM}, got {field:?}: {reason}",
            max.as_secs()
        ))
    };
    if field.starts_with('-') {
        return fail("negative values are not allowed");
    }
    if field.bytes().all(|b| b.is_ascii_digit()) {
        return match field.parse::<u64>() {
            Ok(secs) => Ok(Some(Duration::from_secs(secs))),
            Err(_) => fail("value is too large"),
        };
    }
    let mut total: u64 = 0;
    // Multiplier of the previous unit, to enforce "each at most once, largest first".
    let mut last_unit = u64::MAX;
    let mut rest = field;
    while !rest.is_empty() {
        let digits_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (digits, after) = rest.split_at(digits_len);
        if after.starts_with('.') || after.starts_with(',') {
            return fail("fractions are not allowed");
        }
        if digits.is_empty() {
            return fail("expected a number");
        }
        let unit_len: usize = after
            .chars()
            .take_while(|c| c.is_alphabetic())
            .map(char::len_utf8)
            .sum();
        let (unit, after) = after.split_at(unit_len);
        let multiplier = match unit {
            "h" => 3600,
            "m" => 60,
            "s" => 1,
            "" => return fail("a number without a unit is only allowed on its own"),
            "ms" | "us" | "µs" | "ns" => return fail("sub-second units are not allowed"),
            _ => return fail("unknown unit"),
        };
        if multiplier >= last_unit {
            return fail("each unit may appear once, largest first (h, m, s)");
        }
        last_unit = multiplier;
        let Some(sum) = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .and_then(|n| n.checked_add(total))
        else {
            return fail("value is too large");
        };
        total = sum;
        rest = after;
    }
    Ok(Some(Duration::from_secs(total)))
}

/// Parses the CNT field: empty or a plain number of probes.
fn parse_count(field: &str) -> Result<Option<u32>, String> {
    if field.is_empty() {
        return Ok(None);
    }
    let allowed = format!(
        "count must be a plain number of probes 1..={}",
        KeepaliveSpec::MAX_COUNT
    );
    if field.starts_with('-') {
        return Err(format!(
            "{allowed}, got {field:?}: negative values are not allowed"
        ));
    }
    if !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{allowed} (no units or signs), got {field:?}"));
    }
    match field.parse::<u32>() {
        Ok(count) => Ok(Some(count)),
        Err(_) => Err(format!("{allowed}, got {field:?}: value is too large")),
    }
}
