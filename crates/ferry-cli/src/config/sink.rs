//! `[sink]`: where messages go. Each sink's settings and their checks are the `ferry`
//! library's; this enum picks one by `type`.

use std::path::Path;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use ferry::amqp::AmqpSinkConfig;
use ferry::file::FileSinkConfig;
#[cfg(feature = "kafka")]
use ferry::kafka::KafkaSinkConfig;
use ferry::mqtt::MqttSinkConfig;
use ferry::nats::NatsSinkConfig;
use ferry::redis_stream::RedisStreamSinkConfig;
use ferry::webhook::WebhookSinkConfig;

/// Where messages go.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
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

impl SinkConfig {
    /// The `[sink]` section of the config file at `path`, validated; the file's other
    /// sections are ignored (`ferry replay --sink-config`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("sink config file {} not found", path.display());
        }
        let sink: Self = Figment::from(Toml::file_exact(path))
            .extract_inner("sink")
            .with_context(|| format!("invalid [sink] section in {}", path.display()))?;
        sink.validate()?;
        Ok(sink)
    }

    /// This sink as a replay named `name` uses it, beside a live relay publishing the same
    /// partitions: NATS without subject-sequence fencing (the replay holds no lease, and
    /// its expected sequences would race the relay's), Kafka with transactional ids of its
    /// own (`<prefix>-replay-<name>-p<partition>`), which fence only an earlier run of the
    /// same replay, never the live relay's producers.
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    pub fn for_replay(mut self, name: &str) -> Self {
        match &mut self {
            Self::Nats(nats) => nats.fencing = Some(false),
            #[cfg(feature = "kafka")]
            Self::Kafka(kafka) => {
                kafka.transactional_id_prefix =
                    format!("{}-replay-{name}", kafka.transactional_id_prefix);
            }
            _ => {}
        }
        self
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Nats(nats) => nats.validate().context("sink")?,
            Self::RedisStream(redis) => redis.validate().context("sink")?,
            Self::Amqp(amqp) => amqp.validate().context("sink")?,
            Self::Mqtt(mqtt) => mqtt.validate().context("sink")?,
            Self::Webhook(webhook) => webhook.validate().context("sink")?,
            #[cfg(feature = "kafka")]
            Self::Kafka(kafka) => kafka.validate().context("sink")?,
            #[cfg(not(feature = "kafka"))]
            Self::Kafka(_) => return Err(kafka_not_built()),
            Self::File(_) | Self::Stdout { .. } => {}
        }
        Ok(())
    }
}

/// The error for a Kafka sink in a ferry built without it.
#[cfg(not(feature = "kafka"))]
pub fn kafka_not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "sink.type = \"kafka\" needs a ferry built with Kafka support: \
         cargo install ferry-cli --features kafka (or cargo build --features kafka)"
    )
}
