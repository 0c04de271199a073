//! Settings of the RabbitMQ (AMQP 0-9-1) sink and their validation.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::sink_config::{InvalidSinkConfig, check_count, check_source};
use crate::template::Template;

/// Largest accepted `confirm_window`.
pub const MAX_CONFIRM_WINDOW: usize = 10_000;

/// Settings of the RabbitMQ sink. Every key is optional; the defaults are:
///
/// - `url = "amqp://guest:guest@127.0.0.1:5672/%2f"`: the broker and virtual host
///   (`%2f` is `/`); `amqps://` for TLS. A secret: never logged, errors name only host,
///   port and virtual host.
/// - `exchange_template = "ferry"`: the exchange of each message, with the placeholders
///   `{aggregate_type}`, `{aggregate_id}`, `{event_type}` and `{partition}` (values
///   inserted as they are). `""` is the default exchange, which routes by queue name.
///   Exchanges must exist: each is checked (passively declared) the first time it is used,
///   and a missing one blocks the partition.
/// - `routing_key_template = "{aggregate_type}.{event_type}"`: the routing key, with the
///   same placeholders (a `.` in a value adds a topic word).
/// - `confirm_timeout_secs = 10`: how long to wait for the publisher confirms of a batch,
///   and for a connection, before the batch counts as failed and is retried.
/// - `confirm_window = 250`: messages published on a partition's channel before their
///   confirms are awaited; a batch goes in windows of this many. Bounds the relay's memory
///   while the broker is slower than the relay (whole 1000-message batches on 16
///   partitions peaked at 58 MiB, windows of 250 at 37 MiB; BENCHMARKS.md section 6).
/// - `source`: the CloudEvents `source` of every event; unset means
///   `ferry://<aggregate_type>`.
/// - `tls_ca_file`: with `amqps://`, a PEM file of the CA that issued the broker's
///   certificate, trusted besides the public (webpki) roots.
/// - `[sink.declare]`: for tests and demos only, declares what production brokers declare
///   themselves: each exchange on first use (durable, of `exchange_type`, default
///   `"topic"`) and, if `queue` is set, a durable queue bound to each exchange with
///   `binding_key` (default `"#"`). Unset declares nothing.
///
/// Every message is published with `mandatory` set: a message no queue takes is returned
/// by the broker and blocks the partition, instead of vanishing.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSinkConfig {
    pub url: SecretString,
    pub exchange_template: String,
    pub routing_key_template: String,
    pub confirm_timeout_secs: u64,
    pub confirm_window: usize,
    pub source: Option<String>,
    pub declare: Option<AmqpDeclare>,
    pub tls_ca_file: Option<PathBuf>,
}

/// What the sink declares when `[sink.declare]` is set (tests and demos).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpDeclare {
    pub exchange_type: String,
    pub queue: Option<String>,
    pub binding_key: String,
}

impl Default for AmqpDeclare {
    fn default() -> Self {
        Self {
            exchange_type: "topic".into(),
            queue: None,
            binding_key: "#".into(),
        }
    }
}

impl std::fmt::Debug for AmqpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSinkConfig")
            .field("url", &"[redacted]")
            .field("exchange_template", &self.exchange_template)
            .field("routing_key_template", &self.routing_key_template)
            .field("confirm_timeout_secs", &self.confirm_timeout_secs)
            .field("confirm_window", &self.confirm_window)
            .field("source", &self.source)
            .field("declare", &self.declare)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Default for AmqpSinkConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange_template: "ferry".into(),
            routing_key_template: "{aggregate_type}.{event_type}".into(),
            confirm_timeout_secs: 10,
            confirm_window: 250,
            source: None,
            declare: None,
            tls_ca_file: None,
        }
    }
}

/// The checked form of an [`AmqpSinkConfig`], ready to connect with.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) uri: AMQPUri,
    /// `host:port/vhost`, without credentials, for messages.
    pub(crate) server: String,
    pub(crate) exchange: Template,
    pub(crate) routing_key: Template,
    pub(crate) confirm_timeout: Duration,
    pub(crate) confirm_window: usize,
    pub(crate) declare: Option<(ExchangeKind, Option<String>, String)>,
    /// The CA certificates of `tls_ca_file`.
    pub(crate) tls: OwnedTLSConfig,
}

impl AmqpSinkConfig {
    /// Checks every setting without connecting; the error names the first bad key and
    /// what it accepts.
    pub fn validate(&self) -> Result<(), InvalidSinkConfig> {
        self.check().map(drop)
    }

    pub(crate) fn check(&self) -> Result<Checked, InvalidSinkConfig> {
        let uri = AMQPUri::from_str(self.url.expose_secret()).map_err(|err| {
            invalid(
                "url",
                format!(
                    "{err}; expected e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\" (%2f is the \
                     virtual host /) or \"amqps://user:password@host:5671/vhost\""
                ),
            )
        })?;
        if uri.authority.host.is_empty() {
            return Err(invalid(
                "url",
                "has no host; expected e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            ));
        }
        let server = format!(
            "{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        );
        let exchange = Template::parse(&self.exchange_template)
            .map_err(|reason| invalid("exchange_template", reason))?;
        let routing_key = Template::parse(&self.routing_key_template)
            .map_err(|reason| invalid("routing_key_template", reason))?;
        if self.confirm_timeout_secs == 0 {
            return Err(invalid(
                "confirm_timeout_secs",
                "must be at least 1 second (default 10)",
            ));
        }
        check_count(
            "amqp",
            "confirm_window",
            self.confirm_window,
            MAX_CONFIRM_WINDOW,
            250,
        )?;
        check_source("amqp", self.source.as_deref())?;
        let declare = match &self.declare {
            None => None,
            Some(declare) => {
                let kind = match declare.exchange_type.as_str() {
                    "topic" => ExchangeKind::Topic,
                    "direct" => ExchangeKind::Direct,
                    "fanout" => ExchangeKind::Fanout,
                    "headers" => ExchangeKind::Headers,
                    other => {
                        return Err(invalid(
                            "declare.exchange_type",
                            format!(
                                "{other:?} is not one of \"topic\", \"direct\", \"fanout\", \"headers\""
                            ),
                        ));
                    }
                };
                if self.exchange_template.is_empty() {
                    return Err(invalid(
                        "declare",
                        "cannot declare the default exchange (exchange_template = \"\"); set an \
                         exchange_template or remove [sink.declare]",
                    ));
                }
                if let Some(queue) = &declare.queue
                    && (queue.is_empty() || queue.len() > 255)
                {
                    return Err(invalid(
                        "declare.queue",
                        "must be 1 to 255 bytes, or left unset to declare no queue",
                    ));
                }
                if declare.binding_key.len() > 255 {
                    return Err(invalid(
                        "declare.binding_key",
                        "must be at most 255 bytes (default \"#\")",
                    ));
                }
                Some((kind, declare.queue.clone(), declare.binding_key.clone()))
            }
        };
        let tls = match &self.tls_ca_file {
            None => OwnedTLSConfig::default(),
            Some(_) if uri.scheme != AMQPScheme::AMQPS => {
                return Err(invalid(
                    "tls_ca_file",
                    "is set but `url` is not amqps://: use amqps://user:password@host:5671/vhost",
                ));
            }
            Some(path) => {
                let pem = crate::tls::read_ca_file(path)
                    .map_err(|reason| invalid("tls_ca_file", reason))?;
                OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(String::from_utf8_lossy(&pem).into_owned()),
                }
            }
        };
        Ok(Checked {
            tls,
            uri,
            server,
            exchange,
            routing_key,
            confirm_timeout: Duration::from_secs(self.confirm_timeout_secs),
            confirm_window: self.confirm_window,
            declare,
        })
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidSinkConfig {
    InvalidSinkConfig::new("amqp", key, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: &AmqpSinkConfig) -> &'static str {
        config.validate().expect_err("must be rejected").key
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(AmqpSinkConfig::default().validate(), Ok(()));
    }

    #[test]
    fn bad_keys_are_named() {
        let base = AmqpSinkConfig::default;
        for url in ["", "http://x", "amqp://[::1"] {
            let config = AmqpSinkConfig {
                url: url.into(),
                ..base()
            };
            assert_eq!(key_of(&config), "url", "{url:?}");
        }
        let config = AmqpSinkConfig {
            exchange_template: "x{nope}".into(),
            ..base()
        };
        assert_eq!(key_of(&config), "exchange_template");
        let config = AmqpSinkConfig {
            routing_key_template: "{event_type".into(),
            ..base()
        };
        assert_eq!(key_of(&config), "routing_key_template");
        let config = AmqpSinkConfig {
            confirm_timeout_secs: 0,
            ..base()
        };
        assert_eq!(key_of(&config), "confirm_timeout_secs");
        for window in [0, MAX_CONFIRM_WINDOW + 1] {
            let config = AmqpSinkConfig {
                confirm_window: window,
                ..base()
            };
            assert_eq!(key_of(&config), "confirm_window");
        }
        let config = AmqpSinkConfig {
            declare: Some(AmqpDeclare {
                exchange_type: "x-delayed".into(),
                ..AmqpDeclare::default()
            }),
            ..base()
        };
        assert_eq!(key_of(&config), "declare.exchange_type");
        let config = AmqpSinkConfig {
            exchange_template: String::new(),
            declare: Some(AmqpDeclare::default()),
            ..base()
        };
        assert_eq!(key_of(&config), "declare");
    }

    #[test]
    fn the_url_is_secret_and_the_server_is_named_without_it() {
        let config: AmqpSinkConfig = serde_json::from_str(
            r#"{"url":"amqp://app:s3cret@mq.internal:5673/shop","declare":{"queue":"q"}}"#,
        )
        .expect("parses");
        assert!(!format!("{config:?}").contains("s3cret"));
        let checked = config.check().expect("valid");
        assert_eq!(checked.server, "mq.internal:5673/shop");
        let err =
            serde_json::from_str::<AmqpSinkConfig>(r#"{"exchange":"x"}"#).expect_err("unknown key");
        assert!(err.to_string().contains("exchange"), "{err}");
    }
}
