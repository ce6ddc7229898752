// SPDX-License-Identifier: Apache-2.0
//! Checks the code against the worked example in `docs/protocol.md` ("Test vector"): the
//! document is the reference, not a copy of the code.

use std::sync::Arc;
use std::time::Duration;

use super::handshake::session_keys;
use super::*;
use crate::protocol::{Frame, HandoffStatus, RejectCode};

const DOC: &str = include_str!("../../../../docs/protocol.md");

/// The bytes of vector `name`: the fenced block after `<!-- vector:name -->`, hex with `#`
/// comments.
fn vector(name: &str) -> Vec<u8> {
    let marker = format!("<!-- vector:{name} -->");
    let start = DOC
        .find(&marker)
        .unwrap_or_else(|| panic!("vector {name} missing from docs/protocol.md"));
    let rest = &DOC[start + marker.len()..];
    let open = rest
        .find("```text\n")
        .expect("vector without a ```text block")
        + 8;
    let close = rest[open..].find("```").expect("unterminated vector block") + open;
    let hex: String = rest[open..close]
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    assert!(
        hex.len().is_multiple_of(2),
        "vector {name}: odd number of hex digits"
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .unwrap_or_else(|_| panic!("vector {name}: bad hex {:?}", &hex[i..i + 2]))
        })
        .collect()
}

/// Hands out the given bytes in order.
pub(super) struct Scripted(pub(super) Vec<u8>);

impl Entropy for Scripted {
    fn fill(&mut self, buf: &mut [u8]) {
        assert!(self.0.len() >= buf.len(), "scripted entropy ran out");
        let rest = self.0.split_off(buf.len());
        buf.copy_from_slice(&self.0);
        self.0 = rest;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[track_caller]
fn same(name: &str, got: &[u8]) {
    assert_eq!(hex(got), hex(&vector(name)), "vector {name}");
}

#[test]
fn the_code_matches_the_documented_test_vector() {
    let key = Key::new(1, &vector("key")).unwrap();
    let creds = Credentials::Keys(Arc::new(KeyRing::new([key]).unwrap()));
    let nonce_b: [u8; 32] = vector("nonce_b").try_into().unwrap();
    let nonce_s: [u8; 32] = vector("nonce_s").try_into().unwrap();

    let (b, hello) = BackupHandshake::start(
        &creds,
        "vm-42",
        "host-b/4242",
        &mut Scripted(nonce_b.to_vec()),
    );
    same("hello", &hello);

    // The source draws its nonce, then a throwaway key it does not use here.
    let mut rng = Scripted([nonce_s.to_vec(), vec![0xee; 32]].concat());
    let s = SourceHandshake::on_hello(&creds, "vm-42", &hello, &mut rng).unwrap();
    same(
        "reject_busy",
        &s.reject(RejectCode::Busy, "too many pending handshakes"),
    );
    let info = WelcomeInfo {
        heartbeat: Some(Duration::from_millis(10)),
        node: "host-a/1".into(),
        fence_grace: Duration::from_millis(1500),
    };
    let (s, welcome) = s.welcome(&info);
    same("welcome", &welcome);

    let w = b.on_welcome(&welcome).unwrap();
    assert_eq!(w.welcome, info);
    same("auth", &w.auth);
    let mut backup = w.session;
    let mut source = s.on_auth(&w.auth).unwrap().session;

    let (k_sb, k_bs) = session_keys(&vector("key"), &nonce_b, &nonce_s);
    same("k_sb", &k_sb[..]);
    same("k_bs", &k_bs[..]);

    let hb = source.seal_heartbeat(1);
    same("heartbeat", &hb);
    same("handoff", &source.seal(&Frame::Handoff));
    let result = Frame::HandoffResult {
        status: HandoffStatus::Started,
        detail: "vm started".into(),
    };
    same("handoff_result", &backup.seal(&result));

    // And the documented frames open as what they say.
    assert_eq!(
        backup.open(&vector("heartbeat")),
        Ok(Frame::Heartbeat { seq: 1 })
    );
    assert_eq!(backup.open(&vector("handoff")), Ok(Frame::Handoff));
    assert_eq!(source.open(&vector("handoff_result")), Ok(result));

    same("reject_auth", auth_failure_answer().0);
}

#[test]
fn the_documented_key_file_line_loads_as_the_vector_key() {
    let line = DOC
        .lines()
        .find(|l| l.contains("<!-- vector:key -->"))
        .and(DOC.split("key file line: `").nth(1))
        .and_then(|r| r.split('`').next())
        .expect("the key file line of the vector");
    let ring = KeyRing::parse(line, std::path::Path::new("doc")).unwrap();
    assert_eq!(ring.newest().secret(), &vector("key")[..]);
}
