// SPDX-License-Identifier: Apache-2.0
//! Periodic `guest` events for a guest living in this process: the evidence that it runs (or not).

use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;
use serde_json::json;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;
use vmm_takeover_guest::StandbyGuest;

use crate::events::emit;

/// Emits `{"event":"guest","kind":…,"running":…,"counter":…,"exits":…}` every `every`. With
/// replication (`output_commit: true`) the counter is the guest's output as released: covered by
/// a checkpoint the backup acknowledged, never past it.
pub struct GuestReport {
    guest: StandbyGuest,
    timer: TimerFd,
    every: Duration,
}

impl GuestReport {
    /// A reporter for `guest`.
    pub fn new(guest: StandbyGuest, every: Duration) -> std::io::Result<Self> {
        Ok(GuestReport {
            guest,
            timer: TimerFd::new()?,
            every,
        })
    }

    /// Emits one `guest` event now.
    pub fn report(guest: &StandbyGuest) {
        emit(
            "guest",
            json!({"kind": guest.kind(), "real": guest.is_real(), "running": guest.is_running(),
                   "counter": crate::replica::reported_counter(guest),
                   "output_commit": crate::replica::output_committed(),
                   "exits": guest.exits()}),
        );
    }
}

impl MutEventSubscriber for GuestReport {
    fn init(&mut self, ops: &mut EventOps) {
        // Periodic and never re-armed, so a readable event always has an expiration to read:
        // the blocking `wait` below cannot block.
        if let Err(e) = self.timer.reset(Duration::from_nanos(1), Some(self.every)) {
            error!("guest report timer: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            error!("cannot register the guest report timer: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.timer.wait().unwrap_or(0) > 0 {
            Self::report(&self.guest);
        }
    }
}
