//! Kafka sink against real Kafka-protocol brokers started by `scripts/services.sh`:
//! Tansu at `FERRY_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`) for the record mapping,
//! and noida-db's Kafka at `FERRY_TEST_KAFKA_TXN_BROKERS` (default `127.0.0.1:9192`) for
//! everything that depends on transactions: Tansu hands records of aborted transactions to
//! read_committed consumers and does not fence producers, noida-db does both right.
//! Every test uses topics and transactional ids of its own and deletes its topics.
#![cfg(feature = "kafka")]

#[path = "support/rebuilt.rs"]
mod rebuilt;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone as _, Utc};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use uuid::Uuid;

use ferry::kafka::{CommittedReader, CommittedRecord, KafkaSink, KafkaSinkConfig};
use ferry::{Delivery, Headers, Lease, Message, ReconcileRequest, Sink, SinkError, Takeover};
use ferry_core::testing::services;

use rebuilt::assert_rebuilt;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Topics `ft<tag>.<aggregate_type>` and transactional ids `ft<tag>-p<N>` of this test's own.
fn unique_config(brokers: String) -> KafkaSinkConfig {
    let tag = &Uuid::now_v7().simple().to_string()[20..];
    KafkaSinkConfig {
        brokers,
        topic_template: format!("ft{tag}.{{aggregate_type}}"),
        transactional_id_prefix: format!("ft{tag}"),
        topic_partitions: 3,
        timeout_secs: 10,
        transaction_timeout_secs: 10,
        ..KafkaSinkConfig::default()
    }
}

fn topic(config: &KafkaSinkConfig, aggregate_type: &str) -> String {
    config
        .topic_template
        .replace("{aggregate_type}", aggregate_type)
}

fn lease(partition: u32, epoch: i64) -> Lease {
    Lease {
        partition,
        epoch,
        owner: format!("relay-{epoch}"),
        takeover: Takeover::Clean,
    }
}

/// `created_at` at microsecond precision, as CloudEvents `time` carries it.
fn now_micros() -> DateTime<Utc> {
    Utc.timestamp_micros(Utc::now().timestamp_micros())
        .single()
        .unwrap_or_else(Utc::now)
}

fn message(aggregate_type: &str, aggregate_id: &str, version: u64, partition: u32) -> Message {
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
        payload: Bytes::from(format!(r#"{{"version":{version}}}"#)),
        headers,
        partition_key: format!("{aggregate_type}/{aggregate_id}"),
        partition,
        created_at: now_micros(),
        sequence: version as i64,
    }
}

fn batch(aggregate_id: &str, versions: std::ops::RangeInclusive<u64>) -> Vec<Message> {
    versions
        .map(|version| message("order", aggregate_id, version, 0))
        .collect()
}

fn ids(messages: &[Message]) -> HashSet<Uuid> {
    messages.iter().map(|m| m.id).collect()
}

/// The positions of a fully committed batch, or the first failure.
fn committed(outcomes: Vec<std::result::Result<Delivery, SinkError>>) -> Result<Vec<u64>> {
    outcomes
        .into_iter()
        .map(|outcome| {
            let delivery = outcome?;
            delivery
                .position
                .ok_or_else(|| "a committed batch has a position".into())
        })
        .collect()
}

/// Everything committed in `topics`, read in read_committed up to their ends.
async fn read_committed(
    config: &KafkaSinkConfig,
    topics: &[String],
) -> Result<Vec<CommittedRecord>> {
    let reader = CommittedReader::open(config, topics).await?;
    let ends = reader.ends().await?;
    let mut records = Vec::new();
    let result = reader.read_to(&ends, |record| records.push(record)).await;
    reader.close().await;
    result?;
    Ok(records)
}

fn received_ids(records: &[CommittedRecord]) -> Vec<Uuid> {
    records
        .iter()
        .map(|r| r.message.as_ref().expect("decodable").id)
        .collect()
}

async fn delete_topics(config: &KafkaSinkConfig, topics: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .expect("admin client");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}

async fn owns_everything_reconcile(
    sink: &KafkaSink,
    partition: u32,
    checkpoint: Option<u64>,
    owns_key: &(dyn Fn(&str) -> bool + Sync),
) -> Result<HashSet<Uuid>> {
    let ids = sink
        .reconcile(ReconcileRequest {
            partition,
            checkpoint,
            since_expiry: Duration::ZERO,
            owns_key,
        })
        .await?;
    Ok(ids.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_key_the_topic_and_cloudevents_headers() -> Result {
    let config = unique_config(services::kafka_brokers());
    let sink = KafkaSink::connect(&config).await?;
    sink.check().await?;
    sink.open_partition(&lease(3, 1)).await?;
    let mut batch = vec![
        message("order", "42", 1, 3),
        message("order", "42", 2, 3),
        message("customer", "7", 1, 3),
    ];
    batch[2].headers.insert(
        "content-type".into(),
        "application/vnd.customer+json".into(),
    );
    let positions = committed(sink.publish(&batch).await)?;
    let now = u64::try_from(Utc::now().timestamp_millis())?;
    assert!(
        positions.iter().all(|p| now.abs_diff(*p) < 60_000),
        "positions are record timestamps: {positions:?}"
    );

    let topics = vec![topic(&config, "order"), topic(&config, "customer")];
    let records = read_committed(&config, &topics).await?;
    assert_eq!(records.len(), 3, "{records:?}");
    for sent in &batch {
        let record = records
            .iter()
            .find(|r| r.message.as_ref().is_ok_and(|m| m.id == sent.id))
            .expect("every message arrived");
        assert_eq!(record.topic, topic(&config, &sent.aggregate_type));
        assert_eq!(record.key.as_deref(), Some(sent.partition_key.as_bytes()));
        let received = record.message.as_ref().expect("decodes");
        assert_rebuilt(received, sent);
        assert_eq!(
            received.headers.get("content-type").map(String::as_str),
            Some(sent.content_type())
        );
    }
    let order: Vec<u64> = records
        .iter()
        .filter_map(|r| r.message.as_ref().ok())
        .filter(|m| m.aggregate_id == "42")
        .map(|m| m.version)
        .collect();
    assert_eq!(order, [1, 2], "one key stays in one partition, in order");

    sink.close_partition(3).await;
    let after_close = sink.publish(&[message("order", "42", 3, 3)]).await;
    assert!(after_close[0].as_ref().is_err_and(SinkError::is_fenced));
    sink.shutdown().await;
    delete_topics(&config, &topics).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_was_not_opened_is_not_published() -> Result {
    let config = unique_config(services::kafka_brokers());
    let sink = KafkaSink::connect(&config).await?;
    let outcomes = sink.publish(&batch("1", 1..=2)).await;
    assert_eq!(outcomes.len(), 2);
    for outcome in outcomes {
        let err = outcome.expect_err("no producer for the partition");
        assert!(err.is_fenced(), "{err}");
        assert!(err.to_string().contains(&sink.transactional_id(0)), "{err}");
    }
    sink.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_fences_the_old_producer_and_only_committed_batches_are_visible() -> Result {
    let config = unique_config(services::kafka_txn_brokers());
    let old = KafkaSink::connect(&config).await?;
    let new = KafkaSink::connect(&config).await?;
    old.open_partition(&lease(0, 1)).await?;
    let first = batch("1", 1..=5);
    committed(old.publish(&first).await)?;

    new.open_partition(&lease(0, 2)).await?;
    let zombie = batch("1", 6..=8);
    for outcome in old.publish(&zombie).await {
        let err = outcome.expect_err("the old producer is fenced");
        assert!(err.is_fenced(), "{err}");
    }
    // The fenced producer was closed: nothing more goes out through it.
    let later = old.publish(&batch("1", 6..=6)).await;
    assert!(later[0].as_ref().is_err_and(SinkError::is_fenced));

    let second = batch("1", 6..=10);
    committed(new.publish(&second).await)?;

    let topics = vec![topic(&config, "order")];
    let seen = received_ids(&read_committed(&config, &topics).await?);
    let expected: Vec<Uuid> = first.iter().chain(&second).map(|m| m.id).collect();
    assert_eq!(
        seen, expected,
        "the fenced batch is invisible, the rest in order, once"
    );
    old.shutdown().await;
    new.shutdown().await;
    delete_topics(&config, &topics).await;
    Ok(())
}

/// A bare transactional producer with the partition's transactional id that sends
/// ferry-shaped records and leaves its transaction open, like a relay paused mid-batch.
async fn leave_a_transaction_open(
    config: &KafkaSinkConfig,
    transactional_id: &str,
    messages: &[Message],
) -> Result<FutureProducer> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "60000")
        .create()?;
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(10))).await??;
    producer.begin_transaction()?;
    let topic = topic(config, "order");
    for m in messages {
        let id = m.id.to_string();
        let version = m.version.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(&id),
            })
            .insert(Header {
                key: "ce_type",
                value: Some(&m.event_type),
            })
            .insert(Header {
                key: "ce_subject",
                value: Some(&m.aggregate_id),
            })
            .insert(Header {
                key: "ce_aggregatetype",
                value: Some(&m.aggregate_type),
            })
            .insert(Header {
                key: "ce_aggregateversion",
                value: Some(&version),
            })
            .insert(Header {
                key: "ce_partitionkey",
                value: Some(&m.partition_key),
            });
        let record = FutureRecord::to(&topic)
            .key(m.partition_key.as_bytes())
            .payload(&m.payload[..])
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(err, _)| err)?;
    }
    Ok(producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_a_partition_aborts_what_the_previous_owner_left_open_and_reconcile_finds_only_committed()
-> Result {
    let config = KafkaSinkConfig {
        reconcile_margin_secs: 0,
        ..unique_config(services::kafka_txn_brokers())
    };
    let first_owner = KafkaSink::connect(&config).await?;
    first_owner.open_partition(&lease(0, 1)).await?;
    let first = batch("1", 1..=4);
    let first_positions = committed(first_owner.publish(&first).await)?;
    first_owner.shutdown().await;

    let left_open = batch("1", 5..=7);
    let zombie =
        leave_a_transaction_open(&config, &first_owner.transactional_id(0), &left_open).await?;

    let owner = KafkaSink::connect(&config).await?;
    owner.open_partition(&lease(0, 2)).await?;
    let commit =
        tokio::task::spawn_blocking(move || zombie.commit_transaction(Duration::from_secs(10)))
            .await?;
    assert!(
        commit.is_err(),
        "the paused producer's commit must be refused"
    );

    let order_keys = |key: &str| key.starts_with("order/");
    let found = owns_everything_reconcile(&owner, 0, None, &order_keys).await?;
    assert_eq!(
        found,
        ids(&first),
        "committed ids found, the aborted ones not"
    );

    let mut second = batch("1", 5..=7);
    second.push(message("order", "other-partition", 1, 1));
    let second_positions = committed(owner.publish(&second).await)?;
    let only_one = |key: &str| key == "order/1";
    let checkpoint = first_positions.iter().max().copied();
    let found = owns_everything_reconcile(&owner, 0, checkpoint, &only_one).await?;
    assert!(
        found.is_superset(&ids(&second[..3])),
        "beyond the checkpoint"
    );
    assert!(found.is_subset(&ids(&first).union(&ids(&second[..3])).copied().collect()));
    let past_everything = second_positions.iter().max().map(|p| p + 1);
    let found = owns_everything_reconcile(&owner, 0, past_everything, &order_keys).await?;
    assert!(
        found.is_empty(),
        "nothing lies beyond the last checkpoint: {found:?}"
    );

    let topics = vec![topic(&config, "order")];
    let seen = received_ids(&read_committed(&config, &topics).await?);
    assert_eq!(seen.len(), first.len() + second.len(), "{seen:?}");
    assert!(seen.iter().all(|id| !ids(&left_open).contains(id)));
    owner.shutdown().await;
    delete_topics(&config, &topics).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_kafka_refuses_stops_the_batch_after_committing_what_precedes_it() -> Result {
    let config = unique_config(services::kafka_txn_brokers());
    let sink = KafkaSink::connect(&config).await?;
    sink.open_partition(&lease(0, 1)).await?;
    let mut messages = batch("1", 1..=4);
    // librdkafka's message.max.bytes defaults to 1000000.
    messages[2].payload = Bytes::from(vec![b'x'; 1_500_000]);
    let outcomes = sink.publish(&messages).await;
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    let refused = outcomes[2].as_ref().expect_err("too large");
    assert!(!refused.is_retryable() && !refused.is_fenced(), "{refused}");
    assert!(
        refused.to_string().contains(&messages[2].id.to_string()),
        "{refused}"
    );
    assert!(outcomes[3].as_ref().is_err_and(SinkError::is_retryable));

    let topics = vec![topic(&config, "order")];
    let seen = received_ids(&read_committed(&config, &topics).await?);
    assert_eq!(
        seen,
        [messages[0].id, messages[1].id],
        "the aborted attempt is invisible"
    );
    // The partition goes on with the same producer.
    committed(sink.publish(&messages[3..]).await)?;
    sink.shutdown().await;
    delete_topics(&config, &topics).await;
    Ok(())
}

/// A batch larger than `delivery_window` is still one transaction: every record lands,
/// in order, and a refused record still stops the batch after what precedes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_delivery_window_lands_whole_and_in_order() -> Result {
    let config = KafkaSinkConfig {
        delivery_window: 2,
        ..unique_config(services::kafka_txn_brokers())
    };
    let sink = KafkaSink::connect(&config).await?;
    sink.open_partition(&lease(0, 1)).await?;
    let first = batch("1", 1..=7);
    committed(sink.publish(&first).await)?;
    let mut second = batch("1", 8..=12);
    second[3].payload = Bytes::from(vec![b'x'; 1_500_000]);
    let outcomes = sink.publish(&second).await;
    assert!(outcomes[..3].iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert!(outcomes[3].is_err() && outcomes[4].is_err(), "{outcomes:?}");

    let topics = vec![topic(&config, "order")];
    let seen = received_ids(&read_committed(&config, &topics).await?);
    let expected: Vec<Uuid> = first.iter().chain(&second[..3]).map(|m| m.id).collect();
    assert_eq!(seen, expected);
    sink.shutdown().await;
    delete_topics(&config, &topics).await;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_cluster_is_a_retryable_error_naming_it() {
    let config = KafkaSinkConfig {
        brokers: "127.0.0.1:1".into(),
        timeout_secs: 2,
        transaction_timeout_secs: 2,
        ..KafkaSinkConfig::default()
    };
    let err = KafkaSink::connect(&config)
        .await
        .expect_err("nothing listens");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn a_controlled_librdkafka_property_is_refused_at_connect() {
    let config = KafkaSinkConfig {
        librdkafka: [("enable.idempotence".to_owned(), "false".to_owned())].into(),
        ..unique_config(services::kafka_brokers())
    };
    let err = KafkaSink::connect(&config).await.expect_err("refused");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("enable.idempotence"), "{err}");
}
