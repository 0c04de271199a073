//! The service's store on SQLite, sharing ferry's [`SqliteOutbox`] pool and transactions.
//!
//! Writes run in `BEGIN IMMEDIATE` transactions (one writer at a time, taken up front), so
//! a claim or a transition cannot interleave with another instance's on the same file.
//! Times are unix milliseconds from SQLite's clock.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Sqlite, Transaction};
use uuid::Uuid;

use ferry::sql::store_error;
use ferry::sqlite::SqliteOutbox;
use ferry::{Headers, OutboxStore, StoreError, partition_for};

use super::{
    AckPolicy, CheckClaim, Dialect, ListQuery, Moved, PURGE_BATCH, Prepare, Prepared, Record,
    Redelivered, SCHEMA_VERSION, SCHEMA_VERSION_KEY, ServiceStore, Statements, Stats,
    claims_from_rows, corrupt, dead_letter_reason, enqueue_error, millis, needs_migration,
    parse_status, prepared_before, purge_in_batches, refused, stats_from_rows, status_names,
    to_u32,
};
use crate::state::{Status, Transition};

const MIGRATION: &str = include_str!("sqlite_v1.sql");

const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

const PREPARE: &str = "INSERT INTO {p}service_messages (id, status, aggregate_type, \
     aggregate_id, event_type, payload, headers, partition_key, check_url, created_at, \
     updated_at, next_check_at) \
     VALUES (?1, 'prepared', ?2, ?3, ?4, ?5, ?6, ?7, ?8, {now}, {now}, {now} + ?9) \
     ON CONFLICT (id) DO NOTHING RETURNING {cols}";

const GET: &str = "SELECT {cols} FROM {p}service_messages WHERE id = ?1";

/// `?2` is a JSON array of the allowed source statuses.
const TRANSITION: &str = "UPDATE {p}service_messages \
     SET status = '{target}', updated_at = {now}, reason = ?3, {assign} \
     WHERE id = ?1 AND status IN (SELECT value FROM json_each(?2)) RETURNING {cols}";

const SET_VERSION: &str = "UPDATE {p}service_messages SET version = ?2 WHERE id = ?1";

const LIST: &str = "SELECT {list_cols} FROM {p}service_messages \
     WHERE (?1 = '[]' OR status IN (SELECT value FROM json_each(?1))) \
       AND (?2 IS NULL OR id > ?2) \
     ORDER BY id LIMIT ?3";

const CLAIM_CHECKS: &str = "UPDATE {p}service_messages \
     SET checks = checks + 1, next_check_at = {now} + ?2, updated_at = {now} \
     WHERE status = 'prepared' AND id IN ( \
         SELECT id FROM {p}service_messages WHERE status = 'prepared' AND next_check_at <= {now} \
         ORDER BY next_check_at LIMIT ?1) \
     RETURNING id, check_url, checks";

const CHECK_RETRY: &str = "UPDATE {p}service_messages \
     SET next_check_at = {now} + ?3, reason = ?4, updated_at = {now} \
     WHERE id = ?1 AND status = 'prepared' AND checks = ?2";

const CHECK_FAILED: &str = "UPDATE {p}service_messages \
     SET status = 'check_failed', next_check_at = NULL, reason = ?3, updated_at = {now} \
     WHERE id = ?1 AND status = 'prepared' AND checks = ?2";

/// See the PostgreSQL store's statement. The doubling is capped at 2^20 so the product
/// stays an integer.
const MARK_DELIVERED: &str = "UPDATE {p}service_messages \
     SET status = 'delivered', delivered_at = {now}, updated_at = {now}, \
         ack_deadline = {now} + min(?2 * (1 << min(max(deliveries - 1, 0), 20)), ?3) \
     WHERE status = 'confirmed' AND id IN ( \
         SELECT m.id FROM {p}service_messages m \
         WHERE m.status = 'confirmed' AND NOT EXISTS ( \
             SELECT 1 FROM {p}outbox o WHERE o.id = m.id AND o.published_at IS NULL) \
         ORDER BY m.confirmed_at LIMIT ?1) \
     RETURNING id";

const DEAD_LETTER: &str = "UPDATE {p}service_messages \
     SET status = 'dead_lettered', ack_deadline = NULL, updated_at = {now}, reason = ?3 \
     WHERE status = 'delivered' AND id IN ( \
         SELECT id FROM {p}service_messages \
         WHERE status = 'delivered' AND ack_deadline <= {now} AND deliveries >= ?1 \
         ORDER BY ack_deadline LIMIT ?2) \
     RETURNING id";

const REDELIVER: &str = "UPDATE {p}service_messages \
     SET status = 'confirmed', deliveries = deliveries + 1, attempts = attempts + 1, \
         delivered_at = NULL, ack_deadline = NULL, updated_at = {now}, \
         reason = 'redelivered: not acknowledged in time' \
     WHERE status = 'delivered' AND id IN ( \
         SELECT id FROM {p}service_messages \
         WHERE status = 'delivered' AND ack_deadline <= {now} AND deliveries < ?1 \
         ORDER BY ack_deadline LIMIT ?2) \
     RETURNING {cols}";

const REQUEUE_DELETE: &str = "DELETE FROM {p}outbox WHERE id = ?1 AND published_at IS NOT NULL";

/// The same columns as ferry's SQLite enqueue; `created_at` takes its default.
const REQUEUE_INSERT: &str = "INSERT INTO {p}outbox (id, partition_no, aggregate_type, \
     aggregate_id, version, event_type, payload, headers, partition_key) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING";

const PURGE: &str = "DELETE FROM {p}service_messages WHERE id IN ( \
     SELECT id FROM {p}service_messages \
     WHERE status IN ('completed', 'cancelled') AND updated_at < {now} - ?1 LIMIT ?2)";

const STATS: &str = "SELECT status, count(*), \
     ({now} - min(coalesce(confirmed_at, created_at))) / 1000.0 \
     FROM {p}service_messages GROUP BY status";

const READ_META: &str = "SELECT value FROM {p}meta WHERE key = ?1";
const WRITE_META: &str = "INSERT INTO {p}meta (key, value) VALUES (?1, ?2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

const DIALECT: Dialect = Dialect {
    migration: MIGRATION,
    now: NOW_MS,
    null_payload: "NULL",
    prepare: PREPARE,
    get: GET,
    transition: TRANSITION,
    set_version: SET_VERSION,
    list: LIST,
    claim_checks: CLAIM_CHECKS,
    check_retry: CHECK_RETRY,
    check_failed: CHECK_FAILED,
    mark_delivered: MARK_DELIVERED,
    dead_letter: DEAD_LETTER,
    redeliver: REDELIVER,
    requeue_delete: REQUEUE_DELETE,
    requeue_insert: REQUEUE_INSERT,
    purge: PURGE,
    stats: STATS,
    read_meta: READ_META,
    write_meta: WRITE_META,
};

/// The service's messages in SQLite, next to `outbox`'s tables (same file and prefix).
#[derive(Debug)]
pub struct SqliteServiceStore {
    outbox: Arc<SqliteOutbox>,
    statements: Statements,
    partitions: OnceLock<u32>,
}

impl SqliteServiceStore {
    pub fn new(outbox: Arc<SqliteOutbox>) -> Self {
        let statements = Statements::new(outbox.table_prefix(), &DIALECT);
        Self {
            outbox,
            statements,
            partitions: OnceLock::new(),
        }
    }

    async fn partitions(&self) -> Result<u32, StoreError> {
        if let Some(&partitions) = self.partitions.get() {
            return Ok(partitions);
        }
        let partitions = OutboxStore::partitions(self.outbox.as_ref()).await?;
        Ok(*self.partitions.get_or_init(|| partitions))
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.outbox
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)
    }

    async fn requeue(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        record: &Record,
        partitions: u32,
    ) -> Result<(), StoreError> {
        let version = record
            .version
            .ok_or_else(|| corrupt(record.id, "redelivery of a message without a version"))?;
        let key = record.partition_key_or_default();
        let payload = record.payload()?;
        sqlx::query(self.statements.requeue_delete.clone())
            .bind(record.id)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
        sqlx::query(self.statements.requeue_insert.clone())
            .bind(record.id)
            .bind(i64::from(partition_for(&key, partitions)))
            .bind(&record.aggregate_type)
            .bind(&record.aggregate_id)
            .bind(i64::try_from(version).map_err(|_| corrupt(record.id, "version too large"))?)
            .bind(&record.event_type)
            .bind(payload.to_vec())
            .bind(Json(record.delivery_headers()))
            .bind(&key)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct SqliteRecord {
    id: Uuid,
    status: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Option<Vec<u8>>,
    headers: Json<Headers>,
    partition_key: Option<String>,
    check_url: String,
    version: Option<i64>,
    checks: i64,
    deliveries: i64,
    attempts: i64,
    reason: Option<String>,
    created_at: i64,
    updated_at: i64,
    next_check_at: Option<i64>,
    confirmed_at: Option<i64>,
    delivered_at: Option<i64>,
    ack_deadline: Option<i64>,
}

fn time(id: Uuid, millis: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(millis).ok_or_else(|| corrupt(id, "time out of range"))
}

fn optional_time(id: Uuid, millis: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    millis.map(|m| time(id, m)).transpose()
}

impl TryFrom<SqliteRecord> for Record {
    type Error = StoreError;

    fn try_from(row: SqliteRecord) -> Result<Self, StoreError> {
        let id = row.id;
        Ok(Record {
            id,
            status: parse_status(id, &row.status)?,
            aggregate_type: row.aggregate_type,
            aggregate_id: row.aggregate_id,
            event_type: row.event_type,
            payload: row.payload.map(Into::into),
            headers: row.headers.0,
            partition_key: row.partition_key,
            check_url: row.check_url,
            version: row
                .version
                .map(|v| u64::try_from(v).map_err(|_| corrupt(id, "negative version")))
                .transpose()?,
            checks: to_u32(id, "checks", row.checks)?,
            deliveries: to_u32(id, "deliveries", row.deliveries)?,
            attempts: to_u32(id, "attempts", row.attempts)?,
            reason: row.reason,
            created_at: time(id, row.created_at)?,
            updated_at: time(id, row.updated_at)?,
            next_check_at: optional_time(id, row.next_check_at)?,
            confirmed_at: optional_time(id, row.confirmed_at)?,
            delivered_at: optional_time(id, row.delivered_at)?,
            ack_deadline: optional_time(id, row.ack_deadline)?,
        })
    }
}

/// The allowed statuses as the JSON array the statements read with `json_each`.
fn status_array(statuses: &[Status]) -> String {
    serde_json::to_string(&status_names(statuses)).expect("a list of names serialises")
}

#[async_trait]
impl ServiceStore for SqliteServiceStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let current: Option<String> = sqlx::query_scalar(self.statements.read_meta.clone())
            .bind(SCHEMA_VERSION_KEY)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        if needs_migration(current)? {
            sqlx::raw_sql(AssertSqlSafe(self.statements.migration.clone()))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
            tracing::info!(version = 1, "applied sqlite service schema migration");
        }
        sqlx::query(self.statements.write_meta.clone())
            .bind(SCHEMA_VERSION_KEY)
            .bind(SCHEMA_VERSION.to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(self.outbox.pool())
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn prepare(
        &self,
        prepare: &Prepare,
        check_after: Duration,
    ) -> Result<Prepared, StoreError> {
        let inserted: Option<SqliteRecord> = sqlx::query_as(self.statements.prepare.clone())
            .bind(prepare.id)
            .bind(&prepare.aggregate_type)
            .bind(&prepare.aggregate_id)
            .bind(&prepare.event_type)
            .bind(prepare.payload.to_vec())
            .bind(Json(&prepare.headers))
            .bind(&prepare.partition_key)
            .bind(&prepare.check_url)
            .bind(millis(check_after))
            .fetch_optional(self.outbox.pool())
            .await
            .map_err(store_error)?;
        if let Some(row) = inserted {
            return Ok(Prepared::Created(row.try_into()?));
        }
        prepared_before(prepare, self.get(prepare.id).await?)
    }

    async fn transition(
        &self,
        id: Uuid,
        transition: Transition,
        from: &[Status],
        reason: &str,
    ) -> Result<Moved, StoreError> {
        let partitions = self.partitions().await?;
        let mut tx = self.begin_write().await?;
        let moved: Option<SqliteRecord> = sqlx::query_as(self.statements.transition(transition))
            .bind(id)
            .bind(status_array(from))
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        let Some(row) = moved else {
            drop(tx);
            return refused(self, id).await;
        };
        let mut record = Record::try_from(row)?;
        match transition {
            Transition::Confirm => {
                let message = record.new_message()?;
                let enqueued = self
                    .outbox
                    .enqueue(&mut tx, message)
                    .await
                    .map_err(|err| enqueue_error(id, err))?;
                let version = i64::try_from(enqueued.version)
                    .map_err(|_| corrupt(id, "version too large"))?;
                sqlx::query(self.statements.set_version.clone())
                    .bind(id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                record.version = Some(enqueued.version);
            }
            Transition::RetryDelivery => self.requeue(&mut tx, &record, partitions).await?,
            Transition::Cancel | Transition::Ack | Transition::RetryCheck => {}
        }
        tx.commit().await.map_err(store_error)?;
        Ok(Moved::Moved(record))
    }

    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError> {
        let row: Option<SqliteRecord> = sqlx::query_as(self.statements.get.clone())
            .bind(id)
            .fetch_optional(self.outbox.pool())
            .await
            .map_err(store_error)?;
        row.map(Record::try_from).transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let rows: Vec<SqliteRecord> = sqlx::query_as(self.statements.list.clone())
            .bind(status_array(&query.statuses))
            .bind(query.after)
            .bind(i64::from(query.limit))
            .fetch_all(self.outbox.pool())
            .await
            .map_err(store_error)?;
        rows.into_iter().map(Record::try_from).collect()
    }

    async fn claim_check_backs(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<CheckClaim>, StoreError> {
        let mut tx = self.begin_write().await?;
        let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(self.statements.claim_checks.clone())
            .bind(i64::from(limit))
            .bind(millis(claim_for))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        claims_from_rows(rows)
    }

    async fn check_inconclusive(
        &self,
        claim: &CheckClaim,
        retry_in: Option<Duration>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let query = match retry_in {
            Some(delay) => sqlx::query(self.statements.check_retry.clone())
                .bind(claim.id)
                .bind(i64::from(claim.checks))
                .bind(millis(delay))
                .bind(reason),
            None => sqlx::query(self.statements.check_failed.clone())
                .bind(claim.id)
                .bind(i64::from(claim.checks))
                .bind(reason),
        };
        let changed = query
            .execute(self.outbox.pool())
            .await
            .map_err(store_error)?
            .rows_affected();
        Ok(changed > 0)
    }

    async fn mark_delivered(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.begin_write().await?;
        let ids = sqlx::query_scalar(self.statements.mark_delivered.clone())
            .bind(i64::from(limit))
            .bind(millis(policy.ack_timeout))
            .bind(millis(policy.ack_timeout_max))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(ids)
    }

    async fn redeliver_due(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Redelivered, StoreError> {
        let partitions = self.partitions().await?;
        let mut tx = self.begin_write().await?;
        let dead_lettered: Vec<Uuid> = sqlx::query_scalar(self.statements.dead_letter.clone())
            .bind(i64::from(policy.max_deliveries))
            .bind(i64::from(limit))
            .bind(dead_letter_reason(policy))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        let rows: Vec<SqliteRecord> = sqlx::query_as(self.statements.redeliver.clone())
            .bind(i64::from(policy.max_deliveries))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        let mut redelivered = Vec::with_capacity(rows.len());
        for row in rows {
            let record = Record::try_from(row)?;
            self.requeue(&mut tx, &record, partitions).await?;
            redelivered.push(record.id);
        }
        tx.commit().await.map_err(store_error)?;
        Ok(Redelivered {
            redelivered,
            dead_lettered,
        })
    }

    async fn purge_finished(&self, older_than: Duration) -> Result<u64, StoreError> {
        purge_in_batches(|| async {
            Ok(sqlx::query(self.statements.purge.clone())
                .bind(millis(older_than))
                .bind(PURGE_BATCH)
                .execute(self.outbox.pool())
                .await
                .map_err(store_error)?
                .rows_affected())
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let rows: Vec<(String, i64, Option<f64>)> = sqlx::query_as(self.statements.stats.clone())
            .fetch_all(self.outbox.pool())
            .await
            .map_err(store_error)?;
        stats_from_rows(rows)
    }
}
