//! The `Idempotency-Key` header of the POST endpoints (contract section 4).
//!
//! A handler that accepts a key does, inside its session's transaction:
//! 1. [`Idempotent::claim`] first, before any other statement (the database side, and why
//!    a repeat of an in-flight request waits, is described in `db::idempotency`);
//! 2. on [`Claimed::Replay`], answers the stored status and body with
//!    `Idempotent-Replayed: true` and writes nothing (the transaction commits, empty);
//! 3. otherwise does its work and [`Idempotent::record`]s the exact response bytes before
//!    answering.
//!
//! Only successful responses are ever stored: an error answer rolls the transaction back,
//! the claimed key with it, so a repeat applies afresh. Keys are scoped to the endpoint,
//! and a repeat must carry the same JSON value (whitespace and field order do not matter,
//! see [`fingerprint`]), else it gets 409 `idempotency_conflict`.

use std::future::{ready, Ready};
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse};
use diesel_async::AsyncPgConnection;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::db::idempotency::{self, Claim};
use crate::error::ApiError;

/// The request header.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");
/// The header that marks a replayed response.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest accepted key, in characters (contract section 4).
const MAX_KEY_LEN: usize = 255;

/// Application-wide idempotency settings (in `web::Data`).
#[derive(Clone, Debug)]
pub struct IdempotencySettings {
    /// Keys older than this are treated as absent and purged (`IDEMPOTENCY_TTL_SECS`).
    pub ttl: Duration,
}

/// The request's `Idempotency-Key`, if it sent one. A malformed key (empty, longer than
/// 255, anything but visible ASCII 0x21..=0x7E, or the header sent twice) is 400
/// `bad_request`, before the handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl FromRequest for IdempotencyKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let mut values = req.headers().get_all(KEY_HEADER);
        ready(match (values.next(), values.next()) {
            (None, _) => Ok(IdempotencyKey(None)),
            (Some(_), Some(_)) => Err(ApiError::BadRequest(
                "send at most one Idempotency-Key header".to_owned(),
            )),
            (Some(value), None) => parse_key(value).map(|key| IdempotencyKey(Some(key))),
        })
    }
}

fn parse_key(value: &HeaderValue) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= MAX_KEY_LEN
        && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    match std::str::from_utf8(bytes) {
        Ok(key) if valid => Ok(key.to_owned()),
        _ => Err(ApiError::BadRequest(
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters".to_owned(),
        )),
    }
}

/// SHA-256 (hex) of the canonical JSON form of the parsed request body: object keys
/// sorted, no whitespace. Two bodies get the same fingerprint exactly when they are the
/// same JSON value.
///
/// Fingerprints are stored with their keys (for the keys' lifetime), so this form must not
/// change for any body the service accepts; the unit tests pin it.
pub fn fingerprint(body: &impl Serialize) -> Result<String, ApiError> {
    let value = serde_json::to_value(body).map_err(ApiError::internal)?;
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    Ok(hex::encode(Sha256::digest(canonical.as_bytes())))
}

/// Writes `value` with object keys in sorted order, whatever map type serde_json was
/// built with (its `preserve_order` feature keeps insertion order).
///
/// Hand-written on purpose rather than an RFC 8785 (JCS) serializer: JCS writes every
/// number as an IEEE-754 double, so integers past 2^53 lose digits (9007199254740993 is
/// written as 9007199254740992, `i64::MAX` as 9223372036854776000). The bodies hold `i64`
/// amounts and account ids, and two transfers that differ only in such an amount must not
/// share a fingerprint, or a repeat with another amount would be replayed instead of
/// refused with 409. For integers up to 2^53 in magnitude and for strings, this form is
/// byte for byte JCS, except that keys sort by code point rather than by UTF-16 code unit
/// (the two orders part only for keys holding characters from U+E000 up; the bodies' keys
/// are ASCII field names).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A response as first sent, replayed for a repeat of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub status: StatusCode,
    pub body: String,
}

impl Stored {
    /// The replay: the stored status and body bytes, marked `Idempotent-Replayed: true`.
    pub fn replay(self, location: Option<String>) -> HttpResponse {
        json_response(self.status, self.body, location, true)
    }
}

/// A JSON response with exactly these body bytes (the form that is also stored), with an
/// optional `Location`, marked as a replay or not.
pub fn json_response(
    status: StatusCode,
    body: String,
    location: Option<String>,
    replayed: bool,
) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response.insert_header((
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    ));
    if let Some(location) = location {
        response.insert_header((header::LOCATION, location));
    }
    if replayed {
        response.insert_header((REPLAYED_HEADER, HeaderValue::from_static("true")));
    }
    response.body(body)
}

/// What claiming found.
#[derive(Debug)]
pub enum Claimed {
    /// Go ahead; record the response before answering.
    Fresh,
    /// Answer this instead; apply nothing.
    Replay(Stored),
}

/// A request that carries a key, bound to its endpoint and body.
#[derive(Debug, Clone)]
pub struct Idempotent {
    endpoint: &'static str,
    key: String,
    fingerprint: String,
    ttl: Duration,
}

impl Idempotent {
    /// `None` when the request has no key.
    pub fn new(
        endpoint: &'static str,
        key: IdempotencyKey,
        body: &impl Serialize,
        settings: &IdempotencySettings,
    ) -> Result<Option<Self>, ApiError> {
        let Some(key) = key.0 else { return Ok(None) };
        Ok(Some(Idempotent {
            endpoint,
            key,
            fingerprint: fingerprint(body)?,
            ttl: settings.ttl,
        }))
    }

    /// Claims the key; must be the transaction's first statement. Waits while another
    /// request holding the key is in flight.
    pub async fn claim(&self, conn: &mut AsyncPgConnection) -> Result<Claimed, ApiError> {
        let stored =
            match idempotency::claim(conn, self.endpoint, &self.key, &self.fingerprint, self.ttl)
                .await?
            {
                Claim::Claimed => return Ok(Claimed::Fresh),
                Claim::Taken(stored) => stored,
            };
        if stored.fingerprint != self.fingerprint {
            return Err(ApiError::IdempotencyConflict);
        }
        match u16::try_from(stored.status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(status) if status.is_success() => Ok(Claimed::Replay(Stored {
                status,
                body: stored.body,
            })),
            _ => Err(ApiError::internal(format!(
                "idempotency key of {} committed with status {}",
                self.endpoint, stored.status
            ))),
        }
    }

    /// Stores the response about to be sent, in the same transaction as the work.
    pub async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        status: StatusCode,
        body: &str,
    ) -> Result<(), ApiError> {
        let status = i16::try_from(status.as_u16()).map_err(ApiError::internal)?;
        idempotency::record(conn, self.endpoint, &self.key, status, body).await?;
        Ok(())
    }
}

/// Step 1 for a request that may carry a key: claims it (see [`Idempotent::claim`]);
/// without a key there is nothing to claim and the request is `Fresh`.
pub async fn claim(
    idempotent: Option<&Idempotent>,
    conn: &mut AsyncPgConnection,
) -> Result<Claimed, ApiError> {
    match idempotent {
        Some(idempotent) => idempotent.claim(conn).await,
        None => Ok(Claimed::Fresh),
    }
}

/// Step 3 of a fresh request that succeeded: records `body` under its key, if it has one,
/// then answers it as 201 Created.
pub async fn created(
    idempotent: Option<&Idempotent>,
    conn: &mut AsyncPgConnection,
    body: String,
    location: Option<String>,
) -> Result<HttpResponse, ApiError> {
    if let Some(idempotent) = idempotent {
        idempotent.record(conn, StatusCode::CREATED, &body).await?;
    }
    Ok(json_response(StatusCode::CREATED, body, location, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_field_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[2,1]},"b":1}"#).unwrap();
        assert_eq!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&c).unwrap());
        assert_eq!(fingerprint(&a).unwrap().len(), 64);
    }

    /// Fingerprints are stored: these are the values the service has always computed.
    #[test]
    fn fingerprint_is_unchanged_for_stored_bodies() {
        // A transfer request's body, as `TransferRequest` serialises it.
        let transfer = |from: i64, to: i64, amount: i64| serde_json::json!({ "from_account_id": from, "to_account_id": to, "amount": amount });
        let single = transfer(17, 42, 12345);
        assert_eq!(
            fingerprint(&single).unwrap(),
            "9cca55482b31cbafe2227b8c3670b3540e962197cc41b021ced9023f6b8acc05"
        );
        let batch = serde_json::json!({ "transfers": [
            transfer(1, 2, 500),
            transfer(2, 3, 9_007_199_254_740_993),
        ] });
        assert_eq!(
            fingerprint(&batch).unwrap(),
            "ddae7372eb638cef7c0446b6a88861654ae411e661aca12680122218e7ef7a40"
        );
    }

    #[test]
    fn fingerprint_keeps_every_digit_of_an_i64() {
        let body = |amount: i64| serde_json::json!({ "amount": amount });
        let near = fingerprint(&body(9_007_199_254_740_993)).unwrap();
        assert_ne!(near, fingerprint(&body(9_007_199_254_740_992)).unwrap());
        let max = fingerprint(&body(i64::MAX)).unwrap();
        assert_ne!(max, fingerprint(&body(i64::MAX - 1)).unwrap());
    }

    #[test]
    fn keys_are_visible_ascii_of_1_to_255_characters() {
        let ok = |s: &[u8]| parse_key(&HeaderValue::from_bytes(s).unwrap()).is_ok();
        assert!(ok(b"a"));
        assert!(ok(b"!~"));
        assert!(ok("k".repeat(255).as_bytes()));
        assert!(!ok("k".repeat(256).as_bytes()));
        assert!(!ok(b""));
        assert!(!ok(b"a b"));
        assert!(!ok(b"a\tb"));
        assert!(!ok("é".as_bytes()));
    }
}
