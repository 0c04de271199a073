//! Reading back what ferry committed: a read_committed consumer over chosen
//! topic-partitions, with an end check that does not rely on seeing a last record.
//!
//! Transaction markers and aborted records occupy offsets but are never handed to the
//! application, so "the last record's offset + 1" can stay short of the high watermark
//! forever. The consumer's position does move past them, so a partition is read to an
//! offset once its position has reached it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::debug;

use ferry_core::ErrorChain;
use ferry_core::SinkError;
use ferry_core::cloudevents::{DecodeError, ReceivedMessage};

use super::config::KafkaSinkConfig;
use super::producer::blocking;

/// A topic-partition: topic name and partition number.
pub type TopicPartition = (String, i32);

/// One committed record, decoded as any CloudEvents consumer would.
#[derive(Debug, Clone)]
pub struct CommittedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record key: the message's partition key.
    pub key: Option<Vec<u8>>,
    /// The message rebuilt from the `ce_*` headers and the value.
    pub message: Result<ReceivedMessage, DecodeError>,
}

/// A read_committed consumer of chosen topic-partitions, for checks and tools.
pub struct CommittedReader {
    consumer: StreamConsumer,
    /// read_uncommitted, so that high watermarks are not bounded by open transactions.
    lookup: Arc<BaseConsumer>,
    starts: HashMap<TopicPartition, i64>,
    timeout: Duration,
}

impl std::fmt::Debug for CommittedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommittedReader")
            .field("starts", &self.starts)
            .finish_non_exhaustive()
    }
}

impl CommittedReader {
    /// Reads every partition of `topics` from its start, with the brokers and librdkafka
    /// settings of `config`. The topics must exist.
    pub async fn open(config: &KafkaSinkConfig, topics: &[String]) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let lookup = Arc::new(lookup_client(&checked.base)?);
        let (client, names, timeout) = (Arc::clone(&lookup), topics.to_vec(), checked.timeout);
        let starts = blocking(move || -> Result<_, SinkError> {
            let mut starts = Vec::new();
            for topic in &names {
                let metadata = client.fetch_metadata(Some(topic), timeout).map_err(|err| {
                    SinkError::retryable(format!("cannot read the metadata of topic {topic}"))
                        .with_source(err)
                })?;
                for found in metadata.topics() {
                    if let Some(code) = found.error() {
                        return Err(SinkError::retryable(format!(
                            "kafka has no topic {topic}: {:?}",
                            rdkafka::error::RDKafkaErrorCode::from(code)
                        )));
                    }
                    for partition in found.partitions() {
                        let (low, _) = client
                            .fetch_watermarks(topic, partition.id(), timeout)
                            .map_err(|err| {
                                SinkError::retryable(format!(
                                    "cannot read the offsets of {topic}[{}]",
                                    partition.id()
                                ))
                                .with_source(err)
                            })?;
                        starts.push(((topic.clone(), partition.id()), low));
                    }
                }
            }
            Ok(starts)
        })
        .await??;
        Self::assign(&checked.base, lookup, starts, checked.timeout).await
    }

    /// Reads each topic-partition from its start offset.
    pub(crate) async fn assign(
        base: &ClientConfig,
        lookup: Arc<BaseConsumer>,
        starts: Vec<(TopicPartition, i64)>,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let mut config = base.clone();
        config
            .set("isolation.level", "read_committed")
            .set("group.id", "ferry-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer = config.create().map_err(|err| {
            SinkError::permanent("cannot create the kafka reader").with_source(err)
        })?;
        let mut assignment = TopicPartitionList::with_capacity(starts.len());
        for ((topic, partition), start) in &starts {
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(*start))
                .map_err(|err| {
                    SinkError::retryable("cannot build the assignment").with_source(err)
                })?;
        }
        consumer.assign(&assignment).map_err(|err| {
            SinkError::retryable("cannot assign the kafka reader").with_source(err)
        })?;
        Ok(Self {
            consumer,
            lookup,
            starts: starts.into_iter().collect(),
            timeout,
        })
    }

    /// The next committed record, or `None` if none arrives within `wait`.
    pub async fn next(&self, wait: Duration) -> Result<Option<CommittedRecord>, SinkError> {
        let mut record = None;
        self.next_raw(wait, |raw| record = Some(decode(raw)))
            .await?;
        Ok(record)
    }

    /// Hands the next committed record to `each` as librdkafka holds it (no copy), if one
    /// arrives within `wait`; returns whether one did. Errors the consumer recovers from
    /// by itself (a broker restarting) count as no record.
    async fn next_raw(
        &self,
        wait: Duration,
        each: impl FnOnce(&BorrowedMessage<'_>),
    ) -> Result<bool, SinkError> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Ok(Ok(record)) => {
                each(&record);
                Ok(true)
            }
            Ok(Err(err @ KafkaError::MessageConsumptionFatal(_))) => Err(SinkError::retryable(
                format!("reading kafka failed for good: {err}"),
            )),
            Ok(Err(err)) => {
                debug!(error = %ErrorChain(&err), "kafka reader error; it retries by itself");
                Ok(false)
            }
            Err(_idle) => Ok(false),
        }
    }

    /// Every assigned partition's high watermark now: once [`Self::lagging`] is empty for
    /// them, everything committed before this call has been read.
    pub async fn ends(&self) -> Result<HashMap<TopicPartition, i64>, SinkError> {
        let (lookup, timeout) = (Arc::clone(&self.lookup), self.timeout);
        let partitions: Vec<TopicPartition> = self.starts.keys().cloned().collect();
        blocking(move || {
            partitions
                .into_iter()
                .map(|(topic, partition)| {
                    let (_, high) = lookup
                        .fetch_watermarks(&topic, partition, timeout)
                        .map_err(|err| {
                            SinkError::retryable(format!(
                                "cannot read the offsets of {topic}[{partition}]"
                            ))
                            .with_source(err)
                        })?;
                    Ok(((topic, partition), high))
                })
                .collect()
        })
        .await?
    }

    /// The partitions whose position is still short of their end in `ends`, with that
    /// position.
    pub fn lagging(
        &self,
        ends: &HashMap<TopicPartition, i64>,
    ) -> Result<Vec<(TopicPartition, i64)>, SinkError> {
        let positions = self.consumer.position().map_err(|err| {
            SinkError::retryable("cannot read the kafka reader's positions").with_source(err)
        })?;
        let mut lagging: Vec<(TopicPartition, i64)> = ends
            .iter()
            .filter_map(|((topic, partition), end)| {
                let start = self
                    .starts
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .unwrap_or(0);
                let position = positions
                    .find_partition(topic, *partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    })
                    .unwrap_or(start);
                (position < *end).then(|| ((topic.clone(), *partition), position))
            })
            .collect();
        lagging.sort();
        Ok(lagging)
    }

    /// Reads until every partition's position reaches its end in `ends`, handing each
    /// record to `each`. Fails if positions stop moving for the configured timeout (an
    /// open transaction holds the last stable offset back).
    pub async fn read_to(
        &self,
        ends: &HashMap<TopicPartition, i64>,
        mut each: impl FnMut(CommittedRecord),
    ) -> Result<(), SinkError> {
        self.read_raw_to(ends, |raw| each(decode(raw))).await
    }

    /// [`Self::read_to`] without decoding: `each` sees each record as librdkafka holds it.
    pub(crate) async fn read_raw_to(
        &self,
        ends: &HashMap<TopicPartition, i64>,
        mut each: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<(), SinkError> {
        let poll = Duration::from_millis(100);
        let mut last_progress = tokio::time::Instant::now();
        let mut lagging = self.lagging(ends)?;
        while !lagging.is_empty() {
            if self.next_raw(poll, &mut each).await? {
                last_progress = tokio::time::Instant::now();
                continue;
            }
            let now_lagging = self.lagging(ends)?;
            if now_lagging != lagging {
                last_progress = tokio::time::Instant::now();
                lagging = now_lagging;
            } else if last_progress.elapsed() > self.timeout {
                let ((topic, partition), position) = &lagging[0];
                return Err(SinkError::retryable(format!(
                    "reading {topic}[{partition}] stopped at offset {position}, short of {}: an \
                     open transaction holds committed records back",
                    ends[&(topic.clone(), *partition)]
                )));
            }
        }
        Ok(())
    }

    /// Closes the consumer on the blocking pool (closing waits for librdkafka's threads).
    pub async fn close(self) {
        let Self {
            consumer, lookup, ..
        } = self;
        let _ = blocking(move || drop((consumer, lookup))).await;
    }
}

/// A read_uncommitted client for metadata, watermarks and timestamp lookups.
pub(crate) fn lookup_client(base: &ClientConfig) -> Result<BaseConsumer, SinkError> {
    let mut config = base.clone();
    config
        .set("isolation.level", "read_uncommitted")
        .set("enable.auto.commit", "false");
    config.create().map_err(|err| {
        SinkError::permanent("cannot create the kafka lookup client").with_source(err)
    })
}

fn decode(record: &BorrowedMessage<'_>) -> CommittedRecord {
    let headers: Vec<(&str, &str)> = record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    CommittedRecord {
        topic: record.topic().to_owned(),
        partition: record.partition(),
        offset: record.offset(),
        key: record.key().map(<[u8]>::to_vec),
        message: ReceivedMessage::from_binary(headers, payload),
    }
}
