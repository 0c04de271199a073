//! The consumer: reads the bench's stream (an ordered pull consumer) or tails its file,
//! decodes each message as any consumer would ([`ReceivedMessage`]) and checks it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_util::sync::CancellationToken;

use ferry::ReceivedMessage;

use super::check::{Checker, Latency, Verdict};
use super::target::SinkTarget;

/// How long one read waits before the consumer looks at its flags again.
const POLL: Duration = Duration::from_millis(100);

/// How long the final read to the end may go without a message before it gives up.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where messages are read from.
enum Reader {
    Nats {
        stream: Box<jetstream::stream::Stream>,
        messages: Box<jetstream::consumer::pull::Ordered>,
        /// Stream sequence of the last message read.
        position: u64,
    },
    #[cfg(feature = "kafka")]
    Kafka(Box<ferry::kafka::CommittedReader>),
    File {
        lines: BufReader<tokio::fs::File>,
        line: String,
    },
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nats { position, .. } => f
                .debug_struct("Nats")
                .field("position", position)
                .finish_non_exhaustive(),
            #[cfg(feature = "kafka")]
            Self::Kafka(reader) => reader.fmt(f),
            Self::File { .. } => f.debug_struct("File").finish_non_exhaustive(),
        }
    }
}

/// Where a finished run's output ends.
#[derive(Debug, Clone)]
enum End {
    /// The stream's last sequence when the relays had stopped.
    Sequence(u64),
    /// Each Kafka partition's high watermark when the relays had stopped.
    #[cfg(feature = "kafka")]
    Offsets(std::collections::HashMap<ferry::kafka::TopicPartition, i64>),
    /// The end of the file.
    EndOfFile,
}

impl Reader {
    async fn open(target: &SinkTarget) -> anyhow::Result<Self> {
        match target {
            SinkTarget::Nats {
                jetstream, stream, ..
            } => {
                let stream = jetstream
                    .get_stream(stream)
                    .await
                    .with_context(|| format!("opening the bench stream {stream}"))?;
                let messages = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                    .await
                    .context("creating the ordered consumer")?
                    .messages()
                    .await
                    .context("reading the bench stream")?;
                Ok(Self::Nats {
                    stream: Box::new(stream),
                    messages: Box::new(messages),
                    position: 0,
                })
            }
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka { config, topic, .. } => Ok(Self::Kafka(Box::new(
                ferry::kafka::CommittedReader::open(config, std::slice::from_ref(topic))
                    .await
                    .with_context(|| format!("reading the bench topic {topic}"))?,
            ))),
            SinkTarget::File { path } => Ok(Self::File {
                lines: BufReader::with_capacity(1 << 20, open_file(path).await?),
                line: String::new(),
            }),
        }
    }

    /// The next message, or `None` when none came within [`POLL`] (or at the file's end).
    async fn next(&mut self) -> anyhow::Result<Option<Result<ReceivedMessage, String>>> {
        match self {
            Self::Nats {
                messages, position, ..
            } => {
                let Ok(next) = tokio::time::timeout(POLL, messages.next()).await else {
                    return Ok(None);
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => return Err(err).context("reading the bench stream"),
                    None => bail!("the ordered consumer of the bench stream ended"),
                };
                *position = message
                    .info()
                    .map_err(|err| anyhow::anyhow!("unreadable JetStream reply subject: {err}"))?
                    .stream_sequence;
                let decoded = match &message.headers {
                    Some(headers) => ReceivedMessage::from_binary(
                        headers.iter().flat_map(|(name, values)| {
                            values.iter().map(move |v| (name.as_ref(), v.as_str()))
                        }),
                        message.payload.clone(),
                    )
                    .map_err(|err| err.to_string()),
                    None => Err("a message without headers".to_owned()),
                };
                Ok(Some(decoded))
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(reader) => Ok(reader
                .next(POLL)
                .await
                .context("reading the bench topic")?
                .map(|record| record.message.map_err(|err| err.to_string()))),
            Self::File { lines, line } => {
                // A partial line (a write in progress) stays in `line` and is completed by
                // the next read.
                let read = lines
                    .read_line(line)
                    .await
                    .context("reading the bench file")?;
                if read == 0 || !line.ends_with('\n') {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    return Ok(None);
                }
                let decoded = ReceivedMessage::from_structured_json(line.trim_end())
                    .map_err(|e| e.to_string());
                line.clear();
                Ok(Some(decoded))
            }
        }
    }

    /// Where the output ends, asked once the relays have stopped.
    async fn end(&mut self) -> anyhow::Result<End> {
        match self {
            Self::Nats { stream, .. } => {
                let info = stream
                    .info()
                    .await
                    .context("reading the bench stream's state")?;
                Ok(End::Sequence(info.state.last_sequence))
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(reader) => Ok(End::Offsets(
                reader
                    .ends()
                    .await
                    .context("reading the bench topic's ends")?,
            )),
            Self::File { .. } => Ok(End::EndOfFile),
        }
    }

    /// Whether everything up to `end` was read; for a file, after `next` found nothing.
    fn reached(&self, end: &End, idle: bool) -> anyhow::Result<bool> {
        Ok(match (self, end) {
            (Self::Nats { position, .. }, End::Sequence(last)) => position >= last,
            #[cfg(feature = "kafka")]
            (Self::Kafka(reader), End::Offsets(ends)) => reader
                .lagging(ends)
                .context("reading the bench topic's positions")?
                .is_empty(),
            (Self::File { line, .. }, End::EndOfFile) => idle && line.is_empty(),
            _ => false,
        })
    }
}

async fn open_file(path: &Path) -> anyhow::Result<tokio::fs::File> {
    tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening the bench file {}", path.display()))
}

/// Counters the consumer shares with the progress line.
#[derive(Debug)]
pub(super) struct Consumed {
    origin: Instant,
    /// Planned messages received for the first time.
    distinct: AtomicU64,
    /// When the last of them arrived, in microseconds after `origin`.
    last_micros: AtomicU64,
}

impl Consumed {
    pub(super) fn new() -> Self {
        Self {
            origin: Instant::now(),
            distinct: AtomicU64::new(0),
            last_micros: AtomicU64::new(0),
        }
    }

    pub(super) fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    /// When the last planned message was first received.
    pub(super) fn last_at(&self) -> Instant {
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
pub(super) struct Consumer {
    reader: Reader,
    checker: Checker,
    consumed: Arc<Consumed>,
    latency: Option<Arc<Latency>>,
    first_error: Option<String>,
}

/// What the consumer saw, once it has read everything.
#[derive(Debug)]
pub(super) struct ConsumerReport {
    pub(super) checker: Checker,
    /// The first message that could not be decoded, and why.
    pub(super) first_error: Option<String>,
}

impl Consumer {
    /// Opens the reader at the start of the bench's stream or file.
    pub(super) async fn open(
        target: &SinkTarget,
        checker: Checker,
        latency: Option<Arc<Latency>>,
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
    pub(super) async fn run(
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

    fn handle(&mut self, decoded: Result<ReceivedMessage, String>, at: Instant) {
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
                latency.received(message.id, at);
            }
            self.consumed.record(at);
        }
    }
}
