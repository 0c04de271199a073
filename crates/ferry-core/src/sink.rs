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
    retryable: bool,
    #[source]
    source: Option<BoxError>,
}

impl SinkError {
    /// A failure that may pass on retry (timeout, connection lost, broker busy).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// A rejection that will repeat forever for this message (too large, not routable,
    /// refused by the broker's rules): the partition blocks until an operator acts.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

/// The broker acknowledged a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// A monotonic sink position (NATS: stream sequence), if the sink has one; recorded as
    /// the partition's checkpoint to bound a later reconciliation.
    pub position: Option<u64>,
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

    /// Called when this relay starts owning `lease.partition`, before it reconciles or
    /// publishes anything under the lease: sinks that fence per owner (a transactional
    /// producer, NATS subject sequences) forget what they knew under an earlier lease.
    /// An error is retried with backoff while the lease lasts.
    async fn acquired(&self, lease: &Lease) -> Result<(), SinkError> {
        let _ = lease;
        Ok(())
    }

    /// Ids of messages of `request.partition` that the broker already holds beyond the
    /// checkpoint, so the new owner marks them instead of sending them again (G4). Sinks
    /// whose broker dedup covers the gap, or that cannot read back, return an empty list.
    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError>;

    /// Flushes and closes; called once, after the last publish.
    async fn shutdown(&self) {}
}
