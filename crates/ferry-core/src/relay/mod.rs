//! The relay loop: lease partitions, and for each owned partition read in order, publish
//! with pipelined acks, then mark exactly the acked messages under the lease's epoch.

mod capture;
mod deadline;
mod feed;
mod leases;
mod metrics;
mod replay;
mod retry;
#[cfg(test)]
mod tests;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::metrics::record_outbox_status;
pub use self::replay::{
    Replay, ReplayCheckpoint, ReplayEnd, ReplayError, ReplayOptions, ReplayProgress,
};

use self::leases::Workers;
use self::metrics::Instruments;
use self::retry::{Failed, Retry};
use crate::backoff::Backoff;
use crate::capture::LogCapture;
use crate::error::{ErrorChain, StoreError};
use crate::lease::LeaseStore;
use crate::sink::Sink;
use crate::store::{OutboxStore, Wakers};

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
    /// What a message the sink rejects for good does to its partition. Defaults to
    /// [`OnPermanentFailure::Block`].
    pub on_permanent_failure: OnPermanentFailure,
}

/// What the relay does with a message the sink rejects for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnPermanentFailure {
    /// The partition stops at the message, with the reason recorded, and retries it every
    /// `retry_max` (or at once when an operator asks) until it passes or an operator skips
    /// it. Nothing behind it overtakes it.
    #[default]
    Block,
    /// The message and every later message of its aggregate are parked, in order, until an
    /// operator requeues them; the rest of the partition keeps flowing. Keys other than the
    /// aggregate's may share the partition: their order is kept, the aggregate's is held.
    ParkAggregate,
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
            on_permanent_failure: OnPermanentFailure::Block,
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
    /// Partition workers that panicked.
    pub worker_panics: AtomicU64,
    /// Messages found already in the broker when taking a partition over.
    pub reconciled: AtomicU64,
    /// Messages parked by the `park-aggregate` policy.
    pub parked: AtomicU64,
    /// Partitions this relay owns now.
    pub owned_partitions: AtomicU64,
    /// Whether this relay streams the log now (log capture mode).
    pub streaming: AtomicBool,
    /// Whether the last lease round reached the lease store, so that the relay holds its
    /// leases or waits for free ones: what readiness checks.
    pub leases_reached: AtomicBool,
}

/// A relay failed for a reason retrying cannot fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration asks for something the relay cannot do; the text says what to
    /// change.
    #[error("{0}")]
    Config(String),
}

/// Moves messages from an [`OutboxStore`] to a [`Sink`], owning partitions through a
/// [`LeaseStore`].
pub struct Relay {
    store: Arc<dyn OutboxStore>,
    leases: Arc<dyn LeaseStore>,
    sink: Arc<dyn Sink>,
    config: Arc<RelayConfig>,
    instruments: Arc<Instruments>,
    /// Set in log capture mode: the log the relay streams instead of polling.
    capture: Option<Arc<dyn LogCapture>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Registers the relay's metrics with the current `metrics` recorder (install the
    /// exporter before).
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
            instruments: Arc::new(Instruments::register()),
            capture: None,
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.instruments.stats)
    }

    /// Runs until `shutdown` is cancelled, then stops fetching, lets in-flight batches
    /// finish (up to `shutdown_timeout`, abandoning them unmarked after that), releases the
    /// leases and calls the sink's `shutdown`. Fails only on errors retrying cannot fix
    /// (e.g. missing tables); outages are retried with backoff.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let Some(partitions) = self.wait_for_store(&shutdown).await? else {
            return Ok(());
        };
        info!(relay = %self.config.relay_id, partitions, log_capture = self.capture.is_some(), "relay started");
        if let Some(capture) = self.capture.clone() {
            let streamed = tokio::select! {
                streamed = self.run_log_capture(capture, partitions, &shutdown) => streamed,
                never = self.purge_forever() => match never {},
            };
            self.stop(None).await;
            return streamed;
        }
        let wakers = Arc::new(Wakers::new(partitions));
        let watcher = tokio::spawn(watch_store(
            Arc::clone(&self.store),
            Arc::clone(&wakers),
            self.config.backoff(),
        ));
        let mut workers = Workers::new(partitions, Arc::clone(&wakers));
        let mut lease_tick = tokio::time::interval(self.config.lease_ttl / 3);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut purge_tick = tokio::time::interval(self.config.purge_interval);
        let purging = !self.store.retention().is_zero();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = lease_tick.tick() => self.maintain_leases(&mut workers).await,
                _ = purge_tick.tick(), if purging => self.purge().await,
            }
        }
        self.stop_workers(workers).await;
        self.stop(Some(watcher)).await;
        Ok(())
    }

    /// Purges published rows past the retention every purge interval (never, without
    /// retention).
    async fn purge_forever(&self) -> std::convert::Infallible {
        if self.store.retention().is_zero() {
            return std::future::pending().await;
        }
        let mut purge_tick = tokio::time::interval(self.config.purge_interval);
        loop {
            purge_tick.tick().await;
            self.purge().await;
        }
    }

    async fn purge(&self) {
        match self.store.purge_published().await {
            Ok(0) => {}
            Ok(purged) => info!(purged, "purged published messages past retention"),
            Err(err) => warn!(error = %ErrorChain(&err), "purge failed"),
        }
    }

    /// What every run ends with, once no partition is relayed any more.
    async fn stop(&self, watcher: Option<tokio::task::JoinHandle<()>>) {
        if let Err(err) = self.leases.leave(&self.config.relay_id).await {
            warn!(error = %ErrorChain(&err), "failed to leave the relay set; others rebalance when it expires");
        }
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        self.sink.shutdown().await;
        info!(relay = %self.config.relay_id, "relay stopped");
    }

    /// The outbox's partition count, once the store answers; `None` if shut down first.
    async fn wait_for_store(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<u32>, RelayError> {
        let answered = Retry::new("store unreachable", self.config.backoff())
            .until(shutdown)
            .run(|| async move {
                match self.store.partitions().await {
                    Err(err) if err.is_retryable() => Err(Failed::Retry(err)),
                    answer => Ok(answer),
                }
            })
            .await;
        match answered {
            Ok(answer) => Ok(Some(answer?)),
            Err(_stopped) => Ok(None),
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
                warn!(error = %ErrorChain(&err), retry_in_ms = delay.as_millis() as u64, "wake-up listener failed; polling meanwhile")
            }
        }
        sleep(delay).await;
    }
}
