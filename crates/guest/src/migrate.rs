// SPDX-License-Identifier: Apache-2.0
//! A planned handoff by QEMU's own live migration: the source's pause hook is "migrate to the
//! backup's QEMU and wait until it completed".
//!
//! [`QmpMigrate::vm_pause`] enables the `events` capability (so `MIGRATION` events reach every
//! QMP client watching) and `pause-before-switchover`, sends `migrate` to the destination URI (a
//! QEMU started with `-S -incoming`), and follows `query-migrate` until QEMU reports `completed`,
//! `failed` or `cancelled`: QEMU says when it is done, nothing here guesses. Only `completed`
//! with the source in `postmigrate` counts as paused; then the core sends HANDOFF and the backup
//! resumes the migrated guest with `cont`.
//!
//! **The point of no return.** With `pause-before-switchover` QEMU stops the guest and waits in
//! `pre-switchover` before it sends the device state; only then does the hook say
//! `migrate-continue`. Before that point the destination cannot hold a complete image, so the
//! migration may be cancelled (an abort, the deadline, every backup gone) and the guest run on
//! here. From that point on the migration is *committed*: QEMU does not promise that both ends
//! agree on how a late failure ended (the destination may have loaded everything), so a
//! committed migration is never cancelled, and if it does not end `completed` the guest is
//! stopped again and never resumed here: an operator decides.
//!
//! One QMP session follows the migration (`query-migrate` every millisecond), but it is given up
//! and opened again every 200 ms rather than held for the whole migration: QEMU serves one
//! client per monitor, and the source's health check must keep getting through while a long
//! migration runs.
//!
//! [`QmpMigrate::vm_resume`] (the handoff failed) lets the guest run on here only if no migration
//! was committed and the guest ran before the handoff; after a completed or committed migration
//! it refuses, for good: the destination may hold the guest, and a source that ran on could be a
//! second copy the moment anyone resumes the destination. [`QmpMigrate::vm_fence`] (the lease ran
//! out) cancels an uncommitted migration and stops the guest with QMP `stop`, without waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde_json::{json, Value};
use vmm_takeover_core::{AbortHandle, HookError, VmPause};

use crate::qmp::{QmpClient, QmpError, QmpVm};

/// How often `query-migrate` is asked while a migration runs: the time from QEMU's `completed`
/// to HANDOFF is at most this (plus one QMP round trip).
pub const POLL: Duration = Duration::from_millis(1);

/// How long one QMP session follows a migration before it makes way for other clients.
const SESSION: Duration = Duration::from_millis(200);

/// Why a migration handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The URI is not one QEMU's `migrate` takes here.
    #[error(
        "--migrate-to {0:?} is not allowed: expected tcp:HOST:PORT (the backup's QEMU started \
         with -S -incoming tcp:HOST:PORT) or unix:PATH"
    )]
    BadUri(String),
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU reported the migration `failed` or `cancelled`.
    #[error("the live migration to {uri} ended {status}: {desc}")]
    Ended {
        /// The destination.
        uri: String,
        /// `failed` or `cancelled`.
        status: String,
        /// QEMU's `error-desc`, if any.
        desc: String,
    },
    /// It did not end within the bound; it was cancelled.
    #[error("the live migration to {uri} did not complete within {timeout:?}: cancelled")]
    Timeout {
        /// The destination.
        uri: String,
        /// The bound.
        timeout: Duration,
    },
    /// The source was not left in `postmigrate` after `completed`.
    #[error("the migration completed but QEMU is {0}, not postmigrate")]
    NotPostmigrate(String),
    /// Resuming (or migrating again) after a completed or committed migration is refused (see
    /// the module docs).
    #[error(
        "the live migration to {0} completed or passed its point of no return: the destination \
         may hold the guest, so it is not resumed here (a second copy could run); it stays \
         stopped for an operator"
    )]
    Completed(String),
    /// The caller gave up (hook deadline or stop).
    #[error("the live migration to {0} was aborted by its caller")]
    Aborted(String),
}

/// What one `query-migrate` said.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, … (`none` before any).
    pub status: String,
    /// QEMU's reported downtime of a completed migration, ms.
    pub downtime_ms: Option<u64>,
    /// Total time, ms.
    pub total_ms: Option<u64>,
    /// QEMU's error text of a failed one.
    pub error: Option<String>,
}

impl MigrationInfo {
    fn from(v: &Value) -> MigrationInfo {
        MigrationInfo {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            downtime_ms: v.get("downtime").and_then(Value::as_u64),
            total_ms: v.get("total-time").and_then(Value::as_u64),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    fn ended(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// The source's pause hook for a migrate-then-handoff (see the module docs).
#[derive(Debug)]
pub struct QmpMigrate {
    vm: QmpVm,
    uri: String,
    /// The bound for the whole migration.
    timeout: Duration,
    aborted: Arc<AtomicBool>,
    /// The last `completed` report, once there is one.
    completed: Arc<Mutex<Option<MigrationInfo>>>,
    /// A migration passed the point of no return (see the module docs): never resumed here
    /// again. Sticky, like `completed`.
    committed: bool,
    /// The guest ran when the last migration began: only then may a resume `cont` it.
    was_running: bool,
}

impl QmpMigrate {
    /// Migrates the QEMU at `socket_path` to `uri` on a handoff, within `timeout`.
    pub fn new(
        socket_path: impl Into<std::path::PathBuf>,
        uri: &str,
        timeout: Duration,
    ) -> Result<QmpMigrate, MigrateError> {
        check_uri(uri)?;
        Ok(QmpMigrate {
            // Each QMP session is short; its own bound is the usual one.
            vm: QmpVm::new(socket_path),
            uri: uri.to_string(),
            timeout,
            aborted: Arc::default(),
            completed: Arc::default(),
            committed: false,
            was_running: false,
        })
    }

    /// The last completed migration's report (downtime, total time).
    pub fn completed(&self) -> Option<MigrationInfo> {
        self.completed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn query(&self) -> Result<MigrationInfo, QmpError> {
        let mut c = self.vm.connect()?;
        Ok(MigrationInfo::from(&c.execute("query-migrate", None)?))
    }

    fn cancel(&self) {
        match self
            .vm
            .connect()
            .and_then(|mut c| c.execute("migrate_cancel", None))
        {
            Ok(_) => info!("migration to {}: cancelled", self.uri),
            Err(e) => warn!("migration to {}: migrate_cancel failed: {e}", self.uri),
        }
    }

    /// Follows the migration until it ends; returns what ended it and the session that saw it.
    /// Before the point of no return an abort or the deadline cancels it; at `pre-switchover`
    /// it is committed and continued, and from then on nothing cancels it. One session is kept,
    /// but given up every [`SESSION`] so that the source's health check (a client of the same
    /// monitor) gets its turn.
    fn follow(
        &mut self,
        deadline: Instant,
        mut session: Option<QmpClient>,
    ) -> Result<(MigrationInfo, QmpClient), MigrateError> {
        let mut opened = Instant::now();
        loop {
            if !self.committed {
                let give_up = if self.aborted.load(Ordering::SeqCst) {
                    Some(MigrateError::Aborted(self.uri.clone()))
                } else if Instant::now() >= deadline {
                    Some(MigrateError::Timeout {
                        uri: self.uri.clone(),
                        timeout: self.timeout,
                    })
                } else {
                    None
                };
                if let Some(e) = give_up {
                    drop(session);
                    self.cancel();
                    return Err(e);
                }
            }
            if session.is_none() || opened.elapsed() >= SESSION {
                drop(session.take());
                session = Some(self.vm.connect()?);
                opened = Instant::now();
            }
            let c = session.as_mut().expect("just opened");
            let info = MigrationInfo::from(&c.execute("query-migrate", None)?);
            if info.ended() {
                return Ok((info, session.expect("open")));
            }
            if info.status == "pre-switchover" && !self.committed {
                // The guest is stopped and the device state not sent: the point of no return.
                self.committed = true;
                info!("migration to {}: switching over", self.uri);
                c.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
                continue;
            }
            std::thread::sleep(POLL);
        }
    }

    fn migrate(&mut self) -> Result<MigrationInfo, MigrateError> {
        if self.committed || self.completed().is_some() {
            // Not again from here: the destination may hold the guest (see vm_resume).
            return Err(MigrateError::Completed(self.uri.clone()));
        }
        let deadline = Instant::now() + self.timeout;
        let mut c = self.vm.connect()?;
        self.was_running = c.query_status()?.running;
        c.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "pause-before-switchover", "state": true},
            ]})),
        )?;
        c.execute("migrate", Some(json!({"uri": self.uri})))?;
        info!("migration to {}: started", self.uri);
        let followed = self.follow(deadline, Some(c));
        let (info, mut c) = match followed {
            Ok(x) => x,
            Err(e) => {
                // QMP failed under way: never leave a migration running unsupervised.
                if matches!(e, MigrateError::Qmp(_)) && !self.committed {
                    self.cancel();
                }
                if self.committed {
                    self.stop_for_good();
                }
                return Err(e);
            }
        };
        if info.status != "completed" {
            if self.committed {
                // QEMU may have restarted the guest itself; the destination may hold it too.
                self.stop_for_good();
            }
            return Err(MigrateError::Ended {
                uri: self.uri.clone(),
                status: info.status,
                desc: info.error.unwrap_or_default(),
            });
        }
        self.committed = true;
        *self.completed.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
        // `query-migrate` can say `completed` a moment before the run state leaves
        // `finish-migrate`.
        let mut status = c.query_status()?.status;
        let settle = Instant::now() + Duration::from_secs(1);
        while status == "finish-migrate" && Instant::now() < settle {
            std::thread::sleep(POLL);
            status = c.query_status()?.status;
        }
        if status != "postmigrate" {
            return Err(MigrateError::NotPostmigrate(status));
        }
        info!(
            "migration to {}: completed (downtime {:?} ms, total {:?} ms); the source is \
             postmigrate",
            self.uri, info.downtime_ms, info.total_ms
        );
        Ok(info)
    }

    /// After a committed migration that did not complete: the guest must not run here.
    fn stop_for_good(&self) {
        match self.vm.stop() {
            Ok(_) => warn!(
                "migration to {}: failed after the point of no return; the guest is stopped \
                 here and stays stopped",
                self.uri
            ),
            Err(e) => error!(
                "migration to {}: failed after the point of no return and the guest could \
                 not be stopped: {e}",
                self.uri
            ),
        }
    }
}

/// `tcp:HOST:PORT` or `unix:PATH`.
pub fn check_uri(uri: &str) -> Result<(), MigrateError> {
    let bad = || MigrateError::BadUri(uri.to_string());
    if let Some(rest) = uri.strip_prefix("tcp:") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
        return Ok(());
    }
    match uri.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

impl VmPause for QmpMigrate {
    fn vm_pause(&mut self) -> Result<(), HookError> {
        let r = self.migrate();
        // Cleared when the job ends, not when it starts: an abort that came before the job
        // began is still seen by it.
        self.aborted.store(false, Ordering::SeqCst);
        r?;
        Ok(())
    }

    fn vm_resume(&mut self) -> Result<(), HookError> {
        self.aborted.store(false, Ordering::SeqCst);
        if self.committed || self.completed().is_some() {
            return Err(MigrateError::Completed(self.uri.clone()).into());
        }
        let info = self.query().map_err(MigrateError::from)?;
        if !info.ended() && info.status != "none" {
            self.cancel();
            let deadline = Instant::now() + self.vm.timeout;
            let (info, _) = self.follow(deadline, None)?;
            if info.status == "completed" {
                // It finished before the cancel took: the same as above.
                return Err(MigrateError::Completed(self.uri.clone()).into());
            }
        }
        if !self.was_running {
            info!(
                "migration to {}: did not happen; the guest was not running before, so it is \
                 left as it is",
                self.uri
            );
            return Ok(());
        }
        // A failed or cancelled migration leaves the guest running; `cont` covers a QEMU that
        // left it paused.
        self.vm.cont()?;
        info!(
            "migration to {}: did not happen; the guest runs here",
            self.uri
        );
        Ok(())
    }

    fn vm_fence(&mut self) -> Result<(), HookError> {
        if !self.committed {
            if let Ok(info) = self.query() {
                if !info.ended() && info.status != "none" {
                    self.cancel();
                }
            }
        }
        self.vm.stop()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "qmp-migrate:{}->{}",
            self.vm.socket_path.display(),
            self.uri
        )
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        let aborted = self.aborted.clone();
        Some(Arc::new(move || aborted.store(true, Ordering::SeqCst)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked() {
        for ok in [
            "tcp:127.0.0.1:4444",
            "tcp:host-b:4444",
            "tcp:[::1]:4444",
            "unix:/run/m.sock",
        ] {
            check_uri(ok).unwrap();
        }
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::4444",
            "tcp:h:0",
            "tcp:h:x",
            "unix:",
            "exec:cat",
            "host:1",
        ] {
            let e = check_uri(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("tcp:HOST:PORT"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_report_is_read_from_query_migrate() {
        let i =
            MigrationInfo::from(&json!({"status": "completed", "downtime": 12, "total-time": 690}));
        assert_eq!(i.status, "completed");
        assert_eq!(i.downtime_ms, Some(12));
        assert!(i.ended());
        let i = MigrationInfo::from(&json!({}));
        assert_eq!(i.status, "none");
        assert!(!i.ended());
        let i = MigrationInfo::from(&json!({"status": "failed", "error-desc": "boom"}));
        assert_eq!(i.error.as_deref(), Some("boom"));
    }
}
