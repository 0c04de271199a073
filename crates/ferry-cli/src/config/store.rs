//! `[store]` (where the outbox lives) and `[outbox]` (its tables' settings).

use std::path::PathBuf;

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Deserialize;

use ferry::redis_store::KeyPrefix;
use ferry::sql::{TablePrefix, Wake};

/// Why `[service]` is refused on other stores.
pub const SERVICE_STORES: &str = "the reliable message service ([service]) keeps its messages in PostgreSQL or SQLite: set store.type = \"postgres\" or \"sqlite\", or remove the [service] section";

/// Where the outbox lives.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    Postgres {
        /// `postgres://user:password@host:port/database`; a secret, never logged.
        url: SecretString,
        /// Connections in the relay's pool. Defaults to 8.
        #[serde(default = "default_pool_size")]
        pool_size: u32,
    },
    Sqlite {
        /// The database file, created if missing.
        path: PathBuf,
    },
    /// MySQL 8.0.29+ or MariaDB 10.6+. No notifications: the relay polls every
    /// `relay.poll_interval_ms`.
    Mysql {
        /// `mysql://user:password@host:3306/database`; a secret, never logged.
        url: SecretString,
        /// Connections in the relay's pool. Defaults to 8.
        #[serde(default = "default_pool_size")]
        pool_size: u32,
    },
    /// Redis (streams and Lua scripts). Only what Redis persists survives its restart:
    /// run it with AOF (`appendfsync everysec` or `always`) for an outbox.
    Redis {
        /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS); a secret, never
        /// logged.
        url: SecretString,
        /// With `rediss://`: a PEM file of the CA that issued the server's certificate,
        /// trusted instead of the public roots.
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
        /// Prefix of every key of this outbox (`outbox.table_prefix` is for SQL stores).
        /// Defaults to `ferry:`.
        #[serde(default = "default_key_prefix")]
        key_prefix: String,
    },
}

fn default_pool_size() -> u32 {
    8
}

fn default_key_prefix() -> String {
    KeyPrefix::default().as_str().to_owned()
}

impl StoreConfig {
    /// Whether the reliable message service can keep its messages in this store.
    pub fn holds_service(&self) -> bool {
        matches!(self, Self::Postgres { .. } | Self::Sqlite { .. })
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres { pool_size, .. } | Self::Mysql { pool_size, .. }
                if !(2..=200).contains(pool_size) =>
            {
                bail!("store.pool_size = {pool_size} is out of range: use 2 to 200");
            }
            Self::Redis { key_prefix, .. } => {
                KeyPrefix::new(key_prefix.clone()).context("store.key_prefix")?;
            }
            Self::Postgres { .. } | Self::Mysql { .. } | Self::Sqlite { .. } => {}
        }
        Ok(())
    }
}

/// Settings of the outbox tables, the same for every SQL store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Prefix of every ferry table. Defaults to `ferry_`.
    pub table_prefix: String,
    /// Partition count P, fixed by the first `ferry migrate`. Defaults to 16.
    pub partitions: u32,
    /// Keep published rows this long for replay; 0 deletes them when marked. Defaults to 0.
    pub retention_secs: u64,
    /// Largest payload accepted by `enqueue`. Defaults to 1048576 (1 MiB).
    pub max_payload_bytes: usize,
    /// PostgreSQL: how the relay learns of committed rows. `"notify"`: a trigger notifies
    /// it at every producing statement (the lowest latency, but PostgreSQL serialises
    /// notifying commits, which caps producers of small transactions); `"poll"`: no
    /// trigger, the relay polls every `relay.poll_interval_ms` (default 100 then). `ferry
    /// migrate` creates or drops the trigger to match. Defaults to `"notify"`, or `"poll"`
    /// with `capture.mode = "log"` (the stream needs no notification).
    pub wake: Option<Wake>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table_prefix: "ferry_".into(),
            partitions: 16,
            retention_secs: 0,
            max_payload_bytes: 1024 * 1024,
            wake: None,
        }
    }
}

impl OutboxConfig {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        TablePrefix::new(self.table_prefix.clone()).context("outbox.table_prefix")?;
        if !(1..=ferry::sql::MAX_PARTITIONS).contains(&self.partitions) {
            bail!(
                "outbox.partitions = {} is out of range: use 1 to {}",
                self.partitions,
                ferry::sql::MAX_PARTITIONS
            );
        }
        if self.max_payload_bytes == 0 {
            bail!("outbox.max_payload_bytes must be at least 1");
        }
        Ok(())
    }

    /// `outbox.wake` is PostgreSQL's: refused by name elsewhere, where nothing notifies.
    pub(super) fn validate_wake(&self, store: &StoreConfig) -> anyhow::Result<()> {
        if self.wake.is_some() && !matches!(store, StoreConfig::Postgres { .. }) {
            bail!(
                "outbox.wake applies to PostgreSQL (LISTEN/NOTIFY) only; the relays of other stores poll every relay.poll_interval_ms: remove outbox.wake"
            );
        }
        Ok(())
    }
}
