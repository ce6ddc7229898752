// SPDX-License-Identifier: Apache-2.0
//! Wiring vmm-takeover into a VMM's own event loop.
//!
//! A real deployment has the source subscriber in the source VMM's `EventManager` and the backup
//! subscriber in the backup VMM's, on two hosts. Here both share one loop on loopback so the whole
//! exchange fits in one program: arm, planned handoff, `vm_start` on the backup.
//!
//! `cargo run --example embed`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_takeover_core::auth::{Credentials, Key, KeyRing};
use vmm_takeover_core::{
    BackupConfig, BackupMonitor, BackupNotice, HookError, SourceConfig, SourceListener,
    SourceNotice, TakeoverRecord, VmPause,
};

/// The source VMM's guest, as far as a handoff is concerned: pause it, and resume it if the
/// backup fails to start its copy.
struct LocalGuest;

impl VmPause for LocalGuest {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        println!("vm_pause: vCPUs parked");
        Ok(())
    }
    fn vm_resume(&mut self) -> Result<(), HookError> {
        println!("vm_resume: vCPUs running again");
        Ok(())
    }
    fn describe(&self) -> String {
        "local guest".into()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new()
        .map_err(|e| format!("event manager: {e:?}"))?;

    // Source VMM: listen for backups. Its handle is what an API thread keeps: calls through it
    // are carried out on the loop.
    // Both sides hold the pair's key (a key file from `vmm-takeover keygen` in production:
    // `KeyRing::load`); here a fixed example key.
    let keys = Credentials::Keys(Arc::new(KeyRing::new([Key::new(1, &[0x42; 32])?])?));
    let mut cfg = SourceConfig::new("127.0.0.1:0".parse()?, "vm-1");
    cfg.credentials = keys.clone();
    let handed_off = Arc::new(AtomicBool::new(false));
    let h = handed_off.clone();
    let mut source = SourceListener::new(
        cfg,
        Box::new(move |n: &SourceNotice| {
            println!("source: {n:?}");
            if let SourceNotice::HandoffComplete { .. } = n {
                h.store(true, Ordering::Relaxed);
            }
        }),
    )?;
    source.set_pause_hook(Box::new(LocalGuest));
    let addr = source.local_addr();
    let source_api = source.handle();
    em.add_subscriber(Arc::new(Mutex::new(source)));

    // Backup VMM: the hook resumes the standby guest. It runs on its own thread, at most once.
    let hook = |r: &TakeoverRecord| -> Result<(), HookError> {
        println!("vm_start: resuming the standby guest ({})", r.reason);
        Ok(())
    };
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let mut bcfg = BackupConfig::new(addr, "vm-1");
    bcfg.credentials = keys;
    let backup = BackupMonitor::new(
        bcfg,
        Box::new(hook),
        Box::new(move |n: &BackupNotice| {
            println!("backup: {n:?}");
            if let BackupNotice::Armed { .. } = n {
                a.store(true, Ordering::Relaxed);
            }
        }),
    )?;
    em.add_subscriber(Arc::new(Mutex::new(backup)));

    while !armed.load(Ordering::Relaxed) {
        em.run_with_timeout(1000)
            .map_err(|e| format!("loop: {e:?}"))?;
    }
    // Planned switchover: pause (off the loop), HANDOFF, the backup's vm_start, its report.
    source_api.begin_handoff();
    while !handed_off.load(Ordering::Relaxed) {
        em.run_with_timeout(1000)
            .map_err(|e| format!("loop: {e:?}"))?;
    }
    Ok(())
}
