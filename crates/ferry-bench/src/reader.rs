//! The readers of the bench's output: its NATS stream (an ordered pull consumer), Kafka
//! topic (read committed), Redis streams (`XREAD`), RabbitMQ queue (a consumer without
//! acks), file (tailed), or the messages an MQTT subscriber or the webhook receiver pushes;
//! each message decoded as any consumer would ([`ReceivedMessage`]), and where the output
//! ends once the relays have stopped.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;

use ferry::ReceivedMessage;
use ferry::amqp::decode_delivery;
use ferry::amqp::lapin;
use ferry::amqp::lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use ferry::amqp::lapin::types::FieldTable;
use ferry::redis_stream::decode_stream_id;
use ferry::redis_stream::redis::streams::{StreamReadOptions, StreamReadReply};
use ferry::redis_stream::redis::{self, AsyncCommands as _};

use crate::decoded::Decoded;
use crate::target::{NatsWire, SinkTarget};

/// How long one read waits before the consumer looks at its flags again.
const POLL: Duration = Duration::from_millis(100);

/// How often the Redis reader looks for streams that appeared since.
const DISCOVER_EVERY: Duration = Duration::from_millis(500);

/// Entries one `XREAD` returns at most.
const XREAD_COUNT: usize = 2000;

/// How long a channel-fed reader (MQTT, webhook) must stay quiet, once the relays have
/// stopped, before its output counts as complete: those sinks have no end marker to read.
const QUIET_END: Duration = Duration::from_secs(2);

/// Where messages are read from.
pub(crate) enum Reader {
    Nats {
        stream: Box<jetstream::stream::Stream>,
        messages: Box<jetstream::consumer::pull::Ordered>,
        /// Stream sequence of the last message read.
        position: u64,
        wire: NatsWire,
    },
    #[cfg(feature = "kafka")]
    Kafka(Box<ferry::kafka::CommittedReader>),
    RedisStream {
        connection: redis::aio::MultiplexedConnection,
        pattern: String,
        /// Each stream and the id of its last entry read.
        streams: Vec<(String, String)>,
        discovered: Option<Instant>,
        decoded: VecDeque<Decoded>,
        read: u64,
    },
    Amqp {
        channel: lapin::Channel,
        queue: String,
        consumer: Box<lapin::Consumer>,
        read: u64,
    },
    File {
        lines: BufReader<tokio::fs::File>,
        line: String,
    },
    /// Messages pushed by a subscriber or receiver task (MQTT, webhook).
    Channel {
        messages: mpsc::UnboundedReceiver<Decoded>,
        last_at: Instant,
        /// Stops the subscriber task when the reader goes.
        _task: Option<DropGuard>,
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
            Self::RedisStream { streams, read, .. } => f
                .debug_struct("RedisStream")
                .field("streams", &streams.len())
                .field("read", read)
                .finish_non_exhaustive(),
            Self::Amqp { queue, read, .. } => f
                .debug_struct("Amqp")
                .field("queue", queue)
                .field("read", read)
                .finish_non_exhaustive(),
            Self::File { .. } => f.debug_struct("File").finish_non_exhaustive(),
            Self::Channel { .. } => f.debug_struct("Channel").finish_non_exhaustive(),
        }
    }
}

/// Where a finished run's output ends.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// The stream's last sequence when the relays had stopped.
    Sequence(u64),
    /// How many messages the broker held (Redis: entries in all streams; RabbitMQ: read so
    /// far plus those still queued) when the relays had stopped.
    Count(u64),
    /// Each Kafka partition's high watermark when the relays had stopped.
    #[cfg(feature = "kafka")]
    Offsets(std::collections::HashMap<ferry::kafka::TopicPartition, i64>),
    /// The end of the file.
    Eof,
    /// Nothing more for [`QUIET_END`].
    Quiet,
}

impl Reader {
    pub(crate) async fn open(target: &SinkTarget) -> anyhow::Result<Self> {
        match target {
            SinkTarget::Nats {
                jetstream,
                stream,
                wire,
                ..
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
                    wire: *wire,
                })
            }
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka { config, topic, .. } => Ok(Self::Kafka(Box::new(
                ferry::kafka::CommittedReader::open(config, std::slice::from_ref(topic))
                    .await
                    .with_context(|| format!("reading the bench topic {topic}"))?,
            ))),
            SinkTarget::RedisStream {
                connection,
                pattern,
                ..
            } => Ok(Self::RedisStream {
                connection: connection.clone(),
                pattern: pattern.clone(),
                streams: Vec::new(),
                discovered: None,
                decoded: VecDeque::new(),
                read: 0,
            }),
            SinkTarget::Amqp { connection, name } => {
                let channel = connection
                    .create_channel()
                    .await
                    .context("opening a channel to read the bench queue")?;
                let consumer = channel
                    .basic_consume(
                        name.as_str().into(),
                        "ferry-bench".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .with_context(|| format!("consuming the bench queue {name}"))?;
                Ok(Self::Amqp {
                    channel,
                    queue: name.clone(),
                    consumer: Box::new(consumer),
                    read: 0,
                })
            }
            SinkTarget::File { path } => Ok(Self::File {
                lines: BufReader::with_capacity(1 << 20, open_file(path).await?),
                line: String::new(),
            }),
            SinkTarget::Mqtt { config, filter } => {
                let (messages, task) = crate::mqtt::subscribe(config, filter).await?;
                Ok(Self::Channel {
                    messages,
                    last_at: Instant::now(),
                    _task: Some(task),
                })
            }
            SinkTarget::Webhook(receiver) => Ok(Self::Channel {
                messages: receiver.take_messages()?,
                last_at: Instant::now(),
                _task: None,
            }),
        }
    }

    /// The next entry of the bench's Redis streams: reads a chunk of every stream when
    /// none is buffered, and looks for new streams every [`DISCOVER_EVERY`].
    async fn next_redis(
        connection: &mut redis::aio::MultiplexedConnection,
        pattern: &str,
        streams: &mut Vec<(String, String)>,
        discovered: &mut Option<Instant>,
        decoded: &mut VecDeque<Decoded>,
    ) -> anyhow::Result<Option<Decoded>> {
        if let Some(message) = decoded.pop_front() {
            return Ok(Some(message));
        }
        if discovered.is_none_or(|at| at.elapsed() > DISCOVER_EVERY) {
            let keys: Vec<String> = connection
                .keys(pattern)
                .await
                .context("listing the bench streams")?;
            for key in keys {
                if !key.ends_with(".raw") && !streams.iter().any(|(name, _)| *name == key) {
                    streams.push((key, "0".into()));
                }
            }
            *discovered = Some(Instant::now());
        }
        if streams.is_empty() {
            tokio::time::sleep(POLL).await;
            return Ok(None);
        }
        let names: Vec<&str> = streams.iter().map(|(name, _)| name.as_str()).collect();
        let ids: Vec<&str> = streams.iter().map(|(_, id)| id.as_str()).collect();
        let options = StreamReadOptions::default()
            .count(XREAD_COUNT)
            .block(POLL.as_millis() as usize);
        let reply: Option<StreamReadReply> = connection
            .xread_options(&names, &ids, &options)
            .await
            .context("reading the bench streams")?;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(at) = streams.iter().position(|(name, _)| *name == stream.key) else {
                continue;
            };
            for entry in &stream.ids {
                decoded.push_back(decode_stream_id(entry).map_err(|e| e.to_string()));
            }
            if let Some(last) = stream.ids.last() {
                streams[at].1.clone_from(&last.id);
            }
        }
        Ok(decoded.pop_front())
    }

    /// The next message, or `None` when none came within [`POLL`] (or at the file's end).
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Decoded>> {
        match self {
            Self::Nats {
                messages,
                position,
                wire,
                ..
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
                Ok(Some(match wire {
                    NatsWire::Ferry => {
                        ferry::nats::decode_message(&message).map_err(|err| err.to_string())
                    }
                    NatsWire::Baseline => crate::baseline::decode(&message),
                }))
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(reader) => Ok(reader
                .next(POLL)
                .await
                .context("reading the bench topic")?
                .map(|record| record.message.map_err(|err| err.to_string()))),
            Self::RedisStream {
                connection,
                pattern,
                streams,
                discovered,
                decoded,
                read,
            } => {
                let next =
                    Self::next_redis(connection, pattern, streams, discovered, decoded).await?;
                *read += u64::from(next.is_some());
                Ok(next)
            }
            Self::Amqp { consumer, read, .. } => {
                let Ok(next) = tokio::time::timeout(POLL, consumer.next()).await else {
                    return Ok(None);
                };
                let delivery = match next {
                    Some(delivery) => delivery.context("reading the bench queue")?,
                    None => bail!("the consumer of the bench queue ended"),
                };
                *read += 1;
                Ok(Some(
                    decode_delivery(&delivery.properties, &delivery.data)
                        .map_err(|err| err.to_string()),
                ))
            }
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
            Self::Channel {
                messages, last_at, ..
            } => match tokio::time::timeout(POLL, messages.recv()).await {
                Ok(Some(decoded)) => {
                    *last_at = Instant::now();
                    Ok(Some(decoded))
                }
                Ok(None) => bail!("the bench's subscriber or receiver stopped"),
                Err(_) => Ok(None),
            },
        }
    }

    /// Where the output ends, asked once the relays have stopped.
    pub(crate) async fn end(&mut self) -> anyhow::Result<End> {
        match self {
            Self::Nats { stream, .. } => {
                let info = stream
                    .info()
                    .await
                    .context("reading the bench stream's state")?;
                Ok(End::Sequence(info.state.last_sequence))
            }
            Self::RedisStream {
                connection,
                pattern,
                ..
            } => {
                let keys: Vec<String> = connection
                    .keys(pattern.as_str())
                    .await
                    .context("listing the bench streams")?;
                let mut total = 0;
                for key in keys.iter().filter(|key| !key.ends_with(".raw")) {
                    let length: u64 = connection
                        .xlen(key)
                        .await
                        .with_context(|| format!("reading the length of {key}"))?;
                    total += length;
                }
                Ok(End::Count(total))
            }
            Self::Amqp {
                channel,
                queue,
                read,
                ..
            } => {
                let state = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .context("reading the bench queue's length")?;
                Ok(End::Count(*read + u64::from(state.message_count())))
            }
            #[cfg(feature = "kafka")]
            Self::Kafka(reader) => Ok(End::Offsets(
                reader
                    .ends()
                    .await
                    .context("reading the bench topic's ends")?,
            )),
            Self::File { .. } => Ok(End::Eof),
            Self::Channel { .. } => Ok(End::Quiet),
        }
    }

    /// Whether everything up to `end` was read; for a file, after `next` found nothing.
    pub(crate) fn reached(&self, end: &End, idle: bool) -> anyhow::Result<bool> {
        Ok(match (self, end) {
            (Self::Nats { position, .. }, End::Sequence(last)) => position >= last,
            #[cfg(feature = "kafka")]
            (Self::Kafka(reader), End::Offsets(ends)) => reader
                .lagging(ends)
                .context("reading the bench topic's positions")?
                .is_empty(),
            (Self::File { line, .. }, End::Eof) => idle && line.is_empty(),
            (Self::Channel { last_at, .. }, End::Quiet) => idle && last_at.elapsed() >= QUIET_END,
            (Self::RedisStream { read, decoded, .. }, End::Count(total)) => {
                read >= total && decoded.is_empty()
            }
            // Messages already pushed to the client are in no count: wait until none comes.
            (Self::Amqp { read, .. }, End::Count(total)) => idle && read >= total,
            _ => false,
        })
    }
}

async fn open_file(path: &Path) -> anyhow::Result<tokio::fs::File> {
    tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening the bench file {}", path.display()))
}
