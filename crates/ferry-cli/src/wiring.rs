//! Turns a [`Config`] into a store, its leases and a sink.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use ferry::amqp::AmqpSink;
use ferry::backoff::Backoff;
use ferry::file::{FileSink, FileSinkConfig};
#[cfg(feature = "kafka")]
use ferry::kafka::KafkaSink;
use ferry::mqtt::MqttSink;
use ferry::mysql::MyOutbox;
use ferry::mysql::capture::{CaptureSettings as MyCaptureSettings, MyLogCapture};
use ferry::nats::NatsSink;
use ferry::postgres::PgOutbox;
use ferry::postgres::capture::{PgCapture, PgCaptureSettings};
use ferry::redis_lease::RedisLeases;
use ferry::redis_store::RedisOutbox;
use ferry::redis_stream::RedisStreamSink;
use ferry::sqlite::SqliteOutbox;
use ferry::tls::redis_client;
use ferry::webhook::WebhookSink;
use ferry::{LeaseStore, LogCapture, OutboxAdmin, OutboxStore, Sink, StoreError};
use ferry_service::{PgServiceStore, ServiceStore, SqliteServiceStore};

use crate::config::{Config, LeasesConfig, SERVICE_STORES, SinkConfig, StoreConfig};

/// An opened outbox store; it is its own lease store.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(Arc<PgOutbox>),
    Sqlite(Arc<SqliteOutbox>),
    Mysql(Arc<MyOutbox>),
    Redis(Arc<RedisOutbox>),
}

impl Store {
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let settings = config.store_settings();
        Ok(match &config.store {
            StoreConfig::Postgres { url, pool_size } => Self::Postgres(Arc::new(
                PgOutbox::connect(url.expose_secret(), *pool_size, settings)
                    .await
                    .context("connecting to PostgreSQL (store.url)")?,
            )),
            StoreConfig::Mysql { url, pool_size } => Self::Mysql(Arc::new(
                MyOutbox::connect(url.expose_secret(), *pool_size, settings)
                    .await
                    .context("connecting to MySQL (store.url)")?,
            )),
            StoreConfig::Sqlite { path } => {
                let url = format!("sqlite://{}", path.display());
                Self::Sqlite(Arc::new(
                    SqliteOutbox::connect(&url, 4, settings)
                        .await
                        .with_context(|| format!("opening SQLite database {}", path.display()))?,
                ))
            }
            StoreConfig::Redis {
                url,
                tls_ca_file,
                key_prefix,
            } => {
                let client = redis_client(url.expose_secret(), tls_ca_file.as_deref()).map_err(
                    |reason| anyhow::anyhow!("store.tls_ca_file or store.url: {reason}"),
                )?;
                Self::Redis(Arc::new(
                    RedisOutbox::connect_client(client, config.redis_settings(key_prefix))
                        .await
                        .context("connecting to Redis (store.url)")?,
                ))
            }
        })
    }

    pub async fn migrate(&self, partitions: u32) -> anyhow::Result<()> {
        match self {
            Self::Postgres(s) => s.migrate(partitions).await?,
            Self::Sqlite(s) => s.migrate(partitions).await?,
            Self::Mysql(s) => s.migrate(partitions).await?,
            Self::Redis(s) => s.migrate(partitions).await?,
        }
        Ok(())
    }

    /// Where `migrate` put the outbox, for its report.
    pub fn describe(&self, config: &Config) -> String {
        match self {
            Self::Postgres(_) | Self::Sqlite(_) | Self::Mysql(_) => {
                format!("table prefix {:?}", config.outbox.table_prefix)
            }
            Self::Redis(s) => format!(
                "key prefix {:?}; producers in other languages: EVALSHA {} (text in {}meta, field enqueue_script)",
                s.key_prefix().as_str(),
                RedisOutbox::enqueue_script_sha(),
                s.key_prefix().as_str()
            ),
        }
    }

    /// The operators' view of the outbox (blocked partitions, parked messages, cleanup,
    /// retained messages for replay).
    pub fn admin(&self) -> anyhow::Result<Arc<dyn OutboxAdmin>> {
        Ok(match self {
            Self::Postgres(s) => s.clone(),
            Self::Sqlite(s) => s.clone(),
            Self::Mysql(s) => s.clone(),
            Self::Redis(s) => s.clone(),
        })
    }

    pub fn outbox(&self) -> Arc<dyn OutboxStore> {
        match self {
            Self::Postgres(s) => s.clone(),
            Self::Sqlite(s) => s.clone(),
            Self::Mysql(s) => s.clone(),
            Self::Redis(s) => s.clone(),
        }
    }

    /// The reliable message service's store, sharing this store's pool.
    pub fn service(&self) -> anyhow::Result<Arc<dyn ServiceStore>> {
        Ok(match self {
            Self::Postgres(s) => Arc::new(PgServiceStore::new(Arc::clone(s))),
            Self::Sqlite(s) => Arc::new(SqliteServiceStore::new(Arc::clone(s))),
            Self::Mysql(_) | Self::Redis(_) => bail!(SERVICE_STORES),
        })
    }

    pub fn leases(&self) -> Arc<dyn LeaseStore> {
        match self {
            Self::Postgres(s) => s.clone(),
            Self::Sqlite(s) => s.clone(),
            Self::Mysql(s) => s.clone(),
            Self::Redis(s) => s.clone(),
        }
    }

    /// The highest fencing epoch in the store, above which an external lease backend must
    /// grant. A store that cannot adopt external leases refuses here.
    async fn highest_epoch(&self) -> Result<i64, StoreError> {
        match self {
            Self::Postgres(s) => s.highest_epoch().await,
            Self::Sqlite(s) => s.highest_epoch().await,
            Self::Mysql(s) => s.highest_epoch().await,
            Self::Redis(s) => s.highest_epoch().await,
        }
    }
}

/// Where the relay's partition leases live: the store itself, or a backend outside it
/// whose grants the store adopts.
#[derive(Debug, Clone)]
pub enum Leases {
    Store(Store),
    Redis(Arc<RedisLeases>),
    #[cfg(feature = "etcd-lease")]
    Etcd(Arc<ferry::etcd_lease::EtcdLeases>),
}

impl Leases {
    /// Opens the configured backend for `store`'s partitions, with epochs above every one
    /// the store holds.
    pub async fn open(config: &Config, store: &Store) -> anyhow::Result<Self> {
        if !config.leases.is_external() {
            return Ok(Self::Store(store.clone()));
        }
        let partitions = store.outbox().partitions().await?;
        let floor = store.highest_epoch().await?;
        Ok(match &config.leases {
            LeasesConfig::Store => Self::Store(store.clone()),
            LeasesConfig::Redis {
                url,
                tls_ca_file,
                key_prefix,
            } => {
                let client = redis_client(url.expose_secret(), tls_ca_file.as_deref()).map_err(
                    |reason| anyhow::anyhow!("leases.tls_ca_file or leases.url: {reason}"),
                )?;
                Self::Redis(Arc::new(
                    RedisLeases::connect_client(client, key_prefix, partitions, floor)
                        .await
                        .context("connecting to Redis for leases (leases.url)")?,
                ))
            }
            #[cfg(feature = "etcd-lease")]
            LeasesConfig::Etcd {
                endpoints,
                tls_ca_file,
                key_prefix,
                username,
                password,
            } => {
                let connection = ferry::etcd_lease::EtcdConnection {
                    endpoints,
                    tls_ca_file: tls_ca_file.as_deref(),
                    credentials: username
                        .as_deref()
                        .zip(password.as_ref().map(ExposeSecret::expose_secret)),
                    key_prefix,
                };
                Self::Etcd(Arc::new(
                    ferry::etcd_lease::EtcdLeases::connect(connection, partitions, floor)
                        .await
                        .context("connecting to etcd for leases (leases.endpoints)")?,
                ))
            }
            #[cfg(not(feature = "etcd-lease"))]
            LeasesConfig::Etcd { .. } => {
                // Not retryable: waiting will not add the feature.
                return Err(StoreError::Other(
                    "this ferry was built without etcd leases (leases.type = \"etcd\"): build it with `cargo build --release --features etcd-lease`, which needs protoc".into(),
                )
                .into());
            }
        })
    }

    pub fn lease_store(&self) -> Arc<dyn LeaseStore> {
        match self {
            Self::Store(store) => store.leases(),
            Self::Redis(leases) => leases.clone(),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd(leases) => leases.clone(),
        }
    }

    /// Who holds each partition, per a backend outside the store (whose status cannot
    /// know); `None` when the store holds the leases and reports them itself.
    pub async fn owners(&self) -> Result<Option<BTreeMap<u32, String>>, StoreError> {
        Ok(Some(match self {
            Self::Store(_) => return Ok(None),
            Self::Redis(leases) => leases.owners().await?,
            #[cfg(feature = "etcd-lease")]
            Self::Etcd(leases) => leases.owners().await?,
        }))
    }
}

/// The outbox's log, in `capture.mode = "log"`: PostgreSQL's logical replication or
/// MariaDB's binlog.
#[derive(Debug)]
pub enum Capture {
    Postgres(Box<PgCapture>),
    Mysql(Box<MyLogCapture>),
}

impl Capture {
    /// Checks the server's prerequisites and prepares the log (`ferry migrate`); returns
    /// what was set up, for the operator.
    pub async fn setup(&self) -> Result<String, StoreError> {
        match self {
            Self::Postgres(capture) => {
                capture.setup().await?;
                let settings = capture.settings();
                Ok(format!(
                    "publication {} (inserts only), logical replication slot {}",
                    settings.publication, settings.slot
                ))
            }
            Self::Mysql(capture) => {
                capture.setup().await?;
                Ok(format!(
                    "MariaDB binlog, position in <prefix>capture_position, streamed under lock {}",
                    capture.lock_name()
                ))
            }
        }
    }

    pub fn into_log_capture(self) -> Arc<dyn LogCapture> {
        match self {
            Self::Postgres(capture) => Arc::new(*capture),
            Self::Mysql(capture) => Arc::new(*capture),
        }
    }

    pub async fn lag(&self) -> Result<ferry::CaptureLag, StoreError> {
        match self {
            Self::Postgres(capture) => capture.lag().await,
            Self::Mysql(capture) => capture.lag().await,
        }
    }
}

/// The outbox's log, in `capture.mode = "log"`; `None` in poll mode.
pub fn open_capture(config: &Config, store: &Store) -> anyhow::Result<Option<Capture>> {
    if !config.capture.is_log() {
        return Ok(None);
    }
    match (store, &config.store) {
        (Store::Postgres(outbox), StoreConfig::Postgres { url, .. }) => {
            let mut settings = PgCaptureSettings::for_prefix(&config.outbox.table_prefix);
            if let Some(slot) = &config.capture.slot {
                settings.slot.clone_from(slot);
            }
            if let Some(publication) = &config.capture.publication {
                settings.publication.clone_from(publication);
            }
            if let Some(ms) = config.capture.heartbeat_interval_ms {
                settings.heartbeat_interval = std::time::Duration::from_millis(ms);
            }
            Ok(Some(Capture::Postgres(Box::new(PgCapture::new(
                url.expose_secret(),
                outbox,
                settings,
            )?))))
        }
        (Store::Mysql(outbox), StoreConfig::Mysql { url, .. }) => {
            let mut settings = MyCaptureSettings {
                server_id: config.capture.server_id,
                ..MyCaptureSettings::default()
            };
            if let Some(ms) = config.capture.heartbeat_interval_ms {
                settings.heartbeat = std::time::Duration::from_millis(ms);
            }
            Ok(Some(Capture::Mysql(Box::new(MyLogCapture::new(
                MyOutbox::clone(outbox),
                url.expose_secret(),
                settings,
            )?))))
        }
        _ => bail!("capture.mode = \"log\" needs store.type = \"postgres\" or \"mysql\""),
    }
}

/// [`open_capture`] as the relay takes it.
pub fn log_capture(config: &Config, store: &Store) -> anyhow::Result<Option<Arc<dyn LogCapture>>> {
    Ok(open_capture(config, store)?.map(Capture::into_log_capture))
}

pub async fn open_sink(config: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match config {
        SinkConfig::Nats(nats) => Arc::new(
            NatsSink::connect(nats)
                .await
                // The sink's error names the servers without credentials; sink.url may hold some.
                .context("connecting to NATS (sink.url)")?,
        ),
        SinkConfig::RedisStream(redis) => Arc::new(
            RedisStreamSink::connect(redis)
                .await
                .context("connecting to Redis (sink.url)")?,
        ),
        SinkConfig::Amqp(amqp) => Arc::new(
            AmqpSink::connect(amqp)
                .await
                .context("connecting to RabbitMQ (sink.url)")?,
        ),
        SinkConfig::Mqtt(mqtt) => Arc::new(
            MqttSink::connect(mqtt)
                .await
                .context("connecting to the MQTT broker (sink.url)")?,
        ),
        SinkConfig::Webhook(webhook) => Arc::new(WebhookSink::new(webhook)?),
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(kafka) => Arc::new(
            KafkaSink::connect(kafka)
                .await
                .context("connecting to Kafka (sink.brokers)")?,
        ),
        #[cfg(not(feature = "kafka"))]
        SinkConfig::Kafka(_) => return Err(crate::config::kafka_not_built()),
        SinkConfig::File(file) => Arc::new(FileSink::open(file).await?),
        SinkConfig::Stdout { source } => Arc::new(
            FileSink::open(&FileSinkConfig {
                path: "-".into(),
                source: source.clone(),
            })
            .await?,
        ),
    })
}

/// Retries `open` with capped backoff until it succeeds or `shutdown` fires (then
/// `Ok(None)`), logging each failure with its cause: an unreachable database or broker at
/// start is an outage to wait out. Errors retrying cannot fix (a bad URL, missing tables)
/// are returned at once.
pub async fn retry_until_ready<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut open: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(30),
    );
    loop {
        match open().await {
            Ok(value) => return Ok(Some(value)),
            Err(err) if !is_retryable(&err) => return Err(err),
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    what,
                    error = %ferry::ErrorChain(err.as_ref()),
                    retry_in_ms = delay.as_millis() as u64,
                    "not ready"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
}

/// Store and sink errors say whether they are transient (a refused login or a bad
/// setting is not); anything else is assumed to be.
fn is_retryable(err: &anyhow::Error) -> bool {
    err.chain().all(|cause| {
        cause
            .downcast_ref::<ferry::StoreError>()
            .is_none_or(ferry::StoreError::is_retryable)
            && cause
                .downcast_ref::<ferry::SinkError>()
                .is_none_or(ferry::SinkError::is_retryable)
    })
}
