// SPDX-License-Identifier: Apache-2.0
//! One blocking POST to the gateway, with a deadline and fail-over across endpoints.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmm_takeover_core::ArbiterError;

use crate::endpoint::{describe, Endpoint};
use crate::wire::{excerpt, GatewayError};

/// Answers are a few hundred bytes; a cap keeps a confused peer from filling memory.
const MAX_BODY: u64 = 1 << 20;

/// What one attempt against one endpoint came to.
enum Attempt {
    /// A parsed answer.
    Done(Value),
    /// This endpoint failed in a way another endpoint (or a later try) may not: try the next.
    Next(String),
    /// An authoritative answer that is an error (the cluster decided): stop here.
    Fail(ArbiterError),
}

pub(crate) struct Client {
    agent: ureq::Agent,
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last: calls start there, so a dead first endpoint does not
    /// cost every call its share of the deadline.
    preferred: usize,
}

impl Client {
    pub(crate) fn new(endpoints: Vec<Endpoint>) -> Client {
        let agent = ureq::Agent::config_builder()
            // 4xx/5xx bodies carry etcd's gRPC code and message: read them, don't drop them.
            .http_status_as_error(false)
            // The etcd endpoints are on the local network: never route them through an
            // http_proxy from the environment (ureq's default).
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!(
                "vmm-takeover-arbiter-etcd/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .into();
        Client {
            agent,
            endpoints,
            preferred: 0,
        }
    }

    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// POSTs `body` to `path` (e.g. `/v3/kv/txn`) and parses the answer, trying the endpoints in
    /// order (from the one that answered last) until `deadline`.
    ///
    /// Each endpoint gets an equal share of the time left, the last one all of it, so one stopped
    /// member (accepting connections, never answering) cannot eat the whole budget. Connection
    /// errors, timeouts, HTTP 5xx and etcd's retryable gRPC codes move on to the next endpoint;
    /// everything else is the cluster's answer.
    pub(crate) fn call<T: DeserializeOwned>(
        &mut self,
        deadline: Instant,
        path: &str,
        body: &Value,
    ) -> Result<T, ArbiterError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let mut failures = Vec::with_capacity(n);
        for k in 0..n {
            let i = (self.preferred + k) % n;
            let endpoint = &self.endpoints[i];
            let now = Instant::now();
            if now >= deadline {
                failures.push(format!("{endpoint}: not tried, deadline passed"));
                continue;
            }
            let budget = (deadline - now) / (n - k) as u32;
            let started = Instant::now();
            match self.attempt(endpoint, path, &body, budget) {
                Attempt::Done(value) => {
                    log::trace!("{path} via {endpoint}: {:?}", started.elapsed());
                    self.preferred = i;
                    return serde_json::from_value(value.clone()).map_err(|e| {
                        ArbiterError::Protocol(format!(
                            "{path} via {endpoint}: {e}: {}",
                            excerpt(&value.to_string())
                        ))
                    });
                }
                Attempt::Fail(e) => {
                    self.preferred = i;
                    return Err(e);
                }
                Attempt::Next(why) => {
                    log::debug!(
                        "{path} via {endpoint} failed after {:?}: {why}",
                        started.elapsed()
                    );
                    failures.push(format!("{endpoint}: {why}"));
                }
            }
        }
        Err(ArbiterError::Unavailable(format!(
            "no answer to {path} from {} ({})",
            describe(&self.endpoints),
            failures.join("; ")
        )))
    }

    fn attempt(&self, endpoint: &Endpoint, path: &str, body: &str, budget: Duration) -> Attempt {
        let url = format!("http://{}{path}", endpoint.authority());
        let sent = self
            .agent
            .post(&url)
            .config()
            // One budget for resolve + connect + send + receive headers + body.
            .timeout_global(Some(budget))
            .build()
            .header("content-type", "application/json")
            .send(body);
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return Attempt::Next(transport_error(&e, budget)),
        };
        let status = response.status().as_u16();
        let text = match response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => {
                return Attempt::Next(format!(
                    "HTTP {status}, body unreadable: {}",
                    transport_error(&e, budget)
                ))
            }
        };
        classify(path, status, &text)
    }
}

fn transport_error(e: &ureq::Error, budget: Duration) -> String {
    match e {
        ureq::Error::Timeout(phase) => format!("timed out ({phase}) after {budget:?}"),
        other => other.to_string(),
    }
}

/// Turns an HTTP answer into an attempt outcome.
fn classify(path: &str, status: u16, text: &str) -> Attempt {
    let value: Option<Value> = serde_json::from_str(text).ok();
    let gateway_error = value.as_ref().and_then(GatewayError::from_value);
    match (status, gateway_error, value) {
        (_, Some(e), _) if e.is_lease_not_found() => {
            Attempt::Fail(ArbiterError::LeaseLost(e.message))
        }
        (_, Some(e), _) if e.is_retryable() || status >= 500 || status == 429 => Attempt::Next(
            format!("HTTP {status}: {} (gRPC code {})", e.message, e.code),
        ),
        (_, Some(e), _) => Attempt::Fail(ArbiterError::Protocol(format!(
            "{path}: HTTP {status}: {} (gRPC code {})",
            e.message, e.code
        ))),
        (200, None, Some(v)) => Attempt::Done(v),
        (s, None, _) if s >= 500 => Attempt::Next(format!("HTTP {s}: {}", excerpt(text))),
        (s, None, _) => Attempt::Fail(ArbiterError::Protocol(format!(
            "{path}: HTTP {s}: {}",
            excerpt(text)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(a: Attempt) -> String {
        match a {
            Attempt::Done(_) => "done".into(),
            Attempt::Next(why) => format!("next: {why}"),
            Attempt::Fail(e) => format!("fail: {e:?}"),
        }
    }

    #[test]
    fn maps_gateway_answers() {
        let lost = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert!(kind(classify("/v3/kv/txn", 404, lost)).starts_with("fail: LeaseLost"));
        let no_leader =
            r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#;
        assert!(kind(classify("/v3/kv/txn", 503, no_leader))
            .starts_with("next: HTTP 503: etcdserver: no leader"));
        let stream = r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: leader changed","http_status":"Service Unavailable"}}"#;
        assert!(kind(classify("/v3/lease/keepalive", 200, stream)).starts_with("next:"));
        let dup = r#"{"error":"etcdserver: duplicate key given in txn request","message":"etcdserver: duplicate key given in txn request","code":3}"#;
        assert!(kind(classify("/v3/kv/txn", 400, dup)).starts_with("fail: Protocol"));
        assert!(kind(classify("/v3/kv/nope", 404, "Not Found\n"))
            .starts_with("fail: Protocol(\"/v3/kv/nope: HTTP 404: Not Found"));
        assert!(
            kind(classify("/v3/kv/range", 502, "<html>bad gateway</html>"))
                .starts_with("next: HTTP 502")
        );
        assert!(kind(classify("/v3/kv/range", 200, "{truncated")).starts_with("fail: Protocol"));
        assert_eq!(
            kind(classify("/v3/kv/range", 200, r#"{"header":{}}"#)),
            "done"
        );
    }
}
