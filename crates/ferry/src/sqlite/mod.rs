//! SQLite: the outbox, leases and inbox of the SQL family ([`crate::sql`]) in one database
//! file, for embedded use and single-host deployments.
//!
//! SQLite has one writer at a time, so every write here is short and the lease and mark
//! checks that must be atomic run in `BEGIN IMMEDIATE` transactions (they take the write
//! lock up front instead of failing with `SQLITE_BUSY` when upgrading a read). Readers are
//! not blocked: the database runs in WAL mode. All times come from SQLite's clock, in unix
//! milliseconds. There are no notifications: the relay polls.
//!
//! Producers enqueue with [`SqliteOutbox::enqueue`] inside their own transaction (G1). A
//! producer that reads before it writes in that transaction should open it with
//! `pool.begin_with("BEGIN IMMEDIATE")`, for the same reason as above.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::error::DatabaseError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use uuid::Uuid;

use crate::sql::{
    Dialect, Driver, Enqueue, Fault, InboxQueries, Placeholders, Queries, QueryResult, SqlInbox,
    SqlOutbox, SqlQuery,
};

/// The outbox and lease store on SQLite.
pub type SqliteOutbox = SqlOutbox<SqliteDialect>;

/// The consumer inbox on SQLite.
pub type SqliteInbox = SqlInbox<SqliteDialect>;

/// How long a connection waits for the write lock before failing with `SQLITE_BUSY`
/// (which is retryable).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite 3.41 or later (bundled with ferry).
#[derive(Debug, Clone, Copy)]
pub struct SqliteDialect;

impl Driver for Sqlite {}

impl Dialect for SqliteDialect {
    type Db = Sqlite;

    const NAME: &'static str = "SQLite";
    const TLS_CA_SETTING: &'static str = "nothing: SQLite is a local file";
    const PLACEHOLDERS: Placeholders = Placeholders::Numbered;
    const QUERIES: Queries = crate::sql::queries!();
    /// `{now}` in unix milliseconds (the lease tables' times); `{now_text}` as RFC 3339
    /// UTC text with milliseconds (the outbox's, which sorts as text).
    const FILLS: &'static [(&'static str, &'static str)] = &[
        ("{now_text}", "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"),
        ("{now}", "CAST(unixepoch('subsec') * 1000 AS INTEGER)"),
    ];
    const MIGRATIONS: &'static [&'static str] = &[
        include_str!("migrations/0001_initial.sql"),
        include_str!("migrations/0002_operations.sql"),
    ];
    const ENQUEUE: Enqueue = Enqueue::Statements {
        bump: include_str!("queries/version_bump.sql"),
        insert: include_str!("queries/outbox_insert.sql"),
    };
    /// The ids go as one JSON array, which has no size limit.
    const MAX_IDS_PER_STATEMENT: usize = 10_000;
    const BEGIN_WRITE: Option<&'static str> = Some("BEGIN IMMEDIATE");
    /// The id's insert takes the database's write lock, so the version read and advance
    /// that follow cannot interleave with another instance of the consumer.
    const INBOX: InboxQueries = InboxQueries::Statements {
        record: include_str!("queries/inbox_record.sql"),
        last_version: include_str!("queries/inbox_last_version.sql"),
        advance: include_str!("queries/inbox_advance.sql"),
    };

    /// Opens (creating if missing) the database at `url` (`sqlite://path/to/file.db`), in
    /// WAL mode so that the relay's reads never block producers, with a 5 s busy timeout,
    /// `synchronous = NORMAL` (durable in WAL mode except for the last commits on power
    /// loss) and foreign keys on.
    fn connect_options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
        Ok(SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true))
    }

    fn describe(options: &SqliteConnectOptions) -> (String, String) {
        (options.get_filename().display().to_string(), String::new())
    }

    /// Result codes: BUSY (5) and LOCKED (6) pass, including their extended forms such as
    /// `SQLITE_BUSY_SNAPSHOT` (517), whose low byte is the primary code; "no such table"
    /// means ferry's schema is missing.
    fn classify(error: &dyn DatabaseError) -> Fault {
        const SQLITE_BUSY: i32 = 5;
        const SQLITE_LOCKED: i32 = 6;
        let code = error.code().and_then(|code| code.parse::<i32>().ok());
        if code.is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED)) {
            Fault::Transient
        } else if error.message().contains("no such table") {
            Fault::MissingSchema
        } else {
            Fault::Other
        }
    }

    fn rows_affected(result: &QueryResult<Self>) -> u64 {
        result.rows_affected()
    }

    /// `["<32 hex digits>", …]`, which the mark statements turn back into 16-byte ids with
    /// `json_each` and `unhex`: one bound value, so one cached statement for any batch size
    /// and no limit on the number of bound variables.
    fn bind_ids(query: SqlQuery<Sqlite>, ids: &[Uuid]) -> SqlQuery<Sqlite> {
        use std::fmt::Write as _;
        let mut json = String::with_capacity(2 + ids.len() * 35);
        json.push('[');
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            // Writing to a String cannot fail.
            let _ = write!(json, "\"{}\"", id.simple());
        }
        json.push(']');
        query.bind(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::statement_arity;

    #[test]
    fn every_statement_renders_with_its_arguments() {
        statement_arity::check::<SqliteDialect>();
    }
}
