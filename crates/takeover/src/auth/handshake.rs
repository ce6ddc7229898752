// SPDX-License-Identifier: Apache-2.0
//! The handshake state machines: pure, no I/O, no clocks.
//!
//! ```text
//! transcript = HELLO (whole frame) || WELCOME without its last 32 bytes (its MAC)
//! mac_s = HMAC-SHA256(K, "vmtk-v2 source" || transcript)      in WELCOME
//! mac_b = HMAC-SHA256(K, "vmtk-v2 backup" || transcript)      in AUTH
//! PRK   = HKDF-Extract(salt = nonce_b || nonce_s, IKM = K)
//! k_sb  = HKDF-Expand(PRK, "vmtk-v2 source to backup", 32)    seals source → backup
//! k_bs  = HKDF-Expand(PRK, "vmtk-v2 backup to source", 32)    seals backup → source
//! REJECT tag = HMAC-SHA256(K, "vmtk-v2 reject" || HELLO || REJECT without its tag)
//! ```
//!
//! The nonces are the HKDF salt: they are public and random, which is what RFC 5869 §3.1 asks of
//! a salt, and a per-session salt makes the extracted key itself unique per session. The info
//! strings only separate the two directions. Everything else in the transcript is authenticated
//! by the MACs before any session key is used.

use std::fmt;
use std::time::Duration;

use hkdf::Hkdf;
use hmac::Mac;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::protocol::{Kind, ProtocolError, RejectCode};

use super::session::{keyed, LinkId, Role, Session};
use super::wire::{
    self, decode_auth, decode_hello, decode_reject, decode_welcome, encode_auth, encode_hello,
    encode_reject_prefix, encode_welcome_prefix, INFO_B2S, INFO_S2B, LABEL_BACKUP, LABEL_REJECT,
    LABEL_SOURCE, MAC_LEN, NONCE_LEN,
};
use super::{Credentials, Entropy, Key};

/// What a WELCOME announces (the same fields as version 1's WELCOME).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeInfo {
    /// Heartbeat interval the source keeps; `None` for keepalive-only links.
    pub heartbeat: Option<Duration>,
    /// The source's name in the arbiter (empty without one).
    pub node: String,
    /// The source's failsafe grace (see [`crate::protocol::Frame::Welcome`]).
    pub fence_grace: Duration,
}

/// HMAC-SHA256(key, label || parts...).
fn mac(key: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = keyed(key).chain_update(label);
    for p in parts {
        m.update(p);
    }
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(m.finalize().as_bytes());
    out
}

/// Checks `tag` against HMAC-SHA256(key, label || parts...) in constant time.
fn verify(key: &[u8], label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = keyed(key).chain_update(label);
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// The session keys (source → backup, backup → source), wiped on drop.
pub(crate) fn session_keys(
    key: &[u8],
    nonce_b: &[u8; NONCE_LEN],
    nonce_s: &[u8; NONCE_LEN],
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut salt = [0u8; 2 * NONCE_LEN];
    salt[..NONCE_LEN].copy_from_slice(nonce_b);
    salt[NONCE_LEN..].copy_from_slice(nonce_s);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key);
    let mut s2b = Zeroizing::new([0u8; 32]);
    let mut b2s = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 × 32: these cannot fail.
    hk.expand(INFO_S2B, &mut s2b[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    hk.expand(INFO_B2S, &mut b2s[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    (s2b, b2s)
}

/// Checks a frame's header and returns its kind, for dispatching whole frames.
fn kind_of(frame: &[u8]) -> Result<Kind, ProtocolError> {
    wire::split(frame).map(|(k, _)| k)
}

// ---------------------------------------------------------------------------------------------
// Backup

/// The backup's side of the handshake: sends HELLO, then checks the WELCOME (or REJECT).
pub struct BackupHandshake {
    key: Option<Key>,
    pair_id: String,
    hello: Vec<u8>,
    nonce: [u8; NONCE_LEN],
}

/// The backup's handshake succeeded: the source proved it holds the key.
pub struct Welcomed {
    /// The session, for sealing and opening every later frame.
    pub session: Session,
    /// The AUTH frame to send. Send it only if the backup accepts `welcome` (heartbeat range,
    /// arbiter on both sides); otherwise just close.
    pub auth: Vec<u8>,
    /// What the source announced, now authenticated.
    pub welcome: WelcomeInfo,
}

impl fmt::Debug for Welcomed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Welcomed")
            .field("session", &self.session)
            .field("auth", &format_args!("<{} bytes>", self.auth.len()))
            .field("welcome", &self.welcome)
            .finish()
    }
}

/// Why the backup's handshake ended without a WELCOME.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeFailure {
    /// The source sent a REJECT.
    #[error(
        "rejected by the source ({}{}): {reason}",
        code.as_str(),
        if *authenticated { "" } else { ", unauthenticated" }
    )]
    Rejected {
        /// The code.
        code: RejectCode,
        /// The source's text.
        reason: String,
        /// Whether the REJECT carries a valid tag: only the key's holder, answering this very
        /// HELLO, can have sent it. A keyed backup acts on an unauthenticated REJECT as on a
        /// transient refusal (anyone on the path could have sent it): never as "permanent", and
        /// a `stopping` one never as the STAND_DOWN it missed. Always false on an insecure link.
        authenticated: bool,
    },
    /// A bad frame, a WELCOME that does not verify, or an authentication mismatch.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl BackupHandshake {
    /// Starts a handshake for `pair_id` (`node`: this backup's name in the arbiter, or empty)
    /// with a fresh nonce; returns the machine and the HELLO to send. A keyed backup uses the
    /// newest key of its ring (the highest id).
    ///
    /// `pair_id` and `node` are expected to be valid (checked where they are configured); longer
    /// ones are cut, and the source refuses invalid ones.
    pub fn start(
        credentials: &Credentials,
        pair_id: &str,
        node: &str,
        rng: &mut dyn Entropy,
    ) -> (BackupHandshake, Vec<u8>) {
        let key = match credentials {
            Credentials::Keys(ring) => Some(ring.newest().clone()),
            Credentials::Insecure => None,
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let hello = encode_hello(pair_id, node, key.as_ref().map_or(0, Key::id), &nonce);
        let hs = BackupHandshake {
            key,
            pair_id: pair_id.to_string(),
            hello: hello.clone(),
            nonce,
        };
        (hs, hello)
    }

    /// The HELLO this machine sent.
    pub fn hello(&self) -> &[u8] {
        &self.hello
    }

    /// Takes the source's answer: one whole frame as [`super::Reader::next_handshake`] returned
    /// it. A WELCOME whose MAC verifies gives the session and the AUTH to send; a REJECT or
    /// anything else ends the handshake.
    pub fn on_welcome(self, frame: &[u8]) -> Result<Welcomed, HandshakeFailure> {
        match kind_of(frame)? {
            Kind::Reject => {
                let r = decode_reject(frame)?;
                let authenticated = self.key.as_ref().is_some_and(|k| {
                    verify(k.secret(), LABEL_REJECT, &[&self.hello, r.prefix], r.tag)
                });
                Err(HandshakeFailure::Rejected {
                    code: r.code,
                    reason: r.reason,
                    authenticated,
                })
            }
            Kind::Welcome => {
                let w = decode_welcome(frame)?;
                let link = LinkId::of(&self.nonce, &w.nonce);
                let (session, mac_b) = match &self.key {
                    Some(k) => {
                        let transcript = [&self.hello[..], w.prefix];
                        if !verify(k.secret(), LABEL_SOURCE, &transcript, w.mac) {
                            return Err(ProtocolError::WelcomeNotAuthentic {
                                key_id: k.id(),
                                pair_id: self.pair_id,
                            }
                            .into());
                        }
                        let mac_b = mac(k.secret(), LABEL_BACKUP, &transcript);
                        let (s2b, b2s) = session_keys(k.secret(), &self.nonce, &w.nonce);
                        (
                            Session::keyed(Role::Backup, &b2s[..], &s2b[..], link),
                            mac_b,
                        )
                    }
                    None => {
                        if w.mac.iter().any(|&b| b != 0) {
                            return Err(ProtocolError::AuthMode(
                                "the source authenticates its link (its WELCOME carries a MAC) \
                                 but this backup has no key (--insecure-no-auth)",
                            )
                            .into());
                        }
                        (Session::insecure(Role::Backup, link), [0u8; MAC_LEN])
                    }
                };
                Ok(Welcomed {
                    session,
                    auth: encode_auth(&mac_b),
                    welcome: w.info,
                })
            }
            k => Err(ProtocolError::Unexpected(
                k.name(),
                "during the handshake (expected WELCOME or REJECT)",
            )
            .into()),
        }
    }
}

impl fmt::Debug for BackupHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupHandshake")
            .field("key", &self.key)
            .field("pair_id", &self.pair_id)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Source

/// Why a source's handshake cannot succeed, known from the HELLO but told to nobody but the
/// source's own log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Doom {
    UnknownKey(u16),
    PairMismatch(String),
}

/// The source's side of the handshake after a HELLO: answer it with [`SourceHandshake::welcome`]
/// or [`SourceHandshake::reject`].
///
/// A HELLO for a key this source does not have, or for another pair, still gets a WELCOME, whose
/// MAC is made with a throwaway random key: without the key, it cannot be told from a real one.
/// The AUTH then fails like any other bad AUTH.
pub struct SourceHandshake {
    /// K, a throwaway random key (doomed), or `None` (insecure).
    key: Option<Zeroizing<Vec<u8>>>,
    doom: Option<Doom>,
    key_id: u16,
    node: String,
    hello: Vec<u8>,
    nonce_b: [u8; NONCE_LEN],
    nonce_s: [u8; NONCE_LEN],
}

impl SourceHandshake {
    /// Reads a HELLO (one whole frame as [`super::Reader::next_handshake`] returned it) for a
    /// source of `pair_id`. An error is answered with [`super::reject_for_error`] and the
    /// connection closed: a malformed HELLO, another frame, a backup without a key at a source
    /// with keys, or the reverse, and (without keys only) another pair.
    pub fn on_hello(
        credentials: &Credentials,
        pair_id: &str,
        frame: &[u8],
        rng: &mut dyn Entropy,
    ) -> Result<SourceHandshake, ProtocolError> {
        let h = decode_hello(frame)?;
        let mut nonce_s = [0u8; NONCE_LEN];
        rng.fill(&mut nonce_s);
        // Drawn in every case, so that the work does not depend on whether it is used.
        let mut throwaway = Zeroizing::new(vec![0u8; 32]);
        rng.fill(&mut throwaway);
        let (key, doom) = match credentials {
            Credentials::Insecure => {
                if h.key_id != 0 {
                    return Err(ProtocolError::AuthMode(
                        "the backup authenticates (it has a key) but this source runs without \
                         authentication (--insecure-no-auth)",
                    ));
                }
                if h.pair_id != pair_id {
                    return Err(ProtocolError::PairIdMismatch { got: h.pair_id });
                }
                (None, None)
            }
            Credentials::Keys(ring) => {
                if h.key_id == 0 {
                    return Err(ProtocolError::AuthMode(
                        "the backup has no key (--insecure-no-auth) but this source requires \
                         authentication",
                    ));
                }
                let doom = if h.pair_id != pair_id {
                    Some(Doom::PairMismatch(h.pair_id))
                } else if ring.get(h.key_id).is_none() {
                    Some(Doom::UnknownKey(h.key_id))
                } else {
                    None
                };
                let key = match (&doom, ring.get(h.key_id)) {
                    (None, Some(k)) => Zeroizing::new(k.secret().to_vec()),
                    _ => throwaway,
                };
                (Some(key), doom)
            }
        };
        Ok(SourceHandshake {
            key,
            doom,
            key_id: h.key_id,
            node: h.node,
            hello: frame.to_vec(),
            nonce_b: h.nonce,
            nonce_s,
        })
    }

    /// The node name the HELLO carries, for the arbiter check (authenticated only once
    /// [`AwaitingAuth::on_auth`] succeeds, since the HELLO is part of the transcript).
    pub fn peer_node(&self) -> &str {
        &self.node
    }

    /// The key id the HELLO names (`None` on an insecure link).
    pub fn key_id(&self) -> Option<u16> {
        (self.key_id != 0).then_some(self.key_id)
    }

    /// A REJECT answering this HELLO (busy, stopping, arbiter, ...). Its tag is made with the
    /// key when this source has the HELLO's key and pair, so the backup can trust it; otherwise
    /// with the throwaway key, which looks the same to anyone without the key. Zero without keys.
    pub fn reject(&self, code: RejectCode, reason: &str) -> Vec<u8> {
        reject(
            self.key.as_deref().map(|k| &k[..]),
            &self.hello,
            code,
            reason,
        )
    }

    /// Answers the HELLO with a WELCOME announcing `info`; returns the machine waiting for AUTH
    /// and the WELCOME to send.
    pub fn welcome(self, info: &WelcomeInfo) -> (AwaitingAuth, Vec<u8>) {
        let mut welcome = encode_welcome_prefix(info, &self.nonce_s);
        let mac_s = match &self.key {
            Some(k) => mac(k, LABEL_SOURCE, &[&self.hello, &welcome]),
            None => [0u8; MAC_LEN],
        };
        let hello_len = self.hello.len();
        let mut transcript = self.hello;
        transcript.extend_from_slice(&welcome);
        welcome.extend_from_slice(&mac_s);
        let next = AwaitingAuth {
            key: self.key,
            doom: self.doom,
            key_id: self.key_id,
            node: self.node,
            hello_len,
            transcript,
            nonce_b: self.nonce_b,
            nonce_s: self.nonce_s,
        };
        (next, welcome)
    }
}

impl fmt::Debug for SourceHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHandshake")
            .field("key_id", &self.key_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn reject(key: Option<&[u8]>, hello: &[u8], code: RejectCode, reason: &str) -> Vec<u8> {
    let mut out = encode_reject_prefix(code, reason);
    let tag = match key {
        Some(k) => mac(k, LABEL_REJECT, &[hello, &out]),
        None => [0u8; MAC_LEN],
    };
    out.extend_from_slice(&tag);
    out
}

/// The source after its WELCOME, waiting for AUTH.
pub struct AwaitingAuth {
    key: Option<Zeroizing<Vec<u8>>>,
    doom: Option<Doom>,
    key_id: u16,
    node: String,
    /// HELLO || WELCOME without its MAC.
    transcript: Vec<u8>,
    hello_len: usize,
    nonce_b: [u8; NONCE_LEN],
    nonce_s: [u8; NONCE_LEN],
}

/// The source's handshake succeeded: the backup proved it holds the key.
#[derive(Debug)]
pub struct Accepted {
    /// The session, for sealing and opening every later frame.
    pub session: Session,
    /// The backup's name in the arbiter (empty without one), now authenticated.
    pub node: String,
    /// The key the backup used (`None` on an insecure link).
    pub key_id: Option<u16>,
}

/// Why a source refused an AUTH: for the source's own log and counters only. Whatever it says,
/// the backup gets the same answer, [`super::auth_failure_answer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The HELLO named a key this source does not have.
    #[error("the backup used key {0}, which this source does not have")]
    UnknownKey(u16),
    /// The HELLO named another pair.
    #[error("the backup asked for pair {0:?}, which this source does not serve")]
    PairMismatch(String),
    /// The AUTH's MAC does not verify.
    #[error(
        "AUTH does not verify: the backup does not hold the key, or the handshake was altered \
         in transit"
    )]
    BadMac,
    /// Not an AUTH frame, or a malformed one (or, without keys, an AUTH with a MAC).
    #[error("no valid AUTH: {0}")]
    Malformed(ProtocolError),
}

impl AwaitingAuth {
    /// Checks the backup's AUTH (one whole frame as [`super::Reader::next_handshake`] returned
    /// it). On failure, answer [`super::auth_failure_answer`] after its delay, whatever the
    /// failure — and the same for any bytes that fail to decode at this point.
    pub fn on_auth(self, frame: &[u8]) -> Result<Accepted, AuthFailure> {
        let mac_b = decode_auth(frame).map_err(AuthFailure::Malformed)?;
        let link = LinkId::of(&self.nonce_b, &self.nonce_s);
        let session = match &self.key {
            Some(k) => {
                // The same work whether or not the handshake was doomed.
                let ok = verify(k, LABEL_BACKUP, &[&self.transcript], &mac_b);
                if let Some(d) = &self.doom {
                    return Err(doom_failure(d));
                }
                if !ok {
                    return Err(AuthFailure::BadMac);
                }
                let (s2b, b2s) = session_keys(k, &self.nonce_b, &self.nonce_s);
                Session::keyed(Role::Source, &s2b[..], &b2s[..], link)
            }
            None => {
                if mac_b.iter().any(|&b| b != 0) {
                    return Err(AuthFailure::Malformed(ProtocolError::AuthMode(
                        "the backup's AUTH carries a MAC, but this source runs without \
                         authentication (--insecure-no-auth)",
                    )));
                }
                Session::insecure(Role::Source, link)
            }
        };
        Ok(Accepted {
            session,
            node: self.node,
            key_id: (self.key_id != 0).then_some(self.key_id),
        })
    }

    /// A REJECT for this HELLO while AUTH is pending (busy, stopping), tagged as
    /// [`SourceHandshake::reject`] does.
    pub fn reject(&self, code: RejectCode, reason: &str) -> Vec<u8> {
        reject(
            self.key.as_deref().map(|k| &k[..]),
            &self.transcript[..self.hello_len],
            code,
            reason,
        )
    }

    /// Why this handshake cannot succeed, if the HELLO already told: for the source's log when
    /// the backup hangs up without an AUTH (it does when the WELCOME does not verify).
    pub fn doomed(&self) -> Option<AuthFailure> {
        self.doom.as_ref().map(doom_failure)
    }

    /// The node name the HELLO carries (see [`SourceHandshake::peer_node`]).
    pub fn peer_node(&self) -> &str {
        &self.node
    }
}

fn doom_failure(d: &Doom) -> AuthFailure {
    match d {
        Doom::UnknownKey(id) => AuthFailure::UnknownKey(*id),
        Doom::PairMismatch(p) => AuthFailure::PairMismatch(p.clone()),
    }
}

impl fmt::Debug for AwaitingAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitingAuth")
            .field("key_id", &self.key_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}
