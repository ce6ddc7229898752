// SPDX-License-Identifier: Apache-2.0
//! Socket options and `/proc` sysctls: the only parts of the crate that touch the kernel.

use std::io;
use std::time::Duration;

use socket2::{Socket, TcpKeepalive};

use crate::{
    check_user_timeout, EffectiveKeepalive, KeepaliveError, KeepaliveSpec, SystemDefaults,
    UserTimeout,
};

const TIME: &str = "/proc/sys/net/ipv4/tcp_keepalive_time";
const INTVL: &str = "/proc/sys/net/ipv4/tcp_keepalive_intvl";
const PROBES: &str = "/proc/sys/net/ipv4/tcp_keepalive_probes";

fn sockopt(option: &'static str) -> impl FnOnce(io::Error) -> KeepaliveError {
    move |source| KeepaliveError::SockOpt { option, source }
}

pub(crate) fn read_system_defaults() -> Result<SystemDefaults, KeepaliveError> {
    Ok(SystemDefaults {
        idle: Duration::from_secs(read_sysctl(TIME)?.into()),
        interval: Duration::from_secs(read_sysctl(INTVL)?.into()),
        count: read_sysctl(PROBES)?,
    })
}

fn read_sysctl(path: &'static str) -> Result<u32, KeepaliveError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| KeepaliveError::SystemDefault { path, source })?;
    parse_sysctl(path, &text)
}

fn parse_sysctl(path: &'static str, text: &str) -> Result<u32, KeepaliveError> {
    text.trim()
        .parse()
        .map_err(|_| KeepaliveError::SystemDefault {
            path,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a non-negative integer, got {:?}", text.trim()),
            ),
        })
}

pub(crate) fn apply(
    spec: &KeepaliveSpec,
    socket: &Socket,
) -> Result<EffectiveKeepalive, KeepaliveError> {
    // Validate everything first so an error leaves the socket untouched.
    spec.validate()?;
    let needs_defaults =
        !spec.enabled || spec.idle.is_none() || spec.interval.is_none() || spec.count.is_none();
    let defaults = if needs_defaults {
        SystemDefaults::read_or_linux()
    } else {
        // Every part is set, so resolve() does not look at the defaults.
        SystemDefaults::LINUX
    };
    let effective = spec.resolve(&defaults);
    match (spec.user_timeout, effective.user_timeout) {
        (UserTimeout::Explicit(timeout), _) => check_user_timeout(timeout)?,
        (UserTimeout::Auto, Some(bound)) if bound > UserTimeout::MAX => {
            return Err(KeepaliveError::InvalidUserTimeout {
                value: bound,
                why: format!(
                    "the automatic value is the keepalive bound of spec `{spec}`, which exceeds \
                     the kernel's limit of {} ms; use UserTimeout::Off or an explicit value",
                    UserTimeout::MAX.as_millis()
                ),
            });
        }
        _ => {}
    }

    socket
        .set_keepalive(spec.enabled)
        .map_err(sockopt("SO_KEEPALIVE"))?;
    if spec.enabled {
        // One part per call, so an error names the option that failed.
        if let Some(idle) = spec.idle {
            socket
                .set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))
                .map_err(sockopt("TCP_KEEPIDLE"))?;
        }
        if let Some(interval) = spec.interval {
            socket
                .set_tcp_keepalive(&TcpKeepalive::new().with_interval(interval))
                .map_err(sockopt("TCP_KEEPINTVL"))?;
        }
        if let Some(count) = spec.count {
            socket
                .set_tcp_keepalive(&TcpKeepalive::new().with_retries(count))
                .map_err(sockopt("TCP_KEEPCNT"))?;
        }
    }
    // Auto without keepalive has no bound to follow, so the option is left as it is.
    if spec.enabled || spec.user_timeout != UserTimeout::Auto {
        socket
            .set_tcp_user_timeout(effective.user_timeout)
            .map_err(sockopt("TCP_USER_TIMEOUT"))?;
    }
    Ok(effective)
}

pub(crate) fn read_from(socket: &Socket) -> Result<EffectiveKeepalive, KeepaliveError> {
    Ok(EffectiveKeepalive {
        enabled: socket.keepalive().map_err(sockopt("SO_KEEPALIVE"))?,
        idle: socket
            .tcp_keepalive_time()
            .map_err(sockopt("TCP_KEEPIDLE"))?,
        interval: socket
            .tcp_keepalive_interval()
            .map_err(sockopt("TCP_KEEPINTVL"))?,
        count: socket
            .tcp_keepalive_retries()
            .map_err(sockopt("TCP_KEEPCNT"))?,
        // socket2 already maps 0 ("kernel default") to None.
        user_timeout: socket
            .tcp_user_timeout()
            .map_err(sockopt("TCP_USER_TIMEOUT"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_text() {
        assert_eq!(parse_sysctl(TIME, "7200\n").unwrap(), 7200);
        for bad in ["", "-1\n", "75 s", "abc"] {
            let err = parse_sysctl(INTVL, bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("cannot read {INTVL}")), "{err}");
            assert!(err.contains("expected a non-negative integer"), "{err}");
        }
    }
}
