// SPDX-License-Identifier: Apache-2.0
//! TCP keepalive specs for the heartbeat link.
//!
//! STUB: the public API below is fixed; bodies are being filled in.
#![deny(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use socket2::Socket;

/// Errors from parsing, reading or applying a keepalive spec.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// The spec text is malformed; the message says what is allowed.
    #[error("invalid keepalive spec {spec:?}: {why}")]
    Parse {
        /// The text that was given.
        spec: String,
        /// What was wrong and what is allowed.
        why: String,
    },
    /// A system default could not be read from /proc.
    #[error("cannot read {path}: {source}")]
    SystemDefault {
        /// The /proc path.
        path: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A socket option could not be set or read.
    #[error("socket option {option}: {source}")]
    SockOpt {
        /// The option name, e.g. `TCP_KEEPIDLE`.
        option: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How TCP_USER_TIMEOUT is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserTimeout {
    /// Set it to the worst-case keepalive bound (the default).
    #[default]
    Auto,
    /// Leave the kernel default (0: follow tcp_retries2).
    Off,
    /// An explicit value (whole milliseconds, > 0).
    Explicit(Duration),
}

/// A keepalive spec; `None` parts mean "system default".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveSpec {
    /// SO_KEEPALIVE on or off.
    pub enabled: bool,
    /// TCP_KEEPIDLE (whole seconds, 1..=32767).
    pub idle: Option<Duration>,
    /// TCP_KEEPINTVL (whole seconds, 1..=32767).
    pub interval: Option<Duration>,
    /// TCP_KEEPCNT (1..=127).
    pub count: Option<u32>,
    /// TCP_USER_TIMEOUT policy.
    pub user_timeout: UserTimeout,
}

/// The system-wide keepalive defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemDefaults {
    /// tcp_keepalive_time.
    pub idle: Duration,
    /// tcp_keepalive_intvl.
    pub interval: Duration,
    /// tcp_keepalive_probes.
    pub count: u32,
}

/// Keepalive values in force on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveKeepalive {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_KEEPIDLE.
    pub idle: Duration,
    /// TCP_KEEPINTVL.
    pub interval: Duration,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// TCP_USER_TIMEOUT (`None` when 0).
    pub user_timeout: Option<Duration>,
}

impl KeepaliveSpec {
    /// The project's default, `1:1:5`.
    pub const DEFAULT: KeepaliveSpec = KeepaliveSpec {
        enabled: true,
        idle: Some(Duration::from_secs(1)),
        interval: Some(Duration::from_secs(1)),
        count: Some(5),
        user_timeout: UserTimeout::Auto,
    };

    /// Returns the spec with the given TCP_USER_TIMEOUT policy.
    pub fn with_user_timeout(self, user_timeout: UserTimeout) -> Self {
        KeepaliveSpec {
            user_timeout,
            ..self
        }
    }

    /// Fills the unset parts from `defaults`.
    pub fn resolve(&self, defaults: &SystemDefaults) -> EffectiveKeepalive {
        let _ = defaults;
        todo!()
    }

    /// Applies the spec to `socket` and returns what was requested (resolved against the system defaults).
    pub fn apply(&self, socket: &Socket) -> Result<EffectiveKeepalive, KeepaliveError> {
        let _ = socket;
        todo!()
    }
}

impl Default for KeepaliveSpec {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for KeepaliveSpec {
    type Err = KeepaliveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        todo!()
    }
}

impl fmt::Display for KeepaliveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!()
    }
}

impl SystemDefaults {
    /// Linux's compiled-in defaults (7200 / 75 / 9).
    pub const LINUX: SystemDefaults = SystemDefaults {
        idle: Duration::from_secs(7200),
        interval: Duration::from_secs(75),
        count: 9,
    };

    /// Reads `/proc/sys/net/ipv4/tcp_keepalive_{time,intvl,probes}`.
    pub fn read() -> Result<Self, KeepaliveError> {
        todo!()
    }
}

impl EffectiveKeepalive {
    /// Reads the values in force back from a socket.
    pub fn read_from(socket: &Socket) -> Result<Self, KeepaliveError> {
        let _ = socket;
        todo!()
    }

    /// Worst-case time for the kernel to notice an idle dead peer: `idle + interval × count`.
    /// `None` when keepalive is off.
    pub fn bound(&self) -> Option<Duration> {
        todo!()
    }
}
