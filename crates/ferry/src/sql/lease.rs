//! [`LeaseStore`] for [`SqlOutbox`]: a lease table in the outbox's own database, on the
//! database's clock, so that relays agree on expiry whatever their own clocks say.

use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;

use ferry_core::{Lease, LeaseStore, StoreError};

use super::dialect::Dialect;
use super::driver::RowExt;
use super::error::store_error;
use super::outbox::SqlOutbox;
use super::row::{FreeLease, millis};
use super::statement::Arg;

#[async_trait]
impl<D: Dialect> LeaseStore for SqlOutbox<D> {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        s.relay_heartbeat
            .execute::<D>(&mut tx, &[relay.into(), Arg::Int(millis(ttl))])
            .await?;
        s.relays_forget.execute::<D>(&mut tx, &[]).await?;
        let live: i64 = s
            .relays_live
            .fetch_one::<D>(&mut tx, &[])
            .await?
            .col("live")
            .map_err(store_error::<D>)?;
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    /// Reads the free rows and grants them in one write transaction, the rows locked from
    /// the read to the grant (or the whole database, on SQLite), so that two relays never
    /// both see a partition free.
    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &self.statements;
        let mut tx = self.begin_write().await?;
        let free = s
            .leases_free
            .fetch_all::<D>(&mut tx, &[Arg::Int(i64::try_from(max).unwrap_or(i64::MAX))])
            .await?
            .iter()
            .map(FreeLease::read::<D::Db>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error::<D>)?;
        let mut leases = Vec::with_capacity(free.len());
        for row in free {
            let granted = s
                .lease_grant
                .execute::<D>(
                    &mut tx,
                    &[
                        relay.into(),
                        Arg::Int(millis(ttl)),
                        row.partition.into(),
                        row.epoch.into(),
                    ],
                )
                .await?;
            if granted == 0 {
                continue;
            }
            let lease = Lease {
                partition: row.partition,
                epoch: row.epoch + 1,
                owner: relay.to_owned(),
                takeover: row.takeover(),
            };
            debug!(partition = lease.partition, epoch = lease.epoch, relay, takeover = ?lease.takeover, "lease granted");
            leases.push(lease);
        }
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(leases)
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let mut renewed = Vec::with_capacity(leases.len());
        for lease in leases {
            let extended = self
                .statements
                .lease_renew
                .execute::<D>(
                    &mut tx,
                    &[
                        lease.partition.into(),
                        lease.epoch.into(),
                        Arg::Text(&lease.owner),
                        Arg::Int(millis(ttl)),
                    ],
                )
                .await?;
            if extended > 0 {
                renewed.push(lease.partition);
            }
        }
        tx.commit().await.map_err(store_error::<D>)?;
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let released = self
            .statements
            .lease_release
            .execute::<D>(
                &mut *self.acquire().await?,
                &[
                    lease.partition.into(),
                    lease.epoch.into(),
                    Arg::Text(&lease.owner),
                    clean.into(),
                ],
            )
            .await?;
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
        self.statements
            .relay_leave
            .execute::<D>(&mut *self.acquire().await?, &[relay.into()])
            .await?;
        Ok(())
    }
}
