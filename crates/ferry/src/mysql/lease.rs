//! [`LeaseStore`] for MySQL: a lease table in the outbox's own database, on the server's
//! clock.

use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;

use ferry_core::{Lease, LeaseStore, StoreError, Takeover};

use super::queries::{EXTEND_LEASES, GRANT_LEASES, HELD_LEASES};
use super::{MyOutbox, micros};
use crate::sql::store_error;

/// A lease row as it was before a grant: what decides the takeover kind.
#[derive(sqlx::FromRow)]
struct FreeLease {
    partition_no: i32,
    epoch: i64,
    clean: bool,
    checkpoint: Option<i64>,
    since_expiry_us: i64,
}

impl FreeLease {
    /// Clean if never granted or released by an owner that marked all it published
    /// (`clean` starts true, a grant sets it false, a release sets what the owner says).
    fn takeover(&self) -> Takeover {
        if self.clean {
            return Takeover::Clean;
        }
        Takeover::Unclean {
            since_expiry: Duration::from_micros(self.since_expiry_us.unsigned_abs()),
            // A negative checkpoint cannot come from a sink; without one, reconciliation
            // looks further back: slower, never wrong.
            checkpoint: self.checkpoint.and_then(|c| u64::try_from(c).ok()),
        }
    }
}

/// A lease row's partition number (an INT column) as the relay counts partitions.
fn partition_number(partition_no: i32) -> Result<u32, StoreError> {
    u32::try_from(partition_no)
        .map_err(|_| StoreError::Other(format!("lease row {partition_no} out of range").into()))
}

#[async_trait]
impl LeaseStore for MyOutbox {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let q = &self.queries;
        sqlx::query(q.heartbeat.clone())
            .bind(relay)
            .bind(micros(ttl))
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        sqlx::query(q.forget_relays.clone())
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        let live: i64 = sqlx::query_scalar(q.live_relays.clone())
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    /// Locks the free rows (`FOR UPDATE SKIP LOCKED`) and grants them in one transaction,
    /// so that two relays never both see a partition free.
    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let q = &self.queries;
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let free: Vec<FreeLease> = sqlx::query_as(q.free_leases.clone())
            .bind(u64::try_from(max).unwrap_or(u64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        if free.is_empty() {
            return Ok(Vec::new());
        }
        let mut grant = sqlx::query(q.with_list(GRANT_LEASES, free.len()))
            .persistent(false)
            .bind(relay)
            .bind(micros(ttl));
        for row in &free {
            grant = grant.bind(row.partition_no);
        }
        grant.execute(&mut *tx).await.map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        free.iter()
            .map(|row| {
                // The row was locked from the read to the grant: its epoch went up by one.
                let lease = Lease {
                    partition: partition_number(row.partition_no)?,
                    epoch: row.epoch + 1,
                    owner: relay.to_owned(),
                    takeover: row.takeover(),
                };
                debug!(partition = lease.partition, epoch = lease.epoch, relay, takeover = ?lease.takeover, "lease granted");
                Ok(lease)
            })
            .collect()
    }

    /// Locks the rows still held by this owner and unexpired, and extends those whose
    /// epoch is the lease's, in one transaction.
    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        let Some(owner) = leases.first().map(|l| l.owner.as_str()) else {
            return Ok(Vec::new());
        };
        let q = &self.queries;
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let mut held = sqlx::query_as::<_, (i32, i64)>(q.with_list(HELD_LEASES, leases.len()))
            .persistent(false)
            .bind(owner);
        for lease in leases {
            held = held.bind(lease.partition);
        }
        let held = held.fetch_all(&mut *tx).await.map_err(store_error)?;
        let mut renewed = Vec::with_capacity(held.len());
        for (partition, epoch) in held {
            let partition = partition_number(partition)?;
            if leases
                .iter()
                .any(|l| l.partition == partition && l.epoch == epoch && l.owner == owner)
            {
                renewed.push(partition);
            }
        }
        if !renewed.is_empty() {
            let mut extend = sqlx::query(q.with_list(EXTEND_LEASES, renewed.len()))
                .persistent(false)
                .bind(micros(ttl));
            for partition in &renewed {
                extend = extend.bind(partition);
            }
            extend.execute(&mut *tx).await.map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let released = sqlx::query(self.queries.release_lease.clone())
            .bind(clean)
            .bind(lease.partition)
            .bind(lease.epoch)
            .bind(&lease.owner)
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        if released == 0 {
            // Already granted to another relay: nothing of ours left to give up.
            debug!(
                partition = lease.partition,
                epoch = lease.epoch,
                "lease already taken over; nothing to release"
            );
        }
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        sqlx::query(self.queries.leave.clone())
            .bind(relay)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}
