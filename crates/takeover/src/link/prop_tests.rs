// SPDX-License-Identifier: Apache-2.0
//! Property tests: random input sequences through the machines keep the invariants that matter.

use proptest::prelude::*;

use super::backup::{self, Action as BA, Input as BI, Link, Phase};
use super::source::{self, Action as SA, HandoffStatus, Input as SI};

fn before_phase(s: backup::State) -> Phase {
    s.phase
}

fn backup_input() -> impl Strategy<Value = BI> {
    proptest::sample::select(backup::all_inputs())
}

fn source_input() -> impl Strategy<Value = SI> {
    proptest::sample::select(source::all_inputs())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// `vm_start` at most once, never after the end, only from an armed link's verdict (or, with
    /// an arbiter, only from its grant), always with the verdict's reason.
    #[test]
    fn backup_starts_at_most_once_and_only_for_a_reason(
        arbitrated in any::<bool>(),
        inputs in proptest::collection::vec(backup_input(), 1..60),
    ) {
        let policy = backup::Policy { arbitrated };
        let mut s = backup::State::INITIAL;
        let mut starts = 0;
        let mut verdict = None;
        for input in inputs {
            let before = s;
            let (next, actions) = backup::step(s, input, policy);
            if actions.any(|a| matches!(a, BA::Verdict(_))) {
                verdict = match before_phase(s) {
                    Phase::Verifying(v) => Some(v),
                    _ => backup::verdict_reason(input),
                };
            }
            for a in actions.iter() {
                match a {
                    BA::Verdict(r) => {
                        // A verdict only comes from an armed link, for its own reason, or from a
                        // verification of a loss after a stall that found no source.
                        match before.phase {
                            Phase::Verifying(v) => prop_assert_eq!(r, v),
                            _ => {
                                prop_assert!(before.armed(), "verdict from {before:?} on {input:?}");
                                prop_assert_eq!(Some(r), backup::verdict_reason(input));
                            }
                        }
                    }
                    BA::StartGuest(r) => {
                        starts += 1;
                        prop_assert!(!before.is_done(), "start after the end: {before:?}");
                        if arbitrated {
                            prop_assert_eq!(input, BI::ArbiterWon);
                            prop_assert!(matches!(before.phase, Phase::Arbitrating(_)));
                        } else if let Phase::Verifying(v) = before.phase {
                            // The redial after a stall found no source.
                            prop_assert_eq!(r, v);
                            prop_assert!(!matches!(input,
                                BI::Welcomed | BI::RejectedPermanent | BI::RejectedTransient
                                    | BI::Evicted));
                        } else {
                            // A frame that did not pass the handshake never starts a guest.
                            prop_assert!(before.armed(), "start from {before:?} on {input:?}");
                            prop_assert_eq!(Some(r), backup::verdict_reason(input));
                        }
                        prop_assert_eq!(Some(r), verdict, "start reason differs from the verdict");
                    }
                    _ => {}
                }
            }
            if let Phase::Done(_) = before.phase {
                prop_assert_eq!(next, before, "a terminal state moved");
                prop_assert!(actions.is_empty());
            }
            // Nothing but the hook's own report moves a stood-down or rejected backup.
            s = next;
        }
        prop_assert!(starts <= 1, "vm_start ran {starts} times");
    }

    /// STAND_DOWN on an armed link ends the backup without a start, whatever follows.
    #[test]
    fn backup_never_starts_after_a_stand_down(
        arbitrated in any::<bool>(),
        inputs in proptest::collection::vec(backup_input(), 0..40),
    ) {
        let policy = backup::Policy { arbitrated };
        let armed = backup::State { phase: Phase::Watching, link: Link::Up };
        let (mut s, _) = backup::step(armed, BI::StandDown, policy);
        for input in inputs {
            let (next, actions) = backup::step(s, input, policy);
            prop_assert!(!actions.any(|a| matches!(a, BA::StartGuest(_))));
            s = next;
        }
    }

    /// The source resumes its guest only when HANDOFF never left or the backup said its copy
    /// does not run; HANDOFF leaves only after a confirmed pause, to exactly one backup, after the
    /// others were stood down.
    #[test]
    fn source_handoff_is_a_transaction(
        arbitrated in any::<bool>(),
        inputs in proptest::collection::vec(source_input(), 1..60),
    ) {
        let policy = source::Policy { arbitrated };
        let mut s = source::State::Serving;
        let mut paused = false;
        let mut handed_over = false;
        let mut handoff_sent = false;
        let mut passed_on = false;
        for input in inputs {
            // The facts this input establishes hold for the actions it causes.
            match input {
                SI::Paused { joined } if s == source::State::Pausing && joined > 0 => paused = true,
                SI::HandedOver if s == source::State::HandingOver => handed_over = true,
                _ => {}
            }
            let (next, actions) = source::step(s, input, policy);
            let list: Vec<SA> = actions.iter().collect();
            for (k, a) in list.iter().enumerate() {
                match a {
                    SA::SendHandoff => {
                        prop_assert!(paused, "HANDOFF before a confirmed pause");
                        prop_assert!(!arbitrated || handed_over, "HANDOFF before the pair moved");
                        prop_assert!(k > 0 && list[k - 1] == SA::StandDownOthers);
                        prop_assert!(!handoff_sent, "a second HANDOFF");
                        handoff_sent = true;
                    }
                    SA::Resume if handoff_sent && !arbitrated => {
                        prop_assert!(
                            matches!(input,
                                SI::Result(HandoffStatus::Failed) | SI::HandoffNotDelivered),
                            "resumed after HANDOFF on {input:?}"
                        );
                    }
                    // Once the pair may have moved, the guest runs again only once it is back.
                    SA::Resume if passed_on => {
                        prop_assert_eq!(input, SI::Reclaimed, "resumed without the pair");
                    }
                    SA::HandOver => passed_on = true,
                    SA::Reclaim => {
                        prop_assert!(
                            matches!(input,
                                SI::Result(HandoffStatus::Failed)
                                    | SI::HandoffNotDelivered
                                    | SI::HandOverFailed),
                            "reclaim on {input:?}"
                        );
                    }
                    SA::Pause => paused = false,
                    _ => {}
                }
            }
            if next == source::State::Serving {
                // A failed handoff starts over.
                paused = false;
                handed_over = false;
                handoff_sent = false;
                passed_on = false;
            }
            if s.is_done() {
                prop_assert_eq!(next, s);
            }
            s = next;
        }
    }
}
