//! `[capture]`: how the relay learns of new outbox rows: by polling the table (the
//! default) or by streaming the database's log.

use anyhow::bail;
use serde::Deserialize;

use super::relay::PermanentFailurePolicy;
use super::store::StoreConfig;

/// `[capture]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSection {
    /// `"poll"` (default) or `"log"`.
    pub mode: CaptureMode,
    /// PostgreSQL: the logical replication slot, created by `ferry migrate`. Defaults to
    /// `<outbox.table_prefix>outbox`.
    pub slot: Option<String>,
    /// PostgreSQL: the publication of the outbox table (inserts only), created by `ferry
    /// migrate`. Defaults to `<outbox.table_prefix>outbox`.
    pub publication: Option<String>,
    /// MySQL/MariaDB: the server id the relay's binlog connection registers with, unique
    /// among the server's replicas. Defaults to one derived from the database and prefix.
    pub server_id: Option<u32>,
    /// How often an idle stream writes a heartbeat to the log (MariaDB: how often the server
    /// sends one on an idle binlog stream, which shows a dead connection), so that the database can
    /// recycle the log behind it. Defaults to 10000.
    pub heartbeat_interval_ms: Option<u64>,
}

/// `capture.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// The relay reads each partition's unpublished rows (woken by LISTEN/NOTIFY on
    /// PostgreSQL).
    #[default]
    Poll,
    /// One relay streams the outbox's inserts from the database's log (PostgreSQL logical
    /// replication, MariaDB's binlog); the others wait as standbys.
    Log,
}

impl CaptureSection {
    pub fn is_log(&self) -> bool {
        self.mode == CaptureMode::Log
    }

    pub(super) fn validate(
        &self,
        store: &StoreConfig,
        on_permanent_failure: PermanentFailurePolicy,
    ) -> anyhow::Result<()> {
        if self.heartbeat_interval_ms == Some(0) {
            bail!("capture.heartbeat_interval_ms must be at least 1");
        }
        if !self.is_log() {
            return Ok(());
        }
        if !matches!(
            store,
            StoreConfig::Postgres { .. } | StoreConfig::Mysql { .. }
        ) {
            bail!(
                "capture.mode = \"log\" streams PostgreSQL's logical replication or MariaDB's binlog: set store.type = \"postgres\" or \"mysql\", or capture.mode = \"poll\""
            );
        }
        if on_permanent_failure != PermanentFailurePolicy::Block {
            bail!(
                "capture.mode = \"log\" publishes each partition in log order and cannot hold a parked aggregate back: set relay.on_permanent_failure = \"block\""
            );
        }
        Ok(())
    }
}
