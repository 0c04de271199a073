//! One transactional producer per owned outbox partition, and one Kafka transaction per
//! relay batch.
//!
//! librdkafka's transactional calls block for up to their timeout, so they run on tokio's
//! blocking pool; records are enqueued without blocking and their delivery reports awaited
//! as futures. A producer whose state is no longer known (fenced by a newer owner, a fatal
//! error, a commit whose outcome is unknown) is never used again: the error says fenced,
//! the relay gives the partition up, and the next owner's `init_transactions` settles
//! whatever was left open before it reconciles.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use ferry_core::cloudevents::{Source, binary_attributes, user_headers};
use ferry_core::message::CONTENT_TYPE_HEADER;
use ferry_core::{Message, SinkError};

/// The Kafka binding's prefix for CloudEvents attributes.
pub(crate) const CE_PREFIX: &str = "ce_";

/// Commit attempts after a retriable failure before the outcome counts as unknown.
const COMMIT_ATTEMPTS: usize = 3;

/// How a transaction failed.
#[derive(Debug)]
pub(crate) enum TxnFailure {
    /// Message `index` of the batch was refused; the transaction was aborted, so nothing
    /// of the batch is visible.
    Message { index: usize, error: SinkError },
    /// The transaction as a whole failed; `error` says whether retrying can help, or that
    /// the producer is fenced (nothing it sends is ever visible again).
    Transaction(SinkError),
}

impl TxnFailure {
    fn is_fenced(&self) -> bool {
        match self {
            Self::Message { error, .. } | Self::Transaction(error) => error.is_fenced(),
        }
    }
}

/// The transactional producer of one outbox partition.
pub(crate) struct PartitionProducer {
    producer: FutureProducer,
    transactional_id: String,
    timeout: Duration,
    /// Records enqueued ahead of the oldest delivery report not yet received.
    window: usize,
    /// Record timestamps never go back, even if the wall clock does: the checkpoint is a
    /// timestamp, and a later batch must not look older than an earlier one.
    last_timestamp: AtomicI64,
}

impl std::fmt::Debug for PartitionProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionProducer")
            .field("transactional_id", &self.transactional_id)
            .finish_non_exhaustive()
    }
}

impl PartitionProducer {
    /// Creates the producer and runs `init_transactions`, which fences every earlier
    /// producer with the same transactional id and settles (commits or aborts) the
    /// transaction it left open. Blocks: call it on the blocking pool.
    pub(crate) fn init(
        config: &ClientConfig,
        transactional_id: String,
        timeout: Duration,
        window: usize,
    ) -> Result<Self, SinkError> {
        let producer: FutureProducer = config.create().map_err(|err| {
            SinkError::permanent(format!(
                "cannot create the kafka producer {transactional_id}"
            ))
            .with_source(err)
        })?;
        producer.init_transactions(timeout).map_err(|err| {
            let error = match transaction_error(&err) {
                Some(txn) if txn.is_retriable() || !txn.is_fatal() => {
                    SinkError::retryable(format!("init_transactions for {transactional_id} failed"))
                }
                _ => SinkError::permanent(format!(
                    "init_transactions for {transactional_id} was refused"
                )),
            };
            error.with_source(err)
        })?;
        Ok(Self {
            producer,
            transactional_id,
            timeout,
            window: window.max(1),
            last_timestamp: AtomicI64::new(0),
        })
    }

    pub(crate) fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Publishes `messages` to `topics` (one per message) in one transaction. Returns the
    /// records' highest timestamp, in milliseconds, once the transaction is committed.
    pub(crate) async fn transaction(
        &self,
        messages: &[Message],
        topics: &[String],
        source: &Source,
    ) -> Result<i64, TxnFailure> {
        let begin = self.producer.clone();
        blocking(move || begin.begin_transaction())
            .await
            .map_err(TxnFailure::Transaction)?
            .map_err(|err| TxnFailure::Transaction(self.state_error("begin", err)))?;
        let timestamp = self.next_timestamp();
        let deadline = Instant::now() + self.timeout;
        // At most `window` records wait in librdkafka for their delivery reports: each
        // holds its payload, headers and a share of a produce request there, on every
        // owned partition at once.
        let mut deliveries = VecDeque::with_capacity(self.window.min(messages.len()));
        let mut records = messages.iter().zip(topics).enumerate();
        let mut position = timestamp;
        let failure = loop {
            if deliveries.len() < self.window
                && let Some((index, (message, topic))) = records.next()
            {
                match self
                    .enqueue(message, topic, timestamp, source, deadline)
                    .await
                {
                    Ok(delivery) => deliveries.push_back((index, delivery)),
                    Err(error) => break Some(TxnFailure::Message { index, error }),
                }
                continue;
            }
            // The window is full or every record is enqueued: settle the oldest.
            let Some((index, delivery)) = deliveries.pop_front() else {
                break None;
            };
            match self
                .delivered(&messages[index], index, delivery, deadline)
                .await
            {
                Ok(at) => position = position.max(at),
                Err(failure) => break Some(failure),
            }
        };
        match failure {
            None => self.commit().await.map(|()| position),
            Some(failure) if failure.is_fenced() => Err(failure),
            Some(failure) => match self.abort().await {
                Ok(()) => Err(failure),
                Err(fenced) => Err(TxnFailure::Transaction(fenced)),
            },
        }
    }

    /// Waits until `deadline` for the delivery report of message `index`; returns the
    /// record's timestamp.
    async fn delivered(
        &self,
        message: &Message,
        index: usize,
        delivery: DeliveryFuture,
        deadline: Instant,
    ) -> Result<i64, TxnFailure> {
        match tokio::time::timeout_at(deadline, delivery).await {
            Ok(Ok(Ok(delivered))) => Ok(delivered.timestamp.to_millis().unwrap_or(0)),
            Ok(Ok(Err((err, _)))) => Err(TxnFailure::Message {
                index,
                error: delivery_error(message, err),
            }),
            Ok(Err(_canceled)) => Err(TxnFailure::Transaction(SinkError::retryable(
                "the kafka producer went away before the delivery report",
            ))),
            Err(_elapsed) => Err(TxnFailure::Message {
                index,
                error: SinkError::retryable(format!(
                    "no delivery report from kafka within {:?}",
                    self.timeout
                )),
            }),
        }
    }

    /// Enqueues one record without blocking, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        message: &Message,
        topic: &str,
        timestamp: i64,
        source: &Source,
        deadline: Instant,
    ) -> Result<DeliveryFuture, SinkError> {
        let mut record = FutureRecord::to(topic)
            .key(message.partition_key.as_bytes())
            .payload(&message.payload[..])
            .timestamp(timestamp)
            .headers(headers(message, source));
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Err(delivery_error(message, err)),
            }
        }
    }

    async fn commit(&self) -> Result<(), TxnFailure> {
        let mut last = None;
        for _ in 0..COMMIT_ATTEMPTS {
            let (producer, timeout) = (self.producer.clone(), self.timeout);
            let result = blocking(move || producer.commit_transaction(timeout))
                .await
                .map_err(TxnFailure::Transaction)?;
            let err = match result {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            match transaction_error(&err) {
                Some(txn) if txn.txn_requires_abort() => {
                    let error = SinkError::retryable(format!(
                        "kafka refused to commit the transaction of {}",
                        self.transactional_id
                    ))
                    .with_source(err);
                    return match self.abort().await {
                        Ok(()) => Err(TxnFailure::Transaction(error)),
                        Err(fenced) => Err(TxnFailure::Transaction(fenced)),
                    };
                }
                Some(txn) if txn.is_retriable() && !txn.is_fatal() => last = Some(err),
                _ => return Err(TxnFailure::Transaction(self.state_error("commit", err))),
            }
        }
        // Whether the broker committed is unknown: only the next owner's
        // init_transactions settles it, and its reconciliation then finds what was.
        let mut error = SinkError::fenced(format!(
            "the commit of {} did not complete after {COMMIT_ATTEMPTS} attempts; its outcome is \
             unknown, so the partition is given up for its next owner to reconcile",
            self.transactional_id
        ));
        if let Some(err) = last {
            error = error.with_source(err);
        }
        Err(TxnFailure::Transaction(error))
    }

    /// Aborts the open transaction; an abort that fails leaves the producer in an unknown
    /// state, reported as fenced.
    async fn abort(&self) -> Result<(), SinkError> {
        let (producer, timeout) = (self.producer.clone(), self.timeout);
        match blocking(move || producer.abort_transaction(timeout)).await? {
            Ok(()) => Ok(()),
            Err(err) => Err(self.state_error("abort", err)),
        }
    }

    /// A failed transactional call that leaves the producer unusable: fenced by a newer
    /// owner, or in a state only a new producer can clear.
    fn state_error(&self, call: &str, err: KafkaError) -> SinkError {
        let fenced = transaction_error(&err).is_some_and(|txn| is_fencing(txn.code()));
        let message = if fenced {
            format!(
                "{} was fenced by a newer producer with the same transactional id (the \
                 partition's next owner)",
                self.transactional_id
            )
        } else {
            format!(
                "the {call} of a transaction of {} failed; the producer cannot be trusted any \
                 more, so the partition is given up for its next owner to reconcile",
                self.transactional_id
            )
        };
        SinkError::fenced(message).with_source(err)
    }

    fn next_timestamp(&self) -> i64 {
        let now = chrono::Utc::now().timestamp_millis();
        let previous = self.last_timestamp.fetch_max(now, Ordering::AcqRel);
        now.max(previous)
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| SinkError::retryable("a kafka client call failed to run").with_source(err))
}

fn transaction_error(err: &KafkaError) -> Option<&RDKafkaError> {
    match err {
        KafkaError::Transaction(txn) => Some(txn),
        _ => None,
    }
}

/// Error codes that mean a newer producer with the same transactional id exists.
fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionCoordinatorFenced
    )
}

/// Classifies a record the producer refused or the broker did not store.
fn delivery_error(message: &Message, err: KafkaError) -> SinkError {
    let code = err.rdkafka_error_code();
    let error = match code {
        Some(code) if is_fencing(code) || code == RDKafkaErrorCode::Fatal => {
            SinkError::fenced(format!(
                "message {} was refused: the producer is fenced or failed for good",
                message.id
            ))
        }
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord,
        ) => SinkError::permanent(format!(
            "message {} is too large or malformed for kafka (see message.max.bytes on the broker \
             and the producer)",
            message.id
        )),
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
            SinkError::permanent(format!(
                "the topic of message {} does not exist: create it, or set create_topics = true",
                message.id
            ))
        }
        Some(
            RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation,
        ) => SinkError::permanent(format!("kafka refuses the topic of message {}", message.id)),
        _ => SinkError::retryable(format!("kafka did not store message {}", message.id)),
    };
    error.with_source(err)
}

/// The record's headers: user headers first (those in the `ce_` namespace are left out, the
/// attributes own it), then the CloudEvents attributes as `ce_*`, then `content-type`.
fn headers(message: &Message, source: &Source) -> OwnedHeaders {
    let attributes = binary_attributes(message, source);
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + attributes.len() + 1);
    for (name, value) in user_headers(message) {
        let reserved = name
            .get(..CE_PREFIX.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(CE_PREFIX));
        if !reserved {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
    }
    let mut name = String::with_capacity(32);
    for (attribute, value) in attributes {
        name.clear();
        name.push_str(CE_PREFIX);
        name.push_str(attribute);
        headers = headers.insert(Header {
            key: &name,
            value: Some(value.as_ref()),
        });
    }
    headers.insert(Header {
        key: CONTENT_TYPE_HEADER,
        value: Some(message.content_type()),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use chrono::Utc;
    use rdkafka::message::Headers as _;
    use uuid::Uuid;

    use ferry_core::ReceivedMessage;

    use super::*;

    #[test]
    fn headers_carry_the_cloudevents_kafka_binding() {
        let mut message = Message {
            id: Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            version: 3,
            event_type: "order.paid".into(),
            payload: Bytes::from_static(b"{}"),
            headers: Default::default(),
            partition_key: "order/42".into(),
            partition: 1,
            created_at: Utc::now(),
            sequence: 9,
        };
        message
            .headers
            .insert("traceparent".into(), "00-abc-01".into());
        message.headers.insert("CE_id".into(), "spoofed".into());
        message
            .headers
            .insert(CONTENT_TYPE_HEADER.into(), "application/vnd.x+json".into());
        let headers = headers(&message, &Source::default());
        let pairs: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap_or_default().to_vec()).expect("utf-8"),
                )
            })
            .collect();
        let names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "traceparent",
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
                "ce_traceparent",
                "content-type"
            ]
        );
        let received = ReceivedMessage::from_binary(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            message.payload.clone(),
        )
        .expect("decodes");
        assert_eq!(received.id, message.id);
        assert_eq!(received.version, 3);
        assert_eq!(received.partition_key, "order/42");
        assert_eq!(
            pairs.last().map(|(_, v)| v.as_str()),
            Some("application/vnd.x+json")
        );
    }

    #[test]
    fn fencing_codes_are_recognised() {
        assert!(is_fencing(RDKafkaErrorCode::Fenced));
        assert!(is_fencing(RDKafkaErrorCode::ProducerFenced));
        assert!(is_fencing(RDKafkaErrorCode::InvalidProducerEpoch));
        assert!(!is_fencing(RDKafkaErrorCode::MessageTimedOut));
    }
}
