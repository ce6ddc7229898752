// SPDX-License-Identifier: Apache-2.0
//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use vmm_takeover_core::{TakeoverReason, TakeoverRecord};
use vmm_takeover_guest::{DummyVm, DummyVmConfig, KvmDummyError};

/// Says why a test (or benchmark row) cannot run here: prints `SKIPPED: why` on stdout and
/// stderr (visible with and without output capture), and **panics** when `CI=true`, where
/// everything a test needs (`/dev/kvm`, QEMU) must be present: a skip there would hide a broken
/// machine as a green run.
pub fn skip(why: impl std::fmt::Display) {
    println!("SKIPPED: {why}");
    eprintln!("SKIPPED: {why}");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true, so this may not be skipped: {why}");
    }
}

/// A paused dummy VM built from `cfg`, or `None` (after [`skip`] said why) when `/dev/kvm`
/// cannot be opened; any other failure is the test's.
pub fn vm_or_skip(cfg: DummyVmConfig) -> Option<DummyVm> {
    match DummyVm::with_config(cfg) {
        Ok(vm) => Some(vm),
        Err(
            e @ (KvmDummyError::KvmMissing
            | KvmDummyError::KvmPermission
            | KvmDummyError::KvmNoDevice(_)
            | KvmDummyError::KvmOpen(_)),
        ) => {
            skip(e);
            None
        }
        Err(e) => panic!("cannot create the dummy VM although /dev/kvm opened: {e}"),
    }
}

/// A takeover record as the backup would build it.
pub fn record(reason: TakeoverReason, errno: Option<i32>) -> TakeoverRecord {
    TakeoverRecord {
        reason,
        pair_id: "test-pair".to_string(),
        armed_at: SystemTime::now(),
        detected_at: SystemTime::now(),
        detected_instant: Instant::now(),
        keepalive: None,
        heartbeat: None,
        errno,
        epoch: None,
        link: None,
        detail: "test".to_string(),
    }
}

/// A unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-takeover-guest-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
