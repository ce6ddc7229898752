// SPDX-License-Identifier: Apache-2.0
//! Machine-readable lifecycle events: one JSON object per line on stdout.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Microseconds since the Unix epoch.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Prints `{"event": name, "at_unix_us": now, ...fields}` as one line and flushes it, so a
/// supervisor reading a pipe sees each event as it happens.
pub fn emit(name: &str, fields: Value) {
    let mut obj = Map::new();
    obj.insert("event".into(), Value::from(name));
    obj.insert("at_unix_us".into(), Value::from(unix_us(SystemTime::now())));
    if let Value::Object(f) = fields {
        obj.extend(f);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", Value::Object(obj));
    let _ = out.flush();
}
