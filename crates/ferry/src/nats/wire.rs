//! The message on the wire: CloudEvents as `ce-*` headers (binary mode) or a JSON event
//! body (structured mode), and [`decode_message`], which reads either back.

use std::borrow::Cow;
use std::str::FromStr;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue, NATS_MESSAGE_ID};
use bytes::Bytes;

use ferry_core::cloudevents::{
    ContentMode, DecodeError, STRUCTURED_CONTENT_TYPE, binary_attributes, ext,
    is_structured_content_type, to_structured_json, user_headers,
};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::trace_context::{TRACEPARENT, TRACESTATE};
use ferry_core::{Message, ReceivedMessage, SinkError};

use super::NatsSink;

/// Header carrying the partition key: what reconciliation selects a partition's messages by.
pub(super) const PARTITION_KEY_HEADER: &str = "ce-partitionkey";

/// Header carrying the CloudEvents id: the fallback when a message has no `Nats-Msg-Id`.
pub(super) const ID_HEADER: &str = "ce-id";

impl NatsSink {
    /// The headers and body of `message` in the configured content mode. In binary mode the
    /// user headers go first, so that ferry's own headers win on a name clash; in structured
    /// mode they are inside the event.
    pub(super) fn encode(&self, message: &Message) -> Result<(HeaderMap, Bytes), SinkError> {
        let mut headers = HeaderMap::new();
        let (content_type, body) = match self.content_mode {
            ContentMode::Binary => {
                for (name, value) in user_headers(message) {
                    let header = HeaderName::from_str(name).map_err(|_| {
                        SinkError::permanent(format!(
                            "header name {name:?} cannot be sent in nats: use visible ASCII \
                             without ':'"
                        ))
                    })?;
                    headers.insert(header, header_value(name, Cow::Borrowed(value))?);
                }
                for (attribute, value) in binary_attributes(message, &self.source) {
                    let name = ce_header(attribute)?;
                    let value = header_value(name.as_ref(), value)?;
                    headers.insert(name, value);
                }
                (message.content_type(), message.payload.clone())
            }
            ContentMode::Structured => (
                STRUCTURED_CONTENT_TYPE,
                Bytes::from(to_structured_json(message, &self.source)),
            ),
        };
        // The broker's dedup key: the message id (`ce-id`), suffixed on a deliberate
        // redelivery so that the duplicate window does not drop it (`Message::dedup_id`).
        headers.insert(
            NATS_MESSAGE_ID,
            header_value("Nats-Msg-Id", Cow::Owned(message.dedup_id()))?,
        );
        headers.insert(
            HeaderName::from_static(CONTENT_TYPE_HEADER),
            header_value(CONTENT_TYPE_HEADER, Cow::Borrowed(content_type))?,
        );
        Ok((headers, body))
    }
}

/// The partition key of a stored message: its `ce-partitionkey` header in binary mode, the
/// `partitionkey` attribute of the event in the body in structured mode.
pub(super) fn partition_key<'m>(headers: &'m HeaderMap, body: &[u8]) -> Option<Cow<'m, str>> {
    if let Some(key) = headers.get(HeaderName::from_static(PARTITION_KEY_HEADER)) {
        return Some(Cow::Borrowed(key.as_str()));
    }
    let content_type = headers.get(HeaderName::from_static(CONTENT_TYPE_HEADER))?;
    if !is_structured_content_type(content_type.as_str()) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Keyed {
        partitionkey: String,
    }
    let event: Keyed = serde_json::from_slice(body).ok()?;
    Some(Cow::Owned(event.partitionkey))
}

/// Rebuilds a message this sink published, as a consumer does (e.g. before handing it to
/// an inbox): structured when its `content-type` is a CloudEvents event format, binary
/// otherwise, whichever `content_mode` the relay had.
pub fn decode_message(message: &async_nats::Message) -> Result<ReceivedMessage, DecodeError> {
    let headers = message.headers.as_ref();
    let structured = headers
        .and_then(|h| h.get(HeaderName::from_static(CONTENT_TYPE_HEADER)))
        .is_some_and(|content_type| is_structured_content_type(content_type.as_str()));
    if structured {
        let event = std::str::from_utf8(&message.payload)
            .map_err(|err| DecodeError::Json(format!("the body is not UTF-8: {err}")))?;
        return ReceivedMessage::from_structured_json(event);
    }
    let pairs = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.as_ref(), value.as_str()))
        });
    ReceivedMessage::from_binary(pairs, message.payload.clone())
}

/// `ce-<attribute>`, without allocating for the attributes ferry sends.
fn ce_header(attribute: &'static str) -> Result<HeaderName, SinkError> {
    let name = match attribute {
        "specversion" => "ce-specversion",
        "id" => ID_HEADER,
        "source" => "ce-source",
        "type" => "ce-type",
        "subject" => "ce-subject",
        "time" => "ce-time",
        ext::AGGREGATE_TYPE => "ce-aggregatetype",
        ext::AGGREGATE_VERSION => "ce-aggregateversion",
        ext::PARTITION_KEY => PARTITION_KEY_HEADER,
        ext::SEQUENCE => "ce-sequence",
        TRACEPARENT => "ce-traceparent",
        TRACESTATE => "ce-tracestate",
        other => {
            return HeaderName::from_str(&format!("ce-{other}")).map_err(|_| {
                SinkError::permanent(format!(
                    "CloudEvents attribute {other:?} is not a valid header name"
                ))
            });
        }
    };
    Ok(HeaderName::from_static(name))
}

/// A header value, refused (permanently: the stored message will not change) when it holds
/// a line break, which would end the NATS header block early.
fn header_value(name: &str, value: Cow<'_, str>) -> Result<HeaderValue, SinkError> {
    if value.contains(['\r', '\n']) {
        return Err(SinkError::permanent(format!(
            "header {name:?} has a line break in its value, which nats headers cannot carry"
        )));
    }
    Ok(match value {
        Cow::Borrowed(value) => HeaderValue::from(value),
        Cow::Owned(value) => HeaderValue::from(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_headers_are_static_and_prefixed() {
        for name in ["specversion", "id", "time", ext::PARTITION_KEY, TRACEPARENT] {
            let header = ce_header(name).expect("valid");
            let text: &str = header.as_ref();
            assert_eq!(text, format!("ce-{name}"));
        }
    }

    #[test]
    fn line_breaks_in_header_values_are_permanent_errors() {
        let err = header_value("ce-type", Cow::Borrowed("a\nb")).expect_err("refused");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("ce-type"));
        assert_eq!(
            header_value("x", Cow::Owned("fine".into()))
                .expect("ok")
                .as_str(),
            "fine"
        );
    }
}
