//! The message on the wire: where it goes, its properties and `cloudEvents:*` headers,
//! and [`decode_delivery`], which reads a delivery back.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use ferry_core::cloudevents::{DecodeError, ReceivedMessage, binary_attributes, ext};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::trace_context::{TRACEPARENT, TRACESTATE};
use ferry_core::{Message, SinkError};

use super::AmqpSink;

/// The CloudEvents AMQP binding's header prefix.
pub const HEADER_PREFIX: &str = "cloudEvents:";

/// A message ready to publish: where to and how.
pub(super) struct Prepared {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) properties: BasicProperties,
}

impl AmqpSink {
    /// Where `message` goes and with which properties; fails, permanently, for values
    /// AMQP cannot carry (names or header names over 255 bytes).
    pub(super) fn prepare(&self, message: &Message) -> Result<Prepared, SinkError> {
        let verbatim = |out: &mut String, value: &str| out.push_str(value);
        let exchange = short_string("exchange", &self.exchange.render(message, verbatim))?;
        let routing_key = short_string("routing key", &self.routing_key.render(message, verbatim))?;
        let mut headers = FieldTable::default();
        for (name, value) in &message.headers {
            if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
                continue;
            }
            headers.insert(
                short_string("header name", name)?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        // After the user headers, so that the attributes win on a name clash.
        for (attribute, value) in binary_attributes(message, &self.source) {
            headers.insert(
                ShortString::from(header_name(attribute)),
                AMQPValue::LongString(LongString::from(value.as_ref())),
            );
        }
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(message.id.to_string()))
            .with_delivery_mode(2)
            .with_content_type(short_string("content-type", message.content_type())?)
            .with_type(short_string("event type", &message.event_type)?)
            .with_timestamp(u64::try_from(message.created_at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        Ok(Prepared {
            exchange,
            routing_key,
            properties,
        })
    }
}

/// `cloudEvents:<attribute>`, without allocating for the attributes ferry sends.
fn header_name(attribute: &'static str) -> String {
    match attribute {
        "specversion" => "cloudEvents:specversion",
        "id" => "cloudEvents:id",
        "source" => "cloudEvents:source",
        "type" => "cloudEvents:type",
        "subject" => "cloudEvents:subject",
        "time" => "cloudEvents:time",
        ext::AGGREGATE_TYPE => "cloudEvents:aggregatetype",
        ext::AGGREGATE_VERSION => "cloudEvents:aggregateversion",
        ext::PARTITION_KEY => "cloudEvents:partitionkey",
        ext::SEQUENCE => "cloudEvents:sequence",
        TRACEPARENT => "cloudEvents:traceparent",
        TRACESTATE => "cloudEvents:tracestate",
        other => return format!("{HEADER_PREFIX}{other}"),
    }
    .to_owned()
}

/// A short string (at most 255 bytes), or a permanent error naming what is too long.
pub(super) fn short_string(what: &str, value: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(value.to_owned()).map_err(|err| {
        SinkError::permanent(format!(
            "the {what} {:?}… is {} bytes; AMQP allows at most 255",
            value.chars().take(40).collect::<String>(),
            value.len()
        ))
        .with_source(err)
    })
}

/// Rebuilds the message an AMQP delivery carries, as a consumer does: the
/// `cloudEvents:*` headers, the other string headers, `content_type`, and the body.
pub fn decode_delivery(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<ReceivedMessage, DecodeError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            let text = match value {
                AMQPValue::LongString(text) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                AMQPValue::ShortString(text) => text.as_str().to_owned(),
                _ => continue,
            };
            headers.push((name.as_str().to_owned(), text));
        }
    }
    if let Some(content_type) = properties.content_type() {
        headers.push((
            CONTENT_TYPE_HEADER.to_owned(),
            content_type.as_str().to_owned(),
        ));
    }
    ReceivedMessage::from_binary(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
        Bytes::copy_from_slice(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_carry_the_binding_prefix() {
        for attribute in ["id", "type", "time", ext::SEQUENCE, TRACEPARENT] {
            assert_eq!(header_name(attribute), format!("cloudEvents:{attribute}"));
        }
    }

    #[test]
    fn long_names_are_permanent_errors() {
        let err = short_string("routing key", &"x".repeat(256)).expect_err("too long");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert_eq!(short_string("x", "ok").expect("fits").as_str(), "ok");
    }

    #[test]
    fn deliveries_decode_with_the_content_type() {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("cloudEvents:id", "0190c3a4-6c2e-7d3a-9b1e-3f4a5b6c7d8e"),
            ("cloudEvents:type", "order.paid"),
            ("cloudEvents:subject", "42"),
            ("cloudEvents:aggregatetype", "order"),
            ("cloudEvents:aggregateversion", "3"),
            ("traceparent", "00-abc-def-01"),
        ] {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type(ShortString::from("application/json"));
        let message = decode_delivery(&properties, b"{}").expect("decodes");
        assert_eq!(message.version, 3);
        assert_eq!(
            message.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            message.headers.get("traceparent").map(String::as_str),
            Some("00-abc-def-01")
        );
    }
}
