//! Settings of the Kafka sink and their validation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use secrecy::SecretString;
use serde::Deserialize;

use super::security::{self, SECURITY_PROPERTIES, SaslMechanism, SecurityProtocol};
use super::topic::TopicTemplate;

/// librdkafka properties ferry sets itself, because exactly-once delivery depends on them;
/// each with what to do instead.
const CONTROLLED: [(&str, &str); 13] = [
    ("bootstrap.servers", "set `brokers` instead"),
    ("metadata.broker.list", "set `brokers` instead"),
    (
        "transactional.id",
        "ferry derives one per outbox partition from `transactional_id_prefix`",
    ),
    (
        "enable.idempotence",
        "the idempotent producer is always on: transactions need it",
    ),
    (
        "acks",
        "ferry always waits for all in-sync replicas (acks=all)",
    ),
    (
        "request.required.acks",
        "ferry always waits for all in-sync replicas (acks=all)",
    ),
    ("message.timeout.ms", "set `timeout_secs` instead"),
    ("delivery.timeout.ms", "set `timeout_secs` instead"),
    (
        "transaction.timeout.ms",
        "set `transaction_timeout_secs` instead",
    ),
    (
        "partitioner",
        "ferry uses murmur2_random (the Java client's) so one key always lands in one partition",
    ),
    (
        "isolation.level",
        "reconciliation must read committed records only",
    ),
    (
        "enable.auto.commit",
        "reconciliation never commits consumer offsets",
    ),
    (
        "group.id",
        "reconciliation reads by assignment, not in a group",
    ),
];

/// librdkafka properties ferry changes from librdkafka's defaults, each with why; the
/// `librdkafka` table overrides them.
const DEFAULTS: [(&str, &str); 1] = [
    // KIP-714 client telemetry: on, every broker of every client (the broker connections
    // and librdkafka's internal one) keeps six latency histograms (~17 KiB each) whether
    // or not the cluster ever asks for them; the relay reports its own metrics. Off
    // takes ~3 MiB off a relay owning 16 partitions (BENCHMARKS.md section 18).
    ("enable.metrics.push", "false"),
];

/// Settings of the Kafka sink. Every key is optional; the defaults are:
///
/// - `brokers = "127.0.0.1:9092"`: bootstrap brokers, `host:port` separated by commas.
/// - `topic_template = "ferry.{aggregate_type}"`: the topic of each message, with the
///   placeholders `{aggregate_type}`, `{aggregate_id}`, `{event_type}` and `{partition}`.
///   A value's characters that Kafka refuses in topic names (anything but letters, digits,
///   `.`, `_`, `-`) become `_`.
/// - `transactional_id_prefix = "ferry"`: outbox partition N is published by the
///   transactional producer `<prefix>-p<N>`, so a new owner fences the previous one.
///   Relays sharing one outbox must use the same prefix; outboxes sharing a cluster must not.
/// - `create_topics = true`: create a missing topic with `topic_partitions` partitions and
///   `topic_replication_factor` replicas (unset: the broker's default) before the first
///   publish to it. With `false`, a missing topic blocks its outbox partition.
/// - `topic_partitions = 16`.
/// - `timeout_secs = 30`: bounds every broker call: delivery of a record, transaction
///   begin/commit/abort, topic creation, and a reconciliation read that stops progressing.
/// - `transaction_timeout_secs = 60`: the broker aborts a transaction left open this long
///   (by a relay that died mid-batch). At least `timeout_secs`.
/// - `delivery_window = 250`: records of a batch's transaction enqueued in a partition's
///   producer ahead of the oldest delivery report not yet received. Bounds the relay's
///   memory, which librdkafka holds per record until its report (payload, headers, produce
///   request) on every owned partition at once: whole 1000-record batches on 16 partitions
///   peaked at ~70 MiB (BENCHMARKS.md section 8).
/// - `reconcile_margin_secs = 30`: how far before the checkpoint (a record timestamp)
///   reconciliation starts reading, to cover clock differences between relays and brokers.
/// - `source`: the CloudEvents `source` of every event; unset means `ferry://<aggregate_type>`.
/// - `security_protocol = "plaintext"`: or `"ssl"` (TLS, the brokers' certificates and
///   host names checked), `"sasl_plaintext"`, `"sasl_ssl"`.
/// - `tls_ca_file`: with TLS, a PEM file of the CA that issued the brokers' certificates,
///   trusted instead of the system's.
/// - `sasl_mechanism = "PLAIN"` (or `"SCRAM-SHA-256"`, `"SCRAM-SHA-512"`), `sasl_username`,
///   `sasl_password`: with SASL, required (the password may come from
///   `FERRY_SINK__SASL_PASSWORD`); never printed.
/// - `[sink.librdkafka]`: extra librdkafka properties for every client ferry makes
///   (producers, topic admin, reconciliation reader), e.g. `"compression.type" = "snappy"`.
///   Properties that exactly-once delivery depends on are refused with the key to use;
///   ferry's own defaults (`enable.metrics.push = "false"`) can be overridden here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub topic_template: String,
    pub transactional_id_prefix: String,
    pub create_topics: bool,
    pub topic_partitions: u32,
    pub topic_replication_factor: Option<u16>,
    pub timeout_secs: u64,
    pub transaction_timeout_secs: u64,
    pub delivery_window: usize,
    pub reconcile_margin_secs: u64,
    pub source: Option<String>,
    pub security_protocol: SecurityProtocol,
    pub tls_ca_file: Option<PathBuf>,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<SecretString>,
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_template: "ferry.{aggregate_type}".into(),
            transactional_id_prefix: "ferry".into(),
            create_topics: true,
            topic_partitions: 16,
            topic_replication_factor: None,
            timeout_secs: 30,
            transaction_timeout_secs: 60,
            delivery_window: 250,
            reconcile_margin_secs: 30,
            source: None,
            security_protocol: SecurityProtocol::default(),
            tls_ca_file: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            librdkafka: BTreeMap::new(),
        }
    }
}

/// A setting of [`KafkaSinkConfig`] that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid kafka sink setting `{key}`: {reason}")]
#[non_exhaustive]
pub struct InvalidKafkaConfig {
    /// The config key, as written in the config file (e.g. `topic_template`).
    pub key: String,
    /// What is wrong and what is allowed instead.
    pub reason: String,
}

impl InvalidKafkaConfig {
    pub(super) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Largest partition count ferry creates a topic with.
const MAX_TOPIC_PARTITIONS: u32 = 10_000;

/// Largest accepted `delivery_window`.
const MAX_DELIVERY_WINDOW: usize = 100_000;

/// Longest transactional id prefix; leaves room for `-p<partition>`.
const MAX_PREFIX_LEN: usize = 200;

/// The checked form of a [`KafkaSinkConfig`], ready to connect with.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) template: TopicTemplate,
    pub(crate) timeout: Duration,
    pub(crate) reconcile_margin: Duration,
    pub(crate) delivery_window: usize,
    /// Properties every client gets: brokers, ferry's defaults and the user's librdkafka
    /// settings.
    pub(crate) base: ClientConfig,
}

impl KafkaSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidKafkaConfig> {
        self.check().map(drop)
    }

    /// The librdkafka settings every client ferry makes starts from: the brokers and the
    /// `librdkafka` table. For tools that talk to the same cluster (admin, checks).
    pub fn client_config(&self) -> Result<ClientConfig, InvalidKafkaConfig> {
        self.check().map(|checked| checked.base)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidKafkaConfig> {
        check_brokers(&self.brokers)?;
        let template = TopicTemplate::parse(&self.topic_template)
            .map_err(|reason| InvalidKafkaConfig::new("topic_template", reason))?;
        let prefix = &self.transactional_id_prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(InvalidKafkaConfig::new(
                "transactional_id_prefix",
                format!(
                    "{prefix:?} is not allowed: use 1 to {MAX_PREFIX_LEN} letters, digits, '.', \
                     '_' or '-', the same for every relay of this outbox, e.g. \"orders-outbox\""
                ),
            ));
        }
        if !(1..=MAX_TOPIC_PARTITIONS).contains(&self.topic_partitions) {
            return Err(InvalidKafkaConfig::new(
                "topic_partitions",
                format!(
                    "is {}; allowed is 1 to {MAX_TOPIC_PARTITIONS} (default 16)",
                    self.topic_partitions
                ),
            ));
        }
        if self.topic_replication_factor == Some(0) {
            return Err(InvalidKafkaConfig::new(
                "topic_replication_factor",
                "must be at least 1, or left unset for the broker's default",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(InvalidKafkaConfig::new(
                "timeout_secs",
                "must be at least 1 second (default 30)",
            ));
        }
        if self.transaction_timeout_secs < self.timeout_secs {
            return Err(InvalidKafkaConfig::new(
                "transaction_timeout_secs",
                format!(
                    "is {} but must be at least timeout_secs ({}): a record may take that long \
                     to be delivered inside its transaction",
                    self.transaction_timeout_secs, self.timeout_secs
                ),
            ));
        }
        if !(1..=MAX_DELIVERY_WINDOW).contains(&self.delivery_window) {
            return Err(InvalidKafkaConfig::new(
                "delivery_window",
                format!(
                    "is {}; allowed is 1 to {MAX_DELIVERY_WINDOW} (default 250)",
                    self.delivery_window
                ),
            ));
        }
        if let Some(source) = &self.source
            && (source.is_empty() || source.chars().any(char::is_control))
        {
            return Err(InvalidKafkaConfig::new(
                "source",
                "must be a non-empty URI without control characters (e.g. \"urn:shop:orders\"), \
                 or left unset for ferry://<aggregate_type>",
            ));
        }
        let mut base = ClientConfig::new();
        for (key, value) in DEFAULTS {
            base.set(key, value);
        }
        for (key, value) in &self.librdkafka {
            if let Some((_, instead)) = CONTROLLED
                .iter()
                .chain(&SECURITY_PROPERTIES)
                .find(|(controlled, _)| controlled.eq_ignore_ascii_case(key))
            {
                return Err(InvalidKafkaConfig::new(
                    format!("librdkafka.\"{key}\""),
                    format!("is set by ferry: {instead}"),
                ));
            }
            base.set(key, value);
        }
        security::apply(self, &mut base)?;
        // librdkafka checks names and values here, without connecting.
        base.create_native_config().map_err(|err| {
            InvalidKafkaConfig::new(
                "librdkafka",
                format!("{err} (see librdkafka's CONFIGURATION.md for the properties)"),
            )
        })?;
        base.set("bootstrap.servers", self.brokers.trim());
        Ok(Checked {
            template,
            timeout: Duration::from_secs(self.timeout_secs),
            reconcile_margin: Duration::from_secs(self.reconcile_margin_secs),
            delivery_window: self.delivery_window,
            base,
        })
    }
}

fn check_brokers(brokers: &str) -> Result<(), InvalidKafkaConfig> {
    let mut count = 0;
    for broker in brokers
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains("://") && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(InvalidKafkaConfig::new(
                "brokers",
                format!(
                    "{broker:?} is not host:port; expected e.g. \"127.0.0.1:9092\" (several \
                     separated by commas, without a scheme)"
                ),
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err(InvalidKafkaConfig::new(
            "brokers",
            "is empty; expected e.g. \"127.0.0.1:9092\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: &KafkaSinkConfig) -> String {
        config.validate().expect_err("must be rejected").key
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(KafkaSinkConfig::default().validate(), Ok(()));
    }

    #[test]
    fn bad_keys_are_named() {
        let base = KafkaSinkConfig::default;
        for brokers in [
            "",
            " , ",
            "localhost",
            "kafka://a:9092",
            "a:0",
            "a:x",
            ":9092",
        ] {
            let config = KafkaSinkConfig {
                brokers: brokers.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "brokers", "{brokers:?}");
        }
        assert_eq!(
            key_of(&KafkaSinkConfig {
                topic_template: "ferry/{aggregate_type}".into(),
                ..base()
            }),
            "topic_template"
        );
        for prefix in ["", "a b", "a/b", &"x".repeat(201)] {
            let config = KafkaSinkConfig {
                transactional_id_prefix: prefix.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "transactional_id_prefix", "{prefix:?}");
        }
        assert_eq!(
            key_of(&KafkaSinkConfig {
                topic_partitions: 0,
                ..base()
            }),
            "topic_partitions"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                topic_replication_factor: Some(0),
                ..base()
            }),
            "topic_replication_factor"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                timeout_secs: 0,
                ..base()
            }),
            "timeout_secs"
        );
        assert_eq!(
            key_of(&KafkaSinkConfig {
                timeout_secs: 90,
                ..base()
            }),
            "transaction_timeout_secs"
        );
        for delivery_window in [0, 100_001] {
            let config = KafkaSinkConfig {
                delivery_window,
                ..base()
            };
            assert_eq!(key_of(&config), "delivery_window", "{delivery_window}");
        }
        assert_eq!(
            key_of(&KafkaSinkConfig {
                source: Some(String::new()),
                ..base()
            }),
            "source"
        );
    }

    #[test]
    fn controlled_librdkafka_properties_are_refused_with_what_to_set() {
        for (key, hint) in [
            ("enable.idempotence", "always on"),
            ("ACKS", "acks=all"),
            ("transactional.id", "transactional_id_prefix"),
            ("bootstrap.servers", "brokers"),
            ("message.timeout.ms", "timeout_secs"),
        ] {
            let config = KafkaSinkConfig {
                librdkafka: [(key.to_owned(), "x".to_owned())].into(),
                ..KafkaSinkConfig::default()
            };
            let err = config.validate().expect_err("controlled");
            assert!(err.key.contains(key), "{err}");
            assert!(err.reason.contains(hint), "{err}");
        }
    }

    #[test]
    fn librdkafka_checks_names_and_values() {
        let good = KafkaSinkConfig {
            librdkafka: [
                ("compression.type".to_owned(), "lz4".to_owned()),
                ("linger.ms".to_owned(), "20".to_owned()),
            ]
            .into(),
            ..KafkaSinkConfig::default()
        };
        assert_eq!(good.validate(), Ok(()));
        for (key, value) in [("no.such.property", "1"), ("linger.ms", "soon")] {
            let config = KafkaSinkConfig {
                librdkafka: [(key.to_owned(), value.to_owned())].into(),
                ..KafkaSinkConfig::default()
            };
            let err = config.validate().expect_err("refused by librdkafka");
            assert_eq!(err.key, "librdkafka");
            assert!(err.reason.contains(key), "{err}");
        }
    }

    #[test]
    fn ferry_defaults_apply_unless_the_table_overrides_them() {
        let defaults = KafkaSinkConfig::default().client_config().expect("valid");
        assert_eq!(defaults.get("enable.metrics.push"), Some("false"));
        let overridden = KafkaSinkConfig {
            librdkafka: [("enable.metrics.push".to_owned(), "true".to_owned())].into(),
            ..KafkaSinkConfig::default()
        }
        .client_config()
        .expect("valid");
        assert_eq!(overridden.get("enable.metrics.push"), Some("true"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_str::<KafkaSinkConfig>(r#"{"brokers":"a:1","topic":"x"}"#)
            .expect_err("unknown key");
        assert!(err.to_string().contains("topic"), "{err}");
    }
}
