// SPDX-License-Identifier: Apache-2.0
//! `--metrics ADDR`: the Prometheus (OpenMetrics text) endpoint, served by a thread of its own.
//!
//! Each scrape builds a fresh `prometheus-client` registry from the atomics in [`Ops`] and the
//! core's counters: the loop only ever bumps atomics, so a slow, stuck or hostile scraper costs
//! this thread time and never the loop a heartbeat. Each scrape has a thread of its own (a few at
//! most) and short socket timeouts: a scraper that connects and never reads (or never asks) holds
//! only its own connection, for at most those timeouts.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use log::error;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vmm_takeover_core::counters::GapSnapshot;
use vmm_takeover_core::hook::TakeoverReason;

use super::{LinkState, Ops};

/// How long one scrape may take to send its request and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;

/// The heartbeat-gap histogram as `prometheus-client` encodes one, from a snapshot.
#[derive(Debug)]
struct Gaps(GapSnapshot);

impl EncodeMetric for Gaps {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &self.0.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

/// The registry of one scrape.
pub fn registry(o: &Ops) -> Registry {
    let mut r = Registry::with_prefix_and_labels(
        "vmm_takeover",
        [
            ("role".into(), o.role().into()),
            ("pair".into(), o.pair_id.clone().into()),
        ]
        .into_iter(),
    );
    // A gauge at 1 rather than an OpenMetrics `info`: promtool's text parser and older
    // scrapers know only the classic types.
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("protocol", vmm_takeover_core::auth::VERSION.to_string()),
        ])
        .set(1);
    r.register(
        "build_info",
        "Version and protocol of this process (always 1)",
        build,
    );
    let state = o.state();
    let states = Family::<Labels, Gauge>::default();
    for s in LinkState::of_role(o.role()) {
        states
            .get_or_create(&vec![("state", s.as_str().to_string())])
            .set(i64::from(*s == state));
    }
    r.register(
        "link_state",
        "1 for the state the pair's link is in (source: unprotected, protected, …; backup: \
         connecting, armed, …), 0 for the others",
        states,
    );
    r.register(
        "state_since_timestamp_seconds",
        "When the link state last changed (Unix time)",
        ConstGauge::new(o.state_since_unix_us.load(Relaxed) as f64 / 1e6),
    );
    r.register(
        "links_armed",
        "Links armed since start (source: backups that joined; backup: times this backup armed)",
        counter(o.links_armed.load(Relaxed)),
    );
    let armed = o.links_armed.load(Relaxed);
    r.register(
        "reconnects",
        "Links armed again after the first",
        counter(armed.saturating_sub(1)),
    );
    if o.role() == "source" {
        r.register(
            "backups_armed",
            "Backups armed now: the guest is protected when it is at least 1",
            ConstGauge::new(o.backups.load(Relaxed) as i64),
        );
    } else if let Some(t) = o.armed_since_unix_us.get() {
        r.register(
            "armed_since_timestamp_seconds",
            "When the current link armed (Unix time); absent while not armed",
            ConstGauge::new(t as f64 / 1e6),
        );
    }
    if let Some(c) = o.counters() {
        if o.role() == "source" {
            r.register(
                "heartbeats_sent",
                "HEARTBEAT frames written (one per armed backup per beat)",
                counter(c.heartbeats_sent()),
            );
            let rejected =
                Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
            for (kind, n) in c.rejected_by_kind() {
                rejected
                    .get_or_create(&vec![("reason", kind.to_string())])
                    .inc_by(n);
            }
            r.register(
                "rejected_peers",
                "Connections refused or closed before they armed, by reason (auth, \
                 pair-mismatch, version, busy, flood, timeout, …)",
                rejected,
            );
        } else {
            r.register(
                "heartbeats_received",
                "HEARTBEAT frames received",
                counter(c.heartbeats_received()),
            );
            let g = c.gaps();
            r.register(
                "heartbeat_gap_max_ratio",
                "Longest gap between heartbeats on the current link, as a fraction of the \
                 deadline (interval x misses): 1 is a takeover",
                ConstGauge::new(g.max),
            );
            r.register(
                "heartbeat_gap_ratio",
                "Gaps between heartbeats as fractions of the deadline",
                Gaps(g),
            );
        }
        let last = c.last_heartbeat_unix_us();
        if last > 0 {
            r.register(
                "last_heartbeat_timestamp_seconds",
                "When the last heartbeat was sent (source) or received (backup), Unix time",
                ConstGauge::new(last as f64 / 1e6),
            );
        }
    }
    if o.role() == "backup" {
        let takeovers = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
        for (reason, n) in TakeoverReason::ALL.iter().zip(&o.takeovers) {
            takeovers
                .get_or_create(&vec![("reason", reason.as_str().to_string())])
                .inc_by(n.load(Relaxed));
        }
        r.register(
            "takeovers",
            "Takeovers decided, by reason (peer-closed, reset, timed-out, unreachable, handoff, \
             heartbeat-timeout, link-error)",
            takeovers,
        );
        if let Some(d) = o.last_detection_us.get() {
            r.register(
                "last_detection_seconds",
                "The last takeover: from the source's last sign of life (last heartbeat, or \
                 arming) to the verdict",
                ConstGauge::new(d as f64 / 1e6),
            );
        }
        if let Some(d) = o.last_vm_start_us.get() {
            r.register(
                "last_vm_start_seconds",
                "The last takeover: how long vm_start took",
                ConstGauge::new(d as f64 / 1e6),
            );
        }
    }
    if let Some(left) = o.lease_left_ms() {
        r.register(
            "lease_remaining_seconds",
            "Arbiter lease time left as of the last renewal (0: lost)",
            ConstGauge::new(left as f64 / 1e3),
        );
    }
    if let Some(e) = o.epoch.get() {
        r.register(
            "lease_epoch",
            "Fencing epoch of the pair held (source) or won (backup)",
            ConstGauge::new(e as i64),
        );
    }
    if o.guest_kind.get().is_some() {
        r.register(
            "guest_running",
            "1 while the local guest runs",
            ConstGauge::new(i64::from(o.guest_running.load(Relaxed))),
        );
    }
    if o.replica.seen.load(Relaxed) {
        let rp = &o.replica;
        r.register(
            "replica_connected",
            "1 while the replication stream is up",
            ConstGauge::new(i64::from(rp.connected.load(Relaxed))),
        );
        r.register(
            "checkpoints_discarded",
            "Checkpoints dropped whole because they never completed (never applied)",
            counter(rp.discarded.load(Relaxed)),
        );
        if o.role() == "source" {
            r.register(
                "checkpoints",
                "Checkpoints the backup acknowledged",
                counter(rp.checkpoints.load(Relaxed)),
            );
            r.register(
                "checkpoint_bytes",
                "Bytes of acknowledged checkpoints on the wire",
                counter(rp.bytes.load(Relaxed)),
            );
            if let Some(p) = rp.last_pause_us.get() {
                r.register(
                    "checkpoint_pause_seconds",
                    "How long the last checkpoint held the guest's vCPU",
                    ConstGauge::new(p as f64 / 1e6),
                );
            }
        }
        if let Some(m) = rp.mark.get() {
            r.register(
                "replica_mark",
                "Source: the guest output released (covered by an acknowledged checkpoint); \
                 backup: the output position a takeover resumes from",
                ConstGauge::new(m as i64),
            );
        }
    }
    r.register(
        "events_dropped",
        "Event lines dropped because stdout was not read",
        counter(o.events_dropped.load(Relaxed)),
    );
    r
}

/// The text of one scrape.
pub fn render(o: &Ops) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &registry(o)) {
        error!("cannot encode metrics: {e}");
    }
    s
}

/// Most scrapes served at once; beyond it a connection gets `503` at once.
const MAX_SCRAPES: usize = 8;

/// Binds `addr` now (so a taken port fails at start) and serves it from a thread, each scrape
/// on a thread of its own (at most [`MAX_SCRAPES`]), so that stuck scrapers hold only their own
/// connections, for at most their timeouts.
pub fn start(addr: SocketAddr, o: &'static Ops) -> io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            super::serve_bounded(
                "metrics",
                l.incoming(),
                MAX_SCRAPES,
                |mut c: TcpStream| {
                    let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = respond(&mut c, "503 Service Unavailable", "text/plain", "");
                },
                move |c| serve(c, o),
            );
        })?;
    Ok(local)
}

fn serve(mut c: TcpStream, o: &Ops) -> io::Result<()> {
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut c,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => respond(
            &mut c,
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &render(o),
        ),
        ("GET", "/") => respond(
            &mut c,
            "200 OK",
            "text/plain",
            "vmm-takeover: metrics at /metrics\n",
        ),
        ("GET", _) => respond(&mut c, "404 Not Found", "text/plain", "not found\n"),
        _ => respond(&mut c, "405 Method Not Allowed", "text/plain", "only GET\n"),
    }
}

fn respond(c: &mut TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    c.flush()
}
