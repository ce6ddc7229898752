// SPDX-License-Identifier: Apache-2.0
//! The state machines of both ends of the link: pure functions, no I/O.
//!
//! - [`backup::step`]: every reason a standby guest can start is a row of its table.
//! - [`source::step`]: the planned handoff as a transaction and the orderly stop, and
//!   [`source::conn_step`]: one backup connection on the source.
//!
//! The subscribers turn epoll readiness, timers, hook results and arbiter answers into inputs and
//! carry out the actions, in order; they decide nothing themselves. `docs/DESIGN.md` shows the
//! tables.

pub mod backup;
pub mod source;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod table_tests;

use crate::hook::TakeoverReason;

/// How a socket failed, classified from its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketFailure {
    /// ECONNRESET, ECONNABORTED, EPIPE.
    Reset,
    /// ETIMEDOUT.
    TimedOut,
    /// EHOSTUNREACH, ENETUNREACH, ENETDOWN, EHOSTDOWN.
    Unreachable,
    /// ECONNREFUSED (only meaningful before arming).
    Refused,
    /// Anything else.
    Other,
}

impl SocketFailure {
    /// Classifies a raw errno.
    pub fn from_errno(errno: i32) -> SocketFailure {
        match errno {
            libc::ECONNRESET | libc::ECONNABORTED | libc::EPIPE => SocketFailure::Reset,
            libc::ETIMEDOUT => SocketFailure::TimedOut,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ENETDOWN | libc::EHOSTDOWN => {
                SocketFailure::Unreachable
            }
            libc::ECONNREFUSED => SocketFailure::Refused,
            _ => SocketFailure::Other,
        }
    }

    /// The takeover reason an armed link's failure maps to.
    pub fn reason(self) -> TakeoverReason {
        match self {
            SocketFailure::Reset => TakeoverReason::Reset,
            SocketFailure::TimedOut => TakeoverReason::TimedOut,
            SocketFailure::Unreachable => TakeoverReason::Unreachable,
            // A refusal on an established connection cannot happen; treat it as any other error.
            SocketFailure::Refused | SocketFailure::Other => TakeoverReason::LinkError,
        }
    }
}

/// A short, fixed-capacity list of actions, in the order they must be carried out. No allocation:
/// a step runs for every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actions<A: Copy, const N: usize = 4> {
    items: [Option<A>; N],
}

impl<A: Copy, const N: usize> Actions<A, N> {
    /// No action.
    pub const NONE: Self = Actions { items: [None; N] };

    /// The actions of `list`, in order.
    ///
    /// # Panics
    /// If `list` holds more than `N` actions (a bug in a table, caught by its tests).
    pub fn of(list: &[A]) -> Self {
        assert!(list.len() <= N, "a step has at most {N} actions");
        let mut items = [None; N];
        for (slot, a) in items.iter_mut().zip(list) {
            *slot = Some(*a);
        }
        Actions { items }
    }

    /// The actions, in order.
    pub fn iter(&self) -> impl Iterator<Item = A> + '_ {
        self.items.iter().map_while(|a| *a)
    }

    /// Whether there is no action.
    pub fn is_empty(&self) -> bool {
        self.items[0].is_none()
    }

    /// Whether `pred` holds for one of the actions.
    pub fn any(&self, pred: impl Fn(&A) -> bool) -> bool {
        self.iter().any(|a| pred(&a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classification() {
        use SocketFailure as F;
        for (errno, f) in [
            (libc::ECONNRESET, F::Reset),
            (libc::EPIPE, F::Reset),
            (libc::ETIMEDOUT, F::TimedOut),
            (libc::EHOSTUNREACH, F::Unreachable),
            (libc::ENETUNREACH, F::Unreachable),
            (libc::ECONNREFUSED, F::Refused),
            (libc::EIO, F::Other),
            (0, F::Other),
        ] {
            assert_eq!(F::from_errno(errno), f, "errno {errno}");
        }
        assert_eq!(F::Refused.reason(), TakeoverReason::LinkError);
        assert_eq!(F::Reset.reason(), TakeoverReason::Reset);
    }

    #[test]
    fn actions_keep_their_order() {
        let a = Actions::<u8, 3>::of(&[3, 1, 2]);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 1, 2]);
        assert!(Actions::<u8, 3>::NONE.is_empty());
        assert!(a.any(|&x| x == 1));
    }
}
