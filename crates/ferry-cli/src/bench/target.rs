//! The bench's own tables, stream and file: a bench never reads or writes the user's
//! outbox or stream, and removes what it made unless asked to keep it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use async_nats::jetstream;
use async_nats::{ConnectOptions, ServerAddr};
use secrecy::ExposeSecret;

use ferry::file::FileSinkConfig;
use ferry::nats::NatsSinkConfig;

#[cfg(feature = "kafka")]
use super::plan::AGGREGATE_TYPE;
use crate::config::{Config, SinkConfig};
use crate::wiring;

/// Points `config` at names of the bench's own, derived from `tag`: tables `bench_<tag>_*`;
/// for NATS the stream `<stream>_bench_<tag>` with subjects `<stream>_bench_<tag>.>`; for
/// Kafka the topic `ferry_bench_<tag>.bench` and transactional ids
/// `<prefix>-bench-<tag>-p<N>`; for a file sink `<stem>.bench_<tag>.jsonl` next to the
/// configured file. Refuses stdout, which the bench cannot read back.
pub(super) fn isolate(config: &mut Config, tag: &str) -> anyhow::Result<()> {
    config.outbox.table_prefix = format!("bench_{tag}_");
    match &mut config.sink {
        SinkConfig::Nats(nats) => {
            let name = format!("{}_bench_{tag}", nats.stream);
            nats.subject_template = bench_template(&nats.subject_template, &name);
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
        SinkConfig::File(file) if file.path != Path::new("-") => {
            let stem = file
                .path
                .file_stem()
                .map_or_else(|| "ferry".into(), |s| s.to_string_lossy().into_owned());
            file.path = file
                .path
                .with_file_name(format!("{stem}.bench_{tag}.jsonl"));
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

/// The configured subject template with its first token replaced by `prefix` when that
/// token is fixed text (`ferry.{aggregate_type}.{event_type}` becomes
/// `<prefix>.{aggregate_type}.{event_type}`), else with `prefix.` put in front.
fn bench_template(template: &str, prefix: &str) -> String {
    match template.split_once('.') {
        Some((first, rest)) if !first.contains('{') => format!("{prefix}.{rest}"),
        _ => format!("{prefix}.{template}"),
    }
}

/// What the bench made and must remove: its tables (through an admin store) and its
/// stream or file.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) table_prefix: String,
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
    File {
        path: PathBuf,
    },
}

impl Target {
    /// Connects to the sink (for the consumer and the clean-up) and the store, and creates
    /// the bench's tables. Nothing is created before both are reachable.
    pub(super) async fn create(config: &Config) -> anyhow::Result<Self> {
        let sink = match &config.sink {
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
            SinkConfig::File(FileSinkConfig { path, .. }) => {
                SinkTarget::File { path: path.clone() }
            }
            SinkConfig::Stdout { .. } => bail!("the stdout sink cannot be benchmarked"),
        };
        let store = wiring::Store::open(config).await?;
        store.migrate(config.outbox.partitions).await?;
        Ok(Self {
            table_prefix: config.outbox.table_prefix.clone(),
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
            SinkTarget::File { path } => format!("file {}", path.display()),
        }
    }

    /// The bench's tables and stream or file, for the report.
    pub(super) fn describe(&self) -> String {
        let sink = match &self.sink {
            SinkTarget::Nats { stream, .. } => format!("stream {stream}"),
            #[cfg(feature = "kafka")]
            SinkTarget::Kafka {
                topic, raw_topic, ..
            } => format!("topics {topic} and {raw_topic}"),
            SinkTarget::File { path } => format!("file {}", path.display()),
        };
        format!("tables {}*, {sink}", self.table_prefix)
    }

    /// Drops the bench's tables and functions and deletes its stream or file; returns what
    /// it removed, for the report.
    pub(super) async fn remove(&self) -> anyhow::Result<String> {
        let prefix = &self.table_prefix;
        match &self.store {
            wiring::Store::Postgres(outbox) => drop_postgres(outbox.pool(), prefix).await,
            wiring::Store::Sqlite(outbox) => drop_sqlite(outbox.pool(), prefix).await,
        }
        .with_context(|| format!("dropping the bench tables {prefix}*"))?;
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
            SinkTarget::File { path } => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing {}", path.display()));
                }
            },
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
            bench_template("ferry.{aggregate_type}.{event_type}", "FERRY_bench_1"),
            "FERRY_bench_1.{aggregate_type}.{event_type}"
        );
        assert_eq!(
            bench_template("{aggregate_type}.{event_type}", "B"),
            "B.{aggregate_type}.{event_type}"
        );
        assert_eq!(bench_template("{event_type}", "B"), "B.{event_type}");
        assert_eq!(bench_template("x{partition}.y", "B"), "B.x{partition}.y");
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
    fn stdout_is_refused() {
        for sink in ["type = \"stdout\"", "type = \"file\"\npath = \"-\""] {
            let err = isolate(&mut config(sink), "ab12").expect_err("refused");
            assert!(err.to_string().contains("stdout"), "{err}");
        }
    }
}
