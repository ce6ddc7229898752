// SPDX-License-Identifier: Apache-2.0
//! Wire protocol version 2: an authenticated heartbeat link.
//!
//! Both peers hold a pre-shared key ([`KeyRing`], loaded from a key file that [`keygen`] writes).
//! A three-message handshake proves to each side that the other holds the key, over fresh nonces
//! from both sides, and binds everything exchanged (version, pair id, nodes, key id, heartbeat,
//! grace, nonces) into the MACs. It derives one session key per direction; every later frame is
//! *sealed*: it carries a sequence number and a truncated HMAC-SHA256 tag ([`Session`]).
//!
//! ```text
//! backup                                              source
//!   | -- HELLO {pair id, node, key id, nonce_b} -------> |  SourceHandshake::on_hello
//!   |                                                     |  (policy checks: peer_node())
//!   | <-- WELCOME {heartbeat, node, grace, nonce_s, mac_s} |  SourceHandshake::welcome
//!   |   BackupHandshake::on_welcome: verify mac_s         |
//!   | -- AUTH {mac_b} ----------------------------------> |  AwaitingAuth::on_auth
//!   | <============ sealed frames, both directions ======> |  Session::seal / Reader::next_frame
//! ```
//!
//! Everything here is pure: no sockets, no clocks. The subscribers read and write the bytes, keep
//! the deadlines, and wait [`auth_failure_answer`]'s delay before answering a failed AUTH. The
//! byte layout and a complete worked example are in `docs/protocol.md` ("Version 2"), which
//! `vector_tests.rs` checks this code against.
//!
//! `--insecure-no-auth` is [`Credentials::Insecure`]: the same frames with key id 0 and every MAC
//! field zero (nonces and sequence numbers are still checked). A side with a key never accepts
//! such a peer, and an insecure side refuses a peer with a key, so neither can be talked down.
//!
//! # Wiring it into the subscribers
//!
//! At start: [`Credentials`] from `--psk-file` ([`KeyRing::load`]) or `--insecure-no-auth`, and
//! one [`OsEntropy::new`]. Each connection keeps one [`Reader`] for its whole life.
//!
//! Backup: [`BackupHandshake::start`] → write the HELLO; [`Reader::next_handshake`] →
//! [`BackupHandshake::on_welcome`]:
//! - `Ok(w)`: check `w.welcome` as version 1 checks a WELCOME (heartbeat range, arbiter on both
//!   sides); refuse by closing without the AUTH; else write `w.auth`, keep `w.session`, arm.
//! - `Err(HandshakeFailure::Rejected { authenticated, .. })`: as version 1's REJECT when
//!   `authenticated` or insecure; a keyed backup treats an unauthenticated one as transient.
//! - `Err(HandshakeFailure::Protocol(e))`: as version 1's decode errors; `WelcomeNotAuthentic`
//!   and `PeerVersion` are unauthenticated too (permanent only before the first arming).
//!
//! Armed, [`Reader::next_frame`] with the session yields the same [`Frame`](crate::protocol::Frame)s
//! version 1's reader did; any error (bad tag, replay, gap, [`ProtocolError::LateReject`](crate::protocol::ProtocolError::LateReject))
//! is a protocol error on an armed link: drop and redial, never a takeover. HANDOFF_RESULT goes
//! out through [`Session::seal`].
//!
//! Source: [`Reader::next_handshake`] → [`SourceHandshake::on_hello`]; an error of either is
//! answered with [`reject_for_error`] and the connection closed. Policy checks use
//! [`SourceHandshake::peer_node`]; refusals (busy, stopping, arbiter) use
//! [`SourceHandshake::reject`] or [`AwaitingAuth::reject`]. [`SourceHandshake::welcome`] gives the
//! WELCOME; the next frame goes to [`AwaitingAuth::on_auth`]. From then on every failure (a decode
//! error too) is answered with [`auth_failure_answer`]: note the arrival time, write the bytes
//! [`AUTH_FAILURE_DELAY`] later (the handshake deadline still applies), half-close, and log the
//! [`AuthFailure`] (or [`AwaitingAuth::doomed`] if the backup hung up first) locally only. Joined,
//! each connection seals its own frames: [`Session::seal_heartbeat`] (no allocation) and
//! [`Session::seal_into`] its outbox; a heartbeat that is skipped is not sealed. What comes in
//! goes through [`Reader::next_frame`]; an error there gets EVICT (sealed), as version 1.

mod handshake;
mod keys;
mod session;
mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vector_tests;

use std::sync::Arc;
use std::time::Duration;

pub use handshake::{
    Accepted, AuthFailure, AwaitingAuth, BackupHandshake, HandshakeFailure, SourceHandshake,
    WelcomeInfo, Welcomed,
};
pub use keys::{
    keygen, keygen_add, InvalidKey, Key, KeyFileError, KeyRing, KEYGEN_LEN, MAX_KEY_FILE,
    MAX_KEY_LEN, MIN_KEY_LEN,
};
pub use session::{LinkId, Role, Session};
pub use wire::{
    reject_for_error, unauthenticated_reject, Reader, MAC_LEN, NONCE_LEN, SEALED_HEARTBEAT_LEN,
    SEALED_OVERHEAD, SEQ_LEN, TAG_LEN, VERSION,
};

/// What a side authenticates with.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// Pre-shared keys (`--psk-file`). A source accepts every key of the ring; a backup uses
    /// [`KeyRing::newest`], the highest id.
    Keys(Arc<KeyRing>),
    /// `--insecure-no-auth`: version 2 without MACs. Refused by, and refusing, any side with keys.
    Insecure,
}

impl Credentials {
    /// Whether this side authenticates.
    pub fn is_keyed(&self) -> bool {
        matches!(self, Credentials::Keys(_))
    }
}

/// A source of random bytes for nonces and throwaway keys.
///
/// [`OsEntropy`] in production; tests and fuzz targets pass a deterministic one.
pub trait Entropy {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// The operating system's random number generator (`getrandom(2)`).
#[derive(Debug, Clone, Copy)]
pub struct OsEntropy(());

impl OsEntropy {
    /// Checks once that the OS can provide random bytes, so that [`Entropy::fill`] cannot fail
    /// later.
    pub fn new() -> std::io::Result<Self> {
        let mut probe = [0u8; 1];
        getrandom::fill(&mut probe)
            .map_err(|e| std::io::Error::other(format!("no OS random number generator: {e}")))?;
        Ok(OsEntropy(()))
    }
}

impl Entropy for OsEntropy {
    /// # Panics
    ///
    /// If `getrandom(2)` fails after [`OsEntropy::new`] succeeded (the kernel's generator does
    /// not fail once it has been seeded): a nonce must never be predictable.
    fn fill(&mut self, buf: &mut [u8]) {
        if let Err(e) = getrandom::fill(buf) {
            panic!("getrandom failed after it worked once: {e}");
        }
    }
}

/// How long a source waits, from the arrival of the bytes that failed (a bad AUTH, a malformed
/// frame, anything after a WELCOME that is not a valid AUTH), before it writes the REJECT and
/// closes. The wait is the same whatever failed and is counted from the arrival, not from the
/// end of the check, so the answer's timing does not tell which check failed; it also slows
/// down anyone guessing. The connection keeps its pending-handshake slot during the wait.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(250);

/// The answer to any failure after a WELCOME: the same REJECT bytes (code `auth`, fixed text, zero
/// tag) whatever went wrong, and the delay ([`AUTH_FAILURE_DELAY`]) to wait before writing them.
pub fn auth_failure_answer() -> (&'static [u8], Duration) {
    (&wire::AUTH_FAILED, AUTH_FAILURE_DELAY)
}
