//! The relay loop: lease partitions, and for each owned partition read in order, publish
//! with pipelined acks, then mark exactly the acked messages under the lease's epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::lease::{Lease, LeaseStore, Takeover};
use crate::message::Message;
use crate::partition::partition_for;
use crate::sink::{ReconcileRequest, Sink, SinkError};
use crate::store::{OutboxStore, StoreError, Wakers};

/// How a relay runs. Every default is what `RelayConfig::new` sets.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Unique name of this relay among those sharing the outbox (e.g. `host-pid`).
    pub relay_id: String,
    /// Messages read and published per partition at a time. Defaults to 1000.
    pub batch_size: usize,
    /// How long a lease lasts without renewal; renewed every third of it. Defaults to 10 s.
    pub lease_ttl: Duration,
    /// Fallback poll interval when no wake-up arrives. Defaults to 1 s.
    pub poll_interval: Duration,
    /// First retry delay after an error, doubled up to `retry_max`. Defaults to 100 ms.
    pub retry_initial: Duration,
    /// Longest retry delay, also the retry pace of a blocked partition. Defaults to 30 s.
    pub retry_max: Duration,
    /// How long shutdown waits for in-flight batches before abandoning them. Defaults to 10 s.
    pub shutdown_timeout: Duration,
    /// How often published rows past the store's retention are purged. Defaults to 60 s.
    pub purge_interval: Duration,
    /// Whether the leases come from a backend outside the outbox store (Redis, etcd): each
    /// grant is then adopted by the store ([`OutboxStore::adopt`]) before the partition is
    /// touched, so that the store fences older owners. Defaults to false.
    pub external_leases: bool,
}

impl RelayConfig {
    pub fn new(relay_id: impl Into<String>) -> Self {
        Self {
            relay_id: relay_id.into(),
            batch_size: 1000,
            lease_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            purge_interval: Duration::from_secs(60),
            external_leases: false,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.retry_initial, self.retry_max)
    }
}

/// Counters a relay keeps, for benchmarks, metrics and logs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Messages the sink acknowledged.
    pub published: AtomicU64,
    /// Rows marked published (or deleted).
    pub marked: AtomicU64,
    /// Messages the sink failed to publish (each attempt counts).
    pub publish_failures: AtomicU64,
    /// Leases lost or fenced while owned.
    pub leases_lost: AtomicU64,
    /// Messages found already in the broker when taking a partition over.
    pub reconciled: AtomicU64,
    /// Partitions this relay owns now.
    pub owned_partitions: AtomicU64,
}

/// A relay failed for a reason retrying cannot fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Moves messages from an [`OutboxStore`] to a [`Sink`], owning partitions through a
/// [`LeaseStore`].
pub struct Relay {
    store: Arc<dyn OutboxStore>,
    leases: Arc<dyn LeaseStore>,
    sink: Arc<dyn Sink>,
    config: Arc<RelayConfig>,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(
        store: Arc<dyn OutboxStore>,
        leases: Arc<dyn LeaseStore>,
        sink: Arc<dyn Sink>,
        config: RelayConfig,
    ) -> Self {
        Self {
            store,
            leases,
            sink,
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` is cancelled, then stops fetching, lets in-flight batches
    /// finish (up to `shutdown_timeout`, abandoning them unmarked after that), releases the
    /// leases and calls the sink's `shutdown`. Fails only on errors retrying cannot fix
    /// (e.g. missing tables); outages are retried with backoff.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let Some(partitions) = self.wait_for_store(&shutdown).await? else {
            return Ok(());
        };
        info!(relay = %self.config.relay_id, partitions, "relay started");
        let wakers = Arc::new(Wakers::new(partitions));
        let watcher = tokio::spawn(watch_store(
            Arc::clone(&self.store),
            Arc::clone(&wakers),
            self.config.backoff(),
        ));
        let mut workers = HashMap::new();
        let mut lease_tick = tokio::time::interval(self.config.lease_ttl / 3);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut purge_tick = tokio::time::interval(self.config.purge_interval);
        let purging = !self.store.retention().is_zero();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = lease_tick.tick() => self.maintain_leases(&mut workers, partitions, &wakers).await,
                _ = purge_tick.tick(), if purging => match self.store.purge_published().await {
                    Ok(0) => {}
                    Ok(purged) => info!(purged, "purged published messages past retention"),
                    Err(err) => warn!(error = %err, "purge failed"),
                },
            }
        }
        self.stop_workers(workers).await;
        if let Err(err) = self.leases.leave(&self.config.relay_id).await {
            warn!(error = %err, "failed to leave the relay set; others rebalance when it expires");
        }
        watcher.abort();
        self.sink.shutdown().await;
        info!(relay = %self.config.relay_id, "relay stopped");
        Ok(())
    }

    async fn wait_for_store(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<u32>, RelayError> {
        let mut backoff = self.config.backoff();
        loop {
            match self.store.partitions().await {
                Ok(p) => return Ok(Some(p)),
                Err(err) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "store unreachable");
                    if !sleep_unless(delay, shutdown).await {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// One lease round: heartbeat, renew what we hold, give up the excess over our fair
    /// share, take free partitions up to it.
    async fn maintain_leases(
        &self,
        workers: &mut HashMap<u32, WorkerHandle>,
        partitions: u32,
        wakers: &Arc<Wakers>,
    ) {
        workers.retain(|_, w| !w.join.is_finished());
        let ttl = self.config.lease_ttl;
        let round_started = Instant::now();
        let live = match self.leases.heartbeat(&self.config.relay_id, ttl).await {
            Ok(live) => live.max(1),
            Err(err) => {
                warn!(error = %err, "lease heartbeat failed; owned partitions stop when their leases run out");
                return;
            }
        };
        let held: Vec<Lease> = workers.values().map(|w| w.lease.clone()).collect();
        if !held.is_empty() {
            match self.leases.renew(&held, ttl).await {
                Ok(renewed) => {
                    for (partition, worker) in workers.iter() {
                        if renewed.contains(partition) {
                            worker.deadline.extend_to(round_started + ttl);
                        } else if !worker.stop.is_cancelled() {
                            warn!(partition, epoch = worker.lease.epoch, "lease lost");
                            self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                            worker.deadline.expire();
                            worker.stop.cancel();
                        }
                    }
                }
                Err(err) => warn!(error = %err, "lease renewal failed"),
            }
        }
        let fair_share = partitions.div_ceil(live as u32) as usize;
        let mut active: Vec<u32> = workers
            .iter()
            .filter(|(_, w)| !w.stop.is_cancelled())
            .map(|(p, _)| *p)
            .collect();
        if active.len() > fair_share {
            active.sort_unstable();
            for partition in active.split_off(fair_share) {
                info!(
                    partition,
                    live, fair_share, "handing partition over to rebalance"
                );
                workers[&partition].stop.cancel();
            }
        } else if active.len() < fair_share {
            let wanted = fair_share - active.len();
            match self
                .leases
                .acquire(&self.config.relay_id, wanted, ttl)
                .await
            {
                Ok(granted) => {
                    for lease in granted {
                        info!(partition = lease.partition, epoch = lease.epoch, takeover = ?lease.takeover, "partition acquired");
                        let handle =
                            self.spawn_worker(lease, partitions, round_started + ttl, wakers);
                        workers.insert(handle.lease.partition, handle);
                    }
                }
                Err(err) => warn!(error = %err, "lease acquisition failed"),
            }
        }
        let owned = workers.values().filter(|w| !w.join.is_finished()).count();
        self.stats
            .owned_partitions
            .store(owned as u64, Ordering::Relaxed);
    }

    fn spawn_worker(
        &self,
        lease: Lease,
        partitions: u32,
        deadline: Instant,
        wakers: &Arc<Wakers>,
    ) -> WorkerHandle {
        let deadline = Arc::new(LeaseDeadline::new(deadline));
        let stop = CancellationToken::new();
        let worker = Worker {
            lease: lease.clone(),
            partitions,
            store: Arc::clone(&self.store),
            leases: Arc::clone(&self.leases),
            sink: Arc::clone(&self.sink),
            config: Arc::clone(&self.config),
            stats: Arc::clone(&self.stats),
            wakers: Arc::clone(wakers),
            deadline: Arc::clone(&deadline),
            stop: stop.clone(),
        };
        WorkerHandle {
            lease,
            deadline,
            stop,
            join: tokio::spawn(worker.run()),
        }
    }

    async fn stop_workers(&self, workers: HashMap<u32, WorkerHandle>) {
        for worker in workers.values() {
            worker.stop.cancel();
        }
        let give_up_at = Instant::now() + self.config.shutdown_timeout;
        for (partition, mut worker) in workers {
            if timeout_at(give_up_at, &mut worker.join).await.is_err() {
                warn!(
                    partition,
                    "abandoning the in-flight batch unmarked at shutdown"
                );
                worker.join.abort();
                if let Err(err) = self.leases.release(&worker.lease, false).await {
                    warn!(partition, error = %err, "failed to release lease; it will expire");
                }
            }
        }
    }
}

/// Re-runs the store's wake-up watcher after errors, waking every partition after each
/// failure because notifications may have been missed meanwhile.
async fn watch_store(store: Arc<dyn OutboxStore>, wakers: Arc<Wakers>, mut backoff: Backoff) {
    loop {
        let result = store.watch(&wakers).await;
        wakers.wake_all();
        let delay = backoff.next_delay();
        match result {
            Ok(()) => backoff.reset(),
            Err(err) => {
                warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "wake-up listener failed; polling meanwhile")
            }
        }
        sleep(delay).await;
    }
}

/// Sleeps for `delay`; returns false if `stop` fired first.
async fn sleep_unless(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = sleep(delay) => true,
        _ = stop.cancelled() => false,
    }
}

/// The local view of when a lease runs out: the instant before the last successful
/// renewal was sent, plus the TTL. The store's own expiry is never earlier, so a worker
/// that stops at this deadline stops before another relay can be granted the partition.
#[derive(Debug)]
struct LeaseDeadline {
    origin: Instant,
    nanos_after_origin: AtomicU64,
}

impl LeaseDeadline {
    fn new(deadline: Instant) -> Self {
        let origin = Instant::now();
        let me = Self {
            origin,
            nanos_after_origin: AtomicU64::new(0),
        };
        me.extend_to(deadline);
        me
    }

    fn extend_to(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(self.origin).as_nanos() as u64;
        self.nanos_after_origin.fetch_max(nanos, Ordering::Release);
    }

    fn expire(&self) {
        self.nanos_after_origin.store(0, Ordering::Release);
    }

    fn is_valid(&self) -> bool {
        let deadline =
            self.origin + Duration::from_nanos(self.nanos_after_origin.load(Ordering::Acquire));
        Instant::now() < deadline
    }
}

struct WorkerHandle {
    lease: Lease,
    deadline: Arc<LeaseDeadline>,
    /// Graceful stop: finish the batch in flight, then release.
    stop: CancellationToken,
    join: JoinHandle<()>,
}

/// Owns one partition for the life of one lease.
struct Worker {
    lease: Lease,
    partitions: u32,
    store: Arc<dyn OutboxStore>,
    leases: Arc<dyn LeaseStore>,
    sink: Arc<dyn Sink>,
    config: Arc<RelayConfig>,
    stats: Arc<RelayStats>,
    wakers: Arc<Wakers>,
    deadline: Arc<LeaseDeadline>,
    stop: CancellationToken,
}

/// Why a worker could not go on.
enum Interrupted {
    /// Graceful stop requested while waiting to retry.
    Stopped,
    /// The lease ran out or was taken: touch nothing more in this partition.
    LeaseLost,
    /// The sink can no longer publish the partition under this lease.
    SinkFenced,
}

impl Worker {
    fn partition(&self) -> u32 {
        self.lease.partition
    }

    async fn run(self) {
        let partition = self.partition();
        let outcome = self.relay_partition().await;
        self.sink.close_partition(partition).await;
        match outcome {
            Ok(clean) => {
                if let Err(err) = self.leases.release(&self.lease, clean).await {
                    warn!(partition, error = %err, "failed to release lease; it will expire");
                } else {
                    debug!(partition, clean, "lease released");
                }
            }
            Err(Interrupted::Stopped | Interrupted::SinkFenced) => {
                if let Err(err) = self.leases.release(&self.lease, false).await {
                    warn!(partition, error = %err, "failed to release lease; it will expire");
                }
            }
            Err(Interrupted::LeaseLost) => {
                self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                info!(
                    partition,
                    epoch = self.lease.epoch,
                    "stopped: lease no longer held"
                );
            }
        }
    }

    /// Relays until asked to stop. `Ok(clean)` says whether every message possibly
    /// published under this lease was marked.
    async fn relay_partition(&self) -> Result<bool, Interrupted> {
        let takeover = if self.config.external_leases {
            self.adopt().await?
        } else {
            self.lease.takeover.clone()
        };
        self.open_sink_partition().await?;
        if let Takeover::Unclean {
            since_expiry,
            checkpoint,
        } = takeover
        {
            self.reconcile(checkpoint, since_expiry).await?;
        }
        let partition = self.partition();
        let mut backoff = self.config.backoff();
        let mut blocked = false;
        // A failed publish may still have reached the broker: until a later batch has
        // been fully acked and marked, the next owner must reconcile.
        let mut maybe_unmarked = false;
        while !self.stop.is_cancelled() {
            self.ensure_lease()?;
            let batch = match self.store.fetch(partition, self.config.batch_size).await {
                Ok(batch) => batch,
                Err(err) => {
                    warn!(partition, error = %err, "fetch failed");
                    self.pause(backoff.next_delay()).await?;
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.wakers.wait(partition) => {}
                    _ = sleep(self.config.poll_interval) => {}
                    _ = self.stop.cancelled() => {}
                }
                continue;
            }
            self.ensure_lease()?;
            let outcomes = self.sink.publish(&batch).await;
            let mut acked = Vec::with_capacity(batch.len());
            let mut checkpoint = None;
            let mut failure: Option<(&Message, SinkError)> = None;
            for (message, outcome) in batch.iter().zip(outcomes) {
                match outcome {
                    Ok(delivery) => {
                        acked.push(message.id);
                        checkpoint = checkpoint.max(delivery.position);
                    }
                    Err(err) => {
                        if failure.is_none() {
                            failure = Some((message, err));
                        }
                    }
                }
            }
            self.stats
                .published
                .fetch_add(acked.len() as u64, Ordering::Relaxed);
            if failure.is_some() {
                // A checkpoint past an unacked message could hide it from reconciliation.
                checkpoint = None;
            }
            if !acked.is_empty() {
                self.mark(&acked, checkpoint).await?;
            }
            match failure {
                None => {
                    maybe_unmarked = false;
                    backoff.reset();
                    if blocked {
                        info!(partition, "partition unblocked");
                        self.set_blocked(None).await;
                        blocked = false;
                    }
                }
                Some((message, err)) if err.is_fenced() => {
                    error!(partition, message_id = %message.id, error = %err, "the sink fenced this partition: stopping it without marking more");
                    return Err(Interrupted::SinkFenced);
                }
                Some((message, err)) => {
                    maybe_unmarked = true;
                    let failed = batch.len() - acked.len();
                    self.stats
                        .publish_failures
                        .fetch_add(failed as u64, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    if err.is_retryable() {
                        warn!(partition, message_id = %message.id, failed, error = %err, retry_in_ms = delay.as_millis() as u64, "publish failed; retrying in order");
                    } else {
                        let reason = format!(
                            "message {} (sequence {}) rejected: {}",
                            message.id,
                            message.sequence,
                            error_chain(&err)
                        );
                        error!(partition, message_id = %message.id, error = %err, "partition blocked: the sink rejects a message; nothing after it is sent until it passes or an operator removes it");
                        self.set_blocked(Some(&reason)).await;
                        blocked = true;
                    }
                    self.pause(delay).await?;
                }
            }
        }
        self.ensure_lease()?;
        Ok(!maybe_unmarked)
    }

    fn ensure_lease(&self) -> Result<(), Interrupted> {
        if self.deadline.is_valid() {
            Ok(())
        } else {
            Err(Interrupted::LeaseLost)
        }
    }

    /// Waits before a retry; gives up if stopped or if the lease runs out meanwhile.
    async fn pause(&self, delay: Duration) -> Result<(), Interrupted> {
        if !sleep_unless(delay, &self.stop).await {
            return Err(Interrupted::Stopped);
        }
        self.ensure_lease()
    }

    /// Marks acked messages, retrying store outages while the lease lasts. Not cut short by
    /// a graceful stop: marking what was published is what makes the release clean.
    async fn mark(&self, ids: &[Uuid], checkpoint: Option<u64>) -> Result<(), Interrupted> {
        let mut backoff = self.config.backoff();
        loop {
            match self
                .store
                .mark_published(&self.lease, ids, checkpoint)
                .await
            {
                Ok(marked) => {
                    self.stats.marked.fetch_add(marked, Ordering::Relaxed);
                    return Ok(());
                }
                Err(StoreError::Fenced { partition, epoch }) => {
                    warn!(partition, epoch, "mark refused: lease taken over; stopping");
                    return Err(Interrupted::LeaseLost);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(partition = self.partition(), error = %err, retry_in_ms = delay.as_millis() as u64, "mark failed");
                    sleep(delay).await;
                    self.ensure_lease()?;
                }
            }
        }
    }

    /// Has the store adopt an external lease, retrying outages while the lease lasts;
    /// returns the takeover completed with the checkpoint the store recorded.
    async fn adopt(&self) -> Result<Takeover, Interrupted> {
        let mut backoff = self.config.backoff();
        loop {
            self.ensure_lease()?;
            match self.store.adopt(&self.lease).await {
                Ok(recorded) => {
                    return Ok(match self.lease.takeover {
                        Takeover::Clean => Takeover::Clean,
                        Takeover::Unclean {
                            since_expiry,
                            checkpoint,
                        } => {
                            let checkpoint = checkpoint.max(recorded);
                            info!(
                                partition = self.partition(),
                                epoch = self.lease.epoch,
                                ?checkpoint,
                                "lease adopted; reconciling from the checkpoint the outbox recorded"
                            );
                            Takeover::Unclean {
                                since_expiry,
                                checkpoint,
                            }
                        }
                    });
                }
                Err(StoreError::Fenced { partition, epoch }) => {
                    error!(
                        partition,
                        epoch,
                        "the outbox already holds a newer fencing epoch than the lease backend granted; the backend lost its epochs (e.g. Redis restarted without persistence) or relays use different lease backends: restart the relays so that the backend's epochs start above the outbox's"
                    );
                    return Err(Interrupted::LeaseLost);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(partition = self.partition(), error = %err, retry_in_ms = delay.as_millis() as u64, "adopting the lease failed");
                    self.pause(delay).await?;
                }
            }
        }
    }

    /// Lets the sink claim the partition before anything is reconciled or published,
    /// retrying while the lease lasts.
    async fn open_sink_partition(&self) -> Result<(), Interrupted> {
        let mut backoff = self.config.backoff();
        loop {
            self.ensure_lease()?;
            match self.sink.open_partition(&self.lease).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(partition = self.partition(), error = %err, retry_in_ms = delay.as_millis() as u64, "the sink cannot open the partition");
                    self.pause(delay).await?;
                }
            }
        }
    }

    async fn set_blocked(&self, reason: Option<&str>) {
        if let Err(err) = self.store.set_blocked(&self.lease, reason).await {
            warn!(partition = self.partition(), error = %err, "failed to record the partition's blocked state");
        }
    }

    /// After an unclean takeover, marks what the previous owner published but never
    /// marked, so it is not sent again (G4).
    async fn reconcile(
        &self,
        checkpoint: Option<u64>,
        since_expiry: Duration,
    ) -> Result<(), Interrupted> {
        let partition = self.partition();
        let partitions = self.partitions;
        let owns_key = move |key: &str| partition_for(key, partitions) == partition;
        let mut backoff = self.config.backoff();
        loop {
            self.ensure_lease()?;
            let request = ReconcileRequest {
                partition,
                checkpoint,
                since_expiry,
                owns_key: &owns_key,
            };
            match self.sink.reconcile(request).await {
                Ok(ids) if ids.is_empty() => return Ok(()),
                Ok(ids) => {
                    info!(
                        partition,
                        found = ids.len(),
                        "reconciled: already in the broker, marking instead of re-sending"
                    );
                    self.stats
                        .reconciled
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    return self.mark(&ids, None).await;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(partition, error = %err, retry_in_ms = delay.as_millis() as u64, "reconciliation failed");
                    self.pause(delay).await?;
                }
            }
        }
    }
}

/// `err: cause: cause…`, for reasons stored where no log formatter will walk the chain.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
