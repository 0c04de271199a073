//! The consumer inbox on SQLite: processed ids and applied versions kept in the consumer's
//! own transaction (G4).

use ferry_core::inbox::process;
use ferry_core::{Admission, Inbox, ProcessError, Processed, ReceivedMessage, StoreError};
use sqlx::{Sqlite, Transaction};
use tracing::debug;

use super::queries::InboxQueries;
use crate::sql::TablePrefix;
use crate::sql::store_error;

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

fn out_of_range(message: &ReceivedMessage) -> StoreError {
    StoreError::Other(
        format!(
            "message {} has version {}, beyond what the inbox can store",
            message.id, message.version
        )
        .into(),
    )
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
        let version = i64::try_from(message.version).map_err(|_| out_of_range(message))?;
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
        if inserted == 0 {
            debug!(consumer = %self.consumer, message_id = %message.id, "duplicate message skipped");
            return Ok(Admission::Duplicate);
        }
        let last: Option<i64> = sqlx::query_scalar(q.last_version.clone())
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
        let last = match last {
            None => 0,
            Some(last) => u64::try_from(last).map_err(|_| {
                StoreError::Other(
                    format!(
                        "inbox of {}: negative version {last} for {}/{}",
                        self.consumer, message.aggregate_type, message.aggregate_id
                    )
                    .into(),
                )
            })?,
        };
        if message.version <= last {
            debug!(
                consumer = %self.consumer,
                message_id = %message.id,
                version = message.version,
                last_applied_version = last,
                "stale message skipped"
            );
            return Ok(Admission::Stale {
                last_applied_version: last,
            });
        }
        sqlx::query(q.advance.clone())
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(version)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
        Ok(Admission::Apply {
            previous_version: last,
        })
    }
}
