//! [`OutboxStore`] for [`SqlOutbox`]: what the relay reads, marks and reports.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlSafeStr;
use tracing::debug;
use uuid::Uuid;

use ferry_core::{Lease, Message, OutboxStore, PartitionStatus, StoreError, Wakers};

use super::dialect::Dialect;
use super::driver::RowExt;
use super::error::store_error;
use super::outbox::SqlOutbox;
use super::row::{self, stored_checkpoint};
use super::statement::Arg;
use super::wake::{Wake, warn_if_unlike};

#[async_trait]
impl<D: Dialect> OutboxStore for SqlOutbox<D> {
    async fn partitions(&self) -> Result<u32, StoreError> {
        let mut conn = self.acquire().await?;
        self.partition_count(&mut conn).await
    }

    /// Reads committed rows only, with no cursor: a row that commits late with a lower
    /// sequence is returned by the next fetch.
    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError> {
        let args = [
            partition.into(),
            Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
        ];
        let fetch = &self.statements.fetch;
        let rows = match D::FETCH_BEGIN {
            Some(begin) => {
                let mut tx = self
                    .pool()
                    .begin_with(begin.into_sql_str())
                    .await
                    .map_err(store_error::<D>)?;
                let rows = fetch.fetch_all::<D>(&mut tx, &args).await?;
                tx.commit().await.map_err(store_error::<D>)?;
                rows
            }
            None => {
                fetch
                    .fetch_all::<D>(&mut *self.acquire().await?, &args)
                    .await?
            }
        };
        rows.iter()
            .map(row::message)
            .collect::<Result<_, _>>()
            .map_err(store_error::<D>)
    }

    async fn unpublished(&self, partition: u32, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.acquire().await?;
        let mut unpublished = Vec::new();
        for chunk in ids.chunks(D::MAX_IDS_PER_STATEMENT) {
            let rows = self
                .statements
                .unpublished
                .for_ids(chunk.len())
                .fetch_all::<D>(&mut conn, &[partition.into(), Arg::Ids(chunk)])
                .await?;
            for row in &rows {
                unpublished.push(row.col_at(0).map_err(store_error::<D>)?);
            }
        }
        Ok(unpublished)
    }

    /// Checks the lease and marks in one write transaction: the check updates (and so
    /// locks) the lease row, which every grant and adoption also updates, so none can come
    /// between the check and the mark (G5).
    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError> {
        let checkpoint = stored_checkpoint(checkpoint)?;
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        let held = s
            .lease_check
            .execute::<D>(
                &mut tx,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                    Arg::OptInt(checkpoint),
                ],
            )
            .await?;
        if held == 0 {
            // Dropping `tx` rolls back; nothing was changed anyway.
            return Err(StoreError::fenced(lease));
        }
        let mark = if self.retention().is_zero() {
            &s.mark_delete
        } else {
            &s.mark_keep
        };
        let mut marked = 0;
        for chunk in ids.chunks(D::MAX_IDS_PER_STATEMENT) {
            marked += mark
                .for_ids(chunk.len())
                .execute::<D>(&mut tx, &[lease.partition.into(), Arg::Ids(chunk)])
                .await?;
        }
        tx.commit().await.map_err(store_error::<D>)?;
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
        let changed = self
            .statements
            .blocked_set
            .execute::<D>(
                &mut *self.acquire().await?,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                    Arg::OptText(reason),
                ],
            )
            .await?;
        if changed == 0 {
            return Err(StoreError::fenced(lease));
        }
        Ok(())
    }

    async fn take_retry_request(&self, lease: &Lease) -> Result<bool, StoreError> {
        let taken = self
            .statements
            .retry_take
            .execute::<D>(
                &mut *self.acquire().await?,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                ],
            )
            .await?;
        Ok(taken > 0)
    }

    /// Checks the lease and moves the aggregate's rows in one write transaction, as a mark
    /// does (G5).
    async fn park_aggregate(
        &self,
        lease: &Lease,
        message: &Message,
        by: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        let held = s
            .lease_check
            .execute::<D>(
                &mut tx,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                    Arg::OptInt(None),
                ],
            )
            .await?;
        if held == 0 {
            return Err(StoreError::fenced(lease));
        }
        let aggregate = [
            lease.partition.into(),
            Arg::Text(&message.aggregate_type),
            Arg::Text(&message.aggregate_id),
        ];
        let parked = s
            .park_aggregate
            .execute::<D>(
                &mut tx,
                &[
                    aggregate[0],
                    aggregate[1],
                    aggregate[2],
                    by.into(),
                    reason.into(),
                ],
            )
            .await?;
        s.outbox_delete_aggregate
            .execute::<D>(&mut tx, &aggregate)
            .await?;
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(parked)
    }

    /// Raises the epoch and reads the checkpoint in one write transaction: the update locks
    /// the lease row against marks and other adoptions until the read is done.
    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        let adopted = s
            .adopt
            .execute::<D>(
                &mut tx,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                ],
            )
            .await?;
        if adopted == 0 {
            return Err(StoreError::fenced(lease));
        }
        let checkpoint: Option<i64> = s
            .checkpoint_read
            .fetch_one::<D>(&mut tx, &[lease.partition.into()])
            .await?
            .col("checkpoint")
            .map_err(store_error::<D>)?;
        tx.commit().await.map_err(store_error::<D>)?;
        debug!(
            partition = lease.partition,
            epoch = lease.epoch,
            checkpoint,
            "lease adopted"
        );
        Ok(checkpoint.and_then(|c| u64::try_from(c).ok()))
    }

    /// Listens where the database notifies and `wake` is [`Wake::Notify`]; otherwise the
    /// relay's polls find the rows. A table migrated with the other setting is warned of.
    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let table = self.table_prefix().render("{p}outbox");
        let wake = self.settings().wake;
        if let Some(trigger) = &self.statements.notify_trigger {
            let mut conn = self.acquire().await?;
            let present = trigger.present::<D>(&mut conn).await?;
            warn_if_unlike(wake, present, &table);
        }
        match wake {
            Wake::Notify => D::watch(self.pool(), &table, wakers).await,
            Wake::Poll => std::future::pending().await,
        }
    }

    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let rows = self
            .statements
            .status
            .fetch_all::<D>(&mut *self.acquire().await?, &[])
            .await?;
        rows.iter()
            .map(row::partition_status::<D::Db>)
            .collect::<Result<_, _>>()
            .map_err(store_error::<D>)
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        let retention = self.retention();
        self.purge(
            &self.statements.purge,
            (!retention.is_zero()).then_some(retention),
        )
        .await
    }

    fn retention(&self) -> Duration {
        self.settings().retention
    }
}
