//! What the SQL stores share: the table prefix, the outbox row and the store settings.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use ferry_core::{Headers, Message, StoreError};

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

/// An outbox row as both SQL stores select it (`OUTBOX_COLUMNS`).
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

/// The columns [`OutboxRow`] reads, in order.
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

/// Maps a driver error: connection-level failures are retryable, a missing table points
/// at `ferry migrate`, the rest is reported as is.
pub(crate) fn store_error(err: sqlx::Error) -> StoreError {
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
            // 42P01: PostgreSQL undefined_table; SQLite says "no such table".
            if code == "42P01" || message.contains("no such table") || code == "42883" {
                StoreError::Schema(format!("ferry's tables are missing: {message}"))
            } else if is_transient_code(&code) {
                StoreError::Unavailable(err.into())
            } else {
                StoreError::Other(err.into())
            }
        }
        _ => StoreError::Other(err.into()),
    }
}

/// PostgreSQL SQLSTATEs (always five characters): class 08 (connection), 57P0x
/// (shutdown), 40001/40P01 (serialization, deadlock), 53xxx (resources). SQLite result
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
