//! The entry fields: `ce_*` attributes, `content-type`, the user headers and `data`, and
//! [`decode_entry`], which reads them back.

use std::borrow::Cow;

use bytes::Bytes;

use ferry_core::cloudevents::{
    BINARY_ATTRIBUTE_NAMES, DecodeError, ReceivedMessage, TRACE_ATTRIBUTE_NAMES, ext,
};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::trace_context::{TRACEPARENT, TRACESTATE};

/// The field holding the payload.
pub const DATA_FIELD: &str = "data";

/// Whether a user header would clash with a field ferry writes; ferry's field wins, as
/// its header does in the other sinks.
pub(super) fn is_reserved(name: &str) -> bool {
    name == DATA_FIELD
        || name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER)
        || name.strip_prefix("ce_").is_some_and(|attribute| {
            BINARY_ATTRIBUTE_NAMES.contains(&attribute)
                || TRACE_ATTRIBUTE_NAMES.contains(&attribute)
        })
}

/// `ce_<attribute>`, without allocating for the attributes ferry sends.
pub(super) fn field_name(attribute: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(match attribute {
        "specversion" => "ce_specversion",
        "id" => "ce_id",
        "source" => "ce_source",
        "type" => "ce_type",
        "subject" => "ce_subject",
        "time" => "ce_time",
        ext::AGGREGATE_TYPE => "ce_aggregatetype",
        ext::AGGREGATE_VERSION => "ce_aggregateversion",
        ext::PARTITION_KEY => "ce_partitionkey",
        ext::SEQUENCE => "ce_sequence",
        TRACEPARENT => "ce_traceparent",
        TRACESTATE => "ce_tracestate",
        other => return Cow::Owned(format!("ce_{other}")),
    })
}

/// Rebuilds the message a stream entry carries, as a consumer does: `data` is the
/// payload, the other fields are CloudEvents attributes (`ce_*`) and headers.
pub fn decode_entry<'f>(
    fields: impl IntoIterator<Item = (&'f str, &'f [u8])>,
) -> Result<ReceivedMessage, DecodeError> {
    let mut payload = Bytes::new();
    let mut headers: Vec<(&str, Cow<'_, str>)> = Vec::new();
    for (name, value) in fields {
        if name == DATA_FIELD {
            payload = Bytes::copy_from_slice(value);
        } else {
            headers.push((name, String::from_utf8_lossy(value)));
        }
    }
    ReceivedMessage::from_binary(
        headers.iter().map(|(name, value)| (*name, value.as_ref())),
        payload,
    )
}

/// [`decode_entry`] for an entry read with the `redis` crate (`XRANGE`, `XREAD`).
pub fn decode_stream_id(entry: &redis::streams::StreamId) -> Result<ReceivedMessage, DecodeError> {
    decode_entry(entry.map.iter().filter_map(|(name, value)| match value {
        redis::Value::BulkString(bytes) => Some((name.as_str(), bytes.as_slice())),
        redis::Value::SimpleString(text) => Some((name.as_str(), text.as_bytes())),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferrys_fields_are_reserved() {
        for name in [
            "data",
            "content-type",
            "Content-Type",
            "ce_id",
            "ce_sequence",
            "ce_traceparent",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        for name in ["traceparent", "ce_custom", "dataset"] {
            assert!(!is_reserved(name), "{name}");
        }
        for attribute in BINARY_ATTRIBUTE_NAMES
            .into_iter()
            .chain(TRACE_ATTRIBUTE_NAMES)
        {
            assert_eq!(field_name(attribute), format!("ce_{attribute}"));
        }
    }

    #[test]
    fn entries_decode_with_data_as_the_payload() {
        let fields: [(&str, &[u8]); 6] = [
            ("ce_id", b"0190c3a4-6c2e-7d3a-9b1e-3f4a5b6c7d8e"),
            ("ce_type", b"order.paid"),
            ("ce_subject", b"42"),
            ("ce_aggregatetype", b"order"),
            ("ce_aggregateversion", b"7"),
            ("data", &[0, 159, 146, 150]),
        ];
        let message = decode_entry(fields).expect("decodes");
        assert_eq!(message.version, 7);
        assert_eq!(message.partition_key, "order/42");
        assert_eq!(&message.payload[..], &[0, 159, 146, 150]);
        assert!(message.headers.is_empty());
    }
}
