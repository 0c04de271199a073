//! The consumer inbox in a SQL database: processed ids and applied versions kept in the
//! consumer's own transaction (G4), for any [`Dialect`]. Where the database has routines
//! (PostgreSQL, MySQL) the decision is the one `ferry migrate` installs for consumers in
//! every language, so theirs and Rust's cannot differ; elsewhere (SQLite) three statements
//! and [`Decision`] make the same one.

use std::marker::PhantomData;
use std::sync::Arc;

use sqlx::Transaction;
use tracing::debug;

use ferry_core::inbox::process;
use ferry_core::{
    Admission, Decision, Inbox, ProcessError, Processed, ReceivedMessage, StoreError,
};

use super::TablePrefix;
use super::dialect::{Dialect, InboxQueries};
use super::driver::RowExt;
use super::error::{corrupt, store_error};
use super::outbox::{Connection, fills};
use super::statement::{Arg, Statement};

/// How one consumer inbox decides, rendered for its prefix.
#[derive(Debug)]
enum InboxStatements {
    Routine(Statement),
    Statements {
        record: Statement,
        last_version: Statement,
        advance: Statement,
    },
}

/// Records processed ids and applied versions for one named consumer (shared by all its
/// instances), in tables `<prefix>inbox` and `<prefix>inbox_versions`, which
/// [`SqlOutbox::migrate`](super::SqlOutbox::migrate) creates (a consumer runs it on its own
/// database too).
#[derive(Debug)]
pub struct SqlInbox<D: Dialect> {
    consumer: String,
    statements: Arc<InboxStatements>,
    dialect: PhantomData<fn() -> D>,
}

impl<D: Dialect> Clone for SqlInbox<D> {
    fn clone(&self) -> Self {
        Self {
            consumer: self.consumer.clone(),
            statements: Arc::clone(&self.statements),
            dialect: PhantomData,
        }
    }
}

impl<D: Dialect> SqlInbox<D> {
    /// `consumer` names the subscriber: consumers sharing a database keep separate records.
    pub fn new(consumer: impl Into<String>, prefix: &TablePrefix) -> Self {
        let fills = fills::<D>(prefix, &[]);
        let r = |text: &str| Statement::render(text, &fills, D::PLACEHOLDERS, None);
        let statements = match D::INBOX {
            InboxQueries::Routine(call) => InboxStatements::Routine(r(call)),
            InboxQueries::Statements {
                record,
                last_version,
                advance,
            } => InboxStatements::Statements {
                record: r(record),
                last_version: r(last_version),
                advance: r(advance),
            },
        };
        Self {
            consumer: consumer.into(),
            statements: Arc::new(statements),
            dialect: PhantomData,
        }
    }

    /// Applies `message` with `handler` exactly once and only if newer than the last
    /// applied version of its aggregate; see [`ferry_core::inbox::process`]. Commit `tx` on
    /// `Ok`, roll it back on `Err`.
    pub async fn process<'c, T, E>(
        &self,
        tx: &mut Transaction<'c, D::Db>,
        message: &ReceivedMessage,
        handler: impl AsyncFnOnce(&mut Transaction<'c, D::Db>, &ReceivedMessage) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        process(self, tx, message, handler).await
    }

    /// The routine's decision.
    async fn call(
        &self,
        routine: &Statement,
        conn: &mut Connection<D>,
        message: &ReceivedMessage,
        version: i64,
    ) -> Result<Admission, StoreError> {
        let row = routine
            .fetch_one::<D>(
                conn,
                &[
                    Arg::Text(&self.consumer),
                    Arg::Id(message.id),
                    Arg::Text(&message.aggregate_type),
                    Arg::Text(&message.aggregate_id),
                    Arg::Int(version),
                ],
            )
            .await?;
        let decision: String = row.col("decision").map_err(store_error::<D>)?;
        let last: i64 = row.col("last_version").map_err(store_error::<D>)?;
        let last = self.stored_version(message, last)?;
        match decision.as_str() {
            "apply" => Ok(Admission::Apply {
                previous_version: last,
            }),
            "duplicate" => Ok(Admission::Duplicate),
            "stale" => Ok(Admission::Stale {
                last_applied_version: last,
            }),
            other => Err(corrupt(format!(
                "the inbox routine answered {other:?}, not apply, duplicate or stale"
            ))),
        }
    }

    /// The decision made here: record the id (a repeat is a duplicate), read the last
    /// applied version, advance it only upwards; if another instance of the consumer
    /// advanced it meanwhile, the message is stale.
    async fn decide(
        &self,
        [record, last_version, advance]: [&Statement; 3],
        conn: &mut Connection<D>,
        message: &ReceivedMessage,
        version: i64,
    ) -> Result<Admission, StoreError> {
        let key = [
            Arg::Text(&self.consumer),
            Arg::Text(&message.aggregate_type),
            Arg::Text(&message.aggregate_id),
        ];
        let recorded = record
            .execute::<D>(
                conn,
                &[
                    key[0],
                    Arg::Id(message.id),
                    key[1],
                    key[2],
                    Arg::Int(version),
                ],
            )
            .await?
            > 0;
        let read_last = async |conn: &mut Connection<D>| -> Result<u64, StoreError> {
            let stored: Option<i64> = last_version
                .fetch_optional::<D>(conn, &key)
                .await?
                .map(|row| row.col("version"))
                .transpose()
                .map_err(store_error::<D>)?;
            self.stored_version(message, stored.unwrap_or(0))
        };
        let last = read_last(conn).await?;
        let decision = Decision::new(message.version, recorded, last);
        if decision.advance_to.is_some() {
            let advanced = advance
                .execute::<D>(conn, &[key[0], key[1], key[2], Arg::Int(version)])
                .await?;
            if advanced == 0 {
                return Ok(Admission::Stale {
                    last_applied_version: read_last(conn).await?,
                });
            }
        }
        Ok(decision.admission)
    }

    fn stored_version(&self, message: &ReceivedMessage, stored: i64) -> Result<u64, StoreError> {
        u64::try_from(stored).map_err(|_| {
            corrupt(format!(
                "inbox of {}: negative version {stored} for {}/{}",
                self.consumer, message.aggregate_type, message.aggregate_id
            ))
        })
    }
}

impl<'c, D: Dialect> Inbox<Transaction<'c, D::Db>> for SqlInbox<D> {
    async fn admit(
        &self,
        tx: &mut Transaction<'c, D::Db>,
        message: &ReceivedMessage,
    ) -> Result<Admission, StoreError> {
        let version = i64::try_from(message.version).map_err(|_| {
            corrupt(format!(
                "message {} has version {}, beyond what the inbox can store",
                message.id, message.version
            ))
        })?;
        let admission = match self.statements.as_ref() {
            InboxStatements::Routine(routine) => self.call(routine, tx, message, version).await?,
            InboxStatements::Statements {
                record,
                last_version,
                advance,
            } => {
                self.decide([record, last_version, advance], tx, message, version)
                    .await?
            }
        };
        match admission {
            Admission::Duplicate => {
                debug!(consumer = %self.consumer, message_id = %message.id, "duplicate message skipped")
            }
            Admission::Stale {
                last_applied_version,
            } => debug!(
                consumer = %self.consumer,
                message_id = %message.id,
                version = message.version,
                last_applied_version,
                "stale message skipped"
            ),
            Admission::Apply { .. } => {}
        }
        Ok(admission)
    }
}
