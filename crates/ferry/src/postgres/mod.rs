//! PostgreSQL: the outbox, leases and inbox of the SQL family ([`crate::sql`]), with
//! LISTEN/NOTIFY wake-ups.
//!
//! `ferry migrate` also installs `{prefix}enqueue` / `{prefix}enqueue_bytes`, the function
//! [`PgOutbox::enqueue`] calls, so that producers in any language write the outbox exactly
//! as the Rust API does, and, with `outbox.wake = "notify"` (the default), a trigger that
//! notifies the relay once per producing statement and partition.

#[cfg(feature = "postgres-capture")]
pub mod capture;

use std::str::FromStr;

use sqlx::error::DatabaseError;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Pool, Postgres};
use uuid::Uuid;

use ferry_core::{StoreError, Wakers};

use crate::sql::{
    Dialect, Driver, Enqueue, Fault, InboxQueries, NotifyTrigger, Placeholders, Queries,
    QueryResult, SqlInbox, SqlOutbox, SqlQuery, store_error,
};

/// An outbox in PostgreSQL. Cheap to clone; share one per process.
pub type PgOutbox = SqlOutbox<PgDialect>;

/// The consumer inbox in PostgreSQL.
pub type PgInbox = SqlInbox<PgDialect>;

/// PostgreSQL 12 or later (tested against 15).
#[derive(Debug, Clone, Copy)]
pub struct PgDialect;

impl Driver for Postgres {}

impl Dialect for PgDialect {
    type Db = Postgres;

    const NAME: &'static str = "PostgreSQL";
    const TLS_CA_SETTING: &'static str = "sslrootcert in store.url (with sslmode=verify-full)";
    const PLACEHOLDERS: Placeholders = Placeholders::Dollar;
    const QUERIES: Queries = crate::sql::queries!();
    const FILLS: &'static [(&'static str, &'static str)] = &[("{now}", "now()")];
    const MIGRATIONS: &'static [&'static str] = &[
        include_str!("migrations/0001_initial.sql"),
        include_str!("migrations/0002_operations.sql"),
        include_str!("migrations/0003_trace_context.sql"),
    ];
    const ENQUEUE: Enqueue = Enqueue::Routine(include_str!("queries/enqueue.sql"));
    /// Arrays have no size limit; chunks keep a reconciliation's statements moderate.
    const MAX_IDS_PER_STATEMENT: usize = 10_000;
    /// Only an ordered index scan reads a partition's head without touching the rest of
    /// its backlog; with sorting off, a plan made from missing or stale statistics (an
    /// outbox filled since autovacuum last analysed it) cannot read and sort the whole
    /// partition for every batch instead, as PostgreSQL otherwise does for the first
    /// executions on each connection.
    const FETCH_BEGIN: Option<&'static str> = Some("BEGIN READ ONLY; SET LOCAL enable_sort = off");
    /// A write transaction holds lease rows locked between its statements; a relay paused
    /// there (SIGSTOP, a stopped VM) would keep every other relay from taking its
    /// partitions over until it resumes. The server ends such a transaction after 5 s
    /// idle, well before a lease is taken over at the default TTL; the paused relay's
    /// commit then fails and its retry is fenced. Only ferry's own transactions get the
    /// limit, not the application's on the same pool.
    const BEGIN_WRITE: Option<&'static str> =
        Some("BEGIN; SET LOCAL idle_in_transaction_session_timeout = '5s'");
    const MIGRATION_LOCK: Option<&'static str> = Some(include_str!("queries/migration_lock.sql"));
    /// The first migration creates the trigger and its function `{p}notify()`.
    const NOTIFY_TRIGGER: Option<NotifyTrigger> = Some(NotifyTrigger {
        present: include_str!("queries/notify_trigger_present.sql"),
        create: include_str!("queries/notify_trigger_create.sql"),
        drop: include_str!("queries/notify_trigger_drop.sql"),
    });
    const INBOX: InboxQueries = InboxQueries::Routine(include_str!("queries/inbox_admit.sql"));

    fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        PgConnectOptions::from_str(url)
    }

    fn describe(options: &PgConnectOptions) -> (String, String) {
        (
            format!("{}:{}", options.get_host(), options.get_port()),
            options.get_username().to_owned(),
        )
    }

    /// SQLSTATEs: class 08 (connection), 57P0x (shutdown), 53xxx (resources),
    /// 40001/40P01 (serialization failure, deadlock) pass; 42P01/42883 (undefined table or
    /// function) mean ferry's schema is missing; class 28 is a refused login, 3D000 an
    /// unknown database.
    fn classify(error: &dyn DatabaseError) -> Fault {
        let code = error.code().unwrap_or_default();
        match code.as_ref() {
            "42P01" | "42883" => Fault::MissingSchema,
            "3D000" => Fault::UnknownDatabase,
            "40001" | "40P01" => Fault::Transient,
            code if code.starts_with("28") => Fault::Refused,
            code if code.starts_with("08")
                || code.starts_with("57P0")
                || code.starts_with("53") =>
            {
                Fault::Transient
            }
            _ => Fault::Other,
        }
    }

    fn rows_affected(result: &QueryResult<Self>) -> u64 {
        result.rows_affected()
    }

    fn bind_ids(query: SqlQuery<Postgres>, ids: &[Uuid]) -> SqlQuery<Postgres> {
        query.bind(ids)
    }

    async fn watch(
        pool: &Pool<Postgres>,
        channel: &str,
        wakers: &Wakers,
    ) -> Result<(), StoreError> {
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(store_error::<Self>)?;
        listener
            .listen(channel)
            .await
            .map_err(store_error::<Self>)?;
        // Rows committed before LISTEN took effect raised no wake-up we could see.
        wakers.wake_all();
        loop {
            match listener.try_recv().await.map_err(store_error::<Self>)? {
                Some(notification) => match notification.payload().parse() {
                    Ok(partition) => wakers.wake(partition),
                    Err(_) => wakers.wake_all(),
                },
                // The connection dropped and will be re-established by the next call;
                // anything notified meanwhile is lost, so look everywhere.
                None => wakers.wake_all(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::statement_arity;

    #[test]
    fn every_statement_renders_with_its_arguments() {
        statement_arity::check::<PgDialect>();
    }
}
