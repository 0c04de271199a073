//! [`LeaseStore`] for SQLite: a lease table in the outbox's own database, on SQLite's clock.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{Lease, LeaseStore, StoreError, Takeover};
use sqlx::SqliteConnection;
use tracing::{debug, warn};

use super::{SqliteOutbox, millis};
use crate::sql::store_error;

/// A lease row as it was before a grant: what decides the takeover kind.
#[derive(sqlx::FromRow)]
struct FreeLease {
    partition_no: i64,
    owner: Option<String>,
    epoch: i64,
    expires_at: i64,
    clean: bool,
    checkpoint: Option<i64>,
}

impl FreeLease {
    /// Clean if the partition was never granted, or its last owner released it saying
    /// everything it published was marked; otherwise the owner vanished (or released
    /// uncleanly) and the new owner must reconcile.
    fn takeover(&self, now_ms: i64) -> Takeover {
        if self.epoch == 0 || (self.owner.is_none() && self.clean) {
            return Takeover::Clean;
        }
        let since_expiry_ms = now_ms.saturating_sub(self.expires_at).max(0);
        Takeover::Unclean {
            since_expiry: Duration::from_millis(since_expiry_ms.unsigned_abs()),
            checkpoint: self.checkpoint.and_then(|c| {
                let checkpoint = u64::try_from(c).ok();
                if checkpoint.is_none() {
                    // Without it, reconciliation looks further back: slower, never wrong.
                    warn!(
                        partition = self.partition_no,
                        checkpoint = c,
                        "ignoring a negative checkpoint"
                    );
                }
                checkpoint
            }),
        }
    }
}

impl SqliteOutbox {
    /// The store's clock, read inside `conn`'s transaction so that one decision uses one
    /// instant.
    async fn now_ms(&self, conn: &mut SqliteConnection) -> Result<i64, StoreError> {
        sqlx::query_scalar(self.queries.now.clone())
            .fetch_one(conn)
            .await
            .map_err(store_error)
    }
}

#[async_trait]
impl LeaseStore for SqliteOutbox {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let q = &self.queries;
        let ttl = millis(ttl);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let now = self.now_ms(&mut tx).await?;
        sqlx::query(q.heartbeat.clone())
            .bind(relay)
            .bind(now)
            .bind(ttl)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::query(q.forget_relays.clone())
            .bind(now)
            .bind(ttl)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        let live: i64 = sqlx::query_scalar(q.live_relays.clone())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    /// Reads the free rows and grants them in one `BEGIN IMMEDIATE` transaction, so that
    /// two relays never both see a partition free.
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
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let now = self.now_ms(&mut tx).await?;
        let free: Vec<FreeLease> = sqlx::query_as(q.free_leases.clone())
            .bind(now)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        if free.is_empty() {
            return Ok(Vec::new());
        }
        let partitions: Vec<i64> = free.iter().map(|row| row.partition_no).collect();
        let granted: Vec<(i64, i64)> = sqlx::query_as(q.grant_leases.clone())
            .bind(relay)
            .bind(now.saturating_add(millis(ttl)))
            .bind(serde_json::Value::from(partitions).to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        let epochs: HashMap<i64, i64> = granted.into_iter().collect();
        let mut leases = Vec::with_capacity(free.len());
        for row in &free {
            let Some(&epoch) = epochs.get(&row.partition_no) else {
                continue;
            };
            let partition = u32::try_from(row.partition_no).map_err(|_| {
                StoreError::Other(format!("lease row {} out of range", row.partition_no).into())
            })?;
            let takeover = row.takeover(now);
            debug!(partition, epoch, relay, ?takeover, "lease granted");
            leases.push(Lease {
                partition,
                epoch,
                owner: relay.to_owned(),
                takeover,
            });
        }
        Ok(leases)
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let held: Vec<(u32, i64, &str)> = leases
            .iter()
            .map(|lease| (lease.partition, lease.epoch, lease.owner.as_str()))
            .collect();
        let held = serde_json::to_string(&held)
            .map_err(|err| StoreError::Other(format!("encoding leases: {err}").into()))?;
        let renewed: Vec<i64> = sqlx::query_scalar(self.queries.renew_leases.clone())
            .bind(held)
            .bind(millis(ttl))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(renewed
            .into_iter()
            .filter_map(|partition| u32::try_from(partition).ok())
            .collect())
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let released = sqlx::query(self.queries.release_lease.clone())
            .bind(i64::from(lease.partition))
            .bind(lease.epoch)
            .bind(&lease.owner)
            .bind(clean)
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
