//! The consumer inbox in a SQL database: processed ids and applied versions kept in the
//! consumer's own transaction (G4), for any [`Dialect`].

use std::marker::PhantomData;
use std::sync::Arc;

use sqlx::Transaction;
use tracing::debug;

use ferry_core::inbox::process;
use ferry_core::{
    Admission, Decision, Inbox, ProcessError, Processed, ReceivedMessage, StoreError,
};

use super::TablePrefix;
use super::dialect::Dialect;
use super::driver::RowExt;
use super::error::{corrupt, store_error};
use super::outbox::{Connection, fills};
use super::statement::{Arg, Statement};

/// The statements of one consumer inbox.
#[derive(Debug)]
struct InboxStatements {
    record: Statement,
    lock_version: Option<Statement>,
    last_version: Statement,
    advance: Statement,
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
        let q = D::QUERIES;
        Self {
            consumer: consumer.into(),
            statements: Arc::new(InboxStatements {
                record: r(q.inbox_record),
                lock_version: D::INBOX_LOCK_VERSION.map(r),
                last_version: r(q.inbox_last_version),
                advance: r(q.inbox_advance),
            }),
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

    /// Inserts the id; `false` if this consumer recorded it before (the statement changed
    /// nothing, or the database refused it as a unique violation, which leaves the
    /// transaction usable where the database reports it that way).
    async fn record(
        &self,
        conn: &mut Connection<D>,
        message: &ReceivedMessage,
        version: i64,
    ) -> Result<bool, StoreError> {
        let args = [
            Arg::Text(&self.consumer),
            Arg::Id(message.id),
            Arg::Text(&message.aggregate_type),
            Arg::Text(&message.aggregate_id),
            Arg::Int(version),
        ];
        let statement = self.statements.record.query::<D>(&args);
        match <D::Db as super::Exec>::execute(conn, statement).await {
            Ok(result) => Ok(D::rows_affected(&result) > 0),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(false),
            Err(err) => Err(store_error::<D>(err)),
        }
    }

    /// The aggregate's last applied version for this consumer, 0 if none.
    async fn last_version(
        &self,
        conn: &mut Connection<D>,
        message: &ReceivedMessage,
    ) -> Result<u64, StoreError> {
        let key = self.key(message);
        if let Some(lock) = &self.statements.lock_version {
            lock.execute::<D>(conn, &key).await?;
        }
        let stored: Option<i64> = self
            .statements
            .last_version
            .fetch_optional::<D>(conn, &key)
            .await?
            .map(|row| row.col("version"))
            .transpose()
            .map_err(store_error::<D>)?;
        let stored = stored.unwrap_or(0);
        u64::try_from(stored).map_err(|_| {
            corrupt(format!(
                "inbox of {}: negative version {stored} for {}/{}",
                self.consumer, message.aggregate_type, message.aggregate_id
            ))
        })
    }

    fn key<'a>(&'a self, message: &'a ReceivedMessage) -> [Arg<'a>; 3] {
        [
            Arg::Text(&self.consumer),
            Arg::Text(&message.aggregate_type),
            Arg::Text(&message.aggregate_id),
        ]
    }
}

impl<'c, D: Dialect> Inbox<Transaction<'c, D::Db>> for SqlInbox<D> {
    /// Records the id, reads the aggregate's last applied version and advances it in the
    /// consumer's transaction. The advance changes nothing if another instance of this
    /// consumer applied a newer version meanwhile; the message is then stale. Where the
    /// version row is locked before it is read (MySQL), instances handling one aggregate
    /// decide one after the other.
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
        let recorded = self.record(tx, message, version).await?;
        let last = self.last_version(tx, message).await?;
        let decision = Decision::new(message.version, recorded, last);
        match decision.admission {
            Admission::Duplicate => {
                debug!(consumer = %self.consumer, message_id = %message.id, "duplicate message skipped");
            }
            Admission::Stale { .. } => debug!(
                consumer = %self.consumer,
                message_id = %message.id,
                version = message.version,
                last_applied_version = last,
                "stale message skipped"
            ),
            Admission::Apply { .. } => {
                let [consumer, aggregate_type, aggregate_id] = self.key(message);
                let advanced = self
                    .statements
                    .advance
                    .execute::<D>(
                        tx,
                        &[consumer, aggregate_type, aggregate_id, Arg::Int(version)],
                    )
                    .await?;
                if advanced == 0 {
                    // Another instance of this consumer applied a newer version between our
                    // read and write.
                    return Ok(Admission::Stale {
                        last_applied_version: self.last_version(tx, message).await?,
                    });
                }
            }
        }
        Ok(decision.admission)
    }
}
