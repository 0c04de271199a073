//! Leases kept by the outbox itself ([`LeaseStore`]): scripts on Redis's clock.

use std::time::Duration;

use async_trait::async_trait;

use ferry_core::partition::fnv1a_32;
use ferry_core::{Lease, LeaseStore, StoreError, Takeover};

use super::error::store_error;
use super::scripts::SCRIPTS;
use super::{RedisOutbox, millis};

#[async_trait]
impl LeaseStore for RedisOutbox {
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError> {
        let mut invocation = SCRIPTS.heartbeat.prepare_invoke();
        invocation.arg(self.prefix()).arg(relay).arg(millis(ttl));
        let live: usize = self.invoke(&invocation).await?;
        Ok(live.max(1))
    }

    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // Relays look from different places, so that ones starting together rarely race.
        let mut invocation = SCRIPTS.acquire.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(relay)
            .arg(max)
            .arg(millis(ttl))
            .arg(fnv1a_32(relay.as_bytes()));
        let granted: Vec<(u32, i64, u8, u64, String)> = self.invoke(&invocation).await?;
        Ok(granted
            .into_iter()
            .map(|(partition, epoch, clean, since_expiry_ms, checkpoint)| {
                let takeover = if clean == 1 {
                    Takeover::Clean
                } else {
                    Takeover::Unclean {
                        since_expiry: Duration::from_millis(since_expiry_ms),
                        checkpoint: checkpoint.parse().ok(),
                    }
                };
                tracing::debug!(partition, epoch, relay, ?takeover, "lease granted");
                Lease {
                    partition,
                    epoch,
                    owner: relay.to_owned(),
                    takeover,
                }
            })
            .collect())
    }

    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError> {
        let Some(owner) = leases.first().map(|l| l.owner.as_str()) else {
            return Ok(Vec::new());
        };
        let mut invocation = SCRIPTS.renew.prepare_invoke();
        invocation.arg(self.prefix()).arg(owner).arg(millis(ttl));
        for lease in leases {
            invocation.arg(lease.partition).arg(lease.epoch);
        }
        self.invoke(&invocation).await
    }

    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError> {
        let mut invocation = SCRIPTS.release.prepare_invoke();
        invocation
            .arg(self.prefix())
            .arg(lease.partition)
            .arg(lease.epoch)
            .arg(u8::from(clean));
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    async fn leave(&self, relay: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = ::redis::cmd("ZREM")
            .arg(self.settings.key_prefix.key("relays"))
            .arg(relay)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }
}
