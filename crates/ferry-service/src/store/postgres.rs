//! The service's store on PostgreSQL, sharing ferry's [`PgOutbox`] pool and transactions.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use ferry::postgres::PgOutbox;
use ferry::sql::store_error;
use ferry::{Headers, OutboxStore, StoreError, partition_for};

use super::{
    AckPolicy, CheckClaim, Dialect, ListQuery, Moved, PURGE_BATCH, Prepare, Prepared, Record,
    Redelivered, SCHEMA_VERSION, SCHEMA_VERSION_KEY, ServiceStore, Statements, Stats,
    claims_from_rows, corrupt, dead_letter_reason, enqueue_error, needs_migration, parse_status,
    prepared_before, purge_in_batches, refused, secs, stats_from_rows, status_names, to_u32,
};
use crate::state::{Status, Transition};

// The redelivery statement writes the outbox's columns directly (to keep the id and the
// version, which `enqueue` would assign anew); it is written for outbox schema v1.
const _: () = assert!(ferry::postgres::SCHEMA_VERSION == 1);

const MIGRATION: &str = include_str!("postgres_v1.sql");

const PREPARE: &str = "INSERT INTO {p}service_messages (id, status, aggregate_type, \
     aggregate_id, event_type, payload, headers, partition_key, check_url, next_check_at) \
     VALUES ($1, 'prepared', $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9)) \
     ON CONFLICT (id) DO NOTHING RETURNING {cols}";

const GET: &str = "SELECT {cols} FROM {p}service_messages WHERE id = $1";

/// `{target}` and `{assign}` come from the transition.
const TRANSITION: &str = "UPDATE {p}service_messages \
     SET status = '{target}', updated_at = now(), reason = $3, {assign} \
     WHERE id = $1 AND status = ANY($2) RETURNING {cols}";

const SET_VERSION: &str = "UPDATE {p}service_messages SET version = $2 WHERE id = $1";

const LIST: &str = "SELECT {list_cols} FROM {p}service_messages \
     WHERE (cardinality($1::text[]) = 0 OR status = ANY($1)) AND ($2::uuid IS NULL OR id > $2) \
     ORDER BY id LIMIT $3";

/// Counts the check and pushes `next_check_at` past the claim, so that no other instance
/// takes the row while this one asks the producer.
const CLAIM_CHECKS: &str = "UPDATE {p}service_messages \
     SET checks = checks + 1, next_check_at = now() + make_interval(secs => $2), updated_at = now() \
     WHERE status = 'prepared' AND id IN ( \
         SELECT id FROM {p}service_messages WHERE status = 'prepared' AND next_check_at <= now() \
         ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
     RETURNING id, check_url, checks";

const CHECK_RETRY: &str = "UPDATE {p}service_messages \
     SET next_check_at = now() + make_interval(secs => $3), reason = $4, updated_at = now() \
     WHERE id = $1 AND status = 'prepared' AND checks = $2";

const CHECK_FAILED: &str = "UPDATE {p}service_messages \
     SET status = 'check_failed', next_check_at = NULL, reason = $3, updated_at = now() \
     WHERE id = $1 AND status = 'prepared' AND checks = $2";

/// A confirmed message is delivered once its outbox row is gone (deleted when marked) or
/// marked published (kept for retention). The confirmation and its outbox row commit
/// together, so a confirmed message without a pending row was published. The ack deadline
/// doubles with each delivery, up to `$3`.
const MARK_DELIVERED: &str = "UPDATE {p}service_messages \
     SET status = 'delivered', delivered_at = now(), updated_at = now(), \
         ack_deadline = now() + make_interval(secs => \
             least($2 * power(2, greatest(deliveries - 1, 0)), $3)) \
     WHERE status = 'confirmed' AND id IN ( \
         SELECT m.id FROM {p}service_messages m \
         WHERE m.status = 'confirmed' AND NOT EXISTS ( \
             SELECT 1 FROM {p}outbox o WHERE o.id = m.id AND o.published_at IS NULL) \
         ORDER BY m.confirmed_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
     RETURNING id";

const DEAD_LETTER: &str = "UPDATE {p}service_messages \
     SET status = 'dead_lettered', ack_deadline = NULL, updated_at = now(), reason = $3 \
     WHERE status = 'delivered' AND id IN ( \
         SELECT id FROM {p}service_messages \
         WHERE status = 'delivered' AND ack_deadline <= now() AND deliveries >= $1 \
         ORDER BY ack_deadline LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING id";

const REDELIVER: &str = "UPDATE {p}service_messages \
     SET status = 'confirmed', deliveries = deliveries + 1, attempts = attempts + 1, \
         delivered_at = NULL, ack_deadline = NULL, updated_at = now(), \
         reason = 'redelivered: not acknowledged in time' \
     WHERE status = 'delivered' AND id IN ( \
         SELECT id FROM {p}service_messages \
         WHERE status = 'delivered' AND ack_deadline <= now() AND deliveries < $1 \
         ORDER BY ack_deadline LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING {cols}";

/// A row kept after publishing (retention) holds the id; the redelivery replaces it.
const REQUEUE_DELETE: &str = "DELETE FROM {p}outbox WHERE id = $1 AND published_at IS NOT NULL";

/// The outbox row of a redelivery: the same id and version, a new sequence. A row still
/// pending means the message is on its way already.
const REQUEUE_INSERT: &str = "INSERT INTO {p}outbox (id, partition_no, aggregate_type, \
     aggregate_id, version, event_type, payload, headers, partition_key) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING";

const PURGE: &str = "DELETE FROM {p}service_messages WHERE id IN ( \
     SELECT id FROM {p}service_messages \
     WHERE status IN ('completed', 'cancelled') AND updated_at < now() - make_interval(secs => $1) \
     LIMIT $2)";

const STATS: &str = "SELECT status, count(*) AS count, \
     extract(epoch FROM now() - min(coalesce(confirmed_at, created_at)))::float8 AS oldest_age_secs \
     FROM {p}service_messages GROUP BY status";

const READ_META: &str = "SELECT value FROM {p}meta WHERE key = $1";
const WRITE_META: &str = "INSERT INTO {p}meta (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

const DIALECT: Dialect = Dialect {
    migration: MIGRATION,
    now: "now()",
    null_payload: "NULL::bytea",
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

/// The service's messages in PostgreSQL, next to `outbox`'s tables (same prefix).
#[derive(Debug)]
pub struct PgServiceStore {
    outbox: Arc<PgOutbox>,
    statements: Statements,
    partitions: OnceLock<u32>,
}

impl PgServiceStore {
    pub fn new(outbox: Arc<PgOutbox>) -> Self {
        let statements = Statements::new(outbox.table_prefix(), &DIALECT);
        Self {
            outbox,
            statements,
            partitions: OnceLock::new(),
        }
    }

    /// P, read once from the outbox (fixed at set-up).
    async fn partitions(&self) -> Result<u32, StoreError> {
        if let Some(&partitions) = self.partitions.get() {
            return Ok(partitions);
        }
        let partitions = OutboxStore::partitions(self.outbox.as_ref()).await?;
        Ok(*self.partitions.get_or_init(|| partitions))
    }

    /// Writes the outbox row of a redelivery of `record` (same id and version).
    async fn requeue(
        &self,
        conn: &mut PgConnection,
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
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
        sqlx::query(self.statements.requeue_insert.clone())
            .bind(record.id)
            .bind(partition_for(&key, partitions) as i32)
            .bind(&record.aggregate_type)
            .bind(&record.aggregate_id)
            .bind(version as i64)
            .bind(&record.event_type)
            .bind(payload.as_ref())
            .bind(Json(record.delivery_headers()))
            .bind(&key)
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct PgRecord {
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
    checks: i32,
    deliveries: i32,
    attempts: i32,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    next_check_at: Option<DateTime<Utc>>,
    confirmed_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    ack_deadline: Option<DateTime<Utc>>,
}

impl TryFrom<PgRecord> for Record {
    type Error = StoreError;

    fn try_from(row: PgRecord) -> Result<Self, StoreError> {
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
            checks: to_u32(id, "checks", row.checks.into())?,
            deliveries: to_u32(id, "deliveries", row.deliveries.into())?,
            attempts: to_u32(id, "attempts", row.attempts.into())?,
            reason: row.reason,
            created_at: row.created_at,
            updated_at: row.updated_at,
            next_check_at: row.next_check_at,
            confirmed_at: row.confirmed_at,
            delivered_at: row.delivered_at,
            ack_deadline: row.ack_deadline,
        })
    }
}

#[async_trait]
impl ServiceStore for PgServiceStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let prefix = self.outbox.table_prefix();
        let mut tx = self.outbox.pool().begin().await.map_err(store_error)?;
        // The outbox's migration lock: the two never run at once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(prefix.render("{p}migrate"))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
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
            tracing::info!(
                version = 1,
                prefix = prefix.as_str(),
                "applied service schema migration"
            );
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
        let inserted: Option<PgRecord> = sqlx::query_as(self.statements.prepare.clone())
            .bind(prepare.id)
            .bind(&prepare.aggregate_type)
            .bind(&prepare.aggregate_id)
            .bind(&prepare.event_type)
            .bind(prepare.payload.as_ref())
            .bind(Json(&prepare.headers))
            .bind(&prepare.partition_key)
            .bind(&prepare.check_url)
            .bind(secs(check_after))
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
        let partitions = match transition {
            Transition::RetryDelivery => Some(self.partitions().await?),
            _ => None,
        };
        let mut tx = self.outbox.pool().begin().await.map_err(store_error)?;
        let moved: Option<PgRecord> = sqlx::query_as(self.statements.transition(transition))
            .bind(id)
            .bind(status_names(from))
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
                sqlx::query(self.statements.set_version.clone())
                    .bind(id)
                    .bind(enqueued.version as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                record.version = Some(enqueued.version);
            }
            Transition::RetryDelivery => {
                let partitions = partitions.expect("read before the transaction");
                self.requeue(&mut tx, &record, partitions).await?;
            }
            Transition::Cancel | Transition::Ack | Transition::RetryCheck => {}
        }
        tx.commit().await.map_err(store_error)?;
        Ok(Moved::Moved(record))
    }

    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError> {
        let row: Option<PgRecord> = sqlx::query_as(self.statements.get.clone())
            .bind(id)
            .fetch_optional(self.outbox.pool())
            .await
            .map_err(store_error)?;
        row.map(Record::try_from).transpose()
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let rows: Vec<PgRecord> = sqlx::query_as(self.statements.list.clone())
            .bind(status_names(&query.statuses))
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
        let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(self.statements.claim_checks.clone())
            .bind(i64::from(limit))
            .bind(secs(claim_for))
            .fetch_all(self.outbox.pool())
            .await
            .map_err(store_error)?;
        claims_from_rows(
            rows.into_iter()
                .map(|(id, url, checks)| (id, url, i64::from(checks))),
        )
    }

    async fn check_inconclusive(
        &self,
        claim: &CheckClaim,
        retry_in: Option<Duration>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let checks = i32::try_from(claim.checks).unwrap_or(i32::MAX);
        let query = match retry_in {
            Some(delay) => sqlx::query(self.statements.check_retry.clone())
                .bind(claim.id)
                .bind(checks)
                .bind(secs(delay))
                .bind(reason),
            None => sqlx::query(self.statements.check_failed.clone())
                .bind(claim.id)
                .bind(checks)
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
        sqlx::query_scalar(self.statements.mark_delivered.clone())
            .bind(i64::from(limit))
            .bind(secs(policy.ack_timeout))
            .bind(secs(policy.ack_timeout_max))
            .fetch_all(self.outbox.pool())
            .await
            .map_err(store_error)
    }

    async fn redeliver_due(
        &self,
        limit: u32,
        policy: &AckPolicy,
    ) -> Result<Redelivered, StoreError> {
        let partitions = self.partitions().await?;
        let max_deliveries = i32::try_from(policy.max_deliveries).unwrap_or(i32::MAX);
        let mut tx = self.outbox.pool().begin().await.map_err(store_error)?;
        let dead_lettered: Vec<Uuid> = sqlx::query_scalar(self.statements.dead_letter.clone())
            .bind(max_deliveries)
            .bind(i64::from(limit))
            .bind(dead_letter_reason(policy))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        let rows: Vec<PgRecord> = sqlx::query_as(self.statements.redeliver.clone())
            .bind(max_deliveries)
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
                .bind(secs(older_than))
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
