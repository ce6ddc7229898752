// SPDX-License-Identifier: Apache-2.0
//! Sealed frames: a sequence number and a truncated HMAC-SHA256 tag on every frame after the
//! handshake.
//!
//! ```text
//! 0      4   5   6        8          16              16+n
//! +------+---+---+--------+----------+---------------+----------+
//! | VMTK | 2 | k | len    | seq      | body          | tag      |
//! +------+---+---+--------+----------+---------------+----------+
//!                  = 8+n+16  u64 BE     v1 payload of k  16 bytes
//! tag = HMAC-SHA256(session key of the direction, bytes 0 .. 16+n)[..16]
//! ```
//!
//! The tag covers the header, the sequence number and the body. Sequence numbers start at 0 in
//! each direction of each session and go up by one per frame; they are explicit so that a
//! receiver can tell a replay from a gap in its errors. The session keys are fresh per session
//! (HKDF over both nonces), so a frame from another session fails its tag like a forgery.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::protocol::{Frame, Kind, ProtocolError, HEADER_LEN};

use super::wire::{
    is_sealed, put_header, set_len, split, SEALED_HEARTBEAT_LEN, SEALED_OVERHEAD, SEQ_LEN, TAG_LEN,
};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// An HMAC-SHA256 state keyed with `key`.
pub(crate) fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// Which end of the link a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source VMM's end.
    Source,
    /// The backup VMM's end.
    Backup,
}

/// One authenticated link after its handshake: seals what this side sends, opens what it
/// receives. The keys are wiped on drop and never printed.
///
/// After any error from [`Session::open`] the session refuses everything: the subscriber drops
/// the link (and the backup dials again); a link never goes on past a bad frame.
pub struct Session {
    role: Role,
    /// Keyed HMAC states, `None` on an unauthenticated (`--insecure-no-auth`) link.
    tx: Option<HmacSha256>,
    rx: Option<HmacSha256>,
    /// The next sequence number to send (saturates: sending more than 2⁶⁴ frames repeats the
    /// last number, which the peer refuses as a replay).
    tx_seq: u64,
    /// The next sequence number expected; `None` once the last one was received.
    rx_next: Option<u64>,
    /// Why the session refuses everything, after an error.
    failed: Option<&'static str>,
    /// Names this link (see [`LinkId`]).
    link: LinkId,
}

/// Names one link (one handshake) on both of its ends: a hash of both handshake nonces. Not a
/// secret (the nonces cross the wire in the clear), but fresh per link, so a stream attached to
/// a link (the replication stream) can be bound to it, and a backup can tell that state it
/// received on one link says nothing about a later one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(pub [u8; 16]);

impl LinkId {
    /// From both nonces of a handshake.
    pub(crate) fn of(nonce_b: &[u8], nonce_s: &[u8]) -> LinkId {
        use sha2::Digest;
        let h = Sha256::new()
            .chain_update(b"vmm-takeover link id v1")
            .chain_update(nonce_b)
            .chain_update(nonce_s)
            .finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[..16]);
        LinkId(id)
    }

    /// As 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// From [`LinkId::to_hex`]'s form; `None` if it is not 32 hex digits.
    pub fn from_hex(s: &str) -> Option<LinkId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(LinkId(id))
    }
}

impl fmt::Debug for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkId({})", self.to_hex())
    }
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Domain separation for [`Session::seal_data`]: a data tag covers these bytes first, where a
/// frame's tag covers `VMTK` and a version byte, so neither can pass for the other.
const DATA_DOMAIN: &[u8] = b"VMTK-DATA";

impl Session {
    pub(crate) fn keyed(role: Role, tx_key: &[u8], rx_key: &[u8], link: LinkId) -> Session {
        Session {
            role,
            tx: Some(keyed(tx_key)),
            rx: Some(keyed(rx_key)),
            tx_seq: 0,
            rx_next: Some(0),
            failed: None,
            link,
        }
    }

    pub(crate) fn insecure(role: Role, link: LinkId) -> Session {
        Session {
            role,
            tx: None,
            rx: None,
            tx_seq: 0,
            rx_next: Some(0),
            failed: None,
            link,
        }
    }

    /// Names this link on both of its ends (see [`LinkId`]).
    pub fn link_id(&self) -> LinkId {
        self.link
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether frames carry real tags (false with `--insecure-no-auth`).
    pub fn is_authenticated(&self) -> bool {
        self.tx.is_some()
    }

    /// The sequence number the next sealed frame gets (= frames sealed so far).
    pub fn next_send_seq(&self) -> u64 {
        self.tx_seq
    }

    /// The sequence number the next opened frame must have (= frames opened so far); `None`
    /// once no further frame can be accepted.
    pub fn next_recv_seq(&self) -> Option<u64> {
        self.rx_next.filter(|_| self.failed.is_none())
    }

    /// Moves both sequence numbers, to test their ends.
    #[cfg(test)]
    pub(crate) fn set_seqs(&mut self, tx: u64, rx: u64) {
        self.tx_seq = tx;
        self.rx_next = Some(rx);
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.tx_seq;
        self.tx_seq = s.saturating_add(1);
        s
    }

    /// Seals `frame`: the sealed bytes, header included. Seal a frame only when it will be sent:
    /// the peer expects every sequence number in turn.
    ///
    /// # Panics
    ///
    /// If `frame` is a handshake frame (HELLO, WELCOME, REJECT): those are never sealed.
    pub fn seal(&mut self, frame: &Frame) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + SEALED_OVERHEAD + 16);
        self.seal_into(frame, &mut out);
        out
    }

    /// Seals `frame` onto the end of `out` (an outbox): no allocation once `out` has room.
    ///
    /// # Panics
    ///
    /// If `frame` is a handshake frame (HELLO, WELCOME, REJECT): those are never sealed.
    pub fn seal_into(&mut self, frame: &Frame, out: &mut Vec<u8>) {
        assert!(
            is_sealed(frame.kind()),
            "{} is a handshake frame and is never sealed",
            frame.name()
        );
        let seq = self.take_seq();
        let start = put_header(out, frame.kind());
        out.extend_from_slice(&seq.to_be_bytes());
        frame.encode_payload(out);
        set_len(out, start, TAG_LEN);
        let tag = self.tag(&[&out[start..]]);
        out.extend_from_slice(&tag);
    }

    /// Seals a HEARTBEAT carrying the heartbeat counter `tick`, into a fixed array.
    pub fn seal_heartbeat(&mut self, tick: u64) -> [u8; SEALED_HEARTBEAT_LEN] {
        const BODY: usize = SEALED_HEARTBEAT_LEN - TAG_LEN;
        let seq = self.take_seq();
        let mut b = [0u8; SEALED_HEARTBEAT_LEN];
        b[..4].copy_from_slice(&crate::protocol::MAGIC);
        b[4] = super::VERSION;
        b[5] = Kind::Heartbeat as u8;
        b[6..8].copy_from_slice(&((SEALED_HEARTBEAT_LEN - HEADER_LEN) as u16).to_be_bytes());
        b[8..16].copy_from_slice(&seq.to_be_bytes());
        b[16..BODY].copy_from_slice(&tick.to_be_bytes());
        let tag = self.tag(&[&b[..BODY]]);
        b[BODY..].copy_from_slice(&tag);
        b
    }

    /// The tag of what `parts`, in order, make up (zeros without a key).
    fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        if let Some(mac) = &self.tx {
            let mut mac = mac.clone();
            for p in parts {
                mac.update(p);
            }
            tag.copy_from_slice(&mac.finalize().as_bytes()[..TAG_LEN]);
        }
        tag
    }

    /// Checks a received tag over `parts` (in constant time), then that `seq` is exactly the next
    /// sequence number, and moves past it. `what` names the frame for the insecure-mode error.
    fn accept(
        &mut self,
        kind: Kind,
        seq: u64,
        parts: &[&[u8]],
        tag: &[u8],
        what: &'static str,
    ) -> Result<(), ProtocolError> {
        match &self.rx {
            Some(mac) => {
                let mut mac = mac.clone();
                for p in parts {
                    mac.update(p);
                }
                mac.verify_truncated_left(tag)
                    .map_err(|_| ProtocolError::BadMac { kind, seq })?;
            }
            None if tag.iter().any(|&b| b != 0) => return Err(ProtocolError::AuthMode(what)),
            None => {}
        }
        let Some(expected) = self.rx_next else {
            return Err(ProtocolError::SessionClosed(
                "the sequence numbers are used up",
            ));
        };
        if seq < expected {
            return Err(ProtocolError::Replayed {
                kind,
                got: seq,
                expected,
            });
        }
        if seq > expected {
            return Err(ProtocolError::Skipped {
                kind,
                got: seq,
                expected,
            });
        }
        self.rx_next = expected.checked_add(1);
        Ok(())
    }

    /// Seals an opaque `body` for a stream that runs its own framing after this session's
    /// handshake (the replication stream): returns its sequence number and tag. The tag covers
    /// a domain label, the sequence number, the body's length and the body, under this
    /// direction's session key; sequence numbers are shared with [`Session::seal`].
    pub fn seal_data(&mut self, body: &[u8]) -> (u64, [u8; TAG_LEN]) {
        let seq = self.take_seq();
        let len = (body.len() as u64).to_be_bytes();
        let tag = self.tag(&[DATA_DOMAIN, &seq.to_be_bytes(), &len, body]);
        (seq, tag)
    }

    /// Checks an opaque body sealed by the peer's [`Session::seal_data`]: the tag (in constant
    /// time), then that `seq` is exactly the next one. After an error the session refuses
    /// everything, as with [`Session::open`].
    pub fn open_data(&mut self, seq: u64, body: &[u8], tag: &[u8]) -> Result<(), ProtocolError> {
        if let Some(why) = self.failed {
            return Err(ProtocolError::SessionClosed(why));
        }
        let r = self.open_data_inner(seq, body, tag);
        if r.is_err() {
            self.failed = Some("an earlier frame was refused");
        }
        r
    }

    fn open_data_inner(&mut self, seq: u64, body: &[u8], tag: &[u8]) -> Result<(), ProtocolError> {
        let len = (body.len() as u64).to_be_bytes();
        self.accept(
            Kind::Data,
            seq,
            &[DATA_DOMAIN, &seq.to_be_bytes(), &len, body],
            tag,
            "a data frame carries a tag, but this link runs without authentication \
             (--insecure-no-auth)",
        )
    }

    /// Opens one whole sealed frame (as [`super::Reader::next_frame`] hands it over): checks the
    /// header, the tag (in constant time), then that the sequence number is exactly the next one,
    /// then decodes the body.
    pub fn open(&mut self, frame: &[u8]) -> Result<Frame, ProtocolError> {
        if let Some(why) = self.failed {
            return Err(ProtocolError::SessionClosed(why));
        }
        let r = self.open_inner(frame);
        if r.is_err() {
            self.failed = Some("an earlier frame was refused");
        }
        r
    }

    fn open_inner(&mut self, frame: &[u8]) -> Result<Frame, ProtocolError> {
        let (kind, payload) = split(frame)?;
        if !is_sealed(kind) {
            return Err(ProtocolError::Unexpected(
                kind.name(),
                "after the handshake",
            ));
        }
        if payload.len() < SEALED_OVERHEAD {
            return Err(ProtocolError::BadPayload {
                kind,
                why: format!(
                    "sealed payload of {} bytes, shorter than its sequence number and tag",
                    payload.len()
                ),
            });
        }
        let mut seq = [0u8; SEQ_LEN];
        seq.copy_from_slice(&payload[..SEQ_LEN]);
        let seq = u64::from_be_bytes(seq);
        let (covered, tag) = frame.split_at(frame.len() - TAG_LEN);
        self.accept(
            kind,
            seq,
            &[covered],
            tag,
            "a sealed frame carries a tag, but this link runs without authentication \
             (--insecure-no-auth)",
        )?;
        Frame::decode(kind, &payload[SEQ_LEN..payload.len() - TAG_LEN])
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("authenticated", &self.is_authenticated())
            .field("next_send_seq", &self.tx_seq)
            .field("next_recv_seq", &self.rx_next)
            .field("failed", &self.failed)
            .field("link", &self.link)
            .field("keys", &"<redacted>")
            .finish()
    }
}
