// SPDX-License-Identifier: Apache-2.0
//! The source's state machines: the planned handoff as a transaction, the orderly stop, and one
//! backup connection.
//!
//! The handoff is a transaction: the local guest is paused (confirmed) before HANDOFF leaves, and
//! it is resumed only when the HANDOFF never left or the chosen backup reported that its copy is
//! **not** running (with an arbiter, once the pair is taken back). When the outcome is unknown (the backup's start timed out, the link died after
//! HANDOFF, no answer in time) the guest stays paused: two running copies are worse than none.
//! Only one backup is handed the guest; the others are stood down first, so a crash of the source
//! during the handoff cannot start a second copy. `docs/state-machines.md` holds the tables.

use super::Actions;

/// Where the source is, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Serving backups; the guest runs.
    Serving,
    /// A handoff was asked for: the pause hook runs off the loop.
    Pausing,
    /// The guest is paused; the arbiter passes the pair to the chosen backup.
    HandingOver,
    /// HANDOFF went to the chosen backup; waiting for its HANDOFF_RESULT.
    AwaitingBackup,
    /// The handoff failed before the backup's copy could run, after the pair was passed on (or
    /// may have been): the pair is taken back from the arbiter before the guest may run again.
    Reclaiming,
    /// The handoff failed before the backup's copy could run: the resume hook runs.
    Resuming,
    /// Terminal: the backup confirmed that its copy runs; the local guest stays paused.
    HandedOff,
    /// Terminal: whether the backup's copy runs is unknown; the local guest stays paused.
    Uncertain,
    /// Terminal: STAND_DOWN went to every backup.
    StoodDown,
    /// Terminal: the lease ran out (and no failsafe held): the guest is paused here for good, so
    /// that a backup may win the pair.
    Fenced,
}

impl State {
    /// Whether a handoff is under way.
    pub fn handing_off(&self) -> bool {
        matches!(
            self,
            State::Pausing
                | State::HandingOver
                | State::AwaitingBackup
                | State::Reclaiming
                | State::Resuming
        )
    }

    /// Whether joined backups get heartbeats: all the time the guest runs here or may run here
    /// again, a handoff's pause included (however long the pause hook takes, the loop is alive
    /// and the backups must not take over for want of heartbeats). Not once HANDOFF went out
    /// (`AwaitingBackup`), nor when done.
    pub fn beats(&self) -> bool {
        matches!(
            self,
            State::Serving
                | State::Pausing
                | State::HandingOver
                | State::Reclaiming
                | State::Resuming
        )
    }

    /// Whether nothing more will happen.
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            State::HandedOff | State::Uncertain | State::StoodDown | State::Fenced
        )
    }
}

/// What the backup said in HANDOFF_RESULT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandoffStatus {
    /// Its `vm_start` succeeded: its copy runs.
    Started,
    /// Its `vm_start` failed: its copy does not run.
    Failed,
    /// Its `vm_start` did not finish in time: unknown.
    Uncertain,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The owner asked for a planned handoff; `joined` backups are armed now.
    HandoffRequested {
        /// Backups that completed the handshake.
        joined: usize,
    },
    /// The owner asked for an orderly stop.
    StandDownRequested,
    /// The pause hook succeeded; `joined` backups are armed now.
    Paused {
        /// Backups that completed the handshake.
        joined: usize,
    },
    /// The pause hook failed (the guest may still run).
    PauseFailed,
    /// The pause hook did not return in time.
    PauseTimeout,
    /// Every armed backup left while the pause hook ran: a long pause (a live migration) is
    /// given up rather than finished for nobody.
    BackupsGone,
    /// The arbiter passed the pair to the chosen backup.
    HandedOver,
    /// The arbiter could not pass the pair (this source no longer owns it, or it is unreachable).
    HandOverFailed,
    /// HANDOFF could not be written: the backup never got it.
    HandoffNotDelivered,
    /// HANDOFF_RESULT arrived from the chosen backup.
    Result(HandoffStatus),
    /// The chosen backup's link ended after HANDOFF without a result.
    TargetLost,
    /// No HANDOFF_RESULT within the handoff deadline.
    ResultTimeout,
    /// The pair was taken back from the arbiter.
    Reclaimed,
    /// The pair could not be taken back (another holder has it, or the arbiter stayed silent).
    ReclaimFailed,
    /// The resume hook succeeded.
    Resumed,
    /// The resume hook failed or timed out.
    ResumeFailed,
    /// The lease ran out and no failsafe holds: the guest must stop here before anyone else
    /// can be granted the pair.
    LeaseExpired,
}

/// Why a handoff request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No backup is armed: handing off would leave the guest running nowhere.
    NoBackup,
    /// A handoff is already under way.
    Busy,
    /// The source stood down, handed off, or is uncertain: it will not hand off again.
    Finished,
}

/// What the subscriber must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Refuse the handoff request and report why.
    Refuse(Refusal),
    /// Run the pause hook off the loop, with its deadline.
    Pause,
    /// Abort the pause hook that overran its deadline.
    AbortPause,
    /// Ask the arbiter to pass the pair to the chosen backup.
    HandOver,
    /// STAND_DOWN to every joined backup except the chosen one, so that no other copy can start.
    StandDownOthers,
    /// Write HANDOFF to the chosen backup.
    SendHandoff,
    /// Take the pair back from the arbiter (off the loop, with retries until a deadline).
    Reclaim,
    /// Run the resume hook off the loop, with its deadline.
    Resume,
    /// Report a failed handoff: the guest runs again here (after [`Input::Resumed`]) or not.
    ReportFailed,
    /// STAND_DOWN to every joined backup.
    StandDownAll,
    /// Remember a stand-down that came during a handoff; it is carried out when the handoff ends
    /// with the guest running here.
    DeferStandDown,
    /// Report the end: handed off, or uncertain.
    Finish,
    /// Stop the guest now (its run deadline, then the pause hook), and report it: fenced.
    Fence,
}

/// Whether the arbiter must pass the pair before HANDOFF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Policy {
    /// An arbiter is configured.
    pub arbitrated: bool,
}

/// The transition function.
pub fn step(state: State, input: Input, policy: Policy) -> (State, Actions<Action>) {
    use Action as A;
    use Input as I;
    use State as S;
    let to = |s, actions: &[Action]| (s, Actions::of(actions));
    match (state, input) {
        // A pause under way (a live migration) is given up first: the fence must not wait for it.
        (S::Pausing, I::LeaseExpired) => to(S::Fenced, &[A::AbortPause, A::Fence]),
        (s, I::LeaseExpired) if !s.is_done() => to(S::Fenced, &[A::Fence]),
        (S::Serving, I::HandoffRequested { joined: 0 }) => {
            to(S::Serving, &[A::Refuse(Refusal::NoBackup)])
        }
        (S::Serving, I::HandoffRequested { .. }) => to(S::Pausing, &[A::Pause]),
        (s, I::HandoffRequested { .. }) if s.handing_off() => to(s, &[A::Refuse(Refusal::Busy)]),
        (s, I::HandoffRequested { .. }) => to(s, &[A::Refuse(Refusal::Finished)]),

        (S::Serving, I::StandDownRequested) => to(S::StoodDown, &[A::StandDownAll]),
        (s, I::StandDownRequested) if s.handing_off() => to(s, &[A::DeferStandDown]),

        // The pause is confirmed: only now may anything leave that lets another copy start.
        (S::Pausing, I::Paused { joined: 0 }) => to(S::Resuming, &[A::Resume]),
        (S::Pausing, I::Paused { .. }) if policy.arbitrated => to(S::HandingOver, &[A::HandOver]),
        (S::Pausing, I::Paused { .. }) => {
            to(S::AwaitingBackup, &[A::StandDownOthers, A::SendHandoff])
        }
        (S::Pausing, I::PauseFailed) => to(S::Resuming, &[A::Resume]),
        (S::Pausing, I::PauseTimeout) => to(S::Resuming, &[A::AbortPause, A::Resume]),
        // The hook reports back (aborted: PauseFailed, or done: Paused(0)); both resume.
        (S::Pausing, I::BackupsGone) => to(S::Pausing, &[A::AbortPause]),

        (S::HandingOver, I::HandedOver) => {
            to(S::AwaitingBackup, &[A::StandDownOthers, A::SendHandoff])
        }
        // The pair may have moved (an answer can be lost): take it back before resuming.
        (S::HandingOver, I::HandOverFailed) => to(S::Reclaiming, &[A::Reclaim]),

        // The backup says its copy does not run (or never got HANDOFF): the guest may run here
        // again, once the pair is ours again.
        (S::AwaitingBackup, I::HandoffNotDelivered | I::Result(HandoffStatus::Failed))
            if policy.arbitrated =>
        {
            to(S::Reclaiming, &[A::Reclaim])
        }
        (S::AwaitingBackup, I::HandoffNotDelivered) => to(S::Resuming, &[A::Resume]),
        (S::AwaitingBackup, I::Result(HandoffStatus::Started)) => to(S::HandedOff, &[A::Finish]),
        (S::AwaitingBackup, I::Result(HandoffStatus::Failed)) => to(S::Resuming, &[A::Resume]),
        // Its copy may run: never resume on a guess.
        (
            S::AwaitingBackup,
            I::Result(HandoffStatus::Uncertain) | I::TargetLost | I::ResultTimeout,
        ) => to(S::Uncertain, &[A::Finish]),

        (S::Reclaiming, I::Reclaimed) => to(S::Resuming, &[A::Resume]),
        // Someone else may run it: never resume on a guess.
        (S::Reclaiming, I::ReclaimFailed) => to(S::Uncertain, &[A::Finish]),

        (S::Resuming, I::Resumed | I::ResumeFailed) => to(S::Serving, &[A::ReportFailed]),

        _ => (state, Actions::NONE),
    }
}

/// Every state, for exhaustive tests.
pub const ALL_STATES: [State; 10] = [
    State::Serving,
    State::Pausing,
    State::HandingOver,
    State::AwaitingBackup,
    State::Reclaiming,
    State::Resuming,
    State::HandedOff,
    State::Uncertain,
    State::StoodDown,
    State::Fenced,
];

/// Every input, for exhaustive tests (`joined` as 0 and 1).
pub fn all_inputs() -> Vec<Input> {
    vec![
        Input::HandoffRequested { joined: 0 },
        Input::HandoffRequested { joined: 1 },
        Input::StandDownRequested,
        Input::Paused { joined: 0 },
        Input::Paused { joined: 1 },
        Input::PauseFailed,
        Input::PauseTimeout,
        Input::BackupsGone,
        Input::HandedOver,
        Input::HandOverFailed,
        Input::HandoffNotDelivered,
        Input::Result(HandoffStatus::Started),
        Input::Result(HandoffStatus::Failed),
        Input::Result(HandoffStatus::Uncertain),
        Input::TargetLost,
        Input::ResultTimeout,
        Input::Reclaimed,
        Input::ReclaimFailed,
        Input::Resumed,
        Input::ResumeFailed,
        Input::LeaseExpired,
    ]
}

/// One backup connection, on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conn {
    /// Accepted; waiting for HELLO.
    Handshaking,
    /// WELCOME sent: the backup is armed.
    Joined,
    /// The chosen backup of a handoff: HANDOFF sent, waiting for HANDOFF_RESULT.
    Target,
    /// A final frame (STAND_DOWN) was written and the write side closed; waiting for the backup to
    /// close its side.
    Closing,
    /// Gone.
    Closed,
}

/// What happened on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnInput {
    /// A HELLO for this pair.
    HelloOk,
    /// A HELLO that must be refused, or any bad first bytes.
    HelloBad,
    /// A frame a backup never sends at this point (after HELLO: anything but HANDOFF_RESULT from
    /// the chosen backup).
    Unexpected,
    /// HANDOFF_RESULT.
    HandoffResult,
    /// EOF.
    Eof,
    /// A socket error.
    Failed,
    /// No HELLO in time.
    HandshakeTimeout,
    /// HANDOFF was written to this backup.
    HandoffSent,
    /// STAND_DOWN was written to this backup and its write side closed.
    StandDownSent,
}

/// What to do with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnAction {
    /// Send WELCOME and report the backup joined.
    Welcome,
    /// Send REJECT and close (the peer never armed, so closing is safe). The subscriber removes
    /// every connection whose new state is [`Conn::Closed`].
    Reject,
    /// Send EVICT and close the write side: an armed backup must never read a close as the
    /// source's death.
    Evict,
    /// Close and report: the backup went away (or, handshaking, gave up).
    Close,
    /// Tell the handoff machine that the target answered / vanished.
    ToHandoff,
}

/// The transition function of one connection.
pub fn conn_step(state: Conn, input: ConnInput) -> (Conn, Option<ConnAction>) {
    use Conn as C;
    use ConnAction as A;
    use ConnInput as I;
    match (state, input) {
        (C::Handshaking, I::HelloOk) => (C::Joined, Some(A::Welcome)),
        (C::Handshaking, I::HelloBad | I::Unexpected | I::HandoffResult) => {
            (C::Closed, Some(A::Reject))
        }
        (C::Handshaking, I::Eof | I::Failed | I::HandshakeTimeout) => (C::Closed, Some(A::Close)),
        (C::Joined, I::HandoffSent) => (C::Target, None),
        (C::Joined, I::StandDownSent) => (C::Closing, None),
        // EVICT, then wait for the backup to close: closing first could reset the connection and
        // lose the EVICT.
        (C::Joined, I::HelloOk | I::HelloBad | I::Unexpected | I::HandoffResult) => {
            (C::Closing, Some(A::Evict))
        }
        (C::Joined | C::Closing, I::Eof | I::Failed) => (C::Closed, Some(A::Close)),
        (C::Target, I::HandoffResult) => (C::Closing, Some(A::ToHandoff)),
        // After HANDOFF the backup is starting its copy and no longer reads the link: closing
        // it cannot be mistaken for anything.
        (C::Target, I::Eof | I::Failed | I::HelloOk | I::HelloBad | I::Unexpected) => {
            (C::Closed, Some(A::ToHandoff))
        }
        // A closing link only waits for its EOF; whatever else arrives is ignored.
        _ => (state, None),
    }
}

/// Every connection state, for exhaustive tests.
pub const ALL_CONNS: [Conn; 5] = [
    Conn::Handshaking,
    Conn::Joined,
    Conn::Target,
    Conn::Closing,
    Conn::Closed,
];

/// Every connection input, for exhaustive tests.
pub const ALL_CONN_INPUTS: [ConnInput; 9] = [
    ConnInput::HelloOk,
    ConnInput::HelloBad,
    ConnInput::Unexpected,
    ConnInput::HandoffResult,
    ConnInput::Eof,
    ConnInput::Failed,
    ConnInput::HandshakeTimeout,
    ConnInput::HandoffSent,
    ConnInput::StandDownSent,
];
