//! The `ferry.toml` file: TOML, then `FERRY_<SECTION>__<KEY>` environment overrides (e.g.
//! `FERRY_STORE__URL`), then command-line flags. Unknown keys are errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use ferry::file::FileSinkConfig;
#[cfg(feature = "kafka")]
use ferry::kafka::KafkaSinkConfig;
use ferry::nats::NatsSinkConfig;
use ferry::sql::{StoreSettings, TablePrefix};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) store: StoreConfig,
    #[serde(default)]
    pub(crate) outbox: OutboxConfig,
    pub(crate) sink: SinkConfig,
    #[serde(default)]
    pub(crate) relay: RelaySection,
    #[serde(default)]
    pub(crate) leases: LeasesConfig,
}

/// Where the outbox lives.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StoreConfig {
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
}

fn default_pool_size() -> u32 {
    8
}

/// Where partition leases live. Leases outside the store are adopted by it, and the
/// store keeps refusing marks made under older epochs (fencing).
#[derive(Debug, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum LeasesConfig {
    /// In the outbox store's own lease table. The default.
    #[default]
    Store,
    /// In Redis: `SET NX PX` ownership keys, epochs from `INCR`.
    Redis {
        /// `redis://[user:password@]host:port[/db]`; a secret, never logged.
        url: SecretString,
        /// Prefix of every lease key, one per outbox. Defaults to `ferry:`.
        #[serde(default = "default_redis_key_prefix")]
        key_prefix: String,
    },
    /// In etcd v3: a lease with keep-alive per partition; revisions are the epochs.
    Etcd {
        /// `http://host:port` of one or more cluster members.
        endpoints: Vec<String>,
        /// Prefix of every lease key, one per outbox. Defaults to `ferry/`.
        #[serde(default = "default_etcd_key_prefix")]
        key_prefix: String,
        /// For clusters with authentication on; with `password`.
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<SecretString>,
    },
}

fn default_redis_key_prefix() -> String {
    "ferry:".into()
}

fn default_etcd_key_prefix() -> String {
    "ferry/".into()
}

impl LeasesConfig {
    pub(crate) fn is_external(&self) -> bool {
        !matches!(self, Self::Store)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let key_prefix = match self {
            Self::Store => return Ok(()),
            Self::Redis { url, key_prefix } => {
                let url = url.expose_secret();
                if url.starts_with("rediss://") {
                    bail!(
                        "leases.url: TLS (rediss://) is not built into this ferry; use redis:// over a trusted network or a TLS tunnel"
                    );
                }
                if !["redis://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme))
                {
                    bail!(
                        "leases.url must start with redis:// (or unix:// for a socket), e.g. redis://127.0.0.1:6379"
                    );
                }
                key_prefix
            }
            Self::Etcd {
                endpoints,
                key_prefix,
                username,
                password,
            } => {
                if endpoints.is_empty() {
                    bail!(
                        "leases.endpoints is empty: list the etcd members, e.g. [\"http://127.0.0.1:2379\"]"
                    );
                }
                if let Some(bad) = endpoints.iter().find(|e| {
                    let rest = e.strip_prefix("http://").unwrap_or_default();
                    rest.is_empty() || rest.contains(char::is_whitespace)
                }) {
                    bail!(
                        "leases.endpoints: {bad:?} is not an http://host:port address (TLS to etcd is not built into this ferry)"
                    );
                }
                if username.is_some() != password.is_some() {
                    bail!("leases.username and leases.password go together: set both or neither");
                }
                key_prefix
            }
        };
        if key_prefix.is_empty() || key_prefix.contains(char::is_whitespace) {
            bail!(
                "leases.key_prefix = {key_prefix:?} must be non-empty without spaces, one per outbox (e.g. \"ferry:orders:\")"
            );
        }
        Ok(())
    }
}

/// Settings of the outbox tables, the same for every SQL store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OutboxConfig {
    /// Prefix of every ferry table. Defaults to `ferry_`.
    pub(crate) table_prefix: String,
    /// Partition count P, fixed by the first `ferry migrate`. Defaults to 16.
    pub(crate) partitions: u32,
    /// Keep published rows this long for replay; 0 deletes them when marked. Defaults to 0.
    pub(crate) retention_secs: u64,
    /// Largest payload accepted by `enqueue`. Defaults to 1048576 (1 MiB).
    pub(crate) max_payload_bytes: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table_prefix: "ferry_".into(),
            partitions: 16,
            retention_secs: 0,
            max_payload_bytes: 1024 * 1024,
        }
    }
}

/// Where messages go.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum SinkConfig {
    Nats(NatsSinkConfig),
    #[cfg(feature = "kafka")]
    Kafka(KafkaSinkConfig),
    /// Accepted by the parser so that validation can say how to get Kafka support.
    #[cfg(not(feature = "kafka"))]
    Kafka(serde::de::IgnoredAny),
    File(FileSinkConfig),
    Stdout {
        /// CloudEvents `source`; defaults to `ferry://<aggregate_type>`.
        #[serde(default)]
        source: Option<String>,
    },
}

/// How the relay runs; see `ferry_core::RelayConfig` for what each setting does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RelaySection {
    /// Unique among relays sharing the outbox. Defaults to `<hostname>-<pid>`.
    pub(crate) relay_id: Option<String>,
    /// Defaults to 1000.
    pub(crate) batch_size: usize,
    /// Defaults to 10.
    pub(crate) lease_ttl_secs: u64,
    /// Defaults to 1000.
    pub(crate) poll_interval_ms: u64,
    /// Defaults to 100.
    pub(crate) retry_initial_ms: u64,
    /// Defaults to 30000.
    pub(crate) retry_max_ms: u64,
    /// Defaults to 10.
    pub(crate) shutdown_timeout_secs: u64,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            relay_id: None,
            batch_size: 1000,
            lease_ttl_secs: 10,
            poll_interval_ms: 1000,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            shutdown_timeout_secs: 10,
        }
    }
}

impl Config {
    /// Reads `path`, applies `FERRY_<SECTION>__<KEY>` overrides and validates.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            bail!(
                "config file {} not found (examples/ has one per store and sink)",
                path.display()
            );
        }
        Self::from_figment(Figment::from(Toml::file_exact(path)))
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses TOML text (with env overrides).
    #[cfg(test)]
    pub(crate) fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> anyhow::Result<Self> {
        // Only section-qualified variables: FERRY_TEST_… and the like are not config.
        let env = Env::prefixed("FERRY_")
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        let config: Self = figment.merge(env).extract().map_err(|errors| {
            let lines: Vec<String> = errors.into_iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!(lines.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        TablePrefix::new(self.outbox.table_prefix.clone()).context("outbox.table_prefix")?;
        let outbox = &self.outbox;
        if !(1..=ferry::sql::MAX_PARTITIONS).contains(&outbox.partitions) {
            bail!(
                "outbox.partitions = {} is out of range: use 1 to {}",
                outbox.partitions,
                ferry::sql::MAX_PARTITIONS
            );
        }
        if outbox.max_payload_bytes == 0 {
            bail!("outbox.max_payload_bytes must be at least 1");
        }
        let relay = &self.relay;
        if !(1..=10_000).contains(&relay.batch_size) {
            bail!(
                "relay.batch_size = {} is out of range: use 1 to 10000",
                relay.batch_size
            );
        }
        if relay.lease_ttl_secs < 2 {
            bail!(
                "relay.lease_ttl_secs = {} is too short: use at least 2",
                relay.lease_ttl_secs
            );
        }
        if relay.poll_interval_ms == 0 || relay.retry_initial_ms == 0 {
            bail!("relay.poll_interval_ms and relay.retry_initial_ms must be at least 1");
        }
        if relay.retry_max_ms < relay.retry_initial_ms {
            bail!(
                "relay.retry_max_ms = {} is below relay.retry_initial_ms = {}",
                relay.retry_max_ms,
                relay.retry_initial_ms
            );
        }
        if let Some(id) = &relay.relay_id
            && id.trim().is_empty()
        {
            bail!("relay.relay_id must not be empty (leave it out for <hostname>-<pid>)");
        }
        if let StoreConfig::Postgres { pool_size, .. } = &self.store
            && !(2..=200).contains(pool_size)
        {
            bail!("store.pool_size = {pool_size} is out of range: use 2 to 200");
        }
        match &self.sink {
            SinkConfig::Nats(nats) => nats.validate().context("sink")?,
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(kafka) => kafka.validate().context("sink")?,
            #[cfg(not(feature = "kafka"))]
            SinkConfig::Kafka(_) => return Err(kafka_not_built()),
            SinkConfig::File(_) | SinkConfig::Stdout { .. } => {}
        }
        self.leases.validate()
    }

    pub(crate) fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            table_prefix: TablePrefix::new(self.outbox.table_prefix.clone()).unwrap_or_default(),
            max_payload_bytes: self.outbox.max_payload_bytes,
            retention: Duration::from_secs(self.outbox.retention_secs),
            external_leases: self.leases.is_external(),
        }
    }

    pub(crate) fn relay_config(&self) -> ferry::RelayConfig {
        let r = &self.relay;
        let mut config =
            ferry::RelayConfig::new(r.relay_id.clone().unwrap_or_else(default_relay_id));
        config.batch_size = r.batch_size;
        config.lease_ttl = Duration::from_secs(r.lease_ttl_secs);
        config.poll_interval = Duration::from_millis(r.poll_interval_ms);
        config.retry_initial = Duration::from_millis(r.retry_initial_ms);
        config.retry_max = Duration::from_millis(r.retry_max_ms);
        config.shutdown_timeout = Duration::from_secs(r.shutdown_timeout_secs);
        config.external_leases = self.leases.is_external();
        config
    }
}

/// The error for a Kafka sink in a ferry built without it.
#[cfg(not(feature = "kafka"))]
pub(crate) fn kafka_not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "sink.type = \"kafka\" needs a ferry built with Kafka support: \
         cargo install ferry-cli --features kafka (or cargo build --features kafka)"
    )
}

fn default_relay_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
            let path = entry.expect("readable").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let loaded = Config::load(&path);
                #[cfg(not(feature = "kafka"))]
                if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("type = \"kafka\"")) {
                    let err = format!("{:#}", loaded.expect_err("kafka is not built in"));
                    assert!(err.contains("--features kafka"), "{err}");
                    seen += 1;
                    continue;
                }
                loaded.unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 4,
            "expected an example per store and sink pair, found {seen}"
        );
    }

    fn error_of(text: &str) -> String {
        format!(
            "{:#}",
            Config::from_toml(text).expect_err("must be refused")
        )
    }

    const MINIMAL: &str =
        "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\ntype = \"stdout\"\n";

    #[test]
    fn minimal_config_takes_the_defaults() {
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(config.outbox.partitions, 16);
        assert_eq!(config.relay.batch_size, 1000);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = error_of(&format!("{MINIMAL}[relay]\nbatch_sise = 5\n"));
        assert!(err.contains("batch_sise"), "{err}");
        let err = error_of(
            "[store]\ntype = \"sqlite\"\npath = \"x\"\nurl = \"y\"\n[sink]\ntype = \"stdout\"\n",
        );
        assert!(err.contains("url"), "{err}");
    }

    #[test]
    fn unknown_variants_list_the_allowed_ones() {
        let err = error_of("[store]\ntype = \"oracle\"\n[sink]\ntype = \"stdout\"\n");
        assert!(
            err.contains("oracle") && err.contains("postgres") && err.contains("sqlite"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_key_and_range() {
        let err = error_of(&format!("{MINIMAL}[outbox]\npartitions = 0\n"));
        assert!(
            err.contains("outbox.partitions") && err.contains("4096"),
            "{err}"
        );
        let err = error_of(&format!("{MINIMAL}[relay]\nbatch_size = 0\n"));
        assert!(err.contains("relay.batch_size"), "{err}");
        let err = error_of(&format!(
            "{MINIMAL}[outbox]\ntable_prefix = \"Bad-Prefix\"\n"
        ));
        assert!(err.contains("table_prefix"), "{err}");
    }

    #[test]
    fn leases_default_to_the_store_and_external_ones_are_checked() {
        let config = Config::from_toml(MINIMAL).expect("valid");
        assert!(!config.leases.is_external());
        assert!(!config.relay_config().external_leases);
        let config = Config::from_toml(&format!(
            "{MINIMAL}[leases]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
        ))
        .expect("valid");
        assert!(config.relay_config().external_leases && config.store_settings().external_leases);
        for (leases, expected) in [
            ("type = \"zookeeper\"", "redis"),
            ("type = \"redis\"\nurl = \"http://x\"", "leases.url"),
            ("type = \"redis\"\nurl = \"rediss://x\"", "TLS"),
            (
                "type = \"redis\"\nurl = \"redis://x\"\nkey_prefix = \"\"",
                "leases.key_prefix",
            ),
            ("type = \"etcd\"\nendpoints = []", "leases.endpoints"),
            (
                "type = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]",
                "http://",
            ),
            (
                "type = \"etcd\"\nendpoints = [\"http://x\"]\nusername = \"u\"",
                "leases.password",
            ),
            (
                "type = \"etcd\"\nendpoints = [\"http://x\"]\nurl = \"u\"",
                "url",
            ),
        ] {
            let err = error_of(&format!("{MINIMAL}[leases]\n{leases}\n"));
            assert!(err.contains(expected), "{leases}: {err}");
        }
    }

    #[test]
    fn missing_file_is_named() {
        let err = format!(
            "{:#}",
            Config::load(Path::new("/nonexistent/ferry.toml")).unwrap_err()
        );
        assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
    }
}
