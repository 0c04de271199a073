//! The relay's sink, timed: the instant each message's publish returned acked is its
//! commit → broker-ack latency's end, measured where the relay learns of the ack.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use uuid::Uuid;

use ferry::{Delivery, Lease, Message, ReconcileRequest, Sink, SinkError};

use crate::check::Latencies;

/// A sink that records, for every message it publishes with an ack, when the ack came.
pub(crate) struct AckClock {
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) latencies: Arc<Latencies>,
}

#[async_trait]
impl Sink for AckClock {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let outcomes = self.sink.publish(batch).await;
        let acked_at = Instant::now();
        for (message, outcome) in batch.iter().zip(&outcomes) {
            if outcome.is_ok() {
                self.latencies.to_ack.received(message.id, acked_at);
            }
        }
        outcomes
    }

    async fn reconcile(&self, request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        self.sink.reconcile(request).await
    }

    async fn open_partition(&self, lease: &Lease) -> Result<(), SinkError> {
        self.sink.open_partition(lease).await
    }

    async fn close_partition(&self, partition: u32) {
        self.sink.close_partition(partition).await;
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.sink.check().await
    }

    async fn shutdown(&self) {
        self.sink.shutdown().await;
    }
}
