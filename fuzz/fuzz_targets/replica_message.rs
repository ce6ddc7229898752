// SPDX-License-Identifier: Apache-2.0
//! The replication stream's message decoder on arbitrary bodies (what an authenticated but
//! confused, or a key-holding hostile, source could send): it never panics, never allocates
//! past its limits, and every message it accepts is canonical — encoding it gives back exactly
//! the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_takeover_replica::message::{Message, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert!(data.len() <= MAX_BODY, "{} accepted at {} bytes", m.name(), data.len());
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(again, data, "{} is not canonical", m.name());
    }
});
