// SPDX-License-Identifier: Apache-2.0
//! etcd client endpoints and the CLI form `etcd://HOST:PORT[,HOST:PORT…]`.
//!
//! Host names are kept as names and resolved at every request (see [`Endpoint`]), so a DNS change
//! is followed without a restart and a name that does not resolve yet is a retryable
//! [`ArbiterError::Unavailable`](vmm_takeover_core::ArbiterError::Unavailable), not a start-up
//! failure.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// What the CLI accepts, repeated in every error so the user sees the allowed form.
const FORM: &str =
    "expected etcd://HOST:PORT[,HOST:PORT...], e.g. etcd://10.0.0.3:2379,[fd00::4]:2379";

/// A malformed arbiter address. The message names what is wrong and what is allowed; the CLI
/// prints it and exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointsError {
    /// The address does not start with `etcd://`.
    #[error("arbiter `{given}`: {}; {FORM}", scheme_problem(.scheme))]
    BadScheme {
        /// The whole address as given.
        given: String,
        /// The scheme found (empty when there was none).
        scheme: String,
    },
    /// No endpoint at all after `etcd://`.
    #[error("arbiter `{given}`: no endpoint given; {FORM}")]
    Empty {
        /// The whole address as given.
        given: String,
    },
    /// An entry of the comma-separated list is empty (a stray comma).
    #[error("arbiter `{given}`: endpoint #{index} is empty (a stray comma?); {FORM}")]
    EmptyEntry {
        /// The whole address as given.
        given: String,
        /// 1-based position in the list.
        index: usize,
    },
    /// An endpoint has no `:PORT`.
    #[error("arbiter endpoint `{endpoint}`: missing port; write HOST:PORT (etcd's client port is usually 2379); IPv6 addresses go in brackets: [fd00::3]:2379")]
    MissingPort {
        /// The endpoint as given.
        endpoint: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("arbiter endpoint `{endpoint}`: bad port `{port}`: must be a number from 1 to 65535")]
    BadPort {
        /// The endpoint as given.
        endpoint: String,
        /// The port text as given.
        port: String,
    },
    /// The host is neither an IP address nor a DNS name.
    #[error("arbiter endpoint `{endpoint}`: bad host `{host}`: must be an IPv4 address, an IPv6 address in brackets, or a DNS name (letters, digits, `-`, dot-separated labels of at most 63 characters)")]
    BadHost {
        /// The endpoint as given.
        endpoint: String,
        /// The host text as given.
        host: String,
    },
}

fn scheme_problem(scheme: &str) -> String {
    if scheme.is_empty() {
        "no scheme, only `etcd://` is allowed".to_string()
    } else {
        format!("scheme `{scheme}://` is not allowed, only `etcd://`")
    }
}

/// One etcd client endpoint (a member's client URL without the `http://`).
///
/// The host is an IP address or a DNS name. Names are resolved by the HTTP client at every
/// request, through the system resolver (`getaddrinfo`, so `/etc/hosts` and nsswitch apply), on a
/// helper thread bounded by the request deadline; every address a name resolves to is tried in
/// order within the endpoint's share of that deadline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// An endpoint from a host (IP address, or DNS name) and a port; checks both.
    pub fn new(host: &str, port: u16) -> Result<Endpoint, EndpointsError> {
        let endpoint = format!("{host}:{port}");
        if port == 0 {
            return Err(EndpointsError::BadPort {
                endpoint,
                port: "0".into(),
            });
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
            return Err(EndpointsError::BadHost {
                endpoint,
                host: host.into(),
            });
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }

    /// The host: an IP address (IPv6 without brackets) or a DNS name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` for a URL, with IPv6 in brackets.
    pub(crate) fn authority(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.parse::<Ipv6Addr>().is_ok() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointsError;

    /// Parses `HOST:PORT` (IPv6 as `[ADDR]:PORT`).
    fn from_str(s: &str) -> Result<Endpoint, EndpointsError> {
        let endpoint = s.to_string();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((host, after)) = rest.split_once(']') else {
                return Err(EndpointsError::BadHost {
                    endpoint,
                    host: s.into(),
                });
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(EndpointsError::BadHost {
                    endpoint,
                    host: host.into(),
                });
            }
            match after.strip_prefix(':') {
                Some(port) => (host, port),
                None if after.is_empty() => return Err(EndpointsError::MissingPort { endpoint }),
                None => {
                    return Err(EndpointsError::BadPort {
                        endpoint,
                        port: after.into(),
                    })
                }
            }
        } else {
            match s.rsplit_once(':') {
                // An unbracketed IPv6 address: its last group would be taken for the port.
                Some((host, _)) if host.contains(':') => {
                    return Err(EndpointsError::BadHost {
                        endpoint,
                        host: host.into(),
                    })
                }
                Some((host, port)) => (host, port),
                None => return Err(EndpointsError::MissingPort { endpoint }),
            }
        };
        if port.is_empty() {
            return Err(EndpointsError::MissingPort { endpoint });
        }
        let port_num = match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => {
                return Err(EndpointsError::BadPort {
                    endpoint,
                    port: port.into(),
                })
            }
        };
        if host.is_empty()
            || (host.parse::<Ipv4Addr>().is_err()
                && !is_dns_name(host)
                && host.parse::<Ipv6Addr>().is_err())
        {
            return Err(EndpointsError::BadHost {
                endpoint,
                host: host.into(),
            });
        }
        Ok(Endpoint {
            host: host.to_string(),
            port: port_num,
        })
    }
}

/// RFC 1123 host name syntax; the last label must not be all digits, so `10.0.0.256` is refused
/// as a bad address rather than looked up as a name.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    labels.iter().all(label_ok)
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses the CLI form `etcd://HOST:PORT[,HOST:PORT…]` into endpoints, in the given order (the
/// order in which requests try them). Spaces around entries are ignored.
pub fn parse_endpoints(given: &str) -> Result<Vec<Endpoint>, EndpointsError> {
    let Some((scheme, rest)) = given.split_once("://") else {
        return Err(EndpointsError::BadScheme {
            given: given.into(),
            scheme: String::new(),
        });
    };
    if !scheme.eq_ignore_ascii_case("etcd") {
        return Err(EndpointsError::BadScheme {
            given: given.into(),
            scheme: scheme.into(),
        });
    }
    if rest.trim().is_empty() {
        return Err(EndpointsError::Empty {
            given: given.into(),
        });
    }
    let mut endpoints = Vec::new();
    for (i, entry) in rest.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(EndpointsError::EmptyEntry {
                given: given.into(),
                index: i + 1,
            });
        }
        endpoints.push(entry.parse::<Endpoint>()?);
    }
    Ok(endpoints)
}

/// The CLI form of a list of endpoints: `etcd://a:1,b:2`.
pub(crate) fn describe(endpoints: &[Endpoint]) -> String {
    let list: Vec<String> = endpoints.iter().map(Endpoint::to_string).collect();
    format!("etcd://{}", list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_v4_v6_in_order() {
        let eps =
            parse_endpoints("etcd://10.0.0.3:2379, etcd-1.example:2380,[fd00::4]:2379").unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!((eps[0].host(), eps[0].port()), ("10.0.0.3", 2379));
        assert_eq!((eps[1].host(), eps[1].port()), ("etcd-1.example", 2380));
        assert_eq!((eps[2].host(), eps[2].port()), ("fd00::4", 2379));
        assert_eq!(
            describe(&eps),
            "etcd://10.0.0.3:2379,etcd-1.example:2380,[fd00::4]:2379"
        );
        assert_eq!(
            parse_endpoints("ETCD://localhost:1").unwrap()[0].host(),
            "localhost"
        );
    }

    #[test]
    fn names_what_is_wrong() {
        use EndpointsError::*;
        let e = |s: &str| parse_endpoints(s).unwrap_err();
        assert!(matches!(e("10.0.0.3:2379"), BadScheme { ref scheme, .. } if scheme.is_empty()));
        assert!(
            matches!(e("http://10.0.0.3:2379"), BadScheme { ref scheme, .. } if scheme == "http")
        );
        assert!(matches!(e("etcd://"), Empty { .. }));
        assert!(matches!(e("etcd://  "), Empty { .. }));
        assert!(matches!(e("etcd://a:1,,b:2"), EmptyEntry { index: 2, .. }));
        assert!(matches!(e("etcd://a:1,"), EmptyEntry { index: 2, .. }));
        assert!(matches!(e("etcd://10.0.0.3"), MissingPort { .. }));
        assert!(matches!(e("etcd://10.0.0.3:"), MissingPort { .. }));
        assert!(matches!(e("etcd://[fd00::4]"), MissingPort { .. }));
        assert!(matches!(e("etcd://h:0"), BadPort { .. }));
        assert!(matches!(e("etcd://h:65536"), BadPort { .. }));
        assert!(matches!(e("etcd://h:+1"), BadPort { .. }));
        assert!(matches!(e("etcd://h:2379/v3"), BadPort { .. }));
        assert!(matches!(e("etcd://fd00::4:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://10.0.0.256:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://user@h:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://-h:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://[nope]:2379"), BadHost { .. }));
        assert!(matches!(e("etcd://a b:2379"), BadHost { .. }));
    }

    #[test]
    fn messages_say_what_is_allowed() {
        let msg = parse_endpoints("http://x:1").unwrap_err().to_string();
        assert!(
            msg.contains("`http://` is not allowed") && msg.contains("etcd://HOST:PORT"),
            "{msg}"
        );
        let msg = parse_endpoints("etcd://x").unwrap_err().to_string();
        assert!(
            msg.contains("missing port") && msg.contains("HOST:PORT"),
            "{msg}"
        );
        let msg = parse_endpoints("etcd://x:99999").unwrap_err().to_string();
        assert!(msg.contains("1 to 65535"), "{msg}");
    }

    #[test]
    fn endpoint_new_and_socket_addr() {
        assert!(Endpoint::new("::1", 2379).is_ok());
        assert_eq!(
            Endpoint::new("[::1]", 2379).unwrap().to_string(),
            "[::1]:2379"
        );
        assert!(Endpoint::new("bad host", 1).is_err());
        assert!(Endpoint::new("h", 0).is_err());
        let ep: Endpoint = "127.0.0.1:2379".parse::<SocketAddr>().unwrap().into();
        assert_eq!(ep.authority(), "127.0.0.1:2379");
    }
}
