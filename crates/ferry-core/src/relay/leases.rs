//! The lease loop: each round heartbeats, renews the leases held, gives up the excess over
//! the relay's fair share and acquires free partitions up to it, with one worker per
//! partition held; and, at shutdown, the workers' stop.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Relay;
use super::deadline::LeaseDeadline;
use super::worker::{Source, Worker};
use crate::error::ErrorChain;
use crate::lease::Lease;
use crate::store::Wakers;

/// The workers of the partitions this relay holds, and what a new one needs.
pub(super) struct Workers {
    by_partition: HashMap<u32, WorkerHandle>,
    /// The outbox's partition count P.
    partitions: u32,
    wakers: Arc<Wakers>,
}

impl Workers {
    pub(super) fn new(partitions: u32, wakers: Arc<Wakers>) -> Self {
        Self {
            by_partition: HashMap::new(),
            partitions,
            wakers,
        }
    }
}

/// The lease loop's side of one worker.
struct WorkerHandle {
    lease: Lease,
    deadline: Arc<LeaseDeadline>,
    /// Graceful stop: finish the batch in flight, then release.
    stop: CancellationToken,
    join: JoinHandle<()>,
}

impl Relay {
    /// One lease round: heartbeat, renew what we hold, give up the excess over our fair
    /// share, take free partitions up to it.
    pub(super) async fn maintain_leases(&self, workers: &mut Workers) {
        workers.by_partition.retain(|_, w| !w.join.is_finished());
        // The store's expiry of whatever this round renews or grants is never earlier.
        let valid_until = Instant::now() + self.config.lease_ttl;
        let live = self.heartbeat().await;
        self.instruments.lease_round(live.is_some());
        let Some(live) = live else {
            return;
        };
        self.renew(workers, valid_until).await;
        let fair_share = workers.partitions.div_ceil(live as u32) as usize;
        let active: Vec<u32> = workers
            .by_partition
            .iter()
            .filter(|(_, w)| !w.stop.is_cancelled())
            .map(|(p, _)| *p)
            .collect();
        if active.len() > fair_share {
            give_up_excess(workers, active, live, fair_share);
        } else if active.len() < fair_share {
            self.acquire(workers, fair_share - active.len(), valid_until)
                .await;
        }
        let owned = workers
            .by_partition
            .values()
            .filter(|w| !w.join.is_finished())
            .count();
        self.instruments.owned(owned);
    }

    /// Tells the lease store this relay is alive; returns how many relays are, or `None`
    /// if it could not be told (the round is skipped).
    async fn heartbeat(&self) -> Option<usize> {
        match self
            .leases
            .heartbeat(&self.config.relay_id, self.config.lease_ttl)
            .await
        {
            Ok(live) => Some(live.max(1)),
            Err(err) => {
                warn!(error = %ErrorChain(&err), "lease heartbeat failed; owned partitions stop when their leases run out");
                None
            }
        }
    }

    /// Extends the deadline of every lease the store renewed; stops the workers of the
    /// others at once.
    async fn renew(&self, workers: &Workers, valid_until: Instant) {
        let held: Vec<Lease> = workers
            .by_partition
            .values()
            .map(|w| w.lease.clone())
            .collect();
        if held.is_empty() {
            return;
        }
        match self.leases.renew(&held, self.config.lease_ttl).await {
            Ok(renewed) => {
                for (partition, worker) in &workers.by_partition {
                    if renewed.contains(partition) {
                        worker.deadline.extend_to(valid_until);
                    } else if !worker.stop.is_cancelled() {
                        warn!(partition, epoch = worker.lease.epoch, "lease lost");
                        self.instruments.lease_lost();
                        worker.deadline.expire();
                        worker.stop.cancel();
                    }
                }
            }
            Err(err) => warn!(error = %ErrorChain(&err), "lease renewal failed"),
        }
    }

    /// Takes up to `wanted` free partitions, each with a worker of its own.
    async fn acquire(&self, workers: &mut Workers, wanted: usize, valid_until: Instant) {
        match self
            .leases
            .acquire(&self.config.relay_id, wanted, self.config.lease_ttl)
            .await
        {
            Ok(granted) => {
                for lease in granted {
                    info!(partition = lease.partition, epoch = lease.epoch, takeover = ?lease.takeover, "partition acquired");
                    self.instruments.lease_acquired();
                    let handle = self.spawn_worker(lease, workers, valid_until);
                    workers.by_partition.insert(handle.lease.partition, handle);
                }
            }
            Err(err) => warn!(error = %ErrorChain(&err), "lease acquisition failed"),
        }
    }

    fn spawn_worker(&self, lease: Lease, workers: &Workers, valid_until: Instant) -> WorkerHandle {
        let deadline = Arc::new(LeaseDeadline::new(valid_until));
        let stop = CancellationToken::new();
        let worker = Worker {
            lease: lease.clone(),
            partitions: workers.partitions,
            store: Arc::clone(&self.store),
            leases: Arc::clone(&self.leases),
            sink: Arc::clone(&self.sink),
            config: Arc::clone(&self.config),
            instruments: Arc::clone(&self.instruments),
            wakers: Arc::clone(&workers.wakers),
            deadline: Arc::clone(&deadline),
            stop: stop.clone(),
            source: Source::Table { until_empty: false },
        };
        WorkerHandle {
            lease,
            deadline,
            stop,
            join: tokio::spawn(worker.run()),
        }
    }

    /// Asks every worker to stop, waits up to `shutdown_timeout` for their batches in
    /// flight, then abandons what is left unmarked and releases those leases unclean.
    pub(super) async fn stop_workers(&self, workers: Workers) {
        for worker in workers.by_partition.values() {
            worker.stop.cancel();
        }
        let give_up_at = Instant::now() + self.config.shutdown_timeout;
        for (partition, mut worker) in workers.by_partition {
            if timeout_at(give_up_at, &mut worker.join).await.is_err() {
                warn!(
                    partition,
                    "abandoning the in-flight batch unmarked at shutdown"
                );
                worker.join.abort();
                if let Err(err) = self.leases.release(&worker.lease, false).await {
                    warn!(partition, error = %ErrorChain(&err), "failed to release lease; it will expire");
                }
            }
        }
    }
}

/// Stops the workers of the highest-numbered partitions beyond `fair_share`; each releases
/// its lease once its batch in flight is marked, for another relay to take.
fn give_up_excess(workers: &Workers, mut active: Vec<u32>, live: usize, fair_share: usize) {
    active.sort_unstable();
    for partition in active.split_off(fair_share) {
        info!(
            partition,
            live, fair_share, "handing partition over to rebalance"
        );
        workers.by_partition[&partition].stop.cancel();
    }
}
