// SPDX-License-Identifier: Apache-2.0
//! Signals as event-manager events: handlers only write a byte to a socket pair, and the loop
//! reads it, so nothing but the loop itself ever touches VMM state.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;
use vmm_sys_util::epoll::EventSet;

/// What a group of signals asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR1.
    Handoff,
    /// SIGHUP: operators send it for reloads and log rotation; it must never cost a failover.
    Hangup,
}

/// Subscriber that turns signals into calls of `on_signal` on the loop.
pub struct Signals {
    pipes: Vec<(UnixStream, SignalKind)>,
    on_signal: Box<dyn FnMut(SignalKind)>,
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT (Stop), SIGUSR1 (Handoff) and SIGHUP (Hangup).
    pub fn install(on_signal: Box<dyn FnMut(SignalKind)>) -> io::Result<Signals> {
        let mut pipes = Vec::new();
        for (sigs, kind) in [
            (
                &[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT][..],
                SignalKind::Stop,
            ),
            (&[signal_hook::consts::SIGUSR1][..], SignalKind::Handoff),
            (&[signal_hook::consts::SIGHUP][..], SignalKind::Hangup),
        ] {
            let (rx, tx) = UnixStream::pair()?;
            rx.set_nonblocking(true)?;
            for &s in sigs {
                signal_hook::low_level::pipe::register(s, tx.try_clone()?)?;
            }
            pipes.push((rx, kind));
        }
        Ok(Signals { pipes, on_signal })
    }
}

impl MutEventSubscriber for Signals {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, (rx, _)) in self.pipes.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(rx, i as u32, EventSet::IN)) {
                error!("cannot register signal pipe {}: {e:?}", rx.as_raw_fd());
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some((rx, kind)) = self.pipes.get(events.data() as usize) else {
            return;
        };
        let mut buf = [0u8; 64];
        let mut got = false;
        while let Ok(n) = (&*rx).read(&mut buf) {
            if n == 0 {
                break;
            }
            got = true;
        }
        if got {
            (self.on_signal)(*kind);
        }
    }
}
