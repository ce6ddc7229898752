// SPDX-License-Identifier: Apache-2.0
//! Machine-readable lifecycle events: one JSON object per line on stdout.

use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::output;

/// Microseconds since the Unix epoch.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The version of the event schema (`docs/events.md`): grows when a field changes meaning or goes
/// away; new events and new fields do not change it.
pub const SCHEMA: u32 = 1;

/// Who prints the events: every event carries them. The role changes once at most, when a
/// backup that took over is promoted to source (`--then-listen`).
static CONTEXT: RwLock<Option<(&'static str, String)>> = RwLock::new(None);

/// Sets the role (`source`, `backup`) and pair id every later event carries. Once per process;
/// [`set_role`] changes the role later.
pub fn set_context(role: &'static str, pair_id: &str) {
    *CONTEXT.write().unwrap_or_else(|e| e.into_inner()) = Some((role, pair_id.to_string()));
    crate::ops::init(role, pair_id);
}

/// Changes the role every later event carries (and that `status` and the metrics report): a
/// backup promoted to source. The pair id stays.
pub fn set_role(role: &'static str) {
    if let Some((r, _)) = CONTEXT.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
        *r = role;
    }
}

/// `{"event": name, "at_unix_us": now, "schema": 1, "role": …, "pair_id": …, ...fields}` as one
/// line, with its `\n`.
pub fn line(name: &str, fields: Value) -> String {
    let mut obj = Map::new();
    obj.insert("event".into(), Value::from(name));
    obj.insert("at_unix_us".into(), Value::from(unix_us(SystemTime::now())));
    obj.insert("schema".into(), Value::from(SCHEMA));
    if let Some((role, pair)) = CONTEXT.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        obj.insert("role".into(), Value::from(*role));
        obj.insert("pair_id".into(), Value::from(pair.as_str()));
    }
    if let Value::Object(f) = fields {
        obj.extend(f);
    }
    let mut l = Value::Object(obj).to_string();
    l.push('\n');
    l
}

/// Prints `{"event": name, "at_unix_us": now, ...fields}` as one line. Called from the event
/// loop, so it only queues the line: a writer thread prints it (see [`output`]). If stdout has
/// not been read for a while and the queue is full, the line is dropped and counted, and an
/// `events-dropped` event with the count follows once stdout is writable again.
pub fn emit(name: &str, fields: Value) {
    crate::ops::observe(name, &fields);
    output::stdout_line(line(name, fields));
}
