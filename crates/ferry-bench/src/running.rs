//! A run in progress: its producer, relay and consumer tasks, the waits on their
//! counters, and the progress line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry::{RelayError, RelayStats};

use crate::consume::{Consumed, ConsumerReport};
use crate::produce::Production;

/// A run that makes no progress for this long is stopped, and what is missing reported.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the bench looks at its counters while waiting.
const TICK: Duration = Duration::from_millis(20);

pub(crate) type RelayTask = JoinHandle<Result<(), RelayError>>;

/// How the wait for the last message ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// When the producers' counter reached the total (to within [`TICK`]).
    pub(crate) produced_all: Option<Instant>,
    /// When the relays' published counters reached the total (to within [`TICK`]).
    pub(crate) published_all: Option<Instant>,
    /// When the relays' marked counters reached the total, i.e. the outbox was empty (to
    /// within [`TICK`]).
    pub(crate) marked_all: Option<Instant>,
    /// When the consumer received the last message; `None` if the run stalled or the wait
    /// was only for the drain.
    pub(crate) consumed_all: Option<Instant>,
}

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// The consumer has received every message.
    Consumed,
    /// The relays have marked every message: the outbox is empty (no consumer running).
    Drained,
}

/// The tasks and counters of a run.
pub(crate) struct Running {
    pub(crate) production: Arc<Production>,
    pub(crate) stats: Vec<Arc<RelayStats>>,
    pub(crate) consumed: Arc<Consumed>,
    pub(crate) producers: Vec<JoinHandle<anyhow::Result<()>>>,
    pub(crate) consumer: Option<JoinHandle<anyhow::Result<ConsumerReport>>>,
}

impl Running {
    fn published(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.published.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn marked(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.marked.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn start_producers(&mut self, stop: &CancellationToken) {
        let started = tokio::time::Instant::now();
        for index in 0..self.production.plan.producers {
            let production = Arc::clone(&self.production);
            self.producers.push(tokio::spawn(production.run_producer(
                index,
                started,
                stop.clone(),
            )));
        }
    }

    pub(crate) fn progress(&self) -> Progress {
        Progress {
            production: Arc::clone(&self.production),
            stats: self.stats.clone(),
            consumed: Arc::clone(&self.consumed),
        }
    }

    /// Waits until the relays own every partition, so that live latencies do not include
    /// the relays' start-up.
    pub(crate) async fn wait_for_leases(
        &mut self,
        partitions: u32,
        relays: &mut [RelayTask],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            let owned: u64 = self
                .stats
                .iter()
                .map(|s| s.owned_partitions.load(Ordering::Relaxed))
                .sum();
            if owned >= u64::from(partitions) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the relays took {owned} of {partitions} partitions in {} s",
                    STALL_TIMEOUT.as_secs()
                );
            }
            self.check_tasks(relays).await?;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Waits until `until` is reached for `total` messages, or nothing moved for
    /// [`STALL_TIMEOUT`]; fails if a task fails meanwhile.
    pub(crate) async fn wait(
        &mut self,
        total: u64,
        until: Until,
        relays: &mut [RelayTask],
    ) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome {
            produced_all: None,
            published_all: None,
            marked_all: None,
            consumed_all: None,
        };
        let mut last_change = Instant::now();
        let mut last_seen = (0, 0, 0, 0);
        loop {
            let produced = self.production.produced.load(Ordering::Relaxed);
            let published = self.published();
            let marked = self.marked();
            let consumed = self.consumed.distinct();
            if outcome.produced_all.is_none() && produced >= total {
                outcome.produced_all = Some(Instant::now());
            }
            if outcome.published_all.is_none() && published >= total {
                outcome.published_all = Some(Instant::now());
            }
            if outcome.marked_all.is_none() && marked >= total {
                outcome.marked_all = Some(Instant::now());
                if until == Until::Drained {
                    return Ok(outcome);
                }
            }
            if consumed >= total {
                outcome.consumed_all = Some(self.consumed.last_at());
                return Ok(outcome);
            }
            let seen = (produced, published, marked, consumed);
            if seen != last_seen {
                last_seen = seen;
                last_change = Instant::now();
            } else if last_change.elapsed() > STALL_TIMEOUT {
                eprintln!(
                    "bench: nothing moved for {} s ({marked} of {total} marked, {consumed} \
                     consumed); stopping",
                    STALL_TIMEOUT.as_secs()
                );
                return Ok(outcome);
            }
            self.check_tasks(relays).await?;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Fails with the error of a producer, relay or consumer task that ended early.
    async fn check_tasks(&mut self, relays: &mut [RelayTask]) -> anyhow::Result<()> {
        if let Some(at) = self.producers.iter().position(JoinHandle::is_finished) {
            let producer = self.producers.swap_remove(at);
            producer.await.context("a producer task panicked")??;
        }
        for (index, relay) in relays.iter_mut().enumerate() {
            if relay.is_finished() {
                let result = relay.await.context("a relay task panicked")?;
                result.with_context(|| format!("relay {index} failed"))?;
                bail!("relay {index} stopped before the run ended");
            }
        }
        if let Some(consumer) = self.consumer.as_mut().filter(|c| c.is_finished()) {
            consumer.await.context("the consumer task panicked")??;
            bail!("the consumer stopped before the run ended");
        }
        Ok(())
    }

    /// Stops the relays (gracefully: in-flight batches are marked, leases released), then
    /// lets the consumer read to the end of what they wrote.
    pub(crate) async fn finish(
        &mut self,
        relay_stop: &CancellationToken,
        relays: &mut Vec<RelayTask>,
        finish: &CancellationToken,
    ) -> anyhow::Result<(Vec<anyhow::Result<()>>, ConsumerReport)> {
        relay_stop.cancel();
        let mut results = Vec::new();
        for relay in relays.drain(..) {
            results.push(match relay.await {
                Ok(result) => result.map_err(anyhow::Error::from),
                Err(err) => Err(anyhow!("the relay task panicked: {err}")),
            });
        }
        finish.cancel();
        let consumer = self
            .consumer
            .take()
            .ok_or_else(|| anyhow!("the consumer was not started"))?;
        let report = consumer.await.context("the consumer task panicked")??;
        Ok((results, report))
    }
}

/// The once-a-second progress line on stderr.
pub(crate) struct Progress {
    production: Arc<Production>,
    stats: Vec<Arc<RelayStats>>,
    consumed: Arc<Consumed>,
}

impl Progress {
    pub(crate) async fn report(self, stop: CancellationToken) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut before = (0, 0, 0);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = (
                self.production.produced.load(Ordering::Relaxed),
                self.stats
                    .iter()
                    .map(|s| s.published.load(Ordering::Relaxed))
                    .sum::<u64>(),
                self.consumed.distinct(),
            );
            eprintln!(
                "bench {:>4}s: produced {} (+{}/s), published {} (+{}/s), consumed {} (+{}/s)",
                started.elapsed().as_secs(),
                now.0,
                now.0 - before.0,
                now.1,
                now.1.saturating_sub(before.1),
                now.2,
                now.2 - before.2,
            );
            before = now;
        }
    }
}
