//! MySQL / MariaDB: the outbox, leases and inbox of the SQL family ([`crate::sql`]).
//! MariaDB 10.6+ or MySQL 8.0.29+ (tested against MariaDB 10.11).
//!
//! `ferry migrate` also installs the procedure `{prefix}enqueue` that
//! [`MyOutbox::enqueue`] calls (one round trip per message), so producers in any language
//! write the outbox exactly as the Rust API does, and `{prefix}enqueue_traced`, the same
//! with the producer's trace context (`traceparent`, `tracestate`).
//!
//! MySQL has no notifications: the relay polls each owned partition every
//! `poll_interval` when it finds nothing to do. AUTO_INCREMENT sequences may commit out of
//! order; fetch keeps no cursor, so a late commit with a lower sequence is read by the next
//! fetch, and per-aggregate order holds because `enqueue` locks the aggregate's version row
//! before it takes a sequence.
//!
//! Producers: InnoDB resolves lock cycles by rolling one transaction back with a deadlock
//! error (1213), which [`StoreError::is_retryable`](ferry_core::StoreError::is_retryable)
//! reports as retryable: retry the whole transaction. Writers of disjoint aggregates do
//! not block each other in `enqueue`.

#[cfg(feature = "mysql-capture")]
pub mod capture;

use std::str::FromStr;

use sqlx::MySql;
use sqlx::error::DatabaseError;
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError};
use uuid::Uuid;

use crate::sql::{
    Bind, Dialect, Driver, Enqueue, Fault, InboxQueries, Placeholders, Queries, QueryResult,
    SqlInbox, SqlOutbox, SqlQuery,
};

/// An outbox in MySQL or MariaDB. Cheap to clone; share one per process.
pub type MyOutbox = SqlOutbox<MyDialect>;

/// The consumer inbox in MySQL or MariaDB.
pub type MyInbox = SqlInbox<MyDialect>;

/// MySQL and MariaDB.
#[derive(Debug, Clone, Copy)]
pub struct MyDialect;

impl Driver for MySql {}

impl Dialect for MyDialect {
    type Db = MySql;

    const NAME: &'static str = "MySQL";
    const TLS_CA_SETTING: &'static str = "ssl-ca in store.url (with ssl-mode=VERIFY_IDENTITY)";
    const PLACEHOLDERS: Placeholders = Placeholders::Positional;
    const QUERIES: Queries = crate::sql::queries!();
    /// The server's clock in UTC (times are `DATETIME(6)`), so that relays agree on lease
    /// expiry whatever their session's time zone.
    const FILLS: &'static [(&'static str, &'static str)] = &[("{now}", "UTC_TIMESTAMP(6)")];
    const MIGRATIONS: &'static [&'static str] = &[
        include_str!("migrations/0001_initial.sql"),
        include_str!("migrations/0002_operations.sql"),
        include_str!("migrations/0003_trace_context.sql"),
        include_str!("migrations/0004_capture.sql"),
    ];
    const ENQUEUE: Enqueue = Enqueue::Routine(include_str!("queries/enqueue.sql"));
    /// One placeholder per id; a reconciliation's longer list goes in chunks.
    const MAX_IDS_PER_STATEMENT: usize = 1024;
    const MIGRATION_SESSION: Option<&'static str> =
        Some(include_str!("queries/migration_session.sql"));
    const MIGRATION_LOCK: Option<&'static str> = Some(include_str!("queries/migration_lock.sql"));
    const INBOX: InboxQueries = InboxQueries::Routine(include_str!("queries/inbox_admit.sql"));

    fn connect_options(url: &str) -> Result<MySqlConnectOptions, sqlx::Error> {
        MySqlConnectOptions::from_str(url)
    }

    fn describe(options: &MySqlConnectOptions) -> (String, String) {
        let server = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        (server, options.get_username().to_owned())
    }

    /// By the server's error number, as SQLSTATEs are too coarse (a lock wait timeout is
    /// the generic `HY000`): lock wait timeout (1205), deadlock (1213), too many
    /// connections (1040), server shutdown (1053), connection or query killed (1927, 1317),
    /// read-only server during a failover (1290, 1836) and idle connection closed (4031)
    /// pass, as does SQLSTATE class 08 (connection); no such table (1146) or routine (1305)
    /// means ferry's schema is missing; 1045 is a refused login, 1044/1049 a database the
    /// user may not use or that does not exist.
    fn classify(error: &dyn DatabaseError) -> Fault {
        let number = error
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number);
        match number {
            Some(1205 | 1213 | 1040 | 1053 | 1927 | 1317 | 1290 | 1836 | 4031) => Fault::Transient,
            Some(1146 | 1305) => Fault::MissingSchema,
            Some(1045) => Fault::Refused,
            Some(1044 | 1049) => Fault::UnknownDatabase,
            _ if error.code().is_some_and(|code| code.starts_with("08")) => Fault::Transient,
            _ => Fault::Other,
        }
    }

    fn rows_affected(result: &QueryResult<Self>) -> u64 {
        result.rows_affected()
    }

    /// The statements have one placeholder per id, so the ids bind one by one.
    fn bind_ids(query: SqlQuery<MySql>, ids: &[Uuid]) -> SqlQuery<MySql> {
        ids.iter().fold(query, |query, id| {
            <MySql as Bind<Uuid>>::bind_value(query, *id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::statement_arity;

    #[test]
    fn every_statement_renders_with_its_arguments() {
        statement_arity::check::<MyDialect>();
    }
}
