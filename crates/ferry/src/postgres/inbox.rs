//! The consumer inbox on PostgreSQL.

use sqlx::{Postgres, Transaction};

use ferry_core::inbox::{Admission, Decision, Inbox, ProcessError, Processed, process};
use ferry_core::{ReceivedMessage, StoreError};

use super::queries;
use crate::sql::{TablePrefix, inbox_version, last_applied_version, store_error};

/// Records processed ids and applied versions for one named consumer, in the consumer's
/// own transaction (tables created by `ferry migrate`).
#[derive(Debug, Clone)]
pub struct PgInbox {
    consumer: String,
    record: String,
    last_version: String,
    advance: String,
}

impl PgInbox {
    /// `consumer` names the subscriber: consumers sharing a database keep separate records.
    pub fn new(consumer: impl Into<String>, prefix: &TablePrefix) -> Self {
        Self {
            consumer: consumer.into(),
            record: prefix.render(queries::INBOX_RECORD),
            last_version: prefix.render(queries::INBOX_LAST_VERSION),
            advance: prefix.render(queries::INBOX_ADVANCE),
        }
    }

    /// Applies `message` with `handler` exactly once and only if newer than the last
    /// applied version of its aggregate; see [`ferry_core::inbox::process`].
    pub async fn process<'c, T, E>(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        message: &ReceivedMessage,
        handler: impl AsyncFnOnce(&mut Transaction<'c, Postgres>, &ReceivedMessage) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        process(self, tx, message, handler).await
    }
}

impl PgInbox {
    /// The aggregate's last applied version for this consumer, 0 if none.
    async fn last_version(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &ReceivedMessage,
    ) -> Result<u64, StoreError> {
        let last: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(self.last_version.as_str()))
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
        last_applied_version(&self.consumer, message, last)
    }
}

impl<'c> Inbox<Transaction<'c, Postgres>> for PgInbox {
    async fn admit(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        message: &ReceivedMessage,
    ) -> Result<Admission, StoreError> {
        let version = inbox_version(message)?;
        let recorded: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(self.record.as_str()))
            .bind(&self.consumer)
            .bind(message.id)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(version)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
        let last = self.last_version(tx, message).await?;
        let decision = Decision::new(message.version, recorded.is_some(), last);
        if decision.advance_to.is_some() {
            let advanced: Option<i32> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(self.advance.as_str()))
                    .bind(&self.consumer)
                    .bind(&message.aggregate_type)
                    .bind(&message.aggregate_id)
                    .bind(version)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(store_error)?;
            if advanced.is_none() {
                // Another consumer instance applied a newer version between our read and write.
                return Ok(Admission::Stale {
                    last_applied_version: self.last_version(tx, message).await?,
                });
            }
        }
        Ok(decision.admission)
    }
}
