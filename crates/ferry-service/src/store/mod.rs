//! Where the service keeps its messages: a table of its own beside ferry's outbox, in the
//! same database, so that a confirmation and the outbox row it creates commit together.
//!
//! Every state change is one transaction whose first statement is a conditional `UPDATE …
//! WHERE id = ? AND status IN (<allowed sources>)`: of two concurrent changes of one
//! message the second finds the status moved and changes nothing. Work that the loops
//! claim (check-backs, redeliveries) is taken by statements that move the row out of
//! reach of other `ferry serve` instances in the same statement (`FOR UPDATE SKIP LOCKED`
//! on PostgreSQL; SQLite has one writer at a time).

mod dialect;
mod postgres;
mod row;
mod sql;
mod sqlite;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry::message::DELIVERY_ATTEMPT_HEADER;
use ferry::postgres::PgDialect;
use ferry::sqlite::SqliteDialect;
use ferry::{EnqueueError, Headers, NewMessage, StoreError};

use crate::state::{Status, Transition};

pub use dialect::{ServiceDialect, ServiceQueries};
pub use sql::SqlServiceStore;

/// The service's store in PostgreSQL.
pub type PgServiceStore = SqlServiceStore<PgDialect>;

/// The service's store in SQLite.
pub type SqliteServiceStore = SqlServiceStore<SqliteDialect>;

/// The `<prefix>meta` key of the service's schema version, kept beside the outbox's.
pub const SCHEMA_VERSION_KEY: &str = "service_schema_version";

/// A validated message to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Bytes,
    /// User headers plus `content-type` when the payload is not JSON.
    pub headers: Headers,
    pub partition_key: Option<String>,
    /// Where the service asks whether the producer's transaction committed.
    pub check_url: String,
}

impl Prepare {
    /// The message as the outbox will get it, for validation against the outbox's rules.
    pub fn new_message(&self) -> NewMessage {
        NewMessage {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            partition_key: self.partition_key.clone(),
            id: Some(self.id),
        }
    }
}

/// A message as the service stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: Uuid,
    pub status: Status,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// `None` in listings, which leave payloads out.
    pub payload: Option<Bytes>,
    pub headers: Headers,
    pub partition_key: Option<String>,
    pub check_url: String,
    /// The aggregate version the outbox assigned on confirmation; kept for redeliveries.
    pub version: Option<u64>,
    /// Check-backs made since prepare (or the last retry).
    pub checks: u32,
    /// Deliveries since confirmation (or the last retry); compared with `max_deliveries`.
    pub deliveries: u32,
    /// Deliveries ever: numbers each redelivery for the broker's dedup id.
    pub attempts: u32,
    /// Why the message is in its status: who moved it, or the last check-back failure.
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_check_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub ack_deadline: Option<DateTime<Utc>>,
}

impl Record {
    /// Whether `prepare` describes the same message (a producer retrying its prepare).
    pub fn matches(&self, prepare: &Prepare) -> bool {
        self.aggregate_type == prepare.aggregate_type
            && self.aggregate_id == prepare.aggregate_id
            && self.event_type == prepare.event_type
            && self.payload.as_ref() == Some(&prepare.payload)
            && self.headers == prepare.headers
            && self.partition_key == prepare.partition_key
            && self.check_url == prepare.check_url
    }

    fn payload(&self) -> Result<&Bytes, StoreError> {
        self.payload
            .as_ref()
            .ok_or_else(|| corrupt(self.id, "read without its payload"))
    }

    /// What the outbox gets on confirmation (the outbox assigns the version) and on a
    /// redelivery (the version it assigned then): the same id.
    fn new_message(&self) -> Result<NewMessage, StoreError> {
        Ok(NewMessage {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            payload: self.payload()?.clone(),
            headers: self.delivery_headers(),
            partition_key: self.partition_key.clone(),
            id: Some(self.id),
        })
    }

    /// The headers of the current delivery attempt: a redelivery (attempt 2 and up) carries
    /// its attempt, which sinks fold into the broker's dedup id (`Message::dedup_id`).
    fn delivery_headers(&self) -> Headers {
        let mut headers = self.headers.clone();
        if self.attempts > 1 {
            headers.insert(DELIVERY_ATTEMPT_HEADER.into(), self.attempts.to_string());
        }
        headers
    }
}

/// The outcome of a prepare.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// Stored now.
    Created(Record),
    /// The same id was prepared before with the same content: the stored message.
    Existing(Record),
    /// The same id exists with other content.
    Conflict(Record),
}

/// The outcome of a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Moved {
    /// The status changed; the record as it is now.
    Moved(Record),
    /// The status was not among the allowed sources; the record as it is.
    Stayed(Record),
    NotFound,
}

/// A prepared message whose check-back this instance claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckClaim {
    pub id: Uuid,
    pub check_url: String,
    /// This check's number (1 for the first); a later update applies only while the row
    /// still has it, so a slow checker whose claim was taken over changes nothing.
    pub checks: u32,
}

/// When un-acknowledged messages are redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPolicy {
    /// How long after its first delivery a message waits for its ack; doubled for each
    /// further delivery.
    pub ack_timeout: Duration,
    /// The longest wait for an ack, whatever the delivery.
    pub ack_timeout_max: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_deliveries: u32,
}

/// What one redelivery round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redelivered {
    pub redelivered: Vec<Uuid>,
    pub dead_lettered: Vec<Uuid>,
}

/// Counts and ages for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub counts: BTreeMap<Status, u64>,
    /// Seconds since the oldest prepared message was prepared.
    pub oldest_prepared_age_secs: Option<f64>,
    /// Seconds since the oldest confirmed or delivered (not yet acknowledged) message was
    /// confirmed.
    pub oldest_unacked_age_secs: Option<f64>,
}

/// A page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Empty: every status.
    pub statuses: Vec<Status>,
    /// Ids greater than this one (the previous page's last).
    pub after: Option<Uuid>,
    pub limit: u32,
}

/// The service's storage. Implemented for PostgreSQL and SQLite over ferry's own outbox
/// store, whose transaction a confirmation shares.
#[async_trait]
pub trait ServiceStore: Send + Sync + 'static {
    /// Creates or upgrades the service's table (idempotent). ferry's outbox must exist.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// One round trip to the database, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a prepared message, first checked back after `check_after`.
    async fn prepare(
        &self,
        prepare: &Prepare,
        check_after: Duration,
    ) -> Result<Prepared, StoreError>;

    /// Applies `transition` if the status is among `from`, in one transaction with the
    /// outbox write it implies (confirm: enqueue; retry of a dead letter: re-enqueue).
    /// `reason` is recorded with the new status.
    async fn transition(
        &self,
        id: Uuid,
        transition: Transition,
        from: &[Status],
        reason: &str,
    ) -> Result<Moved, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError>;

    /// Messages in ascending id order, without payloads.
    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>, StoreError>;

    /// Claims up to `limit` prepared messages due for a check-back, counting the check and
    /// hiding them from other instances for `claim_for` (longer than a check takes).
    async fn claim_check_backs(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<CheckClaim>, StoreError>;

    /// Records an inconclusive check-back (`unknown` or an error): checked again after
    /// `retry_in`, or moved to check_failed when `None`. Changes nothing (returns false)
    /// if the message left `prepared` or was claimed again meanwhile.
    async fn check_inconclusive(
        &self,
        claim: &CheckClaim,
        retry_in: Option<Duration>,
        reason: &str,
    ) -> Result<bool, StoreError>;

    /// Moves up to `limit` confirmed messages whose outbox row the relay has published to
    /// delivered, setting their ack deadline; returns their ids.
    async fn mark_delivered(&self, limit: u32, policy: &AckPolicy)
    -> Result<Vec<Uuid>, StoreError>;

    /// Redelivers (re-enqueues with the same id and version) up to `limit` delivered
    /// messages past their ack deadline, or dead-letters those out of deliveries.
    async fn redeliver_due(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Redelivered, StoreError>;

    /// Deletes completed and cancelled messages last changed longer than `older_than` ago.
    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError>;

    async fn stats(&self) -> Result<Stats, StoreError>;
}

/// The extra assignments of each transition besides `status`, `updated_at` and `reason`,
/// with `{now}` for the store's clock.
fn transition_assignments(transition: Transition) -> &'static str {
    match transition {
        Transition::Confirm => {
            "confirmed_at = {now}, next_check_at = NULL, deliveries = 1, attempts = attempts + 1"
        }
        Transition::Cancel => "next_check_at = NULL",
        Transition::Ack => "ack_deadline = NULL",
        Transition::RetryCheck => "checks = 0, next_check_at = {now}",
        Transition::RetryDelivery => {
            "deliveries = 1, attempts = attempts + 1, delivered_at = NULL, ack_deadline = NULL"
        }
    }
}

const TRANSITIONS: [Transition; 5] = [
    Transition::Confirm,
    Transition::Cancel,
    Transition::Ack,
    Transition::RetryCheck,
    Transition::RetryDelivery,
];

fn corrupt(id: Uuid, what: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("service message {id}: {what}").into())
}

/// Turns the enqueue of a confirmation into a store error: the message was validated when
/// prepared, so a refusal here means the outbox's limits are tighter than the service's.
fn enqueue_error(id: Uuid, err: EnqueueError) -> StoreError {
    match err {
        EnqueueError::Store(err) => err,
        other => StoreError::Other(
            format!("the outbox refused message {id}: {other} (keep service.max_payload_bytes within outbox.max_payload_bytes)").into(),
        ),
    }
}

fn status_names(statuses: &[Status]) -> Vec<&'static str> {
    statuses.iter().map(|s| s.as_str()).collect()
}

fn parse_status(id: Uuid, text: &str) -> Result<Status, StoreError> {
    text.parse().map_err(|err| corrupt(id, err))
}

fn to_u32(id: Uuid, what: &str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(id, format!("{what} {value} out of range")))
}

/// Reason recorded when a message runs out of deliveries.
fn dead_letter_reason(policy: &AckPolicy) -> String {
    format!(
        "not acknowledged after {} deliveries",
        policy.max_deliveries
    )
}

/// A prepare whose id was already stored: the same message again, or a conflict.
fn prepared_before(prepare: &Prepare, existing: Option<Record>) -> Result<Prepared, StoreError> {
    let existing = existing.ok_or_else(|| {
        StoreError::Unavailable(
            format!(
                "message {} was deleted while being prepared again",
                prepare.id
            )
            .into(),
        )
    })?;
    Ok(if existing.matches(prepare) {
        Prepared::Existing(existing)
    } else {
        Prepared::Conflict(existing)
    })
}

/// What a transition refused by its conditional update found: the message as it is, or
/// nothing.
async fn refused(store: &dyn ServiceStore, id: Uuid) -> Result<Moved, StoreError> {
    Ok(match store.get(id).await? {
        Some(record) => Moved::Stayed(record),
        None => Moved::NotFound,
    })
}

/// [`Stats`] from the stats statement's rows `(status, count, age of the oldest)`.
fn stats_from_rows(rows: Vec<(String, i64, Option<f64>)>) -> Result<Stats, StoreError> {
    let rows = rows
        .into_iter()
        .map(|(status, count, age)| {
            let status = status.parse::<Status>().map_err(|err| {
                StoreError::Other(format!("service messages table: {err}").into())
            })?;
            Ok((status, u64::try_from(count).unwrap_or(0), age))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(fold_stats(rows))
}

/// Folds per-status rows `(status, count, age of the oldest)` into [`Stats`]. The age is
/// since `confirmed_at` for un-acked messages and since `created_at` for prepared ones.
fn fold_stats(rows: impl IntoIterator<Item = (Status, u64, Option<f64>)>) -> Stats {
    let mut stats = Stats::default();
    for (status, count, age) in rows {
        stats.counts.insert(status, count);
        let age = age.map(|a| a.max(0.0));
        match status {
            Status::Prepared => stats.oldest_prepared_age_secs = age,
            Status::Confirmed | Status::Delivered => {
                stats.oldest_unacked_age_secs = match (stats.oldest_unacked_age_secs, age) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            _ => {}
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_oldest_unacked_of_confirmed_and_delivered() {
        let stats = fold_stats([
            (Status::Prepared, 2, Some(5.0)),
            (Status::Confirmed, 1, Some(3.0)),
            (Status::Delivered, 4, Some(9.0)),
            (Status::Completed, 7, Some(100.0)),
        ]);
        assert_eq!(stats.oldest_prepared_age_secs, Some(5.0));
        assert_eq!(stats.oldest_unacked_age_secs, Some(9.0));
        assert_eq!(stats.counts[&Status::Completed], 7);
    }

    #[test]
    fn redeliveries_carry_their_attempt() {
        let mut record = Record {
            id: Uuid::nil(),
            status: Status::Confirmed,
            aggregate_type: "order".into(),
            aggregate_id: "1".into(),
            event_type: "order.paid".into(),
            payload: None,
            headers: Headers::from([("traceparent".into(), "00-x".into())]),
            partition_key: None,
            check_url: "http://x".into(),
            version: Some(1),
            checks: 0,
            deliveries: 1,
            attempts: 1,
            reason: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            next_check_at: None,
            confirmed_at: None,
            delivered_at: None,
            ack_deadline: None,
        };
        assert!(
            !record
                .delivery_headers()
                .contains_key(DELIVERY_ATTEMPT_HEADER)
        );
        record.attempts = 3;
        let headers = record.delivery_headers();
        assert_eq!(headers[DELIVERY_ATTEMPT_HEADER], "3");
        assert_eq!(headers["traceparent"], "00-x");
    }
}
