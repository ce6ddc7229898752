// SPDX-License-Identifier: Apache-2.0
//! TCP keepalive specs for the heartbeat link.
//!
//! A [`KeepaliveSpec`] is written in nginx's `so_keepalive` syntax (`on`, `off` or
//! `IDLE:INTVL:CNT`), applied to a socket with [`KeepaliveSpec::apply`] and read back with
//! [`EffectiveKeepalive::read_from`]. [`EffectiveKeepalive::bound`] is the worst-case time for
//! the kernel to notice a dead peer on an idle link; by default the same value is used as
//! `TCP_USER_TIMEOUT`, so unacknowledged data cannot keep a dead link open for longer either.
//!
//! Linux only: `TCP_USER_TIMEOUT` and the `/proc` sysctls are Linux interfaces.

mod parse;
mod sockopt;

use std::fmt;
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
    /// A TCP_USER_TIMEOUT value (explicit or the automatic bound) the kernel would reject.
    #[error("invalid TCP_USER_TIMEOUT {value:?}: {why}")]
    InvalidUserTimeout {
        /// The value that was asked for.
        value: Duration,
        /// What was wrong and what is allowed.
        why: String,
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

impl UserTimeout {
    /// The largest value the kernel accepts: it reads the option as a signed `int` of
    /// milliseconds (about 24.8 days).
    pub const MAX: Duration = Duration::from_millis(i32::MAX as u64);

    /// A validated [`UserTimeout::Explicit`]: `timeout` must be whole milliseconds in
    /// `1..=2147483647` ms.
    pub fn explicit(timeout: Duration) -> Result<Self, KeepaliveError> {
        check_user_timeout(timeout)?;
        Ok(UserTimeout::Explicit(timeout))
    }
}

/// Checks a value for TCP_USER_TIMEOUT; the kernel counts whole milliseconds in an `int`.
fn check_user_timeout(value: Duration) -> Result<(), KeepaliveError> {
    let allowed = format!(
        "must be 1..={} whole milliseconds",
        UserTimeout::MAX.as_millis()
    );
    let why = if value.is_zero() {
        format!("{allowed}; 0 is not allowed (use UserTimeout::Off for the kernel default)")
    } else if !value.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{allowed}; sub-millisecond parts are not allowed")
    } else if value > UserTimeout::MAX {
        format!("{allowed}; larger values are rejected by the kernel")
    } else {
        return Ok(());
    };
    Err(KeepaliveError::InvalidUserTimeout { value, why })
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

    /// `on`: keepalive enabled, every part from the system defaults.
    pub const ON: KeepaliveSpec = KeepaliveSpec {
        enabled: true,
        idle: None,
        interval: None,
        count: None,
        user_timeout: UserTimeout::Auto,
    };

    /// `off`: keepalive disabled.
    pub const OFF: KeepaliveSpec = KeepaliveSpec {
        enabled: false,
        idle: None,
        interval: None,
        count: None,
        user_timeout: UserTimeout::Auto,
    };

    /// Largest TCP_KEEPIDLE the kernel accepts (`MAX_TCP_KEEPIDLE`).
    pub const MAX_IDLE: Duration = Duration::from_secs(32767);
    /// Largest TCP_KEEPINTVL the kernel accepts (`MAX_TCP_KEEPINTVL`).
    pub const MAX_INTERVAL: Duration = Duration::from_secs(32767);
    /// Largest TCP_KEEPCNT the kernel accepts (`MAX_TCP_KEEPCNT`).
    pub const MAX_COUNT: u32 = 127;

    /// An enabled spec with the same checks as the parser: `idle` and `interval` must be
    /// whole seconds in `1..=32767`, `count` in `1..=127`; `None` means "system default".
    /// The user timeout policy is [`UserTimeout::Auto`].
    pub fn new(
        idle: Option<Duration>,
        interval: Option<Duration>,
        count: Option<u32>,
    ) -> Result<Self, KeepaliveError> {
        let spec = KeepaliveSpec {
            idle,
            interval,
            count,
            ..Self::ON
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the parts against the kernel's limits. The fields are public, so a spec may
    /// not have come through [`KeepaliveSpec::new`] or the parser.
    pub fn validate(&self) -> Result<(), KeepaliveError> {
        if !self.enabled {
            // apply() ignores the parts of a disabled spec.
            return Ok(());
        }
        parse::check_parts(self.idle, self.interval, self.count).map_err(|why| {
            KeepaliveError::Parse {
                spec: self.to_string(),
                why,
            }
        })
    }

    /// Returns the spec with the given TCP_USER_TIMEOUT policy.
    pub fn with_user_timeout(self, user_timeout: UserTimeout) -> Self {
        KeepaliveSpec {
            user_timeout,
            ..self
        }
    }

    /// Fills the unset parts from `defaults`.
    ///
    /// For a disabled spec all three parts come from `defaults`, since [`KeepaliveSpec::apply`]
    /// leaves them alone, and [`UserTimeout::Auto`] resolves to `None` (there is no bound).
    pub fn resolve(&self, defaults: &SystemDefaults) -> EffectiveKeepalive {
        let (idle, interval, count) = if self.enabled {
            (
                self.idle.unwrap_or(defaults.idle),
                self.interval.unwrap_or(defaults.interval),
                self.count.unwrap_or(defaults.count),
            )
        } else {
            (defaults.idle, defaults.interval, defaults.count)
        };
        let mut effective = EffectiveKeepalive {
            enabled: self.enabled,
            idle,
            interval,
            count,
            user_timeout: None,
        };
        effective.user_timeout = match self.user_timeout {
            UserTimeout::Auto => effective.bound(),
            UserTimeout::Off => None,
            UserTimeout::Explicit(timeout) => Some(timeout),
        };
        effective
    }

    /// The worst-case time for the kernel to notice a dead peer on an idle link with this
    /// spec, unset parts taken from `defaults`; `None` when keepalive is off.
    pub fn worst_case_bound(&self, defaults: &SystemDefaults) -> Option<Duration> {
        self.resolve(defaults).bound()
    }

    /// Applies the spec to `socket` and returns what was requested (resolved against the system defaults).
    ///
    /// Sets SO_KEEPALIVE; when enabled, sets only the parts that are `Some`, so unset ones
    /// follow the sysctl. TCP_USER_TIMEOUT: [`UserTimeout::Auto`] sets the bound (with unset
    /// parts from [`SystemDefaults::read_or_linux`]) when enabled and is left alone when
    /// disabled, [`UserTimeout::Off`] sets 0 and [`UserTimeout::Explicit`] sets its value.
    ///
    /// Everything is validated before the socket is touched. Meant for a fresh socket: the
    /// kernel has no way to make a part that was set once follow the sysctl again.
    pub fn apply(&self, socket: &Socket) -> Result<EffectiveKeepalive, KeepaliveError> {
        sockopt::apply(self, socket)
    }
}

impl Default for KeepaliveSpec {
    fn default() -> Self {
        Self::DEFAULT
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
    ///
    /// These are per network namespace: the values are those of the calling thread's namespace.
    pub fn read() -> Result<Self, KeepaliveError> {
        sockopt::read_system_defaults()
    }

    /// [`SystemDefaults::read`], or [`SystemDefaults::LINUX`] when `/proc` cannot be read
    /// (e.g. not mounted in a sandbox).
    pub fn read_or_linux() -> Self {
        Self::read().unwrap_or(Self::LINUX)
    }
}

impl EffectiveKeepalive {
    /// Reads the values in force back from a socket.
    pub fn read_from(socket: &Socket) -> Result<Self, KeepaliveError> {
        sockopt::read_from(socket)
    }

    /// Worst-case time for the kernel to notice an idle dead peer, as Linux applies it. `None`
    /// when keepalive is off.
    ///
    /// Without `TCP_USER_TIMEOUT` it is `idle + interval × count`. With one, the count is ignored:
    /// the kernel checks the user timeout each time a probe timer fires (`tcp_keepalive_timer`),
    /// and only once a probe is out, so the connection ends at the first probe time
    /// `idle + k × interval` (k ≥ 1) that is at least the user timeout. With the automatic user
    /// timeout (= `idle + interval × count`) both are the same.
    pub fn bound(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        // Saturating: values read from a socket are not range-checked.
        let probes = match self.user_timeout {
            None => self.count,
            Some(ut) if ut <= self.idle || self.interval.is_zero() => 1,
            Some(ut) => {
                let after_idle = (ut - self.idle).as_nanos();
                let step = self.interval.as_nanos();
                u32::try_from(after_idle.div_ceil(step))
                    .unwrap_or(u32::MAX)
                    .max(1)
            }
        };
        Some(
            self.interval
                .saturating_mul(probes)
                .saturating_add(self.idle),
        )
    }
}

/// `idle=1s intvl=1s cnt=5 user_timeout=6000ms bound=6s`, or `off user_timeout=none` when
/// keepalive is disabled.
impl fmt::Display for EffectiveKeepalive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enabled {
            write!(
                f,
                "idle={} intvl={} cnt={} ",
                Secs(self.idle),
                Secs(self.interval),
                self.count
            )?;
        } else {
            f.write_str("off ")?;
        }
        match self.user_timeout {
            Some(timeout) if timeout.subsec_nanos().is_multiple_of(1_000_000) => {
                write!(f, "user_timeout={}ms", timeout.as_millis())?;
            }
            Some(timeout) => write!(f, "user_timeout={timeout:?}")?,
            None => f.write_str("user_timeout=none")?,
        }
        if let Some(bound) = self.bound() {
            write!(f, " bound={}", Secs(bound))?;
        }
        Ok(())
    }
}

/// Whole seconds as `7200s` rather than humantime's `2h`, so values compare directly with
/// the sysctls; anything else in `Duration`'s Debug form.
struct Secs(Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: SystemDefaults = SystemDefaults {
        idle: Duration::from_secs(100),
        interval: Duration::from_secs(10),
        count: 3,
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn resolve_fills_only_unset_parts() {
        let spec = KeepaliveSpec::new(Some(secs(1800)), None, Some(10)).unwrap();
        let eff = spec.resolve(&SYS);
        assert_eq!(
            eff,
            EffectiveKeepalive {
                enabled: true,
                idle: secs(1800),
                interval: secs(10),
                count: 10,
                user_timeout: Some(secs(1900)),
            }
        );
        let eff = KeepaliveSpec::ON.resolve(&SYS);
        assert_eq!(
            (eff.idle, eff.interval, eff.count),
            (secs(100), secs(10), 3)
        );
        let eff = KeepaliveSpec::DEFAULT.resolve(&SYS);
        assert_eq!((eff.idle, eff.interval, eff.count), (secs(1), secs(1), 5));
    }

    #[test]
    fn resolve_user_timeout_policies() {
        let d = KeepaliveSpec::DEFAULT;
        assert_eq!(d.resolve(&SYS).user_timeout, Some(secs(6)));
        assert_eq!(
            d.with_user_timeout(UserTimeout::Off)
                .resolve(&SYS)
                .user_timeout,
            None
        );
        let explicit = UserTimeout::Explicit(Duration::from_millis(1234));
        assert_eq!(
            d.with_user_timeout(explicit).resolve(&SYS).user_timeout,
            Some(Duration::from_millis(1234))
        );
        // Disabled: Auto has no bound to follow, Explicit still applies.
        let off = KeepaliveSpec::OFF;
        assert_eq!(off.resolve(&SYS).user_timeout, None);
        assert_eq!(
            off.with_user_timeout(explicit).resolve(&SYS).user_timeout,
            Some(Duration::from_millis(1234))
        );
    }

    #[test]
    fn disabled_resolves_to_defaults_and_no_bound() {
        let spec = KeepaliveSpec {
            enabled: false,
            ..KeepaliveSpec::DEFAULT
        };
        let eff = spec.resolve(&SYS);
        assert!(!eff.enabled);
        assert_eq!(
            (eff.idle, eff.interval, eff.count),
            (secs(100), secs(10), 3)
        );
        assert_eq!(eff.bound(), None);
        assert_eq!(spec.worst_case_bound(&SYS), None);
    }

    #[test]
    fn bound_is_idle_plus_interval_times_count() {
        assert_eq!(KeepaliveSpec::DEFAULT.worst_case_bound(&SYS), Some(secs(6)));
        assert_eq!(
            KeepaliveSpec::ON.worst_case_bound(&SystemDefaults::LINUX),
            Some(secs(7200 + 75 * 9))
        );
        let max = KeepaliveSpec::new(
            Some(KeepaliveSpec::MAX_IDLE),
            Some(KeepaliveSpec::MAX_INTERVAL),
            Some(KeepaliveSpec::MAX_COUNT),
        )
        .unwrap();
        assert_eq!(max.worst_case_bound(&SYS), Some(secs(32767 * 128)));
        let huge = EffectiveKeepalive {
            enabled: true,
            idle: Duration::MAX,
            interval: Duration::MAX,
            count: u32::MAX,
            user_timeout: None,
        };
        assert_eq!(huge.bound(), Some(Duration::MAX));
    }

    /// A user timeout below (or above) the keepalive bound: the kernel ends the connection at the
    /// first probe time at or after it, whatever the count says.
    #[test]
    fn bound_with_an_explicit_user_timeout_is_the_next_probe_time() {
        let eff = |ut_ms: u64| EffectiveKeepalive {
            enabled: true,
            idle: secs(2),
            interval: secs(1),
            count: 3,
            user_timeout: Some(Duration::from_millis(ut_ms)),
        };
        assert_eq!(eff(2500).bound(), Some(secs(3)));
        assert_eq!(eff(3000).bound(), Some(secs(3)));
        assert_eq!(eff(5000).bound(), Some(secs(5)));
        // Never before the first probe is out.
        assert_eq!(eff(500).bound(), Some(secs(3)));
        // Above the count's bound: the count is ignored.
        assert_eq!(eff(9000).bound(), Some(secs(9)));
        let off = EffectiveKeepalive {
            user_timeout: None,
            ..eff(0)
        };
        assert_eq!(off.bound(), Some(secs(5)));
    }

    #[test]
    fn spec_display_round_trips() {
        let specs = [
            KeepaliveSpec::DEFAULT,
            KeepaliveSpec::ON,
            KeepaliveSpec::OFF,
            KeepaliveSpec::new(Some(secs(1800)), None, Some(10)).unwrap(),
            KeepaliveSpec::new(None, None, Some(3)).unwrap(),
            KeepaliveSpec::new(None, Some(secs(32767)), None).unwrap(),
            KeepaliveSpec::new(Some(secs(5)), Some(secs(1)), Some(3)).unwrap(),
        ];
        for spec in specs {
            let text = spec.to_string();
            let back: KeepaliveSpec = text.parse().unwrap();
            assert_eq!(back, spec, "{text}");
        }
        assert_eq!(KeepaliveSpec::DEFAULT.to_string(), "1:1:5");
        assert_eq!(
            KeepaliveSpec::new(Some(secs(1800)), None, Some(10))
                .unwrap()
                .to_string(),
            "1800::10"
        );
    }

    #[test]
    fn effective_display() {
        let eff = KeepaliveSpec::DEFAULT.resolve(&SYS);
        assert_eq!(
            eff.to_string(),
            "idle=1s intvl=1s cnt=5 user_timeout=6000ms bound=6s"
        );
        let eff = KeepaliveSpec::ON
            .with_user_timeout(UserTimeout::Off)
            .resolve(&SystemDefaults::LINUX);
        assert_eq!(
            eff.to_string(),
            "idle=7200s intvl=75s cnt=9 user_timeout=none bound=7875s"
        );
        let eff = KeepaliveSpec::OFF.resolve(&SYS);
        assert_eq!(eff.to_string(), "off user_timeout=none");
    }

    #[test]
    fn explicit_user_timeout_is_checked() {
        assert_eq!(
            UserTimeout::explicit(Duration::from_millis(1)).unwrap(),
            UserTimeout::Explicit(Duration::from_millis(1))
        );
        assert!(UserTimeout::explicit(UserTimeout::MAX).is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_micros(1500),
            UserTimeout::MAX + Duration::from_millis(1),
        ] {
            let err = UserTimeout::explicit(bad).unwrap_err();
            assert!(
                err.to_string()
                    .contains("must be 1..=2147483647 whole milliseconds"),
                "{err}"
            );
        }
    }

    #[test]
    fn validate_rejects_bad_public_fields() {
        let spec = KeepaliveSpec {
            idle: Some(Duration::from_millis(1500)),
            ..KeepaliveSpec::DEFAULT
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("\"1.5s:1:5\""), "{err}");
        assert!(
            err.contains("idle must be 1..=32767 whole seconds"),
            "{err}"
        );
        // A disabled spec's parts are never applied, so they are not checked.
        let off = KeepaliveSpec {
            enabled: false,
            ..spec
        };
        assert!(off.validate().is_ok());
    }
}
