// SPDX-License-Identifier: Apache-2.0
//! Heartbeat link and takeover core.
#![deny(missing_docs)]

pub mod hook;

pub use hook::{HookError, TakeoverReason, TakeoverRecord, VmPause, VmStart};
pub use vmm_keepalive;
