// SPDX-License-Identifier: Apache-2.0
//! Fixtures shared by the fuzz targets and the seed corpus generator: deterministic entropy, so
//! that a target rebuilds exactly the handshake the seeds were recorded from, and the seeds.
//!
//! Input layout of every target: byte 0 picks the credentials (bit 0: 0 keyed, 1
//! `--insecure-no-auth`) and how the stream is cut when fed to a reader (bits 1..=4: chunks of
//! 1..=16 bytes); the rest is the byte stream one side receives.

use std::sync::Arc;
use std::time::Duration;

use vmm_takeover_core::auth::{
    BackupHandshake, Credentials, Entropy, Key, KeyRing, Session, SourceHandshake, WelcomeInfo,
};
use vmm_takeover_core::protocol::{Frame, HandoffStatus, RejectCode};

/// The pair every fixture serves.
pub const PAIR: &str = "vm-42";
/// The backup's node name.
pub const NODE: &str = "host-b/1";

/// Deterministic "random" bytes (splitmix64): the same seed gives the same nonces.
pub struct Fixed(u64);

impl Fixed {
    /// The backup's entropy.
    pub fn backup() -> Fixed {
        Fixed(1)
    }

    /// The source's entropy.
    pub fn source() -> Fixed {
        Fixed(2)
    }
}

impl Entropy for Fixed {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *b = (z ^ (z >> 31)) as u8;
        }
    }
}

/// The credentials byte 0 picks: a ring of keys 1 and 2 (a backup uses 2), or none.
pub fn credentials(mode: u8) -> Credentials {
    if mode & 1 == 0 {
        let keys = [
            Key::new(1, &[0x11; 32]).expect("key"),
            Key::new(2, &[0x22; 32]).expect("key"),
        ];
        Credentials::Keys(Arc::new(KeyRing::new(keys).expect("ring")))
    } else {
        Credentials::Insecure
    }
}

/// The chunk size byte 0 picks.
pub fn chunk(mode: u8) -> usize {
    usize::from((mode >> 1) & 0x0f) + 1
}

/// What the fixture source announces.
pub fn welcome_info() -> WelcomeInfo {
    WelcomeInfo {
        heartbeat: Some(Duration::from_millis(10)),
        node: "host-a/1".into(),
        fence_grace: Duration::from_millis(1500),
    }
}

/// The fixture handshake's messages and sessions.
pub struct Recorded {
    /// backup → source.
    pub hello: Vec<u8>,
    /// source → backup.
    pub welcome: Vec<u8>,
    /// backup → source.
    pub auth: Vec<u8>,
    /// The source's session.
    pub source: Session,
    /// The backup's session.
    pub backup: Session,
}

/// The fixture handshake for `mode`.
pub fn record(mode: u8) -> Recorded {
    let creds = credentials(mode);
    let (b, hello) = BackupHandshake::start(&creds, PAIR, NODE, &mut Fixed::backup());
    let s = SourceHandshake::on_hello(&creds, PAIR, &hello, &mut Fixed::source()).expect("HELLO");
    let (s, welcome) = s.welcome(&welcome_info());
    let w = b.on_welcome(&welcome).expect("WELCOME");
    let a = s.on_auth(&w.auth).expect("AUTH");
    Recorded {
        hello,
        welcome,
        auth: w.auth,
        source: a.session,
        backup: w.session,
    }
}

/// Frames a source sends once armed.
pub fn source_frames() -> Vec<Frame> {
    vec![
        Frame::Heartbeat { seq: 1 },
        Frame::Heartbeat { seq: 2 },
        Frame::StandDown,
        Frame::Handoff,
        Frame::Evict {
            reason: "HELLO on an armed link".into(),
        },
    ]
}

/// Frames a backup sends once armed.
pub fn backup_frames() -> Vec<Frame> {
    vec![
        Frame::HandoffResult {
            status: HandoffStatus::Started,
            detail: String::new(),
        },
        Frame::HandoffResult {
            status: HandoffStatus::Failed,
            detail: "cont: VM is dead".into(),
        },
    ]
}

/// The seed corpus: (target, file name, bytes), all real encodings.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for mode in [0u8, 1] {
        let m = if mode == 0 { "keyed" } else { "insecure" };
        let r = record(mode);
        let mut src = record(mode).source;
        let sealed_s: Vec<u8> = source_frames().iter().flat_map(|f| src.seal(f)).collect();
        let mut bk = record(mode).backup;
        let sealed_b: Vec<u8> = backup_frames().iter().flat_map(|f| bk.seal(f)).collect();
        let creds = credentials(mode);
        let s =
            SourceHandshake::on_hello(&creds, PAIR, &r.hello, &mut Fixed::source()).expect("HELLO");
        let busy = s.reject(RejectCode::Busy, "too many pending handshakes");
        let stopping = s.reject(RejectCode::Stopping, "stopping");
        let (fixed_reject, _) = vmm_takeover_core::auth::auth_failure_answer();
        let with_mode = |bytes: &[&[u8]]| -> Vec<u8> {
            let mut v = vec![mode];
            for b in bytes {
                v.extend_from_slice(b);
            }
            v
        };

        for (name, bytes) in [
            ("hello", &r.hello[..]),
            ("welcome", &r.welcome[..]),
            ("auth", &r.auth[..]),
            ("reject", &busy[..]),
            ("reject-auth", fixed_reject),
        ] {
            out.push((
                "frame_handshake",
                format!("{m}-{name}"),
                with_mode(&[bytes]),
            ));
        }
        out.push((
            "frame_handshake",
            format!("{m}-all"),
            with_mode(&[&r.hello, &r.welcome, &r.auth, &busy]),
        ));
        out.push((
            "frame_sealed",
            format!("{m}-source"),
            with_mode(&[&sealed_s]),
        ));
        out.push((
            "frame_sealed",
            format!("{m}-late-reject"),
            with_mode(&[&sealed_s[..40], fixed_reject]),
        ));
        out.push((
            "backup_handshake",
            format!("{m}-welcome"),
            with_mode(&[&r.welcome, &sealed_s]),
        ));
        out.push(("backup_handshake", format!("{m}-busy"), with_mode(&[&busy])));
        out.push((
            "backup_handshake",
            format!("{m}-stopping"),
            with_mode(&[&stopping]),
        ));
        out.push((
            "source_handshake",
            format!("{m}-hello-auth"),
            with_mode(&[&r.hello, &r.auth, &sealed_b]),
        ));
        out.push((
            "source_handshake",
            format!("{m}-hello"),
            with_mode(&[&r.hello]),
        ));
    }
    // A version 1 peer.
    let v1 = Frame::Hello {
        pair_id: PAIR.into(),
        node: String::new(),
        auth_tag: vec![],
    }
    .encode();
    out.push((
        "frame_handshake",
        "v1-hello".into(),
        [&[0u8][..], &v1].concat(),
    ));
    out.push((
        "source_handshake",
        "v1-hello".into(),
        [&[0u8][..], &v1].concat(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `corpus/<target>/<name>`:
    /// `cargo test --manifest-path fuzz/Cargo.toml --lib -- --ignored write_seed_corpus`.
    #[test]
    #[ignore = "writes the seed corpus into the source tree"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, name, bytes) in seeds() {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// The fixtures are deterministic: a target rebuilds the recorded handshake.
    #[test]
    fn fixtures_replay() {
        for mode in [0, 1] {
            let a = record(mode);
            let b = record(mode);
            assert_eq!(a.hello, b.hello);
            assert_eq!(a.welcome, b.welcome);
            assert_eq!(a.auth, b.auth);
        }
    }
}
