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
//!
//! Version 2 (authenticated: a handshake with nonces and MACs, every later frame sealed with a
//! sequence number and a MAC) lives in [`crate::auth`]; it keeps this module's frame kinds, their
//! payloads and [`Frame`] as the decoded form, and adds the AUTH kind, the `auth` reject code and
//! the errors of authentication to [`Kind`], [`RejectCode`] and [`ProtocolError`].

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
/// Longest node name (a process's name in the arbiter), in bytes.
pub const MAX_NODE: usize = 128;
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
    /// backup → source: the outcome of the `vm_start` a HANDOFF caused.
    HandoffResult = 7,
    /// source → backup: the source lives and drops this connection; dial again.
    Evict = 8,
    /// backup → source, version 2 only: the backup's proof that it holds the key.
    Auth = 9,
    /// backup → source: whether this backup's arbiter session works (the failsafe needs every
    /// backup unable to reach the arbiter too).
    ArbiterStatus = 10,
    /// source → backup: the source cannot renew its lease: check yours now and report.
    ArbiterCheck = 11,
    /// Never on the heartbeat link: names the data frames of a stream attached to a link (the
    /// replication stream, sealed with [`crate::auth::Session::seal_data`]) in errors. Its byte
    /// is refused by the heartbeat link's readers like any unknown kind.
    Data = 12,
}

impl Kind {
    /// The kind of a kind byte of either version (`Auth` only exists in version 2).
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Reject,
            4 => Kind::Heartbeat,
            5 => Kind::StandDown,
            6 => Kind::Handoff,
            7 => Kind::HandoffResult,
            8 => Kind::Evict,
            9 => Kind::Auth,
            10 => Kind::ArbiterStatus,
            11 => Kind::ArbiterCheck,
            _ => return None,
        })
    }

    /// The kind of a version 1 kind byte.
    fn from_u8_v1(b: u8) -> Option<Kind> {
        Kind::from_u8(b).filter(|k| *k != Kind::Auth)
    }

    /// The kind's name on the wire, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::Welcome => "WELCOME",
            Kind::Reject => "REJECT",
            Kind::Heartbeat => "HEARTBEAT",
            Kind::StandDown => "STAND_DOWN",
            Kind::Handoff => "HANDOFF",
            Kind::HandoffResult => "HANDOFF_RESULT",
            Kind::Evict => "EVICT",
            Kind::Auth => "AUTH",
            Kind::ArbiterStatus => "ARBITER_STATUS",
            Kind::ArbiterCheck => "ARBITER_CHECK",
            Kind::Data => "DATA",
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Handshake request from the backup.
    Hello {
        /// Which VM pair this backup stands in for.
        pair_id: String,
        /// The backup's name in the arbiter (empty without one): a handoff passes the pair to it.
        node: String,
        /// Reserved for a pre-shared-key authentication tag; empty in v1.
        auth_tag: Vec<u8>,
    },
    /// Handshake accepted.
    Welcome {
        /// Heartbeat interval the source will keep; `None` for keepalive-only links.
        /// Encoded as a mode byte (0 none, 1 heartbeat) and the interval in µs (u32).
        heartbeat: Option<Duration>,
        /// The source's name in the arbiter (empty without one).
        node: String,
        /// Failsafe grace (with an arbiter and heartbeats): the source fences itself at most this
        /// long after it last heard from this backup while the arbiter cannot renew its lease. A
        /// backup that wins the pair never starts before its own last sign of the source plus
        /// this (and a margin). Zero: no failsafe; the source fences when its lease runs out.
        fence_grace: Duration,
    },
    /// Handshake refused.
    Reject {
        /// Why, as a code the backup acts on.
        code: RejectCode,
        /// Human-readable detail. Never the source's own pair id or anything else a wrong
        /// client should not learn.
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
    /// The outcome of the `vm_start` a HANDOFF caused.
    HandoffResult {
        /// What happened.
        status: HandoffStatus,
        /// Human-readable detail (the hook's error), at most [`MAX_DETAIL`] bytes.
        detail: String,
    },
    /// The source drops this (armed) connection but lives: redial.
    Evict {
        /// Human-readable reason.
        reason: String,
    },
    /// Whether the backup can reach the arbiter (its lease renews).
    ArbiterStatus {
        /// The backup's last renewal succeeded.
        reachable: bool,
    },
    /// The source asks the backup to check its arbiter session now.
    ArbiterCheck,
}

/// Longest free-text detail in REJECT, EVICT and HANDOFF_RESULT, in bytes.
pub const MAX_DETAIL: usize = 256;

/// Why the source refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RejectCode {
    /// The backup stands in for another pair. Permanent.
    PairMismatch = 1,
    /// The backup speaks another protocol version. Permanent.
    Version = 2,
    /// The backup's HELLO was malformed. Permanent.
    Malformed = 3,
    /// The source is at a limit (connections, descriptors). May heal.
    Busy = 4,
    /// The source is stopping or handing off. May heal (a new source may come).
    Stopping = 5,
    /// A frame out of place. Permanent (the peers disagree about the protocol).
    Unexpected = 6,
    /// One side uses an arbiter and the other does not: arbitration only guards a pair whose
    /// both sides use it. Permanent.
    Arbiter = 7,
    /// Version 2: authentication failed, or one side has a key and the other does not. The same
    /// bytes whatever went wrong after a bad AUTH (see [`crate::auth::auth_failure_answer`]).
    /// Permanent.
    Auth = 8,
}

impl RejectCode {
    fn from_u8(b: u8) -> Option<RejectCode> {
        Some(match b {
            1 => RejectCode::PairMismatch,
            2 => RejectCode::Version,
            3 => RejectCode::Malformed,
            4 => RejectCode::Busy,
            5 => RejectCode::Stopping,
            6 => RejectCode::Unexpected,
            7 => RejectCode::Arbiter,
            8 => RejectCode::Auth,
            _ => return None,
        })
    }

    /// Whether waiting cannot heal the refusal: the backup then gives up unless asked to retry.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            RejectCode::PairMismatch
                | RejectCode::Version
                | RejectCode::Malformed
                | RejectCode::Unexpected
                | RejectCode::Arbiter
                | RejectCode::Auth
        )
    }

    /// A stable kebab-case name, for events.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::PairMismatch => "pair-mismatch",
            RejectCode::Version => "version",
            RejectCode::Malformed => "malformed",
            RejectCode::Busy => "busy",
            RejectCode::Stopping => "stopping",
            RejectCode::Unexpected => "unexpected",
            RejectCode::Arbiter => "arbiter",
            RejectCode::Auth => "auth",
        }
    }
}

/// What a backup reports after a HANDOFF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HandoffStatus {
    /// Its `vm_start` succeeded: its copy runs.
    Started = 0,
    /// Its `vm_start` failed: its copy does not run.
    Failed = 1,
    /// Its `vm_start` did not finish in time: whether its copy runs is unknown.
    Uncertain = 2,
}

impl HandoffStatus {
    fn from_u8(b: u8) -> Option<HandoffStatus> {
        Some(match b {
            0 => HandoffStatus::Started,
            1 => HandoffStatus::Failed,
            2 => HandoffStatus::Uncertain,
            _ => return None,
        })
    }
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
    #[error("unknown frame kind {0} (known: 1..=8 and 10..=11, and 9 in version 2)")]
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
    /// The pair id does not match (the expected one is not named: a wrong client learns nothing).
    #[error("pair id mismatch: peer asked for {got:?}, which this source does not serve")]
    PairIdMismatch {
        /// Received.
        got: String,
    },
    /// A whole frame handed over with fewer bytes than its header announces.
    #[error("truncated frame: {got} bytes, its header announces {want}")]
    Truncated {
        /// Bytes handed over.
        got: usize,
        /// Bytes the header announces (the header itself included).
        want: usize,
    },
    /// Version 2 reader: the peer speaks another version.
    #[error(
        "peer speaks protocol version {got}; this build requires {} (the authenticated link \
         of docs/protocol.md, \"Version 2\"): run the same version on both sides",
        crate::auth::VERSION
    )]
    PeerVersion {
        /// The version byte received.
        got: u8,
    },
    /// A sealed frame whose MAC does not verify: altered, or not sealed by the peer of this
    /// session.
    #[error(
        "{} frame (sequence number {seq}) failed authentication: altered in transit, sealed \
         for another session, or not sent by the peer",
        kind.name()
    )]
    BadMac {
        /// The frame's kind byte, as received.
        kind: Kind,
        /// Its sequence number, as received (unauthenticated).
        seq: u64,
    },
    /// An authentic sealed frame that was already received: a replay.
    #[error("replayed {} frame: sequence number {got}, expected {expected}", kind.name())]
    Replayed {
        /// The frame's kind.
        kind: Kind,
        /// Its sequence number.
        got: u64,
        /// The next sequence number this side expects.
        expected: u64,
    },
    /// An authentic sealed frame from further on: frames in between were dropped.
    #[error(
        "{} frame(s) missing: {} has sequence number {got}, expected {expected}",
        got.saturating_sub(*expected),
        kind.name()
    )]
    Skipped {
        /// The frame's kind.
        kind: Kind,
        /// Its sequence number.
        got: u64,
        /// The next sequence number this side expects.
        expected: u64,
    },
    /// The session's sequence numbers are used up, or it already failed: dial again.
    #[error("session closed: {0}; dial again")]
    SessionClosed(&'static str),
    /// The backup cannot verify the source's WELCOME.
    #[error(
        "WELCOME failed authentication: the source does not know key {key_id}, or serves \
         another pair than {pair_id:?}, or the handshake was altered in transit"
    )]
    WelcomeNotAuthentic {
        /// The key this backup used.
        key_id: u16,
        /// The pair this backup asked for.
        pair_id: String,
    },
    /// One side has a key and the other has none (`--insecure-no-auth`).
    #[error("authentication mismatch: {0}")]
    AuthMode(&'static str),
    /// A REJECT after the handshake (after a bad AUTH the source answers one): never
    /// authenticated, so it only ends the link.
    #[error(
        "REJECT ({}) after the handshake: the source refused this backup's AUTH (altered in \
         transit?) or the frame is forged",
        .0.as_str()
    )]
    LateReject(RejectCode),
}

impl ProtocolError {
    /// The REJECT code a source answers this error with during a handshake.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            ProtocolError::BadVersion(_) | ProtocolError::PeerVersion { .. } => RejectCode::Version,
            ProtocolError::WelcomeNotAuthentic { .. } | ProtocolError::AuthMode(_) => {
                RejectCode::Auth
            }
            ProtocolError::LateReject(_) => RejectCode::Unexpected,
            ProtocolError::PairIdMismatch { .. } => RejectCode::PairMismatch,
            ProtocolError::Unexpected(..) => RejectCode::Unexpected,
            ProtocolError::BadMagic(_)
            | ProtocolError::BadKind(_)
            | ProtocolError::Oversized(_)
            | ProtocolError::BadPayload { .. }
            | ProtocolError::Truncated { .. }
            | ProtocolError::BadMac { .. }
            | ProtocolError::Replayed { .. }
            | ProtocolError::Skipped { .. }
            | ProtocolError::SessionClosed(_) => RejectCode::Malformed,
        }
    }
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
            Frame::HandoffResult { .. } => Kind::HandoffResult,
            Frame::Evict { .. } => Kind::Evict,
            Frame::ArbiterStatus { .. } => Kind::ArbiterStatus,
            Frame::ArbiterCheck => Kind::ArbiterCheck,
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
            Frame::HandoffResult { .. } => "HANDOFF_RESULT",
            Frame::Evict { .. } => "EVICT",
            Frame::ArbiterStatus { .. } => "ARBITER_STATUS",
            Frame::ArbiterCheck => "ARBITER_CHECK",
        }
    }

    /// Encodes the frame, header included.
    ///
    /// Variable-length fields longer than the protocol allows are cut to their limits (names are
    /// checked where they are configured; free text is informational).
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind() as u8);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Appends the payload (version 1's, which version 2 keeps for every kind but HELLO and
    /// REJECT, and extends for WELCOME) to `payload`.
    pub(crate) fn encode_payload(&self, payload: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                pair_id,
                node,
                auth_tag,
            } => {
                put_short(payload, pair_id.as_bytes(), MAX_PAIR_ID);
                put_short(payload, node.as_bytes(), MAX_NODE);
                put_short(payload, auth_tag, u8::MAX as usize);
            }
            Frame::Welcome {
                heartbeat,
                node,
                fence_grace,
            } => {
                // Mode byte first so that "heartbeat every 0 µs" stays distinguishable from
                // "no heartbeat" and can be refused by the backup.
                payload.push(u8::from(heartbeat.is_some()));
                let us = heartbeat.map_or(0, |d| d.as_micros().min(u128::from(u32::MAX)) as u32);
                payload.extend_from_slice(&us.to_be_bytes());
                put_short(payload, node.as_bytes(), MAX_NODE);
                let ms = fence_grace.as_millis().min(u128::from(u32::MAX)) as u32;
                payload.extend_from_slice(&ms.to_be_bytes());
            }
            Frame::Reject { code, reason } => {
                payload.push(*code as u8);
                payload.extend_from_slice(cut(reason, MAX_DETAIL));
            }
            Frame::Heartbeat { seq } => payload.extend_from_slice(&seq.to_be_bytes()),
            Frame::StandDown | Frame::Handoff => {}
            Frame::HandoffResult { status, detail } => {
                payload.push(*status as u8);
                payload.extend_from_slice(cut(detail, MAX_DETAIL));
            }
            Frame::Evict { reason } => payload.extend_from_slice(cut(reason, MAX_DETAIL)),
            Frame::ArbiterStatus { reachable } => payload.push(u8::from(*reachable)),
            Frame::ArbiterCheck => {}
        }
    }

    /// Decodes a payload of `kind` (version 1's layout).
    pub(crate) fn decode(kind: Kind, p: &[u8]) -> Result<Frame, ProtocolError> {
        let bad = |why: &str| ProtocolError::BadPayload {
            kind,
            why: why.to_string(),
        };
        match kind {
            Kind::Hello => {
                let mut r = Cursor(p);
                let pair_id = r.text(MAX_PAIR_ID, "pair id").map_err(|e| bad(&e))?;
                validate_pair_id(&pair_id).map_err(|e| bad(&e))?;
                let node = r.text(MAX_NODE, "node name").map_err(|e| bad(&e))?;
                if !node.is_empty() {
                    validate_node(&node).map_err(|e| bad(&e))?;
                }
                let auth_tag = r.short(u8::MAX as usize, "auth tag").map_err(|e| bad(&e))?;
                r.end().map_err(|e| bad(&e))?;
                Ok(Frame::Hello {
                    pair_id,
                    node,
                    auth_tag: auth_tag.to_vec(),
                })
            }
            Kind::Welcome => {
                if p.len() < 5 {
                    return Err(bad("expected a mode byte and a 4-byte interval"));
                }
                let us = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
                let heartbeat = match p[0] {
                    0 if us == 0 => None,
                    0 => return Err(bad("an interval without heartbeat mode")),
                    1 => Some(Duration::from_micros(u64::from(us))),
                    m => return Err(bad(&format!("unknown heartbeat mode {m} (0 or 1)"))),
                };
                let mut r = Cursor(&p[5..]);
                let node = r.text(MAX_NODE, "node name").map_err(|e| bad(&e))?;
                if !node.is_empty() {
                    validate_node(&node).map_err(|e| bad(&e))?;
                }
                let ms = r.u32("fence grace").map_err(|e| bad(&e))?;
                r.end().map_err(|e| bad(&e))?;
                Ok(Frame::Welcome {
                    heartbeat,
                    node,
                    fence_grace: Duration::from_millis(ms.into()),
                })
            }
            Kind::Reject => {
                let (&c, text) = p.split_first().ok_or_else(|| bad("no reject code"))?;
                let code = RejectCode::from_u8(c)
                    .ok_or_else(|| bad(&format!("unknown reject code {c} (1..=8)")))?;
                Ok(Frame::Reject {
                    code,
                    reason: detail(text).map_err(|e| bad(&e))?,
                })
            }
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
            Kind::HandoffResult => {
                let (&c, text) = p.split_first().ok_or_else(|| bad("no status"))?;
                let status = HandoffStatus::from_u8(c)
                    .ok_or_else(|| bad(&format!("unknown handoff status {c} (0..=2)")))?;
                Ok(Frame::HandoffResult {
                    status,
                    detail: detail(text).map_err(|e| bad(&e))?,
                })
            }
            Kind::Evict => Ok(Frame::Evict {
                reason: detail(p).map_err(|e| bad(&e))?,
            }),
            Kind::Auth => Err(bad("AUTH is a version 2 handshake frame")),
            Kind::ArbiterStatus => match p {
                [0] => Ok(Frame::ArbiterStatus { reachable: false }),
                [1] => Ok(Frame::ArbiterStatus { reachable: true }),
                _ => Err(bad("expected one byte, 0 or 1")),
            },
            Kind::ArbiterCheck => {
                if p.is_empty() {
                    Ok(Frame::ArbiterCheck)
                } else {
                    Err(bad("expected no payload"))
                }
            }
            Kind::Data => Err(bad(
                "DATA belongs to a stream attached to a link, never to the heartbeat link",
            )),
        }
    }
}

/// A length-prefixed (`u8`) field, cut to `max` bytes.
pub(crate) fn put_short(out: &mut Vec<u8>, bytes: &[u8], max: usize) {
    let b = &bytes[..bytes.len().min(max).min(u8::MAX as usize)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

/// Free text cut to `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &[u8] {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// Free text as received: UTF-8, at most [`MAX_DETAIL`] bytes.
fn detail(bytes: &[u8]) -> Result<String, String> {
    if bytes.len() > MAX_DETAIL {
        return Err(format!(
            "text of {} bytes (at most {MAX_DETAIL})",
            bytes.len()
        ));
    }
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| "text is not UTF-8".to_string())
}

/// Reads length-prefixed fields off a payload.
pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    pub(crate) fn short(&mut self, max: usize, what: &str) -> Result<&'a [u8], String> {
        let (&n, rest) = self
            .0
            .split_first()
            .ok_or_else(|| format!("missing {what}"))?;
        let n = n as usize;
        if n > max {
            return Err(format!("{what} of {n} bytes (at most {max})"));
        }
        if rest.len() < n {
            return Err(format!("truncated {what}"));
        }
        let (field, rest) = rest.split_at(n);
        self.0 = rest;
        Ok(field)
    }

    pub(crate) fn text(&mut self, max: usize, what: &str) -> Result<String, String> {
        let b = self.short(max, what)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| format!("{what} is not UTF-8"))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err(format!("truncated {what}"));
        }
        let (b, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.0.len()))
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

/// Checks a node name (a process's name in the arbiter): 1..=128 bytes of
/// `[A-Za-z0-9._:@/-]`.
pub fn validate_node(node: &str) -> Result<(), String> {
    if node.is_empty() || node.len() > MAX_NODE {
        return Err(format!(
            "node name must be 1..={MAX_NODE} bytes, got {}",
            node.len()
        ));
    }
    if let Some(c) = node
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '/')))
    {
        return Err(format!(
            "node name may only contain A-Z a-z 0-9 . _ - : @ /, found {c:?}"
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
        if self.buf.len() >= 6 && Kind::from_u8_v1(self.buf[5]).is_none() {
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
        let kind = Kind::from_u8_v1(self.buf[5]).ok_or(ProtocolError::BadKind(self.buf[5]))?;
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
                node: String::new(),
                auth_tag: vec![],
            },
            Frame::Hello {
                pair_id: "vm-42".into(),
                node: "host-b/4242@x1".into(),
                auth_tag: vec![1, 2, 3],
            },
            Frame::Welcome {
                heartbeat: None,
                node: String::new(),
                fence_grace: Duration::ZERO,
            },
            Frame::Welcome {
                heartbeat: Some(Duration::from_millis(10)),
                node: "host-a/1".into(),
                fence_grace: Duration::from_millis(30),
            },
            Frame::Reject {
                code: RejectCode::PairMismatch,
                reason: "pair id mismatch".into(),
            },
            Frame::Heartbeat { seq: 7 },
            Frame::StandDown,
            Frame::Handoff,
            Frame::HandoffResult {
                status: HandoffStatus::Failed,
                detail: "cont: VM is dead".into(),
            },
            Frame::Evict {
                reason: "HELLO on an armed link".into(),
            },
            Frame::ArbiterStatus { reachable: false },
            Frame::ArbiterCheck,
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
            node: String::new(),
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

    /// Bytes that pass the magic and version checks: every kind, any length, any payload. The
    /// decoder never panics, never over-reads, and whatever it accepts is canonical (it encodes
    /// back to exactly the bytes it came from), so no two byte strings mean the same frame.
    #[test]
    fn random_frames_after_the_magic_decode_canonically_or_not_at_all() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(20_000));
        let kinds = 0u8..=11;
        let payload = proptest::collection::vec(any::<u8>(), 0..300);
        runner
            .run(
                &(kinds, payload, any::<bool>(), 0u16..600),
                |(kind, payload, honest_len, len)| {
                    let len = if honest_len {
                        payload.len() as u16
                    } else {
                        len
                    };
                    let mut bytes = MAGIC.to_vec();
                    bytes.push(VERSION);
                    bytes.push(kind);
                    bytes.extend_from_slice(&len.to_be_bytes());
                    bytes.extend_from_slice(&payload);
                    let mut r = FrameReader::new();
                    r.push(&bytes);
                    if let Ok(Some(f)) = r.next_frame() {
                        let used = bytes.len() - r.pending();
                        prop_assert_eq!(f.encode(), bytes[..used].to_vec(), "{:?}", f);
                    }
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn reject_codes_and_what_they_mean() {
        assert!(RejectCode::PairMismatch.is_permanent());
        assert!(RejectCode::Version.is_permanent());
        assert!(!RejectCode::Busy.is_permanent());
        assert!(!RejectCode::Stopping.is_permanent());
        let e = ProtocolError::PairIdMismatch { got: "vm-9".into() };
        assert_eq!(e.reject_code(), RejectCode::PairMismatch);
        assert_eq!(
            ProtocolError::BadVersion(9).reject_code(),
            RejectCode::Version
        );
        assert_eq!(
            ProtocolError::BadMagic(*b"GET ").reject_code(),
            RejectCode::Malformed
        );
    }

    #[test]
    fn pair_id_rules() {
        assert!(validate_pair_id("vm-1.a_b").is_ok());
        assert!(validate_pair_id("").is_err());
        assert!(validate_pair_id(&"a".repeat(65)).is_err());
        assert!(validate_pair_id("a b").is_err());
    }
}
