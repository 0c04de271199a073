//! The PostgreSQL outbox: producer API, migrations, fenced relay statements, leases in the
//! same database, LISTEN/NOTIFY wake-ups, and the consumer inbox.

mod inbox;
mod queries;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{PgConnection, PgPool, Postgres, Row};
use uuid::Uuid;

use ferry_core::{
    EnqueueError, Enqueued, Lease, LeaseStore, NewMessage, OutboxStore, PartitionStatus,
    StoreError, Takeover, Wakers,
};

use crate::sql::{
    OUTBOX_COLUMNS, OutboxRow, StoreSettings, TablePrefix, check_partitions, probe_and_pool,
    store_error,
};

pub use inbox::PgInbox;

/// The schema version this code reads and writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Migrations in order; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: [&str; 1] = [include_str!("schema_v1.sql")];

/// Rows deleted per statement when purging past retention.
const PURGE_BATCH: i64 = 10_000;

/// Statements rendered once for the configured prefix.
#[derive(Debug)]
struct Statements {
    enqueue: String,
    partitions: String,
    fetch: String,
    mark: String,
    set_blocked: String,
    adopt: String,
    highest_epoch: String,
    status: String,
    purge: String,
    heartbeat: String,
    acquire: String,
    renew: String,
    release: String,
    leave: String,
    channel: String,
}

impl Statements {
    fn new(settings: &StoreSettings) -> Self {
        let p = &settings.table_prefix;
        let mark_rows = if settings.retention.is_zero() {
            queries::MARK_DELETE
        } else {
            queries::MARK_KEEP
        };
        // Owners are bound as $5 in marks, $4 when recording a blocked reason.
        let fence = |owner: &str| {
            if settings.external_leases {
                queries::FENCE_ADOPTED_LEASE.replace("{owner}", owner)
            } else {
                queries::FENCE_OWN_LEASE.to_owned()
            }
        };
        Self {
            enqueue: p.render(queries::ENQUEUE),
            partitions: p.render(queries::PARTITIONS),
            fetch: p.render(&queries::FETCH.replace("{cols}", OUTBOX_COLUMNS)),
            mark: p.render(
                &queries::MARK
                    .replace("{mark}", mark_rows)
                    .replace("{fence}", &fence("$5")),
            ),
            set_blocked: p.render(&queries::SET_BLOCKED.replace("{fence}", &fence("$4"))),
            adopt: p.render(queries::ADOPT),
            highest_epoch: p.render(queries::HIGHEST_EPOCH),
            status: p.render(queries::STATUS),
            purge: p.render(queries::PURGE),
            heartbeat: p.render(queries::HEARTBEAT),
            acquire: p.render(queries::ACQUIRE),
            renew: p.render(queries::RENEW),
            release: p.render(queries::RELEASE),
            leave: p.render(queries::LEAVE),
            channel: p.render("{p}outbox"),
        }
    }
}

/// An outbox in PostgreSQL. Cheap to clone; share one per process.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
    settings: StoreSettings,
    statements: std::sync::Arc<Statements>,
}

impl PgOutbox {
    /// Connects a pool of `max_connections` to `url` (`postgres://user@host/db`). Fails at
    /// once, naming the cause, if the server cannot be reached; callers retry with backoff.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::Other(format!("invalid PostgreSQL url: {e}").into())
        })?;
        let pool = probe_and_pool::<Postgres>(options, max_connections, store_error).await?;
        Ok(Self::new(pool, settings))
    }

    /// Uses an existing pool (e.g. the application's own).
    pub fn new(pool: PgPool, settings: StoreSettings) -> Self {
        let statements = std::sync::Arc::new(Statements::new(&settings));
        Self {
            pool,
            settings,
            statements,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn table_prefix(&self) -> &TablePrefix {
        &self.settings.table_prefix
    }

    /// Creates or upgrades ferry's tables and functions, idempotently and under an advisory
    /// lock so that concurrent `migrate` runs do not race. `partitions` is fixed the first
    /// time; a different value later is refused.
    pub async fn migrate(&self, partitions: u32) -> Result<(), StoreError> {
        check_partitions(partitions)?;
        let prefix = &self.settings.table_prefix;
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(prefix.render("{p}migrate"))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(prefix.render(
            "CREATE TABLE IF NOT EXISTS {p}meta (key text PRIMARY KEY, value text NOT NULL)",
        )))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        let meta: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(
            prefix.render("SELECT key, value FROM {p}meta"),
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        let lookup = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let current: i64 = lookup("schema_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if let Some(existing) = lookup("partitions")
            && existing != partitions.to_string()
        {
            return Err(StoreError::Schema(format!(
                "the outbox {prefix}outbox was created with {existing} partitions; the count is fixed at set-up (set partitions = {existing})",
                prefix = prefix.as_str()
            )));
        }
        if current > SCHEMA_VERSION {
            return Err(StoreError::Schema(format!(
                "the database has ferry schema version {current}, newer than this ferry ({SCHEMA_VERSION}); upgrade ferry"
            )));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let sql = prefix
                .render(migration)
                .replace("{partitions}", &partitions.to_string());
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
            tracing::info!(
                version = index + 1,
                prefix = prefix.as_str(),
                "applied schema migration"
            );
        }
        sqlx::query(sqlx::AssertSqlSafe(prefix.render(
            "INSERT INTO {p}meta (key, value) VALUES ('schema_version', $1), ('partitions', $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )))
        .bind(SCHEMA_VERSION.to_string())
        .bind(partitions.to_string())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    /// The highest fencing epoch of any partition: a lease backend outside the store must
    /// grant epochs above it (see [`OutboxStore::adopt`]).
    pub async fn highest_epoch(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(self.statements.highest_epoch.as_str()))
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)
    }

    /// Writes `message` into the outbox inside the caller's transaction (pass `&mut tx`),
    /// assigning its id, its aggregate's next version and its partition. Writers of one
    /// aggregate are serialised until commit, so version order is commit order (G3).
    /// An invalid message is refused before any statement runs: `tx` stays usable.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        message.validate(self.settings.max_payload_bytes)?;
        let partition_key = message.partition_key();
        let row = sqlx::query(sqlx::AssertSqlSafe(self.statements.enqueue.as_str()))
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(&message.event_type)
            .bind(message.payload.as_ref())
            .bind(sqlx::types::Json(&message.headers))
            .bind(&partition_key)
            .bind(message.id.unwrap_or_else(Uuid::now_v7))
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        let read = |e: sqlx::Error| EnqueueError::Store(store_error(e));
        Ok(Enqueued {
            id: row.try_get("message_id").map_err(read)?,
            version: row.try_get::<i64, _>("message_version").map_err(read)? as u64,
            partition: row.try_get::<i32, _>("message_partition").map_err(read)? as u32,
            sequence: row.try_get("message_sequence").map_err(read)?,
        })
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[async_trait]
impl OutboxStore for PgOutbox {
    async fn partitions(&self) -> Result<u32, StoreError> {
        let value: Option<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.statements.partitions.as_str()))
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        value
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::Schema("the outbox has no partition count".into()))
    }

    async fn fetch(
        &self,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<ferry_core::Message>, StoreError> {
        let mut tx = self
            .pool
            .begin_with(queries::FETCH_BEGIN)
            .await
            .map_err(store_error)?;
        let rows: Vec<OutboxRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(self.statements.fetch.as_str()))
                .bind(partition as i32)
                .bind(limit as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let (leased, marked): (i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(self.statements.mark.as_str()))
                .bind(lease.partition as i32)
                .bind(lease.epoch)
                .bind(ids)
                .bind(checkpoint.map(|c| c as i64))
                .bind(&lease.owner)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
        if leased == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(marked as u64)
    }

    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError> {
        let changed = sqlx::query(sqlx::AssertSqlSafe(self.statements.set_blocked.as_str()))
            .bind(lease.partition as i32)
            .bind(lease.epoch)
            .bind(reason)
            .bind(&lease.owner)
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        if changed == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let adopted: Option<Option<i64>> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.statements.adopt.as_str()))
                .bind(lease.partition as i32)
                .bind(lease.epoch)
                .bind(&lease.owner)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        match adopted {
            Some(checkpoint) => Ok(checkpoint.and_then(|c| u64::try_from(c).ok())),
            None => Err(StoreError::fenced(lease)),
        }
    }

    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(store_error)?;
        listener
            .listen(&self.statements.channel)
            .await
            .map_err(store_error)?;
        // Rows committed before LISTEN took effect raised no wake-up we could see.
        wakers.wake_all();
        loop {
            match listener.try_recv().await.map_err(store_error)? {
                Some(notification) => match notification.payload().parse() {
                    Ok(partition) => wakers.wake(partition),
                    Err(_) => wakers.wake_all(),
                },
                // The connection dropped and will be re-established by the next call;
                // anything notified meanwhile is lost, so look everywhere.
                None => wakers.wake_all(),
            }
        }
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.statements.status.as_str()))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(|row| -> Result<PartitionStatus, sqlx::Error> {
                Ok(PartitionStatus {
                    partition: row.try_get::<i32, _>("partition_no")? as u32,
                    owner: row.try_get("owner")?,
                    epoch: row.try_get("epoch")?,
                    lease_expires_at: row.try_get::<Option<DateTime<Utc>>, _>("expires_at")?,
                    backlog: row.try_get::<i64, _>("backlog")? as u64,
                    oldest_unpublished_age_secs: row.try_get("oldest_age_secs")?,
                    blocked_reason: row.try_get("blocked_reason")?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        if self.settings.retention.is_zero() {
            return Ok(0);
        }
        let mut total = 0;
        loop {
            let deleted = sqlx::query(sqlx::AssertSqlSafe(self.statements.purge.as_str()))
                .bind(secs(self.settings.retention))
                .bind(PURGE_BATCH)
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
            total += deleted;
            if deleted < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    fn retention(&self) -> Duration {
        self.settings.retention
    }
}

#[async_trait]
impl LeaseStore for PgOutbox {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let live: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(self.statements.heartbeat.as_str()))
            .bind(relay)
            .bind(secs(ttl))
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(live as usize)
    }

    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.statements.acquire.as_str()))
            .bind(relay)
            .bind(max as i64)
            .bind(secs(ttl))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(|row| -> Result<Lease, sqlx::Error> {
                let takeover = if row.try_get("previous_clean")? {
                    Takeover::Clean
                } else {
                    Takeover::Unclean {
                        since_expiry: Duration::from_secs_f64(
                            row.try_get::<f64, _>("since_expiry_secs")?.max(0.0),
                        ),
                        checkpoint: row
                            .try_get::<Option<i64>, _>("checkpoint")?
                            .map(|c| c as u64),
                    }
                };
                Ok(Lease {
                    partition: row.try_get::<i32, _>("partition_no")? as u32,
                    epoch: row.try_get("epoch")?,
                    owner: relay.to_owned(),
                    takeover,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        let Some(owner) = leases.first().map(|l| l.owner.as_str()) else {
            return Ok(Vec::new());
        };
        let partitions: Vec<i32> = leases.iter().map(|l| l.partition as i32).collect();
        let epochs: Vec<i64> = leases.iter().map(|l| l.epoch).collect();
        let renewed: Vec<i32> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.statements.renew.as_str()))
                .bind(&partitions)
                .bind(&epochs)
                .bind(owner)
                .bind(secs(ttl))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(renewed.into_iter().map(|p| p as u32).collect())
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(self.statements.release.as_str()))
            .bind(lease.partition as i32)
            .bind(lease.epoch)
            .bind(clean)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(self.statements.leave.as_str()))
            .bind(relay)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}
