//! The lease contract: one owner per partition, with a fencing epoch.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;

/// Ownership of one partition by one relay. Every grant increments `epoch`; the store
/// refuses marks made with an older epoch (G5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: u32,
    pub epoch: i64,
    pub owner: String,
    /// How the previous owner left, which decides whether the new owner must reconcile.
    pub takeover: Takeover,
}

impl StoreError {
    /// The error of a write that found `lease` no longer current and changed nothing.
    /// (Defined here, next to [`Lease`], so that the error module depends on nothing.)
    pub fn fenced(lease: &Lease) -> Self {
        Self::Fenced {
            partition: lease.partition,
            epoch: lease.epoch,
        }
    }
}

/// How a partition was handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// The previous owner released it after marking everything it had published (or there
    /// was none): nothing to reconcile.
    Clean,
    /// The previous owner vanished (crash, pause, lost connection) and may have published
    /// messages it never marked.
    Unclean {
        /// How long ago its lease expired; none of its publishes is more recent than that,
        /// unless it was a paused zombie (which fencing and dedup cover).
        since_expiry: Duration,
        /// The last checkpoint it recorded: its unmarked publishes lie beyond it.
        checkpoint: Option<u64>,
    },
}

/// Grants, renews and releases partition leases, using the lease holder's clock (the
/// store's), never the relay's.
///
/// Contract: `acquire` never grants a partition whose lease is unexpired and held by
/// another relay; each grant increments the epoch; `renew` extends only leases whose epoch
/// is still current and returns the partitions it extended.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Records that `relay` is alive for `ttl`; returns how many relays are alive, itself
    /// included, so that each can aim at its fair share.
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<usize, StoreError>;

    /// Takes up to `max` partitions that are free or whose lease expired.
    async fn acquire(
        &self,
        relay: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Extends `leases` by `ttl`; returns the partitions still held.
    async fn renew(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<u32>, StoreError>;

    /// Gives a partition up. `clean` says that every message published under the lease
    /// was marked, so the next owner need not reconcile.
    async fn release(&self, lease: &Lease, clean: bool) -> Result<(), StoreError>;

    /// Removes `relay` from the live set (on shutdown), so others rebalance at once.
    async fn leave(&self, relay: &str) -> Result<(), StoreError>;
}
