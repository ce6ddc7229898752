// SPDX-License-Identifier: Apache-2.0
//! The version 2 reader during the handshake: any bytes, fed in chunks or whole, give the same
//! frames and the same error; every frame it returns has a whole, consistent header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_takeover_core::auth::{Reader, VERSION};
use vmm_takeover_core::protocol::{ProtocolError, HEADER_LEN, MAGIC};

/// The error, without what a bad magic quotes: the bytes that had arrived when it was refused,
/// which depend on how the stream was cut (the refusal itself does not).
fn normalized(e: &ProtocolError) -> String {
    match e {
        ProtocolError::BadMagic(_) => "bad magic".into(),
        e => e.to_string(),
    }
}

fn read(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Option<String>) {
    let mut r = Reader::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk) {
        r.push(piece);
        loop {
            match r.next_handshake() {
                Ok(Some(f)) => frames.push(f),
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
    let (frames, err) = read(stream, vmm_takeover_fuzz::chunk(mode));
    let (whole_frames, whole_err) = read(stream, stream.len().max(1));
    assert_eq!(frames, whole_frames, "chunked and whole reads differ");
    assert_eq!(err, whole_err, "chunked and whole reads fail differently");
    let mut used = 0;
    for f in &frames {
        assert!(f.len() >= HEADER_LEN);
        assert_eq!(f[..4], MAGIC);
        assert_eq!(f[4], VERSION);
        assert_eq!(
            usize::from(u16::from_be_bytes([f[6], f[7]])) + HEADER_LEN,
            f.len()
        );
        assert_eq!(
            &stream[used..used + f.len()],
            &f[..],
            "frames are the stream's bytes"
        );
        used += f.len();
    }
});
