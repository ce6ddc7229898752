// SPDX-License-Identifier: Apache-2.0
//! Wire protocol v1 of the heartbeat link: length-prefixed frames.
//!
//! ```text
//! 0      4        5        6              8
//! +------+--------+--------+--------------+-----------------+
//! | VMTK | version|  kind  | payload len  | payload ...     |
//! +------+--------+--------+--------------+-----------------+
//!  magic   u8 = 1    u8     u16 big endian  ≤ MAX_PAYLOAD
//! ```
//!
//! Every byte on the link belongs to a frame, so a stray byte is a protocol error rather than
//! "data arrived". See `docs/protocol.md`.

use std::fmt;
use std::time::Duration;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"VMTK";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Largest payload accepted; anything larger is an oversized frame.
pub const MAX_PAYLOAD: usize = 512;
/// Longest pair id, in bytes.
pub const MAX_PAIR_ID: usize = 64;
/// Shortest heartbeat interval a source may announce (and backups accept by default).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(1);
/// Longest heartbeat interval a source may announce (and backups accept by default).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// backup → source: pair id (and reserved auth tag).
    Hello = 1,
    /// source → backup: handshake accepted, heartbeat interval.
    Welcome = 2,
    /// source → backup: handshake refused, with a reason.
    Reject = 3,
    /// source → backup: the source's event loop is alive.
    Heartbeat = 4,
    /// source → backup: orderly stop, do not take over.
    StandDown = 5,
    /// source → backup: planned switchover, the source guest is paused, take over now.
    Handoff = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Reject,
            4 => Kind::Heartbeat,
            5 => Kind::StandDown,
            6 => Kind::Handoff,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Handshake request from the backup.
    Hello {
        /// Which VM pair this backup stands in for.
        pair_id: String,
        /// Reserved for a pre-shared-key authentication tag; empty in v1.
        auth_tag: Vec<u8>,
    },
    /// Handshake accepted.
    Welcome {
        /// Heartbeat interval the source will keep; `None` for keepalive-only links.
        /// Encoded as a mode byte (0 none, 1 heartbeat) and the interval in µs (u32).
        heartbeat: Option<Duration>,
    },
    /// Handshake refused.
    Reject {
        /// Human-readable reason.
        reason: String,
    },
    /// Application heartbeat, with a sequence number.
    Heartbeat {
        /// Increments by one per heartbeat tick.
        seq: u64,
    },
    /// Orderly stop.
    StandDown,
    /// Planned switchover.
    Handoff,
}

/// Why a frame or byte stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The first bytes were not `VMTK`.
    #[error("bad magic {0:02x?} (expected \"VMTK\"): not a vmm-takeover peer")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks version {VERSION})")]
    BadVersion(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0} (known: 1..=6)")]
    BadKind(u8),
    /// Payload longer than allowed.
    #[error("oversized frame: payload of {0} bytes (at most {MAX_PAYLOAD} allowed)")]
    Oversized(usize),
    /// The payload does not match its kind.
    #[error("malformed {kind:?} payload: {why}")]
    BadPayload {
        /// The frame kind.
        kind: Kind,
        /// What was wrong.
        why: String,
    },
    /// A valid frame that is not allowed at this point of the conversation.
    #[error("unexpected {0} frame {1}")]
    Unexpected(&'static str, &'static str),
    /// The pair id does not match.
    #[error("pair id mismatch: peer says {got:?}, this side serves {want:?}")]
    PairIdMismatch {
        /// Received.
        got: String,
        /// Expected.
        want: String,
    },
    /// The source refused the handshake.
    #[error("rejected by source: {0}")]
    Rejected(String),
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello { .. } => Kind::Hello,
            Frame::Welcome { .. } => Kind::Welcome,
            Frame::Reject { .. } => Kind::Reject,
            Frame::Heartbeat { .. } => Kind::Heartbeat,
            Frame::StandDown => Kind::StandDown,
            Frame::Handoff => Kind::Handoff,
        }
    }

    /// A short stable name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Reject { .. } => "REJECT",
            Frame::Heartbeat { .. } => "HEARTBEAT",
            Frame::StandDown => "STAND_DOWN",
            Frame::Handoff => "HANDOFF",
        }
    }

    /// Encodes the frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            Frame::Hello { pair_id, auth_tag } => {
                payload.push(pair_id.len() as u8);
                payload.extend_from_slice(pair_id.as_bytes());
                payload.push(auth_tag.len() as u8);
                payload.extend_from_slice(auth_tag);
            }
            Frame::Welcome { heartbeat } => {
                // Mode byte first so that "heartbeat every 0 µs" stays distinguishable from
                // "no heartbeat" and can be refused by the backup.
                payload.push(heartbeat.is_some() as u8);
                let us = heartbeat.map_or(0, |d| d.as_micros().min(u32::MAX as u128) as u32);
                payload.extend_from_slice(&us.to_be_bytes());
            }
            Frame::Reject { reason } => {
                let r = reason.as_bytes();
                payload.extend_from_slice(&r[..r.len().min(MAX_PAYLOAD)]);
            }
            Frame::Heartbeat { seq } => payload.extend_from_slice(&seq.to_be_bytes()),
            Frame::StandDown | Frame::Handoff => {}
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind() as u8);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    fn decode(kind: Kind, p: &[u8]) -> Result<Frame, ProtocolError> {
        let bad = |why: &str| ProtocolError::BadPayload {
            kind,
            why: why.to_string(),
        };
        match kind {
            Kind::Hello => {
                let (&n, rest) = p.split_first().ok_or_else(|| bad("empty"))?;
                let n = n as usize;
                if rest.len() < n + 1 {
                    return Err(bad("truncated pair id"));
                }
                let pair_id = std::str::from_utf8(&rest[..n])
                    .map_err(|_| bad("pair id is not UTF-8"))?
                    .to_string();
                validate_pair_id(&pair_id).map_err(|e| bad(&e))?;
                let tag_len = rest[n] as usize;
                let tag = &rest[n + 1..];
                if tag.len() != tag_len {
                    return Err(bad("auth tag length does not match"));
                }
                Ok(Frame::Hello {
                    pair_id,
                    auth_tag: tag.to_vec(),
                })
            }
            Kind::Welcome => {
                let b: [u8; 5] = p.try_into().map_err(|_| bad("expected 5 bytes"))?;
                let us = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
                match b[0] {
                    0 => Ok(Frame::Welcome { heartbeat: None }),
                    1 => Ok(Frame::Welcome {
                        heartbeat: Some(Duration::from_micros(us as u64)),
                    }),
                    m => Err(bad(&format!("unknown heartbeat mode {m} (0 or 1)"))),
                }
            }
            Kind::Reject => Ok(Frame::Reject {
                reason: String::from_utf8_lossy(p).into_owned(),
            }),
            Kind::Heartbeat => {
                let b: [u8; 8] = p.try_into().map_err(|_| bad("expected 8 bytes"))?;
                Ok(Frame::Heartbeat {
                    seq: u64::from_be_bytes(b),
                })
            }
            Kind::StandDown | Kind::Handoff => {
                if !p.is_empty() {
                    return Err(bad("expected no payload"));
                }
                Ok(if kind == Kind::StandDown {
                    Frame::StandDown
                } else {
                    Frame::Handoff
                })
            }
        }
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks a pair id: 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn validate_pair_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_PAIR_ID {
        return Err(format!(
            "pair id must be 1..={MAX_PAIR_ID} bytes, got {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "pair id may only contain A-Z a-z 0-9 . _ -, found {c:?}"
        ));
    }
    Ok(())
}

/// Incremental decoder: feed it what `read` returned, take frames out.
///
/// Checks the header as soon as its bytes arrive, so garbage is refused after at most
/// eight bytes and an oversized length before any of its payload is buffered.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let n = self.buf.len().min(4);
        if self.buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&self.buf[..n]);
            return Err(ProtocolError::BadMagic(m));
        }
        if self.buf.len() >= 5 && self.buf[4] != VERSION {
            return Err(ProtocolError::BadVersion(self.buf[4]));
        }
        if self.buf.len() >= 6 && Kind::from_u8(self.buf[5]).is_none() {
            return Err(ProtocolError::BadKind(self.buf[5]));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[6], self.buf[7]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::Oversized(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        // The kind byte was checked above.
        let kind = Kind::from_u8(self.buf[5]).ok_or(ProtocolError::BadKind(self.buf[5]))?;
        let frame = Frame::decode(kind, &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        frame.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                pair_id: "vm-42".into(),
                auth_tag: vec![],
            },
            Frame::Welcome { heartbeat: None },
            Frame::Welcome {
                heartbeat: Some(Duration::from_millis(10)),
            },
            Frame::Reject {
                reason: "pair id mismatch".into(),
            },
            Frame::Heartbeat { seq: 7 },
            Frame::StandDown,
            Frame::Handoff,
        ]
    }

    #[test]
    fn round_trip_every_kind_byte_by_byte() {
        for f in all_frames() {
            let bytes = f.encode();
            let mut r = FrameReader::new();
            for (i, b) in bytes.iter().enumerate() {
                r.push(&[*b]);
                let got = r.next_frame().unwrap();
                if i + 1 < bytes.len() {
                    assert_eq!(got, None, "{f:?} complete too early at byte {i}");
                } else {
                    assert_eq!(got, Some(f.clone()));
                }
            }
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut r = FrameReader::new();
        let mut bytes = Frame::Heartbeat { seq: 1 }.encode();
        bytes.extend(Frame::StandDown.encode());
        r.push(&bytes);
        assert_eq!(r.next_frame().unwrap(), Some(Frame::Heartbeat { seq: 1 }));
        assert_eq!(r.next_frame().unwrap(), Some(Frame::StandDown));
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn garbage_is_refused_at_the_first_byte() {
        let mut r = FrameReader::new();
        r.push(b"G");
        assert!(matches!(r.next_frame(), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn bad_headers() {
        let mut h = Frame::StandDown.encode();
        h[4] = 9;
        let mut r = FrameReader::new();
        r.push(&h);
        assert_eq!(r.next_frame(), Err(ProtocolError::BadVersion(9)));

        let mut h = Frame::StandDown.encode();
        h[5] = 200;
        let mut r = FrameReader::new();
        r.push(&h);
        assert_eq!(r.next_frame(), Err(ProtocolError::BadKind(200)));

        let mut h = Frame::StandDown.encode();
        h[6..8].copy_from_slice(&60000u16.to_be_bytes());
        let mut r = FrameReader::new();
        r.push(&h);
        assert_eq!(r.next_frame(), Err(ProtocolError::Oversized(60000)));
    }

    #[test]
    fn bad_payloads() {
        let mut f = Frame::Heartbeat { seq: 1 }.encode();
        f.push(0);
        f[7] += 1;
        let mut r = FrameReader::new();
        r.push(&f);
        assert!(matches!(
            r.next_frame(),
            Err(ProtocolError::BadPayload { .. })
        ));

        let f = Frame::Hello {
            pair_id: "bad id!".into(),
            auth_tag: vec![],
        }
        .encode();
        let mut r = FrameReader::new();
        r.push(&f);
        let e = r.next_frame().unwrap_err().to_string();
        assert!(e.contains("pair id may only contain"), "{e}");
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Random byte streams never panic the decoder and practically never decode to a frame.
    #[test]
    fn random_bytes_are_refused() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut frames = 0;
        for _ in 0..100_000 {
            let len = (rng(&mut seed) % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let mut r = FrameReader::new();
            r.push(&bytes);
            while let Ok(Some(_)) = r.next_frame() {
                frames += 1;
            }
        }
        assert_eq!(frames, 0);
    }

    /// No single bit flip turns another frame into a HANDOFF (the one frame that starts a guest).
    #[test]
    fn no_single_bit_flip_forges_a_handoff() {
        for f in all_frames() {
            if f == Frame::Handoff {
                continue;
            }
            let bytes = f.encode();
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let mut r = FrameReader::new();
                r.push(&b);
                assert_ne!(
                    r.next_frame(),
                    Ok(Some(Frame::Handoff)),
                    "{f:?} with bit {bit} flipped"
                );
            }
        }
    }

    #[test]
    fn pair_id_rules() {
        assert!(validate_pair_id("vm-1.a_b").is_ok());
        assert!(validate_pair_id("").is_err());
        assert!(validate_pair_id(&"a".repeat(65)).is_err());
        assert!(validate_pair_id("a b").is_err());
    }
}
