//! Every statement the SQLite store runs, rendered once per store with its table prefix.
//!
//! Placeholders: `{p}` is the table prefix, `{columns}` the outbox columns the shared
//! [`OutboxRow`](crate::sql::OutboxRow) reads, `{now_ms}` the store's clock in unix
//! milliseconds and `{now_text}` the same clock as RFC 3339 UTC text with milliseconds (the
//! format of `created_at`, which sorts as text). Times always come from SQLite's clock,
//! never a relay's, so that relays agree on lease expiry.

use sqlx::SqlStr;

use crate::sql::{OUTBOX_COLUMNS, TablePrefix, statement};

/// Versioned migrations, oldest first: version `n` is `MIGRATIONS[n - 1]`. Released
/// entries never change; a new schema version appends one.
const MIGRATIONS: &[&str] = &[include_str!("migrations/0001_initial.sql")];

/// The schema version this code reads and writes.
pub(super) const SCHEMA_VERSION: usize = MIGRATIONS.len();

const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";
const NOW_TEXT: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Keys of `{p}meta`.
pub(super) const META_PARTITIONS: &str = "partitions";
pub(super) const META_SCHEMA_VERSION: &str = "schema_version";

const CREATE_META: &str = "CREATE TABLE IF NOT EXISTS {p}meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT, WITHOUT ROWID";
const READ_META: &str = "SELECT value FROM {p}meta WHERE key = ?1";
const WRITE_META: &str = "INSERT INTO {p}meta (key, value) VALUES (?1, ?2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// One lease row per partition, numbered 0..P.
const CREATE_LEASES: &str = "WITH RECURSIVE n(partition_no) AS \
     (SELECT 0 UNION ALL SELECT partition_no + 1 FROM n WHERE partition_no + 1 < ?1) \
     INSERT OR IGNORE INTO {p}leases (partition_no) SELECT partition_no FROM n";

/// Takes the next version of an aggregate. The write lock this takes is held until the
/// producer's transaction ends, so a second writer of the aggregate waits and gets the next
/// version: version order is commit order.
const BUMP_VERSION: &str = "INSERT INTO {p}aggregate_versions (aggregate_type, aggregate_id, version) \
     VALUES (?1, ?2, 1) \
     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = version + 1 \
     RETURNING version";
const INSERT_OUTBOX: &str = "INSERT INTO {p}outbox \
     (id, partition_no, aggregate_type, aggregate_id, version, event_type, payload, headers, partition_key) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
     RETURNING sequence";

const FETCH: &str = "SELECT {columns} FROM {p}outbox \
     WHERE partition_no = ?1 AND published_at IS NULL \
     ORDER BY sequence LIMIT ?2";

/// The fence of every mark: changes the lease row (recording the checkpoint, never moving
/// it back) only while `(owner, epoch)` holds the partition (`{fence}`). Run first in the
/// mark's write transaction, so no grant or adoption can slip in between the check and
/// the mark.
const CHECK_LEASE: &str = "UPDATE {p}leases \
     SET checkpoint = CASE WHEN ?4 IS NULL OR (checkpoint IS NOT NULL AND checkpoint >= ?4) \
         THEN checkpoint ELSE ?4 END \
     WHERE partition_no = ?1 AND {fence}";
/// `{fence}` of leases granted by this store: `(owner, epoch)` holds an unexpired lease.
const FENCE_OWN_LEASE: &str = "epoch = ?2 AND owner = ?3 AND expires_at > {now_ms}";
/// `{fence}` of adopted leases: `(owner, epoch)` is the adopted one. Expiry is the lease
/// backend's business: a newer owner adopts before it touches anything, which moves the
/// epoch on.
const FENCE_ADOPTED_LEASE: &str = "epoch = ?2 AND owner = ?3";
/// Raises the fencing epoch to `?2` for owner `?3`, never lowering it; returns the
/// checkpoint, or no row when a newer epoch (or another owner of `?2`) is there. A new
/// epoch clears the previous owner's blocked reason, as a grant does.
const ADOPT: &str = "UPDATE {p}leases \
     SET owner = ?3, epoch = ?2, \
         blocked_reason = CASE WHEN epoch = ?2 THEN blocked_reason END \
     WHERE partition_no = ?1 AND (epoch < ?2 OR (epoch = ?2 AND owner = ?3)) \
     RETURNING checkpoint";
const HIGHEST_EPOCH: &str = "SELECT COALESCE(MAX(epoch), 0) FROM {p}leases";
/// `?2` is a JSON array of ids in hex: one prepared statement whatever the batch size.
const DELETE_PUBLISHED: &str = "DELETE FROM {p}outbox \
     WHERE partition_no = ?1 AND id IN (SELECT unhex(value) FROM json_each(?2))";
const MARK_PUBLISHED: &str = "UPDATE {p}outbox SET published_at = {now_text} \
     WHERE partition_no = ?1 AND published_at IS NULL \
     AND id IN (SELECT unhex(value) FROM json_each(?2))";
const SET_BLOCKED: &str = "UPDATE {p}leases SET blocked_reason = ?4 \
     WHERE partition_no = ?1 AND {fence}";
const STATUS: &str = "SELECT l.partition_no, \
         CASE WHEN l.expires_at > {now_ms} THEN l.owner END AS owner, \
         l.epoch, l.expires_at, l.blocked_reason, \
         COALESCE(b.backlog, 0) AS backlog, b.oldest_age_secs \
     FROM {p}leases l LEFT JOIN ( \
         SELECT partition_no, COUNT(*) AS backlog, \
             (julianday('now') - julianday(MIN(created_at))) * 86400.0 AS oldest_age_secs \
         FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no \
     ) b ON b.partition_no = l.partition_no \
     ORDER BY l.partition_no";
/// Deletes at most `?2` rows published before now minus `?1` (an SQLite time modifier such
/// as `-86400.000 seconds`); run in a loop so producers are never locked out for long.
const PURGE_PUBLISHED: &str = "DELETE FROM {p}outbox WHERE sequence IN ( \
     SELECT sequence FROM {p}outbox \
     WHERE published_at IS NOT NULL \
     AND published_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1) \
     LIMIT ?2)";

const NOW: &str = "SELECT {now_ms}";
const HEARTBEAT: &str = "INSERT INTO {p}relays (relay_id, expires_at) VALUES (?1, ?2 + ?3) \
     ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at";
/// Forgets relays expired for longer than a TTL: they are gone, not just late.
const FORGET_RELAYS: &str = "DELETE FROM {p}relays WHERE expires_at <= ?1 - ?2";
const LIVE_RELAYS: &str = "SELECT COUNT(*) FROM {p}relays WHERE expires_at > ?1";
const FREE_LEASES: &str = "SELECT partition_no, owner, epoch, expires_at, clean, checkpoint \
     FROM {p}leases WHERE owner IS NULL OR expires_at <= ?1 \
     ORDER BY partition_no LIMIT ?2";
/// Grants the partitions listed in `?3` (a JSON array). A grant clears the previous
/// owner's blocked reason: the new owner records it again if the message still fails.
const GRANT_LEASES: &str = "UPDATE {p}leases \
     SET owner = ?1, epoch = epoch + 1, expires_at = ?2, clean = 0, blocked_reason = NULL \
     WHERE partition_no IN (SELECT value FROM json_each(?3)) \
     RETURNING partition_no, epoch";
/// `?1` is a JSON array of `[partition, epoch, owner]`.
const RENEW_LEASES: &str = "UPDATE {p}leases SET expires_at = {now_ms} + ?2 \
     WHERE expires_at > {now_ms} AND (partition_no, epoch, owner) IN ( \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') \
         FROM json_each(?1)) \
     RETURNING partition_no";
const RELEASE_LEASE: &str = "UPDATE {p}leases SET owner = NULL, expires_at = {now_ms}, clean = ?4 \
     WHERE partition_no = ?1 AND epoch = ?2 AND owner = ?3";
const LEAVE: &str = "DELETE FROM {p}relays WHERE relay_id = ?1";

/// Records the id; inserts nothing (and so changes no row) if this consumer saw it before.
const INBOX_INSERT: &str = "INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (consumer, id) DO NOTHING";
const INBOX_LAST_VERSION: &str = "SELECT version FROM {p}inbox_versions \
     WHERE consumer = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3";
/// Only ever moves the version forward, even if the caller's check were skipped.
const INBOX_ADVANCE: &str = "INSERT INTO {p}inbox_versions (consumer, aggregate_type, aggregate_id, version) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (consumer, aggregate_type, aggregate_id) \
     DO UPDATE SET version = excluded.version WHERE excluded.version > version";

fn render(prefix: &TablePrefix, sql: &str) -> SqlStr {
    render_fenced(prefix, sql, FENCE_OWN_LEASE)
}

/// Renders `sql` with `fence` as its `{fence}`.
fn render_fenced(prefix: &TablePrefix, sql: &str, fence: &str) -> SqlStr {
    statement(
        prefix,
        &sql.replace("{fence}", fence),
        &[
            ("{columns}", OUTBOX_COLUMNS),
            ("{now_ms}", NOW_MS),
            ("{now_text}", NOW_TEXT),
        ],
    )
}

/// The outbox and lease statements of one store.
#[derive(Debug)]
pub(super) struct Queries {
    pub(super) migrations: Vec<SqlStr>,
    pub(super) create_meta: SqlStr,
    pub(super) read_meta: SqlStr,
    pub(super) write_meta: SqlStr,
    pub(super) create_leases: SqlStr,
    pub(super) bump_version: SqlStr,
    pub(super) insert_outbox: SqlStr,
    pub(super) fetch: SqlStr,
    pub(super) check_lease: SqlStr,
    pub(super) adopt: SqlStr,
    pub(super) highest_epoch: SqlStr,
    pub(super) delete_published: SqlStr,
    pub(super) mark_published: SqlStr,
    pub(super) set_blocked: SqlStr,
    pub(super) status: SqlStr,
    pub(super) purge_published: SqlStr,
    pub(super) now: SqlStr,
    pub(super) heartbeat: SqlStr,
    pub(super) forget_relays: SqlStr,
    pub(super) live_relays: SqlStr,
    pub(super) free_leases: SqlStr,
    pub(super) grant_leases: SqlStr,
    pub(super) renew_leases: SqlStr,
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
        let fenced = |sql| render_fenced(prefix, sql, fence);
        Self {
            migrations: MIGRATIONS.iter().map(|sql| r(sql)).collect(),
            create_meta: r(CREATE_META),
            read_meta: r(READ_META),
            write_meta: r(WRITE_META),
            create_leases: r(CREATE_LEASES),
            bump_version: r(BUMP_VERSION),
            insert_outbox: r(INSERT_OUTBOX),
            fetch: r(FETCH),
            check_lease: fenced(CHECK_LEASE),
            adopt: r(ADOPT),
            highest_epoch: r(HIGHEST_EPOCH),
            delete_published: r(DELETE_PUBLISHED),
            mark_published: r(MARK_PUBLISHED),
            set_blocked: fenced(SET_BLOCKED),
            status: r(STATUS),
            purge_published: r(PURGE_PUBLISHED),
            now: r(NOW),
            heartbeat: r(HEARTBEAT),
            forget_relays: r(FORGET_RELAYS),
            live_relays: r(LIVE_RELAYS),
            free_leases: r(FREE_LEASES),
            grant_leases: r(GRANT_LEASES),
            renew_leases: r(RENEW_LEASES),
            release_lease: r(RELEASE_LEASE),
            leave: r(LEAVE),
        }
    }
}

/// The statements of one consumer inbox.
#[derive(Debug)]
pub(super) struct InboxQueries {
    pub(super) insert: SqlStr,
    pub(super) last_version: SqlStr,
    pub(super) advance: SqlStr,
}

impl InboxQueries {
    pub(super) fn new(prefix: &TablePrefix) -> Self {
        Self {
            insert: render(prefix, INBOX_INSERT),
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
        let queries = Queries::new(&prefix, true);
        let rendered = format!("{queries:?}");
        for placeholder in ["{p}", "{columns}", "{now_ms}", "{now_text}", "{fence}"] {
            assert!(
                !rendered.contains(placeholder),
                "{placeholder} left in {rendered}"
            );
        }
        assert!(queries.fetch.as_str().contains("FROM ferry_outbox"));
    }
}
