//! The consumer: reads the bench's output through a [`Reader`], checks each message and
//! counts what arrived for the progress line and the latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::check::{Checker, Latencies, Verdict};
use crate::decoded::Decoded;
use crate::reader::Reader;
use crate::target::SinkTarget;

/// How long the final read to the end may go without a message before it gives up.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters the consumer shares with the progress line.
#[derive(Debug)]
pub(crate) struct Consumed {
    origin: Instant,
    /// Planned messages received for the first time.
    distinct: AtomicU64,
    /// When the last of them arrived, in microseconds after `origin`.
    last_micros: AtomicU64,
}

impl Consumed {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            distinct: AtomicU64::new(0),
            last_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    /// When the last planned message was first received.
    pub(crate) fn last_at(&self) -> Instant {
        self.origin + Duration::from_micros(self.last_micros.load(Ordering::Relaxed))
    }

    fn record(&self, at: Instant) {
        let micros = u64::try_from(at.saturating_duration_since(self.origin).as_micros())
            .unwrap_or(u64::MAX);
        self.last_micros.store(micros, Ordering::Relaxed);
        self.distinct.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running consumer.
#[derive(Debug)]
pub(crate) struct Consumer {
    reader: Reader,
    checker: Checker,
    consumed: Arc<Consumed>,
    latency: Option<Arc<Latencies>>,
    first_error: Option<String>,
}

/// What the consumer saw, once it has read everything.
#[derive(Debug)]
pub(crate) struct ConsumerReport {
    pub(crate) checker: Checker,
    /// The first message that could not be decoded, and why.
    pub(crate) first_error: Option<String>,
}

impl Consumer {
    /// Opens the reader at the start of the bench's stream or file.
    pub(crate) async fn open(
        target: &SinkTarget,
        checker: Checker,
        latency: Option<Arc<Latencies>>,
        consumed: Arc<Consumed>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            reader: Reader::open(target).await?,
            checker,
            consumed,
            latency,
            first_error: None,
        })
    }

    /// Reads until `finish` fires, then on to the end of what the (stopped) relays wrote,
    /// so that late duplicates are counted too. Returns early if `stop` fires.
    pub(crate) async fn run(
        mut self,
        finish: CancellationToken,
        stop: CancellationToken,
    ) -> anyhow::Result<ConsumerReport> {
        let mut end = None;
        let mut idle_since = None;
        while !stop.is_cancelled() {
            if end.is_none() && finish.is_cancelled() {
                end = Some(self.reader.end().await?);
            }
            if let Some(end) = &end
                && self.reader.reached(end, false)?
            {
                break;
            }
            match self.reader.next().await? {
                Some(decoded) => {
                    idle_since = None;
                    self.handle(decoded, Instant::now());
                }
                None => {
                    let Some(end) = &end else { continue };
                    if self.reader.reached(end, true)? {
                        break;
                    }
                    let idle = *idle_since.get_or_insert_with(Instant::now);
                    if idle.elapsed() > FINAL_READ_TIMEOUT {
                        bail!(
                            "the bench output stopped short of its end ({end:?}) for {} s",
                            FINAL_READ_TIMEOUT.as_secs()
                        );
                    }
                }
            }
        }
        Ok(ConsumerReport {
            checker: self.checker,
            first_error: self.first_error,
        })
    }

    fn handle(&mut self, decoded: Decoded, at: Instant) {
        let message = match decoded {
            Ok(message) => message,
            Err(err) => {
                self.checker.undecodable();
                self.first_error.get_or_insert(err);
                return;
            }
        };
        let verdict = self.checker.record(
            &message.aggregate_type,
            &message.aggregate_id,
            message.version,
        );
        if verdict == Verdict::New {
            if let Some(latency) = &self.latency {
                latency.to_consume.received(message.id, at);
            }
            self.consumed.record(at);
        }
    }
}
