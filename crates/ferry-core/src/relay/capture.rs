//! The relay in log capture mode (`capture.mode = "log"`): one relay streams the log at a
//! time, the others wait as standbys.
//!
//! A session, once [`LogCapture::start`] gave this relay the log:
//! 1. takes the leases of every partition (waiting for a previous owner's to run out) and
//!    keeps renewing them, so that every mark is fenced by an epoch as in poll mode, and a
//!    relay that lost them (paused past its lease) can mark nothing;
//! 2. drains the table by the poll path (reconciling first after an unclean takeover):
//!    rows committed before the log's confirmed position (before the slot existed, while
//!    relays polled, or published by a relay that crashed before confirming) are published
//!    from the table, so none is lost in a gap between the two paths;
//! 3. tells the stream it drained ([`LogStream::mark_drained`]); the transactions that
//!    ended before come flagged `maybe_published`, and only their ids the store still holds
//!    unpublished go out, so a re-sent transaction is not published twice;
//! 4. streams: the stream hands each transaction out in pieces of at most `batch_size`
//!    messages, and each piece's messages go to their partitions' feeds, in log order; one
//!    worker per partition publishes and marks them as in poll mode (partitions in
//!    parallel), and the stream's confirmed position is the end of the last transaction
//!    whose every piece, and all earlier transactions', are acked and marked.
//!
//! Order: enqueue serialises an aggregate's writers, so its commit order is its version
//! order; the log delivers transactions in commit order, and a partition's feed keeps it,
//! so no message overtakes an earlier one of its key. A full feed (a blocked partition, a
//! slow broker) stops the reading of the log, never grows without bound: as feeds are
//! bounded in messages and pieces in size, the relay's memory does not grow with the size
//! of a transaction.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::deadline::LeaseDeadline;
use super::feed::{FeedSender, Portion, feed};
use super::metrics::Instruments;
use super::retry::{Failed, Interrupted, Retry, wait};
use super::worker::{Source, Worker};
use super::{OnPermanentFailure, Relay, RelayError};
use crate::capture::{CapturedPiece, LogCapture, LogPosition, LogStream};
use crate::error::{ErrorChain, StoreError};
use crate::lease::Lease;
use crate::message::Message;
use crate::store::Wakers;

/// How often the confirmed position is sent while transactions complete.
const CONFIRM_EVERY: Duration = Duration::from_millis(500);
/// How often the stream's lag is read for the metrics.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Why a streaming session ended.
#[derive(Debug)]
enum Ended {
    /// Shutdown was asked for.
    Shutdown,
    /// A lease was lost, or the sink fenced a partition: another relay may be publishing.
    Fenced,
    /// The stream failed: a new one is started.
    StreamFailed(StoreError),
}

impl Relay {
    /// Streams the outbox from `capture` instead of polling it (`capture.mode = "log"`).
    pub fn with_log_capture(mut self, capture: Arc<dyn LogCapture>) -> Self {
        self.capture = Some(capture);
        self
    }

    /// Waits as a standby until the log is free, streams it while this relay holds it and
    /// every lease, and starts over when a session ends, until `shutdown`.
    pub(super) async fn run_log_capture(
        &self,
        capture: Arc<dyn LogCapture>,
        partitions: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        if self.config.on_permanent_failure == OnPermanentFailure::ParkAggregate {
            return Err(RelayError::Config(
                "capture.mode = \"log\" publishes a partition in log order and cannot hold back a parked aggregate: set relay.on_permanent_failure = \"block\", or use capture.mode = \"poll\"".into(),
            ));
        }
        let mut backoff = self.config.backoff();
        let mut standby = false;
        while !shutdown.is_cancelled() {
            let delay = match capture.start(self.piece_messages()).await {
                Ok(stream) => {
                    info!(relay = %self.config.relay_id, "log capture: streaming the log");
                    standby = false;
                    backoff.reset();
                    self.instruments.streaming(true);
                    let ended = self.stream_session(stream, partitions, shutdown).await;
                    self.instruments.streaming(false);
                    match ended {
                        Ended::Shutdown if shutdown.is_cancelled() => break,
                        Ended::Shutdown => {}
                        Ended::Fenced => {
                            warn!(
                                "log capture: lease lost or the sink fenced a partition; giving the log up"
                            )
                        }
                        Ended::StreamFailed(err) => {
                            warn!(error = %ErrorChain(&err), "log capture: the stream failed; starting another")
                        }
                    }
                    backoff.next_delay()
                }
                Err(StoreError::HeldElsewhere(why)) => {
                    if !standby {
                        info!(relay = %self.config.relay_id, %why, "log capture: standby, another relay streams the log");
                        standby = true;
                    }
                    // A standby is ready to take over while it reaches the lease store.
                    let reached = self
                        .leases
                        .heartbeat(&self.config.relay_id, self.config.lease_ttl)
                        .await;
                    if let Err(err) = &reached {
                        warn!(error = %ErrorChain(err), "log capture: standby cannot reach the lease store");
                    }
                    self.instruments.lease_round(reached.is_ok());
                    self.config.lease_ttl / 3
                }
                Err(err) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    warn!(error = %ErrorChain(&err), retry_in_ms = delay.as_millis() as u64, "log capture: cannot open the stream");
                    delay
                }
                Err(err) => return Err(err.into()),
            };
            if wait(delay, Some(shutdown), None).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// The most messages of a transaction the stream hands out at once: a batch, so that
    /// a piece's share of a partition is never more than one.
    fn piece_messages(&self) -> usize {
        self.config.batch_size.max(1)
    }

    /// One session on an open stream; gives the leases up (clean if everything published
    /// was marked) when it ends.
    async fn stream_session(
        &self,
        stream: Box<dyn LogStream>,
        partitions: u32,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Some((leases, deadline)) = self.acquire_all(partitions, shutdown).await else {
            return Ended::Shutdown;
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_leases(
            Arc::clone(&self.leases),
            Arc::clone(&self.instruments),
            self.config.relay_id.clone(),
            self.config.lease_ttl,
            leases.clone(),
            Arc::clone(&deadline),
            lost.clone(),
        ));
        let stop = CancellationToken::new();
        let stop_on_loss = {
            let (stop, lost, shutdown) = (stop.clone(), lost.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => {}
                    _ = shutdown.cancelled() => {}
                }
                stop.cancel();
            })
        };
        let session = Session {
            relay: self,
            partitions,
            deadline,
            stop,
            lost: lost.clone(),
        };
        let (ended, clean) = session.run(stream, &leases).await;
        stop_on_loss.abort();
        keeper.abort();
        for lease in &leases {
            self.sink.close_partition(lease.partition).await;
        }
        let ended = if lost.is_cancelled() || session.deadline_passed() {
            self.instruments.lease_lost();
            Ended::Fenced
        } else {
            for lease in &leases {
                if let Err(err) = self.leases.release(lease, clean).await {
                    warn!(partition = lease.partition, error = %ErrorChain(&err), "failed to release lease; it will expire");
                }
            }
            ended
        };
        self.instruments.owned(0);
        ended
    }

    /// Takes every partition's lease, waiting for other holders' to run out; `None` if
    /// shut down first.
    async fn acquire_all(
        &self,
        partitions: u32,
        shutdown: &CancellationToken,
    ) -> Option<(Vec<Lease>, Arc<LeaseDeadline>)> {
        let ttl = self.config.lease_ttl;
        let relay = &self.config.relay_id;
        let mut held: Vec<Lease> = Vec::new();
        let mut waiting_logged = false;
        loop {
            let valid_until = Instant::now() + ttl;
            let round = async {
                self.leases.heartbeat(relay, ttl).await?;
                if !held.is_empty() {
                    let renewed = self.leases.renew(&held, ttl).await?;
                    held.retain(|lease| renewed.contains(&lease.partition));
                }
                let wanted = partitions as usize - held.len();
                let granted = self.leases.acquire(relay, wanted, ttl).await?;
                Ok::<_, StoreError>(granted)
            };
            let round = round.await;
            self.instruments.lease_round(round.is_ok());
            match round {
                Ok(granted) => {
                    for lease in &granted {
                        info!(partition = lease.partition, epoch = lease.epoch, takeover = ?lease.takeover, "partition acquired");
                        self.instruments.lease_acquired();
                    }
                    held.extend(granted);
                    self.instruments.owned(held.len());
                    if held.len() == partitions as usize {
                        held.sort_by_key(|lease| lease.partition);
                        return Some((held, Arc::new(LeaseDeadline::new(valid_until))));
                    }
                    if !waiting_logged {
                        info!(
                            held = held.len(),
                            partitions,
                            "log capture: waiting for the other partitions' leases to run out (a relay in poll mode keeps them: every relay of the outbox must use capture.mode = \"log\")"
                        );
                        waiting_logged = true;
                    }
                }
                Err(err) => warn!(error = %ErrorChain(&err), "log capture: lease round failed"),
            }
            if wait(ttl / 3, Some(shutdown), None).await.is_err() {
                for lease in &held {
                    let _ = self.leases.release(lease, true).await;
                }
                return None;
            }
        }
    }
}

/// Renews every lease each third of the TTL, reporting each round to the readiness check;
/// the first round that does not renew them all expires the deadline and fires `lost`.
async fn keep_leases(
    leases: Arc<dyn crate::lease::LeaseStore>,
    instruments: Arc<Instruments>,
    relay: String,
    ttl: Duration,
    held: Vec<Lease>,
    deadline: Arc<LeaseDeadline>,
    lost: CancellationToken,
) {
    loop {
        sleep(ttl / 3).await;
        let valid_until = Instant::now() + ttl;
        if let Err(err) = leases.heartbeat(&relay, ttl).await {
            instruments.lease_round(false);
            warn!(error = %ErrorChain(&err), "lease heartbeat failed; streaming stops when the leases run out");
            continue;
        }
        let renewed = leases.renew(&held, ttl).await;
        instruments.lease_round(renewed.is_ok());
        match renewed {
            Ok(renewed) if renewed.len() == held.len() => deadline.extend_to(valid_until),
            Ok(_) => {
                warn!(
                    "log capture: lease lost (a partition's was not renewed); stopping the stream"
                );
                deadline.expire();
                lost.cancel();
                return;
            }
            Err(err) => warn!(error = %ErrorChain(&err), "lease renewal failed"),
        }
    }
}

/// A streaming session's state.
struct Session<'r> {
    relay: &'r Relay,
    partitions: u32,
    /// When the leases (all renewed together) run out locally.
    deadline: Arc<LeaseDeadline>,
    /// Fires on shutdown or a lost lease.
    stop: CancellationToken,
    /// Fires when a lease was not renewed, or a worker found its lease gone or its
    /// partition fenced by the sink: the session must end, whatever renews after.
    lost: CancellationToken,
}

impl Session<'_> {
    /// Which of `ids` the store still holds unpublished, retrying outages while the leases
    /// last.
    async fn unpublished(&self, partition: u32, ids: &[Uuid]) -> Result<Vec<Uuid>, Interrupted> {
        let store = &self.relay.store;
        Retry::new(
            "log capture: reading which captured messages are unpublished failed",
            self.relay.config.backoff(),
        )
        .in_partition(partition)
        .while_held(&self.deadline)
        .until(&self.stop)
        .run(|| async move {
            store
                .unpublished(partition, ids)
                .await
                .map_err(Failed::Retry)
        })
        .await
    }

    /// Ends the session as fenced: touch nothing more.
    fn fenced(&self) {
        self.deadline.expire();
        self.lost.cancel();
        self.stop.cancel();
    }

    fn deadline_passed(&self) -> bool {
        !self.deadline.is_valid()
    }

    fn worker(&self, lease: &Lease, source: Source) -> Worker {
        let relay = self.relay;
        Worker {
            lease: lease.clone(),
            partitions: self.partitions,
            store: Arc::clone(&relay.store),
            leases: Arc::clone(&relay.leases),
            sink: Arc::clone(&relay.sink),
            config: Arc::clone(&relay.config),
            instruments: Arc::clone(&relay.instruments),
            wakers: Arc::new(Wakers::new(self.partitions)),
            deadline: Arc::clone(&self.deadline),
            stop: self.stop.clone(),
            source,
        }
    }

    /// Drains, then streams until stopped or the stream fails; says why, and whether
    /// everything published was marked.
    async fn run(&self, mut stream: Box<dyn LogStream>, leases: &[Lease]) -> (Ended, bool) {
        match self.drain(leases).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return (self.why_stopped(None), false),
        }
        if let Err(err) = stream.mark_drained().await {
            return (Ended::StreamFailed(err), true);
        }
        info!("log capture: the table is drained; streaming");
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut feeds = Vec::with_capacity(leases.len());
        let mut workers = Vec::with_capacity(leases.len());
        // A batch waits in each feed while the worker publishes the one before: the relay
        // holds a few batches per partition, whatever the size of a transaction.
        let feed_capacity = self.relay.piece_messages();
        for lease in leases {
            let (sender, receiver) = feed(feed_capacity, done_tx.clone());
            feeds.push(sender);
            let worker = self.worker(lease, Source::Captured(tokio::sync::Mutex::new(receiver)));
            let (lost, stop) = (self.lost.clone(), self.stop.clone());
            workers.push(tokio::spawn(async move {
                let outcome = worker.relay_partition().await;
                if matches!(
                    outcome,
                    Err(Interrupted::SinkFenced | Interrupted::LeaseLost)
                ) {
                    lost.cancel();
                }
                // A worker ends only with the session (stopped, fenced, its feed closed) or
                // by a panic, which the dispatcher would not notice while the stream is
                // idle: either way its end ends the session.
                stop.cancel();
                outcome
            }));
        }
        drop(done_tx);
        let mut dispatcher = Dispatcher {
            session: self,
            stream,
            feeds,
            done: done_rx,
            pending: Confirmations::default(),
            last_confirm: Instant::now(),
            last_lag: Instant::now() - LAG_EVERY,
        };
        let failure = dispatcher.run().await;
        let Dispatcher {
            mut stream,
            feeds,
            mut done,
            mut pending,
            ..
        } = dispatcher;
        drop(feeds);
        self.stop.cancel();
        let clean = self.join(workers).await;
        if failure.is_none() {
            while let Ok(ordinal) = done.try_recv() {
                pending.complete(ordinal);
            }
            if let Some(end) = pending.take_confirmable()
                && let Err(err) = stream.confirm(&end).await
            {
                warn!(error = %ErrorChain(&err), "log capture: the last confirmation failed; the log re-sends from the previous one");
            }
        }
        (self.why_stopped(failure), clean)
    }

    fn why_stopped(&self, failure: Option<StoreError>) -> Ended {
        match failure {
            Some(err) => Ended::StreamFailed(err),
            None if self.lost.is_cancelled() || self.deadline_passed() => Ended::Fenced,
            None => Ended::Shutdown,
        }
    }

    /// Publishes what the table holds, every partition at once; `Ok(false)` if stopped.
    async fn drain(&self, leases: &[Lease]) -> Result<bool, Interrupted> {
        let drains: Vec<_> = leases
            .iter()
            .map(|lease| {
                let worker = self.worker(lease, Source::Table { until_empty: true });
                tokio::spawn(async move { worker.relay_partition().await })
            })
            .collect();
        let mut drained = true;
        for drain in drains {
            match drain.await {
                Ok(Ok(clean)) => drained &= clean && !self.stop.is_cancelled(),
                Ok(Err(Interrupted::SinkFenced | Interrupted::LeaseLost)) | Err(_) => {
                    self.fenced();
                    drained = false;
                }
                Ok(Err(Interrupted::Stopped | Interrupted::Panicked)) => drained = false,
            }
        }
        Ok(drained)
    }

    /// Waits for the workers' batches in flight (up to the shutdown timeout); whether
    /// every one left nothing unmarked.
    async fn join(&self, workers: Vec<JoinHandle<Result<bool, Interrupted>>>) -> bool {
        let give_up_at = Instant::now() + self.relay.config.shutdown_timeout;
        let mut clean = true;
        for mut worker in workers {
            match timeout_at(give_up_at, &mut worker).await {
                Ok(Ok(Ok(worker_clean))) => clean &= worker_clean,
                Ok(Ok(Err(Interrupted::SinkFenced | Interrupted::LeaseLost))) => {
                    self.fenced();
                    clean = false;
                }
                Ok(_) => clean = false,
                Err(_) => {
                    warn!("abandoning an in-flight batch unmarked at shutdown");
                    worker.abort();
                    clean = false;
                }
            }
        }
        clean
    }
}

/// Reads the stream and feeds the partitions' workers, confirming as they complete.
struct Dispatcher<'s, 'r> {
    session: &'s Session<'r>,
    stream: Box<dyn LogStream>,
    feeds: Vec<FeedSender>,
    done: mpsc::UnboundedReceiver<u64>,
    pending: Confirmations,
    last_confirm: Instant,
    last_lag: Instant,
}

impl Dispatcher<'_, '_> {
    /// Until stopped (`None`) or the stream fails.
    async fn run(&mut self) -> Option<StoreError> {
        let idle = self.session.relay.config.poll_interval;
        while !self.session.stop.is_cancelled() {
            let next = match self.stream.next(idle).await {
                Ok(next) => next,
                Err(err) => return Some(err),
            };
            if let Some(piece) = next {
                let pieces = match self.with_replayed_behind(piece).await {
                    Ok(pieces) => pieces,
                    Err(err) => return Some(err),
                };
                if let Err(ended) = self.dispatch(pieces).await {
                    return ended;
                }
            }
            while let Ok(ordinal) = self.done.try_recv() {
                self.pending.complete(ordinal);
            }
            if let Err(err) = self.confirm_and_measure().await {
                return Some(err);
            }
        }
        None
    }

    /// Sends the confirmable position every [`CONFIRM_EVERY`], and reads the lag every
    /// [`LAG_EVERY`].
    async fn confirm_and_measure(&mut self) -> Result<(), StoreError> {
        if self.last_confirm.elapsed() >= CONFIRM_EVERY {
            if let Some(end) = self.pending.take_confirmable() {
                self.stream.confirm(&end).await?;
            }
            self.last_confirm = Instant::now();
        }
        if self.last_lag.elapsed() >= LAG_EVERY {
            self.last_lag = Instant::now();
            match self.stream.lag().await {
                Ok(lag) => self.session.relay.instruments.capture_lag(&lag),
                Err(err) => warn!(error = %ErrorChain(&err), "log capture: reading the lag failed"),
            }
        }
        Ok(())
    }

    /// `first` and, if its transaction ended before the drain, the pieces the stream has
    /// ready behind it, up to a piece of a later transaction or a batch's worth: a relay
    /// restarted under a load of small transactions re-reads thousands that ended before
    /// its drain, and checking them one query per transaction (not per batch) is slower
    /// than they were committed, so it would never catch up with the log.
    async fn with_replayed_behind(
        &mut self,
        first: CapturedPiece,
    ) -> Result<Vec<CapturedPiece>, StoreError> {
        let limit = self.session.relay.piece_messages();
        let mut messages = first.messages.len();
        let mut pieces = vec![first];
        while pieces.last().is_some_and(|piece| piece.maybe_published)
            && messages < limit
            && pieces.len() < limit
        {
            let Some(piece) = self.stream.next(Duration::ZERO).await? else {
                break;
            };
            messages += piece.messages.len();
            pieces.push(piece);
        }
        Ok(pieces)
    }

    /// Hands the pieces' messages (those still unpublished, of transactions that may have
    /// been published) to their partitions' feeds, in order, waiting while a feed is full
    /// (and confirming meanwhile what completes). `Err(None)` if stopped, `Err(Some)` if
    /// the stream failed.
    async fn dispatch(&mut self, pieces: Vec<CapturedPiece>) -> Result<(), Option<StoreError>> {
        let mut shares: Vec<Shares> = pieces
            .into_iter()
            .map(|piece| Shares {
                by_partition: self.by_partition(piece.messages),
                end: piece.end,
                maybe_published: piece.maybe_published,
            })
            .collect();
        keep_unpublished(self.session, &mut shares).await?;
        for Shares {
            by_partition, end, ..
        } in shares
        {
            self.send(by_partition, end).await?;
        }
        Ok(())
    }

    /// A piece's messages by partition, in order; those of a partition out of range stay in
    /// the outbox.
    fn by_partition(&self, messages: Vec<Message>) -> Vec<(u32, Vec<Message>)> {
        let mut by_partition = group_by_partition(
            messages
                .into_iter()
                .map(|message| (message.partition, message)),
        );
        by_partition.retain(|(partition, _)| {
            let known = (*partition as usize) < self.feeds.len();
            if !known {
                warn!(partition, "log capture: captured messages name a partition out of range; they stay in the outbox, shown by `ferry status`");
            }
            known
        });
        by_partition
    }

    /// Sends one piece's shares to their feeds.
    async fn send(
        &mut self,
        by_partition: Vec<(u32, Vec<Message>)>,
        end: Option<LogPosition>,
    ) -> Result<(), Option<StoreError>> {
        let ordinal = self.pending.add_piece(by_partition.len(), end);
        for (partition, messages) in by_partition {
            let feed = self.feeds[partition as usize].clone();
            let portion = Portion { ordinal, messages };
            loop {
                tokio::select! {
                    room = feed.reserve(portion.messages.len()) => {
                        room.and_then(|room| room.send(portion)).map_err(|_closed| None)?;
                        break;
                    }
                    Some(ordinal) = self.done.recv() => {
                        self.pending.complete(ordinal);
                        self.confirm_and_measure().await.map_err(Some)?;
                    }
                    _ = sleep(CONFIRM_EVERY) => self.confirm_and_measure().await.map_err(Some)?,
                    _ = self.session.stop.cancelled() => return Err(None),
                }
            }
        }
        Ok(())
    }
}

/// Keeps, of the pieces whose transaction may have been published, only the messages
/// the store still holds unpublished: one check per partition for all of them.
/// `Err(None)` if stopped.
async fn keep_unpublished(
    session: &Session<'_>,
    shares: &mut [Shares],
) -> Result<(), Option<StoreError>> {
    let ids_by_partition = group_by_partition(
        shares
            .iter()
            .filter(|shares| shares.maybe_published)
            .flat_map(|shares| &shares.by_partition)
            .flat_map(|(partition, share)| share.iter().map(|message| (*partition, message.id))),
    );
    let mut unpublished: HashSet<Uuid> = HashSet::new();
    for (partition, ids) in ids_by_partition {
        match session.unpublished(partition, &ids).await {
            Ok(still) => unpublished.extend(still),
            Err(_stopped) => return Err(None),
        }
    }
    for shares in shares.iter_mut().filter(|shares| shares.maybe_published) {
        for (_, share) in &mut shares.by_partition {
            share.retain(|message| unpublished.contains(&message.id));
        }
        shares.by_partition.retain(|(_, share)| !share.is_empty());
    }
    Ok(())
}

/// `items` grouped by their partition, each group and the groups in first-seen order (a
/// relay's partitions are few, so a list beats a map here).
fn group_by_partition<T>(items: impl IntoIterator<Item = (u32, T)>) -> Vec<(u32, Vec<T>)> {
    let mut groups: Vec<(u32, Vec<T>)> = Vec::new();
    for (partition, item) in items {
        match groups.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, group)) => group.push(item),
            None => groups.push((partition, vec![item])),
        }
    }
    groups
}

/// A piece's messages by partition, its transaction's end on its last piece.
struct Shares {
    by_partition: Vec<(u32, Vec<Message>)>,
    end: Option<LogPosition>,
    maybe_published: bool,
}

/// The transactions dispatched and not yet confirmed, in stream order.
#[derive(Debug, Default)]
struct Confirmations {
    /// The ordinal of the front transaction.
    front: u64,
    waiting: VecDeque<Unconfirmed>,
    /// The end of the last transaction that completed with every earlier one.
    confirmable: Option<LogPosition>,
}

/// A dispatched transaction not yet confirmed.
#[derive(Debug)]
struct Unconfirmed {
    /// Its end, once its last piece came.
    end: Option<LogPosition>,
    /// Its pieces' portions (one per partition a piece has messages for) not yet acked
    /// and marked.
    portions_left: usize,
}

impl Confirmations {
    /// Adds a piece of `portions` portions to the transaction still arriving (a new one if
    /// the last ended); `end` on its last piece. Returns the transaction's ordinal.
    fn add_piece(&mut self, portions: usize, end: Option<LogPosition>) -> u64 {
        if self.waiting.back().is_none_or(|last| last.end.is_some()) {
            self.waiting.push_back(Unconfirmed {
                end: None,
                portions_left: 0,
            });
        }
        let ordinal = self.front + self.waiting.len() as u64 - 1;
        let arriving = self.waiting.back_mut().expect("pushed if absent");
        arriving.portions_left += portions;
        arriving.end = end;
        self.settle_front();
        ordinal
    }

    /// One portion of transaction `ordinal` is acked and marked.
    fn complete(&mut self, ordinal: u64) {
        if let Some(index) = ordinal.checked_sub(self.front)
            && let Some(transaction) = self.waiting.get_mut(index as usize)
        {
            transaction.portions_left = transaction.portions_left.saturating_sub(1);
        }
        self.settle_front();
    }

    /// Moves past the front transactions that ended and completed.
    fn settle_front(&mut self) {
        while let Some(Unconfirmed {
            end: Some(_),
            portions_left: 0,
        }) = self.waiting.front()
        {
            let done = self.waiting.pop_front().expect("front exists");
            self.front += 1;
            self.confirmable = done.end;
        }
    }

    /// The position to confirm, once.
    fn take_confirmable(&mut self) -> Option<LogPosition> {
        self.confirmable.take()
    }
}

#[cfg(test)]
mod confirmations_tests {
    use super::*;

    fn at(n: u32) -> LogPosition {
        LogPosition(format!("0/{n}"))
    }

    #[test]
    fn confirms_only_past_transactions_whose_predecessors_completed() {
        let mut pending = Confirmations::default();
        let first = pending.add_piece(2, Some(at(1)));
        let second = pending.add_piece(1, Some(at(2)));
        pending.complete(second);
        assert_eq!(
            pending.take_confirmable(),
            None,
            "the first is still in flight"
        );
        pending.complete(first);
        assert_eq!(
            pending.take_confirmable(),
            None,
            "one portion of the first is left"
        );
        pending.complete(first);
        assert_eq!(pending.take_confirmable(), Some(at(2)));
        pending.add_piece(0, Some(at(3)));
        assert_eq!(
            pending.take_confirmable(),
            Some(at(3)),
            "a heartbeat confirms at once"
        );
    }

    #[test]
    fn a_transaction_in_pieces_is_confirmed_once_its_last_piece_and_every_portion_completed() {
        let mut pending = Confirmations::default();
        let before = pending.add_piece(1, Some(at(1)));
        let large = pending.add_piece(2, None);
        assert_eq!(pending.add_piece(1, None), large, "one transaction");
        pending.complete(large);
        pending.complete(large);
        pending.complete(large);
        assert_eq!(
            pending.take_confirmable(),
            None,
            "every portion so far is done, but more pieces may come; and the one before is not"
        );
        pending.complete(before);
        assert_eq!(pending.take_confirmable(), Some(at(1)));
        assert_eq!(
            pending.add_piece(0, None),
            large,
            "a piece whose messages were all published before"
        );
        assert_eq!(pending.add_piece(2, Some(at(2))), large, "its last piece");
        let after = pending.add_piece(1, Some(at(3)));
        assert_ne!(after, large, "a new transaction after the end");
        pending.complete(after);
        pending.complete(large);
        assert_eq!(
            pending.take_confirmable(),
            None,
            "a portion of the last piece is left"
        );
        pending.complete(large);
        assert_eq!(
            pending.take_confirmable(),
            Some(at(3)),
            "the large transaction and the one after it"
        );
        pending.complete(large);
        assert_eq!(
            pending.take_confirmable(),
            None,
            "a stray completion moves nothing"
        );
    }
}
