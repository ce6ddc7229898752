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
use vmm_takeover_core::{
    BackupConfig, BackupMonitor, BackupNotice, HookError, SourceConfig, SourceListener,
    SourceNotice, TakeoverRecord,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new()
        .map_err(|e| format!("event manager: {e:?}"))?;

    // Source VMM: listen for backups.
    let cfg = SourceConfig::new("127.0.0.1:0".parse()?, "vm-1");
    let source = Arc::new(Mutex::new(SourceListener::new(
        cfg,
        Box::new(|n: &SourceNotice| println!("source: {n:?}")),
    )?));
    let addr = source.lock().unwrap().local_addr();
    em.add_subscriber(source.clone());

    // Backup VMM: the hook resumes the standby guest. It runs on its own thread, at most once.
    let hook = |r: &TakeoverRecord| -> Result<(), HookError> {
        println!("vm_start: resuming the standby guest ({})", r.reason);
        Ok(())
    };
    let armed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (a, d) = (armed.clone(), done.clone());
    let backup = BackupMonitor::new(
        BackupConfig::new(addr, "vm-1"),
        Box::new(hook),
        Box::new(move |n: &BackupNotice| {
            println!("backup: {n:?}");
            match n {
                BackupNotice::Armed { .. } => a.store(true, Ordering::Relaxed),
                BackupNotice::HookFinished { .. } => d.store(true, Ordering::Relaxed),
                _ => {}
            }
        }),
    )?;
    em.add_subscriber(Arc::new(Mutex::new(backup)));

    while !armed.load(Ordering::Relaxed) {
        em.run_with_timeout(1000)
            .map_err(|e| format!("loop: {e:?}"))?;
    }
    // Planned switchover: pause the local guest first (not shown), then hand off.
    println!(
        "handing off to {} backup(s)",
        source.lock().unwrap().handoff()
    );
    while !done.load(Ordering::Relaxed) {
        em.run_with_timeout(1000)
            .map_err(|e| format!("loop: {e:?}"))?;
    }
    Ok(())
}
