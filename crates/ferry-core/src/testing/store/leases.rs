//! The lease half of [`MemoryStore`]: grants with an epoch one higher each time, renewals
//! of current leases only, releases that say how the next owner takes over.

use std::time::Duration;

use async_trait::async_trait;

use super::{MemoryStore, Release};
use crate::error::StoreError;
use crate::lease::{Lease, LeaseStore, Takeover};

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let mut state = self.leases()?;
        let now = state.now();
        state.relays.insert(relay.to_owned(), now + ttl);
        Ok(state
            .relays
            .values()
            .filter(|expires_at| **expires_at > now)
            .count())
    }

    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut state = self.leases()?;
        let now = state.now();
        let mut granted = Vec::new();
        for (partition, row) in (0..self.partitions).zip(&mut state.leases) {
            if granted.len() == max {
                break;
            }
            if row.owner.is_some() && row.expires_at > now {
                continue;
            }
            let takeover = if row.clean {
                Takeover::Clean
            } else {
                Takeover::Unclean {
                    since_expiry: now.saturating_duration_since(row.expires_at),
                    checkpoint: row.checkpoint,
                }
            };
            row.owner = Some(relay.to_owned());
            row.epoch += 1;
            row.expires_at = now + ttl;
            row.clean = false;
            granted.push(Lease {
                partition,
                epoch: row.epoch,
                owner: relay.to_owned(),
                takeover,
            });
        }
        Ok(granted)
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        let mut state = self.leases()?;
        let now = state.now();
        let mut renewed = Vec::new();
        for lease in leases {
            if let Some(row) = state.leases.get_mut(lease.partition as usize)
                && row.is_current(lease, now)
                && row.owner.as_deref() == Some(&lease.owner)
            {
                row.expires_at = now + ttl;
                renewed.push(lease.partition);
            }
        }
        Ok(renewed)
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let mut state = self.leases()?;
        let now = state.now();
        state.releases.push(Release {
            partition: lease.partition,
            epoch: lease.epoch,
            clean,
        });
        if let Some(row) = state.leases.get_mut(lease.partition as usize)
            && row.epoch == lease.epoch
        {
            row.owner = None;
            row.expires_at = row.expires_at.min(now);
            row.clean = clean;
        }
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        self.leases()?.relays.remove(relay);
        Ok(())
    }
}
