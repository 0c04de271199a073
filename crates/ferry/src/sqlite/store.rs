//! [`OutboxStore`] for SQLite: what the relay reads, marks and reports.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use ferry_core::{Lease, Message, OutboxStore, PartitionStatus, StoreError};
use tracing::debug;
use uuid::Uuid;

use super::{SqliteOutbox, store_error};
use crate::sql::{self, OutboxRow, purge_in_batches, stored_checkpoint};

/// Rows deleted per purge statement: each statement holds the write lock, and producers
/// wait for it, so a large purge runs as many short ones.
const PURGE_BATCH: i64 = 5000;

/// A lease row joined with its backlog; `expires_at` in unix milliseconds.
#[derive(sqlx::FromRow)]
struct StatusRow {
    partition_no: i64,
    owner: Option<String>,
    epoch: i64,
    expires_at: i64,
    blocked_reason: Option<String>,
    backlog: i64,
    oldest_age_secs: Option<f64>,
}

#[async_trait]
impl OutboxStore for SqliteOutbox {
    async fn partitions(&self) -> Result<u32, StoreError> {
        self.partition_count().await
    }

    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(self.queries.fetch.clone())
            .bind(i64::from(partition))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter().map(Message::try_from).collect()
    }

    /// Checks the lease and marks in one `BEGIN IMMEDIATE` transaction: the check takes
    /// the write lock, so no grant can come between it and the mark (G5).
    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let q = &self.queries;
        let checkpoint = stored_checkpoint(checkpoint)?;
        let partition = i64::from(lease.partition);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let held = sqlx::query(q.check_lease.clone())
            .bind(partition)
            .bind(lease.epoch)
            .bind(&lease.owner)
            .bind(checkpoint)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        if held == 0 {
            // Dropping `tx` rolls back; nothing was changed anyway.
            return Err(StoreError::fenced(lease));
        }
        let statement = if self.settings.retention.is_zero() {
            &q.delete_published
        } else {
            &q.mark_published
        };
        let marked = sqlx::query(statement.clone())
            .bind(partition)
            .bind(hex_id_array(ids))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        tx.commit().await.map_err(store_error)?;
        debug!(
            partition = lease.partition,
            epoch = lease.epoch,
            requested = ids.len(),
            marked,
            checkpoint,
            "marked published"
        );
        Ok(marked)
    }

    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError> {
        let changed = sqlx::query(self.queries.set_blocked.clone())
            .bind(i64::from(lease.partition))
            .bind(lease.epoch)
            .bind(&lease.owner)
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        if changed == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    /// One statement: the write lock it takes orders it against marks and other adoptions.
    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let adopted: Option<Option<i64>> = sqlx::query_scalar(self.queries.adopt.clone())
            .bind(i64::from(lease.partition))
            .bind(lease.epoch)
            .bind(&lease.owner)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        let checkpoint = adopted.ok_or_else(|| StoreError::fenced(lease))?;
        debug!(
            partition = lease.partition,
            epoch = lease.epoch,
            checkpoint,
            "lease adopted"
        );
        Ok(checkpoint.and_then(|c| u64::try_from(c).ok()))
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let rows: Vec<StatusRow> = sqlx::query_as(self.queries.status.clone())
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter()
            .map(|row| {
                sql::StatusRow {
                    lease_expires_at: row
                        .owner
                        .as_ref()
                        .and_then(|_| DateTime::from_timestamp_millis(row.expires_at)),
                    partition_no: row.partition_no,
                    owner: row.owner,
                    epoch: row.epoch,
                    blocked_reason: row.blocked_reason,
                    backlog: row.backlog,
                    oldest_age_secs: row.oldest_age_secs,
                }
                .try_into()
            })
            .collect()
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        let retention = self.settings.retention;
        let modifier = format!("-{:.3} seconds", retention.as_secs_f64());
        purge_in_batches(retention, PURGE_BATCH as u64, || async {
            sqlx::query(self.queries.purge_published.clone())
                .bind(&modifier)
                .bind(PURGE_BATCH)
                .execute(&self.pool)
                .await
                .map(|done| done.rows_affected())
        })
        .await
    }

    fn retention(&self) -> Duration {
        self.settings.retention
    }
}

/// `["<32 hex digits>", …]`, which the mark statements turn back into 16-byte ids with
/// `json_each` and `unhex`: one bound value, so one cached statement for any batch size
/// and no limit on the number of bound variables.
fn hex_id_array(ids: &[Uuid]) -> String {
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
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_id_array_is_json() {
        let ids = [Uuid::nil(), Uuid::max()];
        let parsed: Vec<String> = serde_json::from_str(&hex_id_array(&ids)).expect("valid JSON");
        assert_eq!(parsed, ["0".repeat(32), "f".repeat(32)]);
        assert_eq!(hex_id_array(&[]), "[]");
    }
}
