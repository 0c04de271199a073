//! The message resource on the wire: the prepare request and the message view.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use ferry::Headers;
use ferry::message::{CONTENT_TYPE_HEADER, DEFAULT_CONTENT_TYPE};

use super::error::ApiError;
use crate::state::Status;
use crate::store::{Prepare, Record};

/// Longest `check_url` accepted.
const MAX_CHECK_URL_LEN: usize = 2048;

/// Header names reserved for ferry's own use.
const RESERVED_HEADER_PREFIX: &str = "ferry-";

/// `POST /v1/messages`. Optional fields may be left out but not sent as `null` (the
/// OpenAPI document types them as strings); `"payload": null` is the JSON payload `null`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareRequest {
    /// A UUID chosen by the producer, so that a retried prepare is recognised; default a
    /// new UUID v7.
    #[serde(default, deserialize_with = "present")]
    id: Option<String>,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    /// A JSON payload, stored as sent.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    /// Any other payload, base64-encoded.
    #[serde(default, deserialize_with = "present")]
    payload_base64: Option<String>,
    /// The payload's media type: default `application/json` with `payload`,
    /// `application/octet-stream` with `payload_base64`.
    #[serde(default, deserialize_with = "present")]
    content_type: Option<String>,
    #[serde(default)]
    headers: Headers,
    #[serde(default, deserialize_with = "present")]
    partition_key: Option<String>,
    check_url: String,
}

/// An optional field that, when present, must hold a `T`: `null` is refused for text
/// fields (serde's `Option` would take it for absent) and kept as a value for `payload`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

pub(crate) fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!(
                "{:?} is not a UUID: use the id returned by POST /v1/messages, e.g. 0190a6c2-7a4e-7cc1-9d3c-5b1f0e6e8a21",
                truncate(text)
            ),
        )
    })
}

/// At most 64 characters of a value echoed in an error.
fn truncate(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

impl PrepareRequest {
    /// Parses a request body, naming the field at fault.
    pub(crate) fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|err| {
            ApiError::bad_request(
                "invalid_body",
                format!("the request body is not a valid prepare request: {err}"),
            )
        })
    }

    /// Checks every field and builds the message to store.
    pub(crate) fn into_prepare(self, max_payload_bytes: usize) -> Result<Prepare, ApiError> {
        let id = match &self.id {
            Some(text) => parse_id(text)?,
            None => Uuid::now_v7(),
        };
        let (payload, default_type) = match (self.payload, self.payload_base64) {
            (Some(json), None) => (Bytes::from(json.get().to_owned()), DEFAULT_CONTENT_TYPE),
            (None, Some(encoded)) => {
                let bytes = STANDARD.decode(encoded.as_bytes()).map_err(|err| {
                    ApiError::bad_request(
                        "invalid_field",
                        format!("payload_base64 is not standard base64: {err}"),
                    )
                })?;
                (Bytes::from(bytes), "application/octet-stream")
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "send either payload (JSON) or payload_base64, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "missing payload: send payload (any JSON value) or payload_base64",
                ));
            }
        };
        if payload.len() > max_payload_bytes {
            return Err(ApiError::payload_too_large(format!(
                "payload is {} bytes; the limit is {max_payload_bytes} (service.max_payload_bytes): send a reference to the data instead",
                payload.len()
            )));
        }
        let mut headers = self.headers;
        for name in headers.keys() {
            let lower = name.to_ascii_lowercase();
            if lower == CONTENT_TYPE_HEADER {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "headers must not contain content-type: use the content_type field",
                ));
            }
            if lower.starts_with(RESERVED_HEADER_PREFIX) {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    format!(
                        "header {:?} is reserved: names starting with {RESERVED_HEADER_PREFIX:?} are ferry's",
                        truncate(name)
                    ),
                ));
            }
        }
        let content_type = self.content_type.unwrap_or_else(|| default_type.to_owned());
        if content_type != DEFAULT_CONTENT_TYPE {
            headers.insert(CONTENT_TYPE_HEADER.into(), content_type);
        }
        let prepare = Prepare {
            id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            payload,
            headers,
            partition_key: self.partition_key,
            check_url: check_url(self.check_url)?,
        };
        // The outbox's own rules, so that a confirmation never fails on the message.
        prepare
            .new_message()
            .validate(max_payload_bytes)
            .map_err(|err| ApiError::bad_request("invalid_field", err.to_string()))?;
        Ok(prepare)
    }
}

/// An absolute http(s) URL without credentials.
fn check_url(text: String) -> Result<String, ApiError> {
    let invalid = |why: &str| {
        ApiError::bad_request(
            "invalid_field",
            format!(
                "check_url {why}: use an absolute http or https URL such as https://orders.internal/ferry/check"
            ),
        )
    };
    if text.len() > MAX_CHECK_URL_LEN {
        return Err(invalid(&format!(
            "is longer than {MAX_CHECK_URL_LEN} bytes"
        )));
    }
    let url =
        reqwest::Url::parse(&text).map_err(|err| invalid(&format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid("is not an http(s) URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "must not carry credentials (set service.check_bearer_token instead)",
        ));
    }
    Ok(text)
}

/// A message as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct MessageView {
    id: Uuid,
    status: Status,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    /// Assigned on confirmation.
    version: Option<u64>,
    partition_key: Option<String>,
    content_type: String,
    headers: Headers,
    /// The JSON payload (single-message reads of JSON payloads).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Box<RawValue>>,
    /// Any other payload, base64 (single-message reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    check_url: String,
    checks: u32,
    deliveries: u32,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    next_check_at: Option<DateTime<Utc>>,
    confirmed_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    ack_deadline: Option<DateTime<Utc>>,
}

impl From<Record> for MessageView {
    fn from(record: Record) -> Self {
        let mut headers = record.headers;
        let content_type = headers
            .remove(CONTENT_TYPE_HEADER)
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned());
        let (payload, payload_base64) = match record.payload {
            None => (None, None),
            Some(bytes) => {
                let json = (content_type == DEFAULT_CONTENT_TYPE)
                    .then(|| std::str::from_utf8(&bytes).ok())
                    .flatten()
                    .and_then(|text| RawValue::from_string(text.to_owned()).ok());
                match json {
                    Some(json) => (Some(json), None),
                    None => (None, Some(STANDARD.encode(&bytes))),
                }
            }
        };
        Self {
            id: record.id,
            status: record.status,
            aggregate_type: record.aggregate_type,
            aggregate_id: record.aggregate_id,
            event_type: record.event_type,
            version: record.version,
            partition_key: record.partition_key,
            content_type,
            headers,
            payload,
            payload_base64,
            check_url: record.check_url,
            checks: record.checks,
            deliveries: record.deliveries,
            reason: record.reason,
            created_at: record.created_at,
            updated_at: record.updated_at,
            next_check_at: record.next_check_at,
            confirmed_at: record.confirmed_at,
            delivered_at: record.delivered_at,
            ack_deadline: record.ack_deadline,
        }
    }
}

/// `GET /v1/messages`.
#[derive(Debug, Serialize)]
pub(crate) struct MessagePage {
    pub(crate) messages: Vec<MessageView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub(crate) next_cursor: Option<String>,
}

/// The opaque cursor after `id`.
pub(crate) fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<Uuid, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor.as_bytes())
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                format!(
                    "cursor {:?} was not returned by this API: pass next_cursor from the previous page unchanged, or leave it out for the first page",
                    truncate(cursor)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<Prepare, ApiError> {
        PrepareRequest::from_json(json.as_bytes())?.into_prepare(100)
    }

    const BASE: &str = r#""aggregate_type":"order","aggregate_id":"42","event_type":"order.paid","check_url":"http://127.0.0.1:9/check""#;

    #[test]
    fn json_payloads_are_kept_as_sent() {
        let prepare =
            request(&format!(r#"{{{BASE},"payload":{{"b": 1,  "a":[2]}}}}"#)).expect("valid");
        assert_eq!(prepare.payload, Bytes::from(r#"{"b": 1,  "a":[2]}"#));
        assert!(prepare.headers.is_empty());
    }

    #[test]
    fn binary_payloads_carry_their_content_type() {
        let prepare = request(&format!(r#"{{{BASE},"payload_base64":"AAEC"}}"#)).expect("valid");
        assert_eq!(prepare.payload.as_ref(), &[0, 1, 2]);
        assert_eq!(
            prepare.headers[CONTENT_TYPE_HEADER],
            "application/octet-stream"
        );
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let err = request(r#"{"aggregate_type":"order"}"#).expect_err("missing fields");
        assert!(err_text(&err).contains("missing field"), "{err:?}");
        let err = request(&format!(r#"{{{BASE}}}"#)).expect_err("no payload");
        assert!(err_text(&err).contains("missing payload"), "{err:?}");
        let err = request(&format!(r#"{{{BASE},"payload":"{}"}}"#, "x".repeat(200)))
            .expect_err("too large");
        assert!(err_text(&err).contains("limit is 100"), "{err:?}");
        let err = request(&format!(r#"{{{BASE},"payload":1,"id":"nope"}}"#)).expect_err("id");
        assert!(err_text(&err).contains("not a UUID"), "{err:?}");
        let err = request(&format!(
            r#"{{{BASE},"payload":1,"headers":{{"ferry-delivery-attempt":"2"}}}}"#
        ))
        .expect_err("reserved header");
        assert!(err_text(&err).contains("reserved"), "{err:?}");
        let err = request(
            r#"{"aggregate_type":"o","aggregate_id":"1","event_type":"e","payload":1,"check_url":"ftp://x/"}"#,
        )
        .expect_err("scheme");
        assert!(err_text(&err).contains("check_url"), "{err:?}");
        let err = request(
            r#"{"aggregate_type":"","aggregate_id":"1","event_type":"e","payload":1,"check_url":"http://x/"}"#,
        )
        .expect_err("empty");
        assert!(err_text(&err).contains("aggregate_type"), "{err:?}");
    }

    fn err_text(err: &ApiError) -> String {
        format!("{err:?}")
    }

    #[test]
    fn null_is_refused_for_text_fields_and_kept_as_a_payload() {
        for field in ["id", "content_type", "partition_key", "payload_base64"] {
            let err = request(&format!(r#"{{{BASE},"payload":1,"{field}":null}}"#))
                .expect_err("null is not a string");
            assert!(err_text(&err).contains("null"), "{field}: {err:?}");
        }
        let prepare = request(&format!(r#"{{{BASE},"payload":null}}"#)).expect("a JSON null");
        assert_eq!(prepare.payload, Bytes::from("null"));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).expect("valid"), id);
        // openapi.json's pattern: 21 base64url characters and one of A, Q, g, w; any
        // string of that shape is a cursor.
        let cursor = encode_cursor(Uuid::max());
        assert_eq!(cursor.len(), 22);
        assert!(cursor.ends_with(['A', 'Q', 'g', 'w']), "{cursor}");
        for last in ['A', 'Q', 'g', 'w'] {
            assert!(decode_cursor(&format!("{}{last}", "_".repeat(21))).is_ok());
        }
        assert!(decode_cursor("not-a-cursor").is_err());
        assert!(decode_cursor("").is_err());
    }
}
