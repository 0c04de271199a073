//! The consumer inbox on MySQL: processed ids and applied versions kept in the consumer's
//! own transaction (G4).

use sqlx::{MySql, Transaction};

use ferry_core::inbox::{Admission, Decision, Inbox, ProcessError, Processed, process};
use ferry_core::{ReceivedMessage, StoreError};

use super::queries::InboxQueries;
use crate::sql::{TablePrefix, inbox_version, last_applied_version, store_error};

/// MySQL's duplicate key error.
const ER_DUP_ENTRY: u16 = 1062;

/// Records processed ids and applied versions for one named consumer, in the consumer's
/// own transaction (tables created by [`MyOutbox::migrate`](super::MyOutbox::migrate),
/// which a consumer runs on its own database too).
#[derive(Debug)]
pub struct MyInbox {
    consumer: String,
    queries: InboxQueries,
}

impl MyInbox {
    /// `consumer` names the subscriber (at most 255 bytes): consumers sharing a database
    /// keep separate records.
    pub fn new(consumer: impl Into<String>, prefix: &TablePrefix) -> Self {
        Self {
            consumer: consumer.into(),
            queries: InboxQueries::new(prefix),
        }
    }

    /// Applies `message` with `handler` exactly once and only if newer than the last
    /// applied version of its aggregate; see [`ferry_core::inbox::process`]. Commit `tx` on
    /// `Ok`, roll it back on `Err`.
    pub async fn process<'c, T, E>(
        &self,
        tx: &mut Transaction<'c, MySql>,
        message: &ReceivedMessage,
        handler: impl AsyncFnOnce(&mut Transaction<'c, MySql>, &ReceivedMessage) -> Result<T, E>,
    ) -> Result<Processed<T>, ProcessError<E>> {
        process(self, tx, message, handler).await
    }

    /// Inserts the id; `false` if this consumer recorded it before.
    async fn record(
        &self,
        tx: &mut Transaction<'_, MySql>,
        message: &ReceivedMessage,
        version: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(self.queries.record.clone())
            .bind(&self.consumer)
            .bind(message.id)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .bind(version)
            .execute(&mut **tx)
            .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(db))
                if db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|e| e.number() == ER_DUP_ENTRY) =>
            {
                Ok(false)
            }
            Err(err) => Err(store_error(err)),
        }
    }

    /// Locks the aggregate's version row (creating it at 0) and reads it.
    async fn lock_last_version(
        &self,
        tx: &mut Transaction<'_, MySql>,
        message: &ReceivedMessage,
    ) -> Result<u64, StoreError> {
        let q = &self.queries;
        sqlx::query(q.lock_version.clone())
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
        let last: Option<i64> = sqlx::query_scalar(q.last_version.clone())
            .bind(&self.consumer)
            .bind(&message.aggregate_type)
            .bind(&message.aggregate_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
        last_applied_version(&self.consumer, message, last)
    }
}

impl<'c> Inbox<Transaction<'c, MySql>> for MyInbox {
    /// The version row stays locked until `tx` ends, so instances of this consumer that
    /// receive messages of one aggregate at once decide one after the other.
    async fn admit(
        &self,
        tx: &mut Transaction<'c, MySql>,
        message: &ReceivedMessage,
    ) -> Result<Admission, StoreError> {
        let version = inbox_version(message)?;
        let recorded = self.record(tx, message, version).await?;
        let last = self.lock_last_version(tx, message).await?;
        let decision = Decision::new(message.version, recorded, last);
        if decision.advance_to.is_some() {
            sqlx::query(self.queries.advance.clone())
                .bind(version)
                .bind(&self.consumer)
                .bind(&message.aggregate_type)
                .bind(&message.aggregate_id)
                .bind(version)
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
        }
        Ok(decision.admission)
    }
}
