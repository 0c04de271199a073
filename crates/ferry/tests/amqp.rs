//! RabbitMQ sink against a real broker: `FERRY_TEST_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`. Every test declares its own exchange and queue
//! (names with a random tag) and deletes them at the end. Connection loss is made with a
//! TCP proxy the test cuts, since restarting the shared broker would disturb other tests.
#![cfg(feature = "amqp")]

#[path = "support/rebuilt.rs"]
mod rebuilt;

#[path = "support/tcp_proxy.rs"]
mod tcp_proxy;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone as _, Utc};
use uuid::Uuid;

use futures::StreamExt as _;

use ferry::amqp::lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use ferry::amqp::lapin::types::{AMQPValue, FieldTable, ShortString};
use ferry::amqp::lapin::{self, Channel, Connection, ConnectionProperties, ExchangeKind};
use ferry::amqp::{AmqpDeclare, AmqpSink, AmqpSinkConfig, decode_delivery};
use ferry::{Delivery, Headers, Message, ReceivedMessage, Sink, SinkError};
use ferry_core::testing::services;

use rebuilt::assert_rebuilt;
use tcp_proxy::{TcpProxy, address_of};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A topic exchange and a queue bound to it with `binding`, named after a random tag.
struct Fixture {
    connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
}

impl Fixture {
    async fn new(binding: &str) -> Result<Self> {
        let tag = &Uuid::now_v7().simple().to_string()[20..];
        let connection =
            Connection::connect(&services::amqp_url(), ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let fixture = Self {
            connection,
            channel,
            exchange: format!("ferrytest_{tag}"),
            queue: format!("ferrytest_{tag}"),
        };
        fixture
            .channel
            .exchange_declare(
                fixture.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        fixture
            .channel
            .queue_declare(
                fixture.queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        fixture.bind(binding).await?;
        Ok(fixture)
    }

    async fn bind(&self, binding: &str) -> Result {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    fn config(&self) -> AmqpSinkConfig {
        AmqpSinkConfig {
            url: services::amqp_url().into(),
            exchange_template: self.exchange.clone(),
            ..AmqpSinkConfig::default()
        }
    }

    /// Takes every message in the queue (until none came for a second).
    async fn drain(&self) -> Result<Vec<lapin::message::Delivery>> {
        let channel = self.connection.create_channel().await?;
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "ferry-test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut messages = Vec::new();
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            messages.push(delivery?);
        }
        channel.close(200, "drained".into()).await?;
        Ok(messages)
    }

    async fn received(&self) -> Result<Vec<ReceivedMessage>> {
        Ok(self
            .drain()
            .await?
            .iter()
            .map(|m| decode_delivery(&m.properties, &m.data))
            .collect::<std::result::Result<_, _>>()?)
    }

    async fn remove(self) -> Result {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}

fn now_micros() -> DateTime<Utc> {
    Utc.timestamp_micros(Utc::now().timestamp_micros())
        .single()
        .unwrap_or_else(Utc::now)
}

fn message(
    aggregate_type: &str,
    aggregate_id: &str,
    version: u64,
    payload: impl Into<Bytes>,
) -> Message {
    let mut headers = Headers::new();
    headers.insert(
        "traceparent".into(),
        format!("00-{version:032x}-{version:016x}-01"),
    );
    Message {
        id: Uuid::now_v7(),
        aggregate_type: aggregate_type.into(),
        aggregate_id: aggregate_id.into(),
        version,
        event_type: format!("{aggregate_type}.changed"),
        payload: payload.into(),
        headers,
        partition_key: format!("{aggregate_type}/{aggregate_id}"),
        partition: 2,
        created_at: now_micros(),
        sequence: version as i64,
    }
}

fn all_ok(outcomes: Vec<std::result::Result<Delivery, SinkError>>) -> Result {
    for outcome in outcomes {
        outcome?;
    }
    Ok(())
}

#[tokio::test]
async fn publishes_persistent_messages_with_cloudevents_headers_that_rebuild_them() -> Result {
    let fixture = Fixture::new("#").await?;
    let sink = AmqpSink::connect(&fixture.config()).await?;
    let mut batch = vec![
        message("order", "42", 1, r#"{"total":10}"#),
        message("order", "42", 2, r#"{"total":12}"#),
        message("order", "7", 1, vec![0u8, 159, 146, 150]),
    ];
    batch[2]
        .headers
        .insert("content-type".into(), "application/octet-stream".into());
    all_ok(sink.publish(&batch).await)?;

    let stored = fixture.drain().await?;
    assert_eq!(stored.len(), 3);
    for (sent, got) in batch.iter().zip(&stored) {
        let properties = &got.properties;
        assert_eq!(
            properties.message_id().as_ref().map(ShortString::as_str),
            Some(sent.id.to_string().as_str())
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            properties.content_type().as_ref().map(ShortString::as_str),
            Some(sent.content_type())
        );
        assert_eq!(got.routing_key.as_str(), "order.order.changed");
        let headers = properties.headers().clone().unwrap_or_default();
        let header = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(text)) => {
                Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
            }
            _ => None,
        };
        let expect = [
            ("cloudEvents:id", sent.id.to_string()),
            ("cloudEvents:type", sent.event_type.clone()),
            (
                "cloudEvents:source",
                format!("ferry://{}", sent.aggregate_type),
            ),
            ("cloudEvents:subject", sent.aggregate_id.clone()),
            (
                "cloudEvents:time",
                ferry::cloudevents::format_time(&sent.created_at),
            ),
            ("cloudEvents:specversion", "1.0".to_string()),
            ("cloudEvents:aggregatetype", sent.aggregate_type.clone()),
            ("cloudEvents:aggregateversion", sent.version.to_string()),
            ("cloudEvents:partitionkey", sent.partition_key.clone()),
            ("cloudEvents:sequence", sent.sequence.to_string()),
            ("traceparent", sent.headers["traceparent"].clone()),
            (
                "cloudEvents:traceparent",
                sent.headers["traceparent"].clone(),
            ),
        ];
        for (name, value) in expect {
            assert_eq!(header(name), Some(value), "header {name}");
        }
        assert_eq!(headers.inner().len(), 12, "no other headers: {headers:?}");

        let received = decode_delivery(properties, &got.data)?;
        assert_rebuilt(&received, sent);
    }
    sink.shutdown().await;
    fixture.remove().await
}

#[tokio::test]
async fn unroutable_messages_fail_permanently_and_hold_back_the_partition() -> Result {
    let fixture = Fixture::new("order.#").await?;
    let sink = AmqpSink::connect(&fixture.config()).await?;
    // Every fifth message has no queue; confirms come back in multiple acks, so the
    // returned messages must be matched by id, not by the confirm that carries them.
    let batch: Vec<Message> = (1..=50)
        .map(|i| {
            let kind = if i % 5 == 0 { "invoice" } else { "order" };
            message(kind, &i.to_string(), 1, "{}")
        })
        .collect();
    let outcomes = sink.publish(&batch).await;
    for (sent, outcome) in batch.iter().zip(&outcomes) {
        match (sent.aggregate_type.as_str(), outcome) {
            ("order", Ok(_)) => {}
            ("invoice", Err(err)) => {
                assert!(!err.is_retryable(), "{err}");
                assert!(
                    err.to_string().contains("unroutable") && err.to_string().contains("NO_ROUTE"),
                    "{err}"
                );
            }
            (kind, outcome) => panic!("{kind} message {}: {outcome:?}", sent.aggregate_id),
        }
    }
    assert_eq!(fixture.drain().await?.len(), 40);

    // While the partition is blocked, its next batch sends the blocked message alone.
    let blocked = message("invoice", "5", 1, "{}");
    let behind = message("order", "99", 1, "{}");
    let outcomes = sink.publish(&[blocked.clone(), behind.clone()]).await;
    assert!(outcomes[0].as_ref().is_err_and(|e| !e.is_retryable()));
    assert!(outcomes[1].as_ref().is_err_and(SinkError::is_retryable));
    assert!(
        fixture.drain().await?.is_empty(),
        "nothing behind the blocked message was sent"
    );

    // Once a queue takes it, the partition goes on in order.
    fixture.bind("invoice.#").await?;
    all_ok(sink.publish(&[blocked.clone(), behind.clone()]).await)?;
    let ids: Vec<Uuid> = fixture.received().await?.iter().map(|m| m.id).collect();
    assert_eq!(ids, [blocked.id, behind.id]);
    sink.shutdown().await;
    fixture.remove().await
}

#[tokio::test]
async fn a_batch_goes_in_confirm_windows_and_none_is_sent_after_a_failed_one() -> Result {
    let fixture = Fixture::new("order.#").await?;
    let sink = AmqpSink::connect(&AmqpSinkConfig {
        confirm_window: 4,
        ..fixture.config()
    })
    .await?;
    // Windows [0-3] [4-7] [8-9]; message 5 has no queue.
    let batch: Vec<Message> = (0..10)
        .map(|i| {
            let kind = if i == 5 { "invoice" } else { "order" };
            message(kind, &i.to_string(), 1, "{}")
        })
        .collect();
    let outcomes = sink.publish(&batch).await;
    assert_eq!(outcomes.len(), 10);
    for (at, outcome) in outcomes.iter().enumerate() {
        match at {
            5 => assert!(
                outcome.as_ref().is_err_and(|e| !e.is_retryable()),
                "{outcome:?}"
            ),
            8 | 9 => assert!(
                outcome.as_ref().is_err_and(SinkError::is_retryable),
                "{outcome:?}"
            ),
            _ => assert!(outcome.is_ok(), "message {at}: {outcome:?}"),
        }
    }
    let received: Vec<Uuid> = fixture.received().await?.iter().map(|m| m.id).collect();
    let expected: Vec<Uuid> = [0, 1, 2, 3, 4, 6, 7].iter().map(|&i| batch[i].id).collect();
    assert_eq!(
        received, expected,
        "the window after the failure was not sent"
    );
    sink.shutdown().await;
    fixture.remove().await
}

#[tokio::test]
async fn a_missing_exchange_blocks_with_its_name_and_other_exchanges_still_work() -> Result {
    let fixture = Fixture::new("#").await?;
    let config = AmqpSinkConfig {
        exchange_template: format!("{}{{aggregate_type}}", fixture.exchange),
        ..fixture.config()
    };
    // `<exchange>` exists for aggregate type "", `<exchange>ghost` does not.
    let sink = AmqpSink::connect(&config).await?;
    let ghost = message("ghost", "1", 1, "{}");
    let outcomes = sink.publish(&[ghost, message("ghost", "1", 2, "{}")]).await;
    let err = outcomes[0].as_ref().expect_err("no such exchange");
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{}ghost", fixture.exchange)),
        "{err}"
    );
    assert!(outcomes[1].as_ref().is_err_and(SinkError::is_retryable));

    let mut fine = message("order", "1", 1, "{}");
    fine.aggregate_type = String::new();
    fine.partition = 7;
    all_ok(sink.publish(&[fine]).await)?;
    assert_eq!(fixture.drain().await?.len(), 1);
    sink.shutdown().await;
    fixture.remove().await
}

#[tokio::test]
async fn declare_sets_up_an_exchange_and_a_queue_for_demos() -> Result {
    let tag = &Uuid::now_v7().simple().to_string()[20..];
    let exchange = format!("ferrytest_demo_{tag}");
    let config = AmqpSinkConfig {
        url: services::amqp_url().into(),
        exchange_template: exchange.clone(),
        declare: Some(AmqpDeclare {
            queue: Some(exchange.clone()),
            ..AmqpDeclare::default()
        }),
        ..AmqpSinkConfig::default()
    };
    let sink = AmqpSink::connect(&config).await?;
    all_ok(sink.publish(&[message("order", "1", 1, "{}")]).await)?;
    sink.shutdown().await;

    let connection =
        Connection::connect(&services::amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            exchange.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(queue.message_count(), 1);
    channel
        .queue_delete(exchange.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_broken_connection_is_retryable_and_the_sink_reconnects() -> Result {
    let fixture = Fixture::new("#").await?;
    let mut proxy = TcpProxy::down(address_of(&services::amqp_url()));
    let config = AmqpSinkConfig {
        url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port).into(),
        confirm_timeout_secs: 3,
        ..fixture.config()
    };
    let err = AmqpSink::connect(&config)
        .await
        .expect_err("the broker is down");
    assert!(
        err.is_retryable() && err.to_string().contains(&proxy.port.to_string()),
        "{err}"
    );

    proxy.restore().await;
    let sink = AmqpSink::connect(&config).await?;
    let first = message("order", "1", 1, "{}");
    all_ok(sink.publish(std::slice::from_ref(&first)).await)?;

    sink.check().await?;

    proxy.cut();
    let second = message("order", "1", 2, "{}");
    let outcomes = sink.publish(std::slice::from_ref(&second)).await;
    assert!(
        outcomes[0].as_ref().is_err_and(SinkError::is_retryable),
        "{outcomes:?}"
    );
    let down = sink
        .check()
        .await
        .expect_err("readiness sees the broker gone");
    assert!(down.is_retryable(), "{down}");

    proxy.restore().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sink.publish(std::slice::from_ref(&second)).await.remove(0) {
            Ok(_) => break,
            Err(err) => {
                assert!(err.is_retryable() && Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let ids: Vec<Uuid> = fixture.received().await?.iter().map(|m| m.id).collect();
    assert_eq!(ids.first(), Some(&first.id));
    assert_eq!(
        ids.last(),
        Some(&second.id),
        "nothing lost; a re-send may repeat: {ids:?}"
    );
    sink.check().await?;
    sink.shutdown().await;
    fixture.remove().await
}

#[tokio::test]
async fn partitions_publish_concurrently_each_in_order() -> Result {
    let fixture = Fixture::new("#").await?;
    let sink = std::sync::Arc::new(AmqpSink::connect(&fixture.config()).await?);
    let mut tasks = Vec::new();
    for partition in 0..8u32 {
        let sink = std::sync::Arc::clone(&sink);
        tasks.push(tokio::spawn(async move {
            for round in 0..5u64 {
                let batch: Vec<Message> = (1..=100)
                    .map(|i| {
                        let mut m =
                            message("order", &format!("p{partition}"), round * 100 + i, "{}");
                        m.partition = partition;
                        m
                    })
                    .collect();
                for outcome in sink.publish(&batch).await {
                    outcome.expect("published");
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let received = fixture.received().await?;
    assert_eq!(received.len(), 8 * 500);
    let mut last = std::collections::HashMap::new();
    for message in received {
        let previous = last.insert(message.aggregate_id.clone(), message.version);
        assert_eq!(
            previous.unwrap_or(0) + 1,
            message.version,
            "{}",
            message.aggregate_id
        );
    }
    sink.shutdown().await;
    fixture.remove().await
}
