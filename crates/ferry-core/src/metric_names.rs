//! The names of every metric ferry exports, shared by `ferry relay` and `ferry serve` so
//! that one dashboard reads both. The relay records through the `metrics` facade
//! ([`crate::relay`]); the binaries install the Prometheus exporter. Counters end in
//! `_total`, durations are in seconds.

/// Counter: messages the sink acknowledged.
pub const RELAY_PUBLISHED: &str = "ferry_relay_published_total";
/// Counter: outbox rows marked published (or deleted) after their ack, reconciled ones
/// included.
pub const RELAY_MARKED: &str = "ferry_relay_marked_total";
/// Counter, label `class` ([`CLASS_TRANSIENT`], [`CLASS_PERMANENT`], [`CLASS_FENCED`]):
/// messages a publish attempt did not get acknowledged; each attempt counts.
pub const RELAY_PUBLISH_FAILURES: &str = "ferry_relay_publish_failures_total";
/// Counter: messages found already in the broker when taking a partition over.
pub const RELAY_RECONCILED: &str = "ferry_relay_reconciled_total";
/// Counter: messages parked by the `park-aggregate` policy.
pub const RELAY_PARKED: &str = "ferry_relay_parked_total";
/// Counter: partition leases granted to this relay.
pub const RELAY_LEASES_ACQUIRED: &str = "ferry_relay_leases_acquired_total";
/// Counter: leases lost or fenced while owned (not those released).
pub const RELAY_LEASES_LOST: &str = "ferry_relay_leases_lost_total";
/// Counter: partition workers that panicked (a bug, in ferry or a driver); each one's
/// partition is released unclean and taken over.
pub const RELAY_WORKER_PANICS: &str = "ferry_relay_worker_panics_total";
/// Gauge: partitions this relay owns now.
pub const RELAY_OWNED_PARTITIONS: &str = "ferry_relay_owned_partitions";
/// Histogram: seconds from a message's `created_at` (its commit, on the store's clock) to
/// the broker's acknowledgement.
pub const RELAY_ACK_LATENCY: &str = "ferry_relay_commit_to_ack_seconds";
/// Histogram: messages per batch read from a partition and published.
pub const RELAY_BATCH_SIZE: &str = "ferry_relay_batch_size";
/// Gauge: log bytes the database keeps for the log capture stream past its confirmed
/// position (PostgreSQL slot lag, MySQL binlog bytes), in `capture.mode = "log"`.
pub const CAPTURE_LAG_BYTES: &str = "ferry_capture_lag_bytes";
/// Gauge: seconds since the last confirmed captured transaction committed (0 when caught
/// up), in `capture.mode = "log"`.
pub const CAPTURE_LAG_SECONDS: &str = "ferry_capture_lag_seconds";
/// Gauge: 1 while this relay streams the log, 0 while it waits as a standby.
pub const CAPTURE_STREAMING: &str = "ferry_capture_streaming";

/// `class` of a failure that may pass on retry.
pub const CLASS_TRANSIENT: &str = "transient";
/// `class` of a rejection that repeats for the message: the partition blocks or parks it.
pub const CLASS_PERMANENT: &str = "permanent";
/// `class` of a failure that fenced the partition in the sink: the relay gives it up.
pub const CLASS_FENCED: &str = "fenced";

/// Gauge, label `partition`: unpublished messages, read from the store at each scrape.
pub const OUTBOX_BACKLOG: &str = "ferry_outbox_backlog";
/// Gauge, label `partition`: seconds since the oldest unpublished message was created (0
/// if none), read from the store at each scrape.
pub const OUTBOX_OLDEST_UNPUBLISHED_AGE: &str = "ferry_outbox_oldest_unpublished_age_seconds";
/// Gauge, label `partition`: 1 while the sink rejects the partition's head message for
/// good (the partition is blocked), else 0.
pub const OUTBOX_BLOCKED: &str = "ferry_outbox_blocked";

/// Gauge, label `status`: the reliable message service's messages per status.
pub const SERVICE_MESSAGES: &str = "ferry_service_messages";
/// Gauge: seconds since the oldest prepared message was prepared (0 if none).
pub const SERVICE_OLDEST_PREPARED_AGE: &str = "ferry_service_oldest_prepared_age_seconds";
/// Gauge: seconds since the oldest confirmed or delivered, not yet acknowledged message
/// was confirmed (0 if none).
pub const SERVICE_OLDEST_UNACKED_AGE: &str = "ferry_service_oldest_unacked_age_seconds";
/// Counter, label `outcome` (`committed`, `rolled_back`, `unknown`, `error`): check-backs.
pub const SERVICE_CHECK_BACKS: &str = "ferry_service_check_backs_total";
/// Counter: messages moved to `check_failed`.
pub const SERVICE_CHECK_FAILED: &str = "ferry_service_check_failed_total";
/// Counter: messages seen published (confirmed to delivered).
pub const SERVICE_DELIVERED: &str = "ferry_service_delivered_total";
/// Counter: redeliveries enqueued.
pub const SERVICE_REDELIVERIES: &str = "ferry_service_redeliveries_total";
/// Counter: messages dead-lettered.
pub const SERVICE_DEAD_LETTERED: &str = "ferry_service_dead_lettered_total";
/// Gauge: 1 if the service's store answered the scrape, else 0.
pub const SERVICE_STORE_UP: &str = "ferry_service_store_up";
