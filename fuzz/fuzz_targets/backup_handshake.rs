// SPDX-License-Identifier: Apache-2.0
//! The backup's handshake fed arbitrary answers: the first frame goes to `on_welcome`, and after
//! a WELCOME that verifies the rest is the sealed stream. Nothing panics; a WELCOME is accepted
//! only with a valid MAC (keyed) or a zero one (insecure).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_takeover_core::auth::{BackupHandshake, Reader};
use vmm_takeover_fuzz::{credentials, Fixed, NODE, PAIR};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let creds = credentials(mode);
    // Whatever the reader makes of the stream, the machine also takes the raw bytes.
    let (raw, _) = BackupHandshake::start(&creds, PAIR, NODE, &mut Fixed::backup());
    let _ = raw.on_welcome(stream);

    let (b, _) = BackupHandshake::start(&creds, PAIR, NODE, &mut Fixed::backup());
    let mut r = Reader::new();
    r.push(stream);
    let Ok(Some(frame)) = r.next_handshake() else {
        return;
    };
    let Ok(mut w) = b.on_welcome(&frame) else {
        return;
    };
    assert_eq!(w.session.is_authenticated(), creds.is_keyed());
    while let Ok(Some(_)) = r.next_frame(&mut w.session) {}
});
