//! Turns a [`Config`] into a store and a sink.

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
use ferry::sqlite::SqliteOutbox;
use ferry::{LeaseStore, OutboxStore, Sink};

use crate::config::{Config, SinkConfig, StoreConfig};

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
