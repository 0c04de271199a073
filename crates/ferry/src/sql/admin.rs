//! [`OutboxAdmin`] for [`SqlOutbox`]: operators' tools on the SQL stores.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use ferry_core::{
    BlockedPartition, Cleaned, CleanupBounds, Message, OutboxAdmin, OutboxStore, ParkedMessage,
    ParkedQuery, RetainedFilter, RetainedSummary, StoreError,
};

use super::dialect::Dialect;
use super::driver::RowExt;
use super::error::store_error;
use super::outbox::SqlOutbox;
use super::row::{self, millis};
use super::statement::{Arg, Statement};

/// Rows deleted per cleanup statement, so that none holds its locks for long.
const CLEANUP_BATCH: i64 = 5000;

#[async_trait]
impl<D: Dialect> OutboxAdmin for SqlOutbox<D> {
    async fn blocked(&self) -> Result<Vec<BlockedPartition>, StoreError> {
        let rows = self
            .statements
            .blocked_list
            .fetch_all::<D>(&mut *self.acquire().await?, &[])
            .await?;
        let mut blocked = Vec::with_capacity(rows.len());
        for row in &rows {
            let partition: i32 = row.col("partition_no").map_err(store_error::<D>)?;
            let head = match u32::try_from(partition) {
                Ok(partition) => self.fetch(partition, 1).await?.into_iter().next(),
                Err(_) => None,
            };
            blocked.push(row::blocked::<D::Db>(row, head).map_err(store_error::<D>)?);
        }
        Ok(blocked)
    }

    async fn request_retry(&self, partition: u32) -> Result<bool, StoreError> {
        let requested = self
            .statements
            .retry_request
            .execute::<D>(&mut *self.acquire().await?, &[partition.into()])
            .await?;
        Ok(requested > 0)
    }

    /// Moves the row and asks its partition's relay to go on, in one write transaction:
    /// a relay that publishes the message meanwhile marks nothing (the row is gone).
    async fn skip(
        &self,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> Result<Option<ParkedMessage>, StoreError> {
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        let Some(row) = s
            .outbox_partition_of
            .fetch_optional::<D>(&mut tx, &[Arg::Id(id)])
            .await?
        else {
            return Ok(None);
        };
        let partition: i32 = row.col("partition_no").map_err(store_error::<D>)?;
        s.park_one
            .execute::<D>(&mut tx, &[Arg::Id(id), by.into(), reason.into()])
            .await?;
        s.outbox_delete_one
            .execute::<D>(&mut tx, &[Arg::Id(id)])
            .await?;
        s.retry_request
            .execute::<D>(&mut tx, &[Arg::Int(partition.into())])
            .await?;
        let parked = s.parked_get.fetch_one::<D>(&mut tx, &[Arg::Id(id)]).await?;
        let parked = row::parked::<D::Db>(&parked).map_err(store_error::<D>)?;
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(Some(parked))
    }

    async fn parked(&self, query: &ParkedQuery) -> Result<Vec<ParkedMessage>, StoreError> {
        let (aggregate_type, aggregate_id) = aggregate_args(&query.aggregate);
        self.statements
            .parked_list
            .fetch_all::<D>(
                &mut *self.acquire().await?,
                &[
                    Arg::OptText(aggregate_type),
                    Arg::OptText(aggregate_id),
                    Arg::Int(query.after_sequence.unwrap_or(i64::MIN)),
                    query.limit.into(),
                ],
            )
            .await?
            .iter()
            .map(row::parked::<D::Db>)
            .collect::<Result<_, _>>()
            .map_err(store_error::<D>)
    }

    /// Copies the parked messages back and deletes them in one write transaction: a relay
    /// sees the aggregate either held or back in the outbox, never both or neither.
    async fn requeue_parked(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<u64, StoreError> {
        let s = &self.statements;
        let aggregate = [aggregate_type.into(), aggregate_id.into()];
        let mut tx = self.begin_write().await?;
        let requeued = s.parked_requeue.execute::<D>(&mut tx, &aggregate).await?;
        s.parked_delete_aggregate
            .execute::<D>(&mut tx, &aggregate)
            .await?;
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(requeued)
    }

    async fn cleanup(&self, bounds: &CleanupBounds) -> Result<Cleaned, StoreError> {
        let s = &self.statements;
        Ok(Cleaned {
            published: self.purge(&s.purge, bounds.published_older_than).await?,
            inbox: self.purge(&s.purge_inbox, bounds.inbox_older_than).await?,
            parked: self
                .purge(&s.purge_parked, bounds.parked_older_than)
                .await?,
        })
    }

    async fn retained(
        &self,
        filter: &RetainedFilter,
        after_sequence: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let mut args = selection(filter, after_sequence);
        args.push(limit.into());
        self.statements
            .retained_page
            .fetch_all::<D>(&mut *self.acquire().await?, &args)
            .await?
            .iter()
            .map(row::message)
            .collect::<Result<_, _>>()
            .map_err(store_error::<D>)
    }

    async fn retained_summary(
        &self,
        filter: &RetainedFilter,
    ) -> Result<RetainedSummary, StoreError> {
        let row = self
            .statements
            .retained_summary
            .fetch_one::<D>(&mut *self.acquire().await?, &selection(filter, None))
            .await?;
        row::retained_summary::<D::Db>(&row).map_err(store_error::<D>)
    }
}

/// The `retained_page` and `retained_summary` arguments `$1`..`$7` for `filter`, starting
/// after `after_sequence`.
fn selection(filter: &RetainedFilter, after_sequence: Option<i64>) -> Vec<Arg<'_>> {
    let from = filter.from_sequence.unwrap_or(i64::MIN);
    let from = after_sequence.map_or(from, |after| from.max(after.saturating_add(1)));
    let millis = |time: Option<chrono::DateTime<chrono::Utc>>| time.map(|t| t.timestamp_millis());
    let (aggregate_type, aggregate_id) = aggregate_args(&filter.aggregate);
    vec![
        Arg::OptInt(filter.partition.map(i64::from)),
        Arg::Int(from),
        Arg::Int(filter.to_sequence.unwrap_or(i64::MAX)),
        Arg::OptInt(millis(filter.since)),
        Arg::OptInt(millis(filter.until)),
        Arg::OptText(aggregate_type),
        Arg::OptText(aggregate_id),
    ]
}

impl<D: Dialect> SqlOutbox<D> {
    /// Runs `statement` (`$1 older_than_ms, $2 limit`) until a batch comes back short;
    /// returns how many rows went. Nothing without a bound.
    pub(crate) async fn purge(
        &self,
        statement: &Statement,
        older_than: Option<Duration>,
    ) -> Result<u64, StoreError> {
        let Some(older_than) = older_than else {
            return Ok(0);
        };
        let mut conn = self.acquire().await?;
        let mut purged = 0;
        loop {
            let deleted = statement
                .execute::<D>(
                    &mut conn,
                    &[Arg::Int(millis(older_than)), Arg::Int(CLEANUP_BATCH)],
                )
                .await?;
            purged += deleted;
            if deleted < CLEANUP_BATCH as u64 {
                return Ok(purged);
            }
        }
    }
}

/// An optional `(aggregate_type, aggregate_id)` filter as two nullable arguments.
fn aggregate_args(aggregate: &Option<(String, String)>) -> (Option<&str>, Option<&str>) {
    match aggregate {
        Some((kind, id)) => (Some(kind.as_str()), Some(id.as_str())),
        None => (None, None),
    }
}
