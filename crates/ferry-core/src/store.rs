//! The outbox store contract: where messages wait until the relay has published them.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

pub use crate::error::StoreError;
use crate::lease::Lease;
use crate::message::Message;

/// What `ferry status` shows for one partition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The relay holding an unexpired lease, if any.
    pub owner: Option<String>,
    pub epoch: i64,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Unpublished messages.
    pub backlog: u64,
    /// Age of the oldest unpublished message, in seconds.
    pub oldest_unpublished_age_secs: Option<f64>,
    /// Why the partition is not moving, when the sink rejected a message for good.
    pub blocked_reason: Option<String>,
}

/// One wake-up flag per partition; a wake before the wait is kept (coalescing), so no
/// notification is lost between a fetch that found nothing and the wait that follows.
#[derive(Debug)]
pub struct Wakers {
    partitions: Vec<Notify>,
}

impl Wakers {
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: (0..partitions).map(|_| Notify::new()).collect(),
        }
    }

    /// Wakes the worker of `partition` (ignored if out of range).
    pub fn wake(&self, partition: u32) {
        if let Some(notify) = self.partitions.get(partition as usize) {
            notify.notify_one();
        }
    }

    /// Wakes every partition: after a reconnect, when notifications may have been missed.
    pub fn wake_all(&self) {
        self.partitions.iter().for_each(Notify::notify_one);
    }

    /// Resolves at the next wake of `partition` (or at once if one is pending).
    pub async fn wait(&self, partition: u32) {
        match self.partitions.get(partition as usize) {
            Some(notify) => notify.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// Where messages wait to be published.
///
/// Contract:
/// - `fetch` returns the unpublished messages of one partition in ascending `sequence`,
///   reading committed data only. It keeps no cursor: a message whose transaction commits
///   late, with a lower sequence than one already published, is returned by the next fetch.
///   Messages of an aggregate held by a parked message (see [`crate::admin`]) are left out
///   until it is requeued.
/// - `mark_published` marks (or deletes, per the store's retention) exactly the given ids,
///   in one statement that also checks that `lease` is still current; if it is not, it
///   changes nothing and returns [`StoreError::Fenced`]. Marking an id twice is harmless.
/// - Calls for different partitions may run concurrently; the relay never runs two calls
///   for the same partition at once.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// The number of partitions P, fixed when the outbox was created.
    async fn partitions(&self) -> Result<u32, StoreError>;

    /// Up to `limit` unpublished messages of `partition`, oldest sequence first.
    async fn fetch(&self, partition: u32, limit: usize) -> Result<Vec<Message>, StoreError>;

    /// Marks `ids` published under `lease`, and records `checkpoint` (a sink position below
    /// which no unmarked message of this partition can be) when given. Returns how many
    /// rows changed.
    async fn mark_published(
        &self,
        lease: &Lease,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<u64, StoreError>;

    /// Records (or, with `None`, clears) why the partition cannot move, for `status`, and
    /// since when (kept while the reason is recorded again).
    async fn set_blocked(&self, lease: &Lease, reason: Option<&str>) -> Result<(), StoreError>;

    /// Whether an operator asked to retry the partition's head now (see
    /// [`OutboxAdmin::request_retry`](crate::admin::OutboxAdmin::request_retry)); the
    /// request is taken, so it answers yes once. Stores without operator requests keep the
    /// default: never.
    async fn take_retry_request(&self, lease: &Lease) -> Result<bool, StoreError> {
        let _ = lease;
        Ok(false)
    }

    /// Parks `message` (which the sink rejects for good) and every unpublished message of
    /// its aggregate in the partition, under `lease` (fenced like a mark): they leave the
    /// flow, holding the aggregate until an operator requeues them, while the rest of the
    /// partition goes on (the `park-aggregate` policy). `by` names the relay. Returns how
    /// many were parked. Stores that cannot park keep the default, which refuses.
    async fn park_aggregate(
        &self,
        lease: &Lease,
        message: &Message,
        by: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let _ = (by, reason);
        Err(StoreError::Other(
            format!(
                "this outbox store cannot park messages (message {} of partition {}): use on_permanent_failure = \"block\"",
                message.id, lease.partition
            )
            .into(),
        ))
    }

    /// Makes `lease`, granted by a lease backend outside this store (Redis, etcd), the
    /// partition's owner here, so that the store can fence older owners itself.
    ///
    /// Contract: raises the partition's fencing epoch to `lease.epoch`, never lowering it;
    /// fails with [`StoreError::Fenced`] if a newer epoch (or the same epoch held by another
    /// owner) is already there. From then on, with external leases, `mark_published` and
    /// `set_blocked` succeed only under the lease whose epoch (and owner) equals the
    /// partition's fencing epoch, checked in the same statement. Adopting the same lease
    /// again is harmless. Returns the partition's last recorded checkpoint, which the lease
    /// backend cannot know and an unclean takeover reconciles from. The relay calls it once
    /// per grant, before it reconciles or fetches. Stores whose leases are all their own
    /// keep the default, which refuses.
    async fn adopt(&self, lease: &Lease) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Other(
            format!(
                "this outbox store does not support leases held outside it (partition {}): use leases.type = \"store\"",
                lease.partition
            )
            .into(),
        ))
    }

    /// Which of `ids` (all of `partition`) are still in the outbox unpublished: the log
    /// capture relay publishes only those of a transaction that may have been published
    /// already (see [`crate::capture`]). Stores without log capture keep the default,
    /// which refuses.
    async fn unpublished(&self, partition: u32, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let _ = ids;
        Err(StoreError::Other(
            format!(
                "this outbox store cannot be captured from a log (partition {partition}): use capture.mode = \"poll\""
            )
            .into(),
        ))
    }

    /// Runs until an error, waking partitions when new messages commit. Stores without
    /// notifications keep the default, and the relay polls.
    async fn watch(&self, wakers: &Wakers) -> Result<(), StoreError> {
        let _ = wakers;
        std::future::pending().await
    }

    /// Per-partition owner, backlog and health.
    async fn status(&self) -> Result<Vec<PartitionStatus>, StoreError>;

    /// Deletes published messages kept for longer than the retention; returns how many.
    async fn purge_published(&self) -> Result<u64, StoreError>;

    /// How long the store keeps published rows (zero: deleted when marked).
    fn retention(&self) -> Duration;
}
