//! NATS JetStream sink against a real server: `FERRY_TEST_NATS_URL`, default
//! `nats://127.0.0.1:4222`. Every test uses its own stream and subject prefix, so the tests
//! run in parallel, and deletes its stream at the end.
#![cfg(feature = "nats")]

#[path = "support/rebuilt.rs"]
mod rebuilt;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, TimeZone as _, Utc};
use futures::StreamExt as _;
use uuid::Uuid;

use ferry::cloudevents::ContentMode;
use ferry::nats::{NatsSink, NatsSinkConfig};
use ferry::{Delivery, Headers, Message, ReceivedMessage, ReconcileRequest, Sink, SinkError};
use ferry_core::testing::services;

use rebuilt::assert_rebuilt;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A config with a stream and subject prefix of its own.
fn unique_config() -> NatsSinkConfig {
    let tag = Uuid::now_v7().simple().to_string();
    let prefix = format!("ferrytest{}", &tag[20..]);
    NatsSinkConfig {
        url: services::nats_url(),
        stream: format!("FERRY_TEST_{}", &tag[20..]),
        subjects: vec![format!("{prefix}.>")],
        subject_template: format!("{prefix}.{{aggregate_type}}.{{event_type}}"),
        ..NatsSinkConfig::default()
    }
}

/// `created_at` at microsecond precision, as CloudEvents `time` carries it.
fn now_micros() -> DateTime<Utc> {
    let micros = Utc::now().timestamp_micros();
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or_else(Utc::now)
}

fn message(aggregate_id: &str, version: u64, payload: impl Into<Bytes>) -> Message {
    let mut headers = Headers::new();
    headers.insert(
        "traceparent".into(),
        format!("00-{:032x}-{:016x}-01", version, version),
    );
    Message {
        id: Uuid::now_v7(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        version,
        event_type: "order.paid".into(),
        payload: payload.into(),
        headers,
        partition_key: format!("order/{aggregate_id}"),
        partition: 3,
        created_at: now_micros(),
        sequence: version as i64 * 10,
    }
}

/// The positions of a fully acked batch, or the first failure.
fn positions(outcomes: Vec<std::result::Result<Delivery, SinkError>>) -> Result<Vec<Option<u64>>> {
    outcomes
        .into_iter()
        .map(|outcome| outcome.map(|d| d.position).map_err(Into::into))
        .collect()
}

async fn jetstream_context() -> Result<jetstream::Context> {
    let client = async_nats::connect(services::nats_url()).await?;
    Ok(jetstream::new(client))
}

async fn stream_messages(config: &NatsSinkConfig) -> Result<Vec<async_nats::Message>> {
    let js = jetstream_context().await?;
    let stream = js.get_stream(&config.stream).await?;
    let count = stream.cached_info().state.messages as usize;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?.take(count);
    let mut out = Vec::with_capacity(count);
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await?
    {
        out.push(message?.message);
    }
    Ok(out)
}

async fn stream_count(config: &NatsSinkConfig) -> Result<u64> {
    let js = jetstream_context().await?;
    let mut stream = js.get_stream(&config.stream).await?;
    Ok(stream.info().await?.state.messages)
}

async fn delete_stream(config: &NatsSinkConfig) -> Result {
    jetstream_context()
        .await?
        .delete_stream(&config.stream)
        .await?;
    Ok(())
}

fn header_map(message: &async_nats::Message) -> HashMap<String, String> {
    message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| (name.to_owned(), v.as_str().to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn publishes_cloudevents_headers_that_rebuild_the_message() -> Result {
    let config = NatsSinkConfig {
        source: None,
        ..unique_config()
    };
    let sink = NatsSink::connect(&config).await?;
    let mut batch = vec![
        message("42", 1, r#"{"total":10}"#),
        message("42", 2, r#"{"total":12}"#),
        message("a.b *c", 1, vec![0u8, 159, 146, 150]),
    ];
    batch[2]
        .headers
        .insert("content-type".into(), "application/octet-stream".into());

    let positions = positions(sink.publish(&batch).await)?;
    assert_eq!(positions, vec![Some(1), Some(2), Some(3)]);

    let stored = stream_messages(&config).await?;
    assert_eq!(stored.len(), batch.len());
    let prefix = config.subjects[0].trim_end_matches(".>");
    for (sent, got) in batch.iter().zip(&stored) {
        let headers = header_map(got);
        let expect = [
            ("ce-id", sent.id.to_string()),
            ("ce-type", sent.event_type.clone()),
            ("ce-source", format!("ferry://{}", sent.aggregate_type)),
            ("ce-subject", sent.aggregate_id.clone()),
            ("ce-time", ferry::cloudevents::format_time(&sent.created_at)),
            ("ce-specversion", "1.0".to_string()),
            ("ce-aggregatetype", sent.aggregate_type.clone()),
            ("ce-aggregateversion", sent.version.to_string()),
            ("ce-partitionkey", sent.partition_key.clone()),
            ("ce-sequence", sent.sequence.to_string()),
            ("content-type", sent.content_type().to_string()),
            ("Nats-Msg-Id", sent.id.to_string()),
            ("traceparent", sent.headers["traceparent"].clone()),
            ("ce-traceparent", sent.headers["traceparent"].clone()),
        ];
        for (name, value) in expect {
            assert_eq!(headers.get(name), Some(&value), "header {name}");
        }
        assert_eq!(headers.len(), 14, "no other headers: {headers:?}");
        assert_eq!(got.payload, sent.payload);

        assert_eq!(got.subject.as_str(), format!("{prefix}.order.order_paid"));

        let received = ReceivedMessage::from_binary(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            got.payload.clone(),
        )?;
        assert_rebuilt(&received, sent);
    }

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn structured_mode_sends_the_event_as_json_with_two_headers() -> Result {
    let config = NatsSinkConfig {
        content_mode: ContentMode::Structured,
        source: Some("urn:shop".into()),
        ..unique_config()
    };
    let sink = NatsSink::connect(&config).await?;
    let mut batch = vec![
        message("42", 1, r#"{"total":10}"#),
        message("42", 2, vec![0u8, 159, 146, 150]),
    ];
    batch[1]
        .headers
        .insert("content-type".into(), "application/octet-stream".into());
    positions(sink.publish(&batch).await)?;

    let stored = stream_messages(&config).await?;
    assert_eq!(stored.len(), batch.len());
    for (sent, got) in batch.iter().zip(&stored) {
        let headers = header_map(got);
        let expected = HashMap::from([
            ("Nats-Msg-Id".to_owned(), sent.id.to_string()),
            (
                "content-type".to_owned(),
                "application/cloudevents+json".to_owned(),
            ),
        ]);
        assert_eq!(headers, expected);
        let event: serde_json::Value = serde_json::from_slice(&got.payload)?;
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], sent.id.to_string());
        assert_eq!(event["source"], "urn:shop");
        assert_eq!(event["type"], "order.paid");
        assert_eq!(event["partitionkey"], sent.partition_key.as_str());
        assert_eq!(event["datacontenttype"], sent.content_type());

        let received = ferry::nats::decode_message(got)?;
        assert_rebuilt(&received, sent);
    }
    assert!(
        String::from_utf8_lossy(&stored[0].payload).contains(r#""data":{"total":10}"#),
        "a JSON payload is embedded as data"
    );
    let binary: serde_json::Value = serde_json::from_slice(&stored[1].payload)?;
    assert_eq!(
        binary["data_base64"], "AJ+Slg==",
        "other payloads as base64"
    );

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn subject_placeholders_are_sanitised_tokens() -> Result {
    let base = unique_config();
    let prefix = base.subjects[0].trim_end_matches(".>").to_string();
    let config = NatsSinkConfig {
        subject_template: format!("{prefix}.{{aggregate_id}}.p{{partition}}"),
        ..base
    };
    let sink = NatsSink::connect(&config).await?;
    sink.check().await?;
    let batch = [message("a.b *c>", 1, "{}"), message("", 2, "{}")];
    positions(sink.publish(&batch).await)?;
    let subjects: Vec<String> = stream_messages(&config)
        .await?
        .iter()
        .map(|m| m.subject.to_string())
        .collect();
    assert_eq!(
        subjects,
        vec![format!("{prefix}.a_b__c_.p3"), format!("{prefix}._.p3")]
    );
    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn publishing_a_batch_twice_stores_it_once() -> Result {
    let config = unique_config();
    let sink = NatsSink::connect(&config).await?;
    let batch: Vec<Message> = (1..=50).map(|v| message("7", v, "{}")).collect();

    let first = positions(sink.publish(&batch).await)?;
    let again = positions(sink.publish(&batch).await)?;
    assert_eq!(
        first, again,
        "a duplicate acks with the original's sequence"
    );
    assert_eq!(stream_count(&config).await?, 50);

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn an_oversize_message_is_permanent_and_nothing_after_it_is_sent() -> Result {
    let config = unique_config();
    let sink = NatsSink::connect(&config).await?;
    let max_payload = async_nats::connect(services::nats_url())
        .await?
        .max_payload();
    let batch = [
        message("1", 1, "{}"),
        message("1", 2, vec![b'x'; max_payload + 1]),
        message("1", 3, "{}"),
        message("1", 4, "{}"),
    ];

    let outcomes = sink.publish(&batch).await;
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0].as_ref().ok().and_then(|d| d.position), Some(1));
    let too_big = outcomes[1].as_ref().expect_err("oversize must fail");
    assert!(!too_big.is_retryable(), "{too_big}");
    assert!(too_big.to_string().contains("max_payload"), "{too_big}");
    for later in &outcomes[2..] {
        let err = later.as_ref().expect_err("must not be sent");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("not sent"), "{err}");
    }
    assert_eq!(stream_count(&config).await?, 1);

    let mut bad_header = message("2", 1, "{}");
    bad_header
        .headers
        .insert("x-note".into(), "two\r\nlines".into());
    let outcomes = sink.publish(&[bad_header, message("2", 2, "{}")]).await;
    let err = outcomes[0]
        .as_ref()
        .expect_err("a line break cannot be sent");
    assert!(
        !err.is_retryable() && err.to_string().contains("x-note"),
        "{err}"
    );
    assert!(outcomes[1].as_ref().is_err_and(SinkError::is_retryable));
    assert_eq!(stream_count(&config).await?, 1);

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn a_stuck_broker_costs_one_ack_timeout_per_batch() -> Result {
    let config = NatsSinkConfig {
        ack_timeout_secs: 1,
        ..unique_config()
    };
    let sink = NatsSink::connect(&config).await?;
    // With the stream gone and a plain subscriber on its subjects, publishes are
    // neither stored nor answered with "no responders": the acks never come.
    delete_stream(&config).await?;
    let client = async_nats::connect(services::nats_url()).await?;
    let _silent = client.subscribe(config.subjects[0].clone()).await?;
    client.flush().await?;

    let batch: Vec<Message> = (1..=5).map(|v| message("9", v, "{}")).collect();
    let started = std::time::Instant::now();
    let outcomes = sink.publish(&batch).await;
    let took = started.elapsed();
    assert_eq!(outcomes.len(), 5);
    for outcome in &outcomes {
        assert!(
            outcome.as_ref().is_err_and(SinkError::is_retryable),
            "{outcome:?}"
        );
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    sink.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reconcile_finds_exactly_the_partitions_ids_beyond_the_checkpoint() -> Result {
    reconcile_finds_the_partitions_ids(ContentMode::Binary).await
}

#[tokio::test]
async fn reconcile_reads_the_partition_keys_of_structured_events_from_their_bodies() -> Result {
    reconcile_finds_the_partitions_ids(ContentMode::Structured).await
}

async fn reconcile_finds_the_partitions_ids(content_mode: ContentMode) -> Result {
    let config = NatsSinkConfig {
        duplicate_window_secs: 1,
        content_mode,
        ..unique_config()
    };
    let sink = NatsSink::connect(&config).await?;
    let owns_key = |key: &str| key == "order/mine" || key == "order/also-mine";
    let request = |checkpoint| ReconcileRequest {
        partition: 3,
        checkpoint,
        since_expiry: Duration::from_secs(5),
        owns_key: &owns_key,
    };

    assert!(
        sink.reconcile(request(None)).await?.is_empty(),
        "empty stream"
    );

    let before = [
        message("mine", 1, "{}"),
        message("other", 1, "{}"),
        message("mine", 2, "{}"),
    ];
    let checkpoint = positions(sink.publish(&before).await)?
        .into_iter()
        .max()
        .flatten();
    assert_eq!(checkpoint, Some(3));
    assert!(
        sink.reconcile(request(checkpoint)).await?.is_empty(),
        "nothing beyond the checkpoint yet"
    );

    let after = [
        message("other", 2, "{}"),
        message("mine", 3, "{}"),
        message("also-mine", 1, "{}"),
        message("other", 3, "{}"),
        message("mine", 4, "{}"),
    ];
    positions(sink.publish(&after).await)?;
    let owned_after = vec![after[1].id, after[2].id, after[4].id];
    assert_eq!(sink.reconcile(request(checkpoint)).await?, owned_after);
    assert!(
        sink.reconcile(request(Some(8))).await?.is_empty(),
        "at the end"
    );

    let owned_all = vec![
        before[0].id,
        before[2].id,
        after[1].id,
        after[2].id,
        after[4].id,
    ];
    assert_eq!(
        sink.reconcile(request(None)).await?,
        owned_all,
        "unknown checkpoint"
    );
    assert_eq!(
        sink.reconcile(request(Some(1_000))).await?,
        owned_all,
        "a checkpoint beyond the end means the stream was recreated"
    );

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn an_existing_streams_duplicate_window_is_updated() -> Result {
    let config = unique_config();
    let js = jetstream_context().await?;
    js.create_stream(jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: config.subjects.clone(),
        duplicate_window: Duration::from_secs(30),
        ..Default::default()
    })
    .await?;

    let sink = NatsSink::connect(&config).await?;
    let mut stream = js.get_stream(&config.stream).await?;
    let window = stream.info().await?.config.duplicate_window;
    assert_eq!(window, Duration::from_secs(120));

    sink.shutdown().await;
    delete_stream(&config).await
}

#[tokio::test]
async fn connect_errors_name_the_problem() -> Result {
    let unreachable = NatsSinkConfig {
        url: "nats://127.0.0.1:1".into(),
        ..unique_config()
    };
    let err = NatsSink::connect(&unreachable)
        .await
        .expect_err("nothing listens there");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("nats://127.0.0.1:1"), "{err}");

    let bad_template = NatsSinkConfig {
        subject_template: "ferry.{aggregate}.{event_type}".into(),
        ..unique_config()
    };
    let err = NatsSink::connect(&bad_template).await.expect_err("invalid");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("subject_template"), "{err}");
    assert!(err.to_string().contains("{aggregate_type}"), "{err}");

    for (config, key) in [
        (
            NatsSinkConfig {
                stream: "has.dot".into(),
                ..unique_config()
            },
            "stream",
        ),
        (
            NatsSinkConfig {
                stream: "has space".into(),
                ..unique_config()
            },
            "stream",
        ),
        (
            NatsSinkConfig {
                duplicate_window_secs: 0,
                ..unique_config()
            },
            "duplicate_window_secs",
        ),
        (
            NatsSinkConfig {
                subject_template: "elsewhere.{event_type}".into(),
                ..unique_config()
            },
            "subject_template",
        ),
    ] {
        let err = config.validate().expect_err("invalid");
        assert_eq!(err.key, key);
        assert!(err.to_string().contains(key), "{err}");
    }
    Ok(())
}

fn lease(partition: u32, epoch: i64, owner: &str) -> ferry::Lease {
    ferry::Lease {
        partition,
        epoch,
        owner: owner.into(),
        takeover: ferry::Takeover::Clean,
    }
}

/// A relay that lost its partition while paused resumes with a stale batch: JetStream
/// refuses it at the subject's first message, and nothing after that is stored.
#[tokio::test]
async fn a_zombie_relays_batch_is_refused_by_jetstream_when_fencing() -> Result {
    zombie_is_refused(ContentMode::Binary).await
}

#[tokio::test]
async fn a_zombie_relays_structured_batch_is_refused_by_jetstream_when_fencing() -> Result {
    zombie_is_refused(ContentMode::Structured).await
}

async fn zombie_is_refused(content_mode: ContentMode) -> Result {
    let mut config = NatsSinkConfig {
        content_mode,
        ..unique_config()
    };
    let prefix = config.subjects[0].trim_end_matches(".>").to_owned();
    config.subject_template = format!("{prefix}.{{aggregate_type}}.p{{partition}}");
    assert_eq!(config.fencing, None, "on by default for partition subjects");
    let zombie = NatsSink::connect(&config).await?;
    let owner = NatsSink::connect(&config).await?;

    zombie.open_partition(&lease(3, 1, "zombie")).await?;
    positions(
        zombie
            .publish(&[message("a", 1, "1"), message("b", 1, "1")])
            .await,
    )?;
    // The zombie pauses; its lease expires and another relay takes the partition on.
    owner.open_partition(&lease(3, 2, "owner")).await?;
    positions(
        owner
            .publish(&[message("a", 2, "2"), message("c", 1, "1")])
            .await,
    )?;

    let stale = [message("a", 2, "stale"), message("d", 1, "stale")];
    let outcomes = zombie.publish(&stale).await;
    let refused = outcomes[0]
        .as_ref()
        .expect_err("the zombie's head is refused");
    assert!(refused.to_string().contains("fenced"), "{refused}");
    assert!(
        outcomes[1].is_err(),
        "nothing after the refused head is sent"
    );
    assert_eq!(stream_count(&config).await?, 4);

    // The owner goes on, checked against its own last sequence.
    positions(owner.publish(&[message("a", 3, "3")]).await)?;
    // Had the zombie been right after all (it still owned the partition), it would
    // reacquire the partition and look the sequence up again rather than stay stuck.
    zombie.open_partition(&lease(3, 3, "zombie")).await?;
    positions(zombie.publish(&[message("e", 1, "1")]).await)?;
    assert_eq!(stream_count(&config).await?, 6);
    delete_stream(&config).await
}

/// Without fencing the same stale batch is stored: what the test above relies on.
#[tokio::test]
async fn without_fencing_a_zombies_batch_is_stored() -> Result {
    let mut config = unique_config();
    let prefix = config.subjects[0].trim_end_matches(".>").to_owned();
    config.subject_template = format!("{prefix}.{{aggregate_type}}.p{{partition}}");
    config.fencing = Some(false);
    let zombie = NatsSink::connect(&config).await?;
    let owner = NatsSink::connect(&config).await?;
    positions(zombie.publish(&[message("a", 1, "1")]).await)?;
    positions(owner.publish(&[message("a", 2, "2")]).await)?;
    positions(zombie.publish(&[message("b", 1, "stale")]).await)?;
    assert_eq!(stream_count(&config).await?, 3);
    delete_stream(&config).await
}
