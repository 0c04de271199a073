//! A producer's trace reaches the consumer: the producer enqueues inside an OpenTelemetry
//! span (`with_current_trace_context`), a relay publishes from PostgreSQL to NATS (binary
//! and structured content modes) and to Kafka (Tansu), and a consumer that decodes the
//! message continues the producer's trace: same trace id, the producer's span as parent.
#![cfg(all(feature = "postgres", feature = "nats", feature = "otel"))]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use opentelemetry::trace::{TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use uuid::Uuid;

use ferry::cloudevents::ContentMode;
use ferry::nats::{NatsSink, NatsSinkConfig, decode_message};
use ferry::otel::{TraceContextExt as _, continue_trace};
use ferry::postgres::PgOutbox;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::{NewMessage, OutboxStore, ReceivedMessage, Relay, RelayConfig, Sink};
use ferry_core::testing::services;

/// A tag of this test's own for table prefixes, streams, subjects and topics.
fn tag() -> String {
    Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// Enqueues one message inside a traced producer span; returns the outbox and the span's
/// trace id and span id (as the consumer must see them).
async fn produce(tag: &str) -> (Arc<PgOutbox>, TraceId, String) {
    let settings = StoreSettings {
        table_prefix: TablePrefix::new(format!("tc{tag}_")).unwrap(),
        ..StoreSettings::default()
    };
    let outbox = Arc::new(
        PgOutbox::connect(&services::postgres_url(), 2, settings)
            .await
            .unwrap(),
    );
    outbox.migrate(2).await.unwrap();
    let span = tracing::info_span!("place order");
    let message = span.in_scope(|| {
        NewMessage::new("order", "42", "order.placed", r#"{"total":10}"#)
            .with_current_trace_context()
    });
    let context = span.context();
    let producer = context.span().span_context().clone();
    assert!(producer.is_valid(), "the producer's span is traced");
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, message).await.unwrap();
    tx.commit().await.unwrap();
    (outbox, producer.trace_id(), producer.span_id().to_string())
}

/// Relays everything in `outbox` into `sink`.
async fn relay(outbox: &Arc<PgOutbox>, sink: Arc<dyn Sink>) {
    let mut config = RelayConfig::new("trace-test");
    config.poll_interval = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(outbox.clone(), outbox.clone(), sink, config).run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.status().await.unwrap().iter().any(|p| p.backlog > 0) {
        assert!(tokio::time::Instant::now() < deadline, "not relayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    relay.await.unwrap().unwrap();
}

/// The consumer's side: the decoded message carries the producer's span as trace context,
/// and a consumer span continues that trace.
fn assert_continues(received: &ReceivedMessage, trace_id: TraceId, span_id: &str) {
    let parent = received
        .traceparent()
        .expect("the message carries a trace context");
    assert_eq!(parent.trace_id, trace_id.to_string());
    assert_eq!(parent.parent_id, span_id);
    let consumer = tracing::info_span!("apply order event");
    continue_trace(&consumer, received);
    let context = consumer.context();
    assert_eq!(context.span().span_context().trace_id(), trace_id);
}

/// A tracer for this test's thread: spans made by `tracing` are OpenTelemetry spans.
fn traced() -> tracing::subscriber::DefaultGuard {
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-test")));
    tracing::subscriber::set_default(subscriber)
}

#[tokio::test]
async fn a_consumer_continues_the_producers_trace_from_nats() {
    let _tracing = traced();
    for mode in [ContentMode::Binary, ContentMode::Structured] {
        let tag = tag();
        let (outbox, trace_id, span_id) = produce(&tag).await;
        let stream = format!("TC_{tag}");
        let sink = NatsSink::connect(&NatsSinkConfig {
            url: services::nats_url(),
            stream: stream.clone(),
            subjects: vec![format!("tc{tag}.>")],
            subject_template: format!("tc{tag}.{{partition}}"),
            content_mode: mode,
            ..NatsSinkConfig::default()
        })
        .await
        .unwrap();
        relay(&outbox, Arc::new(sink)).await;

        let jetstream =
            async_nats::jetstream::new(async_nats::connect(services::nats_url()).await.unwrap());
        let consumer = jetstream
            .get_stream(&stream)
            .await
            .unwrap()
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream has the message")
            .unwrap()
            .unwrap();
        let received = decode_message(&message).unwrap();
        assert_continues(&received, trace_id, &span_id);
        if mode == ContentMode::Binary {
            let headers = message.headers.as_ref().unwrap();
            let attribute = headers.get("ce-traceparent").map(|v| v.as_str());
            let plain = headers.get("traceparent").map(|v| v.as_str());
            assert!(attribute.is_some() && attribute == plain, "{headers:?}");
        }
        jetstream.delete_stream(&stream).await.unwrap();
    }
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn a_consumer_continues_the_producers_trace_from_kafka() {
    use ferry::kafka::{CommittedReader, KafkaSink, KafkaSinkConfig};
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let _tracing = traced();
    let tag = tag();
    let (outbox, trace_id, span_id) = produce(&tag).await;
    let config = KafkaSinkConfig {
        brokers: services::kafka_brokers(),
        topic_template: format!("tc{tag}.{{aggregate_type}}"),
        transactional_id_prefix: format!("tc{tag}"),
        topic_partitions: 1,
        timeout_secs: 10,
        transaction_timeout_secs: 10,
        ..KafkaSinkConfig::default()
    };
    let sink = KafkaSink::connect(&config).await.unwrap();
    relay(&outbox, Arc::new(sink)).await;

    let topics = [format!("tc{tag}.order")];
    let reader = CommittedReader::open(&config, &topics).await.unwrap();
    let ends = reader.ends().await.unwrap();
    let mut records = Vec::new();
    reader
        .read_to(&ends, |record| records.push(record))
        .await
        .unwrap();
    reader.close().await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .unwrap();
    let _ = admin
        .delete_topics(&[&topics[0]], &AdminOptions::new())
        .await;
    assert_eq!(records.len(), 1);
    let received = records.remove(0).message.unwrap();
    assert_continues(&received, trace_id, &span_id);
}
