//! The bench's own tables, stream and file: a bench never reads or writes the user's
//! outbox or stream, and removes what it made unless asked to keep it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use async_nats::{ConnectOptions, ServerAddr};
use secrecy::ExposeSecret;

use ferry::amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use ferry::amqp::lapin::{self, ConnectionProperties};
use ferry::amqp::{AmqpDeclare, AmqpSinkConfig};
use ferry::file::FileSinkConfig;
use ferry::mqtt::MqttSinkConfig;
use ferry::nats::NatsSinkConfig;
use ferry::redis_stream::redis::{self, AsyncCommands as _};

#[cfg(feature = "kafka")]
use super::plan::AGGREGATE_TYPE;
use crate::config::{Config, SinkConfig, StoreConfig};
use crate::wiring;

/// Points `config` at names of the bench's own, derived from `tag`: tables `bench_<tag>_*`
/// (Redis keys `bench:<tag>:*`); for NATS the stream `<stream>_bench_<tag>` with subjects `<stream>_bench_<tag>.>`; for
/// Kafka the topic `ferry_bench_<tag>.bench` and transactional ids
/// `<prefix>-bench-<tag>-p<N>`; for Redis streams `bench_<tag>.<stream_template>`; for
/// RabbitMQ the exchange and queue `bench_<tag>`, declared by the sink (topic, bound with
/// `#`); for a file sink `<stem>.bench_<tag>.jsonl` next to the configured file. Refuses
/// stdout, which the bench cannot read back.
pub(super) fn isolate(config: &mut Config, tag: &str) -> anyhow::Result<()> {
    config.outbox.table_prefix = format!("bench_{tag}_");
    if let StoreConfig::Redis { key_prefix, .. } = &mut config.store {
        *key_prefix = format!("bench:{tag}:");
    }
    match &mut config.sink {
        SinkConfig::Nats(nats) => {
            let name = format!("{}_bench_{tag}", nats.stream);
            nats.subject_template = bench_template(&nats.subject_template, &name, '.');
            nats.subjects = vec![format!("{name}.>")];
            nats.stream = name;
        }
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(kafka) => {
            kafka.topic_template = format!("ferry_bench_{tag}.{{aggregate_type}}");
            kafka.transactional_id_prefix =
                format!("{}-bench-{tag}", kafka.transactional_id_prefix);
        }
        #[cfg(not(feature = "kafka"))]
        SinkConfig::Kafka(_) => return Err(crate::config::kafka_not_built()),
        SinkConfig::RedisStream(redis) => {
            redis.stream_template = format!("bench_{tag}.{}", redis.stream_template);
        }
        SinkConfig::Amqp(amqp) => {
            let name = format!("bench_{tag}");
            amqp.exchange_template = name.clone();
            amqp.declare = Some(AmqpDeclare {
                queue: Some(name),
                ..AmqpDeclare::default()
            });
        }
        SinkConfig::File(file) if file.path != Path::new("-") => {
            let stem = file
                .path
                .file_stem()
                .map_or_else(|| "ferry".into(), |s| s.to_string_lossy().into_owned());
            file.path = file
                .path
                .with_file_name(format!("{stem}.bench_{tag}.jsonl"));
        }
        SinkConfig::Mqtt(mqtt) => {
            mqtt.topic_template =
                bench_template(&mqtt.topic_template, &format!("bench_{tag}"), '/');
        }
        SinkConfig::Webhook(webhook) => {
            // The bench posts to a receiver of its own; Target::create puts its port in.
            webhook.url = format!("http://127.0.0.1:9/bench_{tag}/{{aggregate_type}}");
            webhook.signing_secret = None;
            webhook.bearer_token = None;
        }
        SinkConfig::File(_) | SinkConfig::Stdout { .. } => bail!(
            "ferry bench cannot read its messages back from stdout: use a config whose sink is \
             nats or a file (e.g. examples/postgres-nats.toml)"
        ),
    }
    config
        .validate()
        .context("the bench's derived names do not make a valid config")
}

/// The configured subject or topic template with its first level (levels separated by
/// `separator`) replaced by `prefix` when that level is fixed text
/// (`ferry.{aggregate_type}.{event_type}` becomes `<prefix>.{aggregate_type}.{event_type}`),
/// else with `prefix` and the separator put in front.
fn bench_template(template: &str, prefix: &str, separator: char) -> String {
    match template.split_once(separator) {
        Some((first, rest)) if !first.contains('{') => format!("{prefix}{separator}{rest}"),
        _ => format!("{prefix}{separator}{template}"),
    }
}

/// What the bench made and must remove: its tables or keys (through an admin store) and
/// its stream or file.
#[derive(Debug)]
pub(super) struct Target {
    /// The table prefix, or the key prefix for Redis.
    pub(super) prefix: String,
    pub(super) store: wiring::Store,
    pub(super) sink: SinkTarget,
}

#[derive(Debug)]
pub(super) enum SinkTarget {
    Nats {
        jetstream: Box<jetstream::Context>,
        stream: String,
        subjects: String,
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
    Webhook(super::webhook::Receiver),
}

impl Target {
    /// Connects to the sink (for the consumer and the clean-up) and the store, and creates
    /// the bench's tables. Nothing is created before both are reachable.
    pub(super) async fn create(config: &mut Config) -> anyhow::Result<Self> {
        let sink = match &mut config.sink {
            SinkConfig::Nats(nats) => SinkTarget::Nats {
                jetstream: Box::new(jetstream::new(connect_nats(nats).await?)),
                stream: nats.stream.clone(),
                subjects: nats.subjects.join(", "),
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
                super::kafka::create_topics(kafka, &[&topic, &raw_topic]).await?;
                SinkTarget::Kafka {
                    config: Box::new(kafka.clone()),
                    topic,
                    raw_topic,
                }
            }
            #[cfg(not(feature = "kafka"))]
            SinkConfig::Kafka(_) => return Err(crate::config::kafka_not_built()),
            SinkConfig::RedisStream(redis) => {
                let url = redis.url.expose_secret();
                // Reads of thousands of entries on a busy box outlast the 500 ms default.
                let timeouts = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(redis.response_timeout_secs)))
                    .set_connection_timeout(Some(Duration::from_secs(redis.response_timeout_secs)));
                let connection = redis::Client::open(url)
                    .context("invalid sink.url")?
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
                let receiver = super::webhook::Receiver::start().await?;
                webhook.url = webhook
                    .url
                    .replace("127.0.0.1:9", &receiver.addr.to_string());
                SinkTarget::Webhook(receiver)
            }
            SinkConfig::Stdout { .. } => bail!("the stdout sink cannot be benchmarked"),
        };
        let store = wiring::Store::open(config).await?;
        store.migrate(config.outbox.partitions).await?;
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
    pub(super) fn describe_sink(&self) -> String {
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
    pub(super) async fn raw_ceiling(
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
                    super::mqtt::raw_ceiling(config, &topic, messages, payload.len()).await?;
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
            SinkTarget::RedisStream { .. } | SinkTarget::Amqp { .. } => {
                super::raw::ceiling(&self.sink, messages, payload).await?
            }
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka { .. } => Vec::new(),
            SinkTarget::Nats { .. } | SinkTarget::File { .. } => Vec::new(),
        })
    }

    /// The bench's tables or keys, for the report.
    pub(super) fn describe_store(&self) -> String {
        match &self.store {
            wiring::Store::Redis(_) => format!("keys {}*", self.prefix),
            wiring::Store::Postgres(_) | wiring::Store::Sqlite(_) | wiring::Store::Mysql(_) => {
                format!("tables {}*", self.prefix)
            }
        }
    }

    /// The bench's tables or keys and stream or file, for the report.
    pub(super) fn describe(&self) -> String {
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

    /// Drops the bench's tables and functions (or deletes its Redis keys) and deletes its
    /// stream or file; returns what it removed, for the report.
    pub(super) async fn remove(&self) -> anyhow::Result<String> {
        let prefix = &self.prefix;
        match &self.store {
            wiring::Store::Postgres(outbox) => drop_postgres(outbox.pool(), prefix).await,
            wiring::Store::Sqlite(outbox) => drop_sqlite(outbox.pool(), prefix).await,
            wiring::Store::Mysql(outbox) => drop_mysql(outbox.pool(), prefix).await,
            wiring::Store::Redis(outbox) => outbox.remove().await.map(drop).map_err(Into::into),
        }
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
            } => super::kafka::delete_topics(config, &[topic, raw_topic])
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
async fn connect_nats(config: &NatsSinkConfig) -> anyhow::Result<async_nats::Client> {
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
pub(super) async fn connect_amqp(config: &AmqpSinkConfig) -> anyhow::Result<lapin::Connection> {
    lapin::Connection::connect(
        config.url.expose_secret(),
        ConnectionProperties::default().with_connection_name("ferry-bench".into()),
    )
    .await
    .context("connecting to RabbitMQ (sink.url)")
}

/// Drops every table and function whose name starts with `prefix` (the trigger, indexes
/// and identity sequences go with their tables).
async fn drop_postgres(pool: &sqlx::PgPool, prefix: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I', tablename) FROM pg_tables \
         WHERE schemaname = current_schema() AND starts_with(tablename, $1)",
    )
    .bind(prefix)
    .fetch_all(&mut *tx)
    .await?;
    if !tables.is_empty() {
        let sql = format!("DROP TABLE IF EXISTS {} CASCADE", tables.join(", "));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
         WHERE p.pronamespace = current_schema()::regnamespace AND starts_with(p.proname, $1)",
    )
    .bind(prefix)
    .fetch_all(&mut *tx)
    .await?;
    for function in functions {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP FUNCTION IF EXISTS {function}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Drops every table, procedure and function of the current database whose name starts
/// with `prefix`.
async fn drop_mysql(pool: &sqlx::MySqlPool, prefix: &str) -> anyhow::Result<()> {
    // LIKE would read the prefix's '_' as a wildcard: compare the leading characters.
    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT 'TABLE', table_name FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND LEFT(table_name, CHAR_LENGTH(?)) = ? \
         UNION ALL SELECT routine_type, routine_name FROM information_schema.routines \
         WHERE routine_schema = DATABASE() AND LEFT(routine_name, CHAR_LENGTH(?)) = ?",
    )
    .bind(prefix)
    .bind(prefix)
    .bind(prefix)
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    for (kind, name) in objects {
        let quoted = name.replace('`', "``");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP {kind} IF EXISTS `{quoted}`"
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Drops every table whose name starts with `prefix` (indexes and triggers go with them).
async fn drop_sqlite(pool: &sqlx::SqlitePool, prefix: &str) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, length(?1)) = ?1",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    for table in tables {
        let quoted = table.replace('"', "\"\"");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS \"{quoted}\""
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_move_under_the_bench_prefix() {
        assert_eq!(
            bench_template("ferry.{aggregate_type}.{event_type}", "FERRY_bench_1", '.'),
            "FERRY_bench_1.{aggregate_type}.{event_type}"
        );
        assert_eq!(
            bench_template("{aggregate_type}.{event_type}", "B", '.'),
            "B.{aggregate_type}.{event_type}"
        );
        assert_eq!(bench_template("{event_type}", "B", '.'), "B.{event_type}");
        assert_eq!(
            bench_template("x{partition}.y", "B", '.'),
            "B.x{partition}.y"
        );
    }

    fn config(sink: &str) -> Config {
        Config::from_toml(&format!(
            "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\n{sink}\n"
        ))
        .expect("valid config")
    }

    #[test]
    fn nats_and_file_sinks_get_names_of_their_own() {
        let mut nats = config("type = \"nats\"\nstream = \"ORDERS\"");
        isolate(&mut nats, "ab12").expect("isolated");
        assert_eq!(nats.outbox.table_prefix, "bench_ab12_");
        let SinkConfig::Nats(sink) = &nats.sink else {
            panic!("still nats")
        };
        assert_eq!(sink.stream, "ORDERS_bench_ab12");
        assert_eq!(sink.subjects, ["ORDERS_bench_ab12.>"]);
        assert_eq!(
            sink.subject_template,
            "ORDERS_bench_ab12.{aggregate_type}.{event_type}"
        );

        let mut file = config("type = \"file\"\npath = \"/var/events.jsonl\"");
        isolate(&mut file, "ab12").expect("isolated");
        let SinkConfig::File(sink) = &file.sink else {
            panic!("still a file")
        };
        assert_eq!(sink.path, Path::new("/var/events.bench_ab12.jsonl"));
    }

    #[test]
    fn redis_and_rabbitmq_get_names_of_their_own() {
        let mut redis = config("type = \"redis_stream\"");
        isolate(&mut redis, "ab12").expect("isolated");
        let SinkConfig::RedisStream(sink) = &redis.sink else {
            panic!("still redis")
        };
        assert_eq!(
            sink.stream_template,
            "bench_ab12.ferry.{aggregate_type}.{partition}"
        );
        let mut amqp = config("type = \"amqp\"\nexchange_template = \"shop.{aggregate_type}\"");
        isolate(&mut amqp, "ab12").expect("isolated");
        let SinkConfig::Amqp(sink) = &amqp.sink else {
            panic!("still amqp")
        };
        assert_eq!(sink.exchange_template, "bench_ab12");
        let declare = sink.declare.as_ref().expect("declares its own queue");
        assert_eq!(declare.queue.as_deref(), Some("bench_ab12"));
    }

    #[test]
    fn stdout_is_refused() {
        for sink in ["type = \"stdout\"", "type = \"file\"\npath = \"-\""] {
            let err = isolate(&mut config(sink), "ab12").expect_err("refused");
            assert!(err.to_string().contains("stdout"), "{err}");
        }
    }
}
