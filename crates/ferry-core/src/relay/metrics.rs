//! What the relay counts: [`RelayStats`] for code that holds the relay, and the same
//! events through the `metrics` facade (names in [`crate::metric_names`]) for whatever
//! exporter the process installs. Handles are registered once, when the relay is built,
//! with the recorder current then (the global one, or a test's local one).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

use super::RelayStats;
use crate::capture::CaptureLag;
use crate::message::Message;
use crate::metric_names::{
    CAPTURE_LAG_BYTES, CAPTURE_LAG_SECONDS, CAPTURE_STREAMING, CLASS_FENCED, CLASS_PERMANENT,
    CLASS_TRANSIENT, OUTBOX_BACKLOG, OUTBOX_BLOCKED, OUTBOX_OLDEST_UNPUBLISHED_AGE,
    RELAY_ACK_LATENCY, RELAY_BATCH_SIZE, RELAY_LEASES_ACQUIRED, RELAY_LEASES_LOST, RELAY_MARKED,
    RELAY_OWNED_PARTITIONS, RELAY_PARKED, RELAY_PUBLISH_FAILURES, RELAY_PUBLISHED,
    RELAY_RECONCILED, RELAY_WORKER_PANICS,
};
use crate::sink::{Delivery, SinkError};
use crate::store::PartitionStatus;

/// The relay's counters and its metric handles, updated together.
#[derive(Debug)]
pub(super) struct Instruments {
    pub(super) stats: Arc<RelayStats>,
    published: Counter,
    marked: Counter,
    failures: FailureCounters,
    reconciled: Counter,
    parked: Counter,
    leases_acquired: Counter,
    leases_lost: Counter,
    worker_panics: Counter,
    owned: Gauge,
    ack_latency: Histogram,
    batch_size: Histogram,
    streaming: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge,
}

/// Publish failures, one counter per class of [`SinkError`].
#[derive(Debug)]
struct FailureCounters {
    transient: Counter,
    permanent: Counter,
    fenced: Counter,
}

impl FailureCounters {
    fn of(&self, err: &SinkError) -> &Counter {
        if err.is_fenced() {
            &self.fenced
        } else if err.is_retryable() {
            &self.transient
        } else {
            &self.permanent
        }
    }
}

impl Instruments {
    /// Registers the handles with the current recorder.
    pub(super) fn register() -> Self {
        describe();
        Self {
            stats: Arc::default(),
            published: counter!(RELAY_PUBLISHED),
            marked: counter!(RELAY_MARKED),
            failures: FailureCounters {
                transient: counter!(RELAY_PUBLISH_FAILURES, "class" => CLASS_TRANSIENT),
                permanent: counter!(RELAY_PUBLISH_FAILURES, "class" => CLASS_PERMANENT),
                fenced: counter!(RELAY_PUBLISH_FAILURES, "class" => CLASS_FENCED),
            },
            reconciled: counter!(RELAY_RECONCILED),
            parked: counter!(RELAY_PARKED),
            leases_acquired: counter!(RELAY_LEASES_ACQUIRED),
            leases_lost: counter!(RELAY_LEASES_LOST),
            worker_panics: counter!(RELAY_WORKER_PANICS),
            owned: gauge!(RELAY_OWNED_PARTITIONS),
            ack_latency: histogram!(RELAY_ACK_LATENCY),
            batch_size: histogram!(RELAY_BATCH_SIZE),
            streaming: gauge!(CAPTURE_STREAMING),
            lag_bytes: gauge!(CAPTURE_LAG_BYTES),
            lag_seconds: gauge!(CAPTURE_LAG_SECONDS),
        }
    }

    pub(super) fn batch_read(&self, len: usize) {
        self.batch_size.record(len as f64);
    }

    /// The sink's `outcomes` for `batch`: acks with their commit-to-ack latency, failures
    /// by class.
    pub(super) fn published(&self, batch: &[Message], outcomes: &[Result<Delivery, SinkError>]) {
        let now = Utc::now();
        let mut acked = 0;
        for (message, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(_) => {
                    acked += 1;
                    let latency = (now - message.created_at).as_seconds_f64().max(0.0);
                    self.ack_latency.record(latency);
                }
                Err(err) => self.failures.of(err).increment(1),
            }
        }
        self.stats.published.fetch_add(acked, Ordering::Relaxed);
        self.published.increment(acked);
    }

    /// `failed` messages of a batch that failed for a reason other than fencing.
    pub(super) fn batch_failed(&self, failed: usize) {
        self.stats
            .publish_failures
            .fetch_add(failed as u64, Ordering::Relaxed);
    }

    pub(super) fn marked(&self, rows: u64) {
        self.stats.marked.fetch_add(rows, Ordering::Relaxed);
        self.marked.increment(rows);
    }

    pub(super) fn reconciled(&self, found: usize) {
        self.stats
            .reconciled
            .fetch_add(found as u64, Ordering::Relaxed);
        self.reconciled.increment(found as u64);
    }

    pub(super) fn parked(&self, parked: u64) {
        self.stats.parked.fetch_add(parked, Ordering::Relaxed);
        self.parked.increment(parked);
    }

    pub(super) fn lease_acquired(&self) {
        self.leases_acquired.increment(1);
    }

    pub(super) fn lease_lost(&self) {
        self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
        self.leases_lost.increment(1);
    }

    pub(super) fn worker_panicked(&self) {
        self.stats.worker_panics.fetch_add(1, Ordering::Relaxed);
        self.worker_panics.increment(1);
    }

    /// Whether this relay streams the log (log capture mode) or waits as a standby.
    pub(super) fn streaming(&self, streaming: bool) {
        self.stats.streaming.store(streaming, Ordering::Relaxed);
        self.streaming.set(if streaming { 1.0 } else { 0.0 });
    }

    pub(super) fn capture_lag(&self, lag: &CaptureLag) {
        if let Some(bytes) = lag.bytes {
            self.lag_bytes.set(bytes as f64);
        }
        if let Some(seconds) = lag.seconds {
            self.lag_seconds.set(seconds);
        }
    }

    pub(super) fn owned(&self, partitions: usize) {
        self.stats
            .owned_partitions
            .store(partitions as u64, Ordering::Relaxed);
        self.owned.set(partitions as f64);
    }

    /// Whether the last lease round reached the lease store.
    pub(super) fn lease_round(&self, reached: bool) {
        self.stats.leases_reached.store(reached, Ordering::Relaxed);
    }
}

/// Sets the per-partition outbox gauges (backlog, oldest unpublished age, blocked) from
/// `status` (see [`crate::OutboxStore::status`]), with the current recorder. Whoever
/// serves the metrics calls it at each scrape, so the values are the store's, current and
/// the same on every instance.
pub fn record_outbox_status(status: &[PartitionStatus]) {
    describe_gauge!(OUTBOX_BACKLOG, "unpublished messages per partition");
    describe_gauge!(
        OUTBOX_OLDEST_UNPUBLISHED_AGE,
        Unit::Seconds,
        "age of the oldest unpublished message per partition (0 if none)"
    );
    describe_gauge!(
        OUTBOX_BLOCKED,
        "1 while the sink rejects the partition's head message for good"
    );
    for partition in status {
        let label = partition.partition.to_string();
        gauge!(OUTBOX_BACKLOG, "partition" => label.clone()).set(partition.backlog as f64);
        gauge!(OUTBOX_OLDEST_UNPUBLISHED_AGE, "partition" => label.clone())
            .set(partition.oldest_unpublished_age_secs.unwrap_or(0.0));
        gauge!(OUTBOX_BLOCKED, "partition" => label)
            .set(f64::from(u8::from(partition.blocked_reason.is_some())));
    }
}

/// The relay's help texts, for exporters that show them.
fn describe() {
    describe_counter!(RELAY_PUBLISHED, "messages the sink acknowledged");
    describe_counter!(
        RELAY_MARKED,
        "outbox rows marked published (or deleted) after their ack"
    );
    describe_counter!(
        RELAY_PUBLISH_FAILURES,
        "messages a publish attempt did not get acknowledged, by class (transient, permanent, fenced)"
    );
    describe_counter!(
        RELAY_RECONCILED,
        "messages found already in the broker when taking a partition over"
    );
    describe_counter!(RELAY_PARKED, "messages parked by the park-aggregate policy");
    describe_counter!(RELAY_LEASES_ACQUIRED, "partition leases granted");
    describe_counter!(RELAY_LEASES_LOST, "leases lost or fenced while owned");
    describe_counter!(
        RELAY_WORKER_PANICS,
        "partition workers that panicked; each partition is released unclean and taken over"
    );
    describe_gauge!(RELAY_OWNED_PARTITIONS, "partitions this relay owns");
    describe_gauge!(
        CAPTURE_STREAMING,
        "1 while this relay streams the log, 0 while it waits as a standby"
    );
    describe_gauge!(
        CAPTURE_LAG_BYTES,
        Unit::Bytes,
        "log the database keeps for the stream past its confirmed position"
    );
    describe_gauge!(
        CAPTURE_LAG_SECONDS,
        Unit::Seconds,
        "time since the last confirmed captured transaction committed"
    );
    describe_histogram!(
        RELAY_ACK_LATENCY,
        Unit::Seconds,
        "from a message's commit (created_at) to the broker's acknowledgement"
    );
    describe_histogram!(
        RELAY_BATCH_SIZE,
        Unit::Count,
        "messages per batch read and published"
    );
}
