// SPDX-License-Identifier: Apache-2.0
//! Data in flight suspends keepalive: why the source sets TCP_USER_TIMEOUT.
//!
//! The source sends heartbeats (`--heartbeat 100ms`), so when the backup's host dies (its end of
//! the link goes down) the source's socket holds unacknowledged data. The kernel does not send
//! keepalive probes while data is unacknowledged; the retransmission timer rules instead, and
//! without TCP_USER_TIMEOUT it gives up only after `tcp_retries2` (15 → about 15 minutes). With
//! the default `--user-timeout auto` (= the keepalive bound) the source reports `backup-lost`
//! within the bound.
//!
//! Needs root (network namespaces); otherwise each test prints `SKIPPED: <why>` and returns
//! (and fails under `CI=true`).
//! The two tests share nothing and run in parallel.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::time::Duration;

use common::*;
use netns::*;

const KEEPALIVE: &str = "1:1:3";
const BOUND: Duration = Duration::from_secs(4);

/// Starts a heartbeat-mode pair, cuts the backup's link, and returns the pair and the cut.
fn cut_backup(tag: &str, source_flags: &[&str]) -> Option<(Pair, FaultTime)> {
    let cfg =
        Config::heartbeat(KEEPALIVE, Duration::from_millis(100), 3).source_flags(source_flags);
    let pair = match Pair::start(tag, &cfg) {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    // Let a few heartbeats go through so the link is in its steady state.
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(pair.source.count("backup-lost"), 0);
    let cut = pair.hosts.cut_backup_link().unwrap();
    // The backup's own view (no heartbeats) is not what this test is about, but it must be sane.
    let ev = pair.backup.wait_event("takeover", EVENT_TIMEOUT);
    assert_eq!(ev["reason"], "heartbeat-timeout", "{ev}");
    assert!(ev["detected_at_unix_us"].as_u64().unwrap() >= cut.before_us);
    Some((pair, cut))
}

#[test]
fn data_in_flight_without_user_timeout_keeps_a_dead_backup_for_minutes() {
    let Some((mut pair, cut)) = cut_backup("dif-off", &["--user-timeout", "off"]) else {
        return;
    };
    let ka = &pair.joined["keepalive"];
    assert!(ka["user_timeout_ms"].is_null(), "{ka}");
    // Keepalive alone would notice an idle dead peer within 4 s; with heartbeats unacknowledged
    // it never runs. Three bounds of silence show it (the real figure is ~15 min).
    let until = Duration::from_micros(cut.before_us) + 3 * BOUND;
    let left = until.saturating_sub(Duration::from_micros(now_us()));
    let lost = pair.source.try_wait_event("backup-lost", left);
    assert!(
        lost.is_none(),
        "backup-lost without TCP_USER_TIMEOUT: {lost:?}; source events: {:?}",
        pair.source.all_events()
    );
    assert!(now_us() >= cut.before_us + 3 * BOUND.as_micros() as u64);
    assert!(pair.source.running(), "{:?}", pair.source.event_names());
    println!(
        "user-timeout off: no backup-lost {} us after the backup's link went down",
        now_us() - cut.before_us
    );
}

#[test]
fn data_in_flight_with_default_user_timeout_drops_a_dead_backup_within_bound() {
    let Some((pair, cut)) = cut_backup("dif-auto", &[]) else {
        return;
    };
    let ka = &pair.joined["keepalive"];
    assert_eq!(ka["user_timeout_ms"], 4000, "{ka}");
    // Measured ~4.1–4.8 s. The overshoot comes from the veth: the source's end lost carrier, so
    // its ARP entry was flushed; resolution fails 3 s later, the kernel sends ICMP host-unreachable
    // to the local socket ("No route to host") and the RFC 6069 RTO revert re-arms the retransmit
    // timer without clamping it to TCP_USER_TIMEOUT (up to one backed-off RTO, ~0.8 s here).
    let margin = Duration::from_millis(1500);
    let lost = pair
        .source
        .try_wait_event("backup-lost", BOUND + margin + Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "no backup-lost; source events: {:?}",
                pair.source.all_events()
            )
        });
    let at = lost["at_unix_us"].as_u64().unwrap();
    let after = at as i64 - cut.before_us as i64;
    println!("user-timeout auto: backup-lost {after} us after the cut ({lost})");
    // TCP_USER_TIMEOUT counts from the first unacknowledged heartbeat, sent after the cut.
    assert!(
        at + TIMER_SLACK_US >= cut.after_us + BOUND.as_micros() as u64,
        "backup-lost {after} us after the cut: before TCP_USER_TIMEOUT could expire"
    );
    assert!(
        after <= (BOUND + margin).as_micros() as i64,
        "backup-lost {after} us after the cut: later than bound + {margin:?}"
    );
}
