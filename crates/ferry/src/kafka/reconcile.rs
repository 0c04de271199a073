//! Reconciliation: which of a partition's messages Kafka already holds, committed.
//!
//! It runs after the new owner's `init_transactions`, which settled (committed or aborted)
//! every transaction the previous owners left open, so the records of this partition that
//! will ever be visible are already in the logs, below each topic-partition's current high
//! watermark. The scan reads, in read_committed, every topic the template can render, from
//! the first record at or after the checkpoint (a record timestamp, less a margin for
//! clock differences) up to that high watermark, and keeps the ids of records whose key
//! belongs to the partition. Checkpoints are recorded after every fully committed batch,
//! so the scan covers little more than what the previous owner sent after its last one.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;
use tracing::{debug, info};
use uuid::Uuid;

use ferry_core::SinkError;
use ferry_core::cloudevents::ext;

use super::producer::{CE_PREFIX, blocking};
use super::topic::TopicTemplate;

/// How long one wait for the next record lasts before the scan checks its positions.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The records of one topic-partition to read: offsets `start..end`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    topic: String,
    partition: i32,
    start: i64,
    end: i64,
}

/// What to scan and how.
#[derive(Debug)]
pub(crate) struct TailScan {
    /// Brokers and the user's librdkafka settings.
    pub(crate) base: ClientConfig,
    pub(crate) template: TopicTemplate,
    /// Records with a timestamp at or after this (milliseconds) are read; `None` reads
    /// every topic from its start.
    pub(crate) since_ms: Option<i64>,
    pub(crate) timeout: Duration,
}

impl TailScan {
    /// The ids of committed records whose partition key `owns_key` accepts.
    pub(crate) async fn committed_ids(
        self,
        owns_key: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Uuid>, SinkError> {
        let started = Instant::now();
        let (lookup_config, template, since_ms, timeout) = (
            self.lookup_config(),
            self.template.clone(),
            self.since_ms,
            self.timeout,
        );
        let ranges =
            blocking(move || plan(&lookup_config, &template, since_ms, timeout)).await??;
        if ranges.is_empty() {
            debug!("nothing beyond the checkpoint in kafka");
            return Ok(Vec::new());
        }
        let reader: StreamConsumer = self.reader_config().create().map_err(|err| {
            SinkError::permanent("cannot create the kafka reconciliation reader").with_source(err)
        })?;
        let result = read(&reader, &ranges, self.timeout, owns_key).await;
        // Closing a consumer blocks until its threads end.
        blocking(move || drop(reader)).await?;
        let ids = result?;
        let records: i64 = ranges.iter().map(|r| r.end - r.start).sum();
        info!(
            topic_partitions = ranges.len(),
            offsets = records,
            found = ids.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kafka tail scanned"
        );
        Ok(ids)
    }

    /// For offsets and timestamps: read_uncommitted, so that the high watermark and the
    /// offset lookups are not bounded by other partitions' open transactions.
    fn lookup_config(&self) -> ClientConfig {
        let mut config = self.base.clone();
        config
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false");
        config
    }

    fn reader_config(&self) -> ClientConfig {
        let mut config = self.base.clone();
        config
            .set("isolation.level", "read_committed")
            .set("group.id", "ferry-reconcile")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        config
    }
}

/// Finds the topic-partitions to read and the offsets to read between. Blocks.
fn plan(
    config: &ClientConfig,
    template: &TopicTemplate,
    since_ms: Option<i64>,
    timeout: Duration,
) -> Result<Vec<Range>, SinkError> {
    let lookup: BaseConsumer = config.create().map_err(|err| {
        SinkError::permanent("cannot create the kafka reconciliation client").with_source(err)
    })?;
    let metadata = lookup
        .fetch_metadata(None, timeout)
        .map_err(|err| SinkError::retryable("cannot list kafka topics").with_source(err))?;
    let mut ranges = Vec::new();
    for topic in metadata.topics() {
        if topic.name().starts_with("__") || !template.matches(topic.name()) {
            continue;
        }
        for partition in topic.partitions() {
            let (low, high) = lookup
                .fetch_watermarks(topic.name(), partition.id(), timeout)
                .map_err(|err| {
                    SinkError::retryable(format!(
                        "cannot read the offsets of {}[{}]",
                        topic.name(),
                        partition.id()
                    ))
                    .with_source(err)
                })?;
            if high > low {
                ranges.push(Range {
                    topic: topic.name().to_owned(),
                    partition: partition.id(),
                    start: low,
                    end: high,
                });
            }
        }
    }
    if let (Some(since_ms), false) = (since_ms, ranges.is_empty()) {
        let mut query = TopicPartitionList::with_capacity(ranges.len());
        for range in &ranges {
            query
                .add_partition_offset(&range.topic, range.partition, Offset::Offset(since_ms))
                .map_err(|err| {
                    SinkError::retryable("cannot build the offset lookup").with_source(err)
                })?;
        }
        let found = lookup.offsets_for_times(query, timeout).map_err(|err| {
            SinkError::retryable("cannot look kafka offsets up by timestamp").with_source(err)
        })?;
        for range in &mut ranges {
            let element = found
                .find_partition(&range.topic, range.partition)
                .ok_or_else(|| {
                    SinkError::retryable(format!(
                        "no offset lookup answer for {}[{}]",
                        range.topic, range.partition
                    ))
                })?;
            element.error().map_err(|err| {
                SinkError::retryable(format!(
                    "cannot look up offsets of {}[{}] by timestamp",
                    range.topic, range.partition
                ))
                .with_source(err)
            })?;
            range.start = match element.offset() {
                Offset::Offset(offset) => offset.max(range.start),
                // No record at or after the timestamp.
                _ => range.end,
            };
        }
        ranges.retain(|range| range.start < range.end);
    }
    // Closing blocks; this runs on the blocking pool already.
    drop(lookup);
    Ok(ranges)
}

/// Reads every range in read_committed and collects the owned ids. Done when each
/// topic-partition's position (which moves past transaction markers and aborted records)
/// reaches its end; fails if positions stop moving for `timeout`, e.g. while another
/// partition's open transaction holds the last stable offset back.
async fn read(
    reader: &StreamConsumer,
    ranges: &[Range],
    timeout: Duration,
    owns_key: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<Uuid>, SinkError> {
    let mut assignment = TopicPartitionList::with_capacity(ranges.len());
    for range in ranges {
        assignment
            .add_partition_offset(&range.topic, range.partition, Offset::Offset(range.start))
            .map_err(|err| SinkError::retryable("cannot build the assignment").with_source(err))?;
    }
    reader.assign(&assignment).map_err(|err| {
        SinkError::retryable("cannot assign the reconciliation reader").with_source(err)
    })?;
    let mut ids = HashSet::new();
    let mut last_progress = Instant::now();
    let mut lagging = behind(reader, ranges)?;
    while !lagging.is_empty() {
        match tokio::time::timeout(POLL_INTERVAL, reader.recv()).await {
            Ok(Ok(record)) => {
                last_progress = Instant::now();
                if let Some(id) = owned_id(&record, owns_key) {
                    ids.insert(id);
                }
                continue;
            }
            Ok(Err(err)) => {
                return Err(SinkError::retryable("reading kafka for reconciliation failed")
                    .with_source(err));
            }
            Err(_idle) => {}
        }
        let now_lagging = behind(reader, ranges)?;
        if now_lagging != lagging {
            last_progress = Instant::now();
            lagging = now_lagging;
        } else if last_progress.elapsed() > timeout {
            let (range, position) = &lagging[0];
            return Err(SinkError::retryable(format!(
                "reconciliation stopped at {}[{}] offset {position} of {}: an open transaction \
                 (another partition's, or one the broker has not timed out yet) holds committed \
                 records back",
                range.topic, range.partition, range.end
            )));
        }
    }
    Ok(ids.into_iter().collect())
}

/// The ranges whose position is still short of their end, with that position.
fn behind<'r>(
    reader: &StreamConsumer,
    ranges: &'r [Range],
) -> Result<Vec<(&'r Range, i64)>, SinkError> {
    let positions = reader.position().map_err(|err| {
        SinkError::retryable("cannot read the reconciliation positions").with_source(err)
    })?;
    Ok(ranges
        .iter()
        .filter_map(|range| {
            let position = positions
                .find_partition(&range.topic, range.partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
                .unwrap_or(range.start);
            (position < range.end).then_some((range, position))
        })
        .collect())
}

/// The message id of a record of the partition: its key is the partition key (the
/// `ce_partitionkey` header when the key is missing), its id the `ce_id` header.
fn owned_id(record: &BorrowedMessage<'_>, owns_key: &(dyn Fn(&str) -> bool + Sync)) -> Option<Uuid> {
    let headers = record.headers()?;
    let header = |attribute: &str| {
        headers.iter().find_map(|h| {
            let name = h.key.strip_prefix(CE_PREFIX)?;
            (name == attribute)
                .then_some(h.value)
                .flatten()
                .and_then(|v| std::str::from_utf8(v).ok())
        })
    };
    let key = match record.key() {
        Some(key) => std::str::from_utf8(key).ok()?,
        None => header(ext::PARTITION_KEY)?,
    };
    if !owns_key(key) {
        return None;
    }
    Uuid::parse_str(header("id")?).ok()
}
