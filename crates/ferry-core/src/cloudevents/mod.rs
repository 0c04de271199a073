//! CloudEvents 1.0 mapping of a [`Message`] (docs/DESIGN.md §3).
//!
//! Binary content mode: the attributes travel as protocol headers with a binding-specific
//! prefix (`ce-` for NATS and HTTP, `ce_` for Kafka, `cloudEvents:` for AMQP) and the payload
//! is the body, untouched. Structured mode (files, stdout, and NATS when configured) is one
//! JSON object: the event with its payload as `data`.
//!
//! A message's W3C trace context travels as the distributed-tracing extension
//! (`traceparent`, `tracestate`): `ce-traceparent` and so on in binary mode, beside the plain
//! `traceparent` header that the protocol's own tracing reads; top-level attributes in
//! structured mode. Decoding puts them back among the headers.

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::message::{CONTENT_TYPE_HEADER, Headers, Message, default_partition_key};
use crate::trace_context::{TRACEPARENT, TRACESTATE, TraceParent};

pub const SPEC_VERSION: &str = "1.0";

/// Extension attribute names ferry adds to every event.
pub mod ext {
    pub const AGGREGATE_TYPE: &str = "aggregatetype";
    pub const AGGREGATE_VERSION: &str = "aggregateversion";
    pub const PARTITION_KEY: &str = "partitionkey";
    pub const SEQUENCE: &str = "sequence";
}

/// The distributed-tracing extension's attributes, sent when the message carries them (as
/// headers of the same names).
pub const TRACE_ATTRIBUTE_NAMES: [&str; 2] = [TRACEPARENT, TRACESTATE];

/// The media type of a structured-mode event in the JSON event format: the `content-type`
/// by which a receiver tells a structured message from a binary one.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How an event travels in a protocol message: the two content modes of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// The attributes as protocol headers, the payload as the body, untouched.
    #[default]
    Binary,
    /// The whole event as one JSON object in the body ([`to_structured_json`]), under the
    /// content type [`STRUCTURED_CONTENT_TYPE`].
    Structured,
}

/// Whether a message's `content-type` says it holds a structured-mode event (any
/// CloudEvents event format, e.g. `application/cloudevents+json; charset=utf-8`).
pub fn is_structured_content_type(content_type: &str) -> bool {
    const PREFIX: &str = "application/cloudevents";
    content_type
        .get(..PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(PREFIX))
}

/// How the CloudEvents `source` attribute is made.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Source {
    /// `ferry://<aggregate_type>`.
    #[default]
    PerAggregateType,
    /// The same configured URI for every event.
    Fixed(String),
}

impl Source {
    pub fn for_message<'a>(&'a self, message: &Message) -> Cow<'a, str> {
        match self {
            Self::PerAggregateType => Cow::Owned(format!("ferry://{}", message.aggregate_type)),
            Self::Fixed(uri) => Cow::Borrowed(uri),
        }
    }
}

/// RFC 3339 with microseconds, the `time` attribute's form.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The names of the attributes [`binary_attributes`] yields for every message, in its
/// order; [`TRACE_ATTRIBUTE_NAMES`] follow when present.
pub const BINARY_ATTRIBUTE_NAMES: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    ext::AGGREGATE_TYPE,
    ext::AGGREGATE_VERSION,
    ext::PARTITION_KEY,
    ext::SEQUENCE,
];

/// The context attributes of `message` in binary mode, without prefix, in a fixed order:
/// [`BINARY_ATTRIBUTE_NAMES`], then the trace context the message carries.
/// `datacontenttype` is not among them: bindings carry it as their own content-type header.
pub fn binary_attributes<'a>(
    message: &'a Message,
    source: &'a Source,
) -> impl ExactSizeIterator<Item = (&'static str, Cow<'a, str>)> {
    let mut trace = TRACE_ATTRIBUTE_NAMES
        .into_iter()
        .filter_map(|name| Some((name, Cow::Borrowed(message.headers.get(name)?.as_str()))));
    let mut unused = || ("", Cow::Borrowed(""));
    let (first, second) = (trace.next(), trace.next());
    let present = usize::from(first.is_some()) + usize::from(second.is_some());
    // One array, so that the iterator knows its length (a stream entry counts its fields).
    let attributes: [(&'static str, Cow<'a, str>); 12] = [
        ("specversion", Cow::Borrowed(SPEC_VERSION)),
        ("id", Cow::Owned(message.id.to_string())),
        ("source", source.for_message(message)),
        ("type", Cow::Borrowed(&message.event_type)),
        ("subject", Cow::Borrowed(&message.aggregate_id)),
        ("time", Cow::Owned(format_time(&message.created_at))),
        (ext::AGGREGATE_TYPE, Cow::Borrowed(&message.aggregate_type)),
        (
            ext::AGGREGATE_VERSION,
            Cow::Owned(message.version.to_string()),
        ),
        (ext::PARTITION_KEY, Cow::Borrowed(&message.partition_key)),
        (ext::SEQUENCE, Cow::Owned(message.sequence.to_string())),
        first.unwrap_or_else(&mut unused),
        second.unwrap_or_else(&mut unused),
    ];
    attributes
        .into_iter()
        .take(BINARY_ATTRIBUTE_NAMES.len() + present)
}

/// The user headers to send beside the CloudEvents attributes (all but `content-type`).
pub fn user_headers(message: &Message) -> impl Iterator<Item = (&str, &str)> {
    message
        .headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
        .map(|(n, v)| (n.as_str(), v.as_str()))
}

#[derive(Serialize)]
struct Structured<'a> {
    specversion: &'static str,
    id: Uuid,
    source: Cow<'a, str>,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'a str,
    aggregatetype: &'a str,
    aggregateversion: u64,
    partitionkey: &'a str,
    sequence: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    #[serde(skip_serializing_if = "Headers::is_empty")]
    headers: Headers,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// One structured-mode JSON object, without a trailing newline. A JSON payload is embedded
/// as `data` (validated, not re-serialised); anything else goes in `data_base64`.
pub fn to_structured_json(message: &Message, source: &Source) -> String {
    let content_type = message.content_type();
    let json_data = is_json(content_type)
        .then(|| std::str::from_utf8(&message.payload).ok())
        .flatten()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
    let data_base64 = json_data
        .is_none()
        .then(|| base64::engine::general_purpose::STANDARD.encode(&message.payload));
    let event = Structured {
        specversion: SPEC_VERSION,
        id: message.id,
        source: source.for_message(message),
        event_type: &message.event_type,
        subject: &message.aggregate_id,
        time: format_time(&message.created_at),
        datacontenttype: content_type,
        aggregatetype: &message.aggregate_type,
        aggregateversion: message.version,
        partitionkey: &message.partition_key,
        sequence: message.sequence,
        traceparent: message.headers.get(TRACEPARENT).map(String::as_str),
        tracestate: message.headers.get(TRACESTATE).map(String::as_str),
        headers: user_headers(message)
            .filter(|(name, _)| !TRACE_ATTRIBUTE_NAMES.contains(name))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect(),
        data: json_data,
        data_base64,
    };
    serde_json::to_string(&event).expect("a structured event always serialises")
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
}

/// A message as a consumer received it from any sink, rebuilt from CloudEvents attributes:
/// what the inbox needs to apply it exactly once and in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub event_type: String,
    pub partition_key: String,
    pub payload: Bytes,
    /// Headers that are not CloudEvents attributes (user headers), and the trace context
    /// (`traceparent`, `tracestate`: see [`Self::traceparent`]).
    pub headers: Headers,
    pub time: Option<DateTime<Utc>>,
}

/// Why a received event could not be turned into a [`ReceivedMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("the CloudEvents attribute {0:?} is missing")]
    Missing(&'static str),
    #[error("the CloudEvents attribute {name:?} has an invalid value {value:?}")]
    Invalid { name: &'static str, value: String },
    #[error("the structured event is not valid JSON: {0}")]
    Json(String),
}

const BINARY_PREFIXES: [&str; 4] = ["ce-", "ce_", "cloudEvents:", "cloudEvents_"];

impl ReceivedMessage {
    /// Rebuilds a message from binary-mode headers of any binding (`ce-id`, `ce_id`,
    /// `cloudEvents:id`, case-insensitive) and the body.
    pub fn from_binary<'h>(
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        payload: Bytes,
    ) -> Result<Self, DecodeError> {
        let mut attributes = Headers::new();
        let mut others = Headers::new();
        for (name, value) in headers {
            let attribute = BINARY_PREFIXES.iter().find_map(|prefix| {
                name.get(..prefix.len())
                    .filter(|head| head.eq_ignore_ascii_case(prefix))
                    .map(|_| &name[prefix.len()..])
            });
            match attribute {
                Some(attr) => attributes.insert(attr.to_ascii_lowercase(), value.to_owned()),
                None => others.insert(name.to_ascii_lowercase(), value.to_owned()),
            };
        }
        Self::from_attributes(attributes, others, payload)
    }

    /// Rebuilds a message from one structured-mode JSON object (a line of the file sink).
    pub fn from_structured_json(line: &str) -> Result<Self, DecodeError> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| DecodeError::Json(e.to_string()))?;
        let payload = match (object.remove("data"), object.remove("data_base64")) {
            (Some(data), _) => Bytes::from(data.to_string()),
            (None, Some(serde_json::Value::String(encoded))) => {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map(Bytes::from)
                    .map_err(|_| DecodeError::Invalid {
                        name: "data_base64",
                        value: encoded,
                    })?
            }
            _ => Bytes::new(),
        };
        let headers = match object.remove("headers") {
            Some(value) => {
                serde_json::from_value(value).map_err(|e| DecodeError::Json(e.to_string()))?
            }
            None => Headers::new(),
        };
        let attributes = object
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect();
        Self::from_attributes(attributes, headers, payload)
    }

    /// The producer's trace context, if the message carries a valid one: continue its
    /// trace from `trace_id` and `parent_id` (with OpenTelemetry, the `ferry` crate's `otel`
    /// feature makes it the parent of a span).
    pub fn traceparent(&self) -> Option<TraceParent<'_>> {
        TraceParent::parse(self.headers.get(TRACEPARENT)?).ok()
    }

    /// The vendor part of the producer's trace context (W3C `tracestate`).
    pub fn tracestate(&self) -> Option<&str> {
        self.headers.get(TRACESTATE).map(String::as_str)
    }

    fn from_attributes(
        mut attributes: Headers,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<Self, DecodeError> {
        for name in TRACE_ATTRIBUTE_NAMES {
            if let Some(value) = attributes.remove(name) {
                headers.insert(name.to_owned(), value);
            }
        }
        let mut take =
            |name: &'static str| attributes.remove(name).ok_or(DecodeError::Missing(name));
        let id_text = take("id")?;
        let id = Uuid::parse_str(&id_text).map_err(|_| DecodeError::Invalid {
            name: "id",
            value: id_text,
        })?;
        let event_type = take("type")?;
        let aggregate_id = take("subject")?;
        let aggregate_type = take(ext::AGGREGATE_TYPE)?;
        let version_text = take(ext::AGGREGATE_VERSION)?;
        let version = version_text.parse().map_err(|_| DecodeError::Invalid {
            name: ext::AGGREGATE_VERSION,
            value: version_text,
        })?;
        let partition_key = take(ext::PARTITION_KEY)
            .unwrap_or_else(|_| default_partition_key(&aggregate_type, &aggregate_id));
        let time = take("time")
            .ok()
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(Self {
            id,
            aggregate_type,
            aggregate_id,
            version,
            event_type,
            partition_key,
            payload,
            headers,
            time,
        })
    }
}

impl From<Message> for ReceivedMessage {
    fn from(m: Message) -> Self {
        Self {
            id: m.id,
            aggregate_type: m.aggregate_type,
            aggregate_id: m.aggregate_id,
            version: m.version,
            event_type: m.event_type,
            partition_key: m.partition_key,
            payload: m.payload,
            headers: m.headers,
            time: Some(m.created_at),
        }
    }
}

#[cfg(test)]
mod tests;
