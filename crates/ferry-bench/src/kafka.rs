//! The Kafka parts of the bench: its own topics, and the broker's raw publish ceiling
//! measured in the same run, with records shaped like the sink's (same payload size, a key,
//! eleven headers), so the relay's figures can be read against what the broker takes.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::try_join_all;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use ferry::kafka::KafkaSinkConfig;

fn admin(config: &KafkaSinkConfig) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    config
        .client_config()?
        .create()
        .context("creating the kafka admin client")
}

/// Creates `topics` with the sink's partition count and replication factor.
pub(crate) async fn create_topics(config: &KafkaSinkConfig, topics: &[&str]) -> anyhow::Result<()> {
    let replication = config.topic_replication_factor.map_or(-1, i32::from);
    let partitions = i32::try_from(config.topic_partitions)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let timeout = Some(Duration::from_secs(config.timeout_secs));
    let options = AdminOptions::new()
        .request_timeout(timeout)
        .operation_timeout(timeout);
    for result in admin(config)?.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("cannot create the bench topic {topic}: {code}"),
        }
    }
    Ok(())
}

pub(crate) async fn delete_topics(config: &KafkaSinkConfig, topics: &[&str]) -> anyhow::Result<()> {
    for result in admin(config)?
        .delete_topics(topics, &AdminOptions::new())
        .await?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => bail!("cannot delete the bench topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// What the raw loops send.
#[derive(Debug)]
pub(crate) struct RawLoad<'a> {
    pub(crate) topic: &'a str,
    pub(crate) messages: u64,
    pub(crate) aggregates: u32,
    pub(crate) payload: &'a [u8],
    /// Records per transaction in the transactional loop (the relay's batch size).
    pub(crate) batch: usize,
    /// Concurrent transactional producers (the outbox's partitions).
    pub(crate) producers: u32,
}

/// Runs both raw loops and prints their rates: one idempotent `acks=all` producer with
/// every record in flight at once, then `producers` transactional producers committing
/// `batch` records per transaction, as the relays do.
pub(crate) async fn print_raw_ceiling(
    config: &KafkaSinkConfig,
    load: &RawLoad<'_>,
) -> anyhow::Result<()> {
    let base = config.client_config()?;
    let mut idempotent = base.clone();
    idempotent
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    let producer: FutureProducer = idempotent.create()?;
    let started = Instant::now();
    send_all(&producer, load, 0..load.messages).await?;
    let elapsed = started.elapsed();
    println!(
        "kafka raw ceiling, idempotent acks=all, one producer, all in flight: {} records in {:.2} s, {:.0} msg/s",
        load.messages,
        elapsed.as_secs_f64(),
        load.messages as f64 / elapsed.as_secs_f64()
    );
    close(producer).await;

    let per_producer = load.messages / u64::from(load.producers);
    let started = Instant::now();
    try_join_all(
        (0..load.producers).map(|index| transactional_loop(&base, load, index, per_producer)),
    )
    .await?;
    let elapsed = started.elapsed();
    let total = per_producer * u64::from(load.producers);
    println!(
        "kafka raw ceiling, {} transactional producers, {} records per transaction: {total} records in {:.2} s, {:.0} msg/s",
        load.producers,
        load.batch,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

async fn transactional_loop(
    base: &ClientConfig,
    load: &RawLoad<'_>,
    index: u32,
    records: u64,
) -> anyhow::Result<()> {
    let mut config = base.clone();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("transactional.id", format!("{}-raw-{index}", load.topic));
    let producer: FutureProducer = config.create()?;
    let timeout = Duration::from_secs(30);
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(timeout)).await??;
    let first = u64::from(index) * records;
    let mut sent = first;
    while sent < first + records {
        let end = (sent + load.batch as u64).min(first + records);
        producer.begin_transaction()?;
        send_all(&producer, load, sent..end).await?;
        let commit = producer.clone();
        tokio::task::spawn_blocking(move || commit.commit_transaction(timeout)).await??;
        sent = end;
    }
    close(producer).await;
    Ok(())
}

/// Sends records `range` without waiting in between, then waits for every delivery.
async fn send_all(
    producer: &FutureProducer,
    load: &RawLoad<'_>,
    range: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let mut pending: Vec<DeliveryFuture> = Vec::new();
    for n in range {
        let key = format!(
            "{}/{}",
            crate::plan::AGGREGATE_TYPE,
            n % u64::from(load.aggregates)
        );
        let mut headers = OwnedHeaders::new_with_capacity(11);
        for name in RECORD_HEADERS {
            headers = headers.insert(Header {
                key: name,
                value: Some(HEADER_VALUE),
            });
        }
        let mut record = FutureRecord::to(load.topic)
            .key(key.as_bytes())
            .payload(load.payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((err, _)) => return Err(err).context("raw publish"),
            }
        }
    }
    for delivery in pending {
        delivery
            .await
            .context("the raw producer went away")?
            .map_err(|(err, _)| err)
            .context("raw publish")?;
    }
    Ok(())
}

/// A header value of the length of a message id, the sink's typical attribute.
const HEADER_VALUE: &str = "01a2f3c4-d5e6-7f80-9a1b-2c3d4e5f6a7b";

/// The sink's record headers: ten CloudEvents attributes and `content-type`.
const RECORD_HEADERS: [&str; 11] = [
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_subject",
    "ce_time",
    "ce_aggregatetype",
    "ce_aggregateversion",
    "ce_partitionkey",
    "ce_sequence",
    "content-type",
];

/// Closing a producer waits for librdkafka's threads: off the async workers.
async fn close(producer: FutureProducer) {
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
}
