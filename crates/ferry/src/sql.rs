//! What the SQL stores share: the table prefix, the outbox row and the store settings.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::{Headers, Message, ReceivedMessage, StoreError};

/// A validated table-name prefix (`ferry_` by default): every ferry table is
/// `<prefix><name>`, so several outboxes can share one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePrefix(String);

/// Longest prefix accepted, leaving room for the table names within identifier limits.
pub const MAX_PREFIX_LEN: usize = 40;

impl TablePrefix {
    /// Accepts `[a-z_][a-z0-9_]*`, at most [`MAX_PREFIX_LEN`] characters: it is spliced
    /// into SQL, so nothing else may pass.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidPrefix> {
        let prefix = prefix.into();
        let mut chars = prefix.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_start && valid_rest && prefix.len() <= MAX_PREFIX_LEN {
            Ok(Self(prefix))
        } else {
            Err(InvalidPrefix(prefix))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sql` with every `{p}` replaced by the prefix.
    pub fn render(&self, sql: &str) -> String {
        sql.replace("{p}", &self.0)
    }
}

impl Default for TablePrefix {
    fn default() -> Self {
        Self("ferry_".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "table_prefix {0:?} is not a valid identifier: use lowercase letters, digits and '_', starting with a letter or '_', at most {MAX_PREFIX_LEN} characters (e.g. \"ferry_\")"
)]
pub struct InvalidPrefix(pub String);

/// Settings every SQL store shares. Every default is what `StoreSettings::default` sets.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Defaults to `ferry_`.
    pub table_prefix: TablePrefix,
    /// Largest payload `enqueue` accepts. Defaults to 1 MiB.
    pub max_payload_bytes: usize,
    /// Keep published rows this long (for replay) instead of deleting them when marked.
    /// Defaults to zero: delete at once.
    pub retention: Duration,
    /// Leases come from a backend outside the store (Redis, etcd) and are adopted
    /// ([`OutboxStore::adopt`](ferry_core::OutboxStore::adopt)): marks then check the
    /// adopted epoch and owner instead of the store's own lease expiry. Defaults to false.
    pub external_leases: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            table_prefix: TablePrefix::default(),
            max_payload_bytes: 1024 * 1024,
            retention: Duration::ZERO,
            external_leases: false,
        }
    }
}

/// An outbox row as the SQL stores select it (`OUTBOX_COLUMNS`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    pub(crate) sequence: i64,
    pub(crate) id: Uuid,
    pub(crate) partition_no: i32,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) version: i64,
    pub(crate) event_type: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: sqlx::types::Json<Headers>,
    pub(crate) partition_key: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// The columns [`OutboxRow`] reads, in order (MySQL converts some: see its queries).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) const OUTBOX_COLUMNS: &str = "sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type, payload, headers, partition_key, created_at";

impl TryFrom<OutboxRow> for Message {
    type Error = StoreError;

    fn try_from(row: OutboxRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str| StoreError::Other(format!("outbox row {}: {what}", row.id).into());
        Ok(Message {
            id: row.id,
            version: u64::try_from(row.version).map_err(|_| corrupt("negative version"))?,
            partition: u32::try_from(row.partition_no)
                .map_err(|_| corrupt("partition out of range"))?,
            aggregate_type: row.aggregate_type,
            aggregate_id: row.aggregate_id,
            event_type: row.event_type,
            payload: Bytes::from(row.payload),
            headers: row.headers.0,
            partition_key: row.partition_key,
            created_at: row.created_at,
            sequence: row.sequence,
        })
    }
}

/// `message.version` as the inbox tables store it (a signed 64-bit integer).
pub(crate) fn inbox_version(message: &ReceivedMessage) -> Result<i64, StoreError> {
    i64::try_from(message.version).map_err(|_| {
        StoreError::Other(
            format!(
                "message {} has version {}, beyond what the inbox can store",
                message.id, message.version
            )
            .into(),
        )
    })
}

/// The aggregate's last applied version as an inbox read it (no row: 0).
pub(crate) fn last_applied_version(
    consumer: &str,
    message: &ReceivedMessage,
    stored: Option<i64>,
) -> Result<u64, StoreError> {
    let stored = stored.unwrap_or(0);
    u64::try_from(stored).map_err(|_| {
        StoreError::Other(
            format!(
                "inbox of {consumer}: negative version {stored} for {}/{}",
                message.aggregate_type, message.aggregate_id
            )
            .into(),
        )
    })
}

/// Maps a driver error: connection-level failures are retryable, a missing table points
/// at `ferry migrate`, the rest is reported as is.
pub fn store_error(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(err.into()),
        sqlx::Error::Database(db) => {
            let message = db.message().to_owned();
            let code = db.code().unwrap_or_default();
            let mysql = mysql_error_number(db.as_ref());
            // 42P01: PostgreSQL undefined_table; SQLite says "no such table".
            if code == "42P01"
                || message.contains("no such table")
                || code == "42883"
                || mysql.is_some_and(is_missing_object_mysql)
            {
                StoreError::Schema(format!("ferry's tables are missing: {message}"))
            } else if is_transient_code(&code) || mysql.is_some_and(is_transient_mysql) {
                StoreError::Unavailable(err.into())
            } else {
                StoreError::Other(err.into())
            }
        }
        _ => StoreError::Other(err.into()),
    }
}

/// The server's error number (e.g. 1213) when the error came from MySQL or MariaDB, whose
/// SQLSTATEs are too coarse to decide on (a lock wait timeout is the generic `HY000`).
fn mysql_error_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    #[cfg(feature = "mysql")]
    {
        db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(sqlx::mysql::MySqlDatabaseError::number)
    }
    #[cfg(not(feature = "mysql"))]
    {
        let _ = db;
        None
    }
}

/// MySQL/MariaDB errors that pass: lock wait timeout (1205), deadlock (1213), too many
/// connections (1040), server shutdown (1053), connection or query killed (1927, 1317),
/// read-only server during a failover (1290, 1836), idle connection closed (4031).
fn is_transient_mysql(number: u16) -> bool {
    matches!(
        number,
        1205 | 1213 | 1040 | 1053 | 1927 | 1317 | 1290 | 1836 | 4031
    )
}

/// MySQL/MariaDB: no such table (1146), procedure or function (1305).
fn is_missing_object_mysql(number: u16) -> bool {
    matches!(number, 1146 | 1305)
}

/// PostgreSQL SQLSTATEs (always five characters): class 08 (connection), 57P0x
/// (shutdown), 40001/40P01 (serialization, deadlock), 53xxx (resources); MySQL's
/// SQLSTATEs for a deadlock and for lost connections match the same rules. SQLite result
/// codes (numbers): BUSY (5) and LOCKED (6), including their extended forms such as
/// `SQLITE_BUSY_SNAPSHOT` (517), whose low byte is the primary code.
fn is_transient_code(code: &str) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    if code.len() == 5 {
        return code.starts_with("08")
            || code.starts_with("57P0")
            || code.starts_with("53")
            || code == "40001"
            || code == "40P01";
    }
    code.parse::<i32>()
        .is_ok_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

/// Most partitions an outbox may have.
pub const MAX_PARTITIONS: u32 = 4096;

/// Refuses a partition count outside 1..=[`MAX_PARTITIONS`] before anything is created.
pub(crate) fn check_partitions(partitions: u32) -> Result<(), StoreError> {
    if (1..=MAX_PARTITIONS).contains(&partitions) {
        Ok(())
    } else {
        Err(StoreError::Other(
            format!("partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}").into(),
        ))
    }
}

/// A sink checkpoint as the lease tables store it (a signed 64-bit integer).
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn stored_checkpoint(checkpoint: Option<u64>) -> Result<Option<i64>, StoreError> {
    checkpoint
        .map(|c| {
            i64::try_from(c).map_err(|_| {
                StoreError::Other(
                    format!("checkpoint {c} is beyond what the lease table holds").into(),
                )
            })
        })
        .transpose()
}

/// Deletes published rows past `retention` by running `delete_batch` (one statement that
/// deletes at most `batch` rows and says how many) until a batch comes back short, so that
/// no statement holds its locks for long; returns how many went.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) async fn purge_in_batches<F, Fut>(
    retention: Duration,
    batch: u64,
    mut delete_batch: F,
) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, sqlx::Error>>,
{
    let mut purged = 0;
    loop {
        let deleted = delete_batch().await.map_err(store_error)?;
        purged += deleted;
        if deleted < batch {
            break;
        }
    }
    if purged > 0 {
        tracing::info!(
            purged,
            retention_secs = retention.as_secs(),
            "purged published messages"
        );
    }
    Ok(purged)
}

/// A lease row joined with its partition's backlog, as the `status` statements of the
/// SQL stores read it.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
#[derive(Debug)]
pub(crate) struct StatusRow {
    pub(crate) partition_no: i64,
    /// Set only while the lease is unexpired.
    pub(crate) owner: Option<String>,
    pub(crate) epoch: i64,
    pub(crate) lease_expires_at: Option<DateTime<Utc>>,
    pub(crate) blocked_reason: Option<String>,
    pub(crate) backlog: i64,
    pub(crate) oldest_age_secs: Option<f64>,
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
impl TryFrom<StatusRow> for ferry_core::PartitionStatus {
    type Error = StoreError;

    fn try_from(row: StatusRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(format!("lease row {}: {what}", row.partition_no).into())
        };
        Ok(Self {
            partition: u32::try_from(row.partition_no)
                .map_err(|_| corrupt("partition out of range"))?,
            owner: row.owner,
            epoch: row.epoch,
            lease_expires_at: row.lease_expires_at,
            backlog: u64::try_from(row.backlog).map_err(|_| corrupt("negative backlog"))?,
            // A clock step back can make a fresh row look younger than zero.
            oldest_unpublished_age_secs: row.oldest_age_secs.map(|age| age.max(0.0)),
            blocked_reason: row.blocked_reason,
        })
    }
}

/// `sql` with `{p}` replaced by the prefix and each `(placeholder, text)` of `fills`
/// spliced in, as a statement whose clones are reference counts. Safe to splice: the
/// prefix is a validated identifier and the fills are the stores' own constants.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn statement(prefix: &TablePrefix, sql: &str, fills: &[(&str, &str)]) -> sqlx::SqlStr {
    use sqlx::SqlSafeStr;
    let sql = fills
        .iter()
        .fold(prefix.render(sql), |sql, (placeholder, text)| {
            sql.replace(placeholder, text)
        });
    sqlx::AssertSqlSafe(std::sync::Arc::<str>::from(sql)).into_sql_str()
}

/// A number from the meta table (`None` if the row is missing).
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn meta_number(key: &str, value: Option<String>) -> Result<Option<u64>, StoreError> {
    value
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                StoreError::Schema(format!("the meta row {key:?} is not a number: {v:?}"))
            })
        })
        .transpose()
}

/// What `migrate` refuses before it changes anything: a schema newer than this code, or a
/// partition count other than the one the outbox was created with.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn check_migration(
    current_version: u64,
    latest_version: usize,
    existing_partitions: Option<u64>,
    partitions: u32,
) -> Result<(), StoreError> {
    if current_version > latest_version as u64 {
        return Err(StoreError::Schema(format!(
            "the database has ferry schema version {current_version}, newer than this ferry's {latest_version}: upgrade ferry"
        )));
    }
    match existing_partitions {
        Some(existing) if existing != u64::from(partitions) => Err(StoreError::Schema(format!(
            "the outbox has {existing} partitions; the partition count is fixed at set-up (it decides which partition every key's messages are in) and cannot be changed to {partitions}: keep partitions = {existing}"
        ))),
        _ => Ok(()),
    }
}

/// P as `migrate` recorded it, once the schema is at the version this code needs.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn recorded_partitions(
    schema_version: Option<u64>,
    needed_version: usize,
    partitions: Option<u64>,
) -> Result<u32, StoreError> {
    if schema_version.is_none_or(|v| v < needed_version as u64) {
        return Err(StoreError::Schema(format!(
            "the ferry schema is at version {}, this ferry needs {needed_version}",
            schema_version.unwrap_or(0)
        )));
    }
    partitions
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| (1..=MAX_PARTITIONS).contains(p))
        .ok_or_else(|| {
            StoreError::Schema(format!(
                "the meta table has no valid partition count ({partitions:?})"
            ))
        })
}

/// Opens a pool of `max_connections` after one direct connection: the pool would retry a
/// refused connection silently until its acquire timeout, where one attempt reports the
/// cause at once (mapped by `probe_error`).
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn probe_and_pool<DB: sqlx::Database>(
    options: <DB::Connection as sqlx::Connection>::Options,
    max_connections: u32,
    probe_error: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<sqlx::Pool<DB>, StoreError> {
    use sqlx::Connection;
    let probe = DB::Connection::connect_with(&options)
        .await
        .map_err(probe_error)?;
    let _ = probe.close().await;
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(store_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes_of_both_databases() {
        for code in [
            "08006", "57P01", "53300", "40001", "40P01", "5", "6", "517", "262",
        ] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in ["23505", "42P01", "19", "2067", "1555"] {
            assert!(!is_transient_code(code), "{code}");
        }
        for number in [1205, 1213, 1040, 1927] {
            assert!(is_transient_mysql(number), "{number}");
        }
        // Duplicate key, access denied, unknown database, syntax error: retrying cannot help.
        for number in [1062, 1045, 1049, 1064] {
            assert!(!is_transient_mysql(number), "{number}");
        }
    }

    #[test]
    fn prefix_accepts_identifiers_only() {
        assert!(TablePrefix::new("ferry_").is_ok());
        assert!(TablePrefix::new("_t1_").is_ok());
        for bad in [
            "",
            "1abc",
            "Ferry",
            "a-b",
            "a;drop table x",
            &"a".repeat(41),
        ] {
            assert!(TablePrefix::new(bad).is_err(), "{bad:?}");
        }
        let p = TablePrefix::new("x_").expect("valid prefix");
        assert_eq!(
            p.render("SELECT * FROM {p}outbox"),
            "SELECT * FROM x_outbox"
        );
    }
}
