//! [`SqlOutbox`]: the outbox in a SQL database, for any [`Dialect`]: connecting,
//! migrating, the producer API, and the statements its store and lease implementations run.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::pool::{PoolConnection, PoolOptions};
use sqlx::{Database, Pool, SqlSafeStr, Transaction};
use tracing::debug;
use uuid::Uuid;

use ferry_core::partition::partition_for;
use ferry_core::{EnqueueError, Enqueued, NewMessage, StoreError};

use super::dialect::{Dialect, Enqueue};
use super::driver::RowExt;
use super::error::{connect_error, corrupt, store_error};
use super::migrate::{self, PARTITIONS_KEY};
use super::statement::{Arg, IdListStatement, Statement};
use super::wake::NotifyTriggerStatements;
use super::{StoreSettings, TablePrefix};

/// A connection of dialect `D` (of a pool or inside a transaction: pass `&mut *tx`).
pub type Connection<D> = <<D as Dialect>::Db as Database>::Connection;

/// The fence of leases this store grants: the epoch is current, held by this owner and
/// unexpired on the database's clock.
const FENCE_OWN_LEASE: &str = "epoch = $2 AND owner = $3 AND expires_at > {now}";

/// The fence of adopted leases (Redis, etcd): the epoch and owner are the adopted ones.
/// Expiry is the lease backend's business: a newer owner adopts before it touches anything,
/// which moves the epoch on.
const FENCE_ADOPTED_LEASE: &str = "epoch = $2 AND owner = $3";

/// The outbox's statements, rendered once for a table prefix and lease kind.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) meta_create: Statement,
    pub(crate) meta_read: Statement,
    pub(crate) meta_write: Statement,
    pub(crate) migration_lock: Option<Statement>,
    pub(crate) notify_trigger: Option<NotifyTriggerStatements>,
    pub(crate) leases_create: Statement,
    /// The routine call, or the insert after `version_bump`.
    pub(crate) enqueue: Statement,
    pub(crate) version_bump: Option<Statement>,
    pub(crate) outbox_requeue: Statement,
    pub(crate) outbox_unkeep: Statement,
    pub(crate) fetch: Statement,
    pub(crate) lease_check: Statement,
    pub(crate) mark_delete: IdListStatement,
    pub(crate) mark_keep: IdListStatement,
    pub(crate) unpublished: IdListStatement,
    pub(crate) blocked_set: Statement,
    pub(crate) retry_take: Statement,
    pub(crate) retry_request: Statement,
    pub(crate) blocked_list: Statement,
    pub(crate) park_aggregate: Statement,
    pub(crate) outbox_delete_aggregate: Statement,
    pub(crate) outbox_partition_of: Statement,
    pub(crate) park_one: Statement,
    pub(crate) outbox_delete_one: Statement,
    pub(crate) parked_list: Statement,
    pub(crate) parked_get: Statement,
    pub(crate) parked_requeue: Statement,
    pub(crate) parked_delete_aggregate: Statement,
    pub(crate) purge_inbox: Statement,
    pub(crate) purge_parked: Statement,
    pub(crate) retained_page: Statement,
    pub(crate) retained_summary: Statement,
    pub(crate) adopt: Statement,
    pub(crate) checkpoint_read: Statement,
    pub(crate) epoch_highest: Statement,
    pub(crate) status: Statement,
    pub(crate) purge: Statement,
    pub(crate) relay_heartbeat: Statement,
    pub(crate) relays_forget: Statement,
    pub(crate) relays_live: Statement,
    pub(crate) leases_free: Statement,
    pub(crate) lease_grant: Statement,
    pub(crate) lease_renew: Statement,
    pub(crate) lease_release: Statement,
    pub(crate) relay_leave: Statement,
}

impl Statements {
    fn new<D: Dialect>(prefix: &TablePrefix, external_leases: bool) -> Self {
        let fence = if external_leases {
            FENCE_ADOPTED_LEASE
        } else {
            FENCE_OWN_LEASE
        };
        let fills = fills::<D>(prefix, &[("{fence}", fence)]);
        let r = |text: &str| Statement::render(text, &fills, D::PLACEHOLDERS, None);
        let q = D::QUERIES;
        let (enqueue, version_bump) = match D::ENQUEUE {
            Enqueue::Routine(call) => (r(call), None),
            Enqueue::Statements { bump, insert } => (r(insert), Some(r(bump))),
        };
        Self {
            meta_create: r(q.meta_create),
            meta_read: r(q.meta_read),
            meta_write: r(q.meta_write),
            migration_lock: D::MIGRATION_LOCK.map(r),
            notify_trigger: D::NOTIFY_TRIGGER
                .map(|trigger| NotifyTriggerStatements::new(trigger, r)),
            leases_create: r(q.leases_create),
            enqueue,
            version_bump,
            outbox_requeue: r(q.outbox_requeue),
            outbox_unkeep: r(q.outbox_unkeep),
            fetch: r(q.fetch),
            lease_check: r(q.lease_check),
            mark_delete: IdListStatement::render::<D>(q.mark_delete, &fills, 2),
            mark_keep: IdListStatement::render::<D>(q.mark_keep, &fills, 2),
            unpublished: IdListStatement::render::<D>(q.unpublished, &fills, 2),
            blocked_set: r(q.blocked_set),
            retry_take: r(q.retry_take),
            retry_request: r(q.retry_request),
            blocked_list: r(q.blocked_list),
            park_aggregate: r(q.park_aggregate),
            outbox_delete_aggregate: r(q.outbox_delete_aggregate),
            outbox_partition_of: r(q.outbox_partition_of),
            park_one: r(q.park_one),
            outbox_delete_one: r(q.outbox_delete_one),
            parked_list: r(q.parked_list),
            parked_get: r(q.parked_get),
            parked_requeue: r(q.parked_requeue),
            parked_delete_aggregate: r(q.parked_delete_aggregate),
            purge_inbox: r(q.purge_inbox),
            purge_parked: r(q.purge_parked),
            retained_page: r(q.retained_page),
            retained_summary: r(q.retained_summary),
            adopt: r(q.adopt),
            checkpoint_read: r(q.checkpoint_read),
            epoch_highest: r(q.epoch_highest),
            status: r(q.status),
            purge: r(q.purge),
            relay_heartbeat: r(q.relay_heartbeat),
            relays_forget: r(q.relays_forget),
            relays_live: r(q.relays_live),
            leases_free: r(q.leases_free),
            lease_grant: r(q.lease_grant),
            lease_renew: r(q.lease_renew),
            lease_release: r(q.lease_release),
            relay_leave: r(q.relay_leave),
        }
    }
}

/// The texts spliced into `D`'s statements: `extra` first (it may hold the dialect's
/// shorthands), then the dialect's, then the table prefix.
pub(crate) fn fills<'a, D: Dialect>(
    prefix: &'a TablePrefix,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut fills = extra.to_vec();
    fills.extend_from_slice(D::FILLS);
    fills.push(("{p}", prefix.as_str()));
    fills
}

/// An outbox, its leases and its status in a SQL database. Cheap to clone; share one per
/// process.
#[derive(Debug)]
pub struct SqlOutbox<D: Dialect> {
    pool: Pool<D::Db>,
    settings: StoreSettings,
    pub(crate) statements: Arc<Statements>,
    /// P, read once: it never changes after set-up, and `enqueue` must not pay a query
    /// for it per message.
    pub(crate) partitions: Arc<OnceLock<u32>>,
    dialect: PhantomData<fn() -> D>,
}

impl<D: Dialect> Clone for SqlOutbox<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            statements: Arc::clone(&self.statements),
            partitions: Arc::clone(&self.partitions),
            dialect: PhantomData,
        }
    }
}

impl<D: Dialect> SqlOutbox<D> {
    /// Connects a pool of `max_connections` (at least 2) to `url`. Fails at once, naming the
    /// server and the cause, if it cannot be reached (retryable) or refuses the user or
    /// database (not retryable): one direct connection is tried first, because the pool
    /// would retry a refused connection silently until its acquire timeout.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        let options = D::connect_options(url).map_err(|err| {
            StoreError::Other(format!("invalid {} url (store.url): {err}", D::NAME).into())
        })?;
        let probe = <Connection<D> as sqlx::Connection>::connect_with(&options)
            .await
            .map_err(|err| connect_error::<D>(err, &options))?;
        let _ = sqlx::Connection::close(probe).await;
        let pool = PoolOptions::<D::Db>::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(store_error::<D>)?;
        debug!(
            database = D::NAME,
            prefix = settings.table_prefix.as_str(),
            "store connected"
        );
        Ok(Self::new(pool, settings))
    }

    /// Uses an existing pool (e.g. the application's own), configured by the caller.
    pub fn new(pool: Pool<D::Db>, settings: StoreSettings) -> Self {
        let statements = Arc::new(Statements::new::<D>(
            &settings.table_prefix,
            settings.external_leases,
        ));
        Self {
            pool,
            settings,
            statements,
            partitions: Arc::default(),
            dialect: PhantomData,
        }
    }

    /// The pool, for the application's own transactions (pass them to [`Self::enqueue`]).
    pub fn pool(&self) -> &Pool<D::Db> {
        &self.pool
    }

    /// The prefix of ferry's table names in this database.
    pub fn table_prefix(&self) -> &TablePrefix {
        &self.settings.table_prefix
    }

    /// Renders a statement of another component kept beside the outbox (same database and
    /// prefix): `text` in this dialect's SQL with `$n` parameters, `{p}` and the dialect's
    /// shorthands (`{now}`).
    pub fn render(&self, text: &str) -> Statement {
        Statement::render(
            text,
            &fills::<D>(self.table_prefix(), &[]),
            D::PLACEHOLDERS,
            None,
        )
    }

    pub(crate) fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// Opens a write transaction (see [`Dialect::BEGIN_WRITE`]).
    pub async fn begin_write(&self) -> Result<Transaction<'static, D::Db>, StoreError> {
        match D::BEGIN_WRITE {
            Some(begin) => self.pool.begin_with(begin.into_sql_str()).await,
            None => self.pool.begin().await,
        }
        .map_err(store_error::<D>)
    }

    /// A connection of the pool.
    pub(crate) async fn acquire(&self) -> Result<PoolConnection<D::Db>, StoreError> {
        self.pool.acquire().await.map_err(store_error::<D>)
    }

    /// P, from the cache or through `conn` (which may be the caller's transaction: it may
    /// hold the pool's only connection), checking that the schema is this code's.
    pub(crate) async fn partition_count(
        &self,
        conn: &mut Connection<D>,
    ) -> Result<u32, StoreError> {
        if let Some(&partitions) = self.partitions.get() {
            return Ok(partitions);
        }
        let schema = migrate::outbox_schema::<D>();
        schema
            .check(migrate::read_number::<D>(conn, &self.statements, schema.version_key).await?)?;
        let recorded = migrate::read_number::<D>(conn, &self.statements, PARTITIONS_KEY).await?;
        let partitions = migrate::recorded_partitions(recorded)?;
        Ok(*self.partitions.get_or_init(|| partitions))
    }

    /// Writes `message` into the outbox inside the caller's transaction (pass `&mut *tx`)
    /// (G1): it exists if and only if that transaction commits. Assigns its id (unless
    /// given), its aggregate's next version and its partition. The aggregate's version row
    /// stays locked until the transaction ends, so writers of one aggregate are serialised
    /// and version order is commit order (G3).
    ///
    /// The message is validated first; on [`EnqueueError::Invalid`] no statement ran and the
    /// transaction can go on. On [`EnqueueError::Store`] roll it back (and retry it if the
    /// error is retryable, e.g. a deadlock victim).
    pub async fn enqueue(
        &self,
        conn: &mut Connection<D>,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        message.validate(self.settings.max_payload_bytes)?;
        let key = message.partition_key();
        let id = message.id.unwrap_or_else(Uuid::now_v7);
        let Some(bump) = &self.statements.version_bump else {
            let row = self
                .statements
                .enqueue
                .fetch_one::<D>(
                    conn,
                    &[
                        Arg::Text(&message.aggregate_type),
                        Arg::Text(&message.aggregate_id),
                        Arg::Text(&message.event_type),
                        Arg::Bytes(&message.payload),
                        Arg::Headers(&message.headers),
                        Arg::Text(&key),
                        Arg::Id(id),
                    ],
                )
                .await?;
            return enqueued::<D>(&row).map_err(EnqueueError::Store);
        };
        // The version bump goes first: as the transaction's first write it waits for the
        // aggregate's row lock (or SQLite's write lock) instead of failing later.
        let version: i64 = bump
            .fetch_one::<D>(
                conn,
                &[
                    Arg::Text(&message.aggregate_type),
                    Arg::Text(&message.aggregate_id),
                ],
            )
            .await?
            .col("version")
            .map_err(store_error::<D>)?;
        let version = u64::try_from(version).map_err(|_| {
            corrupt(format!(
                "aggregate {}/{} has a negative version {version}",
                message.aggregate_type, message.aggregate_id
            ))
        })?;
        let key = message.partition_key();
        let partition = partition_for(&key, self.partition_count(conn).await?);
        let sequence: i64 = self
            .statements
            .enqueue
            .fetch_one::<D>(conn, &row_args(&message, id, partition, version, &key)?)
            .await?
            .col("sequence")
            .map_err(store_error::<D>)?;
        debug!(message_id = %id, partition, version, sequence, "message enqueued");
        Ok(Enqueued {
            id,
            version,
            partition,
            sequence,
        })
    }

    /// Writes `message` again with its id (required) and the `version` it was first given,
    /// in the caller's transaction: a redelivery. A row of that id kept after publishing
    /// (retention) is replaced; a row still unpublished is left alone (`false`): it is on
    /// its way already.
    pub async fn requeue(
        &self,
        conn: &mut Connection<D>,
        message: NewMessage,
        version: u64,
    ) -> Result<bool, EnqueueError> {
        message.validate(self.settings.max_payload_bytes)?;
        let id = message
            .id
            .ok_or_else(|| corrupt("a requeued message needs its original id"))?;
        let key = message.partition_key();
        let partition = partition_for(&key, self.partition_count(conn).await?);
        self.statements
            .outbox_unkeep
            .execute::<D>(conn, &[Arg::Id(id)])
            .await?;
        let written = self
            .statements
            .outbox_requeue
            .execute::<D>(conn, &row_args(&message, id, partition, version, &key)?)
            .await?;
        Ok(written > 0)
    }

    /// The highest fencing epoch of any partition: a lease backend outside the store must
    /// grant epochs above it (see [`OutboxStore::adopt`](ferry_core::OutboxStore::adopt)).
    pub async fn highest_epoch(&self) -> Result<i64, StoreError> {
        let mut conn = self.acquire().await?;
        self.statements
            .epoch_highest
            .fetch_one::<D>(&mut conn, &[])
            .await?
            .col("epoch")
            .map_err(store_error::<D>)
    }
}

/// The arguments of an outbox row: `($1 id, $2 partition, $3 aggregate_type,
/// $4 aggregate_id, $5 version, $6 event_type, $7 payload, $8 headers, $9 partition_key)`.
fn row_args<'a>(
    message: &'a NewMessage,
    id: Uuid,
    partition: u32,
    version: u64,
    key: &'a str,
) -> Result<[Arg<'a>; 9], StoreError> {
    let version = i64::try_from(version)
        .map_err(|_| corrupt(format!("version {version} of message {id} is too large")))?;
    Ok([
        Arg::Id(id),
        partition.into(),
        Arg::Text(&message.aggregate_type),
        Arg::Text(&message.aggregate_id),
        Arg::Int(version),
        Arg::Text(&message.event_type),
        Arg::Bytes(&message.payload),
        Arg::Headers(&message.headers),
        Arg::Text(key),
    ])
}

/// The row an enqueue routine returns.
fn enqueued<D: Dialect>(row: &<D::Db as Database>::Row) -> Result<Enqueued, StoreError> {
    let read =
        |name: &str| -> Result<i64, StoreError> { row.col::<i64>(name).map_err(store_error::<D>) };
    let version = read("message_version")?;
    let partition: i32 = row.col("message_partition").map_err(store_error::<D>)?;
    Ok(Enqueued {
        id: row.col("message_id").map_err(store_error::<D>)?,
        version: u64::try_from(version)
            .map_err(|_| corrupt(format!("enqueue returned a negative version {version}")))?,
        partition: u32::try_from(partition)
            .map_err(|_| corrupt(format!("enqueue returned partition {partition}")))?,
        sequence: read("message_sequence")?,
    })
}
