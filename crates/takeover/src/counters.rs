// SPDX-License-Identifier: Apache-2.0
//! What a subscriber counts for metrics: plain atomics, bumped on the event loop and read from
//! any thread (a metrics exporter, a status call). Nothing here ever takes a lock, so a scraper
//! can never hold up a heartbeat.
//!
//! Lifecycle facts (takeovers, joins, leases) are in the notices; these are the things that are
//! too frequent for a notice (heartbeats, the gap histogram) or rate-limited there (rejections).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::RejectCode;

/// Upper bounds of the heartbeat-gap histogram, as fractions of the deadline
/// (`interval × misses`): a gap at 1.0 is a takeover. The last bucket is `+Inf`.
pub const GAP_BUCKETS: [f64; 8] = [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 0.9, 1.0];

/// Why a connection that never armed was refused or closed: the label of the rejection counter.
/// The first eight are the REJECT codes ([`RejectCode::as_str`]).
pub const REJECT_KINDS: [&str; 12] = [
    "pair-mismatch",
    "version",
    "malformed",
    "busy",
    "stopping",
    "unexpected",
    "arbiter",
    "auth",
    // Closed with no REJECT:
    "flood",
    "timeout",
    "closed",
    "error",
];

/// A rejection that is not a REJECT code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The address failed too many handshakes this second (closed unread).
    Flood,
    /// No HELLO (or AUTH) within the handshake timeout.
    Timeout,
    /// EOF before arming.
    Closed,
    /// A socket error before arming.
    Error,
}

/// Either kind of rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// Refused with this REJECT code.
    Code(RejectCode),
    /// Closed without one.
    Closed(Closed),
}

impl RejectKind {
    /// The label, one of [`REJECT_KINDS`].
    pub fn as_str(self) -> &'static str {
        REJECT_KINDS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            RejectKind::Code(c) => c as usize - 1,
            RejectKind::Closed(Closed::Flood) => 8,
            RejectKind::Closed(Closed::Timeout) => 9,
            RejectKind::Closed(Closed::Closed) => 10,
            RejectKind::Closed(Closed::Error) => 11,
        }
    }
}

/// A histogram of heartbeat gaps as fractions of the deadline, lock-free.
#[derive(Debug, Default)]
pub struct GapHistogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; GAP_BUCKETS.len() + 1],
    /// Sum of the observed fractions, in millionths.
    sum_ppm: AtomicU64,
    count: AtomicU64,
    /// Largest fraction since the link last armed, in millionths.
    max_ppm: AtomicU64,
}

/// A copy of a [`GapHistogram`] (for an exporter).
#[derive(Debug, Clone, PartialEq)]
pub struct GapSnapshot {
    /// `(upper bound, count in this bucket)` (not cumulative, as `prometheus-client` takes
    /// them), ending with `(+Inf, …)`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observed fractions.
    pub sum: f64,
    /// Observations.
    pub count: u64,
    /// Largest fraction since the link last armed (0 before the first heartbeat).
    pub max: f64,
}

impl GapHistogram {
    fn observe(&self, gap: Duration, deadline: Duration) {
        let ppm = if deadline.is_zero() {
            u64::MAX / 2
        } else {
            (gap.as_nanos().saturating_mul(1_000_000) / deadline.as_nanos())
                .min(u128::from(u64::MAX) / 2) as u64
        };
        let frac = ppm as f64 / 1e6;
        let i = GAP_BUCKETS
            .iter()
            .position(|&b| frac <= b)
            .unwrap_or(GAP_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ppm.fetch_add(ppm.min(1 << 40), Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.max_ppm.fetch_max(ppm, Relaxed);
    }

    /// A copy. Fields are read one at a time: a scrape racing a heartbeat may see the count one
    /// ahead of a bucket, which Prometheus tolerates.
    pub fn snapshot(&self) -> GapSnapshot {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(GAP_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            count += n;
            buckets.push((GAP_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        GapSnapshot {
            buckets,
            sum: self.sum_ppm.load(Relaxed) as f64 / 1e6,
            count,
            max: self.max_ppm.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// The counters of one source or backup (see the module docs). Shared as an `Arc`.
#[derive(Debug, Default)]
pub struct LinkCounters {
    heartbeats_sent: AtomicU64,
    heartbeats_received: AtomicU64,
    last_heartbeat_unix_us: AtomicU64,
    rejected: [AtomicU64; REJECT_KINDS.len()],
    gap: GapHistogram,
}

impl LinkCounters {
    pub(crate) fn sent(&self, n: u64) {
        self.heartbeats_sent.fetch_add(n, Relaxed);
        self.stamp();
    }

    pub(crate) fn received(&self, gap: Duration, deadline: Option<Duration>) {
        self.heartbeats_received.fetch_add(1, Relaxed);
        self.stamp();
        if let Some(d) = deadline {
            self.gap.observe(gap, d);
        }
    }

    /// A new link armed: the largest gap starts again.
    pub(crate) fn armed(&self) {
        self.gap.max_ppm.store(0, Relaxed);
    }

    pub(crate) fn rejected(&self, kind: RejectKind) {
        self.rejected[kind.index()].fetch_add(1, Relaxed);
    }

    fn stamp(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.last_heartbeat_unix_us.store(now, Relaxed);
    }

    /// HEARTBEAT frames written (a source: one per joined backup per beat).
    pub fn heartbeats_sent(&self) -> u64 {
        self.heartbeats_sent.load(Relaxed)
    }

    /// HEARTBEAT frames received (a backup).
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received.load(Relaxed)
    }

    /// When the last heartbeat was sent or received, µs since the Unix epoch (0: never).
    pub fn last_heartbeat_unix_us(&self) -> u64 {
        self.last_heartbeat_unix_us.load(Relaxed)
    }

    /// Rejections so far, per kind, in the order of [`REJECT_KINDS`].
    pub fn rejected_by_kind(&self) -> [(&'static str, u64); REJECT_KINDS.len()] {
        std::array::from_fn(|i| (REJECT_KINDS[i], self.rejected[i].load(Relaxed)))
    }

    /// The heartbeat gaps seen by a backup in heartbeat mode.
    pub fn gaps(&self) -> GapSnapshot {
        self.gap.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_kinds_line_up_with_the_codes() {
        for code in [
            RejectCode::PairMismatch,
            RejectCode::Version,
            RejectCode::Malformed,
            RejectCode::Busy,
            RejectCode::Stopping,
            RejectCode::Unexpected,
            RejectCode::Arbiter,
            RejectCode::Auth,
        ] {
            assert_eq!(RejectKind::Code(code).as_str(), code.as_str());
        }
        assert_eq!(RejectKind::Closed(Closed::Flood).as_str(), "flood");
        assert_eq!(RejectKind::Closed(Closed::Error).as_str(), "error");
    }

    #[test]
    fn gaps_land_in_their_buckets_and_the_max_restarts_on_arming() {
        let c = LinkCounters::default();
        let d = Duration::from_millis(100);
        c.received(Duration::from_millis(10), Some(d)); // 0.1: bucket 0.1
        c.received(Duration::from_millis(40), Some(d)); // 0.4: bucket 0.5
        c.received(Duration::from_millis(150), Some(d)); // 1.5: +Inf
        c.received(Duration::from_millis(1), None); // no deadline: counted, not observed
        let s = c.gaps();
        assert_eq!(c.heartbeats_received(), 4);
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.05, 0));
        assert_eq!(s.buckets[1], (0.1, 1));
        assert_eq!(s.buckets[4], (0.5, 1));
        assert_eq!(s.buckets[7], (1.0, 0));
        assert_eq!(s.buckets[8], (f64::INFINITY, 1));
        assert!((s.sum - 2.0).abs() < 1e-6, "{}", s.sum);
        assert!((s.max - 1.5).abs() < 1e-6, "{}", s.max);
        c.armed();
        assert_eq!(c.gaps().max, 0.0);
        assert_eq!(c.gaps().count, 3);
    }
}
