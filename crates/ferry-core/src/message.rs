//! The message as it lives in the outbox and travels to the broker (docs/DESIGN.md §3).

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::trace_context::{TRACEPARENT, TRACESTATE, TraceParent, check_tracestate};

/// Headers carried with a message: trace context (`traceparent`), `content-type`, user headers.
pub type Headers = BTreeMap<String, String>;

/// The header whose value becomes the CloudEvents `datacontenttype`.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// Content type assumed when a message carries no `content-type` header.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// Header set by the reliable message service (`ferry serve`) on a deliberate redelivery
/// of the same message: the delivery attempt, 2 and up. See [`Message::dedup_id`].
pub const DELIVERY_ATTEMPT_HEADER: &str = "ferry-delivery-attempt";

/// Header set by `ferry replay` on the messages it publishes again: the replay's name. See
/// [`Message::dedup_id`].
pub const REPLAY_HEADER: &str = "ferry-replay";

/// A message stored in the outbox, with every field the store assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// UUID v7 made by the producer: the dedup key everywhere.
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Per-aggregate counter: 1, 2, 3, … in commit order.
    pub version: u64,
    pub event_type: String,
    /// Opaque bytes, passed through untouched.
    pub payload: Bytes,
    pub headers: Headers,
    /// What order is kept by; defaults to `aggregate_type/aggregate_id`.
    pub partition_key: String,
    /// `partition_for(partition_key, P)`.
    pub partition: u32,
    /// Set by the store's clock.
    pub created_at: DateTime<Utc>,
    /// Store-assigned position inside the outbox; the order key within a partition.
    pub sequence: i64,
}

impl Message {
    /// The payload's media type: the `content-type` header, else JSON.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE_HEADER)
            .map_or(DEFAULT_CONTENT_TYPE, String::as_str)
    }

    /// The id a sink gives the broker for its duplicate detection (NATS `Nats-Msg-Id`): the
    /// message id, suffixed `:<attempt>` when [`DELIVERY_ATTEMPT_HEADER`] says this is a
    /// deliberate redelivery and `:replay-<name>` when [`REPLAY_HEADER`] says a replay
    /// sends it again. Both keep the message id (consumers dedup by it), so without the
    /// suffix a broker would drop them as duplicates of the first delivery within its dedup
    /// window; re-sends of one attempt or one replay still share one dedup id. The
    /// suffixed form is not a UUID, so reconciliation by id never mistakes an earlier
    /// delivery found in the broker for a pending one.
    pub fn dedup_id(&self) -> String {
        let mut id = self.id.to_string();
        if let Some(attempt) = self.headers.get(DELIVERY_ATTEMPT_HEADER) {
            id.push(':');
            id.push_str(attempt);
        }
        if let Some(replay) = self.headers.get(REPLAY_HEADER) {
            id.push_str(":replay-");
            id.push_str(replay);
        }
        id
    }
}

/// What an application hands to `enqueue`: the store fills in the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Bytes,
    pub headers: Headers,
    /// Overrides the default partition key `aggregate_type/aggregate_id`.
    pub partition_key: Option<String>,
    /// Overrides the generated UUID v7 (for replays that keep original ids).
    pub id: Option<Uuid>,
}

impl NewMessage {
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            headers: Headers::new(),
            partition_key: None,
            id: None,
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Carries the producer's W3C trace context (`00-<trace id>-<span id>-<flags>`): kept
    /// with the message in the `traceparent` header and sent on every sink as the
    /// CloudEvents distributed-tracing extension, so that consumers continue the trace.
    /// Checked at enqueue ([`InvalidMessage::TraceContext`]). With OpenTelemetry, the
    /// `ferry` crate's `otel` feature takes it from the current `tracing` span.
    pub fn with_traceparent(self, traceparent: impl Into<String>) -> Self {
        self.with_header(TRACEPARENT, traceparent)
    }

    /// The vendor-specific part of the trace context (W3C `tracestate`), sent beside the
    /// `traceparent`, which it needs.
    pub fn with_tracestate(self, tracestate: impl Into<String>) -> Self {
        self.with_header(TRACESTATE, tracestate)
    }

    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// The partition key this message is ordered by.
    pub fn partition_key(&self) -> String {
        self.partition_key
            .clone()
            .unwrap_or_else(|| default_partition_key(&self.aggregate_type, &self.aggregate_id))
    }

    /// Checks everything a store would otherwise reject half-way, so that a bad message
    /// fails before any statement runs and the caller's transaction stays usable.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), InvalidMessage> {
        for (field, value) in [
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
        ] {
            if value.is_empty() {
                return Err(InvalidMessage::Empty { field });
            }
            if value.len() > MAX_NAME_BYTES {
                return Err(InvalidMessage::TooLong {
                    field,
                    len: value.len(),
                });
            }
        }
        if self.partition_key.as_deref() == Some("") {
            return Err(InvalidMessage::Empty {
                field: "partition_key",
            });
        }
        if self.payload.len() > max_payload_bytes {
            return Err(InvalidMessage::PayloadTooLarge {
                size: self.payload.len(),
                limit: max_payload_bytes,
            });
        }
        for (name, value) in &self.headers {
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b':' && b != b'"');
            if !valid_name {
                return Err(InvalidMessage::HeaderName { name: name.clone() });
            }
            if value.contains(['\r', '\n']) {
                return Err(InvalidMessage::HeaderValue { name: name.clone() });
            }
        }
        check_trace_context(&self.headers)
    }
}

/// A `traceparent` header must be a W3C trace context, and a `tracestate` needs one.
fn check_trace_context(headers: &Headers) -> Result<(), InvalidMessage> {
    let refused = |field, value: &String, reason| InvalidMessage::TraceContext {
        field,
        value: value.clone(),
        reason,
    };
    let traceparent = headers.get(TRACEPARENT);
    if let Some(value) = traceparent {
        TraceParent::parse(value).map_err(|reason| refused(TRACEPARENT, value, reason))?;
    }
    if let Some(value) = headers.get(TRACESTATE) {
        if traceparent.is_none() {
            return Err(refused(
                TRACESTATE,
                value,
                "a tracestate goes with a traceparent: set both",
            ));
        }
        check_tracestate(value).map_err(|reason| refused(TRACESTATE, value, reason))?;
    }
    Ok(())
}

/// Longest aggregate type, aggregate id or event type accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// `aggregate_type/aggregate_id`, the partition key unless the producer sets one.
pub fn default_partition_key(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{aggregate_type}/{aggregate_id}")
}

/// Why a [`NewMessage`] was refused before it reached the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong { field: &'static str, len: usize },
    #[error(
        "payload is {size} bytes; the limit is {limit} (raise producer.max_payload_bytes or send a reference to the data instead)"
    )]
    PayloadTooLarge { size: usize, limit: usize },
    #[error(
        "header name {name:?} is not allowed: use visible ASCII without ':' or quotes, e.g. \"traceparent\""
    )]
    HeaderName { name: String },
    #[error("header {name:?} has a line break in its value")]
    HeaderValue { name: String },
    #[error(
        "{field} {value:?} is not a W3C trace context: {reason} (e.g. traceparent \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\")"
    )]
    TraceContext {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Why `enqueue` failed. On [`EnqueueError::Invalid`] no statement ran, so the caller's
/// transaction is still usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidMessage),
    #[error("enqueue failed: {0}")]
    Store(#[from] crate::error::StoreError),
}

/// What the store assigned to an enqueued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: Uuid,
    pub version: u64,
    pub partition: u32,
    pub sequence: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_partition_key_joins_type_and_id() {
        let m = NewMessage::new("order", "42", "order.paid", "{}");
        assert_eq!(m.partition_key(), "order/42");
        assert_eq!(m.with_partition_key("tenant-7").partition_key(), "tenant-7");
    }

    #[test]
    fn dedup_id_carries_the_delivery_attempt() {
        let mut message = Message {
            id: Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            version: 1,
            event_type: "order.paid".into(),
            payload: Bytes::new(),
            headers: Headers::new(),
            partition_key: "order/42".into(),
            partition: 0,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            sequence: 1,
        };
        assert_eq!(message.dedup_id(), Uuid::nil().to_string());
        message
            .headers
            .insert(DELIVERY_ATTEMPT_HEADER.into(), "3".into());
        assert_eq!(message.dedup_id(), format!("{}:3", Uuid::nil()));
        assert!(Uuid::parse_str(&message.dedup_id()).is_err());
        message
            .headers
            .insert(REPLAY_HEADER.into(), "restore-7".into());
        assert_eq!(
            message.dedup_id(),
            format!("{}:3:replay-restore-7", Uuid::nil())
        );
    }

    #[test]
    fn validate_names_the_problem() {
        let ok = NewMessage::new("order", "42", "order.paid", vec![0u8; 10]);
        assert_eq!(ok.validate(10), Ok(()));
        assert_eq!(
            ok.validate(9),
            Err(InvalidMessage::PayloadTooLarge { size: 10, limit: 9 })
        );
        let empty = NewMessage::new("", "42", "x", "");
        assert_eq!(
            empty.validate(10),
            Err(InvalidMessage::Empty {
                field: "aggregate_type"
            })
        );
        let bad_header = NewMessage::new("a", "1", "x", "").with_header("bad:name", "v");
        assert!(matches!(
            bad_header.validate(10),
            Err(InvalidMessage::HeaderName { .. })
        ));
        let bad_value = NewMessage::new("a", "1", "x", "").with_header("h", "a\r\nb");
        assert!(matches!(
            bad_value.validate(10),
            Err(InvalidMessage::HeaderValue { .. })
        ));
    }

    #[test]
    fn trace_context_is_checked_at_enqueue() {
        let traced = NewMessage::new("a", "1", "x", "")
            .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .with_tracestate("rojo=00f067aa0ba902b7");
        assert_eq!(traced.validate(10), Ok(()));
        let bad = NewMessage::new("a", "1", "x", "").with_traceparent("00-abc-def-01");
        let err = bad.validate(10).unwrap_err();
        assert!(
            matches!(
                err,
                InvalidMessage::TraceContext {
                    field: "traceparent",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("traceparent \"00-abc-def-01\""));
        let alone = NewMessage::new("a", "1", "x", "").with_tracestate("k=v");
        assert!(matches!(
            alone.validate(10),
            Err(InvalidMessage::TraceContext {
                field: "tracestate",
                ..
            })
        ));
    }
}
