// SPDX-License-Identifier: Apache-2.0
//! The etcd backend of vmm-takeover's [`Arbiter`]: who may run a pair's guest, decided by a key
//! on a lease in etcd, so that a partition between two live hosts cannot start the guest twice.
//!
//! It speaks etcd's v3 HTTP/JSON gateway with a small blocking client (see the crate README,
//! "Why the JSON gateway").
//!
//! # Keys
//!
//! With the default prefix `/vmm-takeover/`:
//! - `/vmm-takeover/pairs/{pair}/owner`: the owner's holder name, bound to the owner's session
//!   lease; the pair is free when it is absent.
//! - `/vmm-takeover/pairs/{pair}/handover`: the successor's holder name while a planned handover
//!   is pending, bound to the handing-over session's lease (so it disappears with that session).
//! - `/vmm-takeover/pairs/{pair}/replica`: with replication, the link id whose checkpoints
//!   release output (the replica of record); no lease (a backup reads it after the owner died),
//!   written only by the owner in a transaction that checks its epoch.
//!
//! # Epoch
//!
//! The fencing epoch of an ownership is the owner key's `create_revision`. etcd's revision is one
//! counter for the whole cluster that grows with every write and is never reused, and the owner
//! key is created anew (deleted, then put) for each new ownership, so every ownership of a pair
//! has a larger epoch than every earlier one. A change is only ever made in a transaction that
//! compares `create_revision` with the caller's epoch: an old owner's release or handover fails
//! with [`ArbiterError::NotOwner`] instead of touching a newer ownership. This is how etcd's own
//! election recipe (`concurrency.Election`) fences leaders.
//!
//! # Timing
//!
//! etcd raises a lease TTL below its minimum (`ceil(1.5 × election timeout)`, 2 s at default
//! settings): [`EtcdArbiter::open_session`] returns the TTL really granted. Expired leases are
//! reaped by the leader about every 500 ms, so a pair frees between TTL and TTL + ~0.5 s after the
//! last renewal. A new leader (also after a single member's restart) renews every lease to its
//! full TTL: a holder's lease can outlive its last renewal by more than TTL, never less. The
//! holder must stop its guest before `last successful renewal request sent + TTL`; every call here
//! returns within the request timeout, so the caller can plan with that bound.

mod client;
mod endpoint;
mod wire;

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::json;
pub use vmm_takeover_core::{Acquire, Arbiter, ArbiterError, Ownership};

pub use endpoint::{parse_endpoints, Endpoint, EndpointsError};

use client::Client;
use wire::{
    cmp_create, cmp_lease, cmp_value, op_delete, op_put, op_range, txn, unb64, GrantResponse,
    KeepAliveAnswer, KeyValue, TimeToLiveResponse, TxnResponse,
};

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "/vmm-takeover/";

/// How often [`EtcdArbiter::acquire`] re-reads the pair when another holder changes it between
/// two of its transactions; more rounds than this means a fight, reported as retryable.
const ACQUIRE_ROUNDS: usize = 4;

/// A unique holder name for this process: `{hostname}-{pid}-{8 hex digits}`.
///
/// Host name and pid tell an operator which process holds a pair; the random suffix (from
/// `/dev/urandom`) keeps a restarted process that got the same pid from being taken for its
/// predecessor, whose lease may still be alive.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    let mut bytes = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map(|()| u32::from_ne_bytes(bytes))
        // Without /dev/urandom the clock's nanoseconds still differ between two starts.
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        });
    format!("{host}-{}-{random:08x}", std::process::id())
}

/// The session: one lease for every pair this process holds.
#[derive(Debug, Clone, Copy)]
struct Session {
    lease: i64,
    ttl: Duration,
}

/// An [`Arbiter`] backed by etcd (3.4 or later) through its v3 JSON gateway.
pub struct EtcdArbiter {
    client: Client,
    holder: String,
    prefix: String,
    request_timeout: Duration,
    session: Option<Session>,
}

impl fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("endpoints", &self.describe())
            .field("holder", &self.holder)
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .field("session", &self.session)
            .finish()
    }
}

impl EtcdArbiter {
    /// An arbiter on `endpoints` (tried in this order; members of one etcd cluster) for the
    /// process named `holder` (see [`default_holder`]). Every call of the [`Arbiter`] returns
    /// within `request_timeout` (plus the few milliseconds the client needs to notice it; 30 ms
    /// measured), whatever the endpoints do. Nothing is sent before
    /// [`open_session`](Arbiter::open_session) or another call.
    ///
    /// # Panics
    ///
    /// If `endpoints` is empty or `holder` is empty ([`parse_endpoints`] never returns an empty
    /// list).
    pub fn new(
        endpoints: Vec<Endpoint>,
        holder: impl Into<String>,
        request_timeout: Duration,
    ) -> Self {
        let holder = holder.into();
        assert!(
            !endpoints.is_empty(),
            "EtcdArbiter needs at least one endpoint"
        );
        assert!(!holder.is_empty(), "EtcdArbiter needs a holder name");
        EtcdArbiter {
            client: Client::new(endpoints),
            holder,
            prefix: DEFAULT_PREFIX.to_string(),
            request_timeout,
            session: None,
        }
    }

    /// Like [`new`](Self::new), from the CLI form `etcd://HOST:PORT[,HOST:PORT…]`.
    pub fn from_url(
        url: &str,
        holder: impl Into<String>,
        request_timeout: Duration,
    ) -> Result<Self, EndpointsError> {
        let holder = holder.into();
        Ok(Self::new(parse_endpoints(url)?, holder, request_timeout))
    }

    /// Uses `prefix` instead of [`DEFAULT_PREFIX`] for every key (several fleets can share one
    /// etcd cluster under different prefixes).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[Endpoint] {
        self.client.endpoints()
    }

    /// The bound on every call.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The session's lease id, while a session is open.
    pub fn lease_id(&self) -> Option<i64> {
        self.session.map(|s| s.lease)
    }

    /// The TTL etcd granted the session, while a session is open.
    pub fn granted_ttl(&self) -> Option<Duration> {
        self.session.map(|s| s.ttl)
    }

    /// The owner key of `pair`.
    pub fn owner_key(&self, pair: &str) -> String {
        format!("{}pairs/{pair}/owner", self.prefix)
    }

    /// The handover key of `pair`.
    pub fn handover_key(&self, pair: &str) -> String {
        format!("{}pairs/{pair}/handover", self.prefix)
    }

    /// The replica-of-record key of `pair` (no lease: it outlives its writer).
    pub fn replica_key(&self, pair: &str) -> String {
        format!("{}pairs/{pair}/replica", self.prefix)
    }

    /// Time left on a lease, by `lease/timetolive`. `None` when the key has no lease or etcd
    /// does not say in time: it is a hint for logs and events, never a reason to fail a call.
    fn ttl_left(&mut self, deadline: Instant, lease: i64) -> Option<Duration> {
        if lease == 0 || Instant::now() >= deadline {
            return None;
        }
        match self.client.call::<TimeToLiveResponse>(
            deadline,
            "/v3/lease/timetolive",
            &json!({"ID": lease.to_string()}),
        ) {
            Ok(r) => Some(Duration::from_secs(r.ttl.max(0) as u64)),
            Err(e) => {
                log::debug!("timetolive of lease {lease:x} failed: {e}");
                None
            }
        }
    }

    fn ownership(kv: &KeyValue) -> Result<Ownership, ArbiterError> {
        Ok(Ownership {
            holder: unb64(&kv.value).map_err(ArbiterError::Protocol)?,
            epoch: epoch_of(kv.create_revision)?,
        })
    }

    fn session(&self) -> Result<Session, ArbiterError> {
        self.session.ok_or(ArbiterError::NoSession)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.request_timeout
    }

    fn txn(
        &mut self,
        deadline: Instant,
        body: serde_json::Value,
    ) -> Result<TxnResponse, ArbiterError> {
        self.client.call(deadline, "/v3/kv/txn", &body)
    }

    /// In one txn: if the owner key of `pair` is still this session's ownership under `epoch`
    /// (same `create_revision`, same lease), do `ops`. The answer's range 0 is the owner key
    /// (read when the compare failed), then `also` in order. An epoch that cannot be one is
    /// refused with the current owner, without a txn.
    fn owned_txn(
        &mut self,
        pair: &str,
        epoch: u64,
        ops: Vec<serde_json::Value>,
        also: &[&str],
    ) -> Result<TxnResponse, ArbiterError> {
        let s = self.session()?;
        let deadline = self.deadline();
        let owner_key = self.owner_key(pair);
        let Some(rev) = valid_epoch(epoch) else {
            let current = self.owner_now(deadline, &owner_key)?;
            return Err(ArbiterError::NotOwner(current));
        };
        let mut reads = vec![op_range(&owner_key)];
        reads.extend(also.iter().map(|k| op_range(k)));
        self.txn(
            deadline,
            txn(
                vec![cmp_create(&owner_key, rev), cmp_lease(&owner_key, s.lease)],
                ops,
                reads,
            ),
        )
    }

    /// The owner in a failed [`owned_txn`](Self::owned_txn)'s answer.
    fn owner_in(r: &TxnResponse) -> Result<Option<Ownership>, ArbiterError> {
        r.range_kv(0)
            .map_err(protocol)?
            .map(Self::ownership)
            .transpose()
    }
}

fn epoch_of(revision: i64) -> Result<u64, ArbiterError> {
    u64::try_from(revision)
        .ok()
        .filter(|&e| e > 0)
        .ok_or_else(|| ArbiterError::Protocol(format!("revision {revision} is not a valid epoch")))
}

/// An epoch as a revision to compare with; 0 would compare equal to "absent", and no ownership
/// has it.
fn valid_epoch(epoch: u64) -> Option<i64> {
    i64::try_from(epoch).ok().filter(|&e| e > 0)
}

fn protocol(e: String) -> ArbiterError {
    ArbiterError::Protocol(e)
}

/// etcd counts lease TTLs in whole seconds: round up, so the lease never lasts less than asked.
fn whole_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.clamp(1, i64::MAX as u64) as i64
}

impl Arbiter for EtcdArbiter {
    fn describe(&self) -> String {
        endpoint::describe(self.client.endpoints())
    }

    fn holder(&self) -> &str {
        &self.holder
    }

    /// Grants a lease of `ttl` rounded up to whole seconds and returns what etcd granted (it
    /// raises TTLs below its minimum). An open session is revoked first, best effort: its pairs
    /// are given up either way, and revoking frees them now rather than a TTL later.
    fn open_session(&mut self, ttl: Duration) -> Result<Duration, ArbiterError> {
        // One deadline for both requests: the call's bound holds here too.
        let deadline = self.deadline();
        if let Err(e) = self.revoke(deadline) {
            log::warn!("could not revoke the previous arbiter session: {e}");
            self.session = None;
        }
        let asked = whole_seconds(ttl);
        let r: GrantResponse = self.client.call(
            deadline,
            "/v3/lease/grant",
            &json!({"TTL": asked.to_string()}),
        )?;
        if !r.error.is_empty() {
            return Err(ArbiterError::Protocol(format!(
                "lease grant refused: {}",
                r.error
            )));
        }
        let lease =
            r.id.filter(|&id| id != 0)
                .ok_or_else(|| ArbiterError::Protocol("lease grant answer without an ID".into()))?;
        if r.ttl <= 0 {
            return Err(ArbiterError::Protocol(format!(
                "lease grant answer with TTL {}",
                r.ttl
            )));
        }
        let granted = Duration::from_secs(r.ttl as u64);
        if r.ttl != asked {
            log::info!(
                "etcd granted a {}s lease for {}s asked (etcd's minimum TTL)",
                r.ttl,
                asked
            );
        }
        self.session = Some(Session {
            lease,
            ttl: granted,
        });
        log::debug!("arbiter session: lease {lease:x}, TTL {granted:?}");
        Ok(granted)
    }

    /// `lease/keepalive`. An answer without a TTL means the lease is gone: [`ArbiterError::LeaseLost`].
    fn renew(&mut self) -> Result<Duration, ArbiterError> {
        let s = self.session()?;
        let deadline = self.deadline();
        let r: KeepAliveAnswer = self.client.call(
            deadline,
            "/v3/lease/keepalive",
            &json!({"ID": s.lease.to_string()}),
        )?;
        let result = r
            .result
            .ok_or_else(|| ArbiterError::Protocol("keepalive answer without a result".into()))?;
        match result.ttl {
            Some(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            _ => Err(ArbiterError::LeaseLost(format!(
                "lease {:x} expired or was revoked (keepalive answered without a TTL)",
                s.lease
            ))),
        }
    }

    fn acquire(&mut self, pair: &str) -> Result<Acquire, ArbiterError> {
        let s = self.session()?;
        let deadline = self.deadline();
        let owner_key = self.owner_key(pair);
        let handover_key = self.handover_key(pair);
        for _ in 0..ACQUIRE_ROUNDS {
            // Free pair: owner and handover both absent.
            let r = self.txn(
                deadline,
                txn(
                    vec![cmp_create(&owner_key, 0), cmp_create(&handover_key, 0)],
                    vec![op_put(&owner_key, &self.holder, s.lease)],
                    vec![op_range(&owner_key), op_range(&handover_key)],
                ),
            )?;
            if r.succeeded {
                // The txn's revision is the revision at which the owner key was created.
                return Ok(Acquire::Won {
                    epoch: epoch_of(r.header.revision)?,
                });
            }
            let owner = r.range_kv(0).map_err(protocol)?.cloned();
            let handover = r.range_kv(1).map_err(protocol)?.cloned();
            if let Some(kv) = owner {
                let owner = Self::ownership(&kv)?;
                if owner.holder == self.holder && kv.lease == s.lease {
                    return Ok(Acquire::Won { epoch: owner.epoch });
                }
                let ttl_left = self.ttl_left(deadline, kv.lease);
                return Ok(Acquire::Held { owner, ttl_left });
            }
            let Some(kv) = handover else {
                return Err(ArbiterError::Protocol(format!(
                    "txn on {owner_key} failed, yet neither it nor {handover_key} exists"
                )));
            };
            let to = unb64(&kv.value).map_err(protocol)?;
            // Our own handover that nobody claimed (the handoff failed before the successor
            // took the pair): take it back, atomically with the check that it is still ours.
            if to != self.holder && kv.lease == s.lease {
                let r = self.txn(
                    deadline,
                    txn(
                        vec![cmp_create(&owner_key, 0), cmp_lease(&handover_key, s.lease)],
                        vec![
                            op_put(&owner_key, &self.holder, s.lease),
                            op_delete(&handover_key),
                        ],
                        vec![],
                    ),
                )?;
                if r.succeeded {
                    return Ok(Acquire::Won {
                        epoch: epoch_of(r.header.revision)?,
                    });
                }
                continue;
            }
            if to != self.holder {
                return Ok(Acquire::HandoverPending { to });
            }
            // Handed over to us: take it and consume the handover in one step.
            let r = self.txn(
                deadline,
                txn(
                    vec![
                        cmp_create(&owner_key, 0),
                        cmp_value(&handover_key, &self.holder),
                    ],
                    vec![
                        op_put(&owner_key, &self.holder, s.lease),
                        op_delete(&handover_key),
                    ],
                    vec![],
                ),
            )?;
            if r.succeeded {
                return Ok(Acquire::Won {
                    epoch: epoch_of(r.header.revision)?,
                });
            }
            // Changed in between (the handing-over session ended, someone took the pair): look again.
        }
        Err(ArbiterError::Unavailable(format!(
            "{pair}: ownership kept changing during {ACQUIRE_ROUNDS} rounds of acquire"
        )))
    }

    /// Deletes the owner key if it still is this session's ownership under `epoch` (same
    /// `create_revision`, same lease), in one txn.
    fn release(&mut self, pair: &str, epoch: u64) -> Result<(), ArbiterError> {
        let owner_key = self.owner_key(pair);
        let r = self.owned_txn(pair, epoch, vec![op_delete(&owner_key)], &[])?;
        if r.succeeded {
            return Ok(());
        }
        Err(ArbiterError::NotOwner(Self::owner_in(&r)?))
    }

    /// In one txn: if the owner key is still this session's ownership under `epoch`, delete it
    /// and put the handover key (successor's name, this session's lease).
    fn hand_over(&mut self, pair: &str, epoch: u64, successor: &str) -> Result<(), ArbiterError> {
        let lease = self.session()?.lease;
        let owner_key = self.owner_key(pair);
        let handover_key = self.handover_key(pair);
        let ops = vec![
            op_delete(&owner_key),
            op_put(&handover_key, successor, lease),
        ];
        let r = self.owned_txn(pair, epoch, ops, &[&handover_key])?;
        if r.succeeded {
            return Ok(());
        }
        let owner = Self::owner_in(&r)?;
        let handover = r.range_kv(1).map_err(protocol)?;
        // Our own earlier try got through (its answer was lost, this is the retry): done.
        if owner.is_none() {
            if let Some(kv) = handover {
                if kv.lease == lease && unb64(&kv.value).map_err(protocol)? == successor {
                    return Ok(());
                }
            }
        }
        Err(ArbiterError::NotOwner(owner))
    }

    fn owner(&mut self, pair: &str) -> Result<Option<(Ownership, Option<Duration>)>, ArbiterError> {
        let deadline = self.deadline();
        let owner_key = self.owner_key(pair);
        let r: wire::RangeResponse = self.client.call(
            deadline,
            "/v3/kv/range",
            &json!({"key": wire::b64(&owner_key)}),
        )?;
        let Some(kv) = r.kvs.first() else {
            return Ok(None);
        };
        let owner = Self::ownership(kv)?;
        let lease = kv.lease;
        Ok(Some((owner, self.ttl_left(deadline, lease))))
    }

    /// `lease/revoke`. A lease that is already gone counts as revoked.
    fn close_session(&mut self) -> Result<(), ArbiterError> {
        let deadline = self.deadline();
        self.revoke(deadline)
    }

    /// In one txn: if the owner key is still this session's ownership under `epoch`, put the
    /// replica key (no lease: a backup reads it after this owner is gone).
    fn set_replica(&mut self, pair: &str, epoch: u64, link: &str) -> Result<(), ArbiterError> {
        let ops = vec![op_put(&self.replica_key(pair), link, 0)];
        let r = self.owned_txn(pair, epoch, ops, &[])?;
        if r.succeeded {
            return Ok(());
        }
        Err(ArbiterError::NotOwner(Self::owner_in(&r)?))
    }

    fn replica(&mut self, pair: &str) -> Result<Option<String>, ArbiterError> {
        let deadline = self.deadline();
        let r: wire::RangeResponse = self.client.call(
            deadline,
            "/v3/kv/range",
            &json!({"key": wire::b64(&self.replica_key(pair))}),
        )?;
        r.kvs
            .first()
            .map(|kv| unb64(&kv.value).map_err(protocol))
            .transpose()
    }
}

impl EtcdArbiter {
    /// Revokes the session's lease, if any; a lease already gone counts as revoked.
    fn revoke(&mut self, deadline: Instant) -> Result<(), ArbiterError> {
        let Some(s) = self.session else {
            return Ok(());
        };
        match self.client.call::<serde_json::Value>(
            deadline,
            "/v3/lease/revoke",
            &json!({"ID": s.lease.to_string()}),
        ) {
            Ok(_) | Err(ArbiterError::LeaseLost(_)) => {
                self.session = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn owner_now(
        &mut self,
        deadline: Instant,
        owner_key: &str,
    ) -> Result<Option<Ownership>, ArbiterError> {
        let r: wire::RangeResponse = self.client.call(
            deadline,
            "/v3/kv/range",
            &json!({"key": wire::b64(owner_key)}),
        )?;
        r.kvs.first().map(Self::ownership).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn default_holder_is_unique_and_names_the_process() {
        let a = default_holder();
        let b = default_holder();
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }

    #[test]
    fn keys_and_describe() {
        let a = EtcdArbiter::from_url(
            "etcd://127.0.0.1:2379,[::1]:2379",
            "h",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(a.owner_key("p1"), "/vmm-takeover/pairs/p1/owner");
        assert_eq!(a.handover_key("p1"), "/vmm-takeover/pairs/p1/handover");
        assert_eq!(a.describe(), "etcd://127.0.0.1:2379,[::1]:2379");
        let a = a.with_prefix("/fleet-b/");
        assert_eq!(a.owner_key("p1"), "/fleet-b/pairs/p1/owner");
    }

    #[test]
    fn calls_needing_a_session_say_so() {
        let mut a =
            EtcdArbiter::from_url("etcd://127.0.0.1:1", "h", Duration::from_secs(1)).unwrap();
        assert_eq!(a.renew(), Err(ArbiterError::NoSession));
        assert_eq!(a.acquire("p"), Err(ArbiterError::NoSession));
        assert_eq!(a.hand_over("p", 3, "x"), Err(ArbiterError::NoSession));
        assert_eq!(a.release("p", 3), Err(ArbiterError::NoSession));
        assert_eq!(a.close_session(), Ok(()));
    }
}
