//! The sink contract: where the relay publishes messages.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::lease::Lease;
use crate::message::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure to publish; carries the retry decision.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    message: String,
    kind: SinkErrorKind,
    #[source]
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkErrorKind {
    Retryable,
    Permanent,
    Fenced,
}

impl SinkError {
    /// A failure that may pass on retry (timeout, connection lost, broker busy).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(message, SinkErrorKind::Retryable)
    }

    /// A rejection that will repeat forever for this message (too large, not routable,
    /// refused by the broker's rules): the partition blocks until an operator acts.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(message, SinkErrorKind::Permanent)
    }

    /// The sink can no longer publish this partition under the current lease: a newer
    /// owner fenced it (Kafka producer epoch), or the sink no longer knows what it
    /// committed. The relay stops the partition at once, marks nothing more and releases
    /// the lease as unclean, so that the next owner reconciles.
    pub fn fenced(message: impl Into<String>) -> Self {
        Self::new(message, SinkErrorKind::Fenced)
    }

    fn new(message: impl Into<String>, kind: SinkErrorKind) -> Self {
        Self {
            message: message.into(),
            kind,
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == SinkErrorKind::Retryable
    }

    pub fn is_fenced(&self) -> bool {
        self.kind == SinkErrorKind::Fenced
    }
}

/// The broker acknowledged a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// A monotonic sink position (NATS: stream sequence; Kafka: record timestamp in
    /// milliseconds), if the sink has one; recorded as the partition's checkpoint to bound
    /// a later reconciliation.
    pub position: Option<u64>,
}

/// Completes `outcomes` to one per message of a batch of `batch_len` after the sink
/// stopped at a failure: what it did not send (sending past a failure would reorder) is
/// reported retryable, for the relay to publish again.
pub fn report_unsent(outcomes: &mut Vec<Result<Delivery, SinkError>>, batch_len: usize) {
    outcomes.resize_with(batch_len, || {
        Err(SinkError::retryable(
            "not sent: an earlier message in the batch failed",
        ))
    });
}

/// What a new owner knows when it reconciles a partition taken over uncleanly.
#[derive(Clone, Copy)]
pub struct ReconcileRequest<'a> {
    pub partition: u32,
    /// The previous owner's last checkpoint: unmarked publishes lie beyond it.
    pub checkpoint: Option<u64>,
    /// How long ago the previous owner's lease expired.
    pub since_expiry: Duration,
    /// Whether a message with this partition key belongs to `partition`.
    pub owns_key: &'a (dyn Fn(&str) -> bool + Sync),
}

impl std::fmt::Debug for ReconcileRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconcileRequest")
            .field("partition", &self.partition)
            .field("checkpoint", &self.checkpoint)
            .field("since_expiry", &self.since_expiry)
            .finish_non_exhaustive()
    }
}

/// A destination for messages.
///
/// Contract: delivery is at least once; the relay re-publishes a message whose ack it did
/// not see, with the same id. `publish` sends the batch in order and waits for the acks of
/// all of them (pipelined, never one round trip per message); a sink must never ack a
/// message the broker has not durably accepted. Sinks with broker-side dedup set it from
/// the message id. Different partitions' batches may be published concurrently.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Publishes `batch` in order; returns one outcome per message, in the same order.
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>>;

    /// Ids of messages of `request.partition` that the broker already holds beyond the
    /// checkpoint, so the new owner marks them instead of sending them again (G4). Sinks
    /// whose broker dedup covers the gap, or that cannot read back, return an empty list.
    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError>;

    /// Called when the relay has acquired `lease`, before it reconciles or publishes the
    /// partition; retried on error while the lease lasts. A sink that fences by producer
    /// claims the partition here (Kafka: `init_transactions` with the partition's
    /// transactional id), so that whatever the previous owner left open is settled before
    /// the tail is read; one that fences by broker state forgets what it knew under an
    /// earlier lease (NATS subject sequences). The default does nothing.
    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        let _ = lease;
        Ok(())
    }

    /// Called once the relay has stopped working `partition` (released, lost or fenced),
    /// after its last publish there. The default does nothing.
    async fn close_partition(&self, partition: u32) {
        let _ = partition;
    }

    /// Whether the broker answers now, for readiness probes: cheap (a connection's state,
    /// at most one bounded round trip), never on the publish path. An error says what is
    /// unreachable. The default, for sinks with no connection to lose, says yes.
    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Flushes and closes; called once, after the last publish.
    async fn shutdown(&self) {}
}
