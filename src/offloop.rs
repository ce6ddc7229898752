// SPDX-License-Identifier: Apache-2.0
//! Runs one slow job off the event loop and delivers its result back on the loop via an eventfd.

use std::os::fd::AsRawFd;
use std::sync::mpsc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Done = Box<dyn FnMut(Result<(), String>)>;

/// A subscriber owning the completion eventfd of a background job.
pub struct OffLoop {
    evt: EventFd,
    rx: Option<mpsc::Receiver<Result<(), String>>>,
    done: Done,
}

impl OffLoop {
    /// `done` is called on the loop with the job's result.
    pub fn new(done: Done) -> std::io::Result<OffLoop> {
        Ok(OffLoop {
            evt: EventFd::new(EFD_NONBLOCK)?,
            rx: None,
            done,
        })
    }

    /// Starts `job` on a thread of its own.
    pub fn start<F>(&mut self, job: F)
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.rx = Some(rx);
        let evt = match self.evt.try_clone() {
            Ok(e) => e,
            Err(e) => return (self.done)(Err(format!("eventfd: {e}"))),
        };
        let spawned = std::thread::Builder::new()
            .name("off-loop".into())
            .spawn(move || {
                let _ = tx.send(job());
                let _ = evt.write(1);
            });
        if let Err(e) = spawned {
            (self.done)(Err(format!("cannot spawn thread: {e}")));
        }
    }
}

impl MutEventSubscriber for OffLoop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            error!("cannot register eventfd {}: {e:?}", self.evt.as_raw_fd());
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        if let Some(r) = self.rx.as_ref().and_then(|rx| rx.try_recv().ok()) {
            (self.done)(r);
        }
    }
}
