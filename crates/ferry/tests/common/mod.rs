//! What the sink test binaries share: a message as the relay hands it to a sink. Each
//! binary includes this module.

/// Version `version` of order `aggregate_id` in `partition`, with a trace header, a
/// content type and `created_at` at microsecond precision (as CloudEvents `time` has it).
pub(crate) fn order_message(aggregate_id: &str, version: u64, partition: u32) -> ferry::Message {
    let mut headers = ferry::Headers::new();
    headers.insert(
        "traceparent".into(),
        format!("00-{version:032x}-{version:016x}-01"),
    );
    headers.insert("content-type".into(), "application/vnd.shop+json".into());
    ferry::Message {
        id: uuid::Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        version,
        event_type: "order.paid".into(),
        payload: bytes::Bytes::from(format!(r#"{{"order":"{aggregate_id}","v":{version}}}"#)),
        headers,
        partition_key: format!("order/{aggregate_id}"),
        partition,
        created_at: chrono::DateTime::from_timestamp_micros(chrono::Utc::now().timestamp_micros())
            .unwrap_or_else(chrono::Utc::now),
        sequence: version as i64,
    }
}
