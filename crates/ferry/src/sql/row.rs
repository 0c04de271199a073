//! Rows of ferry's tables as the core's types. Every dialect's statements return the same
//! column names and types (see [`Queries`](super::Queries)), so each is read once here.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tracing::warn;

use ferry_core::{
    BlockedPartition, Headers, Message, ParkedMessage, PartitionStatus, RetainedSummary,
    StoreError, Takeover,
};

use super::driver::{Driver, RowExt};
use super::error::corrupt;

type Row<DB> = <DB as sqlx::Database>::Row;

/// The [`Queries::fetch`](super::Queries::fetch) columns by position, wherever a row comes
/// from: a query's result, or (log capture) a binlog image of an outbox row, whose columns
/// are the table's in the same order.
pub(crate) trait FetchColumns {
    fn int32(&self, index: usize) -> Result<i32, sqlx::Error>;
    fn int64(&self, index: usize) -> Result<i64, sqlx::Error>;
    fn uuid(&self, index: usize) -> Result<uuid::Uuid, sqlx::Error>;
    fn text(&self, index: usize) -> Result<String, sqlx::Error>;
    fn bytes(&self, index: usize) -> Result<Vec<u8>, sqlx::Error>;
    fn headers(&self, index: usize) -> Result<Headers, sqlx::Error>;
    fn time(&self, index: usize) -> Result<DateTime<Utc>, sqlx::Error>;
}

impl<R: sqlx::Row> FetchColumns for R
where
    R::Database: Driver,
{
    fn int32(&self, index: usize) -> Result<i32, sqlx::Error> {
        self.col_at(index)
    }
    fn int64(&self, index: usize) -> Result<i64, sqlx::Error> {
        self.col_at(index)
    }
    fn uuid(&self, index: usize) -> Result<uuid::Uuid, sqlx::Error> {
        self.col_at(index)
    }
    fn text(&self, index: usize) -> Result<String, sqlx::Error> {
        self.col_at(index)
    }
    fn bytes(&self, index: usize) -> Result<Vec<u8>, sqlx::Error> {
        self.col_at(index)
    }
    fn headers(&self, index: usize) -> Result<Headers, sqlx::Error> {
        self.col_at::<Json<Headers>>(index).map(|headers| headers.0)
    }
    fn time(&self, index: usize) -> Result<DateTime<Utc>, sqlx::Error> {
        self.col_at(index)
    }
}

/// An outbox row as a message: the `fetch` columns, read by position (a batch is a
/// thousand rows: a name lookup per value showed in profiles), in the order
/// [`Queries::fetch`](super::Queries::fetch) lists them.
pub(crate) fn message(row: &impl FetchColumns) -> Result<Message, sqlx::Error> {
    let id = row.uuid(1)?;
    let partition = row.int32(2)?;
    let version = row.int64(5)?;
    let decode = |what: &str| sqlx::Error::Decode(format!("outbox row {id}: {what}").into());
    Ok(Message {
        id,
        version: u64::try_from(version).map_err(|_| decode("negative version"))?,
        partition: u32::try_from(partition).map_err(|_| decode("partition out of range"))?,
        aggregate_type: row.text(3)?,
        aggregate_id: row.text(4)?,
        event_type: row.text(6)?,
        payload: Bytes::from(row.bytes(7)?),
        headers: row.headers(8)?,
        partition_key: row.text(9)?,
        created_at: row.time(10)?,
        sequence: row.int64(0)?,
    })
}

/// A `parked_list` row: the `fetch` columns, then the parking's.
pub(crate) fn parked<DB: Driver>(row: &Row<DB>) -> Result<ParkedMessage, sqlx::Error> {
    let parked_at_ms: i64 = row.col("parked_at_ms")?;
    Ok(ParkedMessage {
        message: message(row)?,
        parked_at: timestamp(parked_at_ms)?,
        parked_by: row.col("parked_by")?,
        reason: row.col("reason")?,
        holds_aggregate: row.col("holds_aggregate")?,
    })
}

/// A `blocked_list` row, with the partition's head message when there is one.
pub(crate) fn blocked<DB: Driver>(
    row: &Row<DB>,
    head: Option<Message>,
) -> Result<BlockedPartition, sqlx::Error> {
    let partition: i32 = row.col("partition_no")?;
    let since: Option<i64> = row.col("blocked_at_ms")?;
    Ok(BlockedPartition {
        partition: u32::try_from(partition).map_err(|_| {
            sqlx::Error::Decode(format!("lease row {partition} out of range").into())
        })?,
        reason: row.col("blocked_reason")?,
        since: since.map(timestamp).transpose()?,
        head,
    })
}

fn timestamp(millis: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| sqlx::Error::Decode(format!("time {millis} ms out of range").into()))
}

/// A `retained_summary` row.
pub(crate) fn retained_summary<DB: Driver>(row: &Row<DB>) -> Result<RetainedSummary, sqlx::Error> {
    let count: i64 = row.col("count")?;
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        row.col::<Option<i64>>(name)?.map(timestamp).transpose()
    };
    Ok(RetainedSummary {
        count: u64::try_from(count).unwrap_or(0),
        first_sequence: row.col("first_sequence")?,
        last_sequence: row.col("last_sequence")?,
        first_created_at: time("first_created_at_ms")?,
        last_created_at: time("last_created_at_ms")?,
    })
}

/// A `status` row.
pub(crate) fn partition_status<DB: Driver>(row: &Row<DB>) -> Result<PartitionStatus, sqlx::Error> {
    let partition: i32 = row.col("partition_no")?;
    let backlog: i64 = row.col("backlog")?;
    let expires_at_ms: Option<i64> = row.col("expires_at_ms")?;
    let oldest: Option<f64> = row.col("oldest_age_secs")?;
    let decode = |what: &str| sqlx::Error::Decode(format!("lease row {partition}: {what}").into());
    Ok(PartitionStatus {
        partition: u32::try_from(partition).map_err(|_| decode("partition out of range"))?,
        owner: row.col("owner")?,
        epoch: row.col("epoch")?,
        lease_expires_at: expires_at_ms.and_then(DateTime::<Utc>::from_timestamp_millis),
        backlog: u64::try_from(backlog).map_err(|_| decode("negative backlog"))?,
        // A clock step back can make a fresh row look younger than zero.
        oldest_unpublished_age_secs: oldest.map(|age| age.max(0.0)),
        blocked_reason: row.col("blocked_reason")?,
    })
}

/// A lease row as it was before a grant: what decides the takeover kind.
#[derive(Debug)]
pub(crate) struct FreeLease {
    pub(crate) partition: u32,
    pub(crate) epoch: i64,
    clean: bool,
    checkpoint: Option<i64>,
    since_expiry_ms: i64,
}

impl FreeLease {
    pub(crate) fn read<DB: Driver>(row: &Row<DB>) -> Result<Self, sqlx::Error> {
        let partition: i32 = row.col("partition_no")?;
        Ok(Self {
            partition: u32::try_from(partition).map_err(|_| {
                sqlx::Error::Decode(format!("lease row {partition} out of range").into())
            })?,
            epoch: row.col("epoch")?,
            clean: row.col("clean")?,
            checkpoint: row.col("checkpoint")?,
            since_expiry_ms: row.col("since_expiry_ms")?,
        })
    }

    /// Clean if never granted (`clean` starts true) or released by an owner that marked
    /// all it published; otherwise the owner vanished or released uncleanly, and the new
    /// owner must reconcile.
    pub(crate) fn takeover(&self) -> Takeover {
        if self.clean {
            return Takeover::Clean;
        }
        Takeover::Unclean {
            since_expiry: Duration::from_millis(self.since_expiry_ms.max(0).unsigned_abs()),
            checkpoint: self.checkpoint.and_then(|c| {
                let checkpoint = u64::try_from(c).ok();
                if checkpoint.is_none() {
                    // Without it, reconciliation looks further back: slower, never wrong.
                    warn!(
                        partition = self.partition,
                        checkpoint = c,
                        "ignoring a negative checkpoint"
                    );
                }
                checkpoint
            }),
        }
    }
}

/// A sink checkpoint as the lease tables store it (a signed 64-bit integer).
pub(crate) fn stored_checkpoint(checkpoint: Option<u64>) -> Result<Option<i64>, StoreError> {
    checkpoint
        .map(|c| {
            i64::try_from(c).map_err(|_| {
                corrupt(format!(
                    "checkpoint {c} is beyond what the lease table holds"
                ))
            })
        })
        .transpose()
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
