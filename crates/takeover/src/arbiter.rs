// SPDX-License-Identifier: Apache-2.0
//! Ownership of a pair, decided by an external arbiter: the guard against split brain.
//!
//! A partition between two live hosts looks exactly like a dead source from the backup's side of
//! the link, so the link alone never decides that a guest may start. The pair is a key held on a
//! lease in a consensus store (etcd, see the `vmm-takeover-arbiter-etcd` crate); only its holder
//! may run the guest, and every change of holder grows a fencing **epoch** that storage or network
//! fencing can check.
//!
//! Every call here is blocking I/O with the backend's own per-request deadline: the subscribers
//! never call an [`Arbiter`] on the event loop. One session (one lease) serves every pair a process
//! holds, so the store's load grows with processes, not with pairs.

use std::fmt;
use std::time::Duration;

/// Who holds a pair, and under which fencing epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The holder's name (its [`Arbiter::holder`]).
    pub holder: String,
    /// The fencing epoch: grows with every change of holder and is never reused.
    pub epoch: u64,
}

impl fmt::Display for Ownership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (epoch {})", self.holder, self.epoch)
    }
}

/// The answer to [`Arbiter::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This holder owns the pair now (or already did), under `epoch`.
    Won {
        /// The fencing epoch of this ownership.
        epoch: u64,
    },
    /// Another holder owns the pair.
    Held {
        /// Who, and under which epoch.
        owner: Ownership,
        /// Time left on the holder's lease, when the arbiter says.
        ttl_left: Option<Duration>,
    },
    /// The pair is being handed over to another successor; only it may take the pair.
    HandoverPending {
        /// The successor's name.
        to: String,
    },
}

/// Errors of an arbiter backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArbiterError {
    /// The arbiter could not be reached or did not answer within the request deadline. Retryable.
    #[error("arbiter unavailable: {0}")]
    Unavailable(String),
    /// The session's lease is gone (expired or revoked): everything held under it is lost.
    #[error("arbiter lease lost: {0}")]
    LeaseLost(String),
    /// The pair is no longer held by this holder under the given epoch.
    #[error("not the owner of the pair any more (owner now: {})", .0.as_ref().map_or("nobody".to_string(), |o| o.to_string()))]
    NotOwner(Option<Ownership>),
    /// The arbiter answered something this client does not understand.
    #[error("unexpected answer from the arbiter: {0}")]
    Protocol(String),
    /// A call that needs an open session came before [`Arbiter::open_session`].
    #[error("no arbiter session is open")]
    NoSession,
}

/// A backend that decides who owns a pair (etcd, or a test double named as such).
///
/// Semantics every backend keeps:
/// - one **session** per process: a lease of a TTL the backend may raise (etcd raises TTLs below
///   its minimum): [`open_session`](Self::open_session) returns the TTL actually granted;
/// - a pair is owned by at most one holder at a time, bound to that holder's session lease: when
///   the lease expires or is revoked, the pair is free again;
/// - the epoch of each new ownership is larger than every earlier one of the same pair;
/// - [`hand_over`](Self::hand_over) is atomic with the check that the caller still owns the pair
///   under its epoch, and afterwards only the named successor can acquire it.
pub trait Arbiter: Send {
    /// A short description for logs and events, e.g. `etcd://10.0.0.3:2379`.
    fn describe(&self) -> String;

    /// This process's name in the arbiter: unique among all processes of the fleet.
    fn holder(&self) -> &str;

    /// Opens a session whose lease lasts `ttl` without renewal; returns the TTL granted. Called
    /// again after [`ArbiterError::LeaseLost`] to start a new session (the old one's pairs are
    /// lost).
    fn open_session(&mut self, ttl: Duration) -> Result<Duration, ArbiterError>;

    /// Renews the session's lease; returns the TTL it now has left (the full granted TTL).
    fn renew(&mut self) -> Result<Duration, ArbiterError>;

    /// Takes `pair` for this holder under the session lease, when nobody holds it, a pending
    /// handover names this holder, or this session's own handover was not claimed (a failed
    /// handoff takes the pair back). Returns the same epoch again if this session already holds
    /// it.
    fn acquire(&mut self, pair: &str) -> Result<Acquire, ArbiterError>;

    /// Gives `pair` up, if this holder still owns it under `epoch`.
    fn release(&mut self, pair: &str, epoch: u64) -> Result<(), ArbiterError>;

    /// Passes `pair`, owned under `epoch`, to `successor`: afterwards only `successor` can acquire
    /// it (until this session ends, when the pair becomes free to anyone).
    fn hand_over(&mut self, pair: &str, epoch: u64, successor: &str) -> Result<(), ArbiterError>;

    /// Who owns `pair` now, with the time left on the owner's lease when known.
    fn owner(&mut self, pair: &str) -> Result<Option<(Ownership, Option<Duration>)>, ArbiterError>;

    /// Ends the session: revokes the lease, which frees every pair held under it.
    fn close_session(&mut self) -> Result<(), ArbiterError>;

    /// Records `link` as the pair's **replica of record** (replication, `docs/replication.md`):
    /// the only link whose checkpoints a backup may resume. Atomic with the check that this
    /// holder still owns the pair under `epoch`; the record outlives the session (a backup reads
    /// it after the owner died). The default: this backend cannot ([`ArbiterError::Protocol`]).
    fn set_replica(&mut self, pair: &str, epoch: u64, link: &str) -> Result<(), ArbiterError> {
        let _ = (pair, epoch, link);
        Err(ArbiterError::Protocol(format!(
            "{} cannot record a replica of record",
            self.describe()
        )))
    }

    /// The pair's replica of record ([`set_replica`](Self::set_replica)), if any. The default:
    /// this backend cannot.
    fn replica(&mut self, pair: &str) -> Result<Option<String>, ArbiterError> {
        let _ = pair;
        Err(ArbiterError::Protocol(format!(
            "{} cannot record a replica of record",
            self.describe()
        )))
    }
}
