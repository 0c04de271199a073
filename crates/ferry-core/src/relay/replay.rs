//! Replay: publishes again messages the store kept after publishing them (retention), for
//! disaster recovery (a broker lost a topic, a consumer's database came back from a backup,
//! a new service needs history).
//!
//! Messages go out unchanged (id, version, sequence, CloudEvents attributes), so a
//! consumer's inbox drops what it already applied and applies what it lost. They carry
//! [`REPLAY_HEADER`], which suffixes their broker dedup id ([`Message::dedup_id`]): a broker
//! that still holds the first delivery in its dedup window (JetStream) would otherwise drop
//! the replay as a duplicate.
//!
//! Order: pages are read in sequence order, and a page's messages of one partition are
//! published in that order, one page after the other finished. A key's messages are all in
//! one partition, in sequence order, which is version order (enqueue serialises an
//! aggregate's writers), so every key is replayed in version order. Partitions of a page go
//! out concurrently, as the relay's do.
//!
//! Progress is a checkpoint: the last sequence up to which every selected message was
//! acknowledged. A replay stopped (Ctrl-C, an error) resumes after it; the page in flight
//! when it stopped is sent again, which the dedup id makes harmless where the broker
//! dedups, and the inbox everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::retry::wait;
use crate::admin::{OutboxAdmin, RetainedFilter, RetainedSummary};
use crate::backoff::Backoff;
use crate::error::{ErrorChain, StoreError};
use crate::lease::{Lease, Takeover};
use crate::message::{Message, REPLAY_HEADER};
use crate::sink::{Sink, SinkError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What to replay, and how fast.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Names the replay: in the dedup ids of its messages, in the sink's producer ids
    /// (Kafka), and in its progress. 1-64 ASCII letters, digits, `-` or `_`.
    pub name: String,
    pub filter: RetainedFilter,
    /// Messages read per page. Defaults to 1000.
    pub page_size: u32,
    /// Highest rate in messages per second; unlimited when `None`.
    pub rate: Option<NonZeroU32>,
    /// First retry delay after a store or sink error, doubled up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl ReplayOptions {
    pub fn new(name: impl Into<String>, filter: RetainedFilter) -> Self {
        Self {
            name: name.into(),
            filter,
            page_size: 1000,
            rate: None,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }

    /// Pages no larger than a tenth of a second's worth at the rate limit, so that the
    /// rate holds over short spans too.
    fn effective_page_size(&self) -> u32 {
        let page = self.page_size.max(1);
        match self.rate {
            Some(rate) => page.min((rate.get() / 10).max(1)),
            None => page,
        }
    }
}

/// How far a replay got: every selected message with a sequence up to `last_sequence` was
/// acknowledged by the sink; `sent` messages in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayCheckpoint {
    pub last_sequence: i64,
    pub sent: u64,
}

/// Live figures of a running replay, readable from another task (a progress bar, a page).
#[derive(Debug)]
pub struct ReplayProgress {
    sent: AtomicU64,
    last_sequence: AtomicI64,
}

impl Default for ReplayProgress {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            last_sequence: AtomicI64::new(i64::MIN),
        }
    }
}

impl ReplayProgress {
    /// Messages acknowledged so far, resumed runs included.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The checkpoint's sequence, if any page was finished.
    pub fn last_sequence(&self) -> Option<i64> {
        Some(self.last_sequence.load(Ordering::Relaxed)).filter(|s| *s != i64::MIN)
    }

    fn record(&self, checkpoint: ReplayCheckpoint) {
        self.sent.store(checkpoint.sent, Ordering::Relaxed);
        self.last_sequence
            .store(checkpoint.last_sequence, Ordering::Relaxed);
    }
}

/// How a replay ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayEnd {
    /// Every selected message was acknowledged.
    Finished { sent: u64 },
    /// Stopped on request; resume from the checkpoint, if there is one.
    Stopped {
        checkpoint: Option<ReplayCheckpoint>,
    },
}

/// Why a replay could not go on. Every variant leaves the last recorded checkpoint valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error(
        "invalid replay name {0:?}: use 1-64 ASCII letters, digits, '-' or '_' (e.g. \"restore-2026-12-04\")"
    )]
    InvalidName(String),
    #[error("reading the messages to replay")]
    Store(#[from] StoreError),
    #[error(
        "the sink rejected message {id} (partition {partition}, sequence {sequence}) for good; \
         fix the cause and resume, or narrow the selection to leave it out"
    )]
    Rejected {
        id: Uuid,
        partition: u32,
        sequence: i64,
        #[source]
        source: SinkError,
    },
    #[error(
        "the sink fenced the replay on partition {partition}: another replay with this name publishes there"
    )]
    Fenced {
        partition: u32,
        #[source]
        source: SinkError,
    },
    #[error("the sink refused to open partition {partition} for the replay")]
    Open {
        partition: u32,
        #[source]
        source: SinkError,
    },
    #[error("recording the replay's progress")]
    Progress(#[source] BoxError),
}

/// One replay: reads retained messages from `admin` and publishes them to `sink`.
pub struct Replay {
    admin: Arc<dyn OutboxAdmin>,
    sink: Arc<dyn Sink>,
    options: ReplayOptions,
    progress: Arc<ReplayProgress>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("options", &self.options)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl Replay {
    pub fn new(
        admin: Arc<dyn OutboxAdmin>,
        sink: Arc<dyn Sink>,
        options: ReplayOptions,
    ) -> Result<Self, ReplayError> {
        let name = &options.name;
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(ReplayError::InvalidName(name.clone()));
        }
        Ok(Self {
            admin,
            sink,
            options,
            progress: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn progress(&self) -> Arc<ReplayProgress> {
        Arc::clone(&self.progress)
    }

    /// How many messages the replay selects, and their range (for `--dry-run`, and the
    /// total of a progress bar).
    pub async fn summary(&self) -> Result<RetainedSummary, StoreError> {
        self.admin.retained_summary(&self.options.filter).await
    }

    /// Replays from `resume` (or the start), calling `record` with each new checkpoint
    /// (after every page), until every selected message is acknowledged, `stop` fires, or
    /// an error leaves it no way on. Errors of the store and retryable errors of the sink
    /// are retried with backoff. Partitions opened in the sink are closed at the end; the
    /// caller shuts the sink down.
    pub async fn run(
        &self,
        resume: Option<ReplayCheckpoint>,
        record: &mut (dyn FnMut(ReplayCheckpoint) -> Result<(), BoxError> + Send),
        stop: &CancellationToken,
    ) -> Result<ReplayEnd, ReplayError> {
        let mut opened = BTreeSet::new();
        let result = self.pages(resume, record, &mut opened, stop).await;
        for partition in opened {
            self.sink.close_partition(partition).await;
        }
        result
    }

    async fn pages(
        &self,
        resume: Option<ReplayCheckpoint>,
        record: &mut (dyn FnMut(ReplayCheckpoint) -> Result<(), BoxError> + Send),
        opened: &mut BTreeSet<u32>,
        stop: &CancellationToken,
    ) -> Result<ReplayEnd, ReplayError> {
        let mut checkpoint = resume;
        if let Some(checkpoint) = checkpoint {
            self.progress.record(checkpoint);
        }
        let page_size = self.options.effective_page_size();
        let pace = Pace::new(self.options.rate);
        let mut sent_this_run = 0u64;
        loop {
            if stop.is_cancelled() {
                return Ok(ReplayEnd::Stopped { checkpoint });
            }
            let after = checkpoint.map(|c| c.last_sequence);
            let page = match self.read_page(after, page_size, stop).await? {
                Some(page) => page,
                None => return Ok(ReplayEnd::Stopped { checkpoint }),
            };
            let Some(last) = page.last() else {
                let sent = checkpoint.map_or(0, |c| c.sent);
                info!(name = %self.options.name, sent, "replay finished");
                return Ok(ReplayEnd::Finished { sent });
            };
            let last_sequence = last.sequence;
            let count = page.len() as u64;
            if !self.publish_page(page, opened, stop).await? {
                return Ok(ReplayEnd::Stopped { checkpoint });
            }
            let next = ReplayCheckpoint {
                last_sequence,
                sent: checkpoint.map_or(0, |c| c.sent) + count,
            };
            record(next).map_err(ReplayError::Progress)?;
            self.progress.record(next);
            checkpoint = Some(next);
            sent_this_run += count;
            if !pace.wait(sent_this_run, stop).await {
                return Ok(ReplayEnd::Stopped { checkpoint });
            }
        }
    }

    /// The next page, marked as replayed; `None` if stopped while retrying.
    async fn read_page(
        &self,
        after: Option<i64>,
        page_size: u32,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<Message>>, ReplayError> {
        let mut backoff = self.backoff();
        let mut page = loop {
            match self
                .admin
                .retained(&self.options.filter, after, page_size)
                .await
            {
                Ok(page) => break page,
                Err(err) if err.is_retryable() => {
                    if !pause(&mut backoff, "reading messages failed", None, &err, stop).await {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(err.into()),
            }
        };
        for message in &mut page {
            message
                .headers
                .insert(REPLAY_HEADER.into(), self.options.name.clone());
        }
        Ok(Some(page))
    }

    /// Publishes a page, each partition's messages in order, the partitions concurrently;
    /// false if stopped before every message was acknowledged.
    async fn publish_page(
        &self,
        page: Vec<Message>,
        opened: &mut BTreeSet<u32>,
        stop: &CancellationToken,
    ) -> Result<bool, ReplayError> {
        let mut by_partition: BTreeMap<u32, Vec<Message>> = BTreeMap::new();
        for message in page {
            by_partition
                .entry(message.partition)
                .or_default()
                .push(message);
        }
        for &partition in by_partition.keys() {
            if !opened.contains(&partition) {
                if !self.open(partition, stop).await? {
                    return Ok(false);
                }
                opened.insert(partition);
            }
        }
        let outcomes = join_all(
            by_partition
                .iter()
                .map(|(partition, messages)| self.publish_in_order(*partition, messages, stop)),
        )
        .await;
        let mut all_sent = true;
        for outcome in outcomes {
            all_sent &= outcome?;
        }
        Ok(all_sent)
    }

    /// Opens `partition` in the sink as this replay's (Kafka: its own transactional id,
    /// which fences an earlier run of the same replay, never the live relay).
    async fn open(&self, partition: u32, stop: &CancellationToken) -> Result<bool, ReplayError> {
        let lease = Lease {
            partition,
            epoch: 0,
            owner: format!("replay-{}", self.options.name),
            takeover: Takeover::Clean,
        };
        let mut backoff = self.backoff();
        loop {
            match self.sink.open_partition(&lease).await {
                Ok(()) => return Ok(true),
                Err(err) if err.is_retryable() => {
                    let what = "opening the partition in the sink failed";
                    if !pause(&mut backoff, what, Some(partition), &err, stop).await {
                        return Ok(false);
                    }
                }
                Err(source) if source.is_fenced() => {
                    return Err(ReplayError::Fenced { partition, source });
                }
                Err(source) => return Err(ReplayError::Open { partition, source }),
            }
        }
    }

    /// Publishes `messages` until each is acknowledged, resending from the first that was
    /// not after a retryable failure; false if stopped first.
    async fn publish_in_order(
        &self,
        partition: u32,
        messages: &[Message],
        stop: &CancellationToken,
    ) -> Result<bool, ReplayError> {
        let mut rest = messages;
        let mut backoff = self.backoff();
        while !rest.is_empty() {
            let outcomes = self.sink.publish(rest).await;
            let acked = outcomes.iter().take_while(|o| o.is_ok()).count();
            let failure = outcomes.into_iter().nth(acked);
            let Some(failed_at) = rest.get(acked) else {
                return Ok(true);
            };
            rest = &rest[acked..];
            let err = match failure {
                Some(Err(err)) => err,
                // A sink answers every message; a short answer leaves the rest unsent.
                _ => SinkError::retryable("the sink did not answer for every message"),
            };
            match err {
                source if source.is_fenced() => {
                    return Err(ReplayError::Fenced { partition, source });
                }
                source if !source.is_retryable() => {
                    return Err(ReplayError::Rejected {
                        id: failed_at.id,
                        partition,
                        sequence: failed_at.sequence,
                        source,
                    });
                }
                err => {
                    if !pause(&mut backoff, "publish failed", Some(partition), &err, stop).await {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.options.retry_initial, self.options.retry_max)
    }
}

/// Logs `err` as `what` failed, then waits the next backoff delay; false if `stop` fired.
async fn pause(
    backoff: &mut Backoff,
    what: &str,
    partition: Option<u32>,
    // Send + Sync: the future stays Send, so a replay can run in a task of its own.
    err: &(dyn std::error::Error + Send + Sync + 'static),
    stop: &CancellationToken,
) -> bool {
    let delay = backoff.next_delay();
    warn!(?partition, error = %ErrorChain(err), retry_in_ms = delay.as_millis() as u64, "replay: {what}");
    wait(delay, Some(stop), None).await.is_ok()
}

/// Holds a replay to its rate limit: after `sent` messages, no earlier than `sent / rate`
/// seconds after the start.
struct Pace {
    start: Instant,
    rate: Option<NonZeroU32>,
}

impl Pace {
    fn new(rate: Option<NonZeroU32>) -> Self {
        Self {
            start: Instant::now(),
            rate,
        }
    }

    /// False if `stop` fired while waiting.
    async fn wait(&self, sent: u64, stop: &CancellationToken) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let due = self.start + Duration::from_secs_f64(sent as f64 / f64::from(rate.get()));
        tokio::select! {
            _ = tokio::time::sleep_until(due) => true,
            _ = stop.cancelled() => false,
        }
    }
}
