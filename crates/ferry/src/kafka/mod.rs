//! The Kafka sink (docs/DESIGN.md §3, §6): exactly once into Kafka, fenced by producer epoch.
//!
//! Each record goes to the topic rendered from `topic_template`, with the partition key as
//! its key (so one key stays in one Kafka partition, in order), the payload untouched, and
//! the CloudEvents Kafka binding's `ce_*` headers plus `content-type`.
//!
//! Every owned outbox partition N has its own transactional producer, `<prefix>-pN`
//! (idempotent, `acks=all`). [`Sink::open_partition`] runs its `init_transactions` when the
//! relay acquires the partition: that fences every earlier producer of the partition (a
//! paused or partitioned previous owner can no longer commit anything) and settles the
//! transaction it left open. A relay batch is one Kafka transaction, acknowledged only once
//! committed; a producer that finds itself fenced, or no longer knows what it committed,
//! reports [`SinkError::fenced`] and is dropped, and the relay gives the partition up.
//!
//! Each committed batch reports its records' timestamp as [`Delivery::position`], which
//! the relay records as the partition's checkpoint. After an unclean takeover
//! [`Sink::reconcile`] reads, in read_committed, the records from that timestamp (less
//! `reconcile_margin_secs`) up to the high watermark, and returns the ids of the
//! partition's messages already committed, so they are marked instead of sent again.

mod config;
mod producer;
mod read;
mod reconcile;
mod security;
mod topic;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tracing::{debug, info, warn};
use uuid::Uuid;

use ferry_core::ErrorChain;
use ferry_core::cloudevents::Source;
use ferry_core::{Delivery, Lease, Message, ReconcileRequest, Sink, SinkError, report_unsent};

pub use config::{InvalidKafkaConfig, KafkaSinkConfig};
use producer::{PartitionProducer, TxnFailure, blocking};
pub use read::{CommittedReader, CommittedRecord, TopicPartition};
use reconcile::TailScan;
use security::ProbeContext;
pub use security::{SaslMechanism, SecurityProtocol};
use topic::TopicTemplate;

/// The longest the first connection check waits, so that a relay started while the
/// brokers are down reports it soon and keeps retrying.
const CONNECT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to Kafka in one transaction per batch; see the module docs.
pub struct KafkaSink {
    /// Producer settings, without the transactional id.
    producer_config: ClientConfig,
    /// Brokers and the user's librdkafka settings, for the reconciliation clients.
    base_config: ClientConfig,
    template: TopicTemplate,
    source: Source,
    transactional_id_prefix: String,
    timeout: Duration,
    reconcile_margin: Duration,
    /// Records a producer enqueues ahead of the oldest delivery report.
    delivery_window: usize,
    /// `Some((partitions, replication factor))` when missing topics are created; a
    /// replication factor of -1 asks for the broker's default.
    create_topics: Option<(i32, i32)>,
    /// Shared with the blocking pool for metadata requests (`check`).
    admin: Arc<AdminClient<DefaultClientContext>>,
    producers: Mutex<HashMap<u32, Arc<PartitionProducer>>>,
    /// Topics known to exist, so that each is created (or found) once.
    known_topics: Mutex<HashSet<String>>,
    brokers: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.brokers)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Validates `config` and checks once that the brokers answer (no retry loop: an
    /// unreachable cluster is a retryable error naming it, for the caller to back off on).
    pub async fn connect(config: &KafkaSinkConfig) -> Result<Self, SinkError> {
        let checked = config
            .check()
            .map_err(|err| SinkError::permanent(err.to_string()).with_source(err))?;
        let brokers = config.brokers.trim().to_owned();
        let admin: AdminClient<DefaultClientContext> = checked.base.create().map_err(|err| {
            SinkError::permanent("cannot create the kafka admin client").with_source(err)
        })?;
        let mut probe_config = checked.base.clone();
        probe_config.set("client.id", "ferry-probe");
        let probe_timeout = checked.timeout.min(CONNECT_PROBE_TIMEOUT);
        let probed = blocking(move || {
            use rdkafka::producer::Producer as _;
            let probe: rdkafka::producer::BaseProducer<ProbeContext> =
                probe_config.create_with_context(ProbeContext::default())?;
            let metadata = probe.client().fetch_metadata(None, probe_timeout);
            if metadata.is_err() {
                // Serves the error events queued meanwhile (a refused certificate among them).
                probe.poll(Duration::from_millis(100));
            }
            let refused = probe.context().certificate_refused();
            Ok::<_, rdkafka::error::KafkaError>((metadata.map(|m| m.brokers().len()), refused))
        })
        .await?
        .map_err(|err| {
            SinkError::permanent("cannot create the kafka connection probe").with_source(err)
        })?;
        let broker_count = match probed {
            (Ok(count), _) => count,
            (Err(_), Some(reason)) => {
                let message =
                    crate::tls::certificate_failure("kafka", &brokers, "sink.tls_ca_file");
                return Err(SinkError::permanent(format!("{message}: {reason}")));
            }
            (Err(err), None) => {
                return Err(
                    SinkError::retryable(format!("cannot reach kafka at {brokers}"))
                        .with_source(err),
                );
            }
        };
        info!(brokers = %brokers, broker_count, prefix = %config.transactional_id_prefix, "kafka sink connected");

        let mut producer_config = checked.base.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                checked.timeout.as_millis().to_string(),
            )
            .set(
                "transaction.timeout.ms",
                (config.transaction_timeout_secs * 1000).to_string(),
            );
        Ok(Self {
            producer_config,
            base_config: checked.base,
            template: checked.template,
            source: config
                .source
                .clone()
                .map_or(Source::PerAggregateType, Source::Fixed),
            transactional_id_prefix: config.transactional_id_prefix.clone(),
            timeout: checked.timeout,
            reconcile_margin: checked.reconcile_margin,
            delivery_window: checked.delivery_window,
            create_topics: config.create_topics.then(|| {
                (
                    // Validation caps both far below i32::MAX.
                    config.topic_partitions as i32,
                    config.topic_replication_factor.map_or(-1, i32::from),
                )
            }),
            admin: Arc::new(admin),
            producers: Mutex::default(),
            known_topics: Mutex::default(),
            brokers,
        })
    }

    /// The transactional id of outbox partition `partition`.
    pub fn transactional_id(&self, partition: u32) -> String {
        format!("{}-p{partition}", self.transactional_id_prefix)
    }

    fn producers(&self) -> MutexGuard<'_, HashMap<u32, Arc<PartitionProducer>>> {
        // The map stays consistent even if a holder panicked: every change is one call.
        self.producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the partition's producer if it is still `producer`, and closes it on the
    /// blocking pool (closing waits for librdkafka's threads).
    async fn retire(&self, partition: u32, producer: Arc<PartitionProducer>) {
        {
            let mut producers = self.producers();
            if producers
                .get(&partition)
                .is_some_and(|current| Arc::ptr_eq(current, &producer))
            {
                producers.remove(&partition);
            }
        }
        if blocking(move || drop(producer)).await.is_err() {
            warn!(partition, "closing a kafka producer failed");
        }
    }

    /// Each message's topic, up to the first message that cannot be published (its topic
    /// is invalid or cannot be created), which is returned with the reason.
    async fn topics(&self, batch: &[Message]) -> (Vec<String>, Option<(usize, SinkError)>) {
        let mut topics = Vec::with_capacity(batch.len());
        let mut stop = None;
        for (index, message) in batch.iter().enumerate() {
            match self.template.render(message) {
                Ok(topic) => topics.push(topic),
                Err(reason) => {
                    stop = Some((
                        index,
                        SinkError::permanent(format!("message {}: {reason}", message.id)),
                    ));
                    break;
                }
            }
        }
        for (topic, error) in self.ensure_topics(&topics).await {
            if let Some(index) = topics.iter().position(|t| *t == topic)
                && stop.as_ref().is_none_or(|(first, _)| index < *first)
            {
                stop = Some((index, error));
            }
        }
        if let Some((index, _)) = &stop {
            topics.truncate(*index);
        }
        (topics, stop)
    }

    /// Creates the topics not known to exist yet; returns those that could not be.
    async fn ensure_topics(&self, topics: &[String]) -> Vec<(String, SinkError)> {
        let Some((partitions, replication)) = self.create_topics else {
            return Vec::new();
        };
        let missing: Vec<&str> = {
            let known = self
                .known_topics
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let unique: HashSet<&str> = topics
                .iter()
                .map(String::as_str)
                .filter(|t| !known.contains(*t))
                .collect();
            unique.into_iter().collect()
        };
        if missing.is_empty() {
            return Vec::new();
        }
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(replication)))
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout));
        let results = match self.admin.create_topics(&new_topics, &options).await {
            Ok(results) => results,
            Err(err) => {
                let reason = format!("cannot create kafka topics: {err}");
                return missing
                    .iter()
                    .map(|t| ((*t).to_owned(), SinkError::retryable(reason.clone())))
                    .collect();
            }
        };
        let mut failed = Vec::new();
        let mut known = self
            .known_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for result in results {
            match result {
                Ok(topic) => {
                    info!(topic = %topic, partitions, "kafka topic created");
                    known.insert(topic);
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    debug!(topic = %topic, "kafka topic exists");
                    known.insert(topic);
                }
                Err((topic, code)) => {
                    let reason = format!("cannot create kafka topic {topic}: {code}");
                    let error = match code {
                        RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::PolicyViolation
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidConfig => SinkError::permanent(format!(
                            "{reason} (check topic_partitions, topic_replication_factor and the \
                             broker's permissions, or create it yourself and set create_topics = false)"
                        )),
                        _ => SinkError::retryable(reason),
                    };
                    failed.push((topic, error));
                }
            }
        }
        failed
    }
}

#[async_trait]
impl Sink for KafkaSink {
    /// Publishes the batch in one transaction and acks it once committed. A message Kafka
    /// refuses for good is reported as such, after the messages before it are committed in
    /// a transaction of their own; any other failure aborts the transaction and fails the
    /// whole batch (nothing of it is visible), or, when the producer is fenced or its state
    /// unknown, fails it as fenced and closes the producer.
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let Some(partition) = batch.first().map(|m| m.partition) else {
            return Vec::new();
        };
        let Some(producer) = self.producers().get(&partition).cloned() else {
            let reason = format!(
                "kafka partition producer {} is not open: the partition was not acquired or was \
                 fenced",
                self.transactional_id(partition)
            );
            return batch
                .iter()
                .map(|_| Err(SinkError::fenced(reason.clone())))
                .collect();
        };
        let (topics, mut stop) = self.topics(batch).await;
        let mut end = topics.len();
        let mut outcomes = Vec::with_capacity(batch.len());
        while end > 0 {
            match producer
                .transaction(&batch[..end], &topics[..end], &self.source)
                .await
            {
                Ok(timestamp) => {
                    let position = u64::try_from(timestamp).ok();
                    outcomes.extend((0..end).map(|_| Ok(Delivery { position })));
                    break;
                }
                Err(TxnFailure::Message { index, error })
                    if !error.is_retryable() && !error.is_fenced() =>
                {
                    // Commit what comes before the refused message, then stop at it.
                    stop = Some((index, error));
                    end = index;
                }
                Err(TxnFailure::Message { error, .. } | TxnFailure::Transaction(error)) => {
                    if error.is_fenced() {
                        warn!(partition, transactional_id = producer.transactional_id(), error = %ErrorChain(&error), "kafka producer fenced or unusable: closing it");
                        self.retire(partition, producer).await;
                    }
                    return all_failed(batch.len(), error);
                }
            }
        }
        if let Some((_, error)) = stop {
            outcomes.push(Err(error));
        }
        report_unsent(&mut outcomes, batch.len());
        outcomes
    }

    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        let margin_ms = i64::try_from(self.reconcile_margin.as_millis()).unwrap_or(i64::MAX);
        let scan = TailScan {
            base: self.base_config.clone(),
            template: self.template.clone(),
            since_ms: request
                .checkpoint
                .map(|checkpoint| i64::try_from(checkpoint).unwrap_or(i64::MAX) - margin_ms),
            timeout: self.timeout,
        };
        scan.committed_ids(request.owns_key).await
    }

    /// Creates the partition's transactional producer and runs `init_transactions`,
    /// fencing the previous owner's producer.
    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        let partition = lease.partition;
        let transactional_id = self.transactional_id(partition);
        let mut config = self.producer_config.clone();
        config.set("transactional.id", &transactional_id);
        if config.get("client.id").is_none() {
            config.set("client.id", format!("ferry-{transactional_id}"));
        }
        let (timeout, window) = (self.timeout, self.delivery_window);
        let id = transactional_id.clone();
        let producer = Arc::new(
            blocking(move || PartitionProducer::init(&config, id, timeout, window)).await??,
        );
        let previous = self.producers().insert(partition, producer);
        if let Some(previous) = previous {
            self.retire(partition, previous).await;
        }
        info!(partition, epoch = lease.epoch, transactional_id = %transactional_id, "kafka producer initialised; earlier producers of the partition are fenced");
        Ok(())
    }

    async fn close_partition(&self, partition: u32) {
        let producer = self.producers().get(&partition).cloned();
        if let Some(producer) = producer {
            self.retire(partition, producer).await;
            debug!(partition, "kafka producer closed");
        }
    }

    /// One metadata request to the cluster, bounded by the connect probe's timeout.
    async fn check(&self) -> Result<(), SinkError> {
        let admin = Arc::clone(&self.admin);
        let timeout = self.timeout.min(CONNECT_PROBE_TIMEOUT);
        blocking(move || admin.inner().fetch_metadata(None, timeout).map(drop))
            .await?
            .map_err(|err| {
                SinkError::retryable(format!("cannot reach kafka at {}", self.brokers))
                    .with_source(err)
            })
    }

    async fn shutdown(&self) {
        let producers: Vec<(u32, Arc<PartitionProducer>)> = self.producers().drain().collect();
        for (partition, producer) in producers {
            self.retire(partition, producer).await;
        }
    }
}

/// Every message failed with `error`'s kind; the first carries `error` itself.
fn all_failed(len: usize, error: SinkError) -> Vec<Result<Delivery, SinkError>> {
    let (fenced, retryable) = (error.is_fenced(), error.is_retryable());
    let mut outcomes = Vec::with_capacity(len);
    outcomes.push(Err(error));
    outcomes.resize_with(len, || {
        let reason = "not committed: the batch's transaction failed";
        Err(if fenced {
            SinkError::fenced(reason)
        } else if retryable {
            SinkError::retryable(reason)
        } else {
            SinkError::permanent(reason)
        })
    });
    outcomes
}
