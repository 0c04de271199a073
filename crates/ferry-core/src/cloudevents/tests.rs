//! The CloudEvents mapping: both content modes, every binding's prefix, the trace context.

use super::*;

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn sample(payload: &'static [u8], content_type: Option<&str>) -> Message {
    let mut headers = Headers::new();
    headers.insert(TRACEPARENT.into(), TRACE.into());
    if let Some(ct) = content_type {
        headers.insert(CONTENT_TYPE_HEADER.into(), ct.into());
    }
    Message {
        id: Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: "42".into(),
        version: 3,
        event_type: "order.paid".into(),
        payload: Bytes::from_static(payload),
        headers,
        partition_key: "order/42".into(),
        partition: 5,
        created_at: Utc::now(),
        sequence: 77,
    }
}

#[test]
fn binary_round_trip_through_any_prefix() {
    let m = sample(br#"{"total":10}"#, None);
    let source = Source::default();
    for prefix in BINARY_PREFIXES {
        let headers: Vec<(String, String)> = binary_attributes(&m, &source)
            .map(|(n, v)| (format!("{prefix}{n}"), v.into_owned()))
            .chain(user_headers(&m).map(|(n, v)| (n.to_owned(), v.to_owned())))
            .collect();
        let received = ReceivedMessage::from_binary(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            m.payload.clone(),
        )
        .expect("decodes");
        assert_eq!(received.id, m.id);
        assert_eq!(received.version, 3);
        assert_eq!(received.aggregate_type, "order");
        assert_eq!(received.aggregate_id, "42");
        assert_eq!(received.partition_key, "order/42");
        assert_eq!(
            received.traceparent().map(|t| t.trace_id),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}

#[test]
fn trace_context_is_the_distributed_tracing_extension() {
    let mut m = sample(b"{}", None);
    m.headers.insert(TRACESTATE.into(), "rojo=1".into());
    let source = Source::default();
    let attributes: Vec<_> = binary_attributes(&m, &source).collect();
    assert_eq!(attributes.len(), BINARY_ATTRIBUTE_NAMES.len() + 2);
    assert_eq!(binary_attributes(&m, &source).len(), attributes.len());
    assert_eq!(attributes[10], (TRACEPARENT, Cow::Borrowed(TRACE)));
    assert_eq!(attributes[11], (TRACESTATE, Cow::Borrowed("rojo=1")));
    // The attributes alone (no plain header) carry it to a consumer.
    let prefixed: Vec<(String, String)> = attributes
        .iter()
        .map(|(n, v)| (format!("ce-{n}"), v.to_string()))
        .collect();
    let received = ReceivedMessage::from_binary(
        prefixed.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        Bytes::new(),
    )
    .expect("decodes");
    assert_eq!(
        received.traceparent().map(|t| t.parent_id),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(received.tracestate(), Some("rojo=1"));

    let json = to_structured_json(&m, &source);
    assert!(
        json.contains(&format!(r#""traceparent":"{TRACE}""#)),
        "{json}"
    );
    assert!(json.contains(r#""tracestate":"rojo=1""#), "{json}");
    assert!(
        !json.contains(r#""headers""#),
        "only trace context, no other headers: {json}"
    );
    let received = ReceivedMessage::from_structured_json(&json).expect("decodes");
    assert_eq!(
        received.traceparent().map(|t| t.trace_id),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(received.tracestate(), Some("rojo=1"));

    m.headers.clear();
    assert_eq!(
        binary_attributes(&m, &source).len(),
        BINARY_ATTRIBUTE_NAMES.len()
    );
    assert!(!to_structured_json(&m, &source).contains(TRACEPARENT));
}

#[test]
fn structured_content_types_are_the_cloudevents_formats() {
    assert!(is_structured_content_type(STRUCTURED_CONTENT_TYPE));
    assert!(is_structured_content_type(
        "Application/CloudEvents+json; charset=utf-8"
    ));
    assert!(!is_structured_content_type("application/json"));
    assert!(!is_structured_content_type("application/cloud"));
}

#[test]
fn structured_embeds_json_and_encodes_the_rest() {
    let source = Source::Fixed("urn:shop".into());
    let json = to_structured_json(&sample(br#"{"total":10}"#, None), &source);
    assert!(json.contains(r#""data":{"total":10}"#), "{json}");
    assert!(json.contains(r#""source":"urn:shop""#));
    let received = ReceivedMessage::from_structured_json(&json).expect("decodes");
    assert_eq!(&received.payload[..], br#"{"total":10}"#);

    let binary = sample(&[0, 159, 146, 150], Some("application/octet-stream"));
    let json = to_structured_json(&binary, &source);
    assert!(json.contains("data_base64"), "{json}");
    let received = ReceivedMessage::from_structured_json(&json).expect("decodes");
    assert_eq!(received.payload, binary.payload);
    assert_eq!(received.version, 3);

    let broken = sample(b"{not json", None);
    assert!(to_structured_json(&broken, &source).contains("data_base64"));
}

#[test]
fn attribute_names_are_those_yielded() {
    let m = sample(b"{}", None);
    let names: Vec<_> = binary_attributes(&m, &Source::default())
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names[..10], BINARY_ATTRIBUTE_NAMES);
    assert_eq!(names[10..], [TRACEPARENT]);
}

#[test]
fn missing_attributes_are_named() {
    let err = ReceivedMessage::from_binary([("ce-type", "x")], Bytes::new()).unwrap_err();
    assert_eq!(err, DecodeError::Missing("id"));
    let err = ReceivedMessage::from_binary([("ce-id", "nope"), ("ce-type", "x")], Bytes::new())
        .unwrap_err();
    assert!(matches!(err, DecodeError::Invalid { name: "id", .. }));
}
