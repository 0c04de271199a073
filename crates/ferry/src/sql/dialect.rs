//! What differs between the SQL databases: the statements, the placeholder syntax, how a
//! write transaction starts, how ids are bound, and what their error codes mean. The
//! stores, leases, inbox and migrations are written once over it (see the parent module).

use std::future::Future;

use sqlx::error::DatabaseError;
use sqlx::{Connection, Database, Pool};
use uuid::Uuid;

use ferry_core::{StoreError, Wakers};

use super::driver::{Driver, SqlQuery};
use super::statement::Placeholders;
use super::wake::NotifyTrigger;

/// The options a driver connects with.
pub type ConnectOptions<D> = <<<D as Dialect>::Db as Database>::Connection as Connection>::Options;

/// The result of a statement that changes rows.
pub type QueryResult<D> = <<D as Dialect>::Db as Database>::QueryResult;

/// What a database error means to ferry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Lost connection, deadlock victim, lock timeout, server shutting down: retrying the
    /// same work can succeed.
    Transient,
    /// ferry's tables or routines are missing: `ferry migrate` has not run.
    MissingSchema,
    /// The server refused the user or password.
    Refused,
    /// The database named in the URL does not exist, or the user may not use it.
    UnknownDatabase,
    /// Anything else: reported as is, not retried.
    Other,
}

/// How `enqueue` writes a message.
#[derive(Debug, Clone, Copy)]
pub enum Enqueue {
    /// One call of the routine `ferry migrate` installs (which producers in other languages
    /// call too): `($1 aggregate_type, $2 aggregate_id, $3 event_type, $4 payload,
    /// $5 headers, $6 partition_key, $7 id)`, returning `message_id, message_version,
    /// message_partition, message_sequence`.
    Routine(&'static str),
    /// Two statements, the partition computed in Rust: `bump` takes the aggregate's next
    /// version (`$1 aggregate_type, $2 aggregate_id`, returning `version`), then `insert`
    /// writes the row (the arguments of [`Queries::outbox_requeue`], returning `sequence`).
    Statements {
        bump: &'static str,
        insert: &'static str,
    },
}

/// How the consumer inbox records a message and decides on it.
#[derive(Debug, Clone, Copy)]
pub enum InboxQueries {
    /// One call of the routine `ferry migrate` installs (which consumers in other
    /// languages call too): `($1 consumer, $2 id, $3 aggregate_type, $4 aggregate_id,
    /// $5 version)` → `decision` (`apply`, `duplicate` or `stale`) and `last_version`.
    Routine(&'static str),
    /// Three statements, the decision made in Rust (for databases without routines).
    Statements {
        /// `($1 consumer, $2 id, $3 aggregate_type, $4 aggregate_id, $5 version)`: changes
        /// no row when the consumer recorded the id before.
        record: &'static str,
        /// `($1 consumer, $2 aggregate_type, $3 aggregate_id)` → `version`.
        last_version: &'static str,
        /// `($1 consumer, $2 aggregate_type, $3 aggregate_id, $4 version)`: changes no row
        /// if the aggregate is already at or past `version`.
        advance: &'static str,
    },
}

/// The statements of one dialect, one `.sql` file each in the dialect's `queries/`
/// folder (loaded by [`queries!`](crate::sql::queries)), written with `$n` parameters and
/// `{p}` for the table prefix. What each returns is named after its columns; the
/// parameters are listed here and bound in this order everywhere.
#[derive(Debug, Clone, Copy)]
pub struct Queries {
    /// Creates `{p}meta (key, value)` if missing.
    pub meta_create: &'static str,
    /// `($1 key)` → `value`.
    pub meta_read: &'static str,
    /// `($1 key, $2 value)`, insert or replace.
    pub meta_write: &'static str,
    /// `($1 partitions)`: a lease row for each partition below it that has none.
    pub leases_create: &'static str,
    /// `($1 id, $2 partition, $3 aggregate_type, $4 aggregate_id, $5 version,
    /// $6 event_type, $7 payload, $8 headers, $9 partition_key)`: inserts the row unless
    /// one with the id is still there.
    pub outbox_requeue: &'static str,
    /// `($1 id)`: deletes the row of that id if it is kept after publishing.
    pub outbox_unkeep: &'static str,
    /// `($1 partition, $2 limit)` → the unpublished rows in sequence order, but for those
    /// of aggregates a parked message holds, with the columns `sequence, id, partition_no,
    /// aggregate_type, aggregate_id, version, event_type, payload, headers, partition_key,
    /// created_at` in this order (they are read by position).
    pub fetch: &'static str,
    /// `($1 partition, $2 epoch, $3 owner, $4 checkpoint)`: records the checkpoint (never
    /// lower) only while `{fence}` holds; the row it changes is the mark's fence.
    pub lease_check: &'static str,
    /// `($1 partition, $2 ids)`: deletes the rows.
    pub mark_delete: &'static str,
    /// `($1 partition, $2 ids)`: stamps the rows published.
    pub mark_keep: &'static str,
    /// `($1 partition, $2 ids)` → `id` of those rows still unpublished (log capture).
    pub unpublished: &'static str,
    /// `($1 partition, $2 epoch, $3 owner, $4 reason)` while `{fence}` holds; sets
    /// `blocked_at` when the partition becomes blocked, clears it with the reason.
    pub blocked_set: &'static str,
    /// `($1 partition, $2 epoch, $3 owner)` while `{fence}` holds: clears an operator's
    /// retry request; changes a row only if there was one.
    pub retry_take: &'static str,
    /// `($1 partition)`: requests a retry of a blocked partition's head.
    pub retry_request: &'static str,
    /// `()` → `partition_no, blocked_reason, blocked_at_ms` of the blocked partitions.
    pub blocked_list: &'static str,
    /// `($1 partition, $2 aggregate_type, $3 aggregate_id, $4 parked_by, $5 reason)`:
    /// copies the aggregate's unpublished rows of the partition to the parked messages,
    /// holding the aggregate.
    pub park_aggregate: &'static str,
    /// `($1 partition, $2 aggregate_type, $3 aggregate_id)`: deletes them from the outbox.
    pub outbox_delete_aggregate: &'static str,
    /// `($1 id)` → `partition_no` of the unpublished row, locked where the database can.
    pub outbox_partition_of: &'static str,
    /// `($1 id, $2 parked_by, $3 reason)`: copies the unpublished row to the parked
    /// messages, holding nothing.
    pub park_one: &'static str,
    /// `($1 id)`: deletes the unpublished row.
    pub outbox_delete_one: &'static str,
    /// `($1 aggregate_type or NULL, $2 aggregate_id, $3 after sequence, $4 limit)` → the
    /// `fetch` columns in order, then `parked_at_ms, parked_by, reason, holds_aggregate`.
    pub parked_list: &'static str,
    /// `($1 id)` → the columns of `parked_list` for that message.
    pub parked_get: &'static str,
    /// `($1 aggregate_type, $2 aggregate_id)`: copies the aggregate's parked messages back
    /// into the outbox with their sequences.
    pub parked_requeue: &'static str,
    /// `($1 aggregate_type, $2 aggregate_id)`: deletes the aggregate's parked messages.
    pub parked_delete_aggregate: &'static str,
    /// `($1 older_than_ms, $2 limit)`: deletes inbox records processed longer ago.
    pub purge_inbox: &'static str,
    /// `($1 older_than_ms, $2 limit)`: deletes parked messages parked longer ago.
    pub purge_parked: &'static str,
    /// `($1 partition or NULL, $2 from sequence, $3 to sequence, $4 created since (ms) or
    /// NULL, $5 created until (ms) or NULL, $6 aggregate_type or NULL, $7 aggregate_id,
    /// $8 limit)` → the `fetch` columns of published (kept) rows, in sequence order.
    pub retained_page: &'static str,
    /// The same selection without `$8` → `count, first_sequence, last_sequence,
    /// first_created_at_ms, last_created_at_ms`.
    pub retained_summary: &'static str,
    /// `($1 partition, $2 epoch, $3 owner)`: raises the fencing epoch, never lowering it.
    pub adopt: &'static str,
    /// `($1 partition)` → `checkpoint`.
    pub checkpoint_read: &'static str,
    /// `()` → `epoch`, the highest of any partition.
    pub epoch_highest: &'static str,
    /// `()` → `partition_no, owner, epoch, expires_at_ms, blocked_reason, backlog,
    /// oldest_age_secs`, owner and expiry only while the lease is unexpired.
    pub status: &'static str,
    /// `($1 retention_ms, $2 limit)`: deletes at most `limit` rows published longer ago.
    pub purge: &'static str,
    /// `($1 relay, $2 ttl_ms)`: the relay is alive for the TTL.
    pub relay_heartbeat: &'static str,
    /// `()`: forgets relays dead for an hour.
    pub relays_forget: &'static str,
    /// `()` → `live`, the relays alive now.
    pub relays_live: &'static str,
    /// `($1 max)` → `partition_no, epoch, clean, checkpoint, since_expiry_ms` of free or
    /// expired partitions, locked until the transaction ends where the database can.
    pub leases_free: &'static str,
    /// `($1 relay, $2 ttl_ms, $3 partition, $4 epoch before the grant)`: epoch + 1.
    pub lease_grant: &'static str,
    /// `($1 partition, $2 epoch, $3 owner, $4 ttl_ms)`, only while unexpired.
    pub lease_renew: &'static str,
    /// `($1 partition, $2 epoch, $3 owner, $4 clean)`.
    pub lease_release: &'static str,
    /// `($1 relay)`.
    pub relay_leave: &'static str,
}

/// The [`Queries`] in the `queries/` folder next to the file that invokes it: every
/// dialect has a file of the same name for each statement.
macro_rules! queries {
    () => {
        $crate::sql::Queries {
            meta_create: include_str!("queries/meta_create.sql"),
            meta_read: include_str!("queries/meta_read.sql"),
            meta_write: include_str!("queries/meta_write.sql"),
            leases_create: include_str!("queries/leases_create.sql"),
            outbox_requeue: include_str!("queries/outbox_requeue.sql"),
            outbox_unkeep: include_str!("queries/outbox_unkeep.sql"),
            fetch: include_str!("queries/fetch.sql"),
            lease_check: include_str!("queries/lease_check.sql"),
            mark_delete: include_str!("queries/mark_delete.sql"),
            mark_keep: include_str!("queries/mark_keep.sql"),
            unpublished: include_str!("queries/unpublished.sql"),
            blocked_set: include_str!("queries/blocked_set.sql"),
            retry_take: include_str!("queries/retry_take.sql"),
            retry_request: include_str!("queries/retry_request.sql"),
            blocked_list: include_str!("queries/blocked_list.sql"),
            park_aggregate: include_str!("queries/park_aggregate.sql"),
            outbox_delete_aggregate: include_str!("queries/outbox_delete_aggregate.sql"),
            outbox_partition_of: include_str!("queries/outbox_partition_of.sql"),
            park_one: include_str!("queries/park_one.sql"),
            outbox_delete_one: include_str!("queries/outbox_delete_one.sql"),
            parked_list: include_str!("queries/parked_list.sql"),
            parked_get: include_str!("queries/parked_get.sql"),
            parked_requeue: include_str!("queries/parked_requeue.sql"),
            parked_delete_aggregate: include_str!("queries/parked_delete_aggregate.sql"),
            purge_inbox: include_str!("queries/purge_inbox.sql"),
            purge_parked: include_str!("queries/purge_parked.sql"),
            retained_page: include_str!("queries/retained_page.sql"),
            retained_summary: include_str!("queries/retained_summary.sql"),
            adopt: include_str!("queries/adopt.sql"),
            checkpoint_read: include_str!("queries/checkpoint_read.sql"),
            epoch_highest: include_str!("queries/epoch_highest.sql"),
            status: include_str!("queries/status.sql"),
            purge: include_str!("queries/purge.sql"),
            relay_heartbeat: include_str!("queries/relay_heartbeat.sql"),
            relays_forget: include_str!("queries/relays_forget.sql"),
            relays_live: include_str!("queries/relays_live.sql"),
            leases_free: include_str!("queries/leases_free.sql"),
            lease_grant: include_str!("queries/lease_grant.sql"),
            lease_renew: include_str!("queries/lease_renew.sql"),
            lease_release: include_str!("queries/lease_release.sql"),
            relay_leave: include_str!("queries/relay_leave.sql"),
        }
    };
}
pub(crate) use queries;

/// A SQL database ferry keeps its outbox, leases and inbox in. Implemented by a marker
/// type per database ([`PgDialect`](crate::postgres::PgDialect), …); everything else is
/// generic over it.
pub trait Dialect: std::fmt::Debug + Send + Sync + 'static {
    type Db: Driver;

    /// The database's name in messages ("PostgreSQL").
    const NAME: &'static str;
    /// Where the URL names the CA that checks the server's TLS certificate, for messages.
    const TLS_CA_SETTING: &'static str;
    const PLACEHOLDERS: Placeholders;
    /// The statements.
    const QUERIES: Queries;
    /// Texts spliced into every statement: `{now}` (the database's clock, in the type the
    /// lease tables use) and any other shorthand the dialect's statements use.
    const FILLS: &'static [(&'static str, &'static str)];
    /// Versioned migrations of ferry's tables, oldest first: version `n` is entry `n - 1`.
    /// `{p}` is the table prefix and `{partitions}` the partition count.
    const MIGRATIONS: &'static [&'static str];
    const ENQUEUE: Enqueue;
    /// Most ids bound in one statement; a longer list is marked in chunks, in one
    /// transaction.
    const MAX_IDS_PER_STATEMENT: usize;
    /// The statement that opens a write transaction, when the default `BEGIN` would fail
    /// late under contention (SQLite upgrades a read lock to a write lock only if no other
    /// writer committed meanwhile).
    const BEGIN_WRITE: Option<&'static str> = None;
    /// The statement that opens the transaction `fetch` runs in, when it needs one.
    const FETCH_BEGIN: Option<&'static str> = None;
    /// Run once on the connection a migration uses, before it begins.
    const MIGRATION_SESSION: Option<&'static str> = None;
    /// `($1 name)` → `locked`: takes a lock that serialises concurrent migrations, held
    /// until the migration's transaction or connection ends. None where the write
    /// transaction itself is that lock.
    const MIGRATION_LOCK: Option<&'static str> = None;
    /// The trigger that notifies the relay of committed rows, where the database can
    /// notify: `migrate` makes its presence follow [`StoreSettings::wake`](super::StoreSettings::wake).
    const NOTIFY_TRIGGER: Option<NotifyTrigger> = None;
    const INBOX: InboxQueries;

    /// Parses a connection URL (`postgres://…`, `mysql://…`, `sqlite://…`) into the options
    /// ferry connects with.
    fn connect_options(url: &str) -> Result<ConnectOptions<Self>, sqlx::Error>;

    /// The server (host and port, or file) and the user, for error messages.
    fn describe(options: &ConnectOptions<Self>) -> (String, String);

    /// What a database error means.
    fn classify(error: &dyn DatabaseError) -> Fault;

    /// How many rows a statement changed (or matched, where the driver reports that).
    fn rows_affected(result: &QueryResult<Self>) -> u64;

    /// Binds a list of ids as one argument; dialects with one placeholder per id never
    /// call it (see [`Statement::query`](super::Statement::query)).
    fn bind_ids(query: SqlQuery<Self::Db>, ids: &[Uuid]) -> SqlQuery<Self::Db>;

    /// Runs until an error, waking partitions when rows commit, where the database can
    /// notify; others keep the default and the relay polls.
    fn watch(
        pool: &Pool<Self::Db>,
        channel: &str,
        wakers: &Wakers,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (pool, channel, wakers);
        std::future::pending()
    }
}
