// SPDX-License-Identifier: Apache-2.0
//! The version 2 reader after the handshake, opening sealed frames with a session (keyed or
//! not, byte 0): chunked and whole reads agree, and every frame it opens is canonical — the
//! peer's twin session seals it to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_takeover_core::auth::Reader;
use vmm_takeover_core::protocol::{Frame, ProtocolError};
use vmm_takeover_fuzz::{chunk, record};

/// The error, without what a bad magic quotes: the bytes that had arrived when it was refused,
/// which depend on how the stream was cut (the refusal itself does not).
fn normalized(e: &ProtocolError) -> String {
    match e {
        ProtocolError::BadMagic(_) => "bad magic".into(),
        e => e.to_string(),
    }
}

fn read(mode: u8, data: &[u8], chunk: usize) -> (Vec<(Frame, usize)>, Option<String>) {
    let mut backup = record(mode).backup;
    let mut r = Reader::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    for piece in data.chunks(chunk) {
        r.push(piece);
        fed += piece.len();
        loop {
            match r.next_frame(&mut backup) {
                // The frame ends where the reader's buffer now starts.
                Ok(Some(f)) => frames.push((f, fed - r.pending())),
                Ok(None) => break,
                Err(e) => return (frames, Some(normalized(&e))),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let (frames, err) = read(mode, stream, chunk(mode));
    let (whole, whole_err) = read(mode, stream, stream.len().max(1));
    assert_eq!(err, whole_err, "chunked and whole reads fail differently");
    assert_eq!(
        frames.iter().map(|(f, _)| f).collect::<Vec<_>>(),
        whole.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    let mut twin = record(mode).source;
    let mut start = 0;
    for (f, end) in &frames {
        assert_eq!(twin.seal(f), &stream[start..*end], "{f:?} is not canonical");
        start = *end;
    }
});
