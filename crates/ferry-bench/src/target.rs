//! What the bench made and must remove: its outbox (through an admin store) and its
//! stream, topics, queue or file; and the sink's raw ceiling, measured on them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use async_nats::{ConnectOptions, ServerAddr};
use secrecy::ExposeSecret;

use ferry::amqp::AmqpSinkConfig;
use ferry::amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use ferry::amqp::lapin::{self, ConnectionProperties};
use ferry::file::FileSinkConfig;
use ferry::mqtt::MqttSinkConfig;
use ferry::nats::NatsSinkConfig;
use ferry::redis_stream::redis::{self, AsyncCommands as _};
use ferry_cli::config::{Config, SinkConfig, StoreConfig};
use ferry_cli::wiring;

use crate::cleanup::remove_outbox;
#[cfg(feature = "kafka")]
use crate::plan::AGGREGATE_TYPE;
use crate::raw::RawTarget;
use crate::webhook::Receiver;

/// What the bench made and must remove: its tables or keys (through an admin store) and
/// its stream or file.
#[derive(Debug)]
pub(crate) struct Target {
    /// The table prefix, or the key prefix for Redis.
    pub(crate) prefix: String,
    pub(crate) store: wiring::Store,
    pub(crate) sink: SinkTarget,
}

/// What a NATS stream of the bench holds: ferry's CloudEvents or the baseline poller's
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NatsWire {
    Ferry,
    Baseline,
}

#[derive(Debug)]
pub(crate) enum SinkTarget {
    Nats {
        jetstream: Box<jetstream::Context>,
        stream: String,
        subjects: String,
        /// Who publishes there, and so how its messages are read.
        wire: NatsWire,
    },
    #[cfg(feature = "kafka")]
    Kafka {
        config: Box<ferry::kafka::KafkaSinkConfig>,
        /// Where the relays publish.
        topic: String,
        /// Where the raw publish loops write.
        raw_topic: String,
    },
    RedisStream {
        connection: redis::aio::MultiplexedConnection,
        /// `KEYS`-style pattern matching every bench stream.
        pattern: String,
        /// Where the raw ceiling is measured.
        raw_stream: String,
    },
    Amqp {
        connection: Box<lapin::Connection>,
        /// The bench's exchange and queue (the same name).
        name: String,
    },
    File {
        path: PathBuf,
    },
    Mqtt {
        config: MqttSinkConfig,
        /// `<bench prefix>/#`: every topic the bench's template renders.
        filter: String,
    },
    Webhook(Receiver),
}

impl Target {
    /// Connects to the sink (for the consumer and the clean-up) and the store, and creates
    /// the bench's tables. Nothing is created before both are reachable.
    pub(crate) async fn create(config: &mut Config) -> anyhow::Result<Self> {
        let sink = match &mut config.sink {
            SinkConfig::Nats(nats) => SinkTarget::Nats {
                jetstream: Box::new(jetstream::new(connect_nats(nats).await?)),
                stream: nats.stream.clone(),
                subjects: nats.subjects.join(", "),
                wire: NatsWire::Ferry,
            },
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(kafka) => {
                // `isolate` made the template `ferry_bench_<tag>.{aggregate_type}`.
                let topic_of = |aggregate_type| {
                    kafka
                        .topic_template
                        .replace("{aggregate_type}", aggregate_type)
                };
                let (topic, raw_topic) = (topic_of(AGGREGATE_TYPE), topic_of("raw"));
                crate::kafka::create_topics(kafka, &[&topic, &raw_topic]).await?;
                SinkTarget::Kafka {
                    config: Box::new(kafka.clone()),
                    topic,
                    raw_topic,
                }
            }
            #[cfg(not(feature = "kafka"))]
            SinkConfig::Kafka(_) => return Err(crate::isolate::kafka_not_built()),
            SinkConfig::RedisStream(redis) => {
                let url = redis.url.expose_secret();
                // Reads of thousands of entries on a busy box outlast the 500 ms default.
                let timeouts = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(redis.response_timeout_secs)))
                    .set_connection_timeout(Some(Duration::from_secs(redis.response_timeout_secs)));
                // The sink's own client: its CA, and TCP_NODELAY (commit -> consume).
                let connection = ferry::tls::redis_client(url, redis.tls_ca_file.as_deref())
                    .map_err(anyhow::Error::msg)
                    .context("sink.url")?
                    .get_multiplexed_async_connection_with_config(&timeouts)
                    .await
                    .context("connecting to Redis (sink.url)")?;
                let prefix = redis
                    .stream_template
                    .split_once('.')
                    .map_or(redis.stream_template.as_str(), |(prefix, _)| prefix);
                SinkTarget::RedisStream {
                    connection,
                    pattern: format!("{prefix}.*"),
                    raw_stream: format!("{prefix}.raw"),
                }
            }
            SinkConfig::Amqp(amqp) => SinkTarget::Amqp {
                connection: Box::new(connect_amqp(amqp).await?),
                name: amqp.exchange_template.clone(),
            },
            SinkConfig::File(FileSinkConfig { path, .. }) => {
                SinkTarget::File { path: path.clone() }
            }
            SinkConfig::Mqtt(mqtt) => SinkTarget::Mqtt {
                filter: match mqtt.topic_template.split_once('/') {
                    Some((prefix, _)) => format!("{prefix}/#"),
                    None => mqtt.topic_template.clone(),
                },
                config: mqtt.clone(),
            },
            SinkConfig::Webhook(webhook) => {
                let receiver = Receiver::start().await?;
                webhook.url = webhook
                    .url
                    .replace("127.0.0.1:9", &receiver.addr.to_string());
                SinkTarget::Webhook(receiver)
            }
            SinkConfig::Stdout { .. } => bail!("the stdout sink cannot be benchmarked"),
        };
        let store = wiring::Store::open(config).await?;
        store.migrate(config.outbox.partitions).await?;
        // `capture.mode = "log"`: the publication and slot `ferry migrate` would create.
        if let Some(capture) = wiring::open_capture(config, &store)? {
            capture.setup().await?;
        }
        let prefix = match &config.store {
            StoreConfig::Redis { key_prefix, .. } => key_prefix.clone(),
            StoreConfig::Postgres { .. }
            | StoreConfig::Sqlite { .. }
            | StoreConfig::Mysql { .. } => config.outbox.table_prefix.clone(),
        };
        Ok(Self {
            prefix,
            store,
            sink,
        })
    }

    /// Where the messages go, for the report.
    pub(crate) fn describe_sink(&self) -> String {
        match &self.sink {
            SinkTarget::Nats {
                stream, subjects, ..
            } => format!("nats stream {stream} (subjects {subjects})"),
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka { config, topic, .. } => {
                format!("kafka topic {topic} at {}", config.brokers)
            }
            SinkTarget::RedisStream { pattern, .. } => format!("redis streams {pattern}"),
            SinkTarget::Amqp { name, .. } => {
                format!("rabbitmq exchange {name} (topic) -> queue {name}")
            }
            SinkTarget::File { path } => format!("file {}", path.display()),
            SinkTarget::Mqtt { config, filter } => format!("mqtt {} (topics {filter})", config.url),
            SinkTarget::Webhook(receiver) => {
                format!(
                    "webhook (the bench's own receiver at http://{})",
                    receiver.addr
                )
            }
        }
    }

    /// The broker's or receiver's own ceiling, measured the same way the sink would be
    /// used but without ferry (no outbox, no CloudEvents): one line per measurement, none
    /// for sinks without one here (Kafka's is measured before the relays start).
    pub(crate) async fn raw_ceiling(
        &self,
        messages: u64,
        payload: &str,
        partitions: u32,
    ) -> anyhow::Result<Vec<String>> {
        let rate = |elapsed: std::time::Duration| messages as f64 / elapsed.as_secs_f64().max(1e-9);
        Ok(match &self.sink {
            SinkTarget::Mqtt { config, filter } => {
                let topic = format!("{}_raw/x", filter.trim_end_matches("/#"));
                let elapsed =
                    crate::mqtt::raw_ceiling(config, &topic, messages, payload.len()).await?;
                vec![format!(
                    "raw ceiling: one rumqttc client publishing QoS 1 without properties, up to {} in flight: {messages} in {:.2} s, {:.0} msg/s",
                    config.max_in_flight,
                    elapsed.as_secs_f64(),
                    rate(elapsed)
                )]
            }
            SinkTarget::Webhook(receiver) => {
                let elapsed = receiver
                    .raw_ceiling(messages, payload.len(), partitions)
                    .await?;
                vec![format!(
                    "raw ceiling: {partitions} tasks each POSTing one request after the other to the same receiver, no CloudEvents headers: {messages} in {:.2} s, {:.0} msg/s",
                    elapsed.as_secs_f64(),
                    rate(elapsed)
                )]
            }
            SinkTarget::RedisStream {
                connection,
                raw_stream,
                ..
            } => {
                let target = RawTarget::Redis {
                    connection,
                    stream: raw_stream,
                };
                crate::raw::ceiling(target, messages, payload).await?
            }
            SinkTarget::Amqp { connection, name } => {
                let target = RawTarget::Amqp {
                    connection,
                    exchange: name,
                };
                crate::raw::ceiling(target, messages, payload).await?
            }
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka { .. } => Vec::new(),
            SinkTarget::Nats { .. } | SinkTarget::File { .. } => Vec::new(),
        })
    }

    /// The bench's tables or keys, for the report.
    pub(crate) fn describe_store(&self) -> String {
        match &self.store {
            wiring::Store::Redis(_) => format!("keys {}*", self.prefix),
            wiring::Store::Postgres(_) | wiring::Store::Sqlite(_) | wiring::Store::Mysql(_) => {
                format!("tables {}*", self.prefix)
            }
        }
    }

    /// The bench's tables or keys and stream or file, for the report.
    pub(crate) fn describe(&self) -> String {
        let sink = match &self.sink {
            SinkTarget::Nats { stream, .. } => format!("stream {stream}"),
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka {
                topic, raw_topic, ..
            } => format!("topics {topic} and {raw_topic}"),
            SinkTarget::RedisStream { pattern, .. } => format!("streams {pattern}"),
            SinkTarget::Amqp { name, .. } => format!("exchange and queue {name}"),
            SinkTarget::File { path } => format!("file {}", path.display()),
            SinkTarget::Mqtt { filter, .. } => format!("topics {filter} (nothing kept)"),
            SinkTarget::Webhook(_) => "the bench's receiver (nothing kept)".to_owned(),
        };
        format!("{}, {sink}", self.describe_store())
    }

    /// Removes what the bench made, or says what is kept with `keep`; a failed removal
    /// fails the run only if the run itself succeeded (`run_ok`), else it is a warning.
    pub(crate) async fn clean_up(&self, keep: bool, run_ok: bool) -> anyhow::Result<()> {
        if keep {
            println!("kept: {}", self.describe());
            return Ok(());
        }
        match self.remove().await {
            Ok(removed) => println!("removed: {removed}"),
            Err(err) if run_ok => return Err(err),
            Err(err) => eprintln!(
                "warning: clean-up failed: {}",
                ferry::ErrorChain(err.as_ref())
            ),
        }
        Ok(())
    }

    /// Drops the bench's tables and functions (or deletes its Redis keys) and deletes its
    /// stream or file; returns what it removed, for the report.
    pub(crate) async fn remove(&self) -> anyhow::Result<String> {
        remove_outbox(&self.store, &self.prefix)
            .await
            .with_context(|| format!("removing the bench's {}", self.describe_store()))?;
        match &self.sink {
            SinkTarget::Nats {
                jetstream, stream, ..
            } => match jetstream.delete_stream(stream).await {
                Ok(_) => {}
                Err(err)
                    if matches!(err.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(js)
                            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("deleting the bench stream {stream}"));
                }
            },
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka {
                config,
                topic,
                raw_topic,
            } => crate::kafka::delete_topics(config, &[topic, raw_topic])
                .await
                .context("deleting the bench topics")?,
            SinkTarget::RedisStream {
                connection,
                pattern,
                ..
            } => {
                let mut connection = connection.clone();
                let keys: Vec<String> = connection
                    .keys(pattern)
                    .await
                    .with_context(|| format!("listing the bench streams {pattern}"))?;
                if !keys.is_empty() {
                    let () = connection
                        .del(keys)
                        .await
                        .with_context(|| format!("deleting the bench streams {pattern}"))?;
                }
            }
            SinkTarget::Amqp { connection, name } => {
                let channel = connection.create_channel().await?;
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .with_context(|| format!("deleting the bench queue {name}"))?;
                channel
                    .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .with_context(|| format!("deleting the bench exchange {name}"))?;
            }
            SinkTarget::File { path } => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing {}", path.display()));
                }
            },
            SinkTarget::Mqtt { .. } | SinkTarget::Webhook(_) => {}
        }
        Ok(self.describe())
    }
}

/// A client with the sink's servers and credentials, for reading the stream back.
pub(crate) async fn connect_nats(config: &NatsSinkConfig) -> anyhow::Result<async_nats::Client> {
    let servers = config
        .url
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("invalid sink.url")?;
    // The url may carry a password: name the servers by host and port only.
    let names = servers
        .iter()
        .map(|s| format!("{}:{}", s.host(), s.port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut options = ConnectOptions::new().name("ferry-bench");
    if let Some(token) = &config.token {
        options = options.token(token.expose_secret().to_owned());
    }
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading nats credentials {}", path.display()))?;
    }
    options
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {names} (sink.url)"))
}

/// A connection with the sink's URL, for reading the queue back.
async fn connect_amqp(config: &AmqpSinkConfig) -> anyhow::Result<lapin::Connection> {
    lapin::Connection::connect(
        config.url.expose_secret(),
        ConnectionProperties::default().with_connection_name("ferry-bench".into()),
    )
    .await
    .context("connecting to RabbitMQ (sink.url)")
}
