//! The check every sink's wire-format test makes: a consumer's decoding of what the
//! broker stored gives back the message that was sent.

use ferry::{Message, ReceivedMessage};

/// Asserts that `received` carries every attribute, the payload and the trace context of
/// `sent`.
pub(crate) fn assert_rebuilt(received: &ReceivedMessage, sent: &Message) {
    assert_eq!(received.id, sent.id);
    assert_eq!(received.aggregate_type, sent.aggregate_type);
    assert_eq!(received.aggregate_id, sent.aggregate_id);
    assert_eq!(received.version, sent.version);
    assert_eq!(received.event_type, sent.event_type);
    assert_eq!(received.partition_key, sent.partition_key);
    assert_eq!(received.payload, sent.payload);
    assert_eq!(received.time, Some(sent.created_at));
    assert_eq!(
        received.headers.get("traceparent"),
        sent.headers.get("traceparent")
    );
}
