// SPDX-License-Identifier: Apache-2.0
//! The backup's state machine: when, and only when, the standby guest may start.
//!
//! The state is a [`Phase`] (what the backup does about the guest) and a [`Link`] (where the
//! heartbeat connection is). `docs/state-machines.md` holds the table; a unit test checks every
//! (state, input) pair against that document.
//!
//! The guest starts ([`Action::StartGuest`]) only from:
//! - an **armed** link (`Watching`, `Up`) that fails (EOF, errno, heartbeat deadline) or carries a
//!   HANDOFF, when no arbiter is configured;
//! - [`Input::ArbiterWon`] in `Arbitrating`, when one is: the link's verdict only asks the arbiter.
//!
//! Nothing before the handshake, no bad frame, no REJECT or EVICT, no local stop and no second
//! verdict can start it, and it starts at most once: every phase after `Starting` is terminal.

use super::{Actions, SocketFailure};
use crate::hook::TakeoverReason;

/// What the backup does about the standby guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Watching the source. A loss of the link is a verdict only once it has armed (`Link::Up`).
    Watching,
    /// The armed link was lost while this backup's own loop was stalled (its timer fired late):
    /// the loss may be the stall's doing (the source dropped or its kernel reset a backup that
    /// did not read), so the backup first redials. If the source answers, it lives: armed again,
    /// no takeover. If it does not, the loss is a verdict for this reason.
    Verifying(TakeoverReason),
    /// The armed link was lost for this reason; the guest starts only once the arbiter grants the
    /// pair. The link is redialled meanwhile: if it arms again, the source lives and the backup
    /// goes back to `Watching`.
    Arbitrating(TakeoverReason),
    /// `vm_start` runs, off the loop.
    Starting(TakeoverReason),
    /// The owner stopped the backup while `vm_start` ran; the hook is being aborted.
    Aborting,
    /// Terminal: nothing will start any more.
    Done(Outcome),
}

/// How a backup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `vm_start` returned success: the standby guest runs.
    Started,
    /// `vm_start` returned an error: the guest is not running.
    StartFailed,
    /// `vm_start` did not return within its deadline: whether the guest runs is unknown.
    StartTimedOut,
    /// The source stood down in order.
    StoodDown,
    /// The source refused this backup for good (wrong pair id, protocol version, ...).
    Rejected,
    /// The owner stopped the backup.
    Stopped,
    /// Another backup won the pair: this one gives up for good, so that it can never start a
    /// second copy later (the winner's guest may outlive the winner's lease).
    Lost,
}

/// Where the heartbeat connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// No socket; the backoff timer is running (or nothing more will be dialled).
    Down,
    /// Non-blocking connect under way.
    Connecting,
    /// Connected, HELLO sent, waiting for WELCOME.
    Handshaking,
    /// Handshake done: the link is armed.
    Up,
}

/// The backup's whole state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct State {
    /// What the backup does about the guest.
    pub phase: Phase,
    /// Where the connection is.
    pub link: Link,
}

impl State {
    /// The state a new backup starts in: about to dial.
    pub const INITIAL: State = State {
        phase: Phase::Watching,
        link: Link::Down,
    };

    /// Whether the link is armed: its loss is a verdict.
    pub fn armed(&self) -> bool {
        self.phase == Phase::Watching && self.link == Link::Up
    }

    /// Whether nothing more will happen.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The backoff timer expired: dial.
    BackoffElapsed,
    /// The non-blocking connect completed and HELLO was sent.
    Connected,
    /// A valid WELCOME arrived.
    Welcomed,
    /// A valid HEARTBEAT arrived.
    Heartbeat,
    /// A valid STAND_DOWN arrived.
    StandDown,
    /// A valid HANDOFF arrived.
    Handoff,
    /// A REJECT that cannot heal by itself (wrong pair id or protocol version), and the owner did
    /// not ask to retry such rejections.
    RejectedPermanent,
    /// A REJECT that may heal (the source is busy or stopping), or a permanent one the owner
    /// asked to retry.
    RejectedTransient,
    /// REJECT with the "stopping" code: the source is standing down or handing off.
    SourceStopping,
    /// EVICT: the source lives and drops this connection; dial again.
    Evicted,
    /// Bytes that are not a valid frame, or a valid frame out of place.
    ProtocolError,
    /// `read` returned 0.
    PeerClosed,
    /// EOF or a socket error on the armed link, found after this backup's own loop was stalled:
    /// not a verdict until the source is asked again.
    LossAfterStall(TakeoverReason),
    /// The socket reported an error.
    Failed(SocketFailure),
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// No HEARTBEAT within the deadline.
    HeartbeatDeadline,
    /// The arbiter granted the pair to this backup.
    ArbiterWon,
    /// The arbiter says the source still holds the pair (or could not be asked): ask again.
    ArbiterWait,
    /// The arbiter granted the pair to someone other than the source this backup watched.
    ArbiterLost,
    /// `vm_start` returned success.
    HookOk,
    /// `vm_start` returned an error (or panicked).
    HookFailed,
    /// `vm_start` did not return within its deadline.
    HookTimeout,
    /// The owner stops the backup.
    Stop,
    /// The aborted hook did not end within the stop deadline.
    StopDeadline,
}

/// What the subscriber must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Open a socket and connect (non-blocking).
    Connect,
    /// Close the socket if any, and dial again after the backoff.
    Redial,
    /// The link armed: start the deadline checks and report it.
    Arm,
    /// Close the socket, dial nothing.
    DropLink,
    /// Report the link's verdict (`link-lost`): without an arbiter it is followed by the start.
    Verdict(TakeoverReason),
    /// Ask the arbiter for the pair (again).
    Arbitrate,
    /// The link healed while the arbiter was asked: stop asking (and release a grant that comes).
    CancelArbitration,
    /// The arbiter granted the pair after the link healed: give it back.
    ReleasePair,
    /// Run `vm_start` off the loop, with its deadline. At most once per backup.
    StartGuest(TakeoverReason),
    /// Make the running hook give up (its abort handle).
    AbortHook,
    /// Report the end; with a live handoff link, send HANDOFF_RESULT first; close the link.
    Finish(Outcome),
}

/// Whether an arbiter must grant the pair before the guest may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Policy {
    /// An arbiter is configured.
    pub arbitrated: bool,
}

/// The reason an armed link's input is a verdict for, if it is one.
pub fn verdict_reason(input: Input) -> Option<TakeoverReason> {
    match input {
        Input::PeerClosed => Some(TakeoverReason::PeerClosed),
        Input::Failed(f) => Some(f.reason()),
        Input::HeartbeatDeadline => Some(TakeoverReason::HeartbeatTimeout),
        Input::Handoff => Some(TakeoverReason::Handoff),
        _ => None,
    }
}

/// A link input that ends a connection that is not armed (before WELCOME, or while redialling):
/// always "dial again", never a verdict.
fn ends_unarmed_link(input: Input) -> bool {
    matches!(
        input,
        Input::PeerClosed
            | Input::Failed(_)
            | Input::HandshakeTimeout
            | Input::ProtocolError
            | Input::Evicted
            | Input::SourceStopping
            | Input::RejectedTransient
            | Input::Heartbeat
            | Input::StandDown
            | Input::Handoff
    )
}

/// The transition function.
pub fn step(state: State, input: Input, policy: Policy) -> (State, Actions<Action>) {
    use Action as A;
    use Input as I;
    use Link as L;
    use Phase as P;
    let to = |phase, link, actions: &[Action]| (State { phase, link }, Actions::of(actions));
    let same = (state, Actions::NONE);
    let State { phase, link } = state;
    match phase {
        // Terminal: absorbs everything, so the hook can never run twice.
        P::Done(_) => same,

        P::Watching | P::Verifying(_) | P::Arbitrating(_) if input == I::Stop => to(
            P::Done(Outcome::Stopped),
            L::Down,
            &[A::Finish(Outcome::Stopped)],
        ),

        P::Watching => match (link, input) {
            // The link healed before a grant arrived: the pair is the source's again.
            (_, I::ArbiterWon) => to(phase, link, &[A::ReleasePair]),
            (L::Down, I::BackoffElapsed) => to(phase, L::Connecting, &[A::Connect]),
            (L::Connecting, I::Connected) => to(phase, L::Handshaking, &[]),
            (L::Handshaking, I::Welcomed) => to(phase, L::Up, &[A::Arm]),
            (L::Handshaking, I::RejectedPermanent) => to(
                P::Done(Outcome::Rejected),
                L::Down,
                &[A::Finish(Outcome::Rejected)],
            ),
            (L::Connecting | L::Handshaking, i)
                if ends_unarmed_link(i) || i == I::RejectedPermanent =>
            {
                to(phase, L::Down, &[A::Redial])
            }
            (L::Up, I::StandDown) => to(
                P::Done(Outcome::StoodDown),
                L::Down,
                &[A::Finish(Outcome::StoodDown)],
            ),
            // A bad frame, a REJECT out of place or an EVICT never takes over: dial again. If the
            // source is alive the link re-arms; if it is dead the backup keeps dialling and never
            // starts a second copy on the strength of corrupted bytes.
            (
                L::Up,
                I::ProtocolError
                | I::Evicted
                | I::RejectedPermanent
                | I::RejectedTransient
                | I::SourceStopping,
            ) => to(phase, L::Down, &[A::Redial]),
            (L::Up, I::LossAfterStall(r)) => to(P::Verifying(r), L::Down, &[A::Redial]),
            (L::Up, i) => match verdict_reason(i) {
                Some(r) => take_over(r, policy),
                None => same,
            },
            _ => same,
        },

        P::Verifying(r) => match (link, input) {
            (L::Down, I::BackoffElapsed) => to(phase, L::Connecting, &[A::Connect]),
            (L::Connecting, I::Connected) => to(phase, L::Handshaking, &[]),
            // The source answered: it lives. The loss was the stall's.
            (L::Handshaking, I::Welcomed) => to(P::Watching, L::Up, &[A::Arm]),
            // It answered that it is stopping: the STAND_DOWN this backup missed while stalled.
            (L::Connecting | L::Handshaking, I::SourceStopping) => to(
                P::Done(Outcome::StoodDown),
                L::Down,
                &[A::Finish(Outcome::StoodDown)],
            ),
            // It answered, but refuses or drops us: alive all the same; dial on, unarmed.
            (
                L::Connecting | L::Handshaking,
                I::RejectedPermanent | I::RejectedTransient | I::Evicted,
            ) => to(P::Watching, L::Down, &[A::Redial]),
            // No answer: the loss stands (the redial's socket goes either way).
            (L::Connecting | L::Handshaking, i) if ends_unarmed_link(i) => {
                if policy.arbitrated {
                    to(
                        P::Arbitrating(r),
                        L::Down,
                        &[A::Verdict(r), A::Redial, A::Arbitrate],
                    )
                } else {
                    to(
                        P::Starting(r),
                        L::Down,
                        &[A::Verdict(r), A::StartGuest(r), A::DropLink],
                    )
                }
            }
            _ => same,
        },

        P::Arbitrating(r) => match (link, input) {
            (_, I::ArbiterWon) => start(r, link),
            (_, I::ArbiterWait) => to(phase, link, &[A::Arbitrate]),
            (_, I::ArbiterLost) => to(P::Done(Outcome::Lost), L::Down, &[A::Finish(Outcome::Lost)]),
            // The source answered again: it lives, and keeps the pair.
            (L::Handshaking, I::Welcomed) => {
                to(P::Watching, L::Up, &[A::CancelArbitration, A::Arm])
            }
            // It is stopping in order: a stand-down, not a death.
            (L::Connecting | L::Handshaking, I::SourceStopping) => to(
                P::Done(Outcome::StoodDown),
                L::Down,
                &[A::CancelArbitration, A::Finish(Outcome::StoodDown)],
            ),
            (L::Down, I::BackoffElapsed) => to(phase, L::Connecting, &[A::Connect]),
            (L::Connecting, I::Connected) => to(phase, L::Handshaking, &[]),
            // While arbitrating, every failure of the redial is only a reason to dial again.
            (L::Connecting | L::Handshaking, i)
                if ends_unarmed_link(i) || i == I::RejectedPermanent =>
            {
                to(phase, L::Down, &[A::Redial])
            }
            // The handoff link stays up to carry the result; if it goes, the grant still decides.
            (L::Up, I::PeerClosed | I::Failed(_) | I::ProtocolError) => {
                to(phase, L::Down, &[A::DropLink])
            }
            _ => same,
        },

        P::Starting(_) => match (link, input) {
            (_, I::HookOk) => finish(Outcome::Started, &[]),
            (_, I::HookFailed) => finish(Outcome::StartFailed, &[]),
            (_, I::HookTimeout) => finish(Outcome::StartTimedOut, &[A::AbortHook]),
            (_, I::Stop) => to(P::Aborting, link, &[A::AbortHook]),
            (L::Up, I::PeerClosed | I::Failed(_) | I::ProtocolError) => {
                to(phase, L::Down, &[A::DropLink])
            }
            _ => same,
        },

        P::Aborting => match input {
            // The hook won the race against the abort: the guest does run, and says so.
            I::HookOk => finish(Outcome::Started, &[]),
            I::HookFailed | I::StopDeadline => finish(Outcome::Stopped, &[]),
            _ => same,
        },
    }
}

/// The armed link gave its verdict.
fn take_over(r: TakeoverReason, policy: Policy) -> (State, Actions<Action>) {
    use Action as A;
    // A HANDOFF link stays up: the source waits on it for the result.
    let keep = r == TakeoverReason::Handoff;
    let link = if keep { Link::Up } else { Link::Down };
    let phase = if policy.arbitrated {
        Phase::Arbitrating(r)
    } else {
        Phase::Starting(r)
    };
    let actions = match (policy.arbitrated, keep) {
        (true, true) => Actions::of(&[A::Verdict(r), A::Arbitrate]),
        (true, false) => Actions::of(&[A::Verdict(r), A::Redial, A::Arbitrate]),
        // The report first (observers must not block), then the guest; closing the link
        // happens while vm_start already runs.
        (false, true) => Actions::of(&[A::Verdict(r), A::StartGuest(r)]),
        (false, false) => Actions::of(&[A::Verdict(r), A::StartGuest(r), A::DropLink]),
    };
    (State { phase, link }, actions)
}

/// The arbiter granted the pair: start, keeping only a handoff link.
fn start(r: TakeoverReason, link: Link) -> (State, Actions<Action>) {
    use Action as A;
    let phase = Phase::Starting(r);
    match link {
        Link::Up | Link::Down => (State { phase, link }, Actions::of(&[A::StartGuest(r)])),
        // A redial half-way is of no use any more.
        Link::Connecting | Link::Handshaking => (
            State {
                phase,
                link: Link::Down,
            },
            Actions::of(&[A::StartGuest(r), A::DropLink]),
        ),
    }
}

fn finish(outcome: Outcome, before: &[Action]) -> (State, Actions<Action>) {
    let mut list = before.to_vec();
    list.push(Action::Finish(outcome));
    (
        State {
            phase: Phase::Done(outcome),
            link: Link::Down,
        },
        Actions::of(&list),
    )
}

/// Every phase, for exhaustive tests.
pub fn all_phases() -> Vec<Phase> {
    let mut v = vec![Phase::Watching, Phase::Aborting];
    for r in TakeoverReason::ALL {
        v.push(Phase::Verifying(r));
        v.push(Phase::Arbitrating(r));
        v.push(Phase::Starting(r));
    }
    for o in [
        Outcome::Started,
        Outcome::StartFailed,
        Outcome::StartTimedOut,
        Outcome::StoodDown,
        Outcome::Rejected,
        Outcome::Stopped,
        Outcome::Lost,
    ] {
        v.push(Phase::Done(o));
    }
    v
}

/// Every link state, for exhaustive tests.
pub const ALL_LINKS: [Link; 4] = [Link::Down, Link::Connecting, Link::Handshaking, Link::Up];

/// Every input, for exhaustive tests.
pub fn all_inputs() -> Vec<Input> {
    let mut v = vec![
        Input::BackoffElapsed,
        Input::Connected,
        Input::Welcomed,
        Input::Heartbeat,
        Input::StandDown,
        Input::Handoff,
        Input::RejectedPermanent,
        Input::RejectedTransient,
        Input::SourceStopping,
        Input::Evicted,
        Input::ProtocolError,
        Input::PeerClosed,
        Input::LossAfterStall(TakeoverReason::Reset),
        Input::LossAfterStall(TakeoverReason::PeerClosed),
        Input::HandshakeTimeout,
        Input::HeartbeatDeadline,
        Input::ArbiterWon,
        Input::ArbiterWait,
        Input::ArbiterLost,
        Input::HookOk,
        Input::HookFailed,
        Input::HookTimeout,
        Input::Stop,
        Input::StopDeadline,
    ];
    for f in [
        SocketFailure::Reset,
        SocketFailure::TimedOut,
        SocketFailure::Unreachable,
        SocketFailure::Refused,
        SocketFailure::Other,
    ] {
        v.push(Input::Failed(f));
    }
    v
}
