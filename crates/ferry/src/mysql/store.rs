//! [`OutboxStore`] for MySQL: what the relay reads, marks and reports.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::debug;
use uuid::Uuid;

use ferry_core::{Lease, Message, OutboxStore, PartitionStatus, StoreError};

use super::queries::MAX_IDS_PER_STATEMENT;
use super::{MyOutbox, micros};
use crate::sql::{self, OutboxRow, purge_in_batches, store_error, stored_checkpoint};

/// Rows deleted per purge statement: each holds its row locks until it ends, so a large
/// purge runs as many short statements.
const PURGE_BATCH: i64 = 5000;

#[derive(sqlx::FromRow)]
struct StatusRow {
    partition_no: i32,
    owner: Option<String>,
    epoch: i64,
    expires_at: Option<DateTime<Utc>>,
    blocked_reason: Option<String>,
    backlog: i64,
    oldest_age_secs: Option<f64>,
}

#[async_trait]
impl OutboxStore for MyOutbox {
    async fn partitions(&self) -> Result<u32, StoreError> {
        self.partition_count().await
    }

    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(self.queries.fetch.clone())
            .bind(partition)
            .bind(u64::try_from(limit).unwrap_or(u64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter().map(Message::try_from).collect()
    }

    /// Checks the lease and marks in one transaction: the check updates (and so locks) the
    /// lease row, which every grant also updates, so no grant comes between the check and
    /// the mark (G5).
    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let q = &self.queries;
        let checkpoint = stored_checkpoint(checkpoint)?;
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let held = sqlx::query(q.check_lease.clone())
            .bind(checkpoint)
            .bind(checkpoint)
            .bind(lease.partition)
            .bind(lease.epoch)
            .bind(&lease.owner)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        if held == 0 {
            // Dropping `tx` rolls back; nothing was changed anyway.
            return Err(StoreError::fenced(lease));
        }
        let statements = if self.settings.retention.is_zero() {
            &q.delete_published
        } else {
            &q.mark_published
        };
        let mut marked = 0;
        for chunk in ids.chunks(MAX_IDS_PER_STATEMENT) {
            let (sql, size) = statements.for_ids(chunk.len());
            let mut query = sqlx::query(sql);
            // Padding repeats the last id: `IN` ignores the repeats.
            for i in 0..size {
                query = query.bind(chunk[i.min(chunk.len() - 1)]);
            }
            marked += query
                .bind(lease.partition)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?
                .rows_affected();
        }
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
            .bind(reason)
            .bind(lease.partition)
            .bind(lease.epoch)
            .bind(&lease.owner)
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        if changed == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    /// Raises the epoch and reads the checkpoint in one transaction: the update locks the
    /// lease row against marks and other adoptions until the read is done.
    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let q = &self.queries;
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let adopted = sqlx::query(q.adopt.clone())
            .bind(lease.epoch)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(lease.partition)
            .bind(lease.epoch)
            .bind(lease.epoch)
            .bind(&lease.owner)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        if adopted == 0 {
            return Err(StoreError::fenced(lease));
        }
        let checkpoint: Option<i64> = sqlx::query_scalar(q.adopted_checkpoint.clone())
            .bind(lease.partition)
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
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
                    partition_no: row.partition_no.into(),
                    owner: row.owner,
                    epoch: row.epoch,
                    lease_expires_at: row.expires_at,
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
        if retention.is_zero() {
            return Ok(0);
        }
        purge_in_batches(retention, PURGE_BATCH as u64, || async {
            sqlx::query(self.queries.purge_published.clone())
                .bind(micros(retention))
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
