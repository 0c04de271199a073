//! The consumer inbox on SQLite: processed ids and applied versions kept in the consumer's
//! own transaction (G4).

use ferry_core::inbox::process;
use ferry_core::{
    Admission, Decision, Inbox, ProcessError, Processed, ReceivedMessage, StoreError,
};
use sqlx::{Sqlite, Transaction};
use tracing::debug;

use super::queries::InboxQueries;
use crate::sql::{TablePrefix, inbox_version, last_applied_version, store_error};

/// The inbox of one consumer (a name shared by all its instances) in tables
/// `<prefix>inbox` and `<prefix>inbox_versions`, which [`SqliteOutbox::migrate`] creates
/// (a consumer runs it on its own database too).
///
/// [`SqliteOutbox::migrate`]: super::SqliteOutbox::migrate
#[derive(Debug)]
pub struct SqliteInbox {
    consumer: String,
    queries: InboxQueries,
}

impl SqliteInbox {
    pub fn new(consumer: impl Into<String>, prefix: TablePrefix) -> Self {
        Self {
            consumer: consumer.into(),
            queries: InboxQueries::new(&prefix),
        }
    }

    /// Runs `handler` in `tx` unless `message` was processed before or is stale; see
    /// [`ferry_core::inbox::process`]. Commit `tx` on `Ok`, roll it back on `Err`.
    pub async fn process<'c, T, E>(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        message: &ReceivedMessage,
        handler: impl AsyncFnOnce(&mut Transaction<'c, Sqlite>, &ReceivedMessage) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        process(self, tx, message, handler).await
    }
}

impl<'c> Inbox<Transaction<'c, Sqlite>> for SqliteInbox {
    /// Inserts the id first: that write takes the database's write lock, so the version
    /// read and advance that follow cannot interleave with another instance of this
    /// consumer handling the same aggregate.
    async fn admit(
        &self,
        tx: &mut Transaction<'c, Sqlite>,
        message: &ReceivedMessage,
    ) -> Result<Admission, StoreError> {
        let q = &self.queries;
        let version = inbox_version(message)?;
        let inserted = sqlx::query(q.insert.clone())
            .bind(&self.consumer)
            .bind(message.id)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(version)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        let last: Option<i64> = sqlx::query_scalar(q.last_version.clone())
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
        let last = last_applied_version(&self.consumer, message, last)?;
        let decision = Decision::new(message.version, inserted == 1, last);
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
                sqlx::query(q.advance.clone())
                    .bind(&self.consumer)
                    .bind(&message.aggregate_type)
                    .bind(&message.aggregate_id)
                    .bind(version)
                    .execute(&mut **tx)
                    .await
                    .map_err(store_error)?;
            }
        }
        Ok(decision.admission)
    }
}
