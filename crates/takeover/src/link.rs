// SPDX-License-Identifier: Apache-2.0
//! The backup's link state machine: pure, no I/O.
//!
//! `(LinkState, LinkEvent) -> (LinkState, Verdict)`. The backup subscriber turns epoll events into
//! [`LinkEvent`]s and carries out the [`Verdict`]s; every decision about taking over is made here.
//! The link *arms* only after the handshake: before that, every failure means "retry".

use crate::hook::TakeoverReason;

/// Where the backup's link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// No connection; a connect attempt is pending or under way.
    Connecting,
    /// Connected, HELLO sent, waiting for WELCOME.
    Handshaking,
    /// Handshake done: a loss of the link now means takeover.
    Armed,
    /// The source stood down in order. Terminal.
    StoodDown,
    /// The backup took over. Terminal: the hook runs at most once.
    TakenOver,
}

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
}

/// What happened on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkEvent {
    /// The non-blocking connect completed; HELLO was sent.
    Connected,
    /// A valid WELCOME arrived.
    Welcomed,
    /// A valid HEARTBEAT arrived.
    Heartbeat,
    /// A valid STAND_DOWN arrived.
    StandDown,
    /// A valid HANDOFF arrived.
    Handoff,
    /// Bytes that are not a valid frame, or a valid frame out of place, or a REJECT.
    ProtocolError,
    /// `read` returned 0.
    PeerClosed,
    /// The socket reported an error (SO_ERROR or a failed read/connect).
    Failed(SocketFailure),
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The heartbeat deadline passed with no HEARTBEAT.
    HeartbeatDeadline,
}

/// What the subscriber must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Nothing to do.
    Nothing,
    /// The link just armed: start watching for its loss.
    Arm,
    /// Drop the connection and connect again after a backoff.
    Retry,
    /// The source stopped in order: drop the link, run nothing.
    StandDown,
    /// Run `vm_start`.
    TakeOver(TakeoverReason),
}

/// The reason an armed link's failure maps to.
fn reason_for(failure: SocketFailure) -> TakeoverReason {
    match failure {
        SocketFailure::Reset => TakeoverReason::Reset,
        SocketFailure::TimedOut => TakeoverReason::TimedOut,
        SocketFailure::Unreachable => TakeoverReason::Unreachable,
        // A refusal on an established connection cannot happen; treat it as any other error.
        SocketFailure::Refused | SocketFailure::Other => TakeoverReason::LinkError,
    }
}

/// The transition function.
pub fn step(state: LinkState, event: LinkEvent) -> (LinkState, Verdict) {
    use LinkEvent as E;
    use LinkState as S;
    match (state, event) {
        // Terminal states absorb everything: the hook can never run twice.
        (S::StoodDown, _) => (S::StoodDown, Verdict::Nothing),
        (S::TakenOver, _) => (S::TakenOver, Verdict::Nothing),

        (S::Connecting, E::Connected) => (S::Handshaking, Verdict::Nothing),
        (S::Connecting, E::PeerClosed | E::Failed(_) | E::HandshakeTimeout) => {
            (S::Connecting, Verdict::Retry)
        }
        // Frames or deadlines cannot arrive without a connection; ignore stale ones.
        (S::Connecting, _) => (S::Connecting, Verdict::Nothing),

        (S::Handshaking, E::Welcomed) => (S::Armed, Verdict::Arm),
        // Not armed yet: whatever goes wrong, including a source that stands down or hands off
        // before the handshake completes, is a reason to retry, never to take over.
        (S::Handshaking, E::Connected) => (S::Handshaking, Verdict::Nothing),
        (S::Handshaking, E::HeartbeatDeadline) => (S::Handshaking, Verdict::Nothing),
        (S::Handshaking, _) => (S::Connecting, Verdict::Retry),

        (S::Armed, E::Heartbeat) => (S::Armed, Verdict::Nothing),
        (S::Armed, E::StandDown) => (S::StoodDown, Verdict::StandDown),
        (S::Armed, E::Handoff) => (S::TakenOver, Verdict::TakeOver(TakeoverReason::Handoff)),
        (S::Armed, E::PeerClosed) => (S::TakenOver, Verdict::TakeOver(TakeoverReason::PeerClosed)),
        (S::Armed, E::Failed(f)) => (S::TakenOver, Verdict::TakeOver(reason_for(f))),
        (S::Armed, E::HeartbeatDeadline) => (
            S::TakenOver,
            Verdict::TakeOver(TakeoverReason::HeartbeatTimeout),
        ),
        // A bad frame never causes a takeover: drop the link and reconnect. If the source is
        // alive the link re-arms; if it is dead the backup keeps retrying (safe: no split brain).
        (S::Armed, E::ProtocolError) => (S::Connecting, Verdict::Retry),
        (S::Armed, E::Connected | E::Welcomed | E::HandshakeTimeout) => {
            (S::Armed, Verdict::Nothing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [LinkState; 5] = [
        LinkState::Connecting,
        LinkState::Handshaking,
        LinkState::Armed,
        LinkState::StoodDown,
        LinkState::TakenOver,
    ];

    fn events() -> Vec<LinkEvent> {
        let mut v = vec![
            LinkEvent::Connected,
            LinkEvent::Welcomed,
            LinkEvent::Heartbeat,
            LinkEvent::StandDown,
            LinkEvent::Handoff,
            LinkEvent::ProtocolError,
            LinkEvent::PeerClosed,
            LinkEvent::HandshakeTimeout,
            LinkEvent::HeartbeatDeadline,
        ];
        for f in [
            SocketFailure::Reset,
            SocketFailure::TimedOut,
            SocketFailure::Unreachable,
            SocketFailure::Refused,
            SocketFailure::Other,
        ] {
            v.push(LinkEvent::Failed(f));
        }
        v
    }

    /// The whole table, written out once by hand: the reference the function is checked against.
    fn expected(s: LinkState, e: LinkEvent) -> (LinkState, Verdict) {
        use LinkEvent as E;
        use LinkState as S;
        use TakeoverReason as R;
        use Verdict as V;
        match s {
            S::StoodDown | S::TakenOver => (s, V::Nothing),
            S::Connecting => match e {
                E::Connected => (S::Handshaking, V::Nothing),
                E::PeerClosed | E::Failed(_) | E::HandshakeTimeout => (S::Connecting, V::Retry),
                _ => (S::Connecting, V::Nothing),
            },
            S::Handshaking => match e {
                E::Welcomed => (S::Armed, V::Arm),
                E::Connected | E::HeartbeatDeadline => (S::Handshaking, V::Nothing),
                _ => (S::Connecting, V::Retry),
            },
            S::Armed => match e {
                E::Heartbeat | E::Connected | E::Welcomed | E::HandshakeTimeout => {
                    (S::Armed, V::Nothing)
                }
                E::StandDown => (S::StoodDown, V::StandDown),
                E::Handoff => (S::TakenOver, V::TakeOver(R::Handoff)),
                E::PeerClosed => (S::TakenOver, V::TakeOver(R::PeerClosed)),
                E::Failed(SocketFailure::Reset) => (S::TakenOver, V::TakeOver(R::Reset)),
                E::Failed(SocketFailure::TimedOut) => (S::TakenOver, V::TakeOver(R::TimedOut)),
                E::Failed(SocketFailure::Unreachable) => {
                    (S::TakenOver, V::TakeOver(R::Unreachable))
                }
                E::Failed(_) => (S::TakenOver, V::TakeOver(R::LinkError)),
                E::HeartbeatDeadline => (S::TakenOver, V::TakeOver(R::HeartbeatTimeout)),
                E::ProtocolError => (S::Connecting, V::Retry),
            },
        }
    }

    #[test]
    fn every_state_and_event_matches_the_table() {
        for s in STATES {
            for e in events() {
                assert_eq!(step(s, e), expected(s, e), "state {s:?} event {e:?}");
            }
        }
    }

    #[test]
    fn takeover_only_from_armed() {
        for s in STATES {
            for e in events() {
                if let (_, Verdict::TakeOver(_)) = step(s, e) {
                    assert_eq!(s, LinkState::Armed, "takeover from {s:?} on {e:?}");
                }
            }
        }
    }

    #[test]
    fn protocol_errors_never_take_over() {
        for s in STATES {
            assert!(!matches!(
                step(s, LinkEvent::ProtocolError).1,
                Verdict::TakeOver(_)
            ));
        }
    }

    /// Any sequence of events yields at most one TakeOver: checked over all sequences of length 4.
    #[test]
    fn at_most_one_takeover_in_any_sequence() {
        let ev = events();
        let n = ev.len();
        for i in 0..n.pow(4) {
            let mut s = LinkState::Connecting;
            let mut takeovers = 0;
            let mut k = i;
            for _ in 0..4 {
                let (s2, v) = step(s, ev[k % n]);
                k /= n;
                if matches!(v, Verdict::TakeOver(_)) {
                    takeovers += 1;
                }
                s = s2;
            }
            assert!(takeovers <= 1);
        }
    }

    #[test]
    fn errno_classification() {
        assert_eq!(
            SocketFailure::from_errno(libc::ECONNRESET),
            SocketFailure::Reset
        );
        assert_eq!(
            SocketFailure::from_errno(libc::ETIMEDOUT),
            SocketFailure::TimedOut
        );
        assert_eq!(
            SocketFailure::from_errno(libc::EHOSTUNREACH),
            SocketFailure::Unreachable
        );
        assert_eq!(
            SocketFailure::from_errno(libc::ENETUNREACH),
            SocketFailure::Unreachable
        );
        assert_eq!(
            SocketFailure::from_errno(libc::ECONNREFUSED),
            SocketFailure::Refused
        );
        assert_eq!(SocketFailure::from_errno(libc::EIO), SocketFailure::Other);
    }
}
