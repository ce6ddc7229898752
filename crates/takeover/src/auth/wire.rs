// SPDX-License-Identifier: Apache-2.0
//! Version 2 framing: the header, the handshake messages, and the incremental [`Reader`].
//!
//! ```text
//! 0      4        5        6              8
//! +------+--------+--------+--------------+------------------------------+
//! | VMTK | version|  kind  | payload len  | payload ...                  |
//! +------+--------+--------+--------------+------------------------------+
//!  magic   u8 = 2    u8     u16 big endian  ≤ MAX_PAYLOAD
//!
//! handshake (unsealed)   HELLO   str8 pair id, str8 node, u16 key id, nonce_b[32]
//!                        WELCOME u8 mode, u32 µs, str8 node, u32 grace ms, nonce_s[32], mac_s[32]
//!                        AUTH    mac_b[32]
//!                        REJECT  u8 code, free text, tag[32]
//! sealed (4..=8, 10, 11)   u64 seq, version 1's payload of the kind, tag[16]
//! ```

use crate::protocol::{
    put_short, Cursor, Frame, Kind, ProtocolError, RejectCode, HEADER_LEN, MAGIC, MAX_DETAIL,
    MAX_NODE, MAX_PAIR_ID, MAX_PAYLOAD,
};

use super::handshake::WelcomeInfo;
use super::Session;

/// The protocol version of this module.
pub const VERSION: u8 = 2;
/// Length of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake MAC (full HMAC-SHA256) and of a REJECT's tag.
pub const MAC_LEN: usize = 32;
/// Length of a sealed frame's tag (HMAC-SHA256 truncated to its first 16 bytes).
pub const TAG_LEN: usize = 16;
/// Length of a sealed frame's sequence number.
pub const SEQ_LEN: usize = 8;
/// What sealing adds to a frame's version 1 payload.
pub const SEALED_OVERHEAD: usize = SEQ_LEN + TAG_LEN;
/// Length of a sealed HEARTBEAT, header included.
pub const SEALED_HEARTBEAT_LEN: usize = HEADER_LEN + SEQ_LEN + 8 + TAG_LEN;

/// HMAC label of the source's handshake MAC.
pub(crate) const LABEL_SOURCE: &[u8] = b"vmtk-v2 source";
/// HMAC label of the backup's handshake MAC.
pub(crate) const LABEL_BACKUP: &[u8] = b"vmtk-v2 backup";
/// HMAC label of an authenticated REJECT.
pub(crate) const LABEL_REJECT: &[u8] = b"vmtk-v2 reject";
/// HKDF info of the source → backup session key.
pub(crate) const INFO_S2B: &[u8] = b"vmtk-v2 source to backup";
/// HKDF info of the backup → source session key.
pub(crate) const INFO_B2S: &[u8] = b"vmtk-v2 backup to source";

const AUTH_FAILED_TEXT: &[u8] = b"authentication failed";
const AUTH_FAILED_LEN: usize = HEADER_LEN + 1 + AUTH_FAILED_TEXT.len() + MAC_LEN;

/// The one REJECT a source answers every failure after its WELCOME with.
pub(crate) static AUTH_FAILED: [u8; AUTH_FAILED_LEN] = auth_failed();

const fn auth_failed() -> [u8; AUTH_FAILED_LEN] {
    let mut b = [0u8; AUTH_FAILED_LEN];
    let mut i = 0;
    while i < 4 {
        b[i] = MAGIC[i];
        i += 1;
    }
    b[4] = VERSION;
    b[5] = Kind::Reject as u8;
    let len = (AUTH_FAILED_LEN - HEADER_LEN) as u16;
    b[6] = (len >> 8) as u8;
    b[7] = len as u8;
    b[8] = RejectCode::Auth as u8;
    let mut j = 0;
    while j < AUTH_FAILED_TEXT.len() {
        b[9 + j] = AUTH_FAILED_TEXT[j];
        j += 1;
    }
    // The tag stays zero: the same bytes for every failure.
    b
}

/// Whether frames of this kind are sealed (carry a sequence number and a tag).
pub(crate) fn is_sealed(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Heartbeat
            | Kind::StandDown
            | Kind::Handoff
            | Kind::HandoffResult
            | Kind::Evict
            | Kind::ArbiterStatus
            | Kind::ArbiterCheck
    )
}

/// Which frames a reader expects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Sealed,
    /// Whole frames handed to a handshake machine or a session, which check the kind.
    Any,
}

/// Checks as much of a header as `buf` holds. `Ok(Some((kind, payload len)))` once it is whole.
fn check_header(buf: &[u8], phase: Phase) -> Result<Option<(Kind, usize)>, ProtocolError> {
    let n = buf.len().min(4);
    if buf[..n] != MAGIC[..n] {
        let mut m = [0u8; 4];
        m[..n].copy_from_slice(&buf[..n]);
        return Err(ProtocolError::BadMagic(m));
    }
    if buf.len() >= 5 && buf[4] != VERSION {
        return Err(ProtocolError::PeerVersion { got: buf[4] });
    }
    if buf.len() < 6 {
        return Ok(None);
    }
    let kind = Kind::from_u8(buf[5]).ok_or(ProtocolError::BadKind(buf[5]))?;
    match phase {
        Phase::Handshake if is_sealed(kind) => {
            return Err(ProtocolError::Unexpected(
                kind.name(),
                "during the handshake",
            ))
        }
        Phase::Sealed if !is_sealed(kind) && kind != Kind::Reject => {
            return Err(ProtocolError::Unexpected(
                kind.name(),
                "after the handshake",
            ))
        }
        _ => {}
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Oversized(len));
    }
    if is_sealed(kind) && len < SEALED_OVERHEAD {
        return Err(ProtocolError::BadPayload {
            kind,
            why: format!(
                "sealed payload of {len} bytes, shorter than its sequence number and tag \
                 ({SEALED_OVERHEAD})"
            ),
        });
    }
    Ok(Some((kind, len)))
}

/// Checks one whole frame (header and exactly the payload it announces) and returns its kind and
/// payload.
pub(crate) fn split(frame: &[u8]) -> Result<(Kind, &[u8]), ProtocolError> {
    let (kind, len) = check_header(frame, Phase::Any)?.ok_or(ProtocolError::Truncated {
        got: frame.len(),
        want: HEADER_LEN,
    })?;
    if frame.len() < HEADER_LEN + len {
        return Err(ProtocolError::Truncated {
            got: frame.len(),
            want: HEADER_LEN + len,
        });
    }
    if frame.len() > HEADER_LEN + len {
        return Err(ProtocolError::BadPayload {
            kind,
            why: format!("{} bytes after the frame", frame.len() - HEADER_LEN - len),
        });
    }
    Ok((kind, &frame[HEADER_LEN..]))
}

/// Appends a header for `kind` with a zero length; [`set_len`] fixes the length.
pub(crate) fn put_header(out: &mut Vec<u8>, kind: Kind) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    start
}

/// Sets the length of the frame starting at `start` to what follows its header, plus `more`
/// bytes still to come.
pub(crate) fn set_len(out: &mut [u8], start: usize, more: usize) {
    let len = out.len() - start - HEADER_LEN + more;
    debug_assert!(len <= MAX_PAYLOAD, "frame payload of {len} bytes");
    out[start + 6..start + 8].copy_from_slice(&(len as u16).to_be_bytes());
}

/// A decoded HELLO.
pub(crate) struct Hello {
    pub(crate) pair_id: String,
    pub(crate) node: String,
    pub(crate) key_id: u16,
    pub(crate) nonce: [u8; NONCE_LEN],
}

pub(crate) fn encode_hello(pair_id: &str, node: &str, key_id: u16, nonce: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 2 + pair_id.len() + node.len() + 2 + 32);
    let start = put_header(&mut out, Kind::Hello);
    put_short(&mut out, pair_id.as_bytes(), MAX_PAIR_ID);
    put_short(&mut out, node.as_bytes(), MAX_NODE);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(nonce);
    set_len(&mut out, start, 0);
    out
}

pub(crate) fn decode_hello(frame: &[u8]) -> Result<Hello, ProtocolError> {
    let (kind, p) = split(frame)?;
    if kind != Kind::Hello {
        return Err(ProtocolError::Unexpected(
            kind.name(),
            "during the handshake (expected HELLO)",
        ));
    }
    let bad = |why: String| ProtocolError::BadPayload {
        kind: Kind::Hello,
        why,
    };
    let mut r = Cursor(p);
    let pair_id = r.text(MAX_PAIR_ID, "pair id").map_err(bad)?;
    crate::protocol::validate_pair_id(&pair_id).map_err(bad)?;
    let node = r.text(MAX_NODE, "node name").map_err(bad)?;
    if !node.is_empty() {
        crate::protocol::validate_node(&node).map_err(bad)?;
    }
    let rest = r.0;
    if rest.len() != 2 + NONCE_LEN {
        return Err(bad(format!(
            "expected a 2-byte key id and a {NONCE_LEN}-byte nonce after the node, found {} \
             bytes",
            rest.len()
        )));
    }
    let key_id = u16::from_be_bytes([rest[0], rest[1]]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rest[2..]);
    Ok(Hello {
        pair_id,
        node,
        key_id,
        nonce,
    })
}

/// A WELCOME up to its MAC: the header (whose length counts the MAC) and everything before it.
pub(crate) fn encode_welcome_prefix(info: &WelcomeInfo, nonce: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 10 + info.node.len() + 2 * 32);
    let start = put_header(&mut out, Kind::Welcome);
    Frame::Welcome {
        heartbeat: info.heartbeat,
        node: info.node.clone(),
        fence_grace: info.fence_grace,
    }
    .encode_payload(&mut out);
    out.extend_from_slice(nonce);
    set_len(&mut out, start, MAC_LEN);
    out
}

/// A decoded WELCOME.
pub(crate) struct Welcome<'a> {
    pub(crate) info: WelcomeInfo,
    pub(crate) nonce: [u8; NONCE_LEN],
    /// The frame without its MAC: what the MAC covers (after the HELLO).
    pub(crate) prefix: &'a [u8],
    pub(crate) mac: &'a [u8],
}

pub(crate) fn decode_welcome(frame: &[u8]) -> Result<Welcome<'_>, ProtocolError> {
    let (kind, p) = split(frame)?;
    if kind != Kind::Welcome {
        return Err(ProtocolError::Unexpected(
            kind.name(),
            "during the handshake (expected WELCOME)",
        ));
    }
    if p.len() < NONCE_LEN + MAC_LEN {
        return Err(ProtocolError::BadPayload {
            kind: Kind::Welcome,
            why: format!(
                "{} bytes, too short for a {NONCE_LEN}-byte nonce and a {MAC_LEN}-byte MAC",
                p.len()
            ),
        });
    }
    let (v1, tail) = p.split_at(p.len() - NONCE_LEN - MAC_LEN);
    let Frame::Welcome {
        heartbeat,
        node,
        fence_grace,
    } = Frame::decode(Kind::Welcome, v1)?
    else {
        unreachable!("a WELCOME payload decodes to a WELCOME")
    };
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&tail[..NONCE_LEN]);
    Ok(Welcome {
        info: WelcomeInfo {
            heartbeat,
            node,
            fence_grace,
        },
        nonce,
        prefix: &frame[..frame.len() - MAC_LEN],
        mac: &tail[NONCE_LEN..],
    })
}

pub(crate) fn encode_auth(mac: &[u8; MAC_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + MAC_LEN);
    let start = put_header(&mut out, Kind::Auth);
    out.extend_from_slice(mac);
    set_len(&mut out, start, 0);
    out
}

pub(crate) fn decode_auth(frame: &[u8]) -> Result<[u8; MAC_LEN], ProtocolError> {
    let (kind, p) = split(frame)?;
    if kind != Kind::Auth {
        return Err(ProtocolError::Unexpected(
            kind.name(),
            "during the handshake (expected AUTH)",
        ));
    }
    p.try_into().map_err(|_| ProtocolError::BadPayload {
        kind: Kind::Auth,
        why: format!("{} bytes (a {MAC_LEN}-byte MAC expected)", p.len()),
    })
}

/// A REJECT up to its tag (the header's length counts the tag).
pub(crate) fn encode_reject_prefix(code: RejectCode, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + reason.len().min(MAX_DETAIL) + MAC_LEN);
    let start = put_header(&mut out, Kind::Reject);
    Frame::Reject {
        code,
        reason: reason.to_string(),
    }
    .encode_payload(&mut out);
    set_len(&mut out, start, MAC_LEN);
    out
}

/// A decoded REJECT.
pub(crate) struct Reject<'a> {
    pub(crate) code: RejectCode,
    pub(crate) reason: String,
    pub(crate) prefix: &'a [u8],
    pub(crate) tag: &'a [u8],
}

pub(crate) fn decode_reject(frame: &[u8]) -> Result<Reject<'_>, ProtocolError> {
    let (kind, p) = split(frame)?;
    if kind != Kind::Reject {
        return Err(ProtocolError::Unexpected(kind.name(), "(expected REJECT)"));
    }
    if p.len() < 1 + MAC_LEN {
        return Err(ProtocolError::BadPayload {
            kind: Kind::Reject,
            why: format!(
                "{} bytes, too short for a code and a {MAC_LEN}-byte tag",
                p.len()
            ),
        });
    }
    let (v1, tag) = p.split_at(p.len() - MAC_LEN);
    let Frame::Reject { code, reason } = Frame::decode(Kind::Reject, v1)? else {
        unreachable!("a REJECT payload decodes to a REJECT")
    };
    Ok(Reject {
        code,
        reason,
        prefix: &frame[..frame.len() - MAC_LEN],
        tag,
    })
}

/// A REJECT that nothing authenticates (zero tag): for refusals before a HELLO was understood,
/// and on links without keys. A keyed backup treats it as transient: anyone on the path could
/// have sent it.
pub fn unauthenticated_reject(code: RejectCode, reason: &str) -> Vec<u8> {
    let mut out = encode_reject_prefix(code, reason);
    out.extend_from_slice(&[0u8; MAC_LEN]);
    out
}

/// What a source answers a HELLO that [`Reader::next_handshake`] or
/// [`SourceHandshake::on_hello`](super::SourceHandshake::on_hello) refused: a REJECT with the
/// error's code and text, in version 1 framing for a version 1 peer (so that it can read it and
/// give up), else an [`unauthenticated_reject`].
pub fn reject_for_error(e: &ProtocolError) -> Vec<u8> {
    match e {
        ProtocolError::PeerVersion { got: 1 } | ProtocolError::BadVersion(1) => Frame::Reject {
            code: RejectCode::Version,
            reason: e.to_string(),
        }
        .encode(),
        _ => unauthenticated_reject(e.reject_code(), &e.to_string()),
    }
}

/// Incremental decoder of version 2: feed it what `read` returned, take frames out.
///
/// It checks the header as its bytes arrive, so garbage is refused at its first byte, a version 1
/// peer at the fifth, a frame out of phase at the sixth, and an oversized length before any of
/// its payload is buffered. During the handshake it returns whole frames exactly as received (the
/// handshake machines need the exact bytes); afterwards it opens sealed frames with the session.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
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

    /// During the handshake: the next whole frame (HELLO, WELCOME, AUTH or REJECT), header
    /// included, exactly as received; `Ok(None)` when more bytes are needed. A sealed kind is an
    /// error here.
    pub fn next_handshake(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        let Some((_, len)) = check_header(&self.buf, Phase::Handshake)? else {
            return Ok(None);
        };
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        Ok(Some(self.buf.drain(..HEADER_LEN + len).collect()))
    }

    /// After the handshake: the next sealed frame, opened with `session` (tag and sequence number
    /// checked, see [`Session::open`]); `Ok(None)` when more bytes are needed. A REJECT here is
    /// [`ProtocolError::LateReject`] (a source answers a bad AUTH with one; it is never
    /// authenticated, so it only ends the link); HELLO, WELCOME and AUTH are errors.
    pub fn next_frame(&mut self, session: &mut Session) -> Result<Option<Frame>, ProtocolError> {
        let Some((kind, len)) = check_header(&self.buf, Phase::Sealed)? else {
            return Ok(None);
        };
        let n = HEADER_LEN + len;
        if self.buf.len() < n {
            return Ok(None);
        }
        let r = if kind == Kind::Reject {
            decode_reject(&self.buf[..n]).and_then(|r| Err(ProtocolError::LateReject(r.code)))
        } else {
            session.open(&self.buf[..n])
        };
        self.buf.drain(..n);
        r.map(Some)
    }
}
