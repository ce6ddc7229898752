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
pub use session::{Role, Session};
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
