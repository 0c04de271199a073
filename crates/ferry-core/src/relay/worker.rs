//! The worker of one owned partition, for the life of one lease: open the partition in the
//! sink, reconcile after an unclean takeover, then fetch → publish → fenced mark, with
//! backoff after failures and a blocked reason while the sink rejects a message.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, debug_span, error, info, info_span, warn};
use uuid::Uuid;

use super::deadline::LeaseDeadline;
use super::feed::CapturedFeed;
use super::metrics::Instruments;
use super::retry::{Failed, Interrupted, Retry, ensure_held, wait};
use super::{OnPermanentFailure, RelayConfig};
use crate::backoff::Backoff;
use crate::error::{ErrorChain, StoreError, error_chain};
use crate::lease::{Lease, LeaseStore, Takeover};
use crate::message::Message;
use crate::partition::partition_for;
use crate::sink::{Delivery, ReconcileRequest, Sink, SinkError};
use crate::store::{OutboxStore, Wakers};

/// How long a captured batch's mark waits for rows the database streamed before making
/// them visible (see [`Worker::mark_captured`]).
const CAPTURED_ROWS_PATIENCE: Duration = Duration::from_secs(5);

/// The text a panic carried: `panic!`'s message, when it was a string.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Owns one partition for the life of one lease.
pub(super) struct Worker {
    pub(super) lease: Lease,
    pub(super) partitions: u32,
    pub(super) store: Arc<dyn OutboxStore>,
    pub(super) leases: Arc<dyn LeaseStore>,
    pub(super) sink: Arc<dyn Sink>,
    pub(super) config: Arc<RelayConfig>,
    pub(super) instruments: Arc<Instruments>,
    pub(super) wakers: Arc<Wakers>,
    pub(super) deadline: Arc<LeaseDeadline>,
    /// Graceful stop: finish the batch in flight, then release.
    pub(super) stop: CancellationToken,
    pub(super) source: Source,
}

/// Where the worker's batches come from.
pub(super) enum Source {
    /// The outbox table, read in sequence order (poll mode); with `until_empty`, the worker
    /// returns once a read finds the partition empty (the drain before log capture streams).
    Table { until_empty: bool },
    /// The partition's share of the captured transactions, in log order (log mode).
    Captured(tokio::sync::Mutex<CapturedFeed>),
}

/// What the worker carries from one batch to the next.
struct Progress {
    /// Paces retries after failed fetches and publishes; reset by a batch that fully passed.
    backoff: Backoff,
    /// Whether a blocked reason is recorded for the partition.
    blocked: bool,
    /// A failed publish may still have reached the broker: until a later batch has been
    /// fully acked and marked, the next owner must reconcile.
    maybe_unmarked: bool,
}

/// What a fetch came to.
enum Fetched {
    Batch(Vec<Message>),
    /// The read failed and the backoff's delay has passed.
    Retry,
    /// The captured feed closed, or the worker was asked to stop while waiting for it.
    End,
}

/// What the sink's outcomes for one batch come to.
struct Published<'a> {
    /// The messages the sink acknowledged, in batch order.
    acked: Vec<Uuid>,
    /// The highest broker position among the acks, if no message failed: a checkpoint past
    /// an unacked message could hide it from reconciliation.
    checkpoint: Option<u64>,
    /// The first message that failed, with its error.
    failure: Option<(&'a Message, SinkError)>,
}

impl<'a> Published<'a> {
    fn sort(batch: &'a [Message], outcomes: Vec<Result<Delivery, SinkError>>) -> Self {
        let mut acked = Vec::with_capacity(batch.len());
        let mut checkpoint = None;
        let mut failure = None;
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
        if failure.is_some() {
            checkpoint = None;
        }
        Self {
            acked,
            checkpoint,
            failure,
        }
    }
}

impl Worker {
    fn partition(&self) -> u32 {
        self.lease.partition
    }

    pub(super) async fn run(self) {
        let partition = self.partition();
        let outcome = self.relay_partition().await;
        self.sink.close_partition(partition).await;
        let clean = match outcome {
            Ok(clean) => clean,
            Err(Interrupted::Stopped | Interrupted::SinkFenced | Interrupted::Panicked) => false,
            Err(Interrupted::LeaseLost) => {
                self.instruments.lease_lost();
                info!(
                    partition,
                    epoch = self.lease.epoch,
                    "stopped: lease no longer held"
                );
                return;
            }
        };
        if let Err(err) = self.leases.release(&self.lease, clean).await {
            warn!(partition, error = %ErrorChain(&err), "failed to release lease; it will expire");
        } else {
            debug!(partition, clean, "lease released");
        }
    }

    /// Relays until asked to stop (or, per its source, until the partition is drained or
    /// its feed closed). `Ok(clean)` says whether every message possibly published under
    /// this lease was marked. A panic in any step (a bug, in ferry or a driver) is logged,
    /// counted and returned as [`Interrupted::Panicked`], so that the partition ends as after
    /// a stop, released unclean for a takeover that reconciles, instead of with a task
    /// that holds its lease and publishes nothing.
    pub(super) async fn relay_partition(&self) -> Result<bool, Interrupted> {
        // The worker's state is its lease and shared handles; a sink's locks recover from
        // poisoning, and the takeover reconciles whatever the interrupted batch published.
        let steps = AssertUnwindSafe(self.relay_steps()).catch_unwind().await;
        steps.unwrap_or_else(|panic| {
            error!(
                partition = self.partition(),
                epoch = self.lease.epoch,
                panic = panic_message(panic.as_ref()),
                "partition worker panicked; its lease is released unclean for a takeover"
            );
            self.instruments.worker_panicked();
            Err(Interrupted::Panicked)
        })
    }

    /// [`Self::relay_partition`]'s steps.
    async fn relay_steps(&self) -> Result<bool, Interrupted> {
        let takeover = self.takeover().await?;
        self.open_sink_partition().await?;
        if let Takeover::Unclean {
            since_expiry,
            checkpoint,
        } = takeover
        {
            self.reconcile(checkpoint, since_expiry).await?;
        }
        let mut progress = Progress {
            backoff: self.config.backoff(),
            blocked: false,
            maybe_unmarked: false,
        };
        while !self.stop.is_cancelled() {
            self.ensure_lease()?;
            // Debug level: an idle partition polls, and its empty fetches are no news.
            let fetch_span = debug_span!("fetch", partition = self.partition());
            let fetched = self.fetch(&mut progress.backoff).instrument(fetch_span);
            let batch = match fetched.await? {
                Fetched::Batch(batch) => batch,
                Fetched::Retry => continue,
                Fetched::End => break,
            };
            if batch.is_empty() {
                if matches!(self.source, Source::Table { until_empty: true }) {
                    break;
                }
                self.wait_for_messages().await;
                continue;
            }
            let batch_span = info_span!(
                "relay_batch",
                partition = self.partition(),
                epoch = self.lease.epoch,
                batch_size = batch.len(),
                first_sequence = batch[0].sequence,
            );
            self.relay_batch(&batch, &mut progress)
                .instrument(batch_span)
                .await?;
        }
        self.ensure_lease()?;
        Ok(!progress.maybe_unmarked)
    }

    /// Publishes a fetched batch, marks what the sink acked and settles the rest, with the
    /// publish and the mark as spans (exported over OTLP when `ferry relay` is so configured).
    async fn relay_batch(
        &self,
        batch: &[Message],
        progress: &mut Progress,
    ) -> Result<(), Interrupted> {
        self.ensure_lease()?;
        let published = self
            .publish(batch)
            .instrument(info_span!("publish", batch_size = batch.len()))
            .await;
        if !published.acked.is_empty() {
            let span = info_span!("mark", acked = published.acked.len());
            let (ids, checkpoint) = (&published.acked, published.checkpoint);
            match self.source {
                Source::Table { .. } => {
                    self.mark(ids, checkpoint).instrument(span).await?;
                }
                Source::Captured(_) => self.mark_captured(ids, checkpoint).instrument(span).await?,
            }
        }
        if let Source::Captured(feed) = &self.source {
            feed.lock().await.settle(batch, &published.acked);
        }
        let failed = batch.len() - published.acked.len();
        self.settle(progress, published.failure, failed).await
    }

    fn ensure_lease(&self) -> Result<(), Interrupted> {
        ensure_held(&self.deadline)
    }

    /// Waits before a retry; gives up if stopped or if the lease runs out meanwhile.
    async fn pause(&self, delay: Duration) -> Result<(), Interrupted> {
        wait(delay, Some(&self.stop), Some(&self.deadline)).await
    }

    /// The retry of one of this worker's steps: while the lease lasts.
    fn retry(&self, what: &'static str) -> Retry<'_> {
        Retry::new(what, self.config.backoff())
            .in_partition(self.partition())
            .while_held(&self.deadline)
    }

    /// How the previous owner left; with external leases, completed by the store.
    async fn takeover(&self) -> Result<Takeover, Interrupted> {
        if self.config.external_leases {
            self.adopt().await
        } else {
            Ok(self.lease.takeover.clone())
        }
    }

    /// Has the store adopt an external lease, retrying outages while the lease lasts;
    /// returns the takeover completed with the checkpoint the store recorded.
    async fn adopt(&self) -> Result<Takeover, Interrupted> {
        self.ensure_lease()?;
        let recorded = self
            .retry("adopting the lease failed")
            .until(&self.stop)
            .run(|| async move {
                match self.store.adopt(&self.lease).await {
                    Ok(recorded) => Ok(recorded),
                    Err(StoreError::Fenced { partition, epoch }) => {
                        error!(
                            partition,
                            epoch,
                            "the outbox already holds a newer fencing epoch than the lease backend granted; the backend lost its epochs (e.g. Redis restarted without persistence) or relays use different lease backends: restart the relays so that the backend's epochs start above the outbox's"
                        );
                        Err(Failed::Stop(Interrupted::LeaseLost))
                    }
                    Err(err) => Err(Failed::Retry(err)),
                }
            })
            .await?;
        Ok(match self.lease.takeover {
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
        })
    }

    /// Lets the sink claim the partition before anything is reconciled or published,
    /// retrying while the lease lasts.
    async fn open_sink_partition(&self) -> Result<(), Interrupted> {
        self.ensure_lease()?;
        self.retry("the sink cannot open the partition")
            .until(&self.stop)
            .run(|| async move {
                self.sink
                    .open_partition(&self.lease)
                    .await
                    .map_err(Failed::Retry)
            })
            .await
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
        let request = ReconcileRequest {
            partition,
            checkpoint,
            since_expiry,
            owns_key: &owns_key,
        };
        self.ensure_lease()?;
        let ids = self
            .retry("reconciliation failed")
            .until(&self.stop)
            .run(|| async move { self.sink.reconcile(request).await.map_err(Failed::Retry) })
            .await?;
        if ids.is_empty() {
            return Ok(());
        }
        info!(
            partition,
            found = ids.len(),
            "reconciled: already in the broker, marking instead of re-sending"
        );
        self.instruments.reconciled(ids.len());
        self.mark(&ids, None).await?;
        Ok(())
    }

    /// The partition's next unpublished messages: from the table, or the next captured
    /// ones (waiting for them).
    async fn fetch(&self, backoff: &mut Backoff) -> Result<Fetched, Interrupted> {
        let partition = self.partition();
        let table = match &self.source {
            Source::Table { .. } => self.store.fetch(partition, self.config.batch_size).await,
            Source::Captured(feed) => {
                let mut feed = feed.lock().await;
                return Ok(
                    match feed.next_batch(self.config.batch_size, &self.stop).await {
                        Some(batch) => Fetched::Batch(batch),
                        None => Fetched::End,
                    },
                );
            }
        };
        match table {
            Ok(batch) => Ok(Fetched::Batch(batch)),
            Err(err) => {
                warn!(partition, error = %ErrorChain(&err), "fetch failed");
                self.pause(backoff.next_delay()).await?;
                Ok(Fetched::Retry)
            }
        }
    }

    /// Waits for a wake-up, the poll interval or a stop, whichever comes first.
    async fn wait_for_messages(&self) {
        tokio::select! {
            _ = self.wakers.wait(self.partition()) => {}
            _ = sleep(self.config.poll_interval) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Publishes `batch` and counts what the sink acknowledged and what failed.
    async fn publish<'b>(&self, batch: &'b [Message]) -> Published<'b> {
        self.instruments.batch_read(batch.len());
        let outcomes = self.sink.publish(batch).await;
        self.instruments.published(batch, &outcomes);
        Published::sort(batch, outcomes)
    }

    /// Marks acked messages, retrying store outages while the lease lasts. Not cut short by
    /// a graceful stop: marking what was published is what makes the release clean.
    async fn mark(&self, ids: &[Uuid], checkpoint: Option<u64>) -> Result<u64, Interrupted> {
        let marked = self
            .retry("mark failed")
            .run(|| async move {
                match self
                    .store
                    .mark_published(&self.lease, ids, checkpoint)
                    .await
                {
                    Ok(marked) => Ok(marked),
                    Err(StoreError::Fenced { partition, epoch }) => {
                        warn!(partition, epoch, "mark refused: lease taken over; stopping");
                        Err(Failed::Stop(Interrupted::LeaseLost))
                    }
                    Err(err) => Err(Failed::Retry(err)),
                }
            })
            .await?;
        self.instruments.marked(marked);
        Ok(marked)
    }

    /// Marks a captured batch's acked messages. PostgreSQL streams a commit once its
    /// record is flushed, which is before the committing session makes its rows visible to
    /// others: a mark sent right after the broker's ack can find fewer rows than it names.
    /// It is sent again after short waits until every row is found, or for at most
    /// [`CAPTURED_ROWS_PATIENCE`] (a row an operator deleted is never found); a row still
    /// unmarked then stays in the table, and the next session's drain publishes it again.
    async fn mark_captured(
        &self,
        ids: &[Uuid],
        checkpoint: Option<u64>,
    ) -> Result<(), Interrupted> {
        let mut marked = self.mark(ids, checkpoint).await?;
        let give_up = Instant::now() + CAPTURED_ROWS_PATIENCE;
        // Rows become visible within moments of their commit: retry soon, then less often.
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(100));
        while marked < ids.len() as u64 && Instant::now() < give_up {
            wait(backoff.next_delay(), None, Some(&self.deadline)).await?;
            marked += self.mark(ids, checkpoint).await?;
        }
        if marked < ids.len() as u64 {
            warn!(
                partition = self.partition(),
                published = ids.len(),
                marked,
                "log capture: published rows not found in the outbox to mark; they stay there and the next streaming session's drain publishes them again"
            );
        }
        Ok(())
    }

    /// Once a batch's acked messages are marked: a batch that fully passed resets the
    /// backoff and unblocks the partition; a fenced sink stops the worker; any other
    /// failure is counted (`failed` messages), blocks the partition if permanent, and waits
    /// the backoff's delay before the partition is read again.
    async fn settle(
        &self,
        progress: &mut Progress,
        failure: Option<(&Message, SinkError)>,
        failed: usize,
    ) -> Result<(), Interrupted> {
        let partition = self.partition();
        let Some((message, err)) = failure else {
            progress.maybe_unmarked = false;
            progress.backoff.reset();
            if progress.blocked {
                self.unblock().await;
                progress.blocked = false;
            }
            return Ok(());
        };
        if err.is_fenced() {
            error!(partition, message_id = %message.id, error = %ErrorChain(&err), "the sink fenced this partition: stopping it without marking more");
            return Err(Interrupted::SinkFenced);
        }
        progress.maybe_unmarked = true;
        self.instruments.batch_failed(failed);
        let delay = progress.backoff.next_delay();
        if err.is_retryable() {
            warn!(partition, message_id = %message.id, failed, error = %ErrorChain(&err), retry_in_ms = delay.as_millis() as u64, "publish failed; retrying in order");
            return self.pause(delay).await;
        }
        if self.config.on_permanent_failure == OnPermanentFailure::ParkAggregate
            && self.park(message, &err).await?
        {
            if progress.blocked {
                self.unblock().await;
                progress.blocked = false;
            }
            return Ok(());
        }
        self.block(message, &err).await;
        progress.blocked = true;
        self.blocked_pause(delay).await
    }

    /// Parks `message` with its aggregate; false if the store cannot, and the partition
    /// blocks instead.
    async fn park(&self, message: &Message, err: &SinkError) -> Result<bool, Interrupted> {
        let reason = rejection(message, err);
        let by = format!("relay {}", self.config.relay_id);
        let parked = self
            .retry("parking the rejected message failed")
            .until(&self.stop)
            .run(|| async {
                match self
                    .store
                    .park_aggregate(&self.lease, message, &by, &reason)
                    .await
                {
                    Ok(parked) => Ok(Some(parked)),
                    Err(StoreError::Fenced { partition, epoch }) => {
                        warn!(partition, epoch, "park refused: lease taken over; stopping");
                        Err(Failed::Stop(Interrupted::LeaseLost))
                    }
                    Err(err) if err.is_retryable() => Err(Failed::Retry(err)),
                    Err(err) => {
                        error!(partition = self.partition(), error = %ErrorChain(&err), "cannot park the rejected message; blocking the partition instead");
                        Ok(None)
                    }
                }
            })
            .await?;
        let Some(parked) = parked else {
            return Ok(false);
        };
        warn!(partition = self.partition(), message_id = %message.id, aggregate_type = %message.aggregate_type, aggregate_id = %message.aggregate_id, parked, error = %ErrorChain(err), "the sink rejects a message: parked it with its aggregate's later messages until an operator requeues them; the partition goes on");
        self.instruments.parked(parked);
        Ok(true)
    }

    /// Waits `delay` before retrying a blocked partition's head, in steps of the poll
    /// interval, and retries at once when an operator asks (`ferry unblock`, `ferry skip`).
    async fn blocked_pause(&self, delay: Duration) -> Result<(), Interrupted> {
        let until = tokio::time::Instant::now() + delay;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.pause(left.min(self.config.poll_interval)).await?;
            match self.store.take_retry_request(&self.lease).await {
                Ok(true) => {
                    info!(
                        partition = self.partition(),
                        "retrying the blocked partition now, as an operator asked"
                    );
                    return Ok(());
                }
                Ok(false) => {}
                Err(err) => {
                    debug!(partition = self.partition(), error = %ErrorChain(&err), "reading the partition's retry requests failed")
                }
            }
        }
    }

    /// Records why the partition cannot move: the sink rejects `message` for good.
    async fn block(&self, message: &Message, err: &SinkError) {
        let reason = rejection(message, err);
        error!(partition = self.partition(), message_id = %message.id, error = %ErrorChain(err), "partition blocked: the sink rejects a message; nothing after it is sent until it passes or an operator removes it");
        self.set_blocked(Some(&reason)).await;
    }

    async fn unblock(&self) {
        info!(partition = self.partition(), "partition unblocked");
        self.set_blocked(None).await;
    }

    async fn set_blocked(&self, reason: Option<&str>) {
        if let Err(err) = self.store.set_blocked(&self.lease, reason).await {
            warn!(partition = self.partition(), error = %ErrorChain(&err), "failed to record the partition's blocked state");
        }
    }
}

/// Why `message` left the flow, as recorded for operators.
fn rejection(message: &Message, err: &SinkError) -> String {
    format!(
        "message {} (sequence {}) rejected: {}",
        message.id,
        message.sequence,
        error_chain(err)
    )
}
