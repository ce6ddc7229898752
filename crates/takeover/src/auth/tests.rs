// SPDX-License-Identifier: Apache-2.0
//! Tests of protocol version 2: round trips, every tamper refused, key files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::vector_tests::Scripted;
use super::*;
use crate::protocol::{self, Frame, HandoffStatus, Kind, ProtocolError, RejectCode};

// ---------------------------------------------------------------------------------------------
// Helpers

/// xorshift64*: deterministic pseudo-random bytes.
struct Xorshift(u64);

impl Entropy for Xorshift {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }
}

fn key(id: u16, fill: u8) -> Key {
    Key::new(id, &[fill; 32]).unwrap()
}

/// A ring of keys `(id, fill byte)`.
fn creds(keys: &[(u16, u8)]) -> Credentials {
    Credentials::Keys(Arc::new(
        KeyRing::new(keys.iter().map(|&(id, fill)| key(id, fill))).unwrap(),
    ))
}

const PAIR: &str = "vm-42";

fn info() -> WelcomeInfo {
    WelcomeInfo {
        heartbeat: Some(Duration::from_millis(10)),
        node: "host-a/1".into(),
        fence_grace: Duration::from_millis(1500),
    }
}

/// The four handshake messages of one conversation, and the machines at each step.
struct Conversation {
    hello: Vec<u8>,
    welcome: Vec<u8>,
    auth: Vec<u8>,
    backup: Session,
    source: Session,
}

/// A full handshake between a source and a backup; panics if it fails.
fn handshake(source: &Credentials, backup: &Credentials, seed: u64) -> Conversation {
    let (b, hello) = BackupHandshake::start(backup, PAIR, "host-b/1", &mut Xorshift(seed));
    let s = SourceHandshake::on_hello(source, PAIR, &hello, &mut Xorshift(seed ^ 0xabcd)).unwrap();
    let (s, welcome) = s.welcome(&info());
    let w = b.on_welcome(&welcome).unwrap();
    assert_eq!(w.welcome, info());
    let a = s.on_auth(&w.auth).unwrap();
    assert_eq!(a.node, "host-b/1");
    Conversation {
        hello,
        welcome,
        auth: w.auth,
        backup: w.session,
        source: a.session,
    }
}

fn keyed_pair(seed: u64) -> (Session, Session) {
    let c = creds(&[(1, 7)]);
    let conv = handshake(&c, &c, seed);
    (conv.source, conv.backup)
}

fn link_frames() -> Vec<Frame> {
    vec![
        Frame::Heartbeat { seq: 1 },
        Frame::Heartbeat { seq: u64::MAX },
        Frame::StandDown,
        Frame::Handoff,
        Frame::HandoffResult {
            status: HandoffStatus::Uncertain,
            detail: "cont: timed out".into(),
        },
        Frame::HandoffResult {
            status: HandoffStatus::Started,
            detail: String::new(),
        },
        Frame::Evict {
            reason: "HELLO on an armed link".into(),
        },
    ]
}

/// Flips each bit of `bytes` in turn.
fn flips(bytes: &[u8]) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
    (0..bytes.len() * 8).map(move |bit| {
        let mut b = bytes.to_vec();
        b[bit / 8] ^= 1 << (bit % 8);
        (bit, b)
    })
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmtk-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn keyed_round_trip_every_frame_both_ways_byte_by_byte() {
    let c = creds(&[(1, 7)]);
    // The handshake through the readers, one byte at a time.
    let (b, hello) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(1));
    let mut at_source = Reader::new();
    let mut got = None;
    for (i, byte) in hello.iter().enumerate() {
        at_source.push(&[*byte]);
        got = at_source.next_handshake().unwrap();
        assert_eq!(
            got.is_some(),
            i + 1 == hello.len(),
            "HELLO complete at byte {i}"
        );
    }
    let s = SourceHandshake::on_hello(&c, PAIR, &got.unwrap(), &mut Xorshift(2)).unwrap();
    assert_eq!(s.peer_node(), "");
    assert_eq!(s.key_id(), Some(1));
    let (s, welcome) = s.welcome(&info());
    let mut at_backup = Reader::new();
    let mut got = None;
    for byte in &welcome {
        at_backup.push(&[*byte]);
        got = at_backup.next_handshake().unwrap();
    }
    let w = b.on_welcome(&got.unwrap()).unwrap();
    assert!(w.session.is_authenticated());
    at_source.push(&w.auth);
    let a = s
        .on_auth(&at_source.next_handshake().unwrap().unwrap())
        .unwrap();
    assert_eq!(a.key_id, Some(1));
    let (mut source, mut backup) = (a.session, w.session);
    assert_eq!(source.role(), Role::Source);
    assert_eq!(backup.role(), Role::Backup);

    for (n, f) in link_frames().into_iter().enumerate() {
        for dir in 0..2 {
            let (tx, rx, reader) = if dir == 0 {
                (&mut source, &mut backup, &mut at_backup)
            } else {
                (&mut backup, &mut source, &mut at_source)
            };
            let bytes = tx.seal(&f);
            for (i, byte) in bytes.iter().enumerate() {
                reader.push(&[*byte]);
                let got = reader.next_frame(rx).unwrap();
                if i + 1 < bytes.len() {
                    assert_eq!(got, None, "{f:?} complete too early at byte {i}");
                } else {
                    assert_eq!(got, Some(f.clone()));
                }
            }
            assert_eq!(reader.pending(), 0);
            assert_eq!(rx.next_recv_seq(), Some(n as u64 + 1));
        }
    }
}

#[test]
fn heartbeat_sealing_into_an_array_or_an_outbox_gives_the_same_bytes() {
    let (mut s1, _) = keyed_pair(5);
    let (mut s2, mut b2) = keyed_pair(5);
    let mut outbox = Vec::new();
    for tick in [1, 2, 99] {
        let a = s1.seal_heartbeat(tick);
        s2.seal_into(&Frame::Heartbeat { seq: tick }, &mut outbox);
        assert_eq!(a.len(), SEALED_HEARTBEAT_LEN);
        assert_eq!(&outbox[outbox.len() - SEALED_HEARTBEAT_LEN..], &a[..]);
    }
    let mut r = Reader::new();
    r.push(&outbox);
    for tick in [1, 2, 99] {
        assert_eq!(
            r.next_frame(&mut b2).unwrap(),
            Some(Frame::Heartbeat { seq: tick })
        );
    }
    assert_eq!(r.next_frame(&mut b2).unwrap(), None);
}

#[test]
fn insecure_round_trip_has_zero_macs_but_checks_sequence_numbers() {
    let conv = handshake(&Credentials::Insecure, &Credentials::Insecure, 3);
    assert_eq!(
        &conv.hello[conv.hello.len() - 34..][..2],
        &[0, 0],
        "key id 0"
    );
    assert!(conv.welcome[conv.welcome.len() - 32..]
        .iter()
        .all(|&b| b == 0));
    assert!(conv.auth[8..].iter().all(|&b| b == 0));
    let (mut source, mut backup) = (conv.source, conv.backup);
    assert!(!source.is_authenticated());
    let hb = source.seal_heartbeat(4);
    assert!(hb[hb.len() - TAG_LEN..].iter().all(|&b| b == 0));
    assert_eq!(backup.open(&hb), Ok(Frame::Heartbeat { seq: 4 }));
    assert!(matches!(
        backup.open(&hb),
        Err(ProtocolError::Replayed {
            got: 0,
            expected: 1,
            ..
        })
    ));
}

#[test]
fn key_rotation_source_accepts_both_keys_backups_use_their_newest() {
    let source = creds(&[(1, 1), (2, 2)]);
    for (backup, id) in [(creds(&[(1, 1)]), 1), (creds(&[(1, 1), (2, 2)]), 2)] {
        let (b, hello) = BackupHandshake::start(&backup, PAIR, "", &mut Xorshift(9));
        let s = SourceHandshake::on_hello(&source, PAIR, &hello, &mut Xorshift(10)).unwrap();
        assert_eq!(s.key_id(), Some(id));
        let (s, welcome) = s.welcome(&info());
        let w = b.on_welcome(&welcome).unwrap();
        let a = s.on_auth(&w.auth).unwrap();
        assert_eq!(a.key_id, Some(id));
        let (mut tx, mut rx) = (a.session, w.session);
        assert_eq!(rx.open(&tx.seal(&Frame::Handoff)), Ok(Frame::Handoff));
    }
    // A backup whose newest key the source does not have yet fails.
    let backup = creds(&[(1, 1), (2, 2), (3, 3)]);
    let (b, hello) = BackupHandshake::start(&backup, PAIR, "", &mut Xorshift(9));
    let s = SourceHandshake::on_hello(&source, PAIR, &hello, &mut Xorshift(10)).unwrap();
    let (_, welcome) = s.welcome(&info());
    assert!(matches!(
        b.on_welcome(&welcome),
        Err(HandshakeFailure::Protocol(
            ProtocolError::WelcomeNotAuthentic { key_id: 3, .. }
        ))
    ));
}

// ---------------------------------------------------------------------------------------------
// Tampering

#[test]
fn no_single_bit_flip_in_any_handshake_message_gets_through() {
    let c = creds(&[(1, 7)]);
    let conv = handshake(&c, &c, 11);

    // HELLO altered on its way: the source answers (or refuses), the backup never accepts.
    for (bit, hello) in flips(&conv.hello) {
        let Ok(s) = SourceHandshake::on_hello(&c, PAIR, &hello, &mut Xorshift(12)) else {
            continue;
        };
        let (b, orig) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(11));
        assert_eq!(orig, conv.hello);
        let (s, welcome) = s.welcome(&info());
        assert!(
            b.on_welcome(&welcome).is_err(),
            "HELLO bit {bit}: backup accepted"
        );
        // Nor does the source accept the AUTH the backup would have sent to the real HELLO.
        assert!(s.on_auth(&conv.auth).is_err(), "HELLO bit {bit}: source");
    }
    // WELCOME altered.
    for (bit, welcome) in flips(&conv.welcome) {
        let (b, _) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(11));
        assert!(b.on_welcome(&welcome).is_err(), "WELCOME bit {bit}");
    }
    // AUTH altered.
    for (bit, auth) in flips(&conv.auth) {
        let s = SourceHandshake::on_hello(&c, PAIR, &conv.hello, &mut Xorshift(11 ^ 0xabcd));
        let (s, welcome) = s.unwrap().welcome(&info());
        assert_eq!(welcome, conv.welcome);
        assert!(s.on_auth(&auth).is_err(), "AUTH bit {bit}");
    }
}

#[test]
fn no_single_bit_flip_in_any_sealed_frame_is_accepted() {
    for f in link_frames() {
        let (mut source, _) = keyed_pair(13);
        let sealed = source.seal(&f);
        for (bit, bytes) in flips(&sealed) {
            let (_, mut backup) = keyed_pair(13);
            let mut r = Reader::new();
            r.push(&bytes);
            let got = r.next_frame(&mut backup);
            assert!(
                !matches!(got, Ok(Some(_))),
                "{f:?} bit {bit} flipped: {got:?}"
            );
            assert!(backup.open(&bytes).is_err(), "{f:?} bit {bit}");
        }
        // The unaltered frame opens.
        let (_, mut backup) = keyed_pair(13);
        assert_eq!(backup.open(&sealed), Ok(f));
    }
}

#[test]
fn truncated_messages_and_frames_are_refused() {
    let c = creds(&[(1, 7)]);
    let conv = handshake(&c, &c, 14);
    for n in 0..conv.hello.len() {
        assert!(SourceHandshake::on_hello(&c, PAIR, &conv.hello[..n], &mut Xorshift(1)).is_err());
        let mut r = Reader::new();
        r.push(&conv.hello[..n]);
        assert_eq!(r.next_handshake(), Ok(None));
    }
    for n in 0..conv.welcome.len() {
        let (b, _) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(14));
        assert!(b.on_welcome(&conv.welcome[..n]).is_err());
    }
    for n in 0..conv.auth.len() {
        let s = SourceHandshake::on_hello(&c, PAIR, &conv.hello, &mut Xorshift(14 ^ 0xabcd));
        let (s, _) = s.unwrap().welcome(&info());
        assert!(matches!(
            s.on_auth(&conv.auth[..n]),
            Err(AuthFailure::Malformed(_))
        ));
    }
    let (mut source, _) = keyed_pair(15);
    let hb = source.seal_heartbeat(1);
    for n in 0..hb.len() {
        let (_, mut backup) = keyed_pair(15);
        assert!(backup.open(&hb[..n]).is_err(), "{n} bytes");
        let mut r = Reader::new();
        r.push(&hb[..n]);
        assert_eq!(r.next_frame(&mut backup), Ok(None));
    }
    // A byte too many is refused as well.
    let (_, mut backup) = keyed_pair(15);
    let mut long = hb.to_vec();
    long.push(0);
    assert!(matches!(
        backup.open(&long),
        Err(ProtocolError::BadPayload { .. })
    ));
}

#[test]
fn replayed_and_skipped_frames_are_refused_and_named() {
    let (mut source, mut backup) = keyed_pair(16);
    let f0 = source.seal(&Frame::Heartbeat { seq: 1 });
    let f1 = source.seal(&Frame::Heartbeat { seq: 2 });
    assert_eq!(backup.open(&f0), Ok(Frame::Heartbeat { seq: 1 }));
    let e = backup.open(&f0).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::Replayed {
            kind: Kind::Heartbeat,
            got: 0,
            expected: 1
        }
    );
    assert_eq!(
        e.to_string(),
        "replayed HEARTBEAT frame: sequence number 0, expected 1"
    );
    // The session refuses everything after an error, even the frame it expects.
    assert!(matches!(
        backup.open(&f1),
        Err(ProtocolError::SessionClosed(_))
    ));
    assert_eq!(backup.next_recv_seq(), None);

    let (mut source, mut backup) = keyed_pair(17);
    let _lost = source.seal(&Frame::StandDown);
    let e = backup.open(&source.seal(&Frame::Handoff)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "1 frame(s) missing: HANDOFF has sequence number 1, expected 0"
    );
}

#[test]
fn frames_from_another_session_or_the_other_direction_fail_their_tag() {
    let (mut source_a, _) = keyed_pair(18);
    let (mut source_b, mut backup_b) = keyed_pair(19);
    let from_a = source_a.seal(&Frame::Handoff);
    let e = backup_b.open(&from_a).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::BadMac {
            kind: Kind::Handoff,
            seq: 0
        }
    );
    assert!(e.to_string().contains("failed authentication"), "{e}");
    // Reflected back to its sender.
    let (mut source, _) = keyed_pair(20);
    let (mut source2, _) = keyed_pair(20);
    let mine = source.seal(&Frame::StandDown);
    assert!(matches!(
        source2.open(&mine),
        Err(ProtocolError::BadMac { .. })
    ));
    // And the same frame is fine in its own session.
    assert_eq!(
        backup_b.open(&source_b.seal(&Frame::Handoff)),
        Err(ProtocolError::SessionClosed("an earlier frame was refused"))
    );
}

/// Rewrites a HELLO's fields (keeping it well formed).
fn hello_with(pair: &str, node: &str, key_id: u16, nonce: [u8; 32]) -> Vec<u8> {
    wire::encode_hello(pair, node, key_id, &nonce)
}

#[test]
fn every_transcript_field_is_bound_altering_one_fails_the_handshake() {
    let c = creds(&[(1, 7)]);
    let (b0, hello) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(21));
    drop(b0);
    let h = wire::decode_hello(&hello).unwrap();
    let mut other_nonce = h.nonce;
    other_nonce[0] ^= 1;
    let altered_hellos = [
        ("pair id", hello_with("vm-43", &h.node, h.key_id, h.nonce)),
        ("node", hello_with(PAIR, "host-x/1", h.key_id, h.nonce)),
        ("key id", hello_with(PAIR, &h.node, 2, h.nonce)),
        ("nonce_b", hello_with(PAIR, &h.node, h.key_id, other_nonce)),
    ];
    for (what, altered) in altered_hellos {
        let (b, _) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(21));
        let s = SourceHandshake::on_hello(&c, PAIR, &altered, &mut Xorshift(22)).unwrap();
        let (_, welcome) = s.welcome(&info());
        assert!(
            matches!(
                b.on_welcome(&welcome),
                Err(HandshakeFailure::Protocol(
                    ProtocolError::WelcomeNotAuthentic { .. }
                ))
            ),
            "HELLO {what} altered"
        );
    }

    // WELCOME fields altered in transit, the MAC kept.
    let s = SourceHandshake::on_hello(&c, PAIR, &hello, &mut Xorshift(22)).unwrap();
    let (_, welcome) = s.welcome(&info());
    let mac = welcome[welcome.len() - 32..].to_vec();
    let nonce_s: [u8; 32] = welcome[welcome.len() - 64..welcome.len() - 32]
        .try_into()
        .unwrap();
    let mut other_nonce = nonce_s;
    other_nonce[31] ^= 0x80;
    let variants = [
        (
            "heartbeat",
            WelcomeInfo {
                heartbeat: Some(Duration::from_millis(11)),
                ..info()
            },
            nonce_s,
        ),
        (
            "no heartbeat",
            WelcomeInfo {
                heartbeat: None,
                ..info()
            },
            nonce_s,
        ),
        (
            "grace",
            WelcomeInfo {
                fence_grace: Duration::ZERO,
                ..info()
            },
            nonce_s,
        ),
        (
            "node",
            WelcomeInfo {
                node: String::new(),
                ..info()
            },
            nonce_s,
        ),
        ("nonce_s", info(), other_nonce),
    ];
    for (what, i, n) in variants {
        let mut altered = wire::encode_welcome_prefix(&i, &n);
        altered.extend_from_slice(&mac);
        let (b, _) = BackupHandshake::start(&c, PAIR, "host-b/1", &mut Xorshift(21));
        assert!(
            matches!(
                b.on_welcome(&altered),
                Err(HandshakeFailure::Protocol(
                    ProtocolError::WelcomeNotAuthentic { .. }
                ))
            ),
            "WELCOME {what} altered"
        );
    }
}

#[test]
fn a_wrong_key_fails_on_either_side() {
    let source = creds(&[(1, 1)]);
    let backup = creds(&[(1, 2)]);
    // The backup notices at the WELCOME.
    let (b, hello) = BackupHandshake::start(&backup, PAIR, "", &mut Xorshift(23));
    let s = SourceHandshake::on_hello(&source, PAIR, &hello, &mut Xorshift(24)).unwrap();
    let (s, welcome) = s.welcome(&info());
    let e = b.on_welcome(&welcome).unwrap_err();
    assert_eq!(
        e.to_string(),
        "WELCOME failed authentication: the source does not know key 1, or serves another \
         pair than \"vm-42\", or the handshake was altered in transit"
    );
    // A backup that sends an AUTH anyway (made with its key) is refused by the source.
    let h = [&hello[..], &welcome[..welcome.len() - 32]].concat();
    use hmac::Mac as _;
    let forged = session::keyed(&[2u8; 32])
        .chain_update(wire::LABEL_BACKUP)
        .chain_update(&h)
        .finalize();
    let mut mac = [0u8; 32];
    mac.copy_from_slice(forged.as_bytes());
    assert_eq!(
        s.on_auth(&wire::encode_auth(&mac)).unwrap_err(),
        AuthFailure::BadMac
    );
}

#[test]
fn unknown_key_or_pair_gets_a_welcome_shaped_like_a_real_one() {
    let source = creds(&[(1, 1)]);
    let real = creds(&[(1, 1)]);
    let unknown_id = creds(&[(5, 1)]);
    let welcome_for = |backup: &Credentials, pair: &str| {
        let (_, hello) = BackupHandshake::start(backup, pair, "", &mut Xorshift(25));
        let s = SourceHandshake::on_hello(&source, PAIR, &hello, &mut Xorshift(26)).unwrap();
        let reject = s.reject(RejectCode::Busy, "too many pending handshakes");
        let (s, welcome) = s.welcome(&info());
        (s, welcome, reject)
    };
    let (ok, w_ok, r_ok) = welcome_for(&real, PAIR);
    let (unknown, w_unknown, r_unknown) = welcome_for(&unknown_id, PAIR);
    let (other_pair, w_other, r_other) = welcome_for(&real, "vm-43");
    assert_eq!(ok.doomed(), None);
    assert_eq!(unknown.doomed(), Some(AuthFailure::UnknownKey(5)));
    assert_eq!(
        other_pair.doomed(),
        Some(AuthFailure::PairMismatch("vm-43".into()))
    );
    for (w, r) in [(&w_unknown, &r_unknown), (&w_other, &r_other)] {
        // Same length, same bytes up to the MAC (the source's nonce is the same: same RNG), a
        // MAC that differs (made with a throwaway key).
        assert_eq!(w.len(), w_ok.len());
        assert_eq!(w[..w.len() - 32], w_ok[..w_ok.len() - 32]);
        assert_ne!(w[w.len() - 32..], w_ok[w_ok.len() - 32..]);
        assert!(w[w.len() - 32..].iter().any(|&b| b != 0));
        assert_eq!(r.len(), r_ok.len());
        assert_eq!(r[..r.len() - 32], r_ok[..r_ok.len() - 32]);
        assert!(r[r.len() - 32..].iter().any(|&b| b != 0));
    }
    // Whatever the AUTH, the doomed handshakes fail (naming the cause to the source only).
    let any_auth = wire::encode_auth(&[0x55; 32]);
    assert_eq!(
        unknown.on_auth(&any_auth).unwrap_err(),
        AuthFailure::UnknownKey(5)
    );
    assert_eq!(
        other_pair.on_auth(&any_auth).unwrap_err(),
        AuthFailure::PairMismatch("vm-43".into())
    );
}

#[test]
fn the_answer_after_a_bad_auth_is_the_same_bytes_whatever_failed() {
    let source = creds(&[(1, 1)]);
    let (bytes, delay) = auth_failure_answer();
    assert_eq!(delay, AUTH_FAILURE_DELAY);
    let mut failures = Vec::new();
    let attempts: [(&Credentials, &str, Vec<u8>); 5] = [
        (&creds(&[(1, 1)]), PAIR, wire::encode_auth(&[1; 32])), // bad MAC
        (&creds(&[(9, 1)]), PAIR, wire::encode_auth(&[1; 32])), // unknown key
        (&creds(&[(1, 1)]), "vm-7", wire::encode_auth(&[1; 32])), // other pair
        (
            &creds(&[(1, 1)]),
            PAIR,
            vec![b'V', b'M', b'T', b'K', 2, 9, 0, 1, 0],
        ), // malformed
        (
            &creds(&[(1, 1)]),
            PAIR,
            Frame::StandDown.encode(), // not an AUTH (version 1 bytes)
        ),
    ];
    for (backup, pair, auth) in attempts {
        let (_, hello) = BackupHandshake::start(backup, pair, "", &mut Xorshift(27));
        let s = SourceHandshake::on_hello(&source, PAIR, &hello, &mut Xorshift(28)).unwrap();
        let (s, _) = s.welcome(&info());
        failures.push(s.on_auth(&auth).unwrap_err());
    }
    let distinct: std::collections::HashSet<String> =
        failures.iter().map(ToString::to_string).collect();
    assert_eq!(
        distinct.len(),
        failures.len(),
        "the source's log tells them apart"
    );
    // The backup gets one answer: a REJECT auth, and a backup past its WELCOME sees it as the end.
    let (_, mut backup) = keyed_pair(29);
    let mut r = Reader::new();
    r.push(bytes);
    let e = r.next_frame(&mut backup).unwrap_err();
    assert_eq!(e, ProtocolError::LateReject(RejectCode::Auth));
    assert!(e
        .to_string()
        .starts_with("REJECT (auth) after the handshake"));
    // A backup still in its handshake reads it as an unauthenticated REJECT auth.
    let c = creds(&[(1, 1)]);
    let (b, _) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(30));
    assert_eq!(
        b.on_welcome(bytes).unwrap_err(),
        HandshakeFailure::Rejected {
            code: RejectCode::Auth,
            reason: "authentication failed".into(),
            authenticated: false
        }
    );
    assert!(RejectCode::Auth.is_permanent());
    assert_eq!(RejectCode::Auth.as_str(), "auth");
}

#[test]
fn rejects_are_authenticated_only_by_the_key_holder_answering_this_hello() {
    let c = creds(&[(1, 1)]);
    let reject_seen =
        |source: &Credentials, backup: &Credentials, make: &dyn Fn(&SourceHandshake) -> Vec<u8>| {
            let (b, hello) = BackupHandshake::start(backup, PAIR, "", &mut Xorshift(31));
            let s = SourceHandshake::on_hello(source, PAIR, &hello, &mut Xorshift(32)).unwrap();
            b.on_welcome(&make(&s)).unwrap_err()
        };
    let stopping = |s: &SourceHandshake| s.reject(RejectCode::Stopping, "stopping");
    assert_eq!(
        reject_seen(&c, &c, &stopping),
        HandshakeFailure::Rejected {
            code: RejectCode::Stopping,
            reason: "stopping".into(),
            authenticated: true
        }
    );
    // Made with a throwaway key (the source lacks the backup's key), or with none.
    for (source, backup) in [
        (creds(&[(2, 1)]), creds(&[(1, 1)])),
        (Credentials::Insecure, Credentials::Insecure),
    ] {
        assert!(matches!(
            reject_seen(&source, &backup, &stopping),
            HandshakeFailure::Rejected {
                authenticated: false,
                ..
            }
        ));
    }
    let unauth = |_: &SourceHandshake| unauthenticated_reject(RejectCode::Stopping, "stopping");
    assert!(matches!(
        reject_seen(&c, &c, &unauth),
        HandshakeFailure::Rejected {
            authenticated: false,
            ..
        }
    ));
    // A REJECT for another HELLO (replayed from an earlier handshake) does not verify.
    let (_, other_hello) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(33));
    let old = SourceHandshake::on_hello(&c, PAIR, &other_hello, &mut Xorshift(34)).unwrap();
    let old_reject = old.reject(RejectCode::Stopping, "stopping");
    assert!(matches!(
        reject_seen(&c, &c, &|_| old_reject.clone()),
        HandshakeFailure::Rejected {
            authenticated: false,
            ..
        }
    ));
    // Any flipped bit of an authenticated REJECT: refused or unauthenticated.
    let (b0, hello) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(35));
    drop(b0);
    let s = SourceHandshake::on_hello(&c, PAIR, &hello, &mut Xorshift(36)).unwrap();
    let good = s.reject(RejectCode::Arbiter, "this source has no arbiter");
    let (_, good_after_welcome) = (0, {
        let (a, _) = s.welcome(&info());
        a.reject(RejectCode::Arbiter, "this source has no arbiter")
    });
    assert_eq!(good, good_after_welcome);
    for (bit, bad) in flips(&good) {
        let (b, _) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(35));
        assert!(
            !matches!(
                b.on_welcome(&bad),
                Err(HandshakeFailure::Rejected {
                    authenticated: true,
                    ..
                })
            ),
            "bit {bit}"
        );
    }
}

#[test]
fn keyed_and_insecure_sides_refuse_each_other() {
    let keyed = creds(&[(1, 1)]);
    let insecure = Credentials::Insecure;
    // An insecure backup at a keyed source, and the reverse: refused at the HELLO, saying why.
    for (source, backup, says) in [
        (&keyed, &insecure, "the backup has no key"),
        (&insecure, &keyed, "this source runs without authentication"),
    ] {
        let (_, hello) = BackupHandshake::start(backup, PAIR, "", &mut Xorshift(37));
        let e = SourceHandshake::on_hello(source, PAIR, &hello, &mut Xorshift(38)).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert_eq!(e.reject_code(), RejectCode::Auth);
        let reject = reject_for_error(&e);
        let (b, _) = BackupHandshake::start(backup, PAIR, "", &mut Xorshift(37));
        assert!(matches!(
            b.on_welcome(&reject),
            Err(HandshakeFailure::Rejected {
                code: RejectCode::Auth,
                authenticated: false,
                ..
            })
        ));
    }
    // A keyed backup never accepts an insecure WELCOME (a forger's zero MAC) ...
    let (b, hello) = BackupHandshake::start(&keyed, PAIR, "", &mut Xorshift(39));
    let h = wire::decode_hello(&hello).unwrap();
    let forged = {
        let insecure_hello = wire::encode_hello(PAIR, "", 0, &h.nonce);
        let s =
            SourceHandshake::on_hello(&insecure, PAIR, &insecure_hello, &mut Xorshift(40)).unwrap();
        s.welcome(&info()).1
    };
    assert!(matches!(
        b.on_welcome(&forged),
        Err(HandshakeFailure::Protocol(
            ProtocolError::WelcomeNotAuthentic { .. }
        ))
    ));
    // ... and an insecure backup refuses a WELCOME with a MAC.
    let (b, hello) = BackupHandshake::start(&insecure, PAIR, "", &mut Xorshift(41));
    let h = wire::decode_hello(&hello).unwrap();
    let keyed_hello = wire::encode_hello(PAIR, "", 1, &h.nonce);
    let s = SourceHandshake::on_hello(&keyed, PAIR, &keyed_hello, &mut Xorshift(42)).unwrap();
    let e = b.on_welcome(&s.welcome(&info()).1).unwrap_err();
    assert!(e.to_string().contains("this backup has no key"), "{e}");
    // Sessions: an insecure receiver refuses a tag, a keyed one refuses a zero tag.
    let (mut keyed_tx, mut keyed_rx) = keyed_pair(43);
    let conv = handshake(&insecure, &insecure, 44);
    let (mut insecure_tx, mut insecure_rx) = (conv.source, conv.backup);
    assert!(matches!(
        insecure_rx.open(&keyed_tx.seal(&Frame::Handoff)),
        Err(ProtocolError::AuthMode(_))
    ));
    assert!(matches!(
        keyed_rx.open(&insecure_tx.seal(&Frame::Handoff)),
        Err(ProtocolError::BadMac { .. })
    ));
    // Without keys, a pair mismatch is refused openly, as in version 1.
    let (_, hello) = BackupHandshake::start(&insecure, "vm-1", "", &mut Xorshift(45));
    assert_eq!(
        SourceHandshake::on_hello(&insecure, PAIR, &hello, &mut Xorshift(46)).unwrap_err(),
        ProtocolError::PairIdMismatch { got: "vm-1".into() }
    );
}

#[test]
fn a_version_1_peer_is_told_clearly_in_both_directions() {
    // A version 1 backup's HELLO at a version 2 source: refused at its version byte.
    let v1_hello = Frame::Hello {
        pair_id: PAIR.into(),
        node: String::new(),
        auth_tag: vec![],
    }
    .encode();
    let mut r = Reader::new();
    r.push(&v1_hello[..5]);
    let e = r.next_handshake().unwrap_err();
    assert_eq!(e, ProtocolError::PeerVersion { got: 1 });
    assert!(e
        .to_string()
        .starts_with("peer speaks protocol version 1; this build requires 2"));
    // The answer is a version 1 REJECT version, which a version 1 reader decodes.
    let answer = reject_for_error(&e);
    let mut v1 = protocol::FrameReader::new();
    v1.push(&answer);
    match v1.next_frame().unwrap() {
        Some(Frame::Reject { code, reason }) => {
            assert_eq!(code, RejectCode::Version);
            assert!(reason.contains("requires 2"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A version 1 source's answer at a version 2 backup.
    let mut r = Reader::new();
    r.push(
        &Frame::Welcome {
            heartbeat: None,
            node: String::new(),
            fence_grace: Duration::ZERO,
        }
        .encode(),
    );
    assert_eq!(
        r.next_handshake(),
        Err(ProtocolError::PeerVersion { got: 1 })
    );
    // And a version 2 frame at a version 1 reader is refused at its version byte too.
    let (_, hello) = BackupHandshake::start(&Credentials::Insecure, PAIR, "", &mut Xorshift(1));
    let mut v1 = protocol::FrameReader::new();
    v1.push(&hello);
    assert_eq!(v1.next_frame(), Err(ProtocolError::BadVersion(2)));
}

#[test]
fn the_reader_refuses_garbage_and_frames_out_of_phase_early() {
    let mut r = Reader::new();
    r.push(b"G");
    assert!(matches!(
        r.next_handshake(),
        Err(ProtocolError::BadMagic(_))
    ));
    // A sealed kind during the handshake: at its kind byte.
    let mut r = Reader::new();
    r.push(&[b'V', b'M', b'T', b'K', 2, Kind::Handoff as u8]);
    assert_eq!(
        r.next_handshake(),
        Err(ProtocolError::Unexpected("HANDOFF", "during the handshake"))
    );
    // A handshake kind after it.
    let (_, mut backup) = keyed_pair(47);
    for kind in [Kind::Hello, Kind::Welcome, Kind::Auth] {
        let mut r = Reader::new();
        r.push(&[b'V', b'M', b'T', b'K', 2, kind as u8]);
        assert_eq!(
            r.next_frame(&mut backup),
            Err(ProtocolError::Unexpected(
                kind.name(),
                "after the handshake"
            ))
        );
    }
    // Unknown kinds, oversized and undersized lengths.
    let mut r = Reader::new();
    r.push(&[b'V', b'M', b'T', b'K', 2, 12]);
    assert_eq!(r.next_handshake(), Err(ProtocolError::BadKind(12)));
    let mut r = Reader::new();
    r.push(&[b'V', b'M', b'T', b'K', 2, 1, 0x02, 0x01]);
    assert_eq!(r.next_handshake(), Err(ProtocolError::Oversized(513)));
    let mut r = Reader::new();
    r.push(&[b'V', b'M', b'T', b'K', 2, 4, 0, 23]);
    assert!(matches!(
        r.next_frame(&mut backup),
        Err(ProtocolError::BadPayload { .. })
    ));
    // Frames to the wrong machine.
    let c = creds(&[(1, 1)]);
    let (b, hello) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(48));
    assert_eq!(
        b.on_welcome(&hello).unwrap_err(),
        HandshakeFailure::Protocol(ProtocolError::Unexpected(
            "HELLO",
            "during the handshake (expected WELCOME or REJECT)"
        ))
    );
    let auth = wire::encode_auth(&[0; 32]);
    assert!(matches!(
        SourceHandshake::on_hello(&c, PAIR, &auth, &mut Xorshift(1)),
        Err(ProtocolError::Unexpected("AUTH", _))
    ));
}

/// Random byte streams never panic the v2 decoder and practically never decode to a frame.
#[test]
fn random_bytes_are_refused() {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let (_, mut backup) = keyed_pair(49);
    let mut frames = 0;
    for _ in 0..50_000 {
        let mut len = [0u8; 1];
        rng.fill(&mut len);
        let mut bytes = vec![0u8; usize::from(len[0] % 64)];
        rng.fill(&mut bytes);
        let mut r = Reader::new();
        r.push(&bytes);
        if let Ok(Some(_)) = r.next_handshake() {
            frames += 1;
        }
        let mut r = Reader::new();
        r.push(&bytes);
        if let Ok(Some(_)) = r.next_frame(&mut backup) {
            frames += 1;
        }
    }
    assert_eq!(frames, 0);
}

/// Whatever the handshake decoders accept is canonical: it encodes back to the same bytes.
#[test]
fn random_handshake_frames_decode_canonically_or_not_at_all() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(20_000));
    let kinds = prop_oneof![Just(1u8), Just(2u8), Just(3u8), Just(9u8)];
    let payload = proptest::collection::vec(any::<u8>(), 0..300);
    runner
        .run(&(kinds, payload), |(kind, payload)| {
            let mut frame = protocol::MAGIC.to_vec();
            frame.extend_from_slice(&[2, kind]);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(&payload);
            if let Ok(h) = wire::decode_hello(&frame) {
                let again = wire::encode_hello(&h.pair_id, &h.node, h.key_id, &h.nonce);
                prop_assert_eq!(&again, &frame);
            }
            if let Ok(w) = wire::decode_welcome(&frame) {
                let mut again = wire::encode_welcome_prefix(&w.info, &w.nonce);
                again.extend_from_slice(w.mac);
                prop_assert_eq!(&again, &frame);
            }
            if let Ok(r) = wire::decode_reject(&frame) {
                let mut again = wire::encode_reject_prefix(r.code, &r.reason);
                again.extend_from_slice(r.tag);
                prop_assert_eq!(&again, &frame);
            }
            if let Ok(m) = wire::decode_auth(&frame) {
                prop_assert_eq!(&wire::encode_auth(&m), &frame);
            }
            Ok(())
        })
        .unwrap();
}

/// Without keys the tag is all zeros, so random bodies reach the payload decoder: whatever a
/// session opens is canonical (sealing it again gives the same bytes).
#[test]
fn random_sealed_frames_open_canonically_or_not_at_all() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(20_000));
    let body = proptest::collection::vec(any::<u8>(), 0..300);
    runner
        .run(&(4u8..=8, body), |(kind, body)| {
            let mut frame = protocol::MAGIC.to_vec();
            frame.extend_from_slice(&[2, kind]);
            frame.extend_from_slice(&((body.len() + SEALED_OVERHEAD) as u16).to_be_bytes());
            frame.extend_from_slice(&[0; 8]);
            frame.extend_from_slice(&body);
            frame.extend_from_slice(&[0; TAG_LEN]);
            let conv = handshake(&Credentials::Insecure, &Credentials::Insecure, 50);
            let (mut tx, mut rx) = (conv.source, conv.backup);
            if let Ok(f) = rx.open(&frame) {
                prop_assert_eq!(tx.seal(&f), frame);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn sequence_numbers_end_safely() {
    let (mut source, mut backup) = keyed_pair(51);
    source.set_seqs(u64::MAX - 1, 0);
    backup.set_seqs(0, u64::MAX - 1);
    let a = source.seal(&Frame::StandDown);
    let b = source.seal(&Frame::StandDown);
    let c = source.seal(&Frame::StandDown);
    assert_eq!(source.next_send_seq(), u64::MAX);
    assert_eq!(backup.open(&a), Ok(Frame::StandDown));
    assert_eq!(backup.open(&b), Ok(Frame::StandDown));
    assert_eq!(backup.next_recv_seq(), None);
    assert_eq!(
        backup.open(&c),
        Err(ProtocolError::SessionClosed(
            "the sequence numbers are used up"
        ))
    );
}

#[test]
#[should_panic(expected = "REJECT is a handshake frame and is never sealed")]
fn sealing_a_handshake_frame_is_a_bug() {
    let (mut source, _) = keyed_pair(52);
    source.seal(&Frame::Reject {
        code: RejectCode::Busy,
        reason: String::new(),
    });
}

// ---------------------------------------------------------------------------------------------
// Secrets stay secret

#[test]
fn debug_output_never_shows_key_material() {
    let k = Key::new(3, &[0xab; 32]).unwrap();
    let c = Credentials::Keys(Arc::new(KeyRing::new([k.clone()]).unwrap()));
    let (b, hello) = BackupHandshake::start(&c, PAIR, "", &mut Xorshift(53));
    let s = SourceHandshake::on_hello(&c, PAIR, &hello, &mut Xorshift(54)).unwrap();
    let s_dbg = format!("{s:?}");
    let (a, welcome) = s.welcome(&info());
    let a_dbg = format!("{a:?}");
    let b_dbg = format!("{b:?}");
    let w = b.on_welcome(&welcome).unwrap();
    let w_dbg = format!("{w:?}");
    let acc = a.on_auth(&w.auth).unwrap();
    let outputs = [
        format!("{k:?}"),
        format!("{c:?}"),
        s_dbg,
        a_dbg,
        b_dbg,
        w_dbg,
        format!("{acc:?}"),
    ];
    for o in &outputs {
        assert!(!o.contains("171, 171"), "key bytes in {o}");
        assert!(!o.to_lowercase().contains("abab"), "key hex in {o}");
        assert!(!o.contains("q6ur"), "key base64 in {o}");
    }
    assert_eq!(
        format!("{k:?}"),
        "Key { id: 3, secret: <redacted, 32 bytes> }"
    );
    assert_eq!(format!("{c:?}"), "Keys(KeyRing { ids: [3] })");
}

// ---------------------------------------------------------------------------------------------
// Key files

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // 0..=31
const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="; // 32..=63

fn parse(text: &str) -> Result<KeyRing, KeyFileError> {
    KeyRing::parse(text, Path::new("/etc/vmtk/psk"))
}

#[test]
fn key_files_parse_with_comments_blank_lines_and_spacing() {
    let ring = parse(&format!(
        "# pair vm-42\n\n  2\t{K2}  \r\n# retired soon\n1 {K1}\n"
    ))
    .unwrap();
    assert_eq!(ring.ids().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(ring.newest().id(), 2);
    assert_eq!(ring.get(1).unwrap().secret(), (0u8..32).collect::<Vec<_>>());
    assert_eq!(
        ring.get(2).unwrap().secret(),
        (32u8..64).collect::<Vec<_>>()
    );
    assert!(ring.get(3).is_none());
}

#[test]
fn key_file_errors_name_the_file_the_line_and_what_is_allowed_but_no_key() {
    let short = "AAECAwQFBgcICQoLDA0ODw=="; // 16 bytes
    let cases = [
        (format!("# c\n{K1}\n"), 2, "found 1 field(s)"),
        (format!("1 {K1} extra\n"), 1, "found 3 field(s)"),
        (format!("0 {K1}\n"), 1, "must be a number 1..=65535"),
        (format!("65536 {K1}\n"), 1, "must be a number 1..=65535"),
        (format!("+1 {K1}\n"), 1, "must be a number 1..=65535"),
        (format!("one {K1}\n"), 1, "must be a number 1..=65535"),
        ("1 not*base64\n".to_string(), 1, "not valid base64"),
        (
            format!("1 {}\n", &K1[..K1.len() - 1]),
            1,
            "not valid base64",
        ),
        (format!("1 {short}\n"), 1, "at least 32 random bytes"),
        (format!("1 {K1}\n\n1 {K2}\n"), 3, "already used on line 1"),
        (
            format!("1 {}\n", "A".repeat(1400)),
            1,
            "longer than 1024 bytes",
        ),
    ];
    for (text, line, says) in cases {
        let e = parse(&text).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("key file /etc/vmtk/psk, line {line}: ")),
            "{msg}"
        );
        assert!(msg.contains(says), "{msg} (expected {says:?})");
        for secret in [K1, K2, short] {
            assert!(!msg.contains(&secret[..8]), "key material in {msg}");
        }
    }
    let e = parse("# nothing\n\n").unwrap_err().to_string();
    assert!(
        e.starts_with("key file /etc/vmtk/psk holds no key: add a line"),
        "{e}"
    );
}

#[test]
fn key_files_must_be_private_regular_files() {
    let dir = TempDir::new("perm");
    let text = format!("1 {K1}\n");
    for mode in [0o600, 0o400] {
        let p = dir.file(&format!("ok-{mode:o}"), &text, mode);
        assert_eq!(KeyRing::load(&p).unwrap().newest().id(), 1);
    }
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
        let p = dir.file(&format!("bad-{mode:o}"), &text, mode);
        let e = KeyRing::load(&p).unwrap_err();
        assert!(
            matches!(e, KeyFileError::Permissions { mode: m, .. } if m == mode),
            "{mode:o}: {e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }
    let e = KeyRing::load(&dir.0).unwrap_err();
    assert!(matches!(e, KeyFileError::NotAFile { .. }), "{e}");
    let e = KeyRing::load(&dir.0.join("missing")).unwrap_err();
    assert!(matches!(e, KeyFileError::Io { .. }), "{e}");
    // Not UTF-8: the line is named.
    let p = dir.file("binary", "", 0o600);
    std::fs::write(&p, b"# ok\n1 \xff\xfe\n").unwrap();
    let e = KeyRing::load(&p).unwrap_err().to_string();
    assert!(e.ends_with("line 2: not UTF-8 text"), "{e}");
    // Owned by another user (only root can make such a file).
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let p = dir.file("other-owner", &text, 0o600);
        std::os::unix::fs::chown(&p, Some(54321), None).unwrap();
        let e = KeyRing::load(&p).unwrap_err();
        assert!(matches!(e, KeyFileError::Owner { uid: 54321, .. }), "{e}");
    }
}

#[test]
fn keygen_makes_a_private_file_never_overwrites_and_adds_keys_for_rotation() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("keygen");
    let p = dir.0.join("psk");
    assert_eq!(keygen(&p).unwrap(), 1);
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
    let ring = KeyRing::load(&p).unwrap();
    assert_eq!(ring.ids().collect::<Vec<_>>(), [1]);
    assert_eq!(ring.newest().secret().len(), KEYGEN_LEN);
    let first = ring.newest().secret().to_vec();
    // Never overwrites.
    let e = keygen(&p).unwrap_err();
    assert!(matches!(e, KeyFileError::Exists { .. }), "{e}");
    assert_eq!(KeyRing::load(&p).unwrap().newest().secret(), &first[..]);
    // Rotation: the next id, the old key kept.
    assert_eq!(keygen_add(&p).unwrap(), 2);
    let ring = KeyRing::load(&p).unwrap();
    assert_eq!(ring.ids().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(ring.get(1).unwrap().secret(), &first[..]);
    assert_ne!(ring.get(2).unwrap().secret(), &first[..]);
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
    // A hand-edited file without a final newline, and one with the last id taken.
    let p2 = dir.file("edited", &format!("7 {K1}"), 0o600);
    assert_eq!(keygen_add(&p2).unwrap(), 8);
    assert_eq!(
        KeyRing::load(&p2).unwrap().ids().collect::<Vec<_>>(),
        [7, 8]
    );
    let p3 = dir.file("full", &format!("65535 {K1}\n"), 0o600);
    assert!(matches!(
        keygen_add(&p3).unwrap_err(),
        KeyFileError::IdsExhausted { .. }
    ));
    // keygen --add checks the file like a load.
    let p4 = dir.file("open", &format!("1 {K1}\n"), 0o644);
    assert!(matches!(
        keygen_add(&p4).unwrap_err(),
        KeyFileError::Permissions { .. }
    ));
    // And keygen does not follow a symbolic link planted at the path.
    let link = dir.0.join("link");
    std::os::unix::fs::symlink(dir.0.join("target"), &link).unwrap();
    assert!(keygen(&link).is_err());
    assert!(!dir.0.join("target").exists());
}

#[test]
fn keys_and_rings_check_their_inputs() {
    assert_eq!(Key::new(0, &[1; 32]).unwrap_err(), InvalidKey::ZeroId);
    assert_eq!(
        Key::new(1, &[1; 31]).unwrap_err(),
        InvalidKey::TooShort { id: 1, len: 31 }
    );
    assert!(Key::new(1, &[1; MAX_KEY_LEN]).is_ok());
    assert!(Key::new(1, &[1; MAX_KEY_LEN + 1]).is_err());
    assert_eq!(
        KeyRing::new([key(1, 1), key(1, 2)]).unwrap_err(),
        InvalidKey::Duplicate(1)
    );
    assert_eq!(KeyRing::new([]).unwrap_err(), InvalidKey::Empty);
}

#[test]
fn long_keys_work_end_to_end() {
    let long = Credentials::Keys(Arc::new(
        KeyRing::new([Key::new(1, &[9; 200]).unwrap()]).unwrap(),
    ));
    let conv = handshake(&long, &long, 55);
    let (mut s, mut b) = (conv.source, conv.backup);
    assert_eq!(
        b.open(&s.seal_heartbeat(1)),
        Ok(Frame::Heartbeat { seq: 1 })
    );
    let _ = Scripted(vec![]);
}

/// From fuzzing (`frame_handshake`, the first run): a bad magic is refused as soon as its first
/// wrong byte arrives, however the stream is cut; what the error quotes is what had arrived by
/// then (so a byte-by-byte reader quotes less than one given the whole stream).
#[test]
fn a_bad_magic_is_refused_at_its_first_wrong_byte_however_the_bytes_arrive() {
    let stream = b"MVTK\x02\x01\x00\x00";
    let mut r = Reader::new();
    r.push(&stream[..1]);
    assert_eq!(
        r.next_handshake(),
        Err(ProtocolError::BadMagic([b'M', 0, 0, 0]))
    );
    let mut r = Reader::new();
    r.push(stream);
    assert_eq!(r.next_handshake(), Err(ProtocolError::BadMagic(*b"MVTK")));
    // A correct prefix waits for more.
    let mut r = Reader::new();
    r.push(b"VMT");
    assert_eq!(r.next_handshake(), Ok(None));
}

#[test]
fn both_ends_name_the_link_alike_and_each_link_differently() {
    let (s1, b1) = keyed_pair(1);
    let (s2, b2) = keyed_pair(2);
    assert_eq!(b1.link_id(), s1.link_id());
    assert_eq!(b2.link_id(), s2.link_id());
    assert_ne!(b1.link_id(), b2.link_id());
    let hex = b1.link_id().to_hex();
    assert_eq!(hex.len(), 32);
    assert_eq!(LinkId::from_hex(&hex), Some(b1.link_id()));
    for bad in [
        "",
        "00",
        &hex[..31],
        &format!("{}g", &hex[..31]),
        &format!("{hex}0"),
    ] {
        assert_eq!(LinkId::from_hex(bad), None, "{bad:?}");
    }
}

#[test]
fn data_frames_open_once_in_order_and_refuse_any_change() {
    // The backup seals, the source opens.
    let (mut s, mut b) = keyed_pair(3);
    let body = vec![7u8; 70_000];
    let (seq0, tag0) = b.seal_data(&body);
    let (seq1, tag1) = b.seal_data(b"second");
    assert_eq!((seq0, seq1), (0, 1));
    // Any change to the body, the sequence number or the tag is refused (each on a fresh session,
    // since a session refuses everything after one error).
    let fresh = || keyed_pair(3).0;
    let mut altered = body.clone();
    altered[69_999] ^= 1;
    assert!(matches!(
        fresh().open_data(seq0, &altered, &tag0),
        Err(ProtocolError::BadMac {
            kind: Kind::Data,
            seq: 0
        })
    ));
    assert!(fresh().open_data(seq0, &body[..69_999], &tag0).is_err());
    let mut bad_tag = tag0;
    bad_tag[0] ^= 0x80;
    assert!(fresh().open_data(seq0, &body, &bad_tag).is_err());
    // Out of order: the second before the first is a gap.
    assert!(matches!(
        fresh().open_data(seq1, b"second", &tag1),
        Err(ProtocolError::Skipped { .. })
    ));
    // In order they open; a replay is refused.
    s.open_data(seq0, &body, &tag0).unwrap();
    s.open_data(seq1, b"second", &tag1).unwrap();
    assert!(matches!(
        s.open_data(seq1, b"second", &tag1),
        Err(ProtocolError::SessionClosed(_) | ProtocolError::Replayed { .. })
    ));
    // The other direction has its own key: the backup's data does not open as the source's.
    let (mut s, mut b) = keyed_pair(4);
    let (seq, tag) = s.seal_data(b"ack");
    assert!(s.open_data(seq, b"ack", &tag).is_err());
    b.open_data(seq, b"ack", &tag).unwrap();
}
