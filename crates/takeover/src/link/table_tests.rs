// SPDX-License-Identifier: Apache-2.0
//! Checks every (state, input) pair of the three machines against the tables in
//! `docs/state-machines.md`: the document is the reference, not a copy of the code.

use super::backup::{self, Action as BA, Input as BI, Link, Outcome, Phase};
use super::source::{self, Action as SA, Conn, ConnAction, ConnInput, Input as SI, Refusal};
use super::{Actions, SocketFailure};
use crate::hook::TakeoverReason;

const DOC: &str = include_str!("../../../../docs/state-machines.md");

/// The rows of table `name`, as trimmed cells.
fn table(name: &str) -> Vec<Vec<String>> {
    let start = DOC
        .find(&format!("<!-- table:{name} -->"))
        .unwrap_or_else(|| panic!("table {name} missing from docs/state-machines.md"));
    let rest = &DOC[start..];
    let end = rest.find("<!-- /table -->").expect("unterminated table");
    let rows: Vec<Vec<String>> = rest[..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "table {name} has no rows");
    rows
}

fn items(cell: &str) -> Vec<&str> {
    cell.split(',').map(str::trim).collect()
}

fn any_item(cell: &str, pred: impl Fn(&str) -> bool) -> bool {
    items(cell).into_iter().any(|i| i == "*" || pred(i))
}

fn when_matches(cell: &str, arbitrated: bool) -> bool {
    match cell {
        "" => true,
        "arbitrated" => arbitrated,
        "unarbitrated" => !arbitrated,
        other => panic!("unknown `when` {other:?}"),
    }
}

fn outcome(name: &str) -> Outcome {
    match name {
        "Started" => Outcome::Started,
        "StartFailed" => Outcome::StartFailed,
        "StartTimedOut" => Outcome::StartTimedOut,
        "StoodDown" => Outcome::StoodDown,
        "Rejected" => Outcome::Rejected,
        "Stopped" => Outcome::Stopped,
        "Lost" => Outcome::Lost,
        other => panic!("unknown outcome {other:?}"),
    }
}

/// `Name(arg)` → (`Name`, Some(`arg`)).
fn split_call(s: &str) -> (&str, Option<&str>) {
    match s.find('(') {
        Some(i) => (&s[..i], Some(s[i + 1..].trim_end_matches(')'))),
        None => (s, None),
    }
}

fn phase_matches(pat: &str, p: Phase) -> bool {
    let (name, arg) = split_call(pat);
    match (name, p) {
        ("Watching", Phase::Watching) | ("Aborting", Phase::Aborting) => true,
        ("Arbitrating", Phase::Arbitrating(_))
        | ("Starting", Phase::Starting(_))
        | ("Verifying", Phase::Verifying(_)) => true,
        ("Done", Phase::Done(o)) => arg == Some("*") || outcome(arg.unwrap_or("")) == o,
        _ => false,
    }
}

fn input_matches(pat: &str, i: BI) -> bool {
    match (split_call(pat), i) {
        (("Failed", Some("*")), BI::Failed(_)) => true,
        (("LossAfterStall", Some("r")), BI::LossAfterStall(_)) => true,
        ((name, None), i) => format!("{i:?}") == name,
        _ => false,
    }
}

fn backup_action(s: &str, r: Option<TakeoverReason>) -> BA {
    let (name, arg) = split_call(s);
    let reason = || r.expect("(r) without a reason");
    match name {
        "Connect" => BA::Connect,
        "Redial" => BA::Redial,
        "Arm" => BA::Arm,
        "DropLink" => BA::DropLink,
        "Verdict" => BA::Verdict(reason()),
        "Arbitrate" => BA::Arbitrate,
        "CancelArbitration" => BA::CancelArbitration,
        "ReleasePair" => BA::ReleasePair,
        "StartGuest" => BA::StartGuest(reason()),
        "AbortHook" => BA::AbortHook,
        "Finish" => BA::Finish(outcome(arg.expect("Finish(outcome)"))),
        other => panic!("unknown backup action {other:?}"),
    }
}

fn expected_backup(
    phase: Phase,
    link: Link,
    input: BI,
    arbitrated: bool,
) -> (backup::State, Vec<BA>) {
    for row in table("backup") {
        let [p, l, i, when, np, nl, acts] = <[String; 7]>::try_from(row).expect("7 columns");
        if !(any_item(&p, |x| phase_matches(x, phase))
            && any_item(&l, |x| x == format!("{link:?}"))
            && any_item(&i, |x| input_matches(x, input))
            && when_matches(&when, arbitrated))
        {
            continue;
        }
        let r = match (phase, input) {
            (Phase::Arbitrating(r) | Phase::Starting(r) | Phase::Verifying(r), _) => Some(r),
            (_, BI::LossAfterStall(r)) => Some(r),
            _ => backup::verdict_reason(input),
        };
        let next_phase = match split_call(&np) {
            ("=", _) => phase,
            ("Watching", _) => Phase::Watching,
            ("Aborting", _) => Phase::Aborting,
            ("Arbitrating", _) => Phase::Arbitrating(r.expect("reason")),
            ("Verifying", _) => Phase::Verifying(r.expect("reason")),
            ("Starting", _) => Phase::Starting(r.expect("reason")),
            ("Done", Some(o)) => Phase::Done(outcome(o)),
            other => panic!("unknown phase {other:?}"),
        };
        let next_link = match nl.as_str() {
            "=" => link,
            "Down" => Link::Down,
            "Connecting" => Link::Connecting,
            "Handshaking" => Link::Handshaking,
            "Up" => Link::Up,
            other => panic!("unknown link {other:?}"),
        };
        let actions = if acts == "—" {
            vec![]
        } else {
            items(&acts).iter().map(|a| backup_action(a, r)).collect()
        };
        let state = backup::State {
            phase: next_phase,
            link: next_link,
        };
        return (state, actions);
    }
    (backup::State { phase, link }, vec![])
}

fn list<A: Copy, const N: usize>(a: Actions<A, N>) -> Vec<A> {
    a.iter().collect()
}

#[test]
fn backup_matches_the_documented_table() {
    let mut checked = 0;
    for arbitrated in [false, true] {
        let policy = backup::Policy { arbitrated };
        for phase in backup::all_phases() {
            for link in backup::ALL_LINKS {
                for input in backup::all_inputs() {
                    let got = backup::step(backup::State { phase, link }, input, policy);
                    let want = expected_backup(phase, link, input, arbitrated);
                    assert_eq!(
                        (got.0, list(got.1)),
                        want,
                        "backup {phase:?}/{link:?} + {input:?} (arbitrated: {arbitrated})"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 1000);
}

fn source_input_matches(pat: &str, i: SI) -> bool {
    match (pat, i) {
        ("HandoffRequested(0)", SI::HandoffRequested { joined }) => joined == 0,
        ("HandoffRequested(n)", SI::HandoffRequested { joined }) => joined > 0,
        ("Paused(0)", SI::Paused { joined }) => joined == 0,
        ("Paused(n)", SI::Paused { joined }) => joined > 0,
        (p, SI::Result(s)) => p == format!("Result({s:?})"),
        (p, i) => p == format!("{i:?}"),
    }
}

fn source_action(s: &str) -> SA {
    match s {
        "Refuse(NoBackup)" => SA::Refuse(Refusal::NoBackup),
        "Refuse(Busy)" => SA::Refuse(Refusal::Busy),
        "Refuse(Finished)" => SA::Refuse(Refusal::Finished),
        "Pause" => SA::Pause,
        "AbortPause" => SA::AbortPause,
        "HandOver" => SA::HandOver,
        "StandDownOthers" => SA::StandDownOthers,
        "SendHandoff" => SA::SendHandoff,
        "Resume" => SA::Resume,
        "Reclaim" => SA::Reclaim,
        "Fence" => SA::Fence,
        "ReportFailed" => SA::ReportFailed,
        "StandDownAll" => SA::StandDownAll,
        "DeferStandDown" => SA::DeferStandDown,
        "Finish" => SA::Finish,
        other => panic!("unknown source action {other:?}"),
    }
}

fn source_state(s: &str) -> source::State {
    *source::ALL_STATES
        .iter()
        .find(|st| format!("{st:?}") == s)
        .unwrap_or_else(|| panic!("unknown source state {s:?}"))
}

#[test]
fn source_matches_the_documented_table() {
    for arbitrated in [false, true] {
        let policy = source::Policy { arbitrated };
        for state in source::ALL_STATES {
            for input in source::all_inputs() {
                let mut want = (state, vec![]);
                for row in table("source") {
                    let [s, i, when, next, acts] = <[String; 5]>::try_from(row).expect("5 cols");
                    if any_item(&s, |x| x == format!("{state:?}"))
                        && any_item(&i, |x| source_input_matches(x, input))
                        && when_matches(&when, arbitrated)
                    {
                        let next = if next == "=" {
                            state
                        } else {
                            source_state(&next)
                        };
                        let acts = if acts == "—" {
                            vec![]
                        } else {
                            items(&acts).into_iter().map(source_action).collect()
                        };
                        want = (next, acts);
                        break;
                    }
                }
                let got = source::step(state, input, policy);
                assert_eq!(
                    (got.0, list(got.1)),
                    want,
                    "source {state:?} + {input:?} (arbitrated: {arbitrated})"
                );
            }
        }
    }
}

#[test]
fn conn_matches_the_documented_table() {
    for state in source::ALL_CONNS {
        for input in source::ALL_CONN_INPUTS {
            let mut want = (state, None);
            for row in table("conn") {
                let [c, i, next, act] = <[String; 4]>::try_from(row).expect("4 columns");
                if any_item(&c, |x| x == format!("{state:?}"))
                    && any_item(&i, |x| x == format!("{input:?}"))
                {
                    let next = *source::ALL_CONNS
                        .iter()
                        .find(|s| format!("{s:?}") == next)
                        .unwrap_or_else(|| panic!("unknown conn state {next:?}"));
                    let act = match act.as_str() {
                        "—" => None,
                        "Welcome" => Some(ConnAction::Welcome),
                        "Reject" => Some(ConnAction::Reject),
                        "Evict" => Some(ConnAction::Evict),
                        "Close" => Some(ConnAction::Close),
                        "ToHandoff" => Some(ConnAction::ToHandoff),
                        other => panic!("unknown conn action {other:?}"),
                    };
                    want = (next, act);
                    break;
                }
            }
            assert_eq!(
                source::conn_step(state, input),
                want,
                "conn {state:?} + {input:?}"
            );
        }
    }
}

/// An armed backup never sees a bare close from a live source: every row that ends a joined
/// connection on the source's own initiative tells the backup first.
#[test]
fn a_live_source_never_closes_an_armed_backup_silently() {
    for input in source::ALL_CONN_INPUTS {
        let (next, action) = source::conn_step(Conn::Joined, input);
        if !matches!(input, ConnInput::Eof | ConnInput::Failed) {
            assert_ne!(next, Conn::Closed, "Joined + {input:?} closes");
        }
        if next == Conn::Closing {
            assert!(
                matches!(input, ConnInput::StandDownSent) || action == Some(ConnAction::Evict),
                "Joined + {input:?} leaves without telling the backup"
            );
        }
    }
}

/// Sanity of the reasons table the backup document refers to.
#[test]
fn verdict_reasons() {
    assert_eq!(
        backup::verdict_reason(BI::Failed(SocketFailure::TimedOut)),
        Some(TakeoverReason::TimedOut)
    );
    assert_eq!(backup::verdict_reason(BI::ProtocolError), None);
    assert_eq!(backup::verdict_reason(BI::StandDown), None);
}
