//! The `ferry.toml` file: TOML, then `FERRY_<SECTION>__<KEY>` environment overrides (e.g.
//! `FERRY_STORE__URL`), then command-line flags. Unknown keys are errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use ferry::amqp::AmqpSinkConfig;
use ferry::file::FileSinkConfig;
#[cfg(feature = "kafka")]
use ferry::kafka::KafkaSinkConfig;
use ferry::mqtt::MqttSinkConfig;
use ferry::nats::NatsSinkConfig;
use ferry::redis_store::{KeyPrefix, RedisSettings};
use ferry::redis_stream::RedisStreamSinkConfig;
use ferry::sql::{StoreSettings, TablePrefix};
use ferry::webhook::WebhookSinkConfig;
use ferry_service::ServiceConfig;

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
    /// The reliable message service (`ferry serve`); its tables are created by `ferry
    /// migrate` when this section is present.
    #[serde(default)]
    pub(crate) service: Option<ServiceConfig>,
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
        /// `redis://[user:password@]host:port[/db]`; a secret, never logged.
        url: SecretString,
        /// Prefix of every key of this outbox (`outbox.table_prefix` is for SQL stores).
        /// Defaults to `ferry:`.
        #[serde(default = "default_key_prefix")]
        key_prefix: String,
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

fn default_key_prefix() -> String {
    KeyPrefix::default().as_str().to_owned()
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
    RedisStream(RedisStreamSinkConfig),
    Amqp(AmqpSinkConfig),
    Mqtt(MqttSinkConfig),
    Webhook(WebhookSinkConfig),
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
    /// How often an idle partition is looked at again when no wake-up comes: the pick-up
    /// latency on stores without notifications (SQLite, MySQL). Defaults to 1000.
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
        if let StoreConfig::Postgres { pool_size, .. } | StoreConfig::Mysql { pool_size, .. } =
            &self.store
            && !(2..=200).contains(pool_size)
        {
            bail!("store.pool_size = {pool_size} is out of range: use 2 to 200");
        }
        if let StoreConfig::Redis { key_prefix, .. } = &self.store {
            KeyPrefix::new(key_prefix.clone()).context("store.key_prefix")?;
        }
        match &self.sink {
            SinkConfig::Nats(nats) => nats.validate().context("sink")?,
            SinkConfig::RedisStream(redis) => redis.validate().context("sink")?,
            SinkConfig::Amqp(amqp) => amqp.validate().context("sink")?,
            SinkConfig::Mqtt(mqtt) => mqtt.validate().context("sink")?,
            SinkConfig::Webhook(webhook) => webhook.validate().context("sink")?,
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(kafka) => kafka.validate().context("sink")?,
            #[cfg(not(feature = "kafka"))]
            SinkConfig::Kafka(_) => return Err(kafka_not_built()),
            SinkConfig::File(_) | SinkConfig::Stdout { .. } => {}
        }
        if let Some(service) = &self.service {
            if matches!(
                self.store,
                StoreConfig::Mysql { .. } | StoreConfig::Redis { .. }
            ) {
                bail!(crate::wiring::SERVICE_STORES);
            }
            service.validate()?;
            if service.max_payload_bytes > outbox.max_payload_bytes {
                bail!(
                    "service.max_payload_bytes = {} exceeds outbox.max_payload_bytes = {}: the outbox would refuse confirmed messages; lower the first or raise the second",
                    service.max_payload_bytes,
                    outbox.max_payload_bytes
                );
            }
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

    /// The Redis store's settings: its key prefix and the shared `[outbox]` settings.
    pub(crate) fn redis_settings(&self, key_prefix: &str) -> RedisSettings {
        RedisSettings {
            key_prefix: KeyPrefix::new(key_prefix).unwrap_or_default(),
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
    fn mysql_store_takes_a_url_and_a_pool_size() {
        let config = Config::from_toml(
            "[store]\ntype = \"mysql\"\nurl = \"mysql://root@127.0.0.1:3306/test\"\n[sink]\ntype = \"stdout\"\n",
        )
        .expect("valid");
        assert!(matches!(
            config.store,
            StoreConfig::Mysql { pool_size: 8, .. }
        ));
        let err = error_of(
            "[store]\ntype = \"mysql\"\nurl = \"mysql://x@h/d\"\npool_size = 1\n[sink]\ntype = \"stdout\"\n",
        );
        assert!(err.contains("store.pool_size"), "{err}");
        let err = error_of("[store]\ntype = \"mysql\"\n[sink]\ntype = \"stdout\"\n");
        assert!(err.contains("url"), "{err}");
    }

    #[test]
    fn unknown_variants_list_the_allowed_ones() {
        let err = error_of("[store]\ntype = \"oracle\"\n[sink]\ntype = \"stdout\"\n");
        assert!(
            err.contains("oracle")
                && err.contains("postgres")
                && err.contains("sqlite")
                && err.contains("mysql"),
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

    const SERVICE: &str = "[service]\n[[service.tokens]]\nname = \"orders\"\ntoken = \"0123456789abcdef0123\"\nscopes = [\"producer\"]\n";

    #[test]
    fn service_section_is_optional_and_validated() {
        assert!(Config::from_toml(MINIMAL).expect("valid").service.is_none());
        let config = Config::from_toml(&format!("{MINIMAL}{SERVICE}")).expect("valid");
        assert_eq!(config.service.expect("present").max_deliveries, 5);
        let err = error_of(&format!(
            "{MINIMAL}{}",
            SERVICE.replace("[service]\n", "[service]\nmax_checks = 0\n")
        ));
        assert!(err.contains("service.max_checks"), "{err}");
        let err = error_of(&format!("{MINIMAL}[service]\nack_timeout = 5\n"));
        assert!(err.contains("ack_timeout"), "{err}");
        let err = error_of(&format!("{MINIMAL}{}", SERVICE.replace("producer", "root")));
        assert!(err.contains("root") && err.contains("consumer"), "{err}");
        let err = error_of(&format!(
            "{MINIMAL}[outbox]\nmax_payload_bytes = 100\n{SERVICE}"
        ));
        assert!(err.contains("service.max_payload_bytes"), "{err}");
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
    fn mqtt_and_webhook_settings_are_checked_with_the_key_named() {
        let sink = |text: &str| {
            error_of(&format!(
                "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n[sink]\n{text}\n"
            ))
        };
        let err = sink("type = \"mqtt\"\nqos = 0");
        assert!(err.contains("`qos`") && err.contains("lost"), "{err}");
        let err = sink("type = \"mqtt\"\ntopic_template = \"ferry/+/{aggregate_id}\"");
        assert!(
            err.contains("topic_template") && err.contains("wildcard"),
            "{err}"
        );
        let err = sink("type = \"mqtt\"\nurl = \"mqtts://broker:8883\"");
        assert!(err.contains("`url`") && err.contains("TLS"), "{err}");
        let err = sink("type = \"webhook\"");
        assert!(err.contains("`url`") && err.contains("required"), "{err}");
        let err = sink("type = \"webhook\"\nurl = \"ftp://h/x\"");
        assert!(err.contains("`url`") && err.contains("http"), "{err}");
        let err = sink("type = \"webhook\"\nurl = \"http://h/{aggregate}\"");
        assert!(
            err.contains("`url`") && err.contains("{aggregate_id}"),
            "{err}"
        );
        let err = sink("type = \"webhook\"\nurl = \"http://h/x\"\nsigning_secret = \"short\"");
        assert!(
            err.contains("signing_secret") && err.contains("too short"),
            "{err}"
        );
        assert!(
            !err.contains("short\""),
            "the secret itself is not echoed: {err}"
        );
    }

    #[test]
    fn redis_and_amqp_sinks_are_validated_with_the_key_named() {
        let store = "[store]\ntype = \"sqlite\"\npath = \"x.db\"\n";
        let cases = [
            ("type = \"redis_stream\"\nurl = \"http://x\"", "url"),
            (
                "type = \"redis_stream\"\nstream_template = \"orders\"",
                "{partition}",
            ),
            ("type = \"amqp\"\nurl = \"amqp://[::1\"", "url"),
            (
                "type = \"amqp\"\nrouting_key_template = \"{event}\"",
                "routing_key_template",
            ),
            (
                "type = \"amqp\"\n[sink.declare]\nexchange_type = \"fan\"",
                "declare.exchange_type",
            ),
        ];
        for (sink, expected) in cases {
            let err = error_of(&format!("{store}[sink]\n{sink}\n"));
            assert!(err.contains(expected), "{sink}: {err}");
        }
        let config = Config::from_toml(&format!(
            "{store}[sink]\ntype = \"redis_stream\"\nmax_len = 50000\n"
        ))
        .expect("valid");
        assert!(matches!(config.sink, SinkConfig::RedisStream(_)));
    }

    #[test]
    fn redis_store_takes_a_key_prefix() {
        let redis = "[store]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n[sink]\ntype = \"stdout\"\n";
        let config = Config::from_toml(redis).expect("valid");
        let StoreConfig::Redis { key_prefix, .. } = &config.store else {
            panic!("a redis store")
        };
        assert_eq!(
            config.redis_settings(key_prefix).key_prefix.as_str(),
            "ferry:"
        );
        let err = error_of(&redis.replace("6379\"\n", "6379\"\nkey_prefix = \"bad prefix*\"\n"));
        assert!(err.contains("store.key_prefix"), "{err}");
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
