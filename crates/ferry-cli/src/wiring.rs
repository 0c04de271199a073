//! Turns a [`Config`] into a store, its leases and a sink.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use ferry::backoff::Backoff;
use ferry::file::{FileSink, FileSinkConfig};
#[cfg(feature = "kafka")]
use ferry::kafka::KafkaSink;
use ferry::nats::NatsSink;
use ferry::postgres::PgOutbox;
use ferry::redis_lease::RedisLeases;
use ferry::sqlite::SqliteOutbox;
use ferry::{LeaseStore, OutboxStore, Sink, StoreError};

use crate::config::{Config, LeasesConfig, SinkConfig, StoreConfig};

/// An opened outbox store; it is its own lease store.
#[derive(Debug, Clone)]
pub(crate) enum Store {
    Postgres(Arc<PgOutbox>),
    Sqlite(Arc<SqliteOutbox>),
}

impl Store {
    pub(crate) async fn open(config: &Config) -> anyhow::Result<Self> {
        let settings = config.store_settings();
        Ok(match &config.store {
            StoreConfig::Postgres { url, pool_size } => Self::Postgres(Arc::new(
                PgOutbox::connect(url.expose_secret(), *pool_size, settings)
                    .await
                    .context("connecting to PostgreSQL (store.url)")?,
            )),
            StoreConfig::Sqlite { path } => {
                let url = format!("sqlite://{}", path.display());
                Self::Sqlite(Arc::new(
                    SqliteOutbox::connect(&url, settings)
                        .await
                        .with_context(|| format!("opening SQLite database {}", path.display()))?,
                ))
            }
        })
    }

    pub(crate) async fn migrate(&self, partitions: u32) -> anyhow::Result<()> {
        match self {
            Self::Postgres(s) => s.migrate(partitions).await?,
            Self::Sqlite(s) => s.migrate(partitions).await?,
        }
        Ok(())
    }

    pub(crate) fn outbox(&self) -> Arc<dyn OutboxStore> {
        match self {
            Self::Postgres(s) => s.clone(),
            Self::Sqlite(s) => s.clone(),
        }
    }

    pub(crate) fn leases(&self) -> Arc<dyn LeaseStore> {
        match self {
            Self::Postgres(s) => s.clone(),
            Self::Sqlite(s) => s.clone(),
        }
    }

    /// The highest fencing epoch in the store, above which an external lease backend must
    /// grant. A store that cannot adopt external leases refuses here.
    async fn highest_epoch(&self) -> Result<i64, StoreError> {
        match self {
            Self::Postgres(s) => s.highest_epoch().await,
            Self::Sqlite(s) => s.highest_epoch().await,
        }
    }
}

/// Where the relay's partition leases live: the store itself, or a backend outside it
/// whose grants the store adopts.
#[derive(Debug, Clone)]
pub(crate) enum Leases {
    Store(Store),
    Redis(Arc<RedisLeases>),
    #[cfg(feature = "etcd-lease")]
    Etcd(Arc<ferry::etcd_lease::EtcdLeases>),
}

impl Leases {
    /// Opens the configured backend for `store`'s partitions, with epochs above every one
    /// the store holds.
    pub(crate) async fn open(config: &Config, store: &Store) -> anyhow::Result<Self> {
        if !config.leases.is_external() {
            return Ok(Self::Store(store.clone()));
        }
        let partitions = store.outbox().partitions().await?;
        let floor = store.highest_epoch().await?;
        Ok(match &config.leases {
            LeasesConfig::Store => Self::Store(store.clone()),
            LeasesConfig::Redis { url, key_prefix } => Self::Redis(Arc::new(
                RedisLeases::connect(url.expose_secret(), key_prefix, partitions, floor)
                    .await
                    .context("connecting to Redis for leases (leases.url)")?,
            )),
            #[cfg(feature = "etcd-lease")]
            LeasesConfig::Etcd {
                endpoints,
                key_prefix,
                username,
                password,
            } => {
                let connection = ferry::etcd_lease::EtcdConnection {
                    endpoints,
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

    pub(crate) fn lease_store(&self) -> Arc<dyn LeaseStore> {
        match self {
            Self::Store(store) => store.leases(),
            Self::Redis(leases) => leases.clone(),
            #[cfg(feature = "etcd-lease")]
            Self::Etcd(leases) => leases.clone(),
        }
    }

    /// Who holds each partition, per a backend outside the store (whose status cannot
    /// know); `None` when the store holds the leases and reports them itself.
    pub(crate) async fn owners(&self) -> Result<Option<BTreeMap<u32, String>>, StoreError> {
        Ok(Some(match self {
            Self::Store(_) => return Ok(None),
            Self::Redis(leases) => leases.owners().await?,
            #[cfg(feature = "etcd-lease")]
            Self::Etcd(leases) => leases.owners().await?,
        }))
    }
}

pub(crate) async fn open_sink(config: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match config {
        SinkConfig::Nats(nats) => Arc::new(
            NatsSink::connect(nats)
                .await
                // The sink's error names the servers without credentials; sink.url may hold some.
                .context("connecting to NATS (sink.url)")?,
        ),
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
pub(crate) async fn retry_until_ready<T, F, Fut>(
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
                    error = format!("{err:#}"),
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

/// Store errors say whether they are transient; anything else (broker connection
/// failures) is assumed to be.
fn is_retryable(err: &anyhow::Error) -> bool {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<ferry::StoreError>())
        .is_none_or(ferry::StoreError::is_retryable)
}
