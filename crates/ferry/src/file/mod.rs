//! The stdout / file sink: one CloudEvents structured-mode JSON object per line.
//!
//! A batch is written with one write and flushed (and, for files, `fsync`ed) before any
//! message of it is acknowledged, so a mark never precedes durable output. There is no
//! broker-side dedup: after a crash a line may repeat, and consumers dedup with the inbox.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use uuid::Uuid;

use ferry_core::ErrorChain;
use ferry_core::cloudevents::{Source, to_structured_json};
use ferry_core::{Delivery, Message, ReconcileRequest, Sink, SinkError};

/// Settings of the file sink. `path = "-"` writes to stdout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to append to, created if missing; `-` for stdout.
    pub path: PathBuf,
    /// CloudEvents `source`; defaults to `ferry://<aggregate_type>`.
    #[serde(default)]
    pub source: Option<String>,
}

enum Output {
    Stdout(tokio::io::Stdout),
    File(tokio::fs::File),
}

/// Appends events to a file or stdout.
pub struct FileSink {
    output: Mutex<Output>,
    source: Source,
    target: String,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl FileSink {
    /// Opens the configured output (appending; the file is created if missing).
    pub async fn open(config: &FileSinkConfig) -> Result<Self, SinkError> {
        let source = config
            .source
            .clone()
            .map_or(Source::PerAggregateType, Source::Fixed);
        if config.path == Path::new("-") {
            return Ok(Self {
                output: Mutex::new(Output::Stdout(tokio::io::stdout())),
                source,
                target: "stdout".into(),
            });
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .await
            .map_err(|e| {
                SinkError::permanent(format!(
                    "cannot open {} for appending",
                    config.path.display()
                ))
                .with_source(e)
            })?;
        Ok(Self {
            output: Mutex::new(Output::File(file)),
            source,
            target: config.path.display().to_string(),
        })
    }

    async fn write_durably(&self, lines: &[u8]) -> std::io::Result<()> {
        let mut output = self.output.lock().await;
        match &mut *output {
            Output::Stdout(out) => write_and_flush(out, lines).await,
            Output::File(file) => {
                write_and_flush(file, lines).await?;
                file.sync_data().await
            }
        }
    }
}

async fn write_and_flush(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes).await?;
    out.flush().await
}

#[async_trait]
impl Sink for FileSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<Delivery, SinkError>> {
        let mut lines = String::new();
        for message in batch {
            lines.push_str(&to_structured_json(message, &self.source));
            lines.push('\n');
        }
        match self.write_durably(lines.as_bytes()).await {
            Ok(()) => batch.iter().map(|_| Ok(Delivery::default())).collect(),
            Err(err) => {
                let message = format!("writing to {} failed: {err}", self.target);
                batch
                    .iter()
                    .map(|_| Err(SinkError::retryable(message.clone())))
                    .collect()
            }
        }
    }

    /// A file has no dedup to lean on and is not read back: lines the previous owner wrote
    /// without marking are written again, and the consumer's inbox drops them.
    async fn reconcile(&self, _request: ReconcileRequest<'_>) -> Result<Vec<Uuid>, SinkError> {
        Ok(Vec::new())
    }

    async fn shutdown(&self) {
        if let Err(err) = self.write_durably(&[]).await {
            tracing::warn!(target = %self.target, error = %ErrorChain(&err), "final flush failed");
        }
    }
}
