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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;
use tracing::{debug, info};
use uuid::Uuid;

use ferry_core::SinkError;
use ferry_core::cloudevents::ext;

use super::producer::{CE_PREFIX, blocking};
use super::read::{CommittedReader, TopicPartition, lookup_client};
use super::topic::TopicTemplate;

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

/// The offsets to read: from each topic-partition's start to its end.
#[derive(Debug, Default)]
struct Plan {
    starts: Vec<(TopicPartition, i64)>,
    ends: HashMap<TopicPartition, i64>,
}

impl TailScan {
    /// The ids of committed records whose partition key `owns_key` accepts.
    pub(crate) async fn committed_ids(
        self,
        owns_key: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Uuid>, SinkError> {
        let started = Instant::now();
        let lookup = Arc::new(lookup_client(&self.base)?);
        let (client, template, since_ms, timeout) = (
            Arc::clone(&lookup),
            self.template.clone(),
            self.since_ms,
            self.timeout,
        );
        let plan = blocking(move || plan(&client, &template, since_ms, timeout)).await??;
        if plan.starts.is_empty() {
            debug!("nothing beyond the checkpoint in kafka");
            blocking(move || drop(lookup)).await?;
            return Ok(Vec::new());
        }
        let offsets: i64 = plan
            .starts
            .iter()
            .map(|(tp, start)| plan.ends[tp] - start)
            .sum();
        let reader = CommittedReader::assign(&self.base, lookup, plan.starts, self.timeout).await?;
        let mut ids = HashSet::new();
        let result = reader
            .read_raw_to(&plan.ends, |record| {
                if let Some(id) = owned_id(record, owns_key) {
                    ids.insert(id);
                }
            })
            .await;
        reader.close().await;
        result?;
        info!(
            topic_partitions = plan.ends.len(),
            offsets,
            found = ids.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kafka tail scanned"
        );
        Ok(ids.into_iter().collect())
    }
}

/// Finds the topic-partitions the template can have written to and the offsets to read
/// between. Blocks.
fn plan(
    lookup: &BaseConsumer,
    template: &TopicTemplate,
    since_ms: Option<i64>,
    timeout: Duration,
) -> Result<Plan, SinkError> {
    let metadata = lookup
        .fetch_metadata(None, timeout)
        .map_err(|err| SinkError::retryable("cannot list kafka topics").with_source(err))?;
    let mut plan = Plan::default();
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
                let tp = (topic.name().to_owned(), partition.id());
                plan.starts.push((tp.clone(), low));
                plan.ends.insert(tp, high);
            }
        }
    }
    if let (Some(since_ms), false) = (since_ms, plan.starts.is_empty()) {
        let mut query = TopicPartitionList::with_capacity(plan.starts.len());
        for ((topic, partition), _) in &plan.starts {
            query
                .add_partition_offset(topic, *partition, Offset::Offset(since_ms))
                .map_err(|err| {
                    SinkError::retryable("cannot build the offset lookup").with_source(err)
                })?;
        }
        let found = lookup.offsets_for_times(query, timeout).map_err(|err| {
            SinkError::retryable("cannot look kafka offsets up by timestamp").with_source(err)
        })?;
        for ((topic, partition), start) in &mut plan.starts {
            let element = found.find_partition(topic, *partition).ok_or_else(|| {
                SinkError::retryable(format!("no offset lookup answer for {topic}[{partition}]"))
            })?;
            element.error().map_err(|err| {
                SinkError::retryable(format!(
                    "cannot look up offsets of {topic}[{partition}] by timestamp"
                ))
                .with_source(err)
            })?;
            *start = match element.offset() {
                Offset::Offset(offset) => offset.max(*start),
                // No record at or after the timestamp.
                _ => plan.ends[&(topic.clone(), *partition)],
            };
        }
        let ends = &plan.ends;
        plan.starts.retain(|(tp, start)| *start < ends[tp]);
        let kept: HashSet<&TopicPartition> = plan.starts.iter().map(|(tp, _)| tp).collect();
        let ends = plan
            .ends
            .iter()
            .filter(|(tp, _)| kept.contains(tp))
            .map(|(tp, end)| (tp.clone(), *end))
            .collect();
        plan.ends = ends;
    }
    Ok(plan)
}

/// The message id of a record of the partition, read without decoding the rest: the key
/// is the partition key (the `ce_partitionkey` header when the key is missing), the id is
/// the `ce_id` header.
fn owned_id(
    record: &BorrowedMessage<'_>,
    owns_key: &(dyn Fn(&str) -> bool + Sync),
) -> Option<Uuid> {
    let headers = record.headers()?;
    let attribute = |name: &str| {
        headers.iter().find_map(|h| {
            (h.key.strip_prefix(CE_PREFIX)? == name)
                .then_some(h.value?)
                .and_then(|v| std::str::from_utf8(v).ok())
        })
    };
    let key = match record.key() {
        Some(key) => std::str::from_utf8(key).ok()?,
        None => attribute(ext::PARTITION_KEY)?,
    };
    if !owns_key(key) {
        return None;
    }
    Uuid::parse_str(attribute("id")?).ok()
}
