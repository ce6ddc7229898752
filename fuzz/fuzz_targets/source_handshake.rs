// SPDX-License-Identifier: Apache-2.0
//! The source's handshake fed arbitrary bytes: HELLO, then (after its WELCOME) AUTH, then the
//! sealed stream. Nothing panics; every refusal of a HELLO has an answer a reader can decode;
//! an AUTH is accepted only with a valid MAC (keyed) or a zero one (insecure).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_takeover_core::auth::{reject_for_error, Reader, SourceHandshake};
use vmm_takeover_core::protocol::{self, RejectCode};
use vmm_takeover_fuzz::{credentials, welcome_info, Fixed, PAIR};

/// The answer to a refused HELLO decodes: version 1 framing for a version 1 peer, else a
/// version 2 REJECT.
fn check_answer(answer: &[u8]) {
    if answer[4] == 1 {
        let mut r = protocol::FrameReader::new();
        r.push(answer);
        assert!(matches!(
            r.next_frame(),
            Ok(Some(protocol::Frame::Reject { .. }))
        ));
    } else {
        let mut r = Reader::new();
        r.push(answer);
        let f = r.next_handshake().expect("a v2 REJECT").expect("whole");
        assert_eq!(f.len(), answer.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let creds = credentials(mode);
    let _ = SourceHandshake::on_hello(&creds, PAIR, stream, &mut Fixed::source());

    let mut r = Reader::new();
    r.push(stream);
    let hello = match r.next_handshake() {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => return check_answer(&reject_for_error(&e)),
    };
    let s = match SourceHandshake::on_hello(&creds, PAIR, &hello, &mut Fixed::source()) {
        Ok(s) => s,
        Err(e) => return check_answer(&reject_for_error(&e)),
    };
    let _ = s.peer_node();
    check_answer(&s.reject(RejectCode::Busy, "busy"));
    let (a, _welcome) = s.welcome(&welcome_info());
    let doomed = a.doomed();
    let Ok(Some(auth)) = r.next_handshake() else {
        return;
    };
    let Ok(mut accepted) = a.on_auth(&auth) else {
        return;
    };
    assert!(doomed.is_none(), "a doomed handshake was accepted");
    assert_eq!(accepted.session.is_authenticated(), creds.is_keyed());
    while let Ok(Some(_)) = r.next_frame(&mut accepted.session) {}
});
