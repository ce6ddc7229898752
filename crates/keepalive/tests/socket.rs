// SPDX-License-Identifier: Apache-2.0
//! Specs applied to real TCP sockets and read back from the kernel.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use vmm_keepalive::{
    EffectiveKeepalive, KeepaliveError, KeepaliveSpec, SystemDefaults, UserTimeout,
};

fn tcp_socket() -> Socket {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket")
}

/// A connected loopback pair; the listener is returned so it outlives the test body.
fn loopback_pair() -> (Socket, Socket, Socket) {
    let listener = tcp_socket();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).expect("bind");
    listener.listen(1).expect("listen");
    let client = tcp_socket();
    client
        .connect(&listener.local_addr().unwrap())
        .expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (listener, client, server)
}

/// Runs `check` on fresh sockets of each kind: unconnected, connecting side, accepted side.
fn on_each_socket(check: impl Fn(&str, &Socket)) {
    check("unconnected", &tcp_socket());
    let (_listener, client, server) = loopback_pair();
    check("client", &client);
    check("server", &server);
}

fn sysctls() -> SystemDefaults {
    SystemDefaults::read().expect("reading /proc/sys/net/ipv4/tcp_keepalive_*")
}

fn spec(text: &str) -> KeepaliveSpec {
    text.parse().expect(text)
}

/// Applies `spec` and checks that the kernel reports exactly what apply() returned.
fn apply_and_read(kind: &str, socket: &Socket, spec: KeepaliveSpec) -> EffectiveKeepalive {
    let applied = spec
        .apply(socket)
        .unwrap_or_else(|e| panic!("{kind}: apply {spec}: {e}"));
    let read = EffectiveKeepalive::read_from(socket).expect("read_from");
    assert_eq!(read, applied, "{kind}: {spec}");
    read
}

#[test]
fn system_defaults_match_what_the_kernel_reports() {
    // An untouched socket reports the sysctls, which is an oracle independent of /proc parsing.
    let sys = sysctls();
    on_each_socket(|kind, socket| {
        let read = EffectiveKeepalive::read_from(socket).unwrap();
        assert_eq!(
            (read.idle, read.interval, read.count),
            (sys.idle, sys.interval, sys.count),
            "{kind}"
        );
    });
}

#[test]
fn explicit_parts_read_back() {
    let s = Duration::from_secs;
    let cases: &[(&str, u64, u64, u32)] = &[
        ("1:1:5", 1, 1, 5),
        ("5s:1s:3", 5, 1, 3),
        ("30m:2m:10", 1800, 120, 10),
        ("2h:75:9", 7200, 75, 9),
        ("17:4:1", 17, 4, 1),
    ];
    on_each_socket(|kind, socket| {
        for &(text, idle, interval, count) in cases {
            let read = apply_and_read(kind, socket, spec(text));
            assert!(read.enabled, "{kind}: {text}");
            assert_eq!(
                (read.idle, read.interval, read.count),
                (s(idle), s(interval), count),
                "{kind}: {text}"
            );
        }
    });
}

#[test]
fn kernel_maxima_apply_with_user_timeout_off() {
    let max = spec("32767:32767:127").with_user_timeout(UserTimeout::Off);
    on_each_socket(|kind, socket| {
        let read = apply_and_read(kind, socket, max);
        assert_eq!(
            (read.idle, read.interval, read.count, read.user_timeout),
            (
                Duration::from_secs(32767),
                Duration::from_secs(32767),
                127,
                None
            ),
            "{kind}"
        );
    });
}

#[test]
fn on_reads_back_the_sysctls() {
    let sys = sysctls();
    on_each_socket(|kind, socket| {
        let read = apply_and_read(kind, socket, KeepaliveSpec::ON);
        assert!(read.enabled, "{kind}");
        assert_eq!(
            (read.idle, read.interval, read.count),
            (sys.idle, sys.interval, sys.count),
            "{kind}"
        );
        let bound = sys.idle + sys.interval * sys.count;
        assert_eq!(read.user_timeout, Some(bound), "{kind}");
    });
}

#[test]
fn unset_parts_follow_the_sysctls() {
    let sys = sysctls();
    let s = Duration::from_secs;
    on_each_socket(|kind, socket| {
        let read = apply_and_read(kind, socket, spec("1800::10"));
        assert_eq!(
            (read.idle, read.interval, read.count),
            (s(1800), sys.interval, 10),
            "{kind}"
        );
    });
    on_each_socket(|kind, socket| {
        let read = apply_and_read(kind, socket, spec("::3"));
        assert_eq!(
            (read.idle, read.interval, read.count),
            (sys.idle, sys.interval, 3),
            "{kind}"
        );
        assert_eq!(
            read.user_timeout,
            Some(sys.idle + sys.interval * 3),
            "{kind}"
        );
    });
}

#[test]
fn off_reads_back_disabled() {
    on_each_socket(|kind, socket| {
        let read = apply_and_read(kind, socket, KeepaliveSpec::OFF);
        assert!(!read.enabled, "{kind}");
        assert_eq!(read.user_timeout, None, "{kind}: Auto without keepalive");
        assert_eq!(read.bound(), None, "{kind}");
    });
    on_each_socket(|kind, socket| {
        // Enable first, so a no-op apply(OFF) would be caught. The parts set by DEFAULT
        // stay on the socket, so only the switch and the user timeout are compared.
        assert!(apply_and_read(kind, socket, KeepaliveSpec::DEFAULT).enabled);
        let off = KeepaliveSpec::OFF.with_user_timeout(UserTimeout::Off);
        let applied = off.apply(socket).unwrap();
        let read = EffectiveKeepalive::read_from(socket).unwrap();
        assert!(!applied.enabled && !read.enabled, "{kind}");
        assert_eq!(read.user_timeout, None, "{kind}");
        assert_eq!(read.bound(), None, "{kind}");
    });
}

#[test]
fn auto_user_timeout_is_the_bound_in_ms() {
    let cases: &[(&str, u64)] = &[("1:1:5", 6_000), ("5s:1s:3", 8_000), ("2m:10:6", 180_000)];
    on_each_socket(|kind, socket| {
        for &(text, millis) in cases {
            let read = apply_and_read(kind, socket, spec(text));
            assert_eq!(
                read.user_timeout,
                Some(Duration::from_millis(millis)),
                "{kind}: {text}"
            );
            assert_eq!(read.user_timeout, read.bound(), "{kind}: {text}");
        }
    });
}

#[test]
fn user_timeout_off_reads_back_none() {
    let explicit = UserTimeout::Explicit(Duration::from_secs(10));
    on_each_socket(|kind, socket| {
        // Set a value first, so Off has something to clear.
        let before = apply_and_read(
            kind,
            socket,
            KeepaliveSpec::DEFAULT.with_user_timeout(explicit),
        );
        assert_eq!(before.user_timeout, Some(Duration::from_secs(10)));
        let read = apply_and_read(
            kind,
            socket,
            KeepaliveSpec::DEFAULT.with_user_timeout(UserTimeout::Off),
        );
        assert_eq!(read.user_timeout, None, "{kind}");
        assert_eq!(read.bound(), Some(Duration::from_secs(6)), "{kind}");
    });
}

#[test]
fn explicit_user_timeout_reads_back_exactly() {
    let values = [
        Duration::from_millis(1),
        Duration::from_millis(12_345),
        UserTimeout::MAX,
    ];
    for value in values {
        let explicit = UserTimeout::explicit(value).unwrap();
        for base in [KeepaliveSpec::DEFAULT, KeepaliveSpec::OFF] {
            on_each_socket(|kind, socket| {
                let read = apply_and_read(kind, socket, base.with_user_timeout(explicit));
                assert_eq!(read.user_timeout, Some(value), "{kind}: {base} {value:?}");
            });
        }
    }
}

#[test]
fn rejected_user_timeouts_leave_the_socket_untouched() {
    let bad = [
        Duration::ZERO,
        Duration::from_micros(1500),
        UserTimeout::MAX + Duration::from_millis(1),
    ];
    on_each_socket(|kind, socket| {
        let before = EffectiveKeepalive::read_from(socket).unwrap();
        for value in bad {
            let spec = KeepaliveSpec::DEFAULT.with_user_timeout(UserTimeout::Explicit(value));
            let err = spec.apply(socket).unwrap_err();
            assert!(
                matches!(err, KeepaliveError::InvalidUserTimeout { value: v, .. } if v == value),
                "{kind}: {err:?}"
            );
        }
        // The kernel's limit is a signed int of ms; the max spec's bound (~48.5 days) is over it.
        let err = spec("32767:32767:127").apply(socket).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("exceeds the kernel's limit of 2147483647 ms"),
            "{msg}"
        );
        assert!(msg.contains("UserTimeout::Off"), "{msg}");
        assert_eq!(
            EffectiveKeepalive::read_from(socket).unwrap(),
            before,
            "{kind}"
        );
    });
}

#[test]
fn invalid_public_fields_are_rejected_before_applying() {
    let spec = KeepaliveSpec {
        interval: Some(Duration::from_millis(1500)),
        ..KeepaliveSpec::DEFAULT
    };
    on_each_socket(|kind, socket| {
        let before = EffectiveKeepalive::read_from(socket).unwrap();
        let msg = spec.apply(socket).unwrap_err().to_string();
        assert!(
            msg.contains("interval must be 1..=32767 whole seconds, got 1.5s"),
            "{kind}: {msg}"
        );
        assert_eq!(
            EffectiveKeepalive::read_from(socket).unwrap(),
            before,
            "{kind}"
        );
    });
}
