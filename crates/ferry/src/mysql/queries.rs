//! Every statement the MySQL store runs, rendered once per store with its table prefix.
//!
//! Placeholders: `{p}` is the table prefix, `{now}` the store's clock in UTC (so that relays
//! agree on lease expiry whatever their session's time zone), `{ids}` a list of `?` for a
//! batch of message ids. Names stored as VARBINARY are converted to utf8mb4 text where
//! they are read.

use sqlx::SqlStr;

use crate::sql::{TablePrefix, statement};

/// Versioned migrations, oldest first: version `n` is `MIGRATIONS[n - 1]`. Released
/// entries never change; a new schema version appends one.
pub(super) const MIGRATIONS: &[&str] = &[include_str!("schema_v1.sql")];

/// The schema version this code reads and writes.
pub(super) const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Keys of `{p}meta`.
pub(super) const META_PARTITIONS: &str = "partitions";
pub(super) const META_SCHEMA_VERSION: &str = "schema_version";

/// Most ids one mark statement binds; a larger set (a reconciliation) is marked in chunks
/// inside the same transaction.
pub(super) const MAX_IDS_PER_STATEMENT: usize = 1024;

const NOW: &str = "UTC_TIMESTAMP(6)";

/// The session settings the migration runs with. Stored routines keep the `sql_mode` they
/// were created under, so `enqueue` is strict (a too long name is an error, never
/// truncated) whatever the server's default or the caller's session.
pub(super) const MIGRATION_SQL_MODE: &str = "SET SESSION sql_mode = \
     'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'";
/// Concurrent `ferry migrate` runs queue here (up to 60 s). The lock is the session's and
/// goes with its connection.
pub(super) const MIGRATION_LOCK: &str = "SELECT GET_LOCK(?, 60)";
pub(super) const MIGRATION_UNLOCK: &str = "SELECT RELEASE_LOCK(?)";

const CREATE_META: &str = "CREATE TABLE IF NOT EXISTS {p}meta (\
     `key` VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL\
     ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin";
const READ_META: &str = "SELECT value FROM {p}meta WHERE `key` = ?";
const WRITE_META: &str = "INSERT INTO {p}meta (`key`, value) VALUES (?, ?) \
     ON DUPLICATE KEY UPDATE value = VALUES(value)";
/// Followed by `(0), (1), …, (P - 1)`: every partition gets its lease row.
pub(super) const CREATE_LEASES: &str = "INSERT INTO {p}leases (partition_no) VALUES ";
pub(super) const CREATE_LEASES_TAIL: &str = " ON DUPLICATE KEY UPDATE partition_no = partition_no";

/// Assigns version and partition and inserts the row, in the caller's transaction.
const ENQUEUE: &str = "CALL {p}enqueue(?, ?, ?, ?, ?, ?, ?)";

/// The columns [`crate::sql::OutboxRow`] reads, names as text.
const COLUMNS: &str = "sequence, id, partition_no, \
     CONVERT(aggregate_type USING utf8mb4) AS aggregate_type, \
     CONVERT(aggregate_id USING utf8mb4) AS aggregate_id, \
     version, event_type, payload, headers, partition_key, created_at";

/// A consistent read of committed rows, with no cursor: a row that commits late with a
/// lower sequence is returned by the next fetch.
const FETCH: &str = "SELECT {columns} FROM {p}outbox \
     WHERE partition_no = ? AND published_at IS NULL ORDER BY sequence LIMIT ?";

/// The fence of every mark: changes (and so locks until commit) the lease row only while
/// `(epoch, owner)` holds the partition (`{fence}`), recording the checkpoint without
/// moving it back. A grant or an adoption updates the same row, so it cannot come between
/// this and the mark. The connection reports matched rows (CLIENT_FOUND_ROWS), so an
/// unchanged checkpoint still counts as held.
const CHECK_LEASE: &str = "UPDATE {p}leases \
     SET checkpoint = COALESCE(GREATEST(checkpoint, ?), checkpoint, ?) \
     WHERE partition_no = ? AND {fence}";
/// `{fence}` of leases granted by this store: `(epoch, owner)` holds an unexpired lease.
const FENCE_OWN_LEASE: &str = "epoch = ? AND owner = ? AND expires_at > {now}";
/// `{fence}` of adopted leases (Redis, etcd): `(epoch, owner)` is the adopted one. Expiry
/// is the lease backend's business: a newer owner adopts before it touches anything,
/// which moves the epoch on.
const FENCE_ADOPTED_LEASE: &str = "epoch = ? AND owner = ?";
/// Raises the fencing epoch to that of an external lease, never lowering it; matches no
/// row when a newer epoch (or another owner of the same epoch) is there. A new epoch
/// clears the previous owner's blocked reason, as a grant does. Assignments run left to
/// right, so the reason is decided on the old epoch.
const ADOPT: &str = "UPDATE {p}leases \
     SET blocked_reason = CASE WHEN epoch = ? THEN blocked_reason END, owner = ?, epoch = ? \
     WHERE partition_no = ? AND (epoch < ? OR (epoch = ? AND owner = ?))";
/// Read in the adoption's transaction, under the row lock its update took.
const ADOPTED_CHECKPOINT: &str = "SELECT checkpoint FROM {p}leases WHERE partition_no = ?";
const HIGHEST_EPOCH: &str = "SELECT COALESCE(MAX(epoch), 0) FROM {p}leases";
/// Marks go through the unique id index (forced: the planner may prefer a scan of the
/// partition), so they lock exactly the rows they mark. A scan would lock the gaps of the
/// partition and wait on producers' uncommitted rows there, while those producers insert
/// into the locked gaps: a deadlock.
const DELETE_PUBLISHED: &str = "DELETE o FROM {p}outbox AS o FORCE INDEX (outbox_id) \
     WHERE o.id IN ({ids}) AND o.partition_no = ?";
const MARK_PUBLISHED: &str = "UPDATE {p}outbox FORCE INDEX (outbox_id) SET published_at = {now} \
     WHERE id IN ({ids}) AND partition_no = ? AND published_at IS NULL";
const SET_BLOCKED: &str = "UPDATE {p}leases SET blocked_reason = ? \
     WHERE partition_no = ? AND {fence}";
const STATUS: &str = "SELECT l.partition_no, \
         CASE WHEN l.expires_at > {now} THEN CONVERT(l.owner USING utf8mb4) END AS owner, \
         l.epoch, CASE WHEN l.expires_at > {now} THEN l.expires_at END AS expires_at, \
         l.blocked_reason, COALESCE(o.backlog, 0) AS backlog, \
         TIMESTAMPDIFF(MICROSECOND, o.oldest, {now}) / 1e6 AS oldest_age_secs \
     FROM {p}leases l LEFT JOIN ( \
         SELECT partition_no, COUNT(*) AS backlog, MIN(created_at) AS oldest \
         FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no \
     ) o ON o.partition_no = l.partition_no ORDER BY l.partition_no";
/// Deletes at most `?2` rows published more than `?1` microseconds ago; run in a loop so
/// that no statement holds its locks for long.
const PURGE_PUBLISHED: &str = "DELETE FROM {p}outbox \
     WHERE published_at < {now} - INTERVAL ? MICROSECOND LIMIT ?";

const HEARTBEAT: &str = "INSERT INTO {p}relays (relay_id, expires_at) \
     VALUES (?, {now} + INTERVAL ? MICROSECOND) \
     ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)";
/// Forgets relays dead for an hour: they are gone, not just late.
const FORGET_RELAYS: &str = "DELETE FROM {p}relays WHERE expires_at < {now} - INTERVAL 1 HOUR";
const LIVE_RELAYS: &str = "SELECT COUNT(*) FROM {p}relays WHERE expires_at > {now}";
/// Free or expired partitions, locked until the grant commits; rows another relay is
/// granting right now are skipped, not waited for. Random order spreads relays that start
/// together.
const FREE_LEASES: &str = "SELECT partition_no, epoch, clean, checkpoint, \
         GREATEST(TIMESTAMPDIFF(MICROSECOND, expires_at, {now}), 0) AS since_expiry_us \
     FROM {p}leases WHERE owner IS NULL OR expires_at <= {now} \
     ORDER BY RAND() LIMIT ? FOR UPDATE SKIP LOCKED";
/// Followed by the partitions granted. A grant clears the previous owner's blocked reason:
/// the new owner records it again if the message still fails.
pub(super) const GRANT_LEASES: &str = "UPDATE {p}leases \
     SET owner = ?, epoch = epoch + 1, expires_at = {now} + INTERVAL ? MICROSECOND, \
         clean = FALSE, blocked_reason = NULL \
     WHERE partition_no IN ";
/// Followed by the partitions to renew; locks them until the renewal commits.
pub(super) const HELD_LEASES: &str = "SELECT partition_no, epoch FROM {p}leases \
     WHERE owner = ? AND expires_at > {now} AND partition_no IN ";
pub(super) const EXTEND_LEASES: &str =
    "UPDATE {p}leases SET expires_at = {now} + INTERVAL ? MICROSECOND WHERE partition_no IN ";
const RELEASE_LEASE: &str = "UPDATE {p}leases \
     SET owner = NULL, expires_at = LEAST(expires_at, {now}), clean = ? \
     WHERE partition_no = ? AND epoch = ? AND owner = ?";
const LEAVE: &str = "DELETE FROM {p}relays WHERE relay_id = ?";

/// Records the id; a duplicate key error (1062) means this consumer saw it before. Only
/// that statement is rolled back, not the consumer's transaction.
const INBOX_RECORD: &str = "INSERT INTO {p}inbox \
     (consumer, id, aggregate_type, aggregate_id, version, processed_at) \
     VALUES (?, ?, ?, ?, ?, {now})";
/// Makes sure the aggregate's row exists and locks it (a primary-key duplicate takes a
/// record lock only, no gap lock), so that instances of one consumer handling the same
/// aggregate queue here.
const INBOX_LOCK_VERSION: &str = "INSERT INTO {p}inbox_versions \
     (consumer, aggregate_type, aggregate_id, version) VALUES (?, ?, ?, 0) \
     ON DUPLICATE KEY UPDATE version = version";
/// A locking read: the latest committed version, not the transaction's snapshot.
const INBOX_LAST_VERSION: &str = "SELECT version FROM {p}inbox_versions \
     WHERE consumer = ? AND aggregate_type = ? AND aggregate_id = ? FOR UPDATE";
const INBOX_ADVANCE: &str = "UPDATE {p}inbox_versions SET version = ? \
     WHERE consumer = ? AND aggregate_type = ? AND aggregate_id = ? AND version < ?";

pub(super) fn render(prefix: &TablePrefix, sql: &str) -> SqlStr {
    statement(prefix, sql, &[("{columns}", COLUMNS), ("{now}", NOW)])
}

/// `?, ?, …` with `n` marks, in parentheses.
pub(super) fn list(n: usize) -> String {
    let mut marks = String::with_capacity(2 + n * 3);
    marks.push('(');
    for i in 0..n {
        marks.push_str(if i == 0 { "?" } else { ", ?" });
    }
    marks.push(')');
    marks
}

/// Statements whose id list comes in power-of-two sizes up to [`MAX_IDS_PER_STATEMENT`]
/// (a batch is padded by repeating an id): a dozen prepared statements serve every batch
/// size, where one per size would churn the statement cache.
#[derive(Debug)]
pub(super) struct IdListStatement {
    by_size: Vec<SqlStr>,
}

impl IdListStatement {
    fn new(prefix: &TablePrefix, sql: &str) -> Self {
        let by_size = (0..=MAX_IDS_PER_STATEMENT.trailing_zeros())
            .map(|power| {
                let marks = list(1 << power);
                render(prefix, &sql.replace("({ids})", &marks))
            })
            .collect();
        Self { by_size }
    }

    /// The statement for `n` ids (1 to [`MAX_IDS_PER_STATEMENT`]) and how many it binds.
    pub(super) fn for_ids(&self, n: usize) -> (SqlStr, usize) {
        let size = n.clamp(1, MAX_IDS_PER_STATEMENT).next_power_of_two();
        (self.by_size[size.trailing_zeros() as usize].clone(), size)
    }
}

/// The outbox and lease statements of one store.
#[derive(Debug)]
pub(super) struct Queries {
    pub(super) prefix: TablePrefix,
    pub(super) migrations: Vec<String>,
    pub(super) create_meta: SqlStr,
    pub(super) read_meta: SqlStr,
    pub(super) write_meta: SqlStr,
    pub(super) enqueue: SqlStr,
    pub(super) fetch: SqlStr,
    pub(super) check_lease: SqlStr,
    pub(super) adopt: SqlStr,
    pub(super) adopted_checkpoint: SqlStr,
    pub(super) highest_epoch: SqlStr,
    pub(super) delete_published: IdListStatement,
    pub(super) mark_published: IdListStatement,
    pub(super) set_blocked: SqlStr,
    pub(super) status: SqlStr,
    pub(super) purge_published: SqlStr,
    pub(super) heartbeat: SqlStr,
    pub(super) forget_relays: SqlStr,
    pub(super) live_relays: SqlStr,
    pub(super) free_leases: SqlStr,
    pub(super) release_lease: SqlStr,
    pub(super) leave: SqlStr,
}

impl Queries {
    /// With `external_leases`, marks check the adopted lease instead of the store's own.
    pub(super) fn new(prefix: &TablePrefix, external_leases: bool) -> Self {
        let r = |sql| render(prefix, sql);
        let fence = if external_leases {
            FENCE_ADOPTED_LEASE
        } else {
            FENCE_OWN_LEASE
        };
        let fenced = |sql: &str| render(prefix, &sql.replace("{fence}", fence));
        Self {
            prefix: prefix.clone(),
            migrations: MIGRATIONS.iter().map(|sql| prefix.render(sql)).collect(),
            create_meta: r(CREATE_META),
            read_meta: r(READ_META),
            write_meta: r(WRITE_META),
            enqueue: r(ENQUEUE),
            fetch: r(FETCH),
            check_lease: fenced(CHECK_LEASE),
            adopt: r(ADOPT),
            adopted_checkpoint: r(ADOPTED_CHECKPOINT),
            highest_epoch: r(HIGHEST_EPOCH),
            delete_published: IdListStatement::new(prefix, DELETE_PUBLISHED),
            mark_published: IdListStatement::new(prefix, MARK_PUBLISHED),
            set_blocked: fenced(SET_BLOCKED),
            status: r(STATUS),
            purge_published: r(PURGE_PUBLISHED),
            heartbeat: r(HEARTBEAT),
            forget_relays: r(FORGET_RELAYS),
            live_relays: r(LIVE_RELAYS),
            free_leases: r(FREE_LEASES),
            release_lease: r(RELEASE_LEASE),
            leave: r(LEAVE),
        }
    }

    /// A statement ending in a list of `n` placeholders (`IN (?, …)`), for the rare lease
    /// statements whose list length varies.
    pub(super) fn with_list(&self, sql: &str, n: usize) -> SqlStr {
        let mut sql = sql.to_owned();
        sql.push_str(&list(n));
        render(&self.prefix, &sql)
    }
}

/// The statements of one consumer inbox.
#[derive(Debug)]
pub(super) struct InboxQueries {
    pub(super) record: SqlStr,
    pub(super) lock_version: SqlStr,
    pub(super) last_version: SqlStr,
    pub(super) advance: SqlStr,
}

impl InboxQueries {
    pub(super) fn new(prefix: &TablePrefix) -> Self {
        Self {
            record: render(prefix, INBOX_RECORD),
            lock_version: render(prefix, INBOX_LOCK_VERSION),
            last_version: render(prefix, INBOX_LAST_VERSION),
            advance: render(prefix, INBOX_ADVANCE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder() {
        let prefix = TablePrefix::default();
        let rendered = format!(
            "{:?} {:?} {:?}",
            Queries::new(&prefix, false),
            Queries::new(&prefix, true),
            InboxQueries::new(&prefix)
        );
        for placeholder in ["{p}", "{columns}", "{now}", "{ids}", "{fence}"] {
            assert!(
                !rendered.contains(placeholder),
                "{placeholder} left in {rendered}"
            );
        }
    }

    #[test]
    fn id_lists_come_in_powers_of_two() {
        let statements = IdListStatement::new(&TablePrefix::default(), DELETE_PUBLISHED);
        for (n, size) in [(1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024)] {
            let (sql, binds) = statements.for_ids(n);
            assert_eq!(binds, size, "{n} ids");
            assert_eq!(sql.as_str().matches('?').count(), size + 1, "{n} ids");
        }
        assert_eq!(list(3), "(?, ?, ?)");
    }
}
