//! The SQLite store: outbox, leases and consumer inbox in one database file, for embedded
//! use and single-host deployments.
//!
//! SQLite has one writer at a time, so every write here is short and the lease and mark
//! checks that must be atomic run in `BEGIN IMMEDIATE` transactions (they take the write
//! lock up front instead of failing with `SQLITE_BUSY` when upgrading a read). Readers are
//! not blocked: the database runs in WAL mode. All times come from SQLite's clock.
//!
//! Producers enqueue with [`SqliteOutbox::enqueue`] inside their own transaction (G1). A
//! producer that reads before it writes in that transaction should open it with
//! `pool.begin_with("BEGIN IMMEDIATE")`, for the same reason as above.

mod inbox;
mod lease;
mod queries;
mod store;

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use ferry_core::partition::partition_for;
use ferry_core::{EnqueueError, Enqueued, NewMessage, StoreError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{Sqlite, SqliteConnection, SqliteExecutor, SqlitePool, Transaction};
use tracing::{debug, info};
use uuid::Uuid;

use crate::sql::{
    StoreSettings, TablePrefix, check_migration, check_partitions, meta_number,
    recorded_partitions, store_error,
};

pub use inbox::SqliteInbox;

use queries::{META_PARTITIONS, META_SCHEMA_VERSION, Queries, SCHEMA_VERSION};

/// How long a connection waits for the write lock before failing with `SQLITE_BUSY`
/// (which is retryable).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox and lease store on SQLite.
#[derive(Debug)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    settings: StoreSettings,
    queries: Queries,
    /// P, read once: it never changes after set-up, and `enqueue` must not pay a query
    /// for it per message.
    partitions: OnceLock<u32>,
}

impl SqliteOutbox {
    /// Opens (creating if missing) the database at `url` (`sqlite://path/to/file.db`), in
    /// WAL mode so that the relay's reads never block producers, with a 5 s busy timeout,
    /// `synchronous = NORMAL` (durable in WAL mode except for the last commits on power
    /// loss) and foreign keys on.
    pub async fn connect(url: &str, settings: StoreSettings) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(store_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .map_err(store_error)?;
        debug!(
            url,
            prefix = settings.table_prefix.as_str(),
            "sqlite store connected"
        );
        Ok(Self::new(pool, settings))
    }

    /// Uses an existing pool (e.g. the application's own), configured by the caller.
    pub fn new(pool: SqlitePool, settings: StoreSettings) -> Self {
        let queries = Queries::new(&settings.table_prefix, settings.external_leases);
        Self {
            pool,
            settings,
            queries,
            partitions: OnceLock::new(),
        }
    }

    /// The pool, for the application's own transactions (pass them to [`Self::enqueue`]).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The prefix of ferry's table names in this database.
    pub fn table_prefix(&self) -> &TablePrefix {
        &self.settings.table_prefix
    }

    /// Creates or upgrades ferry's tables, with `partitions` partitions (1 to
    /// [`MAX_PARTITIONS`](crate::sql::MAX_PARTITIONS)). Idempotent: pending schema versions are applied in one
    /// transaction, so a failure leaves the previous version intact. The partition count is
    /// fixed at set-up, because it decides which partition (and so which ordered stream)
    /// every key's messages are in; asking for another count later is refused.
    pub async fn migrate(&self, partitions: u32) -> Result<(), StoreError> {
        check_partitions(partitions)?;
        let q = &self.queries;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        sqlx::query(q.create_meta.clone())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        let current = read_meta_number(&mut *tx, q, META_SCHEMA_VERSION)
            .await?
            .unwrap_or(0);
        let existing = read_meta_number(&mut *tx, q, META_PARTITIONS).await?;
        check_migration(current, SCHEMA_VERSION, existing, partitions)?;
        if existing.is_none() {
            write_meta(&mut *tx, q, META_PARTITIONS, partitions).await?;
        }
        for (index, migration) in q.migrations.iter().enumerate().skip(current as usize) {
            sqlx::raw_sql(migration.clone())
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
            info!(version = index + 1, "applied sqlite schema migration");
        }
        // Every partition has a lease row; inserting the missing ones also covers a
        // database whose leases table was emptied by hand.
        sqlx::query(q.create_leases.clone())
            .bind(i64::from(partitions))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        write_meta(&mut *tx, q, META_SCHEMA_VERSION, SCHEMA_VERSION).await?;
        tx.commit().await.map_err(store_error)?;
        // A count cached before is this one: it came from this database, checked above.
        let _ = self.partitions.set(partitions);
        info!(
            partitions,
            schema_version = SCHEMA_VERSION,
            "sqlite outbox ready"
        );
        Ok(())
    }

    /// Writes `message` to the outbox in the caller's transaction `tx` (G1): it exists if
    /// and only if `tx` commits. Takes the aggregate's next version in the same
    /// transaction; SQLite then holds its single write lock for `tx` until it ends, so no
    /// other writer can take a version in between: version order is commit order (G3).
    ///
    /// The message is validated first; on [`EnqueueError::Invalid`] no statement ran and
    /// `tx` can go on. On [`EnqueueError::Store`] roll `tx` back.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        message.validate(self.settings.max_payload_bytes)?;
        let q = &self.queries;
        // The version bump goes first: as the transaction's first write it waits for the
        // write lock (busy timeout) instead of failing, which a write after a read in a
        // deferred transaction would do if another writer committed in between.
        let version: i64 = sqlx::query_scalar(q.bump_version.clone())
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(store_error)?;
        let partitions = match self.partitions.get() {
            Some(&partitions) => partitions,
            // Read through `tx`, not the pool: the caller may hold the pool's only
            // connection.
            None => {
                let partitions = read_partitions(tx, q).await?;
                *self.partitions.get_or_init(|| partitions)
            }
        };
        let partition_key = message.partition_key();
        let partition = partition_for(&partition_key, partitions);
        let id = message.id.unwrap_or_else(Uuid::now_v7);
        let sequence: i64 = sqlx::query_scalar(q.insert_outbox.clone())
            .bind(id)
            .bind(i64::from(partition))
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(version)
            .bind(&message.event_type)
            .bind(Vec::from(message.payload))
            .bind(Json(&message.headers))
            .bind(partition_key)
            .fetch_one(&mut **tx)
            .await
            .map_err(store_error)?;
        let version = u64::try_from(version).map_err(|_| {
            StoreError::Other(
                format!(
                    "aggregate {}/{} has a negative version {version} in aggregate_versions",
                    message.aggregate_type, message.aggregate_id
                )
                .into(),
            )
        })?;
        debug!(message_id = %id, partition, version, sequence, "message enqueued");
        Ok(Enqueued {
            id,
            version,
            partition,
            sequence,
        })
    }

    /// The highest fencing epoch of any partition: a lease backend outside the store must
    /// grant epochs above it (see [`OutboxStore::adopt`](ferry_core::OutboxStore::adopt)).
    pub async fn highest_epoch(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(self.queries.highest_epoch.clone())
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)
    }

    /// P, from the cache or the database.
    async fn partition_count(&self) -> Result<u32, StoreError> {
        if let Some(&partitions) = self.partitions.get() {
            return Ok(partitions);
        }
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        let partitions = read_partitions(&mut conn, &self.queries).await?;
        Ok(*self.partitions.get_or_init(|| partitions))
    }
}

/// Reads P, checking that the schema is the one this code uses.
async fn read_partitions(conn: &mut SqliteConnection, q: &Queries) -> Result<u32, StoreError> {
    let version = read_meta_number(&mut *conn, q, META_SCHEMA_VERSION).await?;
    let partitions = read_meta_number(conn, q, META_PARTITIONS).await?;
    recorded_partitions(version, SCHEMA_VERSION, partitions)
}

async fn read_meta_number<'e>(
    executor: impl SqliteExecutor<'e>,
    q: &Queries,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    let value: Option<String> = sqlx::query_scalar(q.read_meta.clone())
        .bind(key)
        .fetch_optional(executor)
        .await
        .map_err(store_error)?;
    meta_number(key, value)
}

async fn write_meta<'e>(
    executor: impl SqliteExecutor<'e>,
    q: &Queries,
    key: &str,
    value: impl ToString,
) -> Result<(), StoreError> {
    sqlx::query(q.write_meta.clone())
        .bind(key)
        .bind(value.to_string())
        .execute(executor)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// A duration in whole milliseconds for the lease table, saturating.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
