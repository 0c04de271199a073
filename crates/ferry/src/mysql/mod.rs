//! The MySQL / MariaDB store: producer API (and a stored procedure for any language),
//! migrations, fenced relay statements, leases in the same database, and the consumer
//! inbox. MariaDB 10.6+ or MySQL 8.0.29+ (tested against MariaDB 10.11).
//!
//! MySQL has no notifications: the relay polls each owned partition every
//! `poll_interval` when it finds nothing to do. AUTO_INCREMENT sequences may commit out of
//! order; fetch keeps no cursor, so a late commit with a lower sequence is read by the next
//! fetch, and per-aggregate order holds because `enqueue` locks the aggregate's version row
//! before it takes a sequence.
//!
//! Producers: InnoDB resolves lock cycles by rolling one transaction back with a deadlock
//! error (1213), which [`StoreError::is_retryable`] reports as retryable: retry the whole
//! transaction. Writers of disjoint aggregates do not block each other in `enqueue`.

mod inbox;
mod lease;
mod queries;
mod store;

use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::{Connection, MySql, MySqlConnection, MySqlPool, Row, Transaction};
use tracing::{debug, info};
use uuid::Uuid;

use ferry_core::{EnqueueError, Enqueued, NewMessage, StoreError};

use crate::sql::{
    StoreSettings, TablePrefix, check_migration, check_partitions, meta_number, probe_and_pool,
    recorded_partitions, store_error,
};

pub use inbox::MyInbox;

use queries::{
    CREATE_LEASES, CREATE_LEASES_TAIL, META_PARTITIONS, META_SCHEMA_VERSION, MIGRATION_LOCK,
    MIGRATION_SQL_MODE, MIGRATION_UNLOCK, Queries, SCHEMA_VERSION,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An outbox in MySQL or MariaDB. Cheap to clone; share one per process.
#[derive(Debug, Clone)]
pub struct MyOutbox {
    pool: MySqlPool,
    settings: StoreSettings,
    queries: std::sync::Arc<Queries>,
}

/// A connection failure with what ferry was doing, keeping the driver's error as the cause.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
struct ConnectFailed {
    context: String,
    #[source]
    source: BoxError,
}

impl MyOutbox {
    /// Connects a pool of `max_connections` to `url` (`mysql://user:password@host:3306/db`).
    /// Fails at once, naming the cause, if the server cannot be reached (retryable) or
    /// refuses the user or database (not retryable).
    pub async fn connect(
        url: &str,
        max_connections: u32,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        let options: MySqlConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::Other(format!("invalid MySQL url (store.url): {e}").into())
        })?;
        let described = options.clone();
        let pool = probe_and_pool::<MySql>(options, max_connections, |err| {
            connect_error(err, &described)
        })
        .await?;
        debug!(
            prefix = settings.table_prefix.as_str(),
            "mysql store connected"
        );
        Ok(Self::new(pool, settings))
    }

    /// Uses an existing pool (e.g. the application's own).
    pub fn new(pool: MySqlPool, settings: StoreSettings) -> Self {
        let queries = std::sync::Arc::new(Queries::new(
            &settings.table_prefix,
            settings.external_leases,
        ));
        Self {
            pool,
            settings,
            queries,
        }
    }

    /// The pool, for the application's own transactions (pass them to [`Self::enqueue`]).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    pub fn table_prefix(&self) -> &TablePrefix {
        &self.settings.table_prefix
    }

    /// Creates or upgrades ferry's tables, functions and the `enqueue` procedure, with
    /// `partitions` partitions (1 to [`MAX_PARTITIONS`](crate::sql::MAX_PARTITIONS)). Concurrent runs queue on a named
    /// lock (`GET_LOCK`). MySQL commits each DDL statement by itself, so every statement is
    /// idempotent and a run cut short is completed by the next; the schema version is
    /// written last. The partition count is fixed at set-up; another count later is refused.
    pub async fn migrate(&self, partitions: u32) -> Result<(), StoreError> {
        check_partitions(partitions)?;
        // A connection of its own: the lock and the strict sql_mode the routines are
        // created under belong to the session, and closing it drops both.
        let mut conn = MySqlConnection::connect_with(&self.pool.connect_options())
            .await
            .map_err(store_error)?;
        let lock = self.settings.table_prefix.render("{p}migrate");
        let result = async {
            sqlx::raw_sql(MIGRATION_SQL_MODE)
                .execute(&mut conn)
                .await
                .map_err(store_error)?;
            let locked: Option<i64> = sqlx::query_scalar(MIGRATION_LOCK)
                .bind(&lock)
                .fetch_one(&mut conn)
                .await
                .map_err(store_error)?;
            if locked != Some(1) {
                return Err(StoreError::Unavailable(
                    format!("another `ferry migrate` has held the lock {lock:?} for 60 s").into(),
                ));
            }
            self.migrate_locked(&mut conn, partitions).await?;
            sqlx::query_scalar::<_, Option<i64>>(MIGRATION_UNLOCK)
                .bind(&lock)
                .fetch_one(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        .await;
        let _ = conn.close().await;
        result?;
        info!(
            partitions,
            schema_version = SCHEMA_VERSION,
            prefix = self.settings.table_prefix.as_str(),
            "mysql outbox ready"
        );
        Ok(())
    }

    async fn migrate_locked(
        &self,
        conn: &mut MySqlConnection,
        partitions: u32,
    ) -> Result<(), StoreError> {
        let q = &self.queries;
        sqlx::query(q.create_meta.clone())
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
        let current = read_meta_number(conn, q, META_SCHEMA_VERSION)
            .await?
            .unwrap_or(0);
        let existing = read_meta_number(conn, q, META_PARTITIONS).await?;
        check_migration(current, SCHEMA_VERSION, existing, partitions)?;
        if existing.is_none() {
            // Written before the routines that hard-code P, so that a run cut short and
            // retried with another count is refused.
            write_meta(conn, q, META_PARTITIONS, partitions).await?;
        }
        for (index, migration) in q.migrations.iter().enumerate().skip(current as usize) {
            let sql = migration.replace("{partitions}", &partitions.to_string());
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .map_err(store_error)?;
            info!(version = index + 1, "applied mysql schema migration");
        }
        // Every partition has a lease row; inserting the missing ones also covers a leases
        // table emptied by hand.
        let rows: Vec<String> = (0..partitions).map(|p| format!("({p})")).collect();
        let create_leases = format!(
            "{}{}{CREATE_LEASES_TAIL}",
            self.settings.table_prefix.render(CREATE_LEASES),
            rows.join(", ")
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(create_leases))
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
        write_meta(conn, q, META_SCHEMA_VERSION, SCHEMA_VERSION).await
    }

    /// Writes `message` into the outbox inside the caller's transaction `tx` (G1), in one
    /// round trip (`CALL <prefix>enqueue`), assigning its id, its aggregate's next version
    /// and its partition. The aggregate's version row stays locked until `tx` ends, so
    /// writers of one aggregate are serialised and version order is commit order (G3).
    ///
    /// The message is validated first; on [`EnqueueError::Invalid`] no statement ran and
    /// `tx` can go on. On [`EnqueueError::Store`] roll `tx` back (and retry it if the error
    /// is retryable, e.g. a deadlock).
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, MySql>,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        message.validate(self.settings.max_payload_bytes)?;
        let partition_key = message.partition_key();
        let row = sqlx::query(self.queries.enqueue.clone())
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(&message.event_type)
            .bind(message.payload.as_ref())
            .bind(sqlx::types::Json(&message.headers))
            .bind(&partition_key)
            .bind(message.id.unwrap_or_else(Uuid::now_v7))
            .fetch_one(&mut **tx)
            .await
            .map_err(store_error)?;
        let read = |e: sqlx::Error| EnqueueError::Store(store_error(e));
        let version: i64 = row.try_get("message_version").map_err(read)?;
        let partition: i32 = row.try_get("message_partition").map_err(read)?;
        let corrupt = |what: String| EnqueueError::Store(StoreError::Other(what.into()));
        Ok(Enqueued {
            id: row.try_get("message_id").map_err(read)?,
            version: u64::try_from(version).map_err(|_| {
                corrupt(format!(
                    "aggregate {}/{} has a negative version {version}",
                    message.aggregate_type, message.aggregate_id
                ))
            })?,
            partition: u32::try_from(partition)
                .map_err(|_| corrupt(format!("enqueue returned partition {partition}")))?,
            sequence: row.try_get("message_sequence").map_err(read)?,
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

    /// P, as recorded by `migrate`.
    async fn partition_count(&self) -> Result<u32, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        let version = read_meta_number(&mut conn, &self.queries, META_SCHEMA_VERSION).await?;
        let partitions = read_meta_number(&mut conn, &self.queries, META_PARTITIONS).await?;
        recorded_partitions(version, SCHEMA_VERSION, partitions)
    }
}

/// Names what failed and how to fix it; keeps whether retrying can help.
fn connect_error(err: sqlx::Error, options: &MySqlConnectOptions) -> StoreError {
    let server = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let user = options.get_username();
    let number = match &err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(sqlx::mysql::MySqlDatabaseError::number),
        _ => None,
    };
    let context = match number {
        Some(1045) => format!(
            "MySQL at {server} refused user {user:?}: check the user and password in store.url"
        ),
        Some(1044) | Some(1049) => format!(
            "MySQL at {server}: the database in store.url does not exist or user {user:?} may not use it"
        ),
        Some(_) => format!("MySQL at {server} refused the connection"),
        None => format!(
            "cannot reach MySQL at {server}: is the server running, and are store.url's host and port right?"
        ),
    };
    let wrap = |source| {
        Box::new(ConnectFailed {
            context: context.clone(),
            source,
        })
    };
    match store_error(err) {
        StoreError::Unavailable(source) => StoreError::Unavailable(wrap(source)),
        StoreError::Other(source) => StoreError::Other(wrap(source)),
        other => other,
    }
}

async fn read_meta_number(
    conn: &mut MySqlConnection,
    q: &Queries,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    let value: Option<String> = sqlx::query_scalar(q.read_meta.clone())
        .bind(key)
        .fetch_optional(conn)
        .await
        .map_err(store_error)?;
    meta_number(key, value)
}

async fn write_meta(
    conn: &mut MySqlConnection,
    q: &Queries,
    key: &str,
    value: impl ToString,
) -> Result<(), StoreError> {
    sqlx::query(q.write_meta.clone())
        .bind(key)
        .bind(value.to_string())
        .execute(conn)
        .await
        .map_err(store_error)?;
    Ok(())
}

/// A duration in whole microseconds for `INTERVAL ? MICROSECOND`, saturating.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
