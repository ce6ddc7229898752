// SPDX-License-Identifier: Apache-2.0
//! The JSON of etcd's v3 gRPC gateway: requests built here, answers parsed here.
//!
//! Checked against etcd 3.4.23: keys and values are base64; int64 fields are JSON strings; fields
//! at their zero value are left out (`"succeeded": false`, an empty `kvs`, a `lease` of 0, a
//! keepalive `TTL` of 0 are all absent), so every field here has a default. Field names come in
//! proto form (`create_revision`); the camelCase aliases only make a future gateway that switches
//! spelling harmless.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

/// Base64 of a key or value.
pub(crate) fn b64(s: &str) -> String {
    STANDARD.encode(s.as_bytes())
}

/// Decodes a base64 key or value as text (holder names are UTF-8; anything else is shown lossily).
pub(crate) fn unb64(s: &str) -> Result<String, String> {
    let bytes = STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64 `{}`: {e}", excerpt(s)))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// int64 as etcd's gateway writes it (a string), also accepting a plain number.
fn i64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        S(String),
        N(i64),
    }
    match Num::deserialize(d)? {
        Num::N(n) => Ok(n),
        Num::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

fn opt_i64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    i64_lenient(d).map(Some)
}

/// `ResponseHeader`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Header {
    /// The store's revision after this request (for a write: the revision it created).
    #[serde(default, deserialize_with = "i64_lenient")]
    pub revision: i64,
}

/// `LeaseGrantResponse`.
#[derive(Debug, Deserialize)]
pub(crate) struct GrantResponse {
    #[serde(rename = "ID", default, deserialize_with = "opt_i64_lenient")]
    pub id: Option<i64>,
    #[serde(rename = "TTL", default, deserialize_with = "i64_lenient")]
    pub ttl: i64,
    /// A legacy error string of the grant answer; empty on success.
    #[serde(default)]
    pub error: String,
}

/// The gateway's answer to `lease/keepalive` (a streaming RPC, so wrapped in `result`).
#[derive(Debug, Deserialize)]
pub(crate) struct KeepAliveAnswer {
    pub result: Option<KeepAliveResponse>,
}

/// `LeaseKeepAliveResponse`: `TTL` absent (0) means the lease is gone.
#[derive(Debug, Deserialize)]
pub(crate) struct KeepAliveResponse {
    #[serde(rename = "TTL", default, deserialize_with = "opt_i64_lenient")]
    pub ttl: Option<i64>,
}

/// `LeaseTimeToLiveResponse`: `TTL` is -1 for a lease that is gone.
#[derive(Debug, Deserialize)]
pub(crate) struct TimeToLiveResponse {
    #[serde(rename = "TTL", default, deserialize_with = "i64_lenient")]
    pub ttl: i64,
}

/// `mvccpb.KeyValue`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct KeyValue {
    #[serde(default)]
    pub value: String,
    #[serde(default, alias = "createRevision", deserialize_with = "i64_lenient")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "i64_lenient")]
    pub lease: i64,
}

/// `RangeResponse`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RangeResponse {
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
}

/// `ResponseOp`: only ranges are read back; puts and deletes are checked by `succeeded`.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponseOp {
    #[serde(default, alias = "responseRange")]
    pub response_range: Option<RangeResponse>,
}

/// `TxnResponse`.
#[derive(Debug, Deserialize)]
pub(crate) struct TxnResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<ResponseOp>,
}

impl TxnResponse {
    /// The first key-value of the `i`th range in the executed branch, when that key exists.
    pub(crate) fn range_kv(&self, i: usize) -> Result<Option<&KeyValue>, String> {
        let op = self.responses.get(i).ok_or_else(|| {
            format!(
                "txn answer has {} responses, expected a range at #{i}",
                self.responses.len()
            )
        })?;
        let range = op
            .response_range
            .as_ref()
            .ok_or_else(|| format!("txn response #{i} is not a range"))?;
        Ok(range.kvs.first())
    }
}

/// The gateway's error body: `{"error": "...", "message": "...", "code": 5}` for a unary call, or
/// `{"error": {"grpc_code": 5, "message": "..."}}` inside a 200 answer of a streaming call.
#[derive(Debug, Default)]
pub(crate) struct GatewayError {
    pub code: i64,
    pub message: String,
}

impl GatewayError {
    /// The error of an answer, if it is one.
    pub(crate) fn from_value(v: &Value) -> Option<GatewayError> {
        let obj = v.as_object()?;
        match obj.get("error")? {
            Value::Object(e) => Some(GatewayError {
                code: e
                    .get("grpc_code")
                    .or_else(|| e.get("code"))
                    .and_then(Value::as_i64)
                    .unwrap_or(-1),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }),
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(GatewayError {
                code: obj.get("code").and_then(Value::as_i64).unwrap_or(-1),
                message: obj
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or(s)
                    .to_string(),
            }),
            _ => None,
        }
    }

    /// etcd's `ErrGRPCLeaseNotFound` (gRPC NotFound): the lease expired or was revoked.
    pub(crate) fn is_lease_not_found(&self) -> bool {
        self.code == 5 && self.message.contains("lease not found")
    }

    /// gRPC Unavailable / DeadlineExceeded / ResourceExhausted: no leader, leader changed,
    /// request timed out, database over quota. Another member, or a later try, may answer.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self.code, 4 | 8 | 14)
    }
}

/// A compare `create_revision(key) == rev` (0 means: the key does not exist).
pub(crate) fn cmp_create(key: &str, rev: i64) -> Value {
    json!({"target": "CREATE", "result": "EQUAL", "key": b64(key), "create_revision": rev.to_string()})
}

/// A compare `value(key) == value` (false when the key does not exist).
pub(crate) fn cmp_value(key: &str, value: &str) -> Value {
    json!({"target": "VALUE", "result": "EQUAL", "key": b64(key), "value": b64(value)})
}

/// A compare `lease(key) == lease` (false when the key does not exist).
pub(crate) fn cmp_lease(key: &str, lease: i64) -> Value {
    json!({"target": "LEASE", "result": "EQUAL", "key": b64(key), "lease": lease.to_string()})
}

/// A put bound to `lease`.
pub(crate) fn op_put(key: &str, value: &str, lease: i64) -> Value {
    json!({"request_put": {"key": b64(key), "value": b64(value), "lease": lease.to_string()}})
}

/// A delete of one key.
pub(crate) fn op_delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key)}})
}

/// A (linearizable) read of one key.
pub(crate) fn op_range(key: &str) -> Value {
    json!({"request_range": {"key": b64(key)}})
}

/// A whole txn request.
pub(crate) fn txn(compare: Vec<Value>, success: Vec<Value>, failure: Vec<Value>) -> Value {
    json!({"compare": compare, "success": success, "failure": failure})
}

/// At most 200 characters of an answer, on one line: enough to recognise it in an error, never a
/// whole body in a log.
pub(crate) fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Answers captured from etcd 3.4.23's gateway.
    #[test]
    fn parses_captured_answers() {
        let failed: TxnResponse = serde_json::from_str(r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"4","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"4"},"kvs":[{"key":"Zm9v","create_revision":"4","mod_revision":"4","version":"1","value":"YmFy","lease":"2324035616181018642"}],"count":"1"}},{"response_range":{"header":{"revision":"4"}}}]}"#).unwrap();
        assert!(!failed.succeeded);
        let kv = failed.range_kv(0).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.lease), (4, 2324035616181018642));
        assert_eq!(unb64(&kv.value).unwrap(), "bar");
        assert!(failed.range_kv(1).unwrap().is_none());
        assert!(failed.range_kv(2).is_err());

        let won: TxnResponse = serde_json::from_str(r#"{"header":{"revision":"2"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"2"}}}]}"#).unwrap();
        assert!(won.succeeded);
        assert_eq!(won.header.revision, 2);
        assert!(won.range_kv(0).is_err());

        let ka: KeepAliveAnswer =
            serde_json::from_str(r#"{"result":{"header":{"revision":"1"},"ID":"1"}}"#).unwrap();
        assert_eq!(ka.result.unwrap().ttl, None);
        let ka: KeepAliveAnswer =
            serde_json::from_str(r#"{"result":{"ID":"1","TTL":"30"}}"#).unwrap();
        assert_eq!(ka.result.unwrap().ttl, Some(30));

        let g: GrantResponse =
            serde_json::from_str(r#"{"header":{},"ID":"2324035616181018630","TTL":"2"}"#).unwrap();
        assert_eq!((g.id, g.ttl), (Some(2324035616181018630), 2));
        let t: TimeToLiveResponse = serde_json::from_str(r#"{"ID":"1","TTL":"-1"}"#).unwrap();
        assert_eq!(t.ttl, -1);
    }

    #[test]
    fn recognises_errors() {
        let v: Value = serde_json::from_str(r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#).unwrap();
        let e = GatewayError::from_value(&v).unwrap();
        assert!(e.is_lease_not_found() && !e.is_retryable());
        let v: Value = serde_json::from_str(r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#).unwrap();
        let e = GatewayError::from_value(&v).unwrap();
        assert!(e.is_retryable() && e.message.contains("no leader"));
        let v: Value = serde_json::from_str(r#"{"ID":"1","TTL":"2","error":""}"#).unwrap();
        assert!(GatewayError::from_value(&v).is_none());
    }

    #[test]
    fn excerpt_is_short_and_one_line() {
        let long = "x\n".repeat(500);
        let e = excerpt(&long);
        assert!(!e.contains('\n') && e.chars().count() == 201);
    }
}
